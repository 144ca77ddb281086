// Package relaycli is the outbox-relay command line: flag and environment parsing, the metrics
// endpoint, and the wiring of pkg/outbox. cmd/outbox-relay is a thin main around Main, so tests
// can run the command in process or build it and run it as a child.
package relaycli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/treatyhq/treaty/pkg/outbox"
	"github.com/treatyhq/treaty/pkg/outbox/outboxprom"
)

// Environment variables for fault injection in tests. They are read only by the run command.
const (
	// EnvCrashAt names a point where the relay kills itself with SIGKILL: "after-publish"
	// (after the broker acknowledged a batch, before it is marked sent).
	EnvCrashAt = "TREATY_RELAY_CRASH_AT"
	// EnvCrashAfterBatches is how many batches reach the crash point before the kill (default 1).
	EnvCrashAfterBatches = "TREATY_RELAY_CRASH_AFTER_BATCHES"
)

const overview = `outbox-relay moves messages from a transactional outbox table to Kafka.

A service writes its business rows and its messages in one local transaction
(outbox.Enqueue); this process publishes the committed messages, in order per key,
at least once, and marks them sent. Run several for availability: keys hash into
slots, each slot is leased to one relay at a time, and slots move when relays
join or die.

Usage:
  outbox-relay [run] --db URL --brokers host:9092[,host:9092...] [flags]
  outbox-relay migrate --db URL [--table NAME] [--slots N] [--inbox-table NAME]
  outbox-relay dead-letters list|requeue ID|discard ID --db URL [--table NAME]
  outbox-relay help [command]

Every flag can also be set with the environment variable shown in its help;
a flag on the command line wins.

Examples:
  outbox-relay migrate --db postgres://app@db/app
  outbox-relay --db postgres://app@db/app --brokers kafka-1:9092,kafka-2:9092 --metrics-addr :9464
  TREATY_DB=postgres://app@db/app outbox-relay dead-letters list
`

// Main runs the command with args (without the program name) and returns the exit code.
// getenv supplies the environment (os.Getenv in production).
func Main(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	cmd := "run"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	var err error
	switch cmd {
	case "run":
		err = run(ctx, args, getenv, stdout, stderr)
	case "migrate":
		err = migrateCmd(ctx, args, getenv, stdout, stderr)
	case "dead-letters":
		err = deadLettersCmd(ctx, args, getenv, stdout, stderr)
	case "help":
		if len(args) == 0 {
			fmt.Fprint(stdout, overview)
			return 0
		}
		return Main(ctx, []string{args[0], "--help"}, getenv, stdout, stderr)
	default:
		fmt.Fprintf(stderr, "outbox-relay: unknown command %q\n\n%s", cmd, overview)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if errors.Is(err, errUsage) {
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

var errUsage = errors.New("usage")

// flags wraps a FlagSet whose defaults come from TREATY_* environment variables.
type flags struct {
	*flag.FlagSet
	getenv func(string) string
	errs   []error
}

func newFlags(name, summary string, getenv func(string) string, stderr io.Writer) *flags {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "%s\n\nFlags:\n", summary)
		fs.PrintDefaults()
	}
	return &flags{FlagSet: fs, getenv: getenv}
}

func (f *flags) string(name, env, def, usage string) *string {
	if v := f.getenv(env); v != "" {
		def = v
	}
	return f.String(name, def, usage+" ("+env+")")
}

func (f *flags) int(name, env string, def int, usage string) *int {
	if v := f.getenv(env); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			f.errs = append(f.errs, fmt.Errorf("%s=%q: want an integer", env, v))
		} else {
			def = n
		}
	}
	return f.Int(name, def, usage+" ("+env+")")
}

func (f *flags) duration(name, env string, def time.Duration, usage string) *time.Duration {
	if v := f.getenv(env); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			f.errs = append(f.errs, fmt.Errorf("%s=%q: want a duration such as 500ms or 2s", env, v))
		} else {
			def = d
		}
	}
	return f.Duration(name, def, usage+" ("+env+")")
}

func (f *flags) parse(args []string) error {
	if err := f.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return errUsage
	}
	return errors.Join(f.errs...)
}

func newLogger(level, format string, w io.Writer) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: want text or json", format)
}

func openPool(ctx context.Context, url string, maxConns int) (*pgxpool.Pool, error) {
	if url == "" {
		return nil, errors.New("--db is required (or TREATY_DB): the PostgreSQL URL of the outbox's database")
	}
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("--db: %w", err)
	}
	if maxConns > 0 {
		cfg.MaxConns = int32(maxConns)
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect: %w", err)
	}
	if err := pool.Ping(ctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect: %w", err)
	}
	return pool, nil
}

