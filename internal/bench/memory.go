package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/gctune"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// memoryChildEnv, when set in the environment, makes this executable the measured coordinator
// of a memory bench (see MaybeRunMemoryChild): its memory must be its own, not the clients'.
const memoryChildEnv = "TREATY_BENCH_MEMORY_CHILD_DB"

// MemoryConfig configures the memory bench.
type MemoryConfig struct {
	// DB names the PostgreSQL server; the run creates and drops treaty_bench_<random>.
	DB string
	// PayloadBytes is the action payload of every step; default 64 KiB.
	PayloadBytes int
	// Steps per saga; default 4.
	Steps int
	// Concurrency is the number of sagas held active at once; default 64.
	Concurrency int
	// Keep leaves the database in place.
	Keep   bool
	Logger *slog.Logger
}

// MemoryResult is the memory bench's output: the coordinator's resident memory with
// Concurrency transactions active, each holding Steps x PayloadBytes of payloads.
type MemoryResult struct {
	Bench        string `json:"bench"`
	PayloadBytes int    `json:"payload_bytes"`
	Steps        int    `json:"steps"`
	Concurrency  int    `json:"concurrency"`
	// PayloadBytesPerTx is Steps x PayloadBytes: what one transaction carries.
	PayloadBytesPerTx int64 `json:"payload_bytes_per_tx"`
	// BaselineRSS is the coordinator's resident memory once started and warmed, before the load.
	BaselineRSS int64 `json:"baseline_rss_bytes"`
	// ActiveRSS is its resident memory with every transaction active (the largest of a few
	// samples); PeakRSS its peak over the whole run (VmHWM), receiving included.
	ActiveRSS int64 `json:"active_rss_bytes"`
	PeakRSS   int64 `json:"peak_rss_bytes"`
	// BytesPerActiveTx is (ActiveRSS - BaselineRSS) / Concurrency; Overhead divides it by
	// PayloadBytesPerTx (1.0 would be one copy of the payloads and nothing else).
	BytesPerActiveTx int64   `json:"bytes_per_active_tx"`
	Overhead         float64 `json:"overhead"`
	// BaselineHeap and ActiveHeap are the coordinator's live Go heap after a collection, at rest
	// and with every transaction active; HeapPerActiveTx and HeapOverhead are the figures above
	// for the heap: what the coordinator keeps, as against what the runtime has not yet given
	// back to the system (RSS also holds garbage of receiving and decoding, up to GOGC).
	BaselineHeap    int64   `json:"baseline_heap_bytes"`
	ActiveHeap      int64   `json:"active_heap_bytes"`
	HeapPerActiveTx int64   `json:"heap_per_active_tx"`
	HeapOverhead    float64 `json:"heap_overhead"`
	// ActivePayloadBytes is what the coordinator's budget counts (treaty_active_payload_bytes).
	ActivePayloadBytes int64 `json:"active_payload_bytes"`
}

// MaybeRunMemoryChild runs the measured coordinator and exits when this process was started as
// one; it returns at once otherwise. Call it first in main (and in TestMain).
func MaybeRunMemoryChild() {
	db := os.Getenv(memoryChildEnv)
	if db == "" {
		return
	}
	payload, _ := strconv.Atoi(os.Getenv(memoryChildEnv + "_PAYLOAD"))
	// Collect garbage as `coordinator serve` does by default (GOGC/GOMEMLIMIT still win).
	gctune.Apply(os.Getenv, gctune.Config{MaxActiveBytes: engine.DefaultMaxActiveBytes})
	a, err := app.Start(context.Background(), app.Config{DB: db, Listen: "127.0.0.1:0", Migrate: true,
		MaxRequestBytes: app.MaxRequestBytesCeiling,
		Engine:          engine.Config{MaxActiveBytes: 1 << 40, Limits: engine.Limits{MaxPayloadBytes: max(payload, engine.DefaultMaxPayloadBytes)}}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "memory bench coordinator:", err)
		os.Exit(1)
	}
	fmt.Printf("READY %s\n", a.Addr)
	// Each line on stdin asks for the live heap after a collection; EOF stops the coordinator.
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		// Two collections: the first moves what sync.Pools hold (gRPC's and pgx's buffers) to
		// their victim caches, which are still heap; the second frees them. With one, the
		// figure depended on how many collections the run had happened to do before (fewer
		// with --gc-percent 400).
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Printf("HEAP %d\n", ms.HeapAlloc)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = a.Stop(ctx)
	os.Exit(0)
}

// procKiB reads "Name: N kB" from /proc/PID/status, in bytes.
func procKiB(pid int, name string) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, name+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n << 10, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", name, pid)
}

