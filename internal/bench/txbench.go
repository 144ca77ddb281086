package bench

// This file holds the harness that `treaty-bench tcc` and `treaty-bench 2pc` share: the same
// phases as the saga bench (commit ceiling, warm-up, measured phase, exact commit counts) with
// the transactions driven through the Go SDK, as an application would, instead of raw gRPC.
// saga.go predates it and keeps its own loop; the helpers it exports to the package
// (waitOtherClientsGone, pgBackendsCPU, txRowWrites, checkpoints, clientRun) are reused here.

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
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/testparticipant"
	"github.com/treatyhq/treaty/sdk"
)

// TxConfig configures RunTCC and RunTwoPhase. Zero values mean the defaults of the commands.
type TxConfig struct {
	// DB is a postgres:// URL (required). With an in-process coordinator it only names the
	// server: the run creates database treaty_bench_<random> there and drops it afterwards. With
	// Coordinator set it must name the database that coordinator uses: its commit counter is read
	// (nothing is written there), and the commit ceiling runs in a throwaway database beside it.
	DB string
	// Coordinator is the gRPC address of a running coordinator; empty starts one in process.
	// The participants listen on 127.0.0.1, so it must run on this machine.
	Coordinator string
	// Branches per transaction; default 2.
	Branches int
	// Concurrency is the number of clients, each running one transaction to its outcome, then
	// the next; default 32. The commit ceiling uses as many connections.
	Concurrency int
	// Duration of the measured phase; default 20s.
	Duration time.Duration
	// Warmup runs transactions before measuring, uncounted; default 2s. Negative means none.
	Warmup time.Duration
	// Baseline is how long the commit ceiling is measured; default 5s.
	Baseline time.Duration
	// Participants is the number of no-op participant servers; branch i calls server i mod N.
	// Default: one per branch, as if each branch were another service.
	Participants int
	// DBMaxConns sizes the in-process coordinator's pool; 0 = the coordinator's default.
	DBMaxConns int
	// CommitWorkers and CommitBatch tune the in-process coordinator's group commit; 0 = the
	// engine's defaults.
	CommitWorkers, CommitBatch int
	// CPUProfile, if set, receives a CPU profile of the measured phase (the whole process:
	// clients, participants and, when in process, the coordinator).
	CPUProfile string
	// Keep leaves the throwaway database in place.
	Keep bool
	// DBPrefix, Listen and ParticipantPort place the run beside other workloads, as in
	// SagaConfig: the throwaway database's name prefix (default "treaty_bench_"), the in-process
	// coordinator's gRPC address (default 127.0.0.1:0) and the first participant port (server i
	// on 127.0.0.1:ParticipantPort+i; default random).
	DBPrefix        string
	Listen          string
	ParticipantPort int
	// StatsPause is how long to wait for an external coordinator's backends to publish their
	// counters before reading them (an in-process coordinator is stopped instead, which is
	// exact); default 11s: a busy server retries a flush that found its lock taken after 10s.
	StatsPause time.Duration
	// Logger receives progress; nil = discard. The coordinator's own log is discarded unless
	// CoordinatorLogger is set.
	Logger            *slog.Logger
	CoordinatorLogger *slog.Logger
}

