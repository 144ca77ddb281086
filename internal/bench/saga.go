package bench

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/gctune"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/internal/store/postgres"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// SagaConfig configures RunSaga. Zero values mean the defaults of `treaty-bench saga`.
type SagaConfig struct {
	// DB is a postgres:// URL (required). With an in-process coordinator it only names the
	// server: the run creates database treaty_bench_<random> there and drops it afterwards. With
	// Coordinator set it must name the database that coordinator uses: its commit counter is read
	// (nothing is written there), and the commit ceiling runs in a throwaway database beside it.
	DB string
	// Coordinator is the gRPC address of a running coordinator; empty starts one in process.
	Coordinator string
	// Steps per saga, run one after another; default 3.
	Steps int
	// Concurrency is the number of clients, each submitting a saga and waiting for its outcome
	// in one call, then the next; default 32. The commit ceiling uses as many connections.
	Concurrency int
	// Duration of the measured phase; default 20s.
	Duration time.Duration
	// Warmup runs sagas before measuring, uncounted; default 2s. Negative means none.
	Warmup time.Duration
	// Baseline is how long the commit ceiling is measured; default 5s.
	Baseline time.Duration
	// Participants is the number of no-op participant servers; step i calls server i mod N.
	// Default: one per step, as if each step were another service.
	Participants int
	// DBMaxConns sizes the in-process coordinator's pool; 0 = the coordinator's default.
	DBMaxConns int
	// CommitWorkers and CommitBatch tune the in-process coordinator's group commit; 0 = the
	// engine's defaults.
	CommitWorkers, CommitBatch int
	// GCPercent is the process's collection target with the in-process coordinator, as
	// `coordinator serve --gc-percent` (0 = its default, -1 = Go's default).
	GCPercent int
	// LazyProgress is the in-process coordinator's engine.Config.LazyProgress (0 = default,
	// negative = every result recorded before the next call).
	LazyProgress time.Duration
	// CPUProfile, if set, receives a CPU profile of the measured phase (the whole process:
	// clients, participants and, when in process, the coordinator).
	CPUProfile string
	// StatementTimes times the in-process coordinator's SQL statements during the measured phase
	// from the Go side (a pgx tracer) and reports them in the result.
	StatementTimes bool
	// MemProfile, if set, receives the process's allocation profile at the end of the measured
	// phase (cumulative since the process started, warm-up included: read it with
	// -sample_index=alloc_space or alloc_objects).
	MemProfile string
	// Keep leaves the throwaway database in place.
	Keep bool
	// DBPrefix names the throwaway database: the prefix plus 12 random hex digits; default
	// "treaty_bench_". A prefix of its own lets a run sit beside other workloads on a shared
	// server (and clean up after itself by name).
	DBPrefix string
	// Listen is the in-process coordinator's gRPC address; default 127.0.0.1:0 (a random port).
	Listen string
	// ParticipantPort, if not 0, is the first port of the participant servers: server i listens
	// on 127.0.0.1:ParticipantPort+i. Default: random ports.
	ParticipantPort int
	// ParticipantAddrs, if set, are running no-op participants (`treaty-bench participant`) to
	// call instead of starting them in process; step i calls address i mod len. Their CPU is then
	// not in cpu_ms_per_saga.participants.
	ParticipantAddrs []string
	// CoordinatorPID is the process id of the coordinator at Coordinator, on this machine; its
	// CPU (from /proc) is then reported as the coordinator's. Only with Coordinator.
	CoordinatorPID int
	// StatsPause is how long to wait for an external coordinator's backends to publish their
	// counters before reading them (an in-process coordinator is stopped instead, which is
	// exact); default 11s: a busy server retries a flush that found its lock taken after 10s.
	StatsPause time.Duration
	// Logger receives progress; nil = discard. The coordinator's own log is discarded unless
	// CoordinatorLogger is set.
	Logger            *slog.Logger
	CoordinatorLogger *slog.Logger
}

