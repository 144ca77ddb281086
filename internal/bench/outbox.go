package bench

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/treatyhq/treaty/pkg/outbox"
)

const outboxUsage = `treaty-bench outbox: the transactional outbox relayed to Kafka.

Producers enqueue --messages messages over --keys keys, --per-tx to a transaction, with
--producers transactions at once, into a throwaway database on the server --db names;
--relays relays (in process) publish them to a broker (franz-go's kfake in process, or
--brokers). It reports the relayed rate, the latency from the enqueuing transaction's commit
to the broker's acknowledgement, and the server's one-row INSERT commit rate measured in the
same run at the same concurrency. The last line is one JSON object.

Usage:
  treaty-bench outbox --messages 200000 --keys 1000 --relays 1 --db URL [flags]

Flags:`

// OutboxConfig configures RunOutbox.
type OutboxConfig struct {
	DB         string
	Brokers    []string // empty: start kfake in process
	Messages   int
	Keys       int
	Relays     int
	Producers  int
	PerTx      int
	ValueSize  int
	BatchSize  int
	Partitions int
	Baseline   time.Duration
	Timeout    time.Duration
	Keep       bool
	// Preload enqueues everything before the relays start, to measure how fast a backlog
	// drains; the commit-to-ack latency then mostly measures the wait.
	Preload bool
	// DBPrefix names the throwaway database (prefix + 12 random hex digits); default
	// "treaty_bench_outbox_".
	DBPrefix string
	// KafkaPort, if not 0, is the port of the in-process kfake broker; default random.
	KafkaPort int
}

// OutboxResult is the JSON object the outbox benchmark prints last.
type OutboxResult struct {
	Benchmark     string  `json:"benchmark"`
	Messages      int     `json:"messages"`
	Keys          int     `json:"keys"`
	Relays        int     `json:"relays"`
	Producers     int     `json:"producers"`
	PerTx         int     `json:"per_tx"`
	Broker        string  `json:"broker"`
	MsgsPerSec    float64 `json:"msgs_per_sec"`
	EnqueuePerSec float64 `json:"enqueue_msgs_per_sec"`
	TxPerSec      float64 `json:"enqueue_tx_per_sec"`
	P50ms         float64 `json:"p50_ms"`
	P90ms         float64 `json:"p90_ms"`
	P99ms         float64 `json:"p99_ms"`
	Maxms         float64 `json:"max_ms"`
	Duplicates    int     `json:"duplicates"`
	InsertCommits float64 `json:"pg_insert_commits_per_sec"`
	// MsgsPerInsertCommit is msgs_per_sec / pg_insert_commits_per_sec: how many messages the
	// relay moves per one-row commit the server can do.
	MsgsPerInsertCommit float64 `json:"msgs_per_sec_over_insert_commits"`
	// TxOverInsertCommits is the producers' transaction rate over the INSERT commit rate: the
	// cost of enqueuing (and of the relay's load) on the server's commit ceiling.
	TxOverInsertCommits float64 `json:"enqueue_tx_over_insert_commits"`
	ElapsedSec          float64 `json:"elapsed_s"`

	Database string   `json:"database"`
	Brokers  []string `json:"brokers"`
	// The two phases apart: EnqueueSec is the producers' time to commit every message;
	// DrainAfterEnqueueSec is how long the relays took after that to publish the rest
	// (DrainedAfterEnqueue messages; with --preload, all of them), and DrainMsgsPerSec their
	// rate then, when the relays had the table to themselves.
	EnqueueSec           float64 `json:"enqueue_s"`
	DrainAfterEnqueueSec float64 `json:"drain_after_enqueue_s"`
	DrainedAfterEnqueue  int     `json:"drained_after_enqueue"`
	DrainMsgsPerSec      float64 `json:"drain_msgs_per_sec"`
	// CPU per 1,000 messages from start of the enqueue to the last acknowledgement: the
	// relays (with their Kafka clients), the producers, the unlabeled Go runtime, the
	// kfake broker when in process, and the PostgreSQL backends (when the server is local).
	CPUMsPer1000 OutboxCPU `json:"cpu_ms_per_1000_msgs"`
}

// OutboxCPU is the outbox bench's CPU split, in milliseconds per 1,000 messages.
type OutboxCPU struct {
	Relays     float64 `json:"relays"`
	Producers  float64 `json:"producers"`
	Broker     float64 `json:"broker"`
	Runtime    float64 `json:"runtime"`
	PostgreSQL float64 `json:"postgresql"`
}

