package outbox

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/segmentio/kafka-go"
)

// DeadLetterPolicy says what happens to the later messages of a key whose message was moved to
// the dead-letter table.
type DeadLetterPolicy int

const (
	// BlockKey holds the later messages of the same topic and key in the outbox until an
	// operator requeues or discards the dead message (RequeueDeadLetter, DiscardDeadLetter).
	// Order per key is never broken; other keys keep flowing. The default.
	BlockKey DeadLetterPolicy = iota
	// SkipAhead lets the later messages of the key continue: consumers see the key's sequence
	// with the dead message missing (and, if it is requeued, arriving late).
	SkipAhead
)

func (p DeadLetterPolicy) String() string {
	switch p {
	case BlockKey:
		return "block"
	case SkipAhead:
		return "skip"
	}
	return fmt.Sprintf("DeadLetterPolicy(%d)", int(p))
}

// ParseDeadLetterPolicy parses "block" or "skip".
func ParseDeadLetterPolicy(s string) (DeadLetterPolicy, error) {
	switch s {
	case "block", "":
		return BlockKey, nil
	case "skip":
		return SkipAhead, nil
	}
	return 0, fmt.Errorf("dead-letter policy %q: want block or skip", s)
}

// RelayConfig configures a Relay. Zero values mean the documented defaults.
type RelayConfig struct {
	// Pool is the outbox's database. The relay holds up to four of its connections (one
	// listening for notifications). Required.
	Pool *pgxpool.Pool
	// Brokers are the Kafka bootstrap addresses ("host:9092"). Required.
	Brokers []string
	// Transport carries TLS or SASL settings for the brokers; nil means plain TCP.
	Transport *kafka.Transport
	// Table is the outbox table, as given to Migrate. Default DefaultTable.
	Table string
	// ID names this relay in the lease tables; it must be unique among running relays.
	// Default: host name, process id and a random suffix.
	ID string

	// BatchSize is the most messages read and published at once. Default 4000.
	BatchSize int
	// MaxBatchBytes caps the bytes sent to one partition in one produce request; a single
	// message larger than this fails without being sent. Keep it at or below the broker's
	// message.max.bytes. Default 1,000,000.
	MaxBatchBytes int
	// PollInterval is how often the relay looks for work when no notification arrives.
	// Default 1s.
	PollInterval time.Duration
	// LeaseTTL is how long a slot lease lasts without renewal (renewed every third of it), and
	// so how long the slots of a relay that died stay idle. Default 10s.
	LeaseTTL time.Duration
	// WriteTimeout bounds one produce request. Default 10s.
	WriteTimeout time.Duration

	// MaxAttempts is how many failed publishes of a message, each with the message sent on its
	// own, move it to the dead-letter table. Temporary broker failures do not count.
	// Default 10.
	MaxAttempts int
	// RetryBackoff and MaxRetryBackoff bound the delay before a failed message (and the later
	// messages of its key) is tried again; it doubles per attempt. Defaults 1s and 5m.
	RetryBackoff, MaxRetryBackoff time.Duration
	// BrokerBackoff and MaxBrokerBackoff bound the pause after a temporary failure (broker
	// unavailable); it doubles while failures continue. Defaults 100ms and 10s.
	BrokerBackoff, MaxBrokerBackoff time.Duration
	// DeadLetterTopic, when set, also receives each dead-lettered message, with the headers
	// treaty-dead-letter-error and treaty-original-topic added.
	DeadLetterTopic string
	// DeadLetterPolicy says what happens to later messages of a dead-lettered key.
	// Default BlockKey.
	DeadLetterPolicy DeadLetterPolicy
	// Retention keeps sent rows (marked with sent_at) for this long; 0 deletes them in the
	// batch that sent them.
	Retention time.Duration
	// StatsInterval is how often the backlog is measured and old rows are cleaned. Default 5s.
	StatsInterval time.Duration

	// Logger receives the relay's logs. Default slog.Default().
	Logger *slog.Logger
	// Observer receives events for metrics. Default NopObserver.
	Observer Observer
	// AfterPublish, when set, is called after the broker acknowledged a batch and before the
	// batch is marked sent. It exists for fault injection in tests (killing the process
	// there); leave it nil in production.
	AfterPublish func()
}

