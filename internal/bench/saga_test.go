package bench_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/bench"
	"github.com/treatyhq/treaty/internal/pgtest"
)

func TestMain(m *testing.M) {
	bench.MaybeRunMemoryChild() // TestMemoryBench's coordinator is this test binary
	code := pgtest.WrapTestMain(m)
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/jackc/pgx/v5/pgxpool.(*Pool).backgroundHealthCheck")); err != nil {
			os.Stderr.WriteString("goleak: " + err.Error() + "\n")
			code = 1
		}
	}
	os.Exit(code)
}

// runSagaMain runs `treaty-bench saga` in process and returns its exit code, stdout and stderr.
func runSagaMain(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := bench.SagaMain(t.Context(), args, &stdout, &stderr, func(string) string { return "" })
	return code, stdout.String(), stderr.String()
}

// lastJSON parses the last line of out as the result object.
func lastJSON(t *testing.T, out string) map[string]any {
	t.Helper()
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var res map[string]any
	require.NoError(t, json.Unmarshal([]byte(lines[len(lines)-1]), &res), "last line: %s", lines[len(lines)-1])
	return res
}

// databaseExists reports whether the server behind url has a database called name.
func databaseExists(t *testing.T, url, name string) bool {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), url)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	var n int
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT count(*) FROM pg_database WHERE datname = $1`, name).Scan(&n))
	return n == 1
}

func requirePositive(t *testing.T, res map[string]any, fields ...string) {
	t.Helper()
	for _, f := range fields {
		v, ok := res[f].(float64)
		require.True(t, ok, "field %q missing or not a number in %v", f, res)
		require.Greater(t, v, 0.0, "field %q", f)
	}
}

// The bench in process, briefly: it prints one JSON object as its last line with the figures the
// issue asks for, all positive, and drops the database it created.
func TestSagaBenchInProcess(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	coordAddr, partPort := freeAddr(t), freePort(t)
	code, out, errOut := runSagaMain(t, "--db", db, "--steps", "3", "--participants", "1", "--concurrency", "4",
		"--duration", "2s", "--warmup", "200ms", "--baseline", "500ms",
		"--db-prefix", "treaty_bench_i13_", "--listen", coordAddr, "--participant-port", strconv.Itoa(partPort),
		"--statement-times")
	require.Equal(t, 0, code, "stderr:\n%s\nstdout:\n%s", errOut, out)
	res := lastJSON(t, out)
	requirePositive(t, res, "sagas_per_sec", "p50_ms", "p99_ms", "pg_commits_per_sec", "commits_per_saga",
		"ratio", "sagas", "xact_commits", "tx_row_writes_per_saga")
	require.Equal(t, 0.0, res["failed"])
	require.Equal(t, 3.0, res["steps"])
	require.Equal(t, 4.0, res["concurrency"])
	require.Equal(t, 1.0, res["participants"])
	require.Equal(t, "in-process", res["coordinator"])
	// The ports asked for are the ports used, so a run can sit beside other workloads.
	require.Equal(t, coordAddr, res["coordinator_addr"])
	require.Equal(t, []any{"127.0.0.1:" + strconv.Itoa(partPort)}, res["participant_addrs"])
	cpu := requireCPUSplit(t, res)
	require.Greater(t, cpu["postgresql"], 0.0, "the local server's backends are read from /proc")
	requirePositive(t, res, "alloc_kb_per_saga")
	// --statement-times: the creation statement runs once per saga (primed ones beside).
	stmts, _ := res["statements"].([]any)
	require.NotEmpty(t, stmts, "statements")
	var creates float64
	for _, x := range stmts {
		st := x.(map[string]any)
		if strings.Contains(st["sql"].(string), "INSERT INTO treaty_transactions") {
			creates += st["calls"].(float64)
		}
	}
	require.GreaterOrEqual(t, creates, res["sagas"].(float64), "statements %v", stmts)
	require.LessOrEqual(t, res["p50_ms"].(float64), res["p99_ms"].(float64))
	// A saga writes its transaction row at least twice (created; finished — with the default
	// --lazy-progress its forward steps may ride on the finish), in two group commits that at
	// most the 4 concurrent sagas share: anything less means the counters were read before
	// PostgreSQL published them.
	require.GreaterOrEqual(t, res["tx_row_writes_per_saga"].(float64), 2.0)
	require.GreaterOrEqual(t, res["commits_per_saga"].(float64), 0.5)
	name, _ := res["database"].(string)
	require.Regexp(t, `^treaty_bench_i13_[0-9a-f]{12}$`, name, "--db-prefix names the throwaway database")
	require.False(t, databaseExists(t, db, name), "database %s was not dropped", name)
}

// Against a coordinator that is already running: the sagas land in that coordinator's database,
// whose counters the bench reads, and the bench's own throwaway database is gone afterwards.
func TestSagaBenchExternalCoordinator(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	a, err := app.Start(t.Context(), app.Config{DB: db, Listen: "127.0.0.1:0", Migrate: true})
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, a.Stop(ctx))
	})
	// The coordinator runs in this test process, so its pid is ours: the coordinator's CPU comes
	// from /proc and covers the whole process.
	code, out, errOut := runSagaMain(t, "--db", db, "--coordinator", a.Addr, "--steps", "2", "--participants", "1",
		"--concurrency", "2", "--duration", "1s", "--warmup", "0", "--baseline", "300ms",
		"--coordinator-pid", strconv.Itoa(os.Getpid()))
	require.Equal(t, 0, code, "stderr:\n%s\nstdout:\n%s", errOut, out)
	res := lastJSON(t, out)
	requirePositive(t, res, "sagas_per_sec", "p50_ms", "p99_ms", "pg_commits_per_sec", "commits_per_saga", "ratio")
	require.Equal(t, a.Addr, res["coordinator"])
	cpu := requireCPUSplit(t, res)
	require.GreaterOrEqual(t, cpu["coordinator"], res["process_cpu_ms_per_saga"].(float64)*0.9,
		"the coordinator's process is this whole process, whose CPU includes the labeled roles")
	require.Equal(t, 1.0, res["participants"])
	require.Equal(t, bench.DatabaseName(db), res["database"])

	var stored int
	conn, err := pgx.Connect(t.Context(), db)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	require.NoError(t, conn.QueryRow(t.Context(), `SELECT count(*) FROM treaty_transactions WHERE status = 'succeeded'`).Scan(&stored))
	require.GreaterOrEqual(t, float64(stored), res["sagas"].(float64), "the sagas are in the coordinator's database")
}

// Flags are checked before anything starts, and errors name the flag and its limit.
func TestSagaBenchRejectsBadFlags(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--steps", "3"}, "--db (or TREATY_DB) is required"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--steps", "0"}, "--steps is 0, must be within 1..64"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--concurrency", "-1"}, "--concurrency is -1, must be within 1..1024"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--steps", "2", "--participants", "3"}, "--participants is 3, must be within 1..2"},
		{[]string{"--db", "postgres://x@127.0.0.1:1", "--coordinator", "127.0.0.1:7600"}, "--db must name the coordinator's database"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "extra"}, `unexpected argument "extra"`},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--duration", "0s"}, "--duration is 0s, must be positive"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--db-prefix", "Bench-"}, `--db-prefix "Bench-": byte 0 is 'B'`},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--db-prefix", strings.Repeat("a", 52)}, "is 52 bytes, must be 1..51"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--participant-port", "65535"}, "--participant-port is 65535, must be 0 (random) or within 1..65533"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--coordinator-pid", "1"}, "--coordinator-pid needs --coordinator"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--coordinator", "127.0.0.1:7600", "--statement-times"}, "--statement-times times the in-process coordinator's statements"},
	} {
		code, out, errOut := runSagaMain(t, tc.args...)
		require.NotEqual(t, 0, code, "args %v", tc.args)
		require.Empty(t, out, "args %v", tc.args)
		require.Contains(t, errOut, tc.want, "args %v", tc.args)
	}
}

func TestSummarize(t *testing.T) {
	t.Parallel()
	var ds []time.Duration
	for i := 100; i >= 1; i-- {
		ds = append(ds, time.Duration(i)*time.Millisecond)
	}
	l := bench.Summarize(ds)
	require.Equal(t, 100, l.N)
	require.Equal(t, 50*time.Millisecond, l.P50)
	require.Equal(t, 90*time.Millisecond, l.P90)
	require.Equal(t, 99*time.Millisecond, l.P99)
	require.Equal(t, 100*time.Millisecond, l.Max)
	require.Equal(t, 50500*time.Microsecond, l.Mean)
	require.Equal(t, bench.Latencies{}, bench.Summarize(nil))
	require.Equal(t, 1.5, bench.Millis(1500*time.Microsecond))
}

// requireCPUSplit checks cpu_ms_per_saga: every role is reported, the coordinator's share is
// positive, and the total is the sum of the parts.
func requireCPUSplit(t *testing.T, res map[string]any) map[string]float64 {
	t.Helper()
	raw, ok := res["cpu_ms_per_saga"].(map[string]any)
	require.True(t, ok, "cpu_ms_per_saga missing in %v", res)
	cpu := map[string]float64{}
	var sum float64
	for _, k := range []string{"coordinator", "participants", "clients", "runtime", "postgresql"} {
		v, ok := raw[k].(float64)
		require.True(t, ok, "cpu_ms_per_saga.%s missing in %v", k, raw)
		require.GreaterOrEqual(t, v, 0.0, k)
		cpu[k] = v
		sum += v
	}
	require.Greater(t, cpu["coordinator"], 0.0, "cpu_ms_per_saga %v", raw)
	require.InDelta(t, sum, raw["total"].(float64), 0.01, "cpu_ms_per_saga %v", raw)
	return cpu
}

// freeAddr returns a loopback address whose port was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())
	return addr
}

func freePort(t *testing.T) int {
	t.Helper()
	_, port, err := net.SplitHostPort(freeAddr(t))
	require.NoError(t, err)
	n, err := strconv.Atoi(port)
	require.NoError(t, err)
	return n
}

// `treaty-bench participant` serves the no-op participant on the address asked for, and the saga
// bench calls it there with --participant-addrs instead of starting its own.
func TestSagaBenchExternalParticipant(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	addr := freeAddr(t)
	ctx, cancel := context.WithCancel(t.Context())
	var pout, perr bytes.Buffer
	done := make(chan int, 1)
	go func() { done <- bench.ParticipantMain(ctx, []string{"--listen", addr}, &pout, &perr, nil) }()
	t.Cleanup(func() {
		cancel()
		require.Equal(t, 0, <-done, "participant stderr: %s", perr.String())
	})
	code, out, errOut := runSagaMain(t, "--db", db, "--steps", "2", "--participant-addrs", addr,
		"--concurrency", "2", "--duration", "1s", "--warmup", "0", "--baseline", "300ms")
	require.Equal(t, 0, code, "stderr:\n%s\nstdout:\n%s", errOut, out)
	res := lastJSON(t, out)
	requirePositive(t, res, "sagas_per_sec")
	require.Equal(t, 0.0, res["failed"])
	require.Equal(t, []any{addr}, res["participant_addrs"])
	require.Equal(t, 1.0, res["participants"])

	code, _, errOut = runSagaMain(t, "--db", db, "--steps", "2", "--participant-addrs", addr+","+addr+","+addr)
	require.Equal(t, 1, code)
	require.Contains(t, errOut, "--participant-addrs names 3 participant(s) for 2 step(s)")
}