// OutboxMain is `treaty-bench outbox`.
func OutboxMain(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	var cfg OutboxConfig
	var brokers string
	fs := flag.NewFlagSet("outbox", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, outboxUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.DB, "db", getenv("TREATY_DB"), "PostgreSQL URL (or TREATY_DB); the role needs CREATEDB")
	fs.StringVar(&brokers, "brokers", "", "Kafka brokers, comma-separated (default: kfake in process)")
	fs.IntVar(&cfg.Messages, "messages", 200000, "messages to relay")
	fs.IntVar(&cfg.Keys, "keys", 1000, "distinct keys")
	fs.IntVar(&cfg.Relays, "relays", 1, "relays sharing the table (in process, each with its own pool)")
	fs.IntVar(&cfg.Producers, "producers", 16, "enqueuing transactions at once (and connections for the commit rate)")
	fs.IntVar(&cfg.PerTx, "per-tx", 10, "messages per enqueuing transaction")
	fs.IntVar(&cfg.ValueSize, "value-size", 100, "bytes per message value")
	fs.IntVar(&cfg.BatchSize, "batch-size", 4000, "relay batch size")
	fs.IntVar(&cfg.Partitions, "partitions", 12, "partitions of the benchmark topic (kfake only)")
	fs.DurationVar(&cfg.Baseline, "baseline", 3*time.Second, "how long to measure the one-row INSERT commit rate")
	fs.DurationVar(&cfg.Timeout, "timeout", 5*time.Minute, "give up when not everything is relayed by then")
	fs.BoolVar(&cfg.Keep, "keep", false, "keep the treaty_bench_outbox_* database")
	fs.BoolVar(&cfg.Preload, "preload", false, "enqueue everything before starting the relays (measures draining a backlog)")
	fs.StringVar(&cfg.DBPrefix, "db-prefix", "treaty_bench_outbox_", "name prefix of the throwaway database (12 random hex digits follow); lower-case letters, digits and _")
	fs.IntVar(&cfg.KafkaPort, "kafka-port", 0, "port of the in-process kfake broker on 127.0.0.1 (default 0: random)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "treaty-bench outbox: unexpected argument %q (flags start with --)\n", fs.Arg(0))
		return 2
	}
	if brokers != "" {
		cfg.Brokers = strings.Split(brokers, ",")
	}
	res, err := RunOutbox(ctx, cfg, stdout)
	if err != nil {
		fmt.Fprintf(stderr, "treaty-bench outbox: %v\n", err)
		return 1
	}
	b, err := json.Marshal(res)
	if err != nil {
		fmt.Fprintf(stderr, "treaty-bench outbox: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, string(b))
	return 0
}

// ackRecorder is the relays' Observer: it notes when each message was acknowledged.
type ackRecorder struct {
	outbox.NopObserver
	mu    sync.Mutex
	acked map[uuid.UUID]time.Time
	dups  int
	n     atomic.Int64
}

func (a *ackRecorder) BatchPublished(b outbox.PublishedBatch) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, m := range b.Messages {
		if _, ok := a.acked[m.ID]; ok {
			a.dups++
			continue
		}
		a.acked[m.ID] = b.AckedAt
	}
	a.n.Store(int64(len(a.acked)))
}

// RunOutbox runs the outbox benchmark and writes progress to w.
func RunOutbox(ctx context.Context, cfg OutboxConfig, w io.Writer) (OutboxResult, error) {
	switch {
	case cfg.DB == "":
		return OutboxResult{}, errors.New("--db is required (or TREATY_DB)")
	case cfg.Messages < 1 || cfg.Keys < 1 || cfg.Relays < 1 || cfg.Producers < 1 || cfg.PerTx < 1:
		return OutboxResult{}, errors.New("--messages, --keys, --relays, --producers and --per-tx must be at least 1")
	}
	if cfg.DBPrefix == "" {
		cfg.DBPrefix = "treaty_bench_outbox_"
	}
	if err := checkDBPrefix(cfg.DBPrefix); err != nil {
		return OutboxResult{}, err
	}
	switch {
	case cfg.KafkaPort < 0 || cfg.KafkaPort > 65535:
		return OutboxResult{}, fmt.Errorf("--kafka-port is %d, must be 0 (random) or within 1..65535", cfg.KafkaPort)
	case cfg.KafkaPort != 0 && len(cfg.Brokers) > 0:
		return OutboxResult{}, errors.New("--kafka-port is for the in-process kfake broker; it cannot go with --brokers")
	}
	tdb, err := CreateTempDatabase(ctx, cfg.DB, cfg.DBPrefix)
	if err != nil {
		return OutboxResult{}, err
	}
	if !cfg.Keep {
		defer func() { _ = tdb.Drop(context.WithoutCancel(ctx)) }()
	} else {
		fmt.Fprintf(w, "keeping database %s\n", tdb.Name)
	}

	fmt.Fprintf(w, "measuring one-row INSERT commits at concurrency %d for %s...\n", cfg.Producers, cfg.Baseline)
	rate, err := MeasureCommitRate(ctx, tdb.URL, cfg.Producers, cfg.Baseline)
	if err != nil {
		return OutboxResult{}, err
	}
	fmt.Fprintf(w, "  %.0f commits/s\n", rate.PerSec)

	pcfg, err := pgxpool.ParseConfig(tdb.URL)
	if err != nil {
		return OutboxResult{}, err
	}
	pcfg.MaxConns = int32(cfg.Producers)
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return OutboxResult{}, err
	}
	defer pool.Close()
	if err := outbox.Migrate(ctx, pool, outbox.MigrateOptions{}); err != nil {
		return OutboxResult{}, err
	}

	const topic = "bench"
	brokers, broker := cfg.Brokers, "external"
	if len(brokers) == 0 {
		opts := []kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(int32(cfg.Partitions), topic)}
		if cfg.KafkaPort > 0 {
			opts = append(opts, kfake.Ports(cfg.KafkaPort))
		}
		var kc *kfake.Cluster
		asRole(ctx, roleBroker, func(context.Context) { kc, err = kfake.NewCluster(opts...) })
		if err != nil {
			return OutboxResult{}, fmt.Errorf("start kfake (--kafka-port %d): %w", cfg.KafkaPort, err)
		}
		defer kc.Close()
		brokers, broker = kc.ListenAddrs(), "kfake in process"
	}

	rec := &ackRecorder{acked: make(map[uuid.UUID]time.Time, cfg.Messages)}
	quiet := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
	var relays []*outbox.Relay
	var pools []*pgxpool.Pool
	defer func() {
		for _, p := range pools {
			defer p.Close() // after every relay stopped
		}
		for _, r := range relays {
			sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
			_ = r.Stop(sctx)
			cancel()
		}
	}()
	startRelays := func() error {
		for i := range cfg.Relays {
			rcfg, err := pgxpool.ParseConfig(tdb.URL)
			if err != nil {
				return err
			}
			rcfg.MaxConns = 6
			rpool, err := pgxpool.NewWithConfig(ctx, rcfg)
			if err != nil {
				return err
			}
			pools = append(pools, rpool)
			r, err := outbox.NewRelay(outbox.RelayConfig{Pool: rpool, Brokers: brokers, ID: fmt.Sprintf("bench-%d", i),
				BatchSize: cfg.BatchSize, Logger: quiet, Observer: rec, PollInterval: 100 * time.Millisecond})
			if err != nil {
				return err
			}
			asRole(ctx, roleRelay, func(ctx context.Context) { err = r.Start(ctx) })
			if err != nil {
				return err
			}
			relays = append(relays, r)
		}

		return nil
	}
	if !cfg.Preload {
		if err := startRelays(); err != nil {
			return OutboxResult{}, err
		}
	}

	fmt.Fprintf(w, "enqueuing %d messages over %d keys, %d per transaction, %d producers; %d relay(s) to %s...\n",
		cfg.Messages, cfg.Keys, cfg.PerTx, cfg.Producers, cfg.Relays, broker)
	value := make([]byte, cfg.ValueSize)
	for i := range value {
		value[i] = 'a' + byte(i%26)
	}
	committed := make(map[uuid.UUID]time.Time, cfg.Messages)
	var cmu sync.Mutex
	var next atomic.Int64
	txs := (cfg.Messages + cfg.PerTx - 1) / cfg.PerTx
	errs := make(chan error, cfg.Producers)
	prof, err := startRoleProfiler(nil)
	if err != nil {
		return OutboxResult{}, err
	}
	defer func() { _, _ = prof.stop() }() // on an early return; a no-op after the stop below
	cpu0, cpuOK := processCPU()
	pg0, err := pgBackendsCPU(ctx, pool, tdb.Name)
	if err != nil {
		return OutboxResult{}, err
	}
	start := time.Now()
	var wg sync.WaitGroup
	for p := range cfg.Producers {
		wg.Add(1)
		asRole(ctx, roleProducer, func(context.Context) {
			go func() {
				defer wg.Done()
				msgs := make([]outbox.Message, 0, cfg.PerTx)
				for {
					t := int(next.Add(1)) - 1
					if t >= txs {
						return
					}
					msgs = msgs[:0]
					for i := t * cfg.PerTx; i < min((t+1)*cfg.PerTx, cfg.Messages); i++ {
						msgs = append(msgs, outbox.Message{ID: outbox.NewID(), Topic: topic,
							Key: fmt.Appendf(nil, "key-%d", (i*7919+p)%cfg.Keys), Value: value})
					}
					if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return outbox.Enqueue(ctx, tx, msgs...) }); err != nil {
						errs <- err
						return
					}
					at := time.Now()
					cmu.Lock()
					for _, m := range msgs {
						committed[m.ID] = at
					}
					cmu.Unlock()
				}
			}()
		})
	}
	wg.Wait()
	enqueued := time.Since(start)
	enqueueEnd := start.Add(enqueued)
	close(errs)
	if err := <-errs; err != nil {
		return OutboxResult{}, fmt.Errorf("enqueue: %w", err)
	}
	fmt.Fprintf(w, "  enqueued in %s (%.0f msgs/s)\n", enqueued.Round(time.Millisecond), float64(cfg.Messages)/enqueued.Seconds())
	if cfg.Preload {
		start = time.Now()
		if err := startRelays(); err != nil {
			return OutboxResult{}, err
		}
	}

	deadline := time.Now().Add(cfg.Timeout)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for rec.n.Load() < int64(cfg.Messages) {
		if time.Now().After(deadline) {
			return OutboxResult{}, fmt.Errorf("only %d of %d messages relayed within %s", rec.n.Load(), cfg.Messages, cfg.Timeout)
		}
		select {
		case <-ctx.Done():
			return OutboxResult{}, ctx.Err()
		case <-tick.C:
		}
	}

	cpu1, _ := processCPU()
	shares, err := prof.stop()
	if err != nil {
		return OutboxResult{}, err
	}
	pg1, err := pgBackendsCPU(ctx, pool, tdb.Name)
	if err != nil {
		return OutboxResult{}, err
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	var last time.Time
	drained := 0
	for _, ack := range rec.acked {
		if ack.After(enqueueEnd) {
			drained++
		}
	}
	lat := make([]time.Duration, 0, cfg.Messages)
	for id, ack := range rec.acked {
		if ack.After(last) {
			last = ack
		}
		c, ok := committed[id]
		if !ok {
			return OutboxResult{}, fmt.Errorf("relayed message %s was never enqueued", id)
		}
		// The relay can publish a row before its producer hears the commit: count that as 0.
		lat = append(lat, max(ack.Sub(c), 0))
	}
	elapsed := last.Sub(start)
	s := Summarize(lat)
	res := OutboxResult{
		Benchmark: "outbox", Messages: cfg.Messages, Keys: cfg.Keys, Relays: cfg.Relays, Producers: cfg.Producers,
		PerTx: cfg.PerTx, Broker: broker,
		MsgsPerSec:    Round3(float64(cfg.Messages) / elapsed.Seconds()),
		EnqueuePerSec: Round3(float64(cfg.Messages) / enqueued.Seconds()),
		TxPerSec:      Round3(float64(txs) / enqueued.Seconds()),
		P50ms:         Millis(s.P50), P90ms: Millis(s.P90), P99ms: Millis(s.P99), Maxms: Millis(s.Max),
		Duplicates:    rec.dups,
		InsertCommits: Round3(rate.PerSec),
		ElapsedSec:    Round3(elapsed.Seconds()),
		Database:      tdb.Name, Brokers: brokers,
		EnqueueSec:           Round3(enqueued.Seconds()),
		DrainAfterEnqueueSec: Round3(max(last.Sub(enqueueEnd), 0).Seconds()),
		DrainedAfterEnqueue:  drained,
	}
	if d := last.Sub(enqueueEnd); d > 0 && drained > 0 {
		res.DrainMsgsPerSec = Round3(float64(drained) / d.Seconds())
	}
	if cpuOK {
		per := func(d time.Duration) float64 { return Millis(d * 1000 / time.Duration(cfg.Messages)) }
		part := func(role string) time.Duration { return time.Duration(float64(cpu1-cpu0) * shares[role]) }
		res.CPUMsPer1000 = OutboxCPU{Relays: per(part(roleRelay)), Producers: per(part(roleProducer)),
			Broker: per(part(roleBroker)), Runtime: per(part("")), PostgreSQL: per(pg1.since(pg0))}
	}
	if rate.PerSec > 0 {
		res.MsgsPerInsertCommit = Round3(res.MsgsPerSec / rate.PerSec)
		res.TxOverInsertCommits = Round3(res.TxPerSec / rate.PerSec)
	}
	fmt.Fprintf(w, "relayed %d messages in %s: %.0f msgs/s; commit-to-ack p50 %.1f ms, p99 %.1f ms\n",
		cfg.Messages, elapsed.Round(time.Millisecond), res.MsgsPerSec, res.P50ms, res.P99ms)
	fmt.Fprintf(w, "  enqueue %.2fs; then %d messages drained in %.2fs (%.0f msgs/s)\n",
		res.EnqueueSec, res.DrainedAfterEnqueue, res.DrainAfterEnqueueSec, res.DrainMsgsPerSec)
	c := res.CPUMsPer1000
	fmt.Fprintf(w, "  CPU ms per 1,000 messages: relays %.2f, producers %.2f, broker %.2f, Go runtime %.2f, PostgreSQL %.2f\n",
		c.Relays, c.Producers, c.Broker, c.Runtime, c.PostgreSQL)
	return res, nil
}
