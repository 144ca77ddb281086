package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"github.com/segmentio/kafka-go"
)

// SQLiteRelayConfig configures a SQLiteRelay. Zero values mean the documented defaults.
type SQLiteRelayConfig struct {
	// DB is the SQLite database holding the outbox table. Required.
	DB *sql.DB
	// Brokers are the Kafka bootstrap addresses ("host:9092"). Required.
	Brokers []string
	// Transport carries TLS or SASL settings for the brokers; nil means plain TCP.
	Transport *kafka.Transport
	// Table is the outbox table, as given to NewSQLite. Default DefaultTable.
	Table string

	// BatchSize is the most messages read and published at once. Default 500.
	BatchSize int
	// MaxBatchBytes caps the bytes sent to one partition in one produce request; a single
	// message larger than this fails without being sent. Default 1,000,000.
	MaxBatchBytes int
	// PollInterval is how often the relay looks for new rows when it has nothing to do; Wake
	// makes it look at once. Default 200ms.
	PollInterval time.Duration
	// WriteTimeout bounds one produce request. Default 10s.
	WriteTimeout time.Duration
	// MaxAttempts is how many failed publishes of a message mark it dead (dead_at set, skipped
	// from then on, reported to the Observer). Temporary broker failures do not count.
	// Default 10.
	MaxAttempts int
	// Backoff and MaxBackoff bound the pause after a failed publish; it doubles while failures
	// continue. Defaults 100ms and 10s.
	Backoff, MaxBackoff time.Duration
	// Retention keeps sent rows (marked with sent_at) for this long; 0 deletes them in the
	// batch that sent them.
	Retention time.Duration

	// Logger receives the relay's logs. Default slog.Default().
	Logger *slog.Logger
	// Observer receives events for metrics. Default NopObserver.
	Observer Observer
}