func (c *RelayConfig) setDefaults() error {
	if c.Pool == nil {
		return errors.New("relay config: Pool is required")
	}
	if len(c.Brokers) == 0 {
		return errors.New("relay config: Brokers is required (at least one host:port)")
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	if c.BatchSize == 0 {
		c.BatchSize = 4000
	}
	if c.BatchSize < 1 || c.BatchSize > 100000 {
		return fmt.Errorf("relay config: BatchSize %d, want 1..100000", c.BatchSize)
	}
	if c.MaxBatchBytes == 0 {
		c.MaxBatchBytes = 1_000_000
	}
	if c.MaxBatchBytes < 1024 {
		return fmt.Errorf("relay config: MaxBatchBytes %d, want at least 1024", c.MaxBatchBytes)
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = 10
	}
	if c.MaxAttempts < 1 {
		return fmt.Errorf("relay config: MaxAttempts %d, want at least 1", c.MaxAttempts)
	}
	def(&c.PollInterval, time.Second)
	def(&c.LeaseTTL, 10*time.Second)
	def(&c.WriteTimeout, 10*time.Second)
	def(&c.RetryBackoff, time.Second)
	def(&c.MaxRetryBackoff, 5*time.Minute)
	def(&c.BrokerBackoff, 100*time.Millisecond)
	def(&c.MaxBrokerBackoff, 10*time.Second)
	def(&c.StatsInterval, 5*time.Second)
	if c.LeaseTTL < 300*time.Millisecond {
		return fmt.Errorf("relay config: LeaseTTL %s, want at least 300ms", c.LeaseTTL)
	}
	if c.Retention < 0 {
		return fmt.Errorf("relay config: Retention %s, want 0 or more", c.Retention)
	}
	if c.DeadLetterPolicy != BlockKey && c.DeadLetterPolicy != SkipAhead {
		return fmt.Errorf("relay config: unknown %s", c.DeadLetterPolicy)
	}
	if c.ID == "" {
		host, _ := os.Hostname()
		c.ID = fmt.Sprintf("%s-%d-%06x", host, os.Getpid(), rand.Uint32()&0xffffff)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Observer == nil {
		c.Observer = NopObserver{}
	}
	return nil
}

// Relay moves committed outbox rows to Kafka: in order per key, at least once, with several
// relays sharing one table through slot leases. Start it, and Stop it to finish the batch in
// flight and hand its slots to the others.
type Relay struct {
	cfg       RelayConfig
	n         names
	log       *slog.Logger
	obs       Observer
	transport *kafka.Transport
	writer    *kafka.Writer
	client    *kafka.Client

	leaseMu sync.Mutex // serialises changes of slot ownership in the database
	mu      sync.Mutex // guards the fields below
	held    map[int32]lease
	release map[int32]bool // slots to give up between batches
	nSlots  int
	live    int

	wake chan struct{} // a notification or a change of slots; buffered, so signals coalesce

	pending *markJob // the batch loop's mark in flight

	startOnce, stopOnce sync.Once
	cancel              context.CancelFunc
	wg                  sync.WaitGroup
	batchDone           chan struct{}
	stopErr             error
}

type lease struct {
	epoch      int64
	validUntil time.Time // local clock; past it the slot is not read until renewed
}

// NewRelay checks cfg and returns a Relay that has not started.
func NewRelay(cfg RelayConfig) (*Relay, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	n, err := parseTableName(cfg.Table)
	if err != nil {
		return nil, err
	}
	transport := cfg.Transport
	if transport == nil {
		transport = &kafka.Transport{}
	}
	r := &Relay{
		cfg:       cfg,
		n:         n,
		log:       cfg.Logger.With("relay", cfg.ID, "table", n.source),
		obs:       cfg.Observer,
		transport: transport,
		held:      map[int32]lease{},
		release:   map[int32]bool{},
		wake:      make(chan struct{}, 1),
		batchDone: make(chan struct{}),
	}
	addr := kafka.TCP(cfg.Brokers...)
	r.client = &kafka.Client{Addr: addr, Transport: transport, Timeout: cfg.WriteTimeout}
	r.writer = &kafka.Writer{
		Addr:         addr,
		Transport:    transport,
		Balancer:     plannedBalancer{},
		RequiredAcks: kafka.RequireAll,
		// The relay plans each call so that a partition's messages fit one batch: a batch is
		// appended whole or not at all, which keeps a key's messages from being split between
		// a failed and a later successful request.
		BatchSize:  cfg.BatchSize,
		BatchBytes: int64(cfg.MaxBatchBytes),
		// Each call's batches are complete when WriteMessages returns from adding them, so
		// there is nothing to wait for; a short timeout sends them at once.
		BatchTimeout:    time.Millisecond,
		WriteTimeout:    cfg.WriteTimeout,
		ReadTimeout:     cfg.WriteTimeout,
		MaxAttempts:     2,
		WriteBackoffMin: 50 * time.Millisecond,
		WriteBackoffMax: 200 * time.Millisecond,
	}
	return r, nil
}

// ID is the relay's name in the lease tables.
func (r *Relay) ID() string { return r.cfg.ID }

// Start registers the relay, takes its first slots and starts its loops. It fails when the
// outbox tables do not exist (run Migrate first) or the database is unreachable.
func (r *Relay) Start(ctx context.Context) error {
	err := errors.New("relay already started")
	r.startOnce.Do(func() { err = r.start(ctx) })
	return err
}

func (r *Relay) start(ctx context.Context) error {
	var slots int
	if err := r.cfg.Pool.QueryRow(ctx, "SELECT count(*) FROM "+r.n.slots).Scan(&slots); err != nil {
		return fmt.Errorf("relay: read %s (did the outbox migrations run?): %w", r.n.slots, err)
	}
	if slots == 0 {
		return fmt.Errorf("relay: %s has no slots", r.n.slots)
	}
	r.nSlots = slots
	if err := r.leaseTick(ctx); err != nil {
		return fmt.Errorf("relay: first lease round: %w", err)
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r.cancel = cancel
	r.wg.Add(3)
	go func() { defer r.wg.Done(); r.leaseLoop(runCtx) }()
	go func() { defer r.wg.Done(); r.listenLoop(runCtx) }()
	go func() { defer r.wg.Done(); r.statsLoop(runCtx) }()
	go func() { defer close(r.batchDone); r.batchLoop(runCtx) }()
	r.log.Info("relay started", "slots", slots, "brokers", r.cfg.Brokers)
	return nil
}

// Stop finishes the batch in flight, releases the relay's slots so that other relays take
// them at once, and closes the Kafka writer. It is idempotent; ctx bounds the wait.
func (r *Relay) Stop(ctx context.Context) error {
	r.stopOnce.Do(func() { r.stopErr = r.stop(ctx) })
	return r.stopErr
}

func (r *Relay) stop(ctx context.Context) error {
	if r.cancel == nil { // never started
		r.closeKafka()
		return nil
	}
	r.cancel()
	var errs []error
	select {
	case <-r.batchDone:
	case <-ctx.Done():
		errs = append(errs, fmt.Errorf("relay stop: batch in flight did not finish: %w", ctx.Err()))
	}
	r.wg.Wait()
	// Without cancellation, so that a caller's expiring ctx still lets the slots go.
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	r.leaseMu.Lock()
	err := r.releaseSlots(cctx, nil)
	r.leaseMu.Unlock()
	if err != nil {
		errs = append(errs, fmt.Errorf("relay stop: release slots: %w", err))
	}
	if _, err := r.cfg.Pool.Exec(cctx, "DELETE FROM "+r.n.relays+" WHERE relay_id = $1", r.cfg.ID); err != nil {
		errs = append(errs, fmt.Errorf("relay stop: unregister: %w", err))
	}
	r.mu.Lock()
	r.held = map[int32]lease{}
	r.mu.Unlock()
	r.closeKafka()
	r.log.Info("relay stopped")
	return errors.Join(errs...)
}

func (r *Relay) closeKafka() {
	_ = r.writer.Close()
	r.transport.CloseIdleConnections()
}

// Run starts the relay, waits for ctx to end and stops it.
func (r *Relay) Run(ctx context.Context) error {
	if err := r.Start(ctx); err != nil {
		r.closeKafka()
		return err
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.WriteTimeout+10*time.Second)
	defer cancel()
	return r.Stop(sctx)
}

func (r *Relay) signal() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// sleep waits for d, a wake-up signal or the end of ctx, and reports whether ctx is still live.
func (r *Relay) sleep(ctx context.Context, d time.Duration, wakeable bool) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	var wake <-chan struct{}
	if wakeable {
		wake = r.wake
	}
	select {
	case <-ctx.Done():
		return false
	case <-wake:
	case <-t.C:
	}
	return true
}

// listenLoop keeps one connection listening on the table's channel and turns notifications
// into wake-ups. Polling covers the time it is down.
func (r *Relay) listenLoop(ctx context.Context) {
	backoff := r.cfg.BrokerBackoff
	for ctx.Err() == nil {
		err := r.listen(ctx)
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("relay: listen connection lost; polling until it is back", "err", err, "retry_in", backoff)
		if !r.sleep(ctx, backoff, false) {
			return
		}
		backoff = min(2*backoff, r.cfg.MaxBrokerBackoff)
	}
}

func (r *Relay) listen(ctx context.Context) error {
	pc, err := r.cfg.Pool.Acquire(ctx)
	if err != nil {
		return err
	}
	// The connection leaves the pool: it stays subscribed for as long as the relay runs.
	conn := pc.Hijack()
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+pgx.Identifier{r.n.channel}.Sanitize()); err != nil {
		return err
	}
	r.signal() // anything written while not listening is found by the next read
	for {
		if _, err := conn.WaitForNotification(ctx); err != nil {
			return err
		}
		r.signal()
	}
}

// statsLoop measures the backlog and deletes what retention no longer keeps.
func (r *Relay) statsLoop(ctx context.Context) {
	for {
		if err := r.stats(ctx); err != nil && ctx.Err() == nil {
			r.log.Warn("relay: backlog statistics", "err", err)
		}
		if !r.sleep(ctx, r.cfg.StatsInterval, false) {
			return
		}
	}
}

func (r *Relay) stats(ctx context.Context) error {
	var count int64
	var oldest *time.Time
	var now time.Time
	err := r.cfg.Pool.QueryRow(ctx, "SELECT count(*), min(created_at), now() FROM "+r.n.table+" WHERE sent_at IS NULL").Scan(&count, &oldest, &now)
	if err != nil {
		return err
	}
	age := time.Duration(0)
	if oldest != nil {
		age = max(now.Sub(*oldest), 0)
	}
	r.obs.Backlog(count, age)
	if r.cfg.Retention > 0 {
		// In slices, so that a large backlog of sent rows is not one long transaction.
		for range 100 {
			tag, err := r.cfg.Pool.Exec(ctx, "DELETE FROM "+r.n.table+" WHERE id IN (SELECT id FROM "+r.n.table+
				" WHERE sent_at < now() - $1::interval LIMIT 10000)", r.cfg.Retention)
			if err != nil {
				return err
			}
			if tag.RowsAffected() < 10000 {
				break
			}
		}
	}
	_, err = r.cfg.Pool.Exec(ctx, "DELETE FROM "+r.n.holds+" WHERE until < now() - interval '1 minute'")
	if err != nil {
		return err
	}
	_, err = r.cfg.Pool.Exec(ctx, "DELETE FROM "+r.n.relays+" WHERE expires_at < now() - interval '1 minute'")
	return err
}
