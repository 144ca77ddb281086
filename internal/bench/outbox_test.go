package bench_test

import (
	"bytes"
	"strconv"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/bench"
	"github.com/treatyhq/treaty/internal/pgtest"
)

func runOutboxMain(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := bench.OutboxMain(t.Context(), args, &stdout, &stderr, func(string) string { return "" })
	return code, stdout.String(), stderr.String()
}

// A small outbox run on the ports and database name asked for: every message relayed once, the
// enqueue phase and the drain after it reported apart, the CPU split by role, and the throwaway
// database gone afterwards.
func TestOutboxBenchPhasesAndPorts(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	port := freePort(t)
	code, out, errOut := runOutboxMain(t, "--db", db, "--messages", "3000", "--keys", "50", "--relays", "1",
		"--producers", "4", "--baseline", "300ms", "--timeout", "2m",
		"--db-prefix", "treaty_bench_i13o_", "--kafka-port", strconv.Itoa(port))
	require.Equal(t, 0, code, "stderr:\n%s\nstdout:\n%s", errOut, out)
	res := lastJSON(t, out)
	require.Equal(t, 0.0, res["duplicates"])
	requirePositive(t, res, "msgs_per_sec", "enqueue_msgs_per_sec", "enqueue_s", "pg_insert_commits_per_sec")
	require.Equal(t, []any{"127.0.0.1:" + strconv.Itoa(port)}, res["brokers"], "--kafka-port is the broker's port")
	name, _ := res["database"].(string)
	require.Regexp(t, `^treaty_bench_i13o_[0-9a-f]{12}$`, name)
	require.False(t, databaseExists(t, db, name), "database %s was not dropped", name)
	drained := res["drained_after_enqueue"].(float64)
	require.GreaterOrEqual(t, drained, 0.0)
	require.LessOrEqual(t, drained, 3000.0)
	cpu, ok := res["cpu_ms_per_1000_msgs"].(map[string]any)
	require.True(t, ok, "cpu_ms_per_1000_msgs missing in %v", res)
	for _, k := range []string{"relays", "producers", "broker", "runtime", "postgresql"} {
		_, ok := cpu[k].(float64)
		require.True(t, ok, "cpu_ms_per_1000_msgs.%s missing in %v", k, cpu)
	}
	require.Greater(t, cpu["relays"].(float64)+cpu["producers"].(float64)+cpu["broker"].(float64), 0.0, "%v", cpu)

	// With --preload the relays start after the enqueue: everything drains after it.
	code, out, errOut = runOutboxMain(t, "--db", db, "--messages", "2000", "--keys", "50", "--producers", "4",
		"--baseline", "300ms", "--timeout", "2m", "--preload")
	require.Equal(t, 0, code, "stderr:\n%s\nstdout:\n%s", errOut, out)
	res = lastJSON(t, out)
	require.Equal(t, 2000.0, res["drained_after_enqueue"])
	requirePositive(t, res, "drain_msgs_per_sec", "drain_after_enqueue_s")
}

func TestOutboxBenchRejectsBadFlags(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--db-prefix", "9x"}, `--db-prefix "9x": byte 0 is '9'`},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--kafka-port", "70000"}, "--kafka-port is 70000, must be 0 (random) or within 1..65535"},
		{[]string{"--db", "postgres://x@127.0.0.1:1/db", "--kafka-port", "9092", "--brokers", "k:9092"}, "cannot go with --brokers"},
	} {
		code, out, errOut := runOutboxMain(t, tc.args...)
		require.NotEqual(t, 0, code, "args %v", tc.args)
		require.Empty(t, out, "args %v", tc.args)
		require.Contains(t, errOut, tc.want, "args %v", tc.args)
	}
}