// RunMemory starts a coordinator in a child process, holds Concurrency sagas active (their first
// call blocked in the participant) and reads the child's resident memory from /proc.
func RunMemory(ctx context.Context, cfg MemoryConfig) (MemoryResult, error) {
	if cfg.PayloadBytes == 0 {
		cfg.PayloadBytes = 64 << 10
	}
	if cfg.Steps == 0 {
		cfg.Steps = 4
	}
	if cfg.Concurrency == 0 {
		cfg.Concurrency = 64
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	res := MemoryResult{Bench: "memory", PayloadBytes: cfg.PayloadBytes, Steps: cfg.Steps, Concurrency: cfg.Concurrency,
		PayloadBytesPerTx: int64(cfg.Steps) * int64(cfg.PayloadBytes)}
	if cfg.DB == "" {
		return res, errors.New("--db is required")
	}
	if req := res.PayloadBytesPerTx + 64<<10; req > app.MaxRequestBytesCeiling {
		return res, fmt.Errorf("--steps x --payload-bytes is %d bytes; a request holds at most %d", res.PayloadBytesPerTx, app.MaxRequestBytesCeiling)
	}
	tmp, err := CreateTempDatabase(ctx, cfg.DB, "treaty_bench_")
	if err != nil {
		return res, err
	}
	if !cfg.Keep {
		defer func() { _ = tmp.Drop(context.WithoutCancel(ctx)) }()
	}

	release := make(chan struct{})
	var blocked atomic.Int64
	part, err := testparticipant.Start(testparticipant.Options{NoRecord: true, Script: func(ctx context.Context, c testparticipant.Call) error {
		if c.Op == "action" && strings.HasPrefix(c.GID, "mem-") {
			blocked.Add(1)
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil
	}})
	if err != nil {
		return res, err
	}
	defer part.Stop()
	releaseOnce := sync.OnceFunc(func() { close(release) })
	defer releaseOnce()

	self, err := os.Executable()
	if err != nil {
		return res, err
	}
	child := exec.CommandContext(ctx, self)
	child.Env = append(os.Environ(), memoryChildEnv+"="+tmp.URL, memoryChildEnv+"_PAYLOAD="+strconv.Itoa(cfg.PayloadBytes))
	stdin, err := child.StdinPipe()
	if err != nil {
		return res, err
	}
	stdout, err := child.StdoutPipe()
	if err != nil {
		return res, err
	}
	child.Stderr = os.Stderr
	if err := child.Start(); err != nil {
		return res, err
	}
	defer func() { _ = stdin.Close(); _ = child.Wait() }()
	out := bufio.NewReader(stdout)
	line, err := out.ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "READY ")
	if err != nil || !ok {
		return res, fmt.Errorf("coordinator did not start: %q %v", line, err)
	}
	pid := child.Process.Pid
	heap := func() (int64, error) {
		if _, err := io.WriteString(stdin, "heap\n"); err != nil {
			return 0, err
		}
		line, err := out.ReadString('\n')
		v, ok := strings.CutPrefix(strings.TrimSpace(line), "HEAP ")
		if err != nil || !ok {
			return 0, fmt.Errorf("coordinator heap: %q %v", line, err)
		}
		return strconv.ParseInt(v, 10, 64)
	}

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(app.MaxRequestBytesCeiling)))
	if err != nil {
		return res, err
	}
	defer conn.Close()
	client := treatyv1.NewCoordinatorClient(conn)
	target := part.Target("bench.Svc/Do")
	spec := func(payload int) *treatyv1.SagaSpec {
		s := &treatyv1.SagaSpec{}
		for i := range cfg.Steps {
			s.Steps = append(s.Steps, &treatyv1.SagaStep{Name: fmt.Sprintf("s%d", i),
				Action: &treatyv1.Call{Target: target, Payload: make([]byte, payload)}, Compensate: &treatyv1.Call{Target: target}})
		}
		return s
	}
	// Warm up: connections, pools, the first saga's allocations.
	for i := range 3 {
		if _, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: fmt.Sprintf("warm-%d", i), Saga: spec(16), Wait: durationpb.New(30 * time.Second)}); err != nil {
			return res, fmt.Errorf("warm-up saga: %w", err)
		}
	}
	time.Sleep(2 * time.Second) // let the runtime return warm-up garbage before the baseline
	if res.BaselineRSS, err = procKiB(pid, "VmRSS"); err != nil {
		return res, err
	}
	if res.BaselineHeap, err = heap(); err != nil {
		return res, err
	}
	cfg.Logger.Info("baseline", "rss_mib", res.BaselineRSS>>20)

	one := spec(cfg.PayloadBytes)
	var wg sync.WaitGroup
	errs := make(chan error, cfg.Concurrency)
	for i := range cfg.Concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: fmt.Sprintf("mem-%d", i), Saga: one}); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		return res, fmt.Errorf("submit: %w", err)
	}
	for blocked.Load() < int64(cfg.Concurrency) {
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
		time.Sleep(50 * time.Millisecond)
	}
	// A few samples once everything is held: garbage from receiving may still be collected.
	time.Sleep(2 * time.Second)
	for range 5 {
		rss, err := procKiB(pid, "VmRSS")
		if err != nil {
			return res, err
		}
		res.ActiveRSS = max(res.ActiveRSS, rss)
		time.Sleep(200 * time.Millisecond)
	}
	if res.PeakRSS, err = procKiB(pid, "VmHWM"); err != nil {
		return res, err
	}
	if res.ActiveHeap, err = heap(); err != nil {
		return res, err
	}
	res.HeapPerActiveTx = (res.ActiveHeap - res.BaselineHeap) / int64(cfg.Concurrency)
	res.HeapOverhead = Round3(float64(res.HeapPerActiveTx) / float64(res.PayloadBytesPerTx))
	res.ActivePayloadBytes = res.PayloadBytesPerTx * int64(cfg.Concurrency)
	res.BytesPerActiveTx = (res.ActiveRSS - res.BaselineRSS) / int64(cfg.Concurrency)
	res.Overhead = Round3(float64(res.BytesPerActiveTx) / float64(res.PayloadBytesPerTx))
	releaseOnce()
	return res, nil
}