func (c *TxConfig) setDefaults() error {
	if c.DB == "" {
		return errors.New("--db (or TREATY_DB) is required: a postgres:// URL of a server where the bench may create a database")
	}
	if c.Branches == 0 {
		c.Branches = 2
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
		c.Participants = c.Branches
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
	if c.ParticipantPort < 0 || c.ParticipantPort+c.Participants-1 > 65535 {
		return fmt.Errorf("--participant-port is %d, must be 0 (random) or within 1..%d (one port per participant server)", c.ParticipantPort, 65536-c.Participants)
	}
	switch {
	case c.Branches < 1 || c.Branches > 64:
		return fmt.Errorf("--branches is %d, must be within 1..64 (the coordinator's default branch limit)", c.Branches)
	case c.Concurrency < 1 || c.Concurrency > 1024:
		return fmt.Errorf("--concurrency is %d, must be within 1..1024", c.Concurrency)
	case c.Duration < 0:
		return fmt.Errorf("--duration is %s, must be positive", c.Duration)
	case c.Baseline < 0:
		return fmt.Errorf("--baseline is %s, must be positive", c.Baseline)
	case c.Participants < 1 || c.Participants > c.Branches:
		return fmt.Errorf("--participants is %d, must be within 1..%d (--branches)", c.Participants, c.Branches)
	case c.Coordinator != "" && DatabaseName(c.DB) == "":
		return errors.New("--db must name the coordinator's database when --coordinator is set")
	}
	return nil
}

// TxResult is what `treaty-bench tcc` and `treaty-bench 2pc` print as their last line. The
// fields mean what SagaResult's do, named for any transaction ("txns") rather than sagas.
type TxResult struct {
	Bench       string  `json:"bench"` // "tcc" or "2pc"
	Branches    int     `json:"branches"`
	Concurrency int     `json:"concurrency"`
	Seconds     float64 `json:"seconds"` // measured phase, first begin to last answer
	Txns        int64   `json:"txns"`    // succeeded (confirmed or committed) in the measured phase
	Failed      int64   `json:"failed"`  // errors or other outcomes in the measured phase

	TxnsPerSec float64 `json:"txns_per_sec"`
	// Latency of one whole transaction as the application sees it: for TCC from BeginTCC to
	// CommitTCC's answer with every branch confirmed, for 2PC the one Submit2PC call with wait.
	MeanMs float64 `json:"mean_ms"`
	P50Ms  float64 `json:"p50_ms"`
	P90Ms  float64 `json:"p90_ms"`
	P99Ms  float64 `json:"p99_ms"`
	MaxMs  float64 `json:"max_ms"`

	// PgCommitsPerSec is the ceiling: one-row autocommit INSERTs per second at Concurrency.
	PgCommitsPerSec float64 `json:"pg_commits_per_sec"`
	// CommitsPerTxn is the xact_commit delta of the coordinator's database over the measured
	// phase divided by the transactions in it; read-only transactions count, and a group commit
	// that carries several transactions' writes counts once.
	CommitsPerTxn float64 `json:"commits_per_txn"`
	XactCommits   int64   `json:"xact_commits"`
	// TxRowWritesPerTxn counts the statements that wrote a transaction row per transaction
	// (pg_stat_user_tables of treaty_transactions; branch rows are not in it).
	TxRowWritesPerTxn float64 `json:"tx_row_writes_per_txn"`
	// Ratio = TxnsPerSec * CommitsPerTxn / PgCommitsPerSec: the share of the server's commit
	// ceiling the coordinator used. Well below 1 means the time went elsewhere (CPU, round trips).
	Ratio float64 `json:"ratio"`
	// WindowTxnsPerSec counts only the transactions answered within the nominal duration, divided
	// by it. It equals TxnsPerSec but for a slow straggler: Seconds runs to the last answer, so
	// one transaction that takes 30s stretches the phase and divides TxnsPerSec by up to three
	// while everyone else stopped at Duration; this figure is not moved by that.
	WindowTxnsPerSec float64 `json:"window_txns_per_sec"`
	// Over1s counts the succeeded transactions whose latency exceeded one second.
	Over1s int64 `json:"over_1s"`

	Participants int    `json:"participants"`
	Coordinator  string `json:"coordinator"` // "in-process" or the address given
	// Where the measured coordinator and the participant servers listened.
	CoordinatorAddr  string   `json:"coordinator_addr"`
	ParticipantAddrs []string `json:"participant_addrs"`
	Database         string   `json:"database"` // the database the transactions were stored in
	Kept             bool     `json:"kept"`     // the throwaway database was left in place
	GoMaxProcs       int      `json:"gomaxprocs"`
	NumCPU           int      `json:"num_cpu"`
	GCCycles         uint32   `json:"gc_cycles"` // during the measured phase, this process
	PgVersion        string   `json:"pg_version"`

	// Where the CPU went during the measured phase (Linux): this process (clients, participants
	// and an in-process coordinator) and the PostgreSQL backends connected to the coordinator's
	// database (only when the server runs on this machine). Cores = CPU seconds per second.
	ProcessCPUCores   float64 `json:"process_cpu_cores,omitempty"`
	ProcessCPUMsTxn   float64 `json:"process_cpu_ms_per_txn,omitempty"`
	PgBackendCPUCores float64 `json:"pg_backend_cpu_cores,omitempty"`
	PgBackendCPUMsTxn float64 `json:"pg_backend_cpu_ms_per_txn,omitempty"`

	// Signs of a shared machine: checkpoints the whole server ran during the measured phase and
	// the 1-minute load average at its end.
	Checkpoints int64   `json:"checkpoints"`
	LoadAvg1m   float64 `json:"loadavg_1m,omitempty"`
}

// txOp runs one transaction through c to its outcome; nil means it succeeded.
type txOp func(ctx context.Context, c *sdk.Client) error

// txMode is one benchmark of this harness.
type txMode struct {
	name string // "tcc" or "2pc": the command and TxResult.Bench
	// build returns the operation for these participants and branch count.
	build func(parts []*testparticipant.Participant, branches int) txOp
}

// runTx runs a benchmark: the commit ceiling first, then a coordinator (in process unless
// cfg.Coordinator is set) serving cfg.Concurrency SDK clients for cfg.Duration after a warm-up.
// It returns the result even when some transactions failed (then with an error too).
func runTx(ctx context.Context, cfg TxConfig, mode txMode) (res TxResult, err error) {
	if err := cfg.setDefaults(); err != nil {
		return TxResult{}, err
	}
	log := cfg.Logger
	res = TxResult{
		Bench: mode.name, Branches: cfg.Branches, Concurrency: cfg.Concurrency, Participants: cfg.Participants,
		Coordinator: "in-process", GoMaxProcs: runtime.GOMAXPROCS(0), NumCPU: runtime.NumCPU(),
	}
	cleanupCtx := context.WithoutCancel(ctx)

	// A database of our own, so the bench never touches real data.
	tmp, err := CreateTempDatabase(ctx, cfg.DB, cfg.DBPrefix)
	if err != nil {
		return TxResult{}, err
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

	txDB := tmp.URL
	if cfg.Coordinator != "" {
		txDB = cfg.DB
		res.Coordinator = cfg.Coordinator
	}
	res.Database = DatabaseName(txDB)

	// The ceiling, before any coordinator runs, at the same concurrency.
	log.Info("measuring the commit ceiling", "concurrency", cfg.Concurrency, "duration", cfg.Baseline)
	rate, err := MeasureCommitRate(ctx, tmp.URL, cfg.Concurrency, cfg.Baseline)
	if err != nil {
		return TxResult{}, err
	}
	res.PgCommitsPerSec = Round3(rate.PerSec)
	log.Info("commit ceiling", "commits", rate.Commits, "per_sec", int(rate.PerSec))

	// One connection reads the counters, so "no other client of the database is left" can be
	// checked; its own few transactions count in xact_commit too.
	statsCfg, err := pgxpool.ParseConfig(txDB)
	if err != nil {
		return TxResult{}, fmt.Errorf("parse database url: %w", err)
	}
	statsCfg.MaxConns = 1
	stats, err := pgxpool.NewWithConfig(ctx, statsCfg)
	if err != nil {
		return TxResult{}, fmt.Errorf("connect to %s: %w", res.Database, err)
	}
	defer stats.Close()
	if err := stats.QueryRow(ctx, "SHOW server_version").Scan(&res.PgVersion); err != nil {
		return TxResult{}, fmt.Errorf("read server version: %w", err)
	}

	parts := make([]*testparticipant.Participant, cfg.Participants)
	defer func() {
		for _, p := range parts {
			if p != nil {
				p.Stop()
			}
		}
	}()
	for i := range parts {
		opts := testparticipant.Options{NoRecord: true}
		if cfg.ParticipantPort > 0 {
			opts.Listen = fmt.Sprintf("127.0.0.1:%d", cfg.ParticipantPort+i)
		}
		if parts[i], err = testparticipant.Start(opts); err != nil {
			return TxResult{}, fmt.Errorf("start participant %d on %s: %w", i, opts.Listen, err)
		}
		res.ParticipantAddrs = append(res.ParticipantAddrs, parts[i].Addr)
	}
	op := mode.build(parts, cfg.Branches)

	// As in the saga bench, the warm-up and the measured phase each get a coordinator of their
	// own, stopped before the counters are read: a backend publishes what it counted when its
	// connection closes, while a busy server may hold an idle backend's counters back for 10s.
	var coord *app.App
	startCoord := func(migrate bool) (string, error) {
		if cfg.Coordinator != "" {
			return cfg.Coordinator, nil
		}
		clog := cfg.CoordinatorLogger
		if clog == nil {
			clog = slog.New(slog.DiscardHandler)
		}
		a, err := app.Start(ctx, app.Config{
			DB: txDB, DBMaxConns: cfg.DBMaxConns, Listen: cfg.Listen, Migrate: migrate, Logger: clog,
			Engine: engine.Config{CommitWorkers: cfg.CommitWorkers, CommitBatch: cfg.CommitBatch},
		})
		if err != nil {
			return "", fmt.Errorf("start coordinator: %w", err)
		}
		coord = a
		return a.Addr, nil
	}
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
		return waitOtherClientsGone(ctx, stats, res.Database)
	}
	defer func() {
		if coord != nil {
			err = errors.Join(err, stopCoord())
		}
	}()
	// phase runs the clients against the coordinator at addr for d through one SDK client, as
	// an application shares one.
	phase := func(addr string, d time.Duration) (txRun, error) {
		c, err := sdk.Dial(ctx, sdk.Options{Address: addr})
		if err != nil {
			return txRun{}, fmt.Errorf("dial coordinator %s: %w", addr, err)
		}
		defer c.Close()
		return runTxClients(ctx, func(ctx context.Context) error { return op(ctx, c) }, cfg.Concurrency, d)
	}

	addr, err := startCoord(true)
	if err != nil {
		return TxResult{}, err
	}
	if cfg.Warmup > 0 {
		log.Info("warming up", "duration", cfg.Warmup, "coordinator", addr)
		if _, err := phase(addr, cfg.Warmup); err != nil {
			return TxResult{}, fmt.Errorf("warm-up: %w", err)
		}
	}
	if err := stopCoord(); err != nil {
		return TxResult{}, err
	}
	before, err := XactCommits(ctx, stats, res.Database)
	if err != nil {
		return TxResult{}, err
	}
	writes0, err := txRowWrites(ctx, stats)
	if err != nil {
		return TxResult{}, err
	}
	if addr, err = startCoord(false); err != nil {
		return TxResult{}, err
	}
	res.CoordinatorAddr = addr

	if cfg.CPUProfile != "" {
		f, err := os.Create(cfg.CPUProfile)
		if err != nil {
			return TxResult{}, fmt.Errorf("--cpuprofile: %w", err)
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return TxResult{}, fmt.Errorf("--cpuprofile: %w", err)
		}
	}
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	cpu0, cpuOK := processCPU()
	pg0, err := pgBackendsCPU(ctx, stats, res.Database)
	if err != nil {
		return TxResult{}, err
	}
	ckpt0, err := checkpoints(ctx, stats)
	if err != nil {
		return TxResult{}, err
	}
	log.Info("measuring", "duration", cfg.Duration, "branches", cfg.Branches, "concurrency", cfg.Concurrency, "coordinator", addr)
	run, runErr := phase(addr, cfg.Duration)
	runtime.ReadMemStats(&ms1)
	cpu1, _ := processCPU()
	if cfg.CPUProfile != "" {
		pprof.StopCPUProfile()
	}
	pg1, err := pgBackendsCPU(ctx, stats, res.Database)
	if err != nil {
		return TxResult{}, err
	}
	ckpt1, err := checkpoints(ctx, stats)
	if err != nil {
		return TxResult{}, err
	}
	res.Checkpoints = ckpt1 - ckpt0
	res.LoadAvg1m = loadAvg()
	if runErr != nil && run.ok == 0 {
		return TxResult{}, runErr
	}
	if err := stopCoord(); err != nil {
		return TxResult{}, err
	}
	after, err := XactCommits(ctx, stats, res.Database)
	if err != nil {
		return TxResult{}, err
	}
	writes1, err := txRowWrites(ctx, stats)
	if err != nil {
		return TxResult{}, err
	}

	res.Seconds = Round3(run.elapsed.Seconds())
	res.Txns, res.Failed = run.ok, run.failed
	res.GCCycles = ms1.NumGC - ms0.NumGC
	res.XactCommits = after - before
	if run.ok > 0 {
		lat := Summarize(run.latencies)
		res.TxnsPerSec = Round3(float64(run.ok) / run.elapsed.Seconds())
		res.WindowTxnsPerSec = Round3(float64(run.inWindow) / cfg.Duration.Seconds())
		res.Over1s = run.over1s
		res.MeanMs, res.P50Ms, res.P90Ms, res.P99Ms, res.MaxMs = Millis(lat.Mean), Millis(lat.P50), Millis(lat.P90), Millis(lat.P99), Millis(lat.Max)
		// Failed transactions wrote too; divide by every one begun so the figure is not inflated.
		res.CommitsPerTxn = Round3(float64(res.XactCommits) / float64(run.ok+run.failed))
		res.TxRowWritesPerTxn = Round3(float64(writes1-writes0) / float64(run.ok+run.failed))
		if cpuOK {
			res.ProcessCPUCores = Round3((cpu1 - cpu0).Seconds() / run.elapsed.Seconds())
			res.ProcessCPUMsTxn = Millis((cpu1 - cpu0) / time.Duration(run.ok))
		}
		if pg := pg1.since(pg0); pg > 0 {
			res.PgBackendCPUCores = Round3(pg.Seconds() / run.elapsed.Seconds())
			res.PgBackendCPUMsTxn = Millis(pg / time.Duration(run.ok))
		}
	}
	if res.PgCommitsPerSec > 0 {
		res.Ratio = Round3(res.TxnsPerSec * res.CommitsPerTxn / res.PgCommitsPerSec)
	}
	if runErr != nil {
		return res, runErr
	}
	return res, nil
}

// txRun is a clientRun with what runTxClients counts besides.
type txRun struct {
	clientRun
	inWindow int64 // succeeded and answered before the phase's nominal end
	over1s   int64 // succeeded with a latency over one second
}

// runTxClients runs concurrency clients that each run op, then the next, until d has passed;
// the transactions in flight then are finished and counted. elapsed runs from the start to the
// last answer, so every counted transaction lies inside it.
func runTxClients(ctx context.Context, op func(ctx context.Context) error, concurrency int, d time.Duration) (txRun, error) {
	var (
		wg                     sync.WaitGroup
		mu                     sync.Mutex
		ok, fail, inWin, slow1 atomic.Int64
		lats                   = make([][]time.Duration, concurrency)
		firstErr               error
	)
	start := time.Now()
	stopAt := start.Add(d)
	for w := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			own := make([]time.Duration, 0, 1024)
			for ctx.Err() == nil && time.Now().Before(stopAt) {
				t0 := time.Now()
				err := op(ctx)
				lat := time.Since(t0)
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
				if !t0.Add(lat).After(stopAt) {
					inWin.Add(1)
				}
				if lat > time.Second {
					slow1.Add(1)
				}
			}
			lats[w] = own
		}()
	}
	wg.Wait()
	run := txRun{
		clientRun: clientRun{ok: ok.Load(), failed: fail.Load(), elapsed: time.Since(start), firstErr: firstErr},
		inWindow:  inWin.Load(), over1s: slow1.Load(),
	}
	for _, l := range lats {
		run.latencies = append(run.latencies, l...)
	}
	if err := ctx.Err(); err != nil {
		return run, fmt.Errorf("interrupted: %w", err)
	}
	if run.failed > 0 {
		return run, fmt.Errorf("%d of %d transactions failed; first: %w", run.failed, run.failed+run.ok, firstErr)
	}
	return run, nil
}

