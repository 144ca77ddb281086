package participant_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	_ "modernc.org/sqlite" // the "sqlite" database/sql driver

	"github.com/treatyhq/treaty/sdk/participant"
)

// liteEnv is a SQLite file in a temporary directory with the barrier table and the ledger the
// business functions write to.
type liteEnv struct {
	db      *sql.DB
	barrier *participant.Barrier
}

// sqliteDSN opens path the way the package documentation recommends: a busy timeout, WAL, and
// BEGIN IMMEDIATE transactions.
func sqliteDSN(path string) string {
	return "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_txlock=immediate"
}

func setupSQLite(t *testing.T) *liteEnv {
	t.Helper()
	ctx := context.Background()
	db, err := sql.Open("sqlite", sqliteDSN(filepath.Join(t.TempDir(), "participant.db")))
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	b, err := participant.NewBarrier(participant.BarrierOptions{Dialect: participant.DialectSQLite})
	require.NoError(t, err)
	require.NoError(t, b.EnsureTableSQL(ctx, db))
	require.NoError(t, b.EnsureTableSQL(ctx, db), "creating the table is idempotent")
	_, err = db.ExecContext(ctx, `CREATE TABLE ledger (gid TEXT NOT NULL, branch TEXT NOT NULL, op TEXT NOT NULL)`)
	require.NoError(t, err)
	return &liteEnv{db: db, barrier: b}
}

func (e *liteEnv) count(t *testing.T, query string, args ...any) int {
	t.Helper()
	var n int
	require.NoError(t, e.db.QueryRowContext(context.Background(), query, args...).Scan(&n))
	return n
}

func (e *liteEnv) barrierRows(t *testing.T, gid, branch string) map[string]string {
	t.Helper()
	rows, err := e.db.QueryContext(context.Background(),
		"SELECT op, reason FROM treaty_barrier WHERE gid = $1 AND branch = $2", gid, branch)
	require.NoError(t, err)
	defer rows.Close()
	out := map[string]string{}
	for rows.Next() {
		var op, reason string
		require.NoError(t, rows.Scan(&op, &reason))
		out[op] = reason
	}
	require.NoError(t, rows.Err())
	return out
}

func (e *liteEnv) ledgerOps(t *testing.T, gid, branch string) []string {
	t.Helper()
	rows, err := e.db.QueryContext(context.Background(),
		"SELECT op FROM ledger WHERE gid = $1 AND branch = $2 ORDER BY op", gid, branch)
	require.NoError(t, err)
	defer rows.Close()
	var ops []string
	for rows.Next() {
		var op string
		require.NoError(t, rows.Scan(&op))
		ops = append(ops, op)
	}
	require.NoError(t, rows.Err())
	return ops
}

func sqlExec(tx *sql.Tx) execFunc {
	return func(ctx context.Context, q string, args ...any) (int64, error) {
		res, err := tx.ExecContext(ctx, q, args...)
		if err != nil {
			return 0, err
		}
		return res.RowsAffected()
	}
}

// liteFlavor is one way of calling a SQLite barrier: in the caller's transaction (CallSQL) or
// in one the barrier begins and commits (CallSQLDB).
type liteFlavor struct {
	name string
	call func(ctx context.Context, e *liteEnv, md participant.Metadata, work func(context.Context, execFunc) error) error
}

func liteFlavors() []liteFlavor {
	return []liteFlavor{
		{"sql", func(ctx context.Context, e *liteEnv, md participant.Metadata, work func(context.Context, execFunc) error) error {
			tx, err := e.db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			defer func() { _ = tx.Rollback() }()
			err = e.barrier.CallSQL(ctx, tx, md, func(ctx context.Context) error { return work(ctx, sqlExec(tx)) })
			// The caller commits whatever CallSQL left, even after an error: the savepoint must
			// already have undone a failed call's work and barrier row.
			if cerr := tx.Commit(); cerr != nil {
				return errors.Join(err, cerr)
			}
			return err
		}},
		{"sqldb", func(ctx context.Context, e *liteEnv, md participant.Metadata, work func(context.Context, execFunc) error) error {
			return e.barrier.CallSQLDB(ctx, e.db, md, func(ctx context.Context, tx *sql.Tx) error { return work(ctx, sqlExec(tx)) })
		}},
	}
}