func run(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	f := newFlags("run", overview, getenv, stderr)
	db := f.string("db", "TREATY_DB", "", "PostgreSQL URL of the database holding the outbox table")
	brokers := f.string("brokers", "TREATY_BROKERS", "", "Kafka bootstrap brokers, comma-separated host:port")
	table := f.string("table", "TREATY_OUTBOX_TABLE", outbox.DefaultTable, "outbox table, optionally schema-qualified, as given to migrate")
	id := f.string("relay-id", "TREATY_RELAY_ID", "", "unique name of this relay in the lease tables (default host-pid-random)")
	metricsAddr := f.string("metrics-addr", "TREATY_METRICS_ADDR", ":9464", "address for /metrics (Prometheus) and /healthz; empty disables")
	batchSize := f.int("batch-size", "TREATY_BATCH_SIZE", 4000, "most messages read and published at once")
	maxBatchBytes := f.int("max-batch-bytes", "TREATY_MAX_BATCH_BYTES", 1_000_000, "most bytes per partition per produce request; keep at or below the broker's message.max.bytes")
	poll := f.duration("poll-interval", "TREATY_POLL_INTERVAL", time.Second, "how often to look for work when no notification arrives")
	leaseTTL := f.duration("lease-ttl", "TREATY_LEASE_TTL", 10*time.Second, "slot lease duration; the slots of a relay that died wait this long")
	writeTimeout := f.duration("write-timeout", "TREATY_WRITE_TIMEOUT", 10*time.Second, "timeout of one produce request")
	maxAttempts := f.int("max-attempts", "TREATY_MAX_ATTEMPTS", 10, "failed attempts (the message sent alone, broker refusing it) before dead-lettering")
	retryBackoff := f.duration("retry-backoff", "TREATY_RETRY_BACKOFF", time.Second, "first delay before retrying a refused message; doubles per attempt")
	maxRetryBackoff := f.duration("max-retry-backoff", "TREATY_MAX_RETRY_BACKOFF", 5*time.Minute, "longest delay before retrying a refused message")
	dlTopic := f.string("dead-letter-topic", "TREATY_DEAD_LETTER_TOPIC", "", "also publish dead-lettered messages to this topic")
	policy := f.string("on-dead-letter", "TREATY_ON_DEAD_LETTER", "block", "later messages of a dead-lettered key: block (wait for an operator; order kept) or skip (go ahead)")
	retention := f.duration("retention", "TREATY_RETENTION", 0, "keep sent rows this long (marked sent_at); 0 deletes them when sent")
	maxConns := f.int("db-max-conns", "TREATY_DB_MAX_CONNS", 6, "database connections (the relay uses up to four at once)")
	logLevel := f.string("log-level", "TREATY_LOG_LEVEL", "info", "debug, info, warn or error")
	logFormat := f.string("log-format", "TREATY_LOG_FORMAT", "text", "text or json")
	if err := f.parse(args); err != nil {
		return err
	}
	if f.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", f.Args())
	}
	log, err := newLogger(*logLevel, *logFormat, stderr)
	if err != nil {
		return err
	}
	pol, err := outbox.ParseDeadLetterPolicy(*policy)
	if err != nil {
		return fmt.Errorf("--on-dead-letter: %w", err)
	}
	if *brokers == "" {
		return errors.New("--brokers is required (or TREATY_BROKERS): Kafka bootstrap addresses, host:port,...")
	}
	afterPublish, err := crashPoint(getenv, stderr)
	if err != nil {
		return err
	}

	pool, err := openPool(ctx, *db, *maxConns)
	if err != nil {
		return err
	}
	defer pool.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	obs, err := outboxprom.New(reg)
	if err != nil {
		return err
	}
	relay, err := outbox.NewRelay(outbox.RelayConfig{
		Pool: pool, Brokers: strings.Split(*brokers, ","), Table: *table, ID: *id,
		BatchSize: *batchSize, MaxBatchBytes: *maxBatchBytes, PollInterval: *poll, LeaseTTL: *leaseTTL,
		WriteTimeout: *writeTimeout, MaxAttempts: *maxAttempts, RetryBackoff: *retryBackoff,
		MaxRetryBackoff: *maxRetryBackoff, DeadLetterTopic: *dlTopic, DeadLetterPolicy: pol,
		Retention: *retention, Logger: log, Observer: obs, AfterPublish: afterPublish,
	})
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var srvErr chan error
	var srv *http.Server
	if *metricsAddr != "" {
		ln, err := net.Listen("tcp", *metricsAddr)
		if err != nil {
			return fmt.Errorf("--metrics-addr: %w", err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg}))
		mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok\n") })
		srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		srvErr = make(chan error, 1)
		go func() { srvErr <- srv.Serve(ln) }()
		log.Info("metrics listening", "addr", ln.Addr().String())
	}
	runErr := make(chan error, 1)
	go func() { runErr <- relay.Run(ctx) }()
	select {
	case err = <-runErr:
	case err = <-srvErr:
		cancel()
		err = errors.Join(fmt.Errorf("metrics server: %w", err), <-runErr)
	}
	if srv != nil {
		sctx, scancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = srv.Shutdown(sctx)
		scancel()
	}
	fmt.Fprintln(stdout, "outbox-relay: stopped")
	return err
}