const memoryUsage = `treaty-bench memory: the coordinator's resident memory per active transaction.

Starts a coordinator in a child process on a throwaway database, warms it up, then holds
--concurrency sagas active at once (each has --steps steps with an action payload of
--payload-bytes; the first call of each waits in the participant) and reads the child's VmRSS and
VmHWM from /proc. Prints bytes per active transaction and their ratio to the payload bytes it
carries. Linux only.

Flags:`

// MemoryMain is the memory command of treaty-bench.
func MemoryMain(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	var cfg MemoryConfig
	fs := flag.NewFlagSet("memory", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, memoryUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.DB, "db", getenv("TREATY_DB"), "PostgreSQL URL (or TREATY_DB); the role needs CREATEDB")
	fs.IntVar(&cfg.PayloadBytes, "payload-bytes", 64<<10, "action payload of every step")
	fs.IntVar(&cfg.Steps, "steps", 4, "steps per saga")
	fs.IntVar(&cfg.Concurrency, "concurrency", 64, "sagas held active at once")
	fs.BoolVar(&cfg.Keep, "keep", false, "keep the treaty_bench_* database")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	switch {
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "treaty-bench memory: unexpected argument %q (flags start with --)\n", fs.Arg(0))
		return 2
	case cfg.PayloadBytes < 1:
		fmt.Fprintln(stderr, "treaty-bench memory: --payload-bytes must be at least 1")
		return 2
	case cfg.Steps < 1 || cfg.Steps > engine.DefaultMaxSteps:
		fmt.Fprintf(stderr, "treaty-bench memory: --steps is %d, must be within 1..%d\n", cfg.Steps, engine.DefaultMaxSteps)
		return 2
	case cfg.Concurrency < 1 || cfg.Concurrency > 10000:
		fmt.Fprintf(stderr, "treaty-bench memory: --concurrency is %d, must be within 1..10000\n", cfg.Concurrency)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	res, err := RunMemory(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "treaty-bench memory: %v\n", err)
		return 1
	}
	fmt.Fprintf(stdout, "memory bench: %d active sagas of %d steps x %d payload bytes (%d bytes each)\n",
		res.Concurrency, res.Steps, res.PayloadBytes, res.PayloadBytesPerTx)
	fmt.Fprintf(stdout, "  coordinator RSS %.1f MiB at rest, %.1f MiB with them active, peak %.1f MiB; %d bytes per active transaction (%.2fx its payloads)\n",
		float64(res.BaselineRSS)/(1<<20), float64(res.ActiveRSS)/(1<<20), float64(res.PeakRSS)/(1<<20), res.BytesPerActiveTx, res.Overhead)
	fmt.Fprintf(stdout, "  live heap %.1f MiB at rest, %.1f MiB with them active; %d bytes per active transaction (%.2fx its payloads)\n",
		float64(res.BaselineHeap)/(1<<20), float64(res.ActiveHeap)/(1<<20), res.HeapPerActiveTx, res.HeapOverhead)
	line, err := json.Marshal(res)
	if err != nil {
		fmt.Fprintf(stderr, "treaty-bench memory: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, string(line))
	return 0
}