func TestSQLiteBarrierRepeatedCallRunsOnce(t *testing.T) {
	t.Parallel()
	for _, f := range liteFlavors() {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			e := setupSQLite(t)
			ctx := context.Background()
			for _, p := range pairs() {
				gid := newGID()
				var runs atomic.Int32
				fwd := p.md(gid, p.forward)
				require.NoError(t, f.call(ctx, e, fwd, record(fwd, &runs)))
				require.NoError(t, f.call(ctx, e, fwd, record(fwd, &runs)), "a repeat reports the first call's success")
				require.EqualValues(t, 1, runs.Load())

				undo := p.md(gid, p.undo)
				require.NoError(t, f.call(ctx, e, undo, record(undo, &runs)))
				require.NoError(t, f.call(ctx, e, undo, record(undo, &runs)))
				require.EqualValues(t, 2, runs.Load(), "the undo ran once too")
				require.ElementsMatch(t, []string{p.forward, p.undo}, e.ledgerOps(t, gid, "b1"))
				require.Equal(t, map[string]string{p.forward: p.forward, p.undo: p.undo}, e.barrierRows(t, gid, "b1"))
			}
			for _, md := range []participant.Metadata{
				{GID: newGID(), Branch: "b1", Op: participant.OpConfirm, Mode: participant.ModeTCC},
				{GID: newGID(), Branch: "b1", Op: participant.OpCommit, Mode: participant.Mode2PC},
			} {
				var runs atomic.Int32
				require.NoError(t, f.call(ctx, e, md, record(md, &runs)))
				require.NoError(t, f.call(ctx, e, md, record(md, &runs)))
				require.EqualValues(t, 1, runs.Load(), md.Op)
			}
		})
	}
}

func TestSQLiteBarrierEmptyRollbackAndLateForwardCall(t *testing.T) {
	t.Parallel()
	for _, f := range liteFlavors() {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			e := setupSQLite(t)
			ctx := context.Background()
			for _, p := range pairs() {
				gid := newGID()
				var runs atomic.Int32
				undo, fwd := p.md(gid, p.undo), p.md(gid, p.forward)
				require.NoError(t, f.call(ctx, e, undo, record(undo, &runs)), "an undo before its forward call succeeds")
				require.NoError(t, f.call(ctx, e, undo, record(undo, &runs)))
				require.Zero(t, runs.Load(), "and changes nothing")
				require.Equal(t, map[string]string{p.forward: p.undo, p.undo: p.undo}, e.barrierRows(t, gid, "b1"),
					"it leaves a marker in the forward operation's place")
				for range 2 {
					err := f.call(ctx, e, fwd, record(fwd, &runs))
					require.ErrorIs(t, err, participant.ErrAborted)
					require.ErrorContains(t, err, fmt.Sprintf("its %s arrived first", p.undo))
					require.Equal(t, codes.Aborted, status.Code(participant.ToStatus(err)))
				}
				require.Zero(t, runs.Load(), "the late forward call reserves nothing")
				require.Empty(t, e.ledgerOps(t, gid, "b1"))
				require.Equal(t, map[string]string{p.forward: p.undo, p.undo: p.undo}, e.barrierRows(t, gid, "b1"))
			}
		})
	}
}