// crashPoint returns the AfterPublish hook for EnvCrashAt: fault injection for tests, which
// kill the relay at a point between publishing a batch and marking it sent.
func crashPoint(getenv func(string) string, stderr io.Writer) (func(), error) {
	at := getenv(EnvCrashAt)
	if at == "" {
		return nil, nil
	}
	if at != "after-publish" {
		return nil, fmt.Errorf("%s=%q: the only crash point is after-publish", EnvCrashAt, at)
	}
	after := 1
	if v := getenv(EnvCrashAfterBatches); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%s=%q: want a positive integer", EnvCrashAfterBatches, v)
		}
		after = n
	}
	var batches atomic.Int64
	return func() {
		if batches.Add(1) < int64(after) {
			return
		}
		fmt.Fprintf(stderr, "outbox-relay: fault injection: SIGKILL at %s\n", at)
		_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {} // the signal is on its way; never mark the batch
	}, nil
}

func migrateCmd(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	f := newFlags("migrate", `outbox-relay migrate creates or upgrades the outbox tables (and, with --inbox-table,
a consumer's inbox table). It is safe to run from several processes at once and a
no-op when everything is applied. Services that run their own migrations can call
outbox.Migrate or read outbox.MigrationSet instead.

Usage:
  outbox-relay migrate --db URL [--table NAME] [--slots N] [--inbox-table NAME]`, getenv, stderr)
	db := f.string("db", "TREATY_DB", "", "PostgreSQL URL")
	table := f.string("table", "TREATY_OUTBOX_TABLE", outbox.DefaultTable, "outbox table, optionally schema-qualified; companion tables take it as prefix")
	slots := f.int("slots", "TREATY_OUTBOX_SLOTS", outbox.DefaultSlots, "key slots, fixed at creation: the most relays that can share the work")
	inbox := f.string("inbox-table", "TREATY_INBOX_TABLE", "", "also create this inbox table (for a consumer's database)")
	noOutbox := f.Bool("inbox-only", false, "create only the inbox table")
	if err := f.parse(args); err != nil {
		return err
	}
	pool, err := openPool(ctx, *db, 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	if !*noOutbox {
		if err := outbox.Migrate(ctx, pool, outbox.MigrateOptions{Table: *table, Slots: *slots}); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "outbox table %s is up to date\n", *table)
	}
	if *inbox != "" {
		if err := outbox.MigrateInbox(ctx, pool, *inbox); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "inbox table %s is up to date\n", *inbox)
	}
	return nil
}

func deadLettersCmd(ctx context.Context, args []string, getenv func(string) string, stdout, stderr io.Writer) error {
	f := newFlags("dead-letters", `outbox-relay dead-letters shows and resolves messages that failed too often.

  list              the dead letters, oldest first
  requeue ID        put the message back in the outbox, in its original place in its
                    key's order, and let its key flow again
  discard ID        drop the message for good and let its key flow again

With the block policy (the default), later messages of a dead letter's key wait in
the outbox until it is requeued or discarded.

Usage:
  outbox-relay dead-letters list|requeue ID|discard ID --db URL [--table NAME]`, getenv, stderr)
	db := f.string("db", "TREATY_DB", "", "PostgreSQL URL")
	table := f.string("table", "TREATY_OUTBOX_TABLE", outbox.DefaultTable, "outbox table")
	limit := f.Int("limit", 100, "most dead letters to list")
	if len(args) == 0 {
		f.Usage()
		return errUsage
	}
	action, rest := args[0], args[1:]
	if strings.HasPrefix(action, "-") {
		if err := f.parse(args); err != nil {
			return err
		}
		f.Usage()
		return errUsage
	}
	var id uuid.UUID
	if action == "requeue" || action == "discard" {
		if len(rest) == 0 {
			return fmt.Errorf("%s needs a message id", action)
		}
		var err error
		if id, err = uuid.Parse(rest[0]); err != nil {
			return fmt.Errorf("message id %q: %w", rest[0], err)
		}
		rest = rest[1:]
	}
	if err := f.parse(rest); err != nil {
		return err
	}
	pool, err := openPool(ctx, *db, 2)
	if err != nil {
		return err
	}
	defer pool.Close()
	dl, err := outbox.NewDeadLetters(pool, *table)
	if err != nil {
		return err
	}
	switch action {
	case "list":
		list, err := dl.List(ctx, *limit)
		if err != nil {
			return err
		}
		for _, d := range list {
			fmt.Fprintf(stdout, "%s\ttopic=%s\tkey=%q\tattempts=%d\tblocking=%t\tdead_at=%s\terror=%s\n",
				d.ID, d.Topic, d.Key, d.Attempts, d.Blocking, d.DeadAt.Format(time.RFC3339), d.Error)
		}
		fmt.Fprintf(stdout, "%d dead letters\n", len(list))
	case "requeue", "discard":
		do := dl.Requeue
		if action == "discard" {
			do = dl.Discard
		}
		found, err := do(ctx, id)
		if err != nil {
			return err
		}
		if !found {
			return fmt.Errorf("no dead letter with id %s", id)
		}
		fmt.Fprintf(stdout, "%s: %s\n", id, map[string]string{"requeue": "requeued", "discard": "discarded"}[action])
	default:
		return fmt.Errorf("unknown action %q: want list, requeue or discard", action)
	}
	return nil
}
