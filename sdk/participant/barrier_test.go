package participant_test

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/sdk/participant"
)

// execFunc runs a statement in the barrier's transaction and returns the rows it affected.
type execFunc func(ctx context.Context, query string, args ...any) (int64, error)

// flavor is one way of calling the barrier. Every guarantee is tested through each of them.
type flavor struct {
	name string
	call func(ctx context.Context, e *env, md participant.Metadata, work func(ctx context.Context, exec execFunc) error) error
}

func flavors() []flavor {
	return []flavor{
		{"pgx", func(ctx context.Context, e *env, md participant.Metadata, work func(context.Context, execFunc) error) error {
			tx, err := e.pool.Begin(ctx)
			if err != nil {
				return err
			}
			defer func() { _ = tx.Rollback(ctx) }()
			err = e.barrier.CallPgx(ctx, tx, md, func(ctx context.Context) error { return work(ctx, pgxExec(tx)) })
			// The caller commits whatever CallPgx left, even after an error: the savepoint must
			// already have undone a failed call's work and barrier row.
			if cerr := tx.Commit(ctx); cerr != nil {
				return errors.Join(err, cerr)
			}
			return err
		}},
		{"sql", func(ctx context.Context, e *env, md participant.Metadata, work func(context.Context, execFunc) error) error {
			tx, err := e.db.BeginTx(ctx, nil)
			if err != nil {
				return err
			}
			defer func() { _ = tx.Rollback() }()
			err = e.barrier.CallSQL(ctx, tx, md, func(ctx context.Context) error {
				return work(ctx, func(ctx context.Context, q string, args ...any) (int64, error) {
					res, err := tx.ExecContext(ctx, q, args...)
					if err != nil {
						return 0, err
					}
					return res.RowsAffected()
				})
			})
			if cerr := tx.Commit(); cerr != nil {
				return errors.Join(err, cerr)
			}
			return err
		}},
		{"pgxdb", func(ctx context.Context, e *env, md participant.Metadata, work func(context.Context, execFunc) error) error {
			return e.barrier.CallPgxDB(ctx, e.pool, md, func(ctx context.Context, tx pgx.Tx) error { return work(ctx, pgxExec(tx)) })
		}},
		{"sqldb", func(ctx context.Context, e *env, md participant.Metadata, work func(context.Context, execFunc) error) error {
			return e.barrier.CallSQLDB(ctx, e.db, md, func(ctx context.Context, tx *sql.Tx) error {
				return work(ctx, func(ctx context.Context, q string, args ...any) (int64, error) {
					res, err := tx.ExecContext(ctx, q, args...)
					if err != nil {
						return 0, err
					}
					return res.RowsAffected()
				})
			})
		}},
	}
}

func pgxExec(tx pgx.Tx) execFunc {
	return func(ctx context.Context, q string, args ...any) (int64, error) {
		tag, err := tx.Exec(ctx, q, args...)
		return tag.RowsAffected(), err
	}
}

// record is a business function that writes one ledger row and counts its runs.
func record(md participant.Metadata, runs *atomic.Int32) func(ctx context.Context, exec execFunc) error {
	return func(ctx context.Context, exec execFunc) error {
		runs.Add(1)
		_, err := exec(ctx, "INSERT INTO ledger (gid, branch, op) VALUES ($1, $2, $3)", md.GID, md.Branch, md.Op)
		return err
	}
}

// pair is a forward operation and its undo in one mode.
type pair struct{ mode, forward, undo string }

func pairs() []pair {
	return []pair{
		{participant.ModeSaga, participant.OpAction, participant.OpCompensate},
		{participant.ModeTCC, participant.OpTry, participant.OpCancel},
		{participant.Mode2PC, participant.OpPrepare, participant.OpRollback},
	}
}

func (p pair) md(gid, op string) participant.Metadata {
	return participant.Metadata{GID: gid, Branch: "b1", Op: op, Mode: p.mode}
}

func TestBarrierRepeatedCallRunsOnce(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, f := range flavors() {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
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
			// Forward operations without an undo are idempotent too.
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

func TestBarrierEmptyRollback(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, f := range flavors() {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			for _, p := range pairs() {
				gid := newGID()
				var runs atomic.Int32
				undo := p.md(gid, p.undo)
				require.NoError(t, f.call(ctx, e, undo, record(undo, &runs)), "an undo before its forward call succeeds")
				require.NoError(t, f.call(ctx, e, undo, record(undo, &runs)))
				require.Zero(t, runs.Load(), "and changes nothing")
				require.Empty(t, e.ledgerOps(t, gid, "b1"))
				require.Equal(t, map[string]string{p.forward: p.undo, p.undo: p.undo}, e.barrierRows(t, gid, "b1"),
					"it leaves a marker in the forward operation's place")
			}
		})
	}
}

