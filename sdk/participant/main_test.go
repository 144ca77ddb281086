package participant_test

import (
	"context"
	"database/sql"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/sdk/participant"
)

func TestMain(m *testing.M) {
	code := pgtest.WrapTestMain(m)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// env is a fresh database with the default barrier table and a ledger the tests' business
// functions write to, reachable through pgx and database/sql.
type env struct {
	url     string
	pool    *pgxpool.Pool
	db      *sql.DB
	barrier *participant.Barrier
}

func setup(t *testing.T) *env {
	t.Helper()
	ctx := context.Background()
	url := pgtest.NewDatabase(t)
	cfg, err := pgxpool.ParseConfig(url)
	require.NoError(t, err)
	cfg.MaxConns = 12
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	db := stdlib.OpenDBFromPool(pool)
	t.Cleanup(func() { _ = db.Close() })

	b, err := participant.NewBarrier(participant.BarrierOptions{})
	require.NoError(t, err)
	require.NoError(t, b.EnsureTable(ctx, pool))
	_, err = pool.Exec(ctx, `CREATE TABLE ledger (gid text NOT NULL, branch text NOT NULL, op text NOT NULL)`)
	require.NoError(t, err)
	return &env{url: url, pool: pool, db: db, barrier: b}
}

// count runs a count(*) query.
func (e *env) count(t *testing.T, query string, args ...any) int {
	t.Helper()
	var n int
	require.NoError(t, e.pool.QueryRow(context.Background(), query, args...).Scan(&n))
	return n
}

// barrierRows returns op -> reason of the barrier rows of one branch.
func (e *env) barrierRows(t *testing.T, gid, branch string) map[string]string {
	t.Helper()
	rows, err := e.pool.Query(context.Background(),
		"SELECT op, reason FROM treaty_barrier WHERE gid = $1 AND branch = $2", gid, branch)
	require.NoError(t, err)
	out := map[string]string{}
	var op, reason string
	_, err = pgx.ForEachRow(rows, []any{&op, &reason}, func() error { out[op] = reason; return nil })
	require.NoError(t, err)
	return out
}

// ledgerOps lists the business effects recorded for one branch.
func (e *env) ledgerOps(t *testing.T, gid, branch string) []string {
	t.Helper()
	rows, err := e.pool.Query(context.Background(),
		"SELECT op FROM ledger WHERE gid = $1 AND branch = $2 ORDER BY op", gid, branch)
	require.NoError(t, err)
	ops, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return ops
}

// waitLockWaiters polls until n backends of this database wait for a lock, or fails after a
// deadline: how a test knows a concurrent call is blocked on the barrier's unique key.
func (e *env) waitLockWaiters(t *testing.T, n int) {
	t.Helper()
	waitFor(t, 10*time.Second, func() bool {
		return e.count(t, `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND wait_event_type = 'Lock'`) >= n
	}, "a call blocked on a lock")
}

func waitFor(t *testing.T, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		<-tick.C
	}
}

func newGID() string { return "g-" + uuid.NewString() }

// exampleTB lets Example functions, which get no *testing.T, use pgtest: it runs the cleanups
// when the example is done and turns a failure into a panic, which fails the example. pgtest
// calls only the methods below; the embedded nil TB is there to satisfy the interface.
type exampleTB struct {
	testing.TB
	cleanups []func()
}

func (e *exampleTB) Helper()                         {}
func (e *exampleTB) Name() string                    { return "example" }
func (e *exampleTB) Cleanup(f func())                { e.cleanups = append(e.cleanups, f) }
func (e *exampleTB) Logf(format string, args ...any) {}
func (e *exampleTB) Errorf(format string, args ...any) {
	panic(fmt.Sprintf(format, args...))
}
func (e *exampleTB) Fatalf(format string, args ...any) { panic(fmt.Sprintf(format, args...)) }
func (e *exampleTB) Skipf(format string, args ...any)  { panic(fmt.Sprintf(format, args...)) }

func (e *exampleTB) done() {
	for i := len(e.cleanups) - 1; i >= 0; i-- {
		e.cleanups[i]()
	}
}

// exampleDatabase returns the URL of a fresh database and a function that drops it, after
// rolling back any prepared transaction a failed example left behind.
func exampleDatabase() (url string, done func()) {
	tb := &exampleTB{}
	url = pgtest.NewDatabase(tb)
	tb.Cleanup(func() {
		if err := rollbackPrepared(url); err != nil {
			panic(err)
		}
	})
	return url, tb.done
}