// txMain is the command line of a txMode: it parses args (without the command name), runs the
// bench, writes progress to stderr and the result to stdout (a summary, then the JSON line
// last), and returns the exit code.
func txMain(ctx context.Context, mode txMode, usage string, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	var cfg TxConfig
	var verbose bool
	prog := "treaty-bench " + mode.name
	fs := flag.NewFlagSet(mode.name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, usage)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.DB, "db", getenv("TREATY_DB"), "PostgreSQL URL (or TREATY_DB); the role needs CREATEDB. With --coordinator: the URL of that coordinator's database")
	fs.StringVar(&cfg.Coordinator, "coordinator", "", "gRPC address of a running coordinator on this machine (default: start one in process)")
	fs.IntVar(&cfg.Branches, "branches", 2, "branches per transaction")
	fs.IntVar(&cfg.Concurrency, "concurrency", 32, "clients running transactions at once (and connections for the commit ceiling)")
	fs.DurationVar(&cfg.Duration, "duration", 20*time.Second, "measured phase")
	fs.DurationVar(&cfg.Warmup, "warmup", 2*time.Second, "uncounted transactions before measuring (0 = none)")
	fs.DurationVar(&cfg.Baseline, "baseline", 5*time.Second, "how long to measure the raw commit rate")
	fs.IntVar(&cfg.Participants, "participants", 0, "no-op participant servers; branch i calls server i mod N (default: one per branch)")
	fs.IntVar(&cfg.DBMaxConns, "db-max-conns", 0, "pool size of the in-process coordinator (default: the coordinator's, 16)")
	fs.IntVar(&cfg.CommitWorkers, "commit-workers", 0, "group commits in flight at once in the in-process coordinator (default: the engine's)")
	fs.IntVar(&cfg.CommitBatch, "commit-batch", 0, "most records per group commit in the in-process coordinator (default: the engine's)")
	fs.StringVar(&cfg.CPUProfile, "cpuprofile", "", "write a CPU profile of the measured phase to this file")
	fs.DurationVar(&cfg.StatsPause, "stats-pause", 11*time.Second, "with --coordinator: how long to let its backends publish their counters before reading them")
	fs.BoolVar(&cfg.Keep, "keep", false, "keep the treaty_bench_* database instead of dropping it")
	fs.StringVar(&cfg.DBPrefix, "db-prefix", "treaty_bench_", "name prefix of the throwaway database (12 random hex digits follow); lower-case letters, digits and _")
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:0", "gRPC address of the in-process coordinator (default: a random loopback port)")
	fs.IntVar(&cfg.ParticipantPort, "participant-port", 0, "first port of the participant servers, one port each from there (default 0: random ports)")
	fs.BoolVar(&verbose, "v", false, "log the coordinator's warnings too")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected argument %q (flags start with --)\n", prog, fs.Arg(0))
		return 2
	}
	// On the command line 0 is a value, not "the default" as in TxConfig.
	switch {
	case cfg.Branches == 0:
		fmt.Fprintf(stderr, "%s: --branches is 0, must be within 1..64\n", prog)
		return 2
	case cfg.Concurrency == 0:
		fmt.Fprintf(stderr, "%s: --concurrency is 0, must be within 1..1024\n", prog)
		return 2
	case cfg.Duration <= 0:
		fmt.Fprintf(stderr, "%s: --duration is %s, must be positive\n", prog, cfg.Duration)
		return 2
	case cfg.Baseline <= 0:
		fmt.Fprintf(stderr, "%s: --baseline is %s, must be positive\n", prog, cfg.Baseline)
		return 2
	}
	if cfg.Warmup == 0 {
		cfg.Warmup = -1 // the flag's 0 means none; the Config's zero means the default
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if verbose {
		cfg.CoordinatorLogger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	res, err := runTx(ctx, cfg, mode)
	if res.Bench == "" {
		fmt.Fprintf(stderr, "%s: %v\n", prog, err)
		return 1
	}
	fmt.Fprintf(stdout, "%s bench: %d-branch transactions, concurrency %d, %d participant server(s), coordinator %s, PostgreSQL %s\n",
		res.Bench, res.Branches, res.Concurrency, res.Participants, res.Coordinator, res.PgVersion)
	fmt.Fprintf(stdout, "  %d transactions in %.1fs (%d failed): %.0f txns/s; latency mean %.2fms p50 %.2fms p90 %.2fms p99 %.2fms max %.2fms\n",
		res.Txns, res.Seconds, res.Failed, res.TxnsPerSec, res.MeanMs, res.P50Ms, res.P90Ms, res.P99Ms, res.MaxMs)
	if res.Over1s > 0 {
		fmt.Fprintf(stdout, "  %d transaction(s) took over 1s; within the nominal %s: %.0f txns/s\n",
			res.Over1s, cfg.Duration, res.WindowTxnsPerSec)
	}
	fmt.Fprintf(stdout, "  PostgreSQL ceiling %.0f commits/s; %.2f commits per transaction (%d xact_commit, read-only ones included; %.2f transaction-row writes per transaction); ratio %.3f\n",
		res.PgCommitsPerSec, res.CommitsPerTxn, res.XactCommits, res.TxRowWritesPerTxn, res.Ratio)
	fmt.Fprintf(stdout, "  machine: %d checkpoints during the phase (whole server), load average %.2f\n", res.Checkpoints, res.LoadAvg1m)
	if res.ProcessCPUCores > 0 || res.PgBackendCPUCores > 0 {
		fmt.Fprintf(stdout, "  CPU: this process %.2f cores (%.3f ms/txn), PostgreSQL backends %.2f cores (%.3f ms/txn), of %d cores\n",
			res.ProcessCPUCores, res.ProcessCPUMsTxn, res.PgBackendCPUCores, res.PgBackendCPUMsTxn, res.NumCPU)
	}
	line, jerr := json.Marshal(res)
	if jerr != nil {
		fmt.Fprintf(stderr, "%s: %v\n", prog, jerr)
		return 1
	}
	fmt.Fprintln(stdout, strings.TrimSpace(string(line)))
	if err != nil {
		fmt.Fprintf(stderr, "%s: %v\n", prog, err)
		return 1
	}
	return 0
}