func TestBarrierRefusesForwardCallAfterItsUndo(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, f := range flavors() {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			for _, p := range pairs() {
				gid := newGID()
				var runs atomic.Int32
				undo, fwd := p.md(gid, p.undo), p.md(gid, p.forward)
				require.NoError(t, f.call(ctx, e, undo, record(undo, &runs)))
				for range 2 {
					err := f.call(ctx, e, fwd, record(fwd, &runs))
					require.ErrorIs(t, err, participant.ErrAborted)
					require.ErrorContains(t, err, fmt.Sprintf("its %s arrived first", p.undo))
					require.Equal(t, codes.Aborted, status.Code(participant.ToStatus(err)))
					require.Equal(t, codes.Aborted, status.Code(err), "gRPC sees ABORTED even without ToStatus")
				}
				require.Zero(t, runs.Load(), "no reservation is made")
				require.Empty(t, e.ledgerOps(t, gid, "b1"))
				require.Equal(t, map[string]string{p.forward: p.undo, p.undo: p.undo}, e.barrierRows(t, gid, "b1"))
			}
		})
	}
}

func TestBarrierFailedCallLeavesNothing(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, f := range flavors() {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
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

func TestBarrierRejectsInvalidMetadata(t *testing.T) {
	t.Parallel()
	e := setup(t)
	for _, f := range flavors() {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			var runs atomic.Int32
			md := participant.Metadata{Branch: "b1", Op: participant.OpTry, Mode: participant.ModeTCC}
			err := f.call(context.Background(), e, md, record(md, &runs))
			require.ErrorIs(t, err, participant.ErrInvalidMetadata)
			require.ErrorContains(t, err, "gid is empty")
			require.Equal(t, codes.InvalidArgument, status.Code(participant.ToStatus(err)))
			require.Zero(t, runs.Load())
		})
	}
	require.Zero(t, e.count(t, "SELECT count(*) FROM treaty_barrier"), "nothing written")
}

// hold runs md's call in a transaction it leaves open, as a slow participant would, and
// returns the function that ends it.
type holdFunc func(t *testing.T, e *env, md participant.Metadata) (end func(commit bool))

func holders() map[string]holdFunc {
	return map[string]holdFunc{
		"pgx": func(t *testing.T, e *env, md participant.Metadata) func(bool) {
			ctx := context.Background()
			tx, err := e.pool.Begin(ctx)
			require.NoError(t, err)
			var runs atomic.Int32
			require.NoError(t, e.barrier.CallPgx(ctx, tx, md, func(ctx context.Context) error {
				return record(md, &runs)(ctx, pgxExec(tx))
			}))
			return func(commit bool) {
				if commit {
					require.NoError(t, tx.Commit(ctx))
				} else {
					require.NoError(t, tx.Rollback(ctx))
				}
			}
		},
		"sql": func(t *testing.T, e *env, md participant.Metadata) func(bool) {
			ctx := context.Background()
			tx, err := e.db.BeginTx(ctx, nil)
			require.NoError(t, err)
			var runs atomic.Int32
			require.NoError(t, e.barrier.CallSQL(ctx, tx, md, func(ctx context.Context) error {
				return record(md, &runs)(ctx, func(ctx context.Context, q string, args ...any) (int64, error) {
					res, err := tx.ExecContext(ctx, q, args...)
					if err != nil {
						return 0, err
					}
					return res.RowsAffected()
				})
			}))
			return func(commit bool) {
				if commit {
					require.NoError(t, tx.Commit())
				} else {
					require.NoError(t, tx.Rollback())
				}
			}
		},
	}
}