func TestSQLiteBarrierFailedCallLeavesNothing(t *testing.T) {
	t.Parallel()
	for _, f := range liteFlavors() {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			e := setupSQLite(t)
			ctx := context.Background()
			for _, p := range pairs() {
				gid := newGID()
				var runs atomic.Int32
				fail := func(md participant.Metadata, want error) func(context.Context, execFunc) error {
					return func(ctx context.Context, exec execFunc) error {
						require.NoError(t, record(md, &runs)(ctx, exec))
						return want
					}
				}
				fwd, undo := p.md(gid, p.forward), p.md(gid, p.undo)
				boom := errors.New("no seats left")
				err := f.call(ctx, e, fwd, fail(fwd, boom))
				require.True(t, err == boom, "fn's error comes back unchanged, got %v", err)
				require.Empty(t, e.ledgerOps(t, gid, "b1"), "fn's work is rolled back")
				require.Empty(t, e.barrierRows(t, gid, "b1"), "and so is the barrier row")

				require.NoError(t, f.call(ctx, e, fwd, record(fwd, &runs)), "a retry runs again")
				err = f.call(ctx, e, undo, fail(undo, boom))
				require.True(t, err == boom, "got %v", err)
				require.Equal(t, map[string]string{p.forward: p.forward}, e.barrierRows(t, gid, "b1"))
				require.NoError(t, f.call(ctx, e, undo, record(undo, &runs)))
				require.EqualValues(t, 4, runs.Load())
				require.ElementsMatch(t, []string{p.forward, p.undo}, e.ledgerOps(t, gid, "b1"))
			}
		})
	}
}

// The caller's transaction stays usable after a failed call under the barrier: its own earlier
// work commits, the failed call's does not.
func TestSQLiteBarrierCallerTransactionSurvivesFailure(t *testing.T) {
	t.Parallel()
	e := setupSQLite(t)
	ctx := context.Background()
	gid := newGID()
	tx, err := e.db.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback() }()
	_, err = tx.ExecContext(ctx, "INSERT INTO ledger (gid, branch, op) VALUES ($1, 'own', 'work')", gid)
	require.NoError(t, err)
	md := participant.Metadata{GID: gid, Branch: "b1", Op: participant.OpTry, Mode: participant.ModeTCC}
	boom := errors.New("sold out")
	err = e.barrier.CallSQL(ctx, tx, md, func(ctx context.Context) error {
		if _, err := tx.ExecContext(ctx, "INSERT INTO ledger (gid, branch, op) VALUES ($1, 'b1', 'try')", gid); err != nil {
			return err
		}
		return boom
	})
	require.ErrorIs(t, err, boom)
	require.NoError(t, tx.Commit())
	require.Equal(t, []string{"work"}, e.ledgerOps(t, gid, "own"))
	require.Empty(t, e.ledgerOps(t, gid, "b1"))
	require.Empty(t, e.barrierRows(t, gid, "b1"))
}

func TestSQLiteBarrierRejectsInvalidMetadata(t *testing.T) {
	t.Parallel()
	e := setupSQLite(t)
	for _, f := range liteFlavors() {
		var runs atomic.Int32
		md := participant.Metadata{Branch: "b1", Op: participant.OpTry, Mode: participant.ModeTCC}
		err := f.call(context.Background(), e, md, record(md, &runs))
		require.ErrorIs(t, err, participant.ErrInvalidMetadata, f.name)
		require.Zero(t, runs.Load())
	}
	require.Zero(t, e.count(t, "SELECT count(*) FROM treaty_barrier"), "nothing written")
}

