// Package cli is the coordinator's command line: `coordinator serve | migrate`. cmd/coordinator
// is a thin main around Main so that tests can run every command in process.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/gctune"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store/postgres"
	"github.com/treatyhq/treaty/internal/targetpolicy"
	"github.com/treatyhq/treaty/internal/tracing"
)

// Env carries what a command reads from its surroundings, so tests can supply their own.
type Env struct {
	Stdout, Stderr io.Writer
	Getenv         func(string) string
	// Ready, if set, is called with the gRPC listen address once serve accepts requests.
	Ready func(addr string)
}

const topUsage = `Treaty coordinator: durable sagas over gRPC, state in PostgreSQL.

Usage:
  coordinator serve   --db URL [flags]   serve the gRPC API and drive transactions
  coordinator migrate --db URL [flags]   create or upgrade the schema (safe to run twice, or at once)
  coordinator dev [flags]                everything on one machine with nothing installed: embedded
                                         SQLite store and Kafka-protocol broker (not for production)

Run 'coordinator COMMAND --help' for the flags of a command. Every flag can also be set by an
environment variable: --db is TREATY_DB, --listen is TREATY_LISTEN, and so on.`

// Main runs the command in args (without the program name) and returns the exit code.
func Main(ctx context.Context, args []string, env Env) int {
	if env.Getenv == nil {
		env.Getenv = getenvOS
	}
	if env.Stdout == nil {
		env.Stdout = os.Stdout
	}
	if env.Stderr == nil {
		env.Stderr = os.Stderr
	}
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintln(env.Stdout, topUsage)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	var err error
	switch args[0] {
	case "serve":
		err = serve(ctx, args[1:], env)
	case "migrate":
		err = migrateCmd(ctx, args[1:], env)
	case "dev":
		err = dev(ctx, args[1:], env)
	default:
		fmt.Fprintf(env.Stderr, "unknown command %q\n\n%s\n", args[0], topUsage)
		return 2
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(env.Stderr, "coordinator %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
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

func migrateCmd(ctx context.Context, args []string, env Env) error {
	var db string
	var to int
	f := newFlags("migrate", "coordinator migrate: apply the embedded schema migrations (under an advisory lock;\nrunning it twice is a no-op).", env.Stderr, env.Stdout)
	f.String(&db, "db", "", "PostgreSQL URL, e.g. postgres://user@host:5432/treaty")
	f.Int(&to, "to", -1, "migrate up or down to this version instead of the latest (-1 = latest)")
	if err := f.parse(args, env.Getenv); err != nil {
		return err
	}
	if db == "" {
		return errors.New("--db (or TREATY_DB) is required")
	}
	pool, err := pgxpool.New(ctx, db)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer pool.Close()
	m, err := postgres.Migrator()
	if err != nil {
		return err
	}
	if to < 0 {
		to = m.Latest()
	}
	res, err := m.To(ctx, pool, to)
	if err != nil {
		return err
	}
	if len(res.Applied) == 0 {
		fmt.Fprintf(env.Stdout, "schema is at version %d; nothing to do\n", res.To)
		return nil
	}
	fmt.Fprintf(env.Stdout, "schema migrated from version %d to %d\n", res.From, res.To)
	return nil
}

type serveConfig struct {
	db, listen, httpListen, owner, logFormat, logLevel string
	adminTokensFile                                    string
	lease, recovery, shutdown                          time.Duration
	reconcile, stuckAfter, retention                   time.Duration
	otlpEndpoint                                       string
	otlpInsecure                                       bool
	traceRatio                                         float64
	maxActive, threshold, maxPayload                   int
	maxSteps, dbConns, claimBatch                      int
	maxRequest                                         int
	allowTargets                                       string
	maxActiveBytes                                     int64
	maxEndpoints                                       int
	autoMigrate                                        bool
	allowFaults                                        bool
	lazyProgress                                       time.Duration
	gcPercent                                          int
	memoryLimit                                        int64
}

// maxActiveBytes is the engine's payload budget for the flag's value (0: its default).
func maxActiveBytes(n int64) int64 {
	if n <= 0 {
		return engine.DefaultMaxActiveBytes
	}
	return n
}

// lazyProgress maps the flag (0 = off) onto engine.Config.LazyProgress (0 = default, negative
// = off).
func lazyProgress(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}

func serve(ctx context.Context, args []string, env Env) error {
	var c serveConfig
	f := newFlags("serve", "coordinator serve: serve the treaty.v1 gRPC API (with health checking and reflection)\nand drive transactions to completion, recovering work that other replicas left behind.", env.Stderr, env.Stdout)
	f.String(&c.db, "db", "", "PostgreSQL URL (required), e.g. postgres://user@host:5432/treaty")
	f.String(&c.listen, "listen", ":7600", "gRPC listen address")
	f.String(&c.httpListen, "http-listen", ":7601", "address of /metrics, /healthz, /readyz, the admin API (/admin/v1) and the dashboard (/ui) (empty: off)")
	f.String(&c.adminTokensFile, "admin-tokens-file", "", adminTokensUsage)
	sec := addSecurityFlags(f)
	retry := addRetryFlags(f)
	f.String(&c.owner, "owner", "", "replica id used in leases (default host-pid-random)")
	f.Duration(&c.lease, "lease", 10*time.Second, "how long a replica owns a transaction without renewing; a dead replica's work resumes elsewhere after this")
	f.Duration(&c.lazyProgress, "lazy-progress", engine.DefaultLazyProgress, "how long a saga's finished forward steps may go unrecorded while its next steps are called:\n"+
		"      a saga whose steps answer within it is written twice (created, finished). A turn back and an outcome\n"+
		"      are always written before acting or answering; a crash repeats the unrecorded calls (0: record\n"+
		"      every result before the next call)")
	f.Duration(&c.recovery, "recovery-interval", time.Second, "how often to look for due work (retries, expired leases)")
	f.Int(&c.claimBatch, "claim-batch", 64, "transactions claimed per recovery pass")
	f.Int(&c.maxActive, "max-active", 10000, "transactions driven at once by this replica")
	f.Int64(&c.maxActiveBytes, "max-active-bytes", engine.DefaultMaxActiveBytes, "payload bytes the transactions driven by this replica may hold; new ones past it are refused\n"+
		"      RESOURCE_EXHAUSTED with RetryInfo, nothing written")
	f.Int(&c.threshold, "operator-threshold", 10, "failed attempts of one compensation before a transaction needs an operator")
	f.Int(&c.maxPayload, "max-payload-bytes", engine.DefaultMaxPayloadBytes, "largest payload of one action or compensation")
	f.Int(&c.maxRequest, "max-request-bytes", app.DefaultMaxRequestBytes, fmt.Sprintf("largest encoded gRPC request, refused RESOURCE_EXHAUSTED before it reaches a handler (at most %d, which is %d MiB)", app.MaxRequestBytesCeiling, app.MaxRequestBytesCeiling>>20))
	f.String(&c.allowTargets, "allow-targets", "", "participant addresses clients may name, comma-separated patterns: host[:port], *.domain, *:port,\n"+
		"      CIDR[:port], IP, [IPv6]:port, * (empty: any). Link-local addresses (169.254.0.0/16, fe80::/10) and this\n"+
		"      coordinator's own listen addresses are refused whatever the list (link-local unless an IP or CIDR pattern names them)")
	f.Int(&c.gcPercent, "gc-percent", gctune.DefaultGCPercent, "Go garbage collection target (as GOGC): the heap may grow this many per cent over the live heap\n"+
		"      before a collection, until --memory-limit is near (-1: Go's default, 100; GOGC in the environment wins)")
	f.Int64(&c.memoryLimit, "memory-limit", 0, fmt.Sprintf("soft memory limit of the Go runtime in bytes, where the collector works harder (as GOMEMLIMIT;\n"+
		"      0: %d × --max-active-bytes, at least %d MiB, at most 80%% of the container's memory limit;\n"+
		"      -1: none; GOMEMLIMIT in the environment wins)", 3, gctune.MinMemoryLimit>>20))
	f.Int(&c.maxSteps, "max-steps", engine.DefaultMaxSteps, "most steps in one saga")
	f.Int(&c.maxEndpoints, "max-participant-endpoints", invoke.DefaultMaxEndpoints, "participant endpoints (address sets, each with a connection and a\n"+
		"      circuit breaker) kept at once; past it a new one replaces one idle for a minute, or its call is retried later")
	f.Int(&c.dbConns, "db-max-conns", 16, "PostgreSQL connection pool size")
	f.Duration(&c.shutdown, "shutdown-timeout", 30*time.Second, "on SIGTERM, how long to let in-flight calls finish before handing work back")
	f.String(&c.logFormat, "log-format", "text", "log format: text or json")
	f.String(&c.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	f.Bool(&c.autoMigrate, "migrate", false, "apply schema migrations before serving")
	f.Bool(&c.allowFaults, "allow-fault-injection", false, allowFaultsUsage)
	f.String(&c.otlpEndpoint, "otlp-endpoint", "", "OTLP/gRPC collector (host:port) to export traces to: a span per transaction and per participant call (empty: tracing off)")
	f.Bool(&c.otlpInsecure, "otlp-insecure", false, "send traces to the collector without TLS")
	f.Float64(&c.traceRatio, "trace-sample-ratio", 1, "fraction of new traces kept (a caller's sampled trace is always continued)")
	f.Duration(&c.reconcile, "reconcile-interval", time.Minute, "how often the reconciliation jobs run (stuck transactions, expired TCC, 2PC in doubt, retention); negative: never")
	f.Duration(&c.stuckAfter, "stuck-after", 10*time.Minute, "a live transaction with no progress and nothing scheduled for this long is re-driven; keep it above the longest call timeout")
	f.Duration(&c.retention, "retention", 7*24*time.Hour, "finished transactions are deleted this long after they finished (not those waiting for an operator); negative: keep forever")
	if err := f.parse(args, env.Getenv); err != nil {
		return err
	}
	if c.db == "" {
		return errors.New("--db (or TREATY_DB) is required")
	}
	log, err := newLogger(env.Stderr, c.logFormat, c.logLevel)
	if err != nil {
		return err
	}
	crash, err := crashHook(env.Getenv("TREATY_CRASH_AT"), log)
	if err != nil {
		return err
	}
	tokens, err := adminTokens(c.adminTokensFile, env, log)
	if err != nil {
		return err
	}
	grpcSec, participantTLS, err := sec.build(env, log)
	if err != nil {
		return err
	}
	retryDefaults, breaker, err := retry.build()
	if err != nil {
		return err
	}
	gc := gctune.Apply(env.Getenv, gctune.Config{GCPercent: c.gcPercent, MemoryLimit: c.memoryLimit, MaxActiveBytes: maxActiveBytes(c.maxActiveBytes)})
	log.Info("garbage collector", "gc_percent", gc.GCPercent, "memory_limit_mib", gc.MemoryLimit>>20, "from", gc.Source)
	a, err := app.Start(ctx, app.Config{
		DB: c.db, DBMaxConns: c.dbConns, Listen: c.listen, HTTPListen: c.httpListen, Migrate: c.autoMigrate, Logger: log,
		AdminTokens: tokens, GRPC: grpcSec, ParticipantTLS: participantTLS, MaxRequestBytes: c.maxRequest,
		AllowFaultInjection: c.allowFaults,
		AllowTargets:        targetpolicy.ParsePatterns(c.allowTargets),
		Invoke:              invoke.Config{Breaker: breaker, MaxEndpoints: c.maxEndpoints},
		Engine: engine.Config{
			Owner: c.owner, Lease: c.lease, RecoveryInterval: c.recovery, ClaimBatch: c.claimBatch, LazyProgress: lazyProgress(c.lazyProgress),
			MaxActive: c.maxActive, MaxActiveBytes: c.maxActiveBytes, OperatorThreshold: c.threshold, Retry: retryDefaults,
			Limits:     engine.Limits{MaxSteps: c.maxSteps, MaxPayloadBytes: c.maxPayload},
			CrashPoint: crash,
			Jobs:       engine.JobsConfig{Interval: c.reconcile, StuckAfter: c.stuckAfter, Retention: c.retention},
		},
		Tracing: tracing.Config{OTLPEndpoint: c.otlpEndpoint, Insecure: c.otlpInsecure, SampleRatio: c.traceRatio},
	})
	if err != nil {
		return err
	}
	if env.Ready != nil {
		env.Ready(a.Addr)
	}
	select {
	case <-ctx.Done():
		log.Info("shutting down: no new requests; finishing in-flight calls and handing work back", "timeout", c.shutdown)
	case err := <-a.Served():
		log.Error("gRPC server stopped", "err", err)
	}
	stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.shutdown)
	defer cancel()
	err = a.Stop(stopCtx)
	log.Info("coordinator stopped")
	return err
}

const allowFaultsUsage = "let operators inject faults into participant calls through the admin API (/admin/v1/faults:\n" +
	"      delays, error statuses, lost responses, dropped calls) for game days; every rule needs a reason\n" +
	"      and an expiry and shows on the dashboard. Off: stored rules are ignored. Never in production"

const adminTokensUsage = "file of admin API and dashboard tokens, one role:secret or role:secret:name per line\n" +
	"      (role viewer or operator; secrets of at least 16 characters; # comments). The environment\n" +
	"      variable TREATY_ADMIN_TOKENS adds more as role:secret,role:secret. Tokens are never logged."

// adminTokens reads the admin tokens from --admin-tokens-file and TREATY_ADMIN_TOKENS. There is
// deliberately no flag holding tokens themselves: a command line shows in every process list.
func adminTokens(file string, env Env, log *slog.Logger) ([]admin.Token, error) {
	var fromFile []admin.Token
	if file != "" {
		var err error
		if fromFile, err = admin.ReadTokensFile(file, log.Warn); err != nil {
			return nil, err
		}
	}
	fromEnv, err := admin.ParseTokens(env.Getenv("TREATY_ADMIN_TOKENS"))
	if err != nil {
		return nil, fmt.Errorf("TREATY_ADMIN_TOKENS: %w", err)
	}
	return admin.MergeTokens(fromFile, fromEnv)
}

// crashHook turns TREATY_CRASH_AT=point[:n] into a hook that kills the process with SIGKILL the
// n-th time (default 1st) the engine passes that point. It is fault injection for the crash
// tests: a real coordinator dying at an exact instant.
func crashHook(spec string, log *slog.Logger) (func(string), error) {
	if spec == "" {
		return nil, nil
	}
	point, nth := spec, int64(1)
	if i := strings.LastIndexByte(spec, ':'); i >= 0 {
		n, err := strconv.ParseInt(spec[i+1:], 10, 64)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("TREATY_CRASH_AT=%q: want point or point:n with n >= 1", spec)
		}
		point, nth = spec[:i], n
	}
	log.Warn("fault injection armed: this process will SIGKILL itself", "point", point, "occurrence", nth)
	var count atomic.Int64
	return func(name string) {
		if name == point && count.Add(1) == nth {
			_ = syscall.Kill(os.Getpid(), syscall.SIGKILL)
			select {} // never continue past the crash point
		}
	}, nil
}