// TestBarrierSerializesRacingCalls holds one call's transaction open, starts the racing call,
// waits until the database shows it blocked on the barrier's unique key, then ends the first.
func TestBarrierSerializesRacingCalls(t *testing.T) {
	t.Parallel()
	for name, hold := range holders() {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := setup(t) // a database each: waitLockWaiters counts this database's waiters
			db := flavors()[2]
			if name == "sql" {
				db = flavors()[3]
			}
			ctx := context.Background()
			race := func(md participant.Metadata, runs *atomic.Int32) <-chan error {
				done := make(chan error, 1)
				go func() { done <- db.call(ctx, e, md, record(md, runs)) }()
				e.waitLockWaiters(t, 1)
				return done
			}
			tcc := pair{participant.ModeTCC, participant.OpTry, participant.OpCancel}

			t.Run("cancel waits for a try that commits, then undoes it", func(t *testing.T) {
				gid := newGID()
				end := hold(t, e, tcc.md(gid, participant.OpTry))
				var runs atomic.Int32
				done := race(tcc.md(gid, participant.OpCancel), &runs)
				end(true)
				require.NoError(t, <-done)
				require.EqualValues(t, 1, runs.Load())
				require.ElementsMatch(t, []string{"try", "cancel"}, e.ledgerOps(t, gid, "b1"))
			})
			t.Run("cancel waits for a try that rolls back, then is an empty rollback", func(t *testing.T) {
				gid := newGID()
				end := hold(t, e, tcc.md(gid, participant.OpTry))
				var runs atomic.Int32
				done := race(tcc.md(gid, participant.OpCancel), &runs)
				end(false)
				require.NoError(t, <-done)
				require.Zero(t, runs.Load())
				err := db.call(ctx, e, tcc.md(gid, participant.OpTry), record(tcc.md(gid, participant.OpTry), &runs))
				require.ErrorIs(t, err, participant.ErrAborted, "the try retried later is refused")
				require.Empty(t, e.ledgerOps(t, gid, "b1"))
			})
			t.Run("try waits for a cancel that commits, then is refused", func(t *testing.T) {
				gid := newGID()
				end := hold(t, e, tcc.md(gid, participant.OpCancel))
				var runs atomic.Int32
				done := race(tcc.md(gid, participant.OpTry), &runs)
				end(true)
				require.ErrorIs(t, <-done, participant.ErrAborted)
				require.Zero(t, runs.Load())
				require.Empty(t, e.ledgerOps(t, gid, "b1"))
			})
			t.Run("a duplicate waits for the first call and does nothing", func(t *testing.T) {
				gid := newGID()
				end := hold(t, e, tcc.md(gid, participant.OpTry))
				var runs atomic.Int32
				done := race(tcc.md(gid, participant.OpTry), &runs)
				end(true)
				require.NoError(t, <-done)
				require.Zero(t, runs.Load())
				require.Equal(t, []string{"try"}, e.ledgerOps(t, gid, "b1"))
			})
		})
	}
}

// TestBarrierConcurrentTryAndCancel fires the try and the cancel of 100 branches at once, in
// random order. Each branch must end either executed and compensated, or with a marker and the
// try refused; never with a reservation that nothing undoes.
func TestBarrierConcurrentTryAndCancel(t *testing.T) {
	t.Parallel()
	for _, f := range flavors()[2:] {
		t.Run(f.name, func(t *testing.T) {
			t.Parallel()
			e := setup(t)
			ctx := context.Background()
			_, err := e.pool.Exec(ctx, `CREATE TABLE reservation (
				gid text NOT NULL, branch text NOT NULL, released bool NOT NULL DEFAULT false,
				PRIMARY KEY (gid, branch))`)
			require.NoError(t, err)

			gid := newGID()
			const branches = 100
			try := func(ctx context.Context, exec execFunc) error {
				md, _ := participant.FromContext(ctx)
				if _, err := exec(ctx, "INSERT INTO reservation (gid, branch) VALUES ($1, $2)", md.GID, md.Branch); err != nil {
					return err
				}
				// Business work takes a moment, which widens the window for the cancel to race in.
				_, err := exec(ctx, "SELECT pg_sleep(random() * 0.005)")
				return err
			}
			cancel := func(ctx context.Context, exec execFunc) error {
				md, _ := participant.FromContext(ctx)
				n, err := exec(ctx, "UPDATE reservation SET released = true WHERE gid = $1 AND branch = $2 AND NOT released", md.GID, md.Branch)
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
					ctx := participant.NewContext(ctx, c.md)
					results[i] = f.call(ctx, e, c.md, c.work)
				}()
			}
			wg.Wait()

			tryResult := map[string]error{}
			for i, c := range calls {
				if c.md.Op == participant.OpCancel {
					require.NoError(t, results[i], "cancel of %s", c.md.Branch)
				} else {
					tryResult[c.md.Branch] = results[i]
				}
			}
			executed, refused := 0, 0
			for branch, err := range tryResult {
				var reserved, released bool
				qerr := e.pool.QueryRow(ctx, "SELECT true, released FROM reservation WHERE gid = $1 AND branch = $2", gid, branch).Scan(&reserved, &released)
				if qerr != nil && !errors.Is(qerr, pgx.ErrNoRows) {
					require.NoError(t, qerr)
				}
				switch {
				case err == nil:
					executed++
					require.True(t, reserved && released, "branch %s: try ran, so the cancel must have released it", branch)
					require.Equal(t, map[string]string{"try": "try", "cancel": "cancel"}, e.barrierRows(t, gid, branch))
				case errors.Is(err, participant.ErrAborted):
					refused++
					require.False(t, reserved, "branch %s: a refused try reserves nothing", branch)
					require.Equal(t, map[string]string{"try": "cancel", "cancel": "cancel"}, e.barrierRows(t, gid, branch),
						"branch %s: marker only", branch)
				default:
					require.NoError(t, err, "try of %s", branch)
				}
			}
			require.Zero(t, e.count(t, "SELECT count(*) FROM reservation WHERE NOT released"), "no hanging reservation")
			t.Logf("%d branches executed and compensated, %d refused after an empty rollback", executed, refused)
			require.Equal(t, branches, executed+refused)
			require.Positive(t, executed, "random order: some tries come first")
			require.Positive(t, refused, "random order: some cancels come first")
		})
	}
}