// A call racing another for the same branch waits for the other's transaction (SQLite's write
// lock) and then decides from what it committed.
func TestSQLiteBarrierSerializesRacingCalls(t *testing.T) {
	t.Parallel()
	e := setupSQLite(t)
	ctx := context.Background()
	tcc := pair{participant.ModeTCC, participant.OpTry, participant.OpCancel}
	// hold runs md's call in a transaction it leaves open and returns what ends it.
	hold := func(md participant.Metadata) func(commit bool) {
		tx, err := e.db.BeginTx(ctx, nil)
		require.NoError(t, err)
		var runs atomic.Int32
		require.NoError(t, e.barrier.CallSQL(ctx, tx, md, func(ctx context.Context) error {
			return record(md, &runs)(ctx, sqlExec(tx))
		}))
		return func(commit bool) {
			if commit {
				require.NoError(t, tx.Commit())
			} else {
				require.NoError(t, tx.Rollback())
			}
		}
	}
	race := func(md participant.Metadata, runs *atomic.Int32) <-chan error {
		done := make(chan error, 1)
		started := make(chan struct{})
		go func() {
			close(started)
			done <- liteFlavors()[1].call(ctx, e, md, record(md, runs))
		}()
		<-started
		return done
	}

	t.Run("cancel behind a try that commits undoes it", func(t *testing.T) {
		gid := newGID()
		end := hold(tcc.md(gid, participant.OpTry))
		var runs atomic.Int32
		done := race(tcc.md(gid, participant.OpCancel), &runs)
		end(true)
		require.NoError(t, <-done)
		require.EqualValues(t, 1, runs.Load())
		require.ElementsMatch(t, []string{"try", "cancel"}, e.ledgerOps(t, gid, "b1"))
	})
	t.Run("cancel behind a try that rolls back is an empty rollback", func(t *testing.T) {
		gid := newGID()
		end := hold(tcc.md(gid, participant.OpTry))
		var runs atomic.Int32
		done := race(tcc.md(gid, participant.OpCancel), &runs)
		end(false)
		require.NoError(t, <-done)
		require.Zero(t, runs.Load())
		err := liteFlavors()[1].call(ctx, e, tcc.md(gid, participant.OpTry), record(tcc.md(gid, participant.OpTry), &runs))
		require.ErrorIs(t, err, participant.ErrAborted, "the try retried later is refused")
		require.Empty(t, e.ledgerOps(t, gid, "b1"))
	})
	t.Run("try behind a cancel that commits is refused", func(t *testing.T) {
		gid := newGID()
		end := hold(tcc.md(gid, participant.OpCancel))
		var runs atomic.Int32
		done := race(tcc.md(gid, participant.OpTry), &runs)
		end(true)
		require.ErrorIs(t, <-done, participant.ErrAborted)
		require.Zero(t, runs.Load())
		require.Empty(t, e.ledgerOps(t, gid, "b1"))
	})
}

// TestSQLiteBarrierConcurrentTryAndCancel fires the try and the cancel of 60 branches at once
// from several connections, in random order: each branch ends executed and compensated, or
// with a marker and the try refused; never with a reservation that nothing undoes.
func TestSQLiteBarrierConcurrentTryAndCancel(t *testing.T) {
	t.Parallel()
	e := setupSQLite(t)
	ctx := context.Background()
	_, err := e.db.ExecContext(ctx, `CREATE TABLE reservation (
		gid TEXT NOT NULL, branch TEXT NOT NULL, released INTEGER NOT NULL DEFAULT 0,
		PRIMARY KEY (gid, branch))`)
	require.NoError(t, err)
	sqldb := liteFlavors()[1]
	gid := newGID()
	const branches = 60
	try := func(ctx context.Context, exec execFunc) error {
		md, _ := participant.FromContext(ctx)
		_, err := exec(ctx, "INSERT INTO reservation (gid, branch) VALUES ($1, $2)", md.GID, md.Branch)
		return err
	}
	cancel := func(ctx context.Context, exec execFunc) error {
		md, _ := participant.FromContext(ctx)
		n, err := exec(ctx, "UPDATE reservation SET released = 1 WHERE gid = $1 AND branch = $2 AND released = 0", md.GID, md.Branch)
		if err == nil && n != 1 {
			err = fmt.Errorf("cancel of branch %s found %d reservations to release, want 1", md.Branch, n)
		}
		return err
	}
	type call struct {
		md   participant.Metadata
		work func(context.Context, execFunc) error
	}
	var calls []call
	for i := range branches {
		branch := fmt.Sprintf("b%03d", i)
		calls = append(calls,
			call{participant.Metadata{GID: gid, Branch: branch, Op: participant.OpTry, Mode: participant.ModeTCC}, try},
			call{participant.Metadata{GID: gid, Branch: branch, Op: participant.OpCancel, Mode: participant.ModeTCC}, cancel})
	}
	seed := rand.Uint64()
	t.Logf("shuffle seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, seed))
	rng.Shuffle(len(calls), func(i, j int) { calls[i], calls[j] = calls[j], calls[i] })

	results := make([]error, len(calls))
	var wg sync.WaitGroup
	for i, c := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			results[i] = sqldb.call(participant.NewContext(ctx, c.md), e, c.md, c.work)
		}()
	}
	wg.Wait()

	executed, refused := 0, 0
	for i, c := range calls {
		if c.md.Op == participant.OpCancel {
			require.NoError(t, results[i], "cancel of %s", c.md.Branch)
			continue
		}
		reserved := e.count(t, "SELECT count(*) FROM reservation WHERE gid = $1 AND branch = $2", gid, c.md.Branch) == 1
		switch err := results[i]; {
		case err == nil:
			executed++
			require.True(t, reserved, "branch %s", c.md.Branch)
			require.Equal(t, map[string]string{"try": "try", "cancel": "cancel"}, e.barrierRows(t, gid, c.md.Branch))
		case errors.Is(err, participant.ErrAborted):
			refused++
			require.False(t, reserved, "branch %s: a refused try reserves nothing", c.md.Branch)
			require.Equal(t, map[string]string{"try": "cancel", "cancel": "cancel"}, e.barrierRows(t, gid, c.md.Branch))
		default:
			require.NoError(t, err, "try of %s", c.md.Branch)
		}
	}
	require.Zero(t, e.count(t, "SELECT count(*) FROM reservation WHERE released = 0"), "no hanging reservation")
	require.Equal(t, branches, executed+refused)
	t.Logf("%d branches executed and compensated, %d refused after an empty rollback", executed, refused)
}

