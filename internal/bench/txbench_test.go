package bench_test

import (
	"bytes"
	"context"
	"io"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/bench"
	"github.com/treatyhq/treaty/internal/pgtest"
)

type benchMain func(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int

// runBench runs a bench command in process and returns its exit code, stdout and stderr.
func runBench(t *testing.T, main benchMain, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := main(t.Context(), args, &stdout, &stderr, func(string) string { return "" })
	return code, stdout.String(), stderr.String()
}

// requireTxResult checks what both commands promise: a JSON last line with positive figures, no
// failures, and the throwaway database gone.
func requireTxResult(t *testing.T, db, out, benchName string, branches, participants float64) map[string]any {
	t.Helper()
	res := lastJSON(t, out)
	// Not window_txns_per_sec: on a loaded machine the first transactions of a 1s run (cold
	// pools and connections) may all answer after the window, which says nothing about the code.
	requirePositive(t, res, "txns_per_sec", "p50_ms", "p99_ms", "pg_commits_per_sec", "commits_per_txn",
		"ratio", "txns", "xact_commits", "tx_row_writes_per_txn")
	require.GreaterOrEqual(t, res["window_txns_per_sec"].(float64), 0.0)
	require.Equal(t, benchName, res["bench"])
	require.Equal(t, 0.0, res["failed"])
	require.Equal(t, branches, res["branches"])
	require.Equal(t, 4.0, res["concurrency"])
	require.Equal(t, participants, res["participants"])
	require.Equal(t, "in-process", res["coordinator"])
	require.LessOrEqual(t, res["p50_ms"].(float64), res["p99_ms"].(float64))
	// Every mode writes its transaction row at least when it is created, when the decision is
	// recorded and when the outcome is: less means the counters were read before PostgreSQL
	// published them.
	require.GreaterOrEqual(t, res["tx_row_writes_per_txn"].(float64), 3.0)
	name, _ := res["database"].(string)
	require.True(t, strings.HasPrefix(name, "treaty_bench_"), "database %q", name)
	require.False(t, databaseExists(t, db, name), "database %s was not dropped", name)
	return res
}

// TCC through the SDK, briefly: the initiator's own calls (BeginTCC, one RegisterTCCBranch per
// branch) each commit before they answer, so a transaction costs at least 1 + branches commits.
func TestTCCBenchInProcess(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	code, out, errOut := runBench(t, bench.TCCMain, "--db", db, "--concurrency", "4",
		"--duration", "1s", "--warmup", "200ms", "--baseline", "500ms")
	require.Equal(t, 0, code, "stderr:\n%s\nstdout:\n%s", errOut, out)
	res := requireTxResult(t, db, out, "tcc", 2, 2)
	require.GreaterOrEqual(t, res["commits_per_txn"].(float64), 3.0)
	require.Contains(t, out, "tcc bench: 2-branch transactions, concurrency 4")
}

// 2PC through the SDK, with more branches than participant servers.
func TestTwoPhaseBenchInProcess(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	coordAddr, partPort := freeAddr(t), freePort(t)
	code, out, errOut := runBench(t, bench.TwoPhaseMain, "--db", db, "--branches", "3", "--participants", "1",
		"--concurrency", "4", "--duration", "1s", "--warmup", "200ms", "--baseline", "500ms",
		"--listen", coordAddr, "--participant-port", strconv.Itoa(partPort), "--db-prefix", "treaty_bench_i13x_")
	require.Equal(t, 0, code, "stderr:\n%s\nstdout:\n%s", errOut, out)
	res := requireTxResult(t, db, out, "2pc", 3, 1)
	require.Equal(t, coordAddr, res["coordinator_addr"])
	require.Equal(t, []any{"127.0.0.1:" + strconv.Itoa(partPort)}, res["participant_addrs"])
	require.Regexp(t, `^treaty_bench_i13x_[0-9a-f]{12}$`, res["database"])
	require.Contains(t, out, "2pc bench: 3-branch transactions, concurrency 4")
}

// Flags are checked before anything starts, and errors name the command, the flag and its limit.
func TestTxBenchRejectsBadFlags(t *testing.T) {
	t.Parallel()
	for name, main := range map[string]benchMain{"tcc": bench.TCCMain, "2pc": bench.TwoPhaseMain} {
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"--branches", "2"}, "--db (or TREATY_DB) is required"},
			{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--branches", "0"}, "treaty-bench " + name + ": --branches is 0, must be within 1..64"},
			{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--branches", "65"}, "--branches is 65, must be within 1..64"},
			{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--concurrency", "-1"}, "--concurrency is -1, must be within 1..1024"},
			{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--branches", "2", "--participants", "3"}, "--participants is 3, must be within 1..2"},
			{[]string{"--db", "postgres://x@127.0.0.1:1", "--coordinator", "127.0.0.1:7600"}, "--db must name the coordinator's database"},
			{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--db-prefix", "a-b"}, `--db-prefix "a-b": byte 1 is '-'`},
			{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--participant-port", "-1"}, "--participant-port is -1"},
			{[]string{"--db", "postgres://x@127.0.0.1:1/db", "extra"}, `unexpected argument "extra"`},
			{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--duration", "0s"}, "--duration is 0s, must be positive"},
		} {
			code, out, errOut := runBench(t, main, tc.args...)
			require.NotEqual(t, 0, code, "%s %v", name, tc.args)
			require.Empty(t, out, "%s %v", name, tc.args)
			require.Contains(t, errOut, tc.want, "%s %v", name, tc.args)
		}
	}
}