func (c *SQLiteRelayConfig) setDefaults() error {
	if c.DB == nil {
		return errors.New("sqlite relay config: DB is required")
	}
	if len(c.Brokers) == 0 {
		return errors.New("sqlite relay config: Brokers is required (at least one host:port)")
	}
	if c.BatchSize == 0 {
		c.BatchSize = 500
	}
	if c.BatchSize < 1 || c.BatchSize > 10000 {
		return fmt.Errorf("sqlite relay config: BatchSize %d, want 1..10000", c.BatchSize)
	}
	if c.MaxBatchBytes == 0 {
		c.MaxBatchBytes = 1_000_000
	}
	if c.MaxBatchBytes < 1024 {
		return fmt.Errorf("sqlite relay config: MaxBatchBytes %d, want at least 1024", c.MaxBatchBytes)
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = 10
	}
	if c.MaxAttempts < 1 {
		return fmt.Errorf("sqlite relay config: MaxAttempts %d, want at least 1", c.MaxAttempts)
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.PollInterval, 200*time.Millisecond)
	def(&c.WriteTimeout, 10*time.Second)
	def(&c.Backoff, 100*time.Millisecond)
	def(&c.MaxBackoff, 10*time.Second)
	if c.Retention < 0 {
		return fmt.Errorf("sqlite relay config: Retention %s, want 0 or more", c.Retention)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Observer == nil {
		c.Observer = NopObserver{}
	}
	return nil
}

// SQLiteRelay moves committed rows of a SQLite outbox table to Kafka, at least once and in
// order per key, publishing them as the PostgreSQL Relay does: the same headers (message id,
// source, the caller's), murmur2 partitioning as the Java client, acknowledgement from all
// in-sync replicas.
//
// SQLite has one writer per file, so the table's AUTOINCREMENT ids follow commit order and a
// poll in id order never skips a late-committing row. There are no slot leases: run exactly one
// relay per database file (two would publish each message twice and could reorder a key).
type SQLiteRelay struct {
	cfg       SQLiteRelayConfig
	n         names
	log       *slog.Logger
	transport *kafka.Transport
	writer    *kafka.Writer
	client    *kafka.Client

	wake chan struct{} // buffered: signals coalesce

	startOnce, stopOnce sync.Once
	cancel              context.CancelFunc
	done                chan struct{}
	stopErr             error
}

// NewSQLiteRelay checks cfg and returns a relay that has not started.
func NewSQLiteRelay(cfg SQLiteRelayConfig) (*SQLiteRelay, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	n, err := parseSQLiteName("outbox", cfg.Table, DefaultTable)
	if err != nil {
		return nil, err
	}
	transport := cfg.Transport
	if transport == nil {
		transport = &kafka.Transport{}
	}
	addr := kafka.TCP(cfg.Brokers...)
	r := &SQLiteRelay{
		cfg:       cfg,
		n:         n,
		log:       cfg.Logger.With("relay", "sqlite", "table", n.source),
		transport: transport,
		client:    &kafka.Client{Addr: addr, Transport: transport, Timeout: cfg.WriteTimeout},
		wake:      make(chan struct{}, 1),
		done:      make(chan struct{}),
	}
	// The same writer settings as the PostgreSQL relay: each call is planned so that a
	// partition's messages fit one record batch, appended whole or not at all.
	r.writer = &kafka.Writer{
		Addr:            addr,
		Transport:       transport,
		Balancer:        plannedBalancer{},
		RequiredAcks:    kafka.RequireAll,
		BatchSize:       cfg.BatchSize,
		BatchBytes:      int64(cfg.MaxBatchBytes),
		BatchTimeout:    time.Millisecond,
		WriteTimeout:    cfg.WriteTimeout,
		ReadTimeout:     cfg.WriteTimeout,
		MaxAttempts:     2,
		WriteBackoffMin: 50 * time.Millisecond,
		WriteBackoffMax: 200 * time.Millisecond,
	}
	return r, nil
}

// Start checks that the outbox table exists and starts the poll loop.
func (r *SQLiteRelay) Start(ctx context.Context) error {
	err := errors.New("sqlite relay already started")
	r.startOnce.Do(func() { err = r.start(ctx) })
	return err
}

func (r *SQLiteRelay) start(ctx context.Context) error {
	if _, err := r.cfg.DB.ExecContext(ctx, "SELECT 1 FROM "+r.n.table+" LIMIT 0"); err != nil {
		close(r.done)
		return fmt.Errorf("sqlite relay: read %s (did SQLiteOutbox.Migrate run?): %w", r.n.table, err)
	}
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	r.cancel = cancel
	go func() { defer close(r.done); r.loop(runCtx) }()
	r.log.Info("sqlite relay started", "brokers", r.cfg.Brokers)
	return nil
}

// Wake makes an idle relay look for new rows now instead of at its next poll. Writers in the
// same process may call it after committing.
func (r *SQLiteRelay) Wake() {
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Stop finishes the batch in flight and closes the Kafka writer. It is idempotent; ctx bounds
// the wait.
func (r *SQLiteRelay) Stop(ctx context.Context) error {
	r.stopOnce.Do(func() {
		if r.cancel != nil {
			r.cancel()
			select {
			case <-r.done:
			case <-ctx.Done():
				r.stopErr = fmt.Errorf("sqlite relay stop: batch in flight did not finish: %w", ctx.Err())
			}
		}
		_ = r.writer.Close()
		r.transport.CloseIdleConnections()
		r.log.Info("sqlite relay stopped")
	})
	return r.stopErr
}

// Run starts the relay, waits for ctx to end and stops it.
func (r *SQLiteRelay) Run(ctx context.Context) error {
	if err := r.Start(ctx); err != nil {
		_ = r.Stop(ctx)
		return err
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.WriteTimeout+5*time.Second)
	defer cancel()
	return r.Stop(sctx)
}

func (r *SQLiteRelay) sleep(ctx context.Context, d time.Duration, wakeable bool) bool {
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

func (r *SQLiteRelay) loop(ctx context.Context) {
	backoff := r.cfg.Backoff
	var lastHousekeeping time.Time
	for {
		n, err := r.batch(ctx)
		if ctx.Err() != nil {
			return
		}
		switch {
		case err != nil:
			r.log.Warn("sqlite relay: batch failed; retrying", "err", err, "retry_in", backoff)
			if !r.sleep(ctx, backoff, false) {
				return
			}
			backoff = min(2*backoff, r.cfg.MaxBackoff)
		case n == 0:
			backoff = r.cfg.Backoff
			if time.Since(lastHousekeeping) > 5*time.Second {
				lastHousekeeping = time.Now()
				if err := r.housekeeping(ctx); err != nil && ctx.Err() == nil {
					r.log.Warn("sqlite relay: backlog statistics", "err", err)
				}
			}
			if !r.sleep(ctx, r.cfg.PollInterval, true) {
				return
			}
		default:
			backoff = r.cfg.Backoff
		}
	}
}

// sqliteRow is one unsent outbox row.
type sqliteRow struct {
	id        int64
	msgID     uuid.UUID
	topic     string
	key       []byte
	value     []byte
	headers   []byte
	createdAt time.Time
	attempts  int
	msg       kafka.Message
}

// batch publishes the oldest unsent rows and records the outcome. It returns how many rows it
// published, and an error when something failed (the caller backs off).
func (r *SQLiteRelay) batch(ctx context.Context) (int, error) {
	rows, err := r.read(ctx)
	if err != nil || len(rows) == 0 {
		return 0, err
	}
	topics := []string{}
	seen := map[string]bool{}
	for _, o := range rows {
		if !seen[o.topic] {
			seen[o.topic] = true
			topics = append(topics, o.topic)
		}
	}
	meta, err := r.client.Metadata(ctx, &kafka.MetadataRequest{Topics: topics})
	if err != nil {
		r.cfg.Observer.PublishFailed(topics[0], len(rows), true, err)
		return 0, fmt.Errorf("topic metadata: %w", err)
	}
	counts := map[string]int{}
	for _, t := range meta.Topics {
		if t.Error == nil {
			counts[t.Name] = len(t.Partitions)
		}
	}

	// Plan: the longest prefix in id order that fits the per-partition budgets, so the call
	// never splits a partition's messages between a failed and a later successful request.
	// A row that cannot be sent at all (unknown topic, too large) ends the prefix and fails on
	// its own, without charging its neighbours.
	type budget struct{ count, bytes int }
	budgets := map[topicPartition]*budget{}
	var send []*sqliteRow
	var bad *sqliteRow
	var badErr error
	for _, o := range rows {
		hs, err := decodeHeaders(o.headers)
		if err != nil {
			bad, badErr = o, err
			break
		}
		partitions, ok := counts[o.topic]
		if !ok {
			bad, badErr = o, fmt.Errorf("topic %q: %w", o.topic, kafka.UnknownTopicOrPartition)
			break
		}
		hs = append(hs, Header{Key: HeaderMessageID, Value: []byte(o.msgID.String())}, Header{Key: HeaderSource, Value: []byte(r.n.source)})
		khs := make([]kafka.Header, len(hs))
		for i, h := range hs {
			khs[i] = kafka.Header{Key: h.Key, Value: h.Value}
		}
		o.msg = kafka.Message{Topic: o.topic, Key: o.key, Value: o.value, Headers: khs, Time: o.createdAt}
		size := estimateSize(&o.msg)
		if size > r.cfg.MaxBatchBytes {
			bad, badErr = o, fmt.Errorf("message to %q is %d bytes, limit %d (max batch bytes)", o.topic, size, r.cfg.MaxBatchBytes)
			break
		}
		ps := make([]int, partitions)
		for i := range ps {
			ps[i] = i
		}
		p := javaPartitioner.Balance(o.msg, ps...)
		o.msg.WriterData = p
		tp := topicPartition{o.topic, p}
		b := budgets[tp]
		if b == nil {
			b = &budget{}
			budgets[tp] = b
		}
		if b.count+1 > r.cfg.BatchSize || b.bytes+size > r.cfg.MaxBatchBytes {
			break // the rest waits for the next batch
		}
		b.count++
		b.bytes += size
		send = append(send, o)
	}

	var sent, failed []*sqliteRow
	var failErrs []error
	var firstErr error
	temporaryOnly := true
	if len(send) > 0 {
		msgs := make([]kafka.Message, len(send))
		for i, o := range send {
			msgs[i] = o.msg
		}
		start := time.Now()
		errs := r.write(ctx, msgs)
		acked := time.Now()
		var pub PublishedBatch
		for i, o := range send {
			if errs[i] == nil {
				sent = append(sent, o)
				pub.Messages = append(pub.Messages, PublishedMessage{ID: o.msgID, Topic: o.topic, CreatedAt: o.createdAt})
				continue
			}
			if firstErr == nil {
				firstErr = errs[i]
			}
			if !temporary(errs[i]) {
				temporaryOnly = false
				failed = append(failed, o)
				failErrs = append(failErrs, errs[i])
			}
			r.cfg.Observer.PublishFailed(o.topic, 1, temporary(errs[i]), errs[i])
		}
		if len(pub.Messages) > 0 {
			pub.Duration, pub.AckedAt = acked.Sub(start), acked
			r.cfg.Observer.BatchPublished(pub)
		}
	}
	if bad != nil && len(send) == 0 {
		// Only when it heads the batch: otherwise the rows before it go first, and it is
		// tried again at the head of the next batch.
		failed = append(failed, bad)
		failErrs = append(failErrs, permanentError{badErr})
		temporaryOnly = false
		if firstErr == nil {
			firstErr = badErr
		}
		r.cfg.Observer.PublishFailed(bad.topic, 1, false, badErr)
	}
	if err := r.mark(ctx, sent, failed, failErrs); err != nil {
		// The broker has the sent messages; they go again on the next batch (at least once).
		return 0, fmt.Errorf("mark %d rows of %s: %w", len(sent)+len(failed), r.n.source, err)
	}
	if firstErr != nil {
		return len(sent), fmt.Errorf("publish (temporary: %t): %w", temporaryOnly, firstErr)
	}
	return len(sent), nil
}

func (r *SQLiteRelay) read(ctx context.Context) ([]*sqliteRow, error) {
	rs, err := r.cfg.DB.QueryContext(ctx, "SELECT id, msg_id, topic, key, value, headers, created_at, attempts FROM "+
		r.n.table+" WHERE sent_at IS NULL AND dead_at IS NULL ORDER BY id LIMIT $1", r.cfg.BatchSize)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", r.n.source, err)
	}
	defer rs.Close()
	var out []*sqliteRow
	for rs.Next() {
		o := &sqliteRow{}
		var msgID string
		var created int64
		if err := rs.Scan(&o.id, &msgID, &o.topic, &o.key, &o.value, &o.headers, &created, &o.attempts); err != nil {
			return nil, fmt.Errorf("read %s: %w", r.n.source, err)
		}
		if o.msgID, err = uuid.Parse(msgID); err != nil {
			return nil, fmt.Errorf("read %s: row %d: msg_id %q: %w", r.n.source, o.id, msgID, err)
		}
		o.createdAt = time.UnixMicro(created)
		out = append(out, o)
	}
	if err := rs.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", r.n.source, err)
	}
	return out, nil
}

// write sends msgs synchronously and returns one error per message.
func (r *SQLiteRelay) write(ctx context.Context, msgs []kafka.Message) []error {
	errs := make([]error, len(msgs))
	err := r.writer.WriteMessages(ctx, msgs...)
	if err == nil {
		return errs
	}
	var werrs kafka.WriteErrors
	if errors.As(err, &werrs) && len(werrs) == len(msgs) {
		copy(errs, werrs)
		return errs
	}
	for i := range errs {
		errs[i] = err
	}
	return errs
}

// mark records the batch's outcome in one transaction: sent rows are marked (or deleted without
// retention); each failed row counts an attempt and, at MaxAttempts, is marked dead.
func (r *SQLiteRelay) mark(ctx context.Context, sent, failed []*sqliteRow, errs []error) error {
	if len(sent) == 0 && len(failed) == 0 {
		return nil
	}
	// Without cancellation: the broker has the messages, so recording that is worth finishing
	// even while stopping.
	ctx = context.WithoutCancel(ctx)
	tx, err := r.cfg.DB.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback() }()
	now := time.Now().UnixMicro()
	for start := 0; start < len(sent); start += 500 {
		chunk := sent[start:min(start+500, len(sent))]
		args := make([]any, 0, len(chunk)+1)
		var in strings.Builder
		for i, o := range chunk {
			if i > 0 {
				in.WriteByte(',')
			}
			args = append(args, o.id)
			in.WriteString("$" + strconv.Itoa(len(args)))
		}
		q := "DELETE FROM " + r.n.table + " WHERE id IN (" + in.String() + ")"
		if r.cfg.Retention > 0 {
			args = append(args, now)
			q = "UPDATE " + r.n.table + " SET sent_at = $" + strconv.Itoa(len(args)) + " WHERE id IN (" + in.String() + ")"
		}
		if _, err := tx.ExecContext(ctx, q, args...); err != nil {
			return err
		}
	}
	var dead []*sqliteRow
	var deadErrs []error
	for i, o := range failed {
		o.attempts++
		var deadAt any
		if o.attempts >= r.cfg.MaxAttempts {
			deadAt = now
			dead = append(dead, o)
			deadErrs = append(deadErrs, errs[i])
		}
		msg := errs[i].Error()
		if len(msg) > 1000 {
			msg = msg[:1000]
		}
		if _, err := tx.ExecContext(ctx, "UPDATE "+r.n.table+" SET attempts = $1, last_error = $2, dead_at = $3 WHERE id = $4",
			o.attempts, msg, deadAt, o.id); err != nil {
			return err
		}
	}
	if err := tx.Commit(); err != nil {
		return err
	}
	for i, o := range dead {
		r.log.Error("sqlite relay: message failed too often; it is marked dead and skipped",
			"msg_id", o.msgID, "topic", o.topic, "attempts", o.attempts, "err", deadErrs[i])
		r.cfg.Observer.DeadLettered(o.topic, o.msgID, deadErrs[i].Error())
	}
	return nil
}

// housekeeping reports the backlog and deletes sent rows past the retention.
func (r *SQLiteRelay) housekeeping(ctx context.Context) error {
	var count int64
	var oldest sql.NullInt64
	err := r.cfg.DB.QueryRowContext(ctx, "SELECT count(*), min(created_at) FROM "+r.n.table+
		" WHERE sent_at IS NULL AND dead_at IS NULL").Scan(&count, &oldest)
	if err != nil {
		return err
	}
	age := time.Duration(0)
	if oldest.Valid {
		age = max(time.Since(time.UnixMicro(oldest.Int64)), 0)
	}
	r.cfg.Observer.Backlog(count, age)
	if r.cfg.Retention > 0 {
		cutoff := time.Now().Add(-r.cfg.Retention).UnixMicro()
		if _, err := r.cfg.DB.ExecContext(ctx, "DELETE FROM "+r.n.table+" WHERE sent_at < $1", cutoff); err != nil {
			return err
		}
	}
	return nil
}