func TestSQLiteBarrierCleanup(t *testing.T) {
	t.Parallel()
	e := setupSQLite(t)
	ctx := context.Background()
	var runs atomic.Int32
	for i := range 5 {
		md := participant.Metadata{GID: fmt.Sprintf("g%d", i), Branch: "b1", Op: participant.OpAction, Mode: participant.ModeSaga}
		require.NoError(t, liteFlavors()[1].call(ctx, e, md, record(md, &runs)))
	}
	// Three rows are two hours old.
	_, err := e.db.ExecContext(ctx, "UPDATE treaty_barrier SET created_at = created_at - $1 WHERE gid IN ('g0', 'g1', 'g2')",
		(2 * time.Hour).Microseconds())
	require.NoError(t, err)
	n, err := e.barrier.CleanupSQL(ctx, e.db, time.Hour, 2)
	require.NoError(t, err)
	require.Equal(t, 3, n, "in batches of two")
	require.Equal(t, 2, e.count(t, "SELECT count(*) FROM treaty_barrier"))
}

func TestSQLiteBarrierOptions(t *testing.T) {
	t.Parallel()
	_, err := participant.NewBarrier(participant.BarrierOptions{Dialect: participant.DialectSQLite, Table: "app.barrier"})
	require.ErrorContains(t, err, "cannot be schema-qualified")
	_, err = participant.NewBarrier(participant.BarrierOptions{Dialect: participant.Dialect(7)})
	require.ErrorContains(t, err, "barrier dialect 7")
	require.Contains(t, participant.BarrierSchemaFor(participant.DialectSQLite, "flight_barrier"), `CREATE TABLE IF NOT EXISTS "flight_barrier"`)
	require.Equal(t, participant.BarrierSchema(""), participant.BarrierSchemaFor(participant.DialectPostgres, ""))

	b, err := participant.NewBarrier(participant.BarrierOptions{Dialect: participant.DialectSQLite})
	require.NoError(t, err)
	md := participant.Metadata{GID: "g", Branch: "b", Op: participant.OpTry, Mode: participant.ModeTCC}
	err = b.CallPgx(context.Background(), nil, md, func(context.Context) error { return nil })
	require.ErrorContains(t, err, "needs DialectPostgres")
	err = b.EnsureTable(context.Background(), nil)
	require.ErrorContains(t, err, "needs DialectPostgres")
}