func (c *SagaConfig) setDefaults() error {
	if c.DB == "" {
		return errors.New("--db (or TREATY_DB) is required: a postgres:// URL of a server where the bench may create a database")
	}
	if c.Steps == 0 {
		c.Steps = 3
	}
	if c.Concurrency == 0 {
		c.Concurrency = 32
	}
	if c.Duration == 0 {
		c.Duration = 20 * time.Second
	}
	if c.Warmup == 0 {
		c.Warmup = 2 * time.Second
	}
	if c.Baseline == 0 {
		c.Baseline = 5 * time.Second
	}
	if c.Participants == 0 {
		c.Participants = c.Steps
		if len(c.ParticipantAddrs) > 0 {
			c.Participants = min(len(c.ParticipantAddrs), c.Steps)
		}
	}
	if c.StatsPause == 0 {
		c.StatsPause = 11 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.DBPrefix == "" {
		c.DBPrefix = "treaty_bench_"
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:0"
	}
	if err := checkDBPrefix(c.DBPrefix); err != nil {
		return err
	}
	switch {
	case c.ParticipantPort < 0 || c.ParticipantPort+c.Participants-1 > 65535:
		return fmt.Errorf("--participant-port is %d, must be 0 (random) or within 1..%d (one port per participant server)", c.ParticipantPort, 65536-c.Participants)
	case len(c.ParticipantAddrs) > 0 && (c.ParticipantPort != 0 || len(c.ParticipantAddrs) != c.Participants):
		return fmt.Errorf("--participant-addrs names %d participant(s) for %d step(s): give at most one per step, and no --participant-port or --participants beside it", len(c.ParticipantAddrs), c.Steps)
	case c.StatementTimes && c.Coordinator != "":
		return errors.New("--statement-times times the in-process coordinator's statements; it cannot go with --coordinator")
	case c.CoordinatorPID != 0 && c.Coordinator == "":
		return errors.New("--coordinator-pid needs --coordinator (the in-process coordinator is measured by profiler labels)")
	case c.CoordinatorPID < 0:
		return fmt.Errorf("--coordinator-pid is %d, must be a process id", c.CoordinatorPID)
	}
	if c.CoordinatorPID > 0 {
		if _, ok := pidCPU(c.CoordinatorPID); !ok {
			return fmt.Errorf("--coordinator-pid %d: no such process on this machine (its CPU is read from /proc)", c.CoordinatorPID)
		}
	}
	switch {
	case c.Steps < 1 || c.Steps > 64:
		return fmt.Errorf("--steps is %d, must be within 1..64 (the coordinator's default step limit)", c.Steps)
	case c.Concurrency < 1 || c.Concurrency > 1024:
		return fmt.Errorf("--concurrency is %d, must be within 1..1024", c.Concurrency)
	case c.Duration < 0:
		return fmt.Errorf("--duration is %s, must be positive", c.Duration)
	case c.Baseline < 0:
		return fmt.Errorf("--baseline is %s, must be positive", c.Baseline)
	case c.Participants < 1 || c.Participants > c.Steps:
		return fmt.Errorf("--participants is %d, must be within 1..%d (--steps)", c.Participants, c.Steps)
	case c.Coordinator != "" && DatabaseName(c.DB) == "":
		return errors.New("--db must name the coordinator's database when --coordinator is set")
	}
	return nil
}

// SagaResult is what `treaty-bench saga` prints as its last line.
type SagaResult struct {
	Bench       string  `json:"bench"` // "saga"
	Steps       int     `json:"steps"`
	Concurrency int     `json:"concurrency"`
	Seconds     float64 `json:"seconds"` // measured phase, first submit to last answer
	Sagas       int64   `json:"sagas"`   // succeeded in the measured phase
	Failed      int64   `json:"failed"`  // errors or non-SUCCEEDED outcomes in the measured phase

	SagasPerSec float64 `json:"sagas_per_sec"`
	// Latency of one SubmitSaga call with wait set: submission to the caller knowing the outcome.
	MeanMs float64 `json:"mean_ms"`
	P50Ms  float64 `json:"p50_ms"`
	P90Ms  float64 `json:"p90_ms"`
	P99Ms  float64 `json:"p99_ms"`
	MaxMs  float64 `json:"max_ms"`

	// PrimedSagas ran, untimed, on the measured coordinator just before the phase (to open its
	// connections); they count in CommitsPerSaga and TxRowWritesPerSaga, not in the rate.
	PrimedSagas int64 `json:"primed_sagas"`

	// PgCommitsPerSec is the ceiling: one-row autocommit INSERTs per second at Concurrency.
	PgCommitsPerSec float64 `json:"pg_commits_per_sec"`
	// CommitsPerSaga is the xact_commit delta of the coordinator's database over the measured
	// phase divided by the sagas submitted in it (primed, succeeded and failed). It counts every
	// transaction, read-only ones included, and a group commit that carries several sagas' writes
	// counts once.
	CommitsPerSaga float64 `json:"commits_per_saga"`
	XactCommits    int64   `json:"xact_commits"`
	// TxRowWritesPerSaga counts the statements that wrote a transaction row (create, and each
	// fenced record of progress) per saga, from pg_stat_user_tables: the durable writes a saga
	// costs before group commit shares them. Lease renewals count too (a few per second).
	TxRowWritesPerSaga float64 `json:"tx_row_writes_per_saga"`
	// Ratio = SagasPerSec * CommitsPerSaga / PgCommitsPerSec: the share of the server's commit
	// ceiling the coordinator used. Well below 1 means the time went elsewhere (CPU, round trips).
	Ratio float64 `json:"ratio"`

	Participants int    `json:"participants"`
	Coordinator  string `json:"coordinator"` // "in-process" or the address given
	// CoordinatorAddr is where the measured coordinator listened (the address given, or the
	// in-process one's); ParticipantAddrs where the participant servers did.
	CoordinatorAddr  string   `json:"coordinator_addr"`
	ParticipantAddrs []string `json:"participant_addrs"`
	Database         string   `json:"database"` // the database the sagas were stored in
	Kept             bool     `json:"kept"`     // the throwaway database was left in place
	GoMaxProcs       int      `json:"gomaxprocs"`
	NumCPU           int      `json:"num_cpu"`
	GCCycles         uint32   `json:"gc_cycles"` // during the measured phase, this process
	// GCPercent and MemoryLimitMiB are this process's collector settings: with the in-process
	// coordinator, `coordinator serve`'s defaults (internal/gctune) unless GOGC/GOMEMLIMIT or
	// --gc-percent say otherwise.
	GCPercent      int   `json:"gc_percent"`
	MemoryLimitMiB int64 `json:"memory_limit_mib"`
	// AllocKBPerSaga is the heap this process allocated during the measured phase per saga
	// (runtime.MemStats.TotalAlloc): all roles in it, the coordinator's too when in process. It
	// hardly moves with the machine's load, so it shows an allocation saving where the rate is
	// noise.
	AllocKBPerSaga float64 `json:"alloc_kb_per_saga"`
	// Statements is the in-process coordinator's SQL by time spent waiting on it, with
	// --statement-times.
	Statements []StatementTime `json:"statements,omitempty"`
	PgVersion  string          `json:"pg_version"`

	// Where the CPU went during the measured phase (Linux): this process (clients, participants
	// and an in-process coordinator) and the PostgreSQL backends connected to the saga database
	// (only when the server runs on this machine). Cores = CPU seconds per second.
	ProcessCPUCores    float64 `json:"process_cpu_cores,omitempty"`
	ProcessCPUMsSaga   float64 `json:"process_cpu_ms_per_saga,omitempty"`
	PgBackendCPUCores  float64 `json:"pg_backend_cpu_cores,omitempty"`
	PgBackendCPUMsSaga float64 `json:"pg_backend_cpu_ms_per_saga,omitempty"`
	// CPUMsPerSaga splits the CPU per saga between the coordinator, the participants, the clients,
	// the Go runtime's unlabeled work and PostgreSQL (see CPUMsPerSaga).
	CPUMsPerSaga CPUMsPerSaga `json:"cpu_ms_per_saga"`
	// CoordinatorCPUCores is the coordinator's CPU seconds per second, from its process's /proc
	// (with --coordinator-pid) or its profiler share of this process.
	CoordinatorCPUCores float64 `json:"coordinator_cpu_cores,omitempty"`

	// Signs of a shared machine: checkpoints the whole server ran during the measured phase
	// (other databases' CREATE/DROP DATABASE force them) and the 1-minute load average at its end.
	Checkpoints int64   `json:"checkpoints"`
	LoadAvg1m   float64 `json:"loadavg_1m,omitempty"`
}

// RunSaga runs the saga benchmark: the commit ceiling first, then a coordinator (in process
// unless cfg.Coordinator is set) driving no-op sagas at cfg.Concurrency for cfg.Duration after a
// warm-up. It returns the result even when some sagas failed (then with an error too).
func RunSaga(ctx context.Context, cfg SagaConfig) (res SagaResult, err error) {
	if err := cfg.setDefaults(); err != nil {
		return SagaResult{}, err
	}
	log := cfg.Logger
	res = SagaResult{
		Bench: "saga", Steps: cfg.Steps, Concurrency: cfg.Concurrency, Participants: cfg.Participants,
		Coordinator: "in-process", GoMaxProcs: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(),
	}
	cleanupCtx := context.WithoutCancel(ctx)

	// A database of our own, so the bench never touches real data.
	tmp, err := CreateTempDatabase(ctx, cfg.DB, cfg.DBPrefix)
	if err != nil {
		return SagaResult{}, err
	}
	log.Info("created database", "name", tmp.Name)
	defer func() {
		if cfg.Keep {
			res.Kept = true
			log.Info("kept database", "name", tmp.Name, "url", tmp.URL)
			return
		}
		dctx, cancel := context.WithTimeout(cleanupCtx, 30*time.Second)
		defer cancel()
		err = errors.Join(err, tmp.Drop(dctx))
	}()

	sagaDB := tmp.URL
	if cfg.Coordinator != "" {
		sagaDB = cfg.DB
		res.Coordinator = cfg.Coordinator
	} else {
		// The process holds the coordinator: collect garbage as `coordinator serve` does.
		gc := gctune.Apply(os.Getenv, gctune.Config{GCPercent: cfg.GCPercent, MaxActiveBytes: engine.DefaultMaxActiveBytes})
		log.Info("garbage collector", "gc_percent", gc.GCPercent, "memory_limit_mib", gc.MemoryLimit>>20, "from", gc.Source)
	}
	res.GCPercent = debug.SetGCPercent(-1)
	debug.SetGCPercent(res.GCPercent)
	res.MemoryLimitMiB = debug.SetMemoryLimit(-1) >> 20
	res.Database = DatabaseName(sagaDB)

	// The ceiling, before any coordinator runs, at the same concurrency.
	log.Info("measuring the commit ceiling", "concurrency", cfg.Concurrency, "duration", cfg.Baseline)
	rate, err := MeasureCommitRate(ctx, tmp.URL, cfg.Concurrency, cfg.Baseline)
	if err != nil {
		return SagaResult{}, err
	}
	res.PgCommitsPerSec = Round3(rate.PerSec)
	log.Info("commit ceiling", "commits", rate.Commits, "per_sec", int(rate.PerSec))

	// One connection reads the counters, so "no other client of the database is left" can be
	// checked; its own few transactions count in xact_commit too.
	statsCfg, err := pgxpool.ParseConfig(sagaDB)
	if err != nil {
		return SagaResult{}, fmt.Errorf("parse database url: %w", err)
	}
	statsCfg.MaxConns = 1
	stats, err := pgxpool.NewWithConfig(ctx, statsCfg)
	if err != nil {
		return SagaResult{}, fmt.Errorf("connect to %s: %w", res.Database, err)
	}
	defer stats.Close()
	if err := stats.QueryRow(ctx, "SHOW server_version").Scan(&res.PgVersion); err != nil {
		return SagaResult{}, fmt.Errorf("read server version: %w", err)
	}

	parts := make([]*testparticipant.Participant, cfg.Participants)
	defer func() {
		for _, p := range parts {
			if p != nil {
				p.Stop()
			}
		}
	}()
	targets := cfg.ParticipantAddrs
	for i := range parts {
		if len(targets) > 0 {
			break // running elsewhere
		}
		opts := testparticipant.Options{NoRecord: true}
		if cfg.ParticipantPort > 0 {
			opts.Listen = fmt.Sprintf("127.0.0.1:%d", cfg.ParticipantPort+i)
		}
		// Under the participants' label: the server's goroutines inherit it.
		asRole(ctx, roleParticipant, func(context.Context) { parts[i], err = testparticipant.Start(opts) })
		if err != nil {
			return SagaResult{}, fmt.Errorf("start participant %d on %s: %w", i, opts.Listen, err)
		}
	}
	if len(targets) == 0 {
		for _, p := range parts {
			targets = append(targets, p.Addr)
		}
	}
	res.ParticipantAddrs = targets
	spec := sagaSpec(targets, cfg.Steps)

	// In process, the warm-up and the measured phase each get a coordinator of their own, and
	// each is stopped before the counters are read: a backend publishes what it counted when its
	// connection closes, while a busy server may hold an idle backend's counters back for 10s
	// (PGSTAT_IDLE_INTERVAL), which would make a pause-and-read come out wrong.
	var coord *app.App
	tracer := newStmtTracer()
	startCoord := func(migrate bool) (string, error) {
		if cfg.Coordinator != "" {
			return cfg.Coordinator, nil
		}
		clog := cfg.CoordinatorLogger
		if clog == nil {
			clog = slog.New(slog.DiscardHandler)
		}
		var a *app.App
		var err error
		// Under the coordinator's label: everything it starts inherits it.
		asRole(ctx, roleCoordinator, func(ctx context.Context) {
			var st store.Store
			if cfg.StatementTimes {
				if st, err = tracedStore(ctx, sagaDB, cfg.DBMaxConns, migrate, tracer); err != nil {
					return
				}
			}
			a, err = app.Start(ctx, app.Config{
				DB: sagaDB, DBMaxConns: cfg.DBMaxConns, Listen: cfg.Listen, Migrate: migrate, Logger: clog,
				Store:  st,
				Engine: engine.Config{CommitWorkers: cfg.CommitWorkers, CommitBatch: cfg.CommitBatch, LazyProgress: cfg.LazyProgress},
			})
		})
		if err != nil {
			return "", fmt.Errorf("start coordinator on %s: %w", cfg.Listen, err)
		}
		coord = a
		return a.Addr, nil
	}
	// stopCoord stops the in-process coordinator and waits until its backends are gone; with an
	// external coordinator it pauses for PostgreSQL's periodic flush instead. datname is copied:
	// an early return resets res before the deferred stop runs.
	datname := res.Database
	stopCoord := func() error {
		if coord == nil {
			log.Info("waiting for the coordinator's backends to publish their counters", "pause", cfg.StatsPause)
			select {
			case <-time.After(cfg.StatsPause):
				return nil
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		a := coord
		coord = nil
		sctx, cancel := context.WithTimeout(cleanupCtx, 30*time.Second)
		defer cancel()
		if err := a.Stop(sctx); err != nil {
			return fmt.Errorf("stop coordinator: %w", err)
		}
		return waitOtherClientsGone(ctx, stats, datname)
	}
	defer func() {
		// On the way out (an error or an interrupt) only stop: nothing reads the counters.
		if coord != nil {
			sctx, cancel := context.WithTimeout(cleanupCtx, 30*time.Second)
			defer cancel()
			if serr := coord.Stop(sctx); serr != nil {
				err = errors.Join(err, fmt.Errorf("stop coordinator: %w", serr))
			}
		}
	}()
	// dial connects the clients' one gRPC connection to the coordinator at addr.
	dial := func(addr string) (treatyv1.CoordinatorClient, func(), error) {
		var conn *grpc.ClientConn
		var err error
		asRole(ctx, roleClient, func(context.Context) {
			conn, err = grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		})
		if err != nil {
			return nil, nil, fmt.Errorf("dial coordinator %s: %w", addr, err)
		}
		return treatyv1.NewCoordinatorClient(conn), func() { _ = conn.Close() }, nil
	}

	addr, err := startCoord(true)
	if err != nil {
		return SagaResult{}, err
	}
	if cfg.Warmup > 0 {
		log.Info("warming up", "duration", cfg.Warmup, "coordinator", addr)
		client, closeConn, err := dial(addr)
		if err != nil {
			return SagaResult{}, err
		}
		asRole(ctx, roleClient, func(ctx context.Context) {
			_, err = runSagaClients(ctx, client, spec, cfg.Concurrency, cfg.Warmup)
		})
		closeConn()
		if err != nil {
			return SagaResult{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	if err := stopCoord(); err != nil {
		return SagaResult{}, err
	}
	before, err := XactCommits(ctx, stats, res.Database)
	if err != nil {
		return SagaResult{}, err
	}
	writes0, err := txRowWrites(ctx, stats)
	if err != nil {
		return SagaResult{}, err
	}
	if addr, err = startCoord(false); err != nil {
		return SagaResult{}, err
	}
	res.CoordinatorAddr = addr
	client, closeConn, err := dial(addr)
	if err != nil {
		return SagaResult{}, err
	}
	defer closeConn()
	// Prime the measured coordinator (its database pool and its connections to the participants
	// open on demand) so the phase does not start with a stall. The primed sagas are not timed but
	// count in the per-saga commits: the counters were read before they ran.
	var primed clientRun
	if cfg.Warmup > 0 && cfg.Coordinator == "" {
		asRole(ctx, roleClient, func(ctx context.Context) {
			primed, err = runSagaClients(ctx, client, spec, cfg.Concurrency, min(cfg.Warmup, 500*time.Millisecond))
		})
		if err != nil {
			return SagaResult{}, fmt.Errorf("prime the coordinator: %w", err)
		}
	}

	// The profile is always taken: its labels divide this process's CPU between the roles.
	var profFile io.Writer
	if cfg.CPUProfile != "" {
		f, err := os.Create(cfg.CPUProfile)
		if err != nil {
			return SagaResult{}, fmt.Errorf("--cpuprofile: %w", err)
		}
		defer f.Close()
		profFile = f
	}
	prof, err := startRoleProfiler(profFile)
	if err != nil {
		return SagaResult{}, err
	}
	defer func() { _, _ = prof.stop() }() // on an early return; a no-op after the stop below
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	cpu0, cpuOK := processCPU()
	ext0, extOK := time.Duration(0), false
	if cfg.CoordinatorPID > 0 {
		ext0, extOK = pidCPU(cfg.CoordinatorPID)
	}
	pg0, err := pgBackendsCPU(ctx, stats, res.Database)
	if err != nil {
		return SagaResult{}, err
	}
	ckpt0, err := checkpoints(ctx, stats)
	if err != nil {
		return SagaResult{}, err
	}
	tracer.on.Store(true)
	log.Info("measuring", "duration", cfg.Duration, "steps", cfg.Steps, "concurrency", cfg.Concurrency, "coordinator", addr)
	var run clientRun
	var runErr error
	asRole(ctx, roleClient, func(ctx context.Context) {
		run, runErr = runSagaClients(ctx, client, spec, cfg.Concurrency, cfg.Duration)
	})
	runtime.ReadMemStats(&ms1)
	cpu1, _ := processCPU()
	tracer.on.Store(false)
	var ext time.Duration
	if extOK {
		if ext1, ok := pidCPU(cfg.CoordinatorPID); ok {
			ext = ext1 - ext0
		}
	}
	shares, err := prof.stop()
	if err != nil {
		return SagaResult{}, err
	}
	if cfg.MemProfile != "" {
		if err := writeAllocProfile(cfg.MemProfile); err != nil {
			return SagaResult{}, err
		}
	}
	pg1, err := pgBackendsCPU(ctx, stats, res.Database)
	if err != nil {
		return SagaResult{}, err
	}
	ckpt1, err := checkpoints(ctx, stats)
	if err != nil {
		return SagaResult{}, err
	}
	res.Checkpoints = ckpt1 - ckpt0
	res.LoadAvg1m = loadAvg()
	if runErr != nil && run.ok == 0 {
		return SagaResult{}, runErr
	}
	if err := stopCoord(); err != nil {
		return SagaResult{}, err
	}
	after, err := XactCommits(ctx, stats, res.Database)
	if err != nil {
		return SagaResult{}, err
	}
	writes1, err := txRowWrites(ctx, stats)
	if err != nil {
		return SagaResult{}, err
	}

	res.Seconds = Round3(run.elapsed.Seconds())
	res.Sagas, res.Failed, res.PrimedSagas = run.ok, run.failed, primed.ok+primed.failed
	res.GCCycles = ms1.NumGC - ms0.NumGC
	if cfg.StatementTimes {
		res.Statements = tracer.results(run.ok)
	}
	if run.ok > 0 {
		res.AllocKBPerSaga = Round3(float64(ms1.TotalAlloc-ms0.TotalAlloc) / 1024 / float64(run.ok))
	}
	res.XactCommits = after - before
	if run.ok > 0 {
		lat := Summarize(run.latencies)
		res.SagasPerSec = Round3(float64(run.ok) / run.elapsed.Seconds())
		res.MeanMs, res.P50Ms, res.P90Ms, res.P99Ms, res.MaxMs = Millis(lat.Mean), Millis(lat.P50), Millis(lat.P90), Millis(lat.P99), Millis(lat.Max)
		// Every saga submitted between the two readings wrote, failed and primed ones too.
		submitted := float64(run.ok + run.failed + primed.ok + primed.failed)
		res.CommitsPerSaga = Round3(float64(res.XactCommits) / submitted)
		res.TxRowWritesPerSaga = Round3(float64(writes1-writes0) / submitted)
		if cpuOK {
			res.ProcessCPUCores = Round3((cpu1 - cpu0).Seconds() / run.elapsed.Seconds())
			res.ProcessCPUMsSaga = Millis((cpu1 - cpu0) / time.Duration(run.ok))
		}
		pg := pg1.since(pg0)
		if pg > 0 {
			res.PgBackendCPUCores = Round3(pg.Seconds() / run.elapsed.Seconds())
			res.PgBackendCPUMsSaga = Millis(pg / time.Duration(run.ok))
		}
		if cpuOK {
			res.CPUMsPerSaga = splitCPU(cpu1-cpu0, shares, ext, pg, run.ok)
			coordCPU := time.Duration(float64(cpu1-cpu0)*shares[roleCoordinator]) + ext
			res.CoordinatorCPUCores = Round3(coordCPU.Seconds() / run.elapsed.Seconds())
		}
	}
	if res.PgCommitsPerSec > 0 {
		res.Ratio = Round3(res.SagasPerSec * res.CommitsPerSaga / res.PgCommitsPerSec)
	}
	if runErr != nil {
		return res, runErr
	}
	return res, nil
}

// backendTimes maps PostgreSQL backend pids to the CPU time each had used.
type backendTimes map[int32]time.Duration

// since returns the CPU the backends used between then and b. A backend that is new in b counts
// in full (it started in between); one that exited in between is missed, which the bench avoids
// by keeping its pools open across the phase.
func (b backendTimes) since(then backendTimes) time.Duration {
	var d time.Duration
	for pid, t := range b {
		d += t - then[pid]
	}
	return d
}

// pgBackendsCPU reads the CPU time of every client backend connected to datname, when the server
// runs on this machine; an empty map otherwise.
func pgBackendsCPU(ctx context.Context, pool *pgxpool.Pool, datname string) (backendTimes, error) {
	rows, err := pool.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE datname = $1 AND backend_type = 'client backend'`, datname)
	if err != nil {
		return nil, fmt.Errorf("list backends of %q: %w", datname, err)
	}
	pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
	if err != nil {
		return nil, fmt.Errorf("list backends of %q: %w", datname, err)
	}
	out := make(backendTimes, len(pids))
	for _, pid := range pids {
		if t, ok := backendCPU(pid, datname); ok {
			out[pid] = t
		}
	}
	return out, nil
}

// txRowWrites returns how many rows of treaty_transactions were inserted or updated so far, as
// published in pg_stat_user_tables.
func txRowWrites(ctx context.Context, pool *pgxpool.Pool) (int64, error) {
	var n int64
	err := pool.QueryRow(ctx, `SELECT pg_stat_clear_snapshot(), coalesce(sum(n_tup_ins + n_tup_upd), 0)::bigint
        FROM pg_stat_user_tables WHERE relname = 'treaty_transactions'`).Scan(nil, &n)
	if err != nil {
		return 0, fmt.Errorf("read treaty_transactions write count: %w", err)
	}
	return n, nil
}

// waitOtherClientsGone waits until no client but the caller's connection is connected to
// datname: every backend that went has published its counters by then (PostgreSQL flushes them
// before it leaves pg_stat_activity).
func waitOtherClientsGone(ctx context.Context, pool *pgxpool.Pool, datname string) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		var n int
		err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity
            WHERE datname = $1 AND backend_type = 'client backend' AND pid <> pg_backend_pid()`, datname).Scan(&n)
		if err != nil {
			return fmt.Errorf("wait for the coordinator's connections to %s to close: %w", datname, err)
		}
		if n == 0 {
			return nil
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return fmt.Errorf("wait for the coordinator's connections to %s to close: %d still open: %w", datname, n, ctx.Err())
		}
	}
}

// checkpoints returns how many checkpoints the server has run (timed and requested).
func checkpoints(ctx context.Context, pool *pgxpool.Pool) (int64, error) {
	var n int64
	err := pool.QueryRow(ctx, `SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter`).Scan(&n)
	if err != nil {
		// PostgreSQL 17 moved the counters to their own view.
		err = pool.QueryRow(ctx, `SELECT num_timed + num_requested FROM pg_stat_checkpointer`).Scan(&n)
	}
	if err != nil {
		return 0, fmt.Errorf("read checkpoint count: %w", err)
	}
	return n, nil
}

// sagaSpec builds a saga of n sequential no-op steps spread over the participants.
func sagaSpec(addrs []string, n int) *treatyv1.SagaSpec {
	spec := &treatyv1.SagaSpec{}
	for i := range n {
		addr := addrs[i%len(addrs)]
		name := fmt.Sprintf("step%d", i+1)
		spec.Steps = append(spec.Steps, &treatyv1.SagaStep{
			Name:       name,
			Action:     &treatyv1.Call{Target: "grpc://" + addr + "/bench.Step/Do", Payload: []byte("do " + name)},
			Compensate: &treatyv1.Call{Target: "grpc://" + addr + "/bench.Step/Undo", Payload: []byte("undo " + name)},
		})
	}
	return spec
}

type clientRun struct {
	ok, failed int64
	elapsed    time.Duration
	latencies  []time.Duration
	firstErr   error
}

// runSagaClients runs concurrency clients that each submit a saga with wait, then the next, until
// d has passed; the sagas in flight then are finished and counted. elapsed runs from the start to
// the last answer, so every counted saga lies inside it.
func runSagaClients(ctx context.Context, client treatyv1.CoordinatorClient, spec *treatyv1.SagaSpec, concurrency int, d time.Duration) (clientRun, error) {
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		ok, fail atomic.Int64
		lats     = make([][]time.Duration, concurrency)
		firstErr error
	)
	start := time.Now()
	stopAt := start.Add(d)
	for w := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req := &treatyv1.SubmitSagaRequest{Saga: spec, Wait: durationpb.New(time.Minute)}
			own := make([]time.Duration, 0, 1024)
			for ctx.Err() == nil && time.Now().Before(stopAt) {
				t0 := time.Now()
				resp, err := client.SubmitSaga(ctx, req)
				lat := time.Since(t0)
				if err == nil && resp.GetTransaction().GetStatus() != treatyv1.Status_STATUS_SUCCEEDED {
					err = fmt.Errorf("saga %s ended %s: %s", resp.GetTransaction().GetGid(),
						resp.GetTransaction().GetStatus(), resp.GetTransaction().GetReason())
				}
				if err != nil {
					if ctx.Err() != nil {
						break // interrupted: not the coordinator's failure
					}
					fail.Add(1)
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					continue
				}
				ok.Add(1)
				own = append(own, lat)
			}
			lats[w] = own
		}()
	}
	wg.Wait()
	run := clientRun{ok: ok.Load(), failed: fail.Load(), elapsed: time.Since(start), firstErr: firstErr}
	for _, l := range lats {
		run.latencies = append(run.latencies, l...)
	}
	if err := ctx.Err(); err != nil {
		return run, fmt.Errorf("interrupted: %w", err)
	}
	if run.failed > 0 {
		return run, fmt.Errorf("%d of %d sagas failed; first: %w", run.failed, run.failed+run.ok, firstErr)
	}
	return run, nil
}

const sagaUsage = `treaty-bench saga: throughput and latency of the saga coordinator against its PostgreSQL ceiling.

Starts no-op gRPC participants and a coordinator in process (or uses --coordinator), measures the
server's raw commit rate (one-row autocommit INSERTs at --concurrency connections), then runs
--concurrency clients that each submit a --steps saga and wait for its outcome in one SubmitSaga
call, over and over, for --duration after --warmup. Everything happens in a database created for
the run (treaty_bench_<random>) and dropped afterwards unless --keep.

The last line of the output is one JSON object: sagas_per_sec, p50_ms, p99_ms, pg_commits_per_sec,
commits_per_saga (pg_stat_database.xact_commit delta / sagas; read-only transactions count too),
ratio = sagas_per_sec * commits_per_saga / pg_commits_per_sec, and more.

Example:
  treaty-bench saga --steps 3 --concurrency 32 --duration 20s --db postgres://postgres@127.0.0.1:5432/postgres

Flags:`

// SagaMain is `treaty-bench saga`: it parses args (without the command name), runs the bench,
// writes progress to stderr and the result to stdout (a summary, then the JSON line last), and
// returns the exit code.
func SagaMain(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	var cfg SagaConfig
	var verbose bool
	fs := flag.NewFlagSet("saga", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, sagaUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.DB, "db", getenv("TREATY_DB"), "PostgreSQL URL (or TREATY_DB); the role needs CREATEDB. With --coordinator: the URL of that coordinator's database")
	fs.StringVar(&cfg.Coordinator, "coordinator", "", "gRPC address of a running coordinator (default: start one in process)")
	fs.IntVar(&cfg.Steps, "steps", 3, "steps per saga, run one after another")
	fs.IntVar(&cfg.Concurrency, "concurrency", 32, "clients submitting sagas at once (and connections for the commit ceiling)")
	fs.DurationVar(&cfg.Duration, "duration", 20*time.Second, "measured phase")
	fs.DurationVar(&cfg.Warmup, "warmup", 2*time.Second, "uncounted sagas before measuring (0 = none)")
	fs.DurationVar(&cfg.Baseline, "baseline", 5*time.Second, "how long to measure the raw commit rate")
	fs.IntVar(&cfg.Participants, "participants", 0, "no-op participant servers; step i calls server i mod N (default: one per step)")
	fs.IntVar(&cfg.DBMaxConns, "db-max-conns", 0, "pool size of the in-process coordinator (default: the coordinator's, 16)")
	fs.IntVar(&cfg.GCPercent, "gc-percent", 0, "with the in-process coordinator: the process's GC target, as coordinator serve --gc-percent (0: its default; -1: Go's; GOGC wins)")
	fs.DurationVar(&cfg.LazyProgress, "lazy-progress", 0, "the in-process coordinator's --lazy-progress (0: its default; negative: record every result before the next call)")
	fs.IntVar(&cfg.CommitWorkers, "commit-workers", 0, "group commits in flight at once in the in-process coordinator (default: the engine's)")
	fs.IntVar(&cfg.CommitBatch, "commit-batch", 0, "most records per group commit in the in-process coordinator (default: the engine's)")
	fs.StringVar(&cfg.CPUProfile, "cpuprofile", "", "write a CPU profile of the measured phase to this file")
	fs.BoolVar(&cfg.StatementTimes, "statement-times", false, "time the in-process coordinator's SQL statements (Go side) and list them in the result")
	fs.StringVar(&cfg.MemProfile, "memprofile", "", "write the allocation profile (since start, warm-up included) to this file after the measured phase")
	fs.DurationVar(&cfg.StatsPause, "stats-pause", 11*time.Second, "with --coordinator: how long to let its backends publish their counters before reading them")
	fs.BoolVar(&cfg.Keep, "keep", false, "keep the treaty_bench_* database instead of dropping it")
	fs.StringVar(&cfg.DBPrefix, "db-prefix", "treaty_bench_", "name prefix of the throwaway database (12 random hex digits follow); lower-case letters, digits and _")
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:0", "gRPC address of the in-process coordinator (default: a random loopback port)")
	fs.IntVar(&cfg.ParticipantPort, "participant-port", 0, "first port of the participant servers, one port each from there (default 0: random ports)")
	var partAddrs string
	fs.StringVar(&partAddrs, "participant-addrs", "", "running no-op participants (treaty-bench participant), comma-separated, instead of starting them; step i calls address i mod N")
	fs.IntVar(&cfg.CoordinatorPID, "coordinator-pid", 0, "with --coordinator on this machine: its process id, to report its CPU (from /proc)")
	fs.BoolVar(&verbose, "v", false, "log the coordinator's warnings too")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "treaty-bench saga: unexpected argument %q (flags start with --)\n", fs.Arg(0))
		return 2
	}
	if partAddrs != "" {
		cfg.ParticipantAddrs = strings.Split(partAddrs, ",")
	}
	// On the command line 0 is a value, not "the default" as in SagaConfig.
	switch {
	case cfg.Steps == 0:
		fmt.Fprintln(stderr, "treaty-bench saga: --steps is 0, must be within 1..64")
		return 2
	case cfg.Concurrency == 0:
		fmt.Fprintln(stderr, "treaty-bench saga: --concurrency is 0, must be within 1..1024")
		return 2
	case cfg.Duration <= 0:
		fmt.Fprintf(stderr, "treaty-bench saga: --duration is %s, must be positive\n", cfg.Duration)
		return 2
	case cfg.Baseline <= 0:
		fmt.Fprintf(stderr, "treaty-bench saga: --baseline is %s, must be positive\n", cfg.Baseline)
		return 2
	}
	if cfg.Warmup == 0 {
		cfg.Warmup = -1 // the flag's 0 means none; the Config's zero means the default
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if verbose {
		cfg.CoordinatorLogger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	res, err := RunSaga(ctx, cfg)
	if res.Bench == "" {
		fmt.Fprintf(stderr, "treaty-bench saga: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "saga bench: %d-step sagas, concurrency %d, %d participant server(s), coordinator %s, PostgreSQL %s\n",
		res.Steps, res.Concurrency, res.Participants, res.Coordinator, res.PgVersion)
	fmt.Fprintf(stdout, "  %d sagas in %.1fs (%d failed): %.0f sagas/s; latency mean %.2fms p50 %.2fms p90 %.2fms p99 %.2fms max %.2fms\n",
		res.Sagas, res.Seconds, res.Failed, res.SagasPerSec, res.MeanMs, res.P50Ms, res.P90Ms, res.P99Ms, res.MaxMs)
	fmt.Fprintf(stdout, "  PostgreSQL ceiling %.0f commits/s; %.2f commits per saga (%d xact_commit, read-only ones included; %.2f transaction-row writes per saga); ratio %.3f\n",
		res.PgCommitsPerSec, res.CommitsPerSaga, res.XactCommits, res.TxRowWritesPerSaga, res.Ratio)
	fmt.Fprintf(stdout, "  machine: %d checkpoints during the phase (whole server), load average %.2f\n", res.Checkpoints, res.LoadAvg1m)
	if res.ProcessCPUCores > 0 || res.PgBackendCPUCores > 0 {
		fmt.Fprintf(stdout, "  CPU: this process %.2f cores (%.3f ms/saga), PostgreSQL backends %.2f cores (%.3f ms/saga), of %d cores\n",
			res.ProcessCPUCores, res.ProcessCPUMsSaga, res.PgBackendCPUCores, res.PgBackendCPUMsSaga, res.NumCPU)
		c := res.CPUMsPerSaga
		fmt.Fprintf(stdout, "  CPU ms per saga: coordinator %.3f, participants %.3f, clients %.3f, Go runtime (unlabeled) %.3f, PostgreSQL %.3f; total %.3f\n",
			c.Coordinator, c.Participants, c.Clients, c.Runtime, c.PostgreSQL, c.Total)
	}
	line, jerr := json.Marshal(res)
	if jerr != nil {
		fmt.Fprintf(stderr, "treaty-bench saga: %v\n", jerr)
		return 1
	}
	fmt.Fprintln(stdout, strings.TrimSpace(string(line)))
	if err != nil {
		fmt.Fprintf(stderr, "treaty-bench saga: %v\n", err)
		return 1
	}
	return 0
}

// tracedStore opens the coordinator's PostgreSQL store as app.Start would, with the statement
// tracer on its pool.
func tracedStore(ctx context.Context, url string, maxConns int, migrate bool, t *stmtTracer) (store.Store, error) {
	pcfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	pcfg.MaxConns = 16
	if maxConns > 0 {
		pcfg.MaxConns = int32(maxConns)
	}
	pcfg.ConnConfig.Tracer = t
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connect database: %w", err)
	}
	if migrate {
		if _, err := postgres.Migrate(ctx, pool); err != nil {
			pool.Close()
			return nil, err
		}
	}
	return postgres.New(pool), nil
}
