package participant_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/sdk/participant"
)

// setup2PC is setup plus a TwoPhase on the same barrier table, and a cleanup that rolls back
// whatever the test left prepared: prepared transactions keep their locks and would block
// dropping the database.
func setup2PC(t *testing.T) (*env, *participant.TwoPhase) {
	t.Helper()
	e := setup(t)
	t.Cleanup(func() { rollbackLeftovers(t, e.url) })
	tp, err := participant.NewTwoPhase(participant.TwoPhaseOptions{LockTimeout: 50 * time.Millisecond})
	require.NoError(t, err)
	require.NoError(t, tp.CheckServer(context.Background(), e.pool))
	return e, tp
}

func rollbackLeftovers(t *testing.T, url string) {
	if err := rollbackPrepared(url); err != nil {
		t.Errorf("roll back leftover prepared transactions: %v", err)
	}
}

// rollbackPrepared rolls back every prepared transaction of url's database.
func rollbackPrepared(url string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()")
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, id := range ids {
		if _, err := conn.Exec(ctx, "ROLLBACK PREPARED '"+strings.ReplaceAll(id, "'", "''")+"'"); err != nil {
			return fmt.Errorf("%s: %w", id, err)
		}
	}
	return nil
}

func (e *env) prepared(t *testing.T) []string {
	t.Helper()
	rows, err := e.pool.Query(context.Background(), "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid")
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return ids
}

func md2PC(gid, branch string) participant.Metadata {
	return participant.Metadata{GID: gid, Branch: branch, Mode: participant.Mode2PC}
}

// reserve is a 2PC business function: one ledger row, counted.
func reserve(md participant.Metadata, runs *atomic.Int32) func(context.Context, pgx.Tx) error {
	return func(ctx context.Context, tx pgx.Tx) error {
		runs.Add(1)
		_, err := tx.Exec(ctx, "INSERT INTO ledger (gid, branch, op) VALUES ($1, $2, 'prepare')", md.GID, md.Branch)
		return err
	}
}

func TestPreparedIDRoundTrip(t *testing.T) {
	t.Parallel()
	gid := strings.Repeat("G", 120) + "abc.:_-" + "9"
	branch := strings.Repeat("b", 63) + "Z"
	require.Len(t, gid, participant.MaxGIDLen)
	require.Len(t, branch, participant.MaxBranchLen)
	id, err := participant.PreparedID(gid, branch)
	require.NoError(t, err)
	require.Equal(t, "tr/"+gid+"/"+branch, id)
	require.Len(t, id, 196)
	require.LessOrEqual(t, len(id), 199, "PostgreSQL's limit on a prepared transaction's id")
	g, b, ok := participant.ParsePreparedID(id)
	require.True(t, ok)
	require.Equal(t, gid, g)
	require.Equal(t, branch, b)

	_, err = participant.PreparedID(gid+"x", branch)
	require.ErrorContains(t, err, "gid is 129 bytes, limit 128")
	_, err = participant.PreparedID("g", "a/b")
	require.ErrorContains(t, err, `branch "a/b" has '/'`)
	for _, bad := range []string{"", "tr/", "tr/g", "tr//b", "tr/g/", "tr/g/b/c", "xx/g/b", "tr/" + gid + "x/b"} {
		_, _, ok := participant.ParsePreparedID(bad)
		require.False(t, ok, bad)
	}
}

func TestTwoPhaseMaxLengthIDsOnTheServer(t *testing.T) {
	t.Parallel()
	e, tp := setup2PC(t)
	ctx := context.Background()
	// Unique per run: prepared transaction ids are server-wide.
	gid := newGID() + "-" + strings.Repeat("x", participant.MaxGIDLen-len(newGID())-1)
	branch := strings.Repeat("B", participant.MaxBranchLen)
	require.Len(t, gid, participant.MaxGIDLen)
	md := md2PC(gid, branch)
	var runs atomic.Int32
	require.NoError(t, tp.Prepare(ctx, e.pool, md, reserve(md, &runs)))
	inDoubt, err := tp.InDoubt(ctx, e.pool)
	require.NoError(t, err)
	require.Len(t, inDoubt, 1)
	require.Equal(t, gid, inDoubt[0].GID)
	require.Equal(t, branch, inDoubt[0].Branch)
	require.WithinDuration(t, time.Now(), inDoubt[0].PreparedAt, time.Minute)
	require.NoError(t, tp.Commit(ctx, e.pool, md))
	require.Equal(t, []string{"prepare"}, e.ledgerOps(t, gid, branch))
}

func TestTwoPhasePrepareCommitIdempotent(t *testing.T) {
	t.Parallel()
	e, tp := setup2PC(t)
	ctx := context.Background()
	gid := newGID()
	md := md2PC(gid, "debit")
	var runs atomic.Int32

	require.NoError(t, tp.Prepare(ctx, e.pool, md, reserve(md, &runs)))
	id, _ := participant.PreparedID(gid, "debit")
	require.Equal(t, []string{id}, e.prepared(t))
	require.Empty(t, e.ledgerOps(t, gid, "debit"), "prepared work is not visible yet")
	require.Empty(t, e.barrierRows(t, gid, "debit"), "nor is its barrier row")

	require.NoError(t, tp.Prepare(ctx, e.pool, md, reserve(md, &runs)), "a repeated prepare succeeds")
	require.EqualValues(t, 1, runs.Load(), "without running again")
	require.Len(t, e.prepared(t), 1)

	require.NoError(t, tp.Commit(ctx, e.pool, md))
	require.Empty(t, e.prepared(t))
	require.Equal(t, []string{"prepare"}, e.ledgerOps(t, gid, "debit"))
	require.NoError(t, tp.Commit(ctx, e.pool, md), "a repeated commit succeeds")
	require.NoError(t, tp.Prepare(ctx, e.pool, md, reserve(md, &runs)), "a late duplicate prepare succeeds")
	require.EqualValues(t, 1, runs.Load())
	require.Empty(t, e.prepared(t), "and prepares nothing")

	err := tp.Rollback(ctx, e.pool, md)
	require.ErrorIs(t, err, participant.ErrCommitted)
	require.Equal(t, codes.FailedPrecondition, status.Code(participant.ToStatus(err)))
	require.Equal(t, []string{"prepare"}, e.ledgerOps(t, gid, "debit"))
}

func TestTwoPhaseRollbackIdempotent(t *testing.T) {
	t.Parallel()
	e, tp := setup2PC(t)
	ctx := context.Background()
	gid := newGID()
	md := md2PC(gid, "credit")
	var runs atomic.Int32

	require.NoError(t, tp.Prepare(ctx, e.pool, md, reserve(md, &runs)))
	require.NoError(t, tp.Rollback(ctx, e.pool, md))
	require.Empty(t, e.prepared(t))
	require.Empty(t, e.ledgerOps(t, gid, "credit"))
	require.NoError(t, tp.Rollback(ctx, e.pool, md), "a repeated rollback succeeds")
	require.Equal(t, map[string]string{"prepare": "rollback", "rollback": "rollback"}, e.barrierRows(t, gid, "credit"))

	err := tp.Commit(ctx, e.pool, md)
	require.ErrorIs(t, err, participant.ErrRolledBack)
	require.ErrorContains(t, err, "cannot commit")

	err = tp.Prepare(ctx, e.pool, md, reserve(md, &runs))
	require.ErrorIs(t, err, participant.ErrAborted, "a late prepare is refused")
	require.Equal(t, codes.Aborted, status.Code(participant.ToStatus(err)))
	require.EqualValues(t, 1, runs.Load())
	require.Empty(t, e.prepared(t))
}

func TestTwoPhaseRollbackBeforePrepare(t *testing.T) {
	t.Parallel()
	e, tp := setup2PC(t)
	ctx := context.Background()
	gid := newGID()
	md := md2PC(gid, "credit")
	var runs atomic.Int32

	require.NoError(t, tp.Rollback(ctx, e.pool, md), "rolling back a branch never prepared succeeds")
	require.Equal(t, map[string]string{"prepare": "rollback", "rollback": "rollback"}, e.barrierRows(t, gid, "credit"))
	err := tp.Prepare(ctx, e.pool, md, reserve(md, &runs))
	require.ErrorIs(t, err, participant.ErrAborted)
	require.Zero(t, runs.Load())
	require.Empty(t, e.prepared(t))

	err = tp.Commit(ctx, e.pool, md2PC(newGID(), "never"))
	require.ErrorIs(t, err, participant.ErrNotPrepared)
}

func TestTwoPhasePrepareFailures(t *testing.T) {
	t.Parallel()
	e, tp := setup2PC(t)
	ctx := context.Background()
	gid := newGID()
	md := md2PC(gid, "debit")
	var runs atomic.Int32

	boom := errors.New("insufficient funds")
	err := tp.Prepare(ctx, e.pool, md, func(ctx context.Context, tx pgx.Tx) error {
		require.NoError(t, reserve(md, &runs)(ctx, tx))
		return boom
	})
	require.True(t, err == boom, "fn's error comes back unchanged, got %v", err)
	require.Empty(t, e.prepared(t))
	require.Empty(t, e.barrierRows(t, gid, "debit"))

	// fn swallowed a failed statement: PostgreSQL rolls back instead of preparing.
	err = tp.Prepare(ctx, e.pool, md, func(ctx context.Context, tx pgx.Tx) error {
		_, _ = tx.Exec(ctx, "SELECT 1/0")
		return nil
	})
	require.ErrorContains(t, err, "rolled it back instead of preparing it")
	require.Empty(t, e.prepared(t))
	require.Empty(t, e.barrierRows(t, gid, "debit"))

	// A retry on a plain connection works.
	conn, err := pgx.Connect(ctx, e.url)
	require.NoError(t, err)
	defer conn.Close(ctx)
	require.NoError(t, tp.Prepare(ctx, conn, md, reserve(md, &runs)))
	require.Len(t, e.prepared(t), 1)
	require.NoError(t, tp.Commit(ctx, conn, md))
	require.NoError(t, conn.Ping(ctx), "the connection is usable after PREPARE TRANSACTION")

	tx, err := e.pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback(ctx) }()
	require.ErrorContains(t, tp.Prepare(ctx, tx, md2PC(newGID(), "x"), reserve(md, &runs)), "db is a pgx.Tx")

	wrong := md
	wrong.Op = participant.OpCommit
	require.ErrorIs(t, tp.Prepare(ctx, e.pool, wrong, reserve(md, &runs)), participant.ErrInvalidMetadata)
	wrong = md
	wrong.Mode = participant.ModeTCC
	require.ErrorContains(t, tp.Commit(ctx, e.pool, wrong), `mode is "tcc"`)
	require.ErrorContains(t, tp.Rollback(ctx, e.pool, md2PC("", "b")), "gid is empty")
}

// A duplicate prepare that arrives while the first is still running waits for it (a lock
// timeout at a time) and then reports success without running fn again.
func TestTwoPhaseConcurrentDuplicatePrepare(t *testing.T) {
	t.Parallel()
	e, tp := setup2PC(t)
	ctx := context.Background()
	md := md2PC(newGID(), "debit")
	var runs atomic.Int32
	release := make(chan struct{})
	inFn := make(chan struct{})
	first := make(chan error, 1)
	go func() {
		first <- tp.Prepare(ctx, e.pool, md, func(ctx context.Context, tx pgx.Tx) error {
			close(inFn)
			<-release
			return reserve(md, &runs)(ctx, tx)
		})
	}()
	<-inFn // the first prepare holds its barrier row
	second := make(chan error, 1)
	go func() { second <- tp.Prepare(ctx, e.pool, md, reserve(md, &runs)) }()
	e.waitLockWaiters(t, 1)
	close(release)
	require.NoError(t, <-first)
	require.NoError(t, <-second)
	require.EqualValues(t, 1, runs.Load())
	require.Len(t, e.prepared(t), 1)
	require.NoError(t, tp.Commit(ctx, e.pool, md))
}

// A rollback that races a running prepare waits for it and then rolls the result back.
func TestTwoPhaseRollbackRacingPrepare(t *testing.T) {
	t.Parallel()
	e, tp := setup2PC(t)
	ctx := context.Background()
	md := md2PC(newGID(), "debit")
	var runs atomic.Int32
	release := make(chan struct{})
	inFn := make(chan struct{})
	prepared := make(chan error, 1)
	go func() {
		prepared <- tp.Prepare(ctx, e.pool, md, func(ctx context.Context, tx pgx.Tx) error {
			close(inFn)
			<-release
			return reserve(md, &runs)(ctx, tx)
		})
	}()
	<-inFn
	rolledBack := make(chan error, 1)
	go func() { rolledBack <- tp.Rollback(ctx, e.pool, md) }()
	e.waitLockWaiters(t, 1)
	close(release)
	require.NoError(t, <-prepared)
	require.NoError(t, <-rolledBack)
	require.Empty(t, e.prepared(t))
	require.Empty(t, e.ledgerOps(t, md.GID, md.Branch))
	require.Equal(t, map[string]string{"prepare": "rollback", "rollback": "rollback"}, e.barrierRows(t, md.GID, md.Branch))
	require.ErrorIs(t, tp.Commit(ctx, e.pool, md), participant.ErrRolledBack)
}

func TestTwoPhaseInDoubtAndResolve(t *testing.T) {
	t.Parallel()
	e, tp := setup2PC(t)
	ctx := context.Background()

	// Another database on the same server, with a prepared branch of its own that must not show.
	otherURL := pgtest.NewDatabase(t)
	t.Cleanup(func() { rollbackLeftovers(t, otherURL) })
	other, err := pgxpool.New(ctx, otherURL)
	require.NoError(t, err)
	defer other.Close()
	ob, err := participant.NewBarrier(participant.BarrierOptions{})
	require.NoError(t, err)
	require.NoError(t, ob.EnsureTable(ctx, other))
	otherMD := md2PC(newGID(), "elsewhere")
	require.NoError(t, tp.Prepare(ctx, other, otherMD, func(context.Context, pgx.Tx) error { return nil }))

	gid := newGID()
	var runs atomic.Int32
	for _, branch := range []string{"commit-me", "roll-me-back", "undecided"} {
		md := md2PC(gid, branch)
		require.NoError(t, tp.Prepare(ctx, e.pool, md, reserve(md, &runs)))
	}
	// Not Treaty's: a prepared transaction with another id is left alone.
	_, err = e.pool.Exec(ctx, "BEGIN; INSERT INTO ledger VALUES ('foreign', 'x', 'y'); PREPARE TRANSACTION 'someone-else'")
	require.NoError(t, err)

	inDoubt, err := tp.InDoubt(ctx, e.pool)
	require.NoError(t, err)
	var branches []string
	for _, d := range inDoubt {
		require.Equal(t, gid, d.GID)
		branches = append(branches, d.Branch)
	}
	require.ElementsMatch(t, []string{"commit-me", "roll-me-back", "undecided"}, branches)

	decide := func(_ context.Context, g, branch string) (bool, error) {
		require.Equal(t, gid, g)
		switch branch {
		case "commit-me":
			return true, nil
		case "roll-me-back":
			return false, nil
		}
		return false, fmt.Errorf("coordinator unreachable")
	}
	err = tp.Resolve(ctx, e.pool, decide)
	require.ErrorContains(t, err, `resolve gid "`+gid+`" branch "undecided": decide: coordinator unreachable`)
	require.Equal(t, []string{"prepare"}, e.ledgerOps(t, gid, "commit-me"))
	require.Empty(t, e.ledgerOps(t, gid, "roll-me-back"))
	undecided, _ := participant.PreparedID(gid, "undecided")
	require.Equal(t, []string{"someone-else", undecided}, e.prepared(t), "the undecided branch stays prepared")

	// No decision recorded means roll back: the callback says so.
	require.NoError(t, tp.Resolve(ctx, e.pool, func(context.Context, string, string) (bool, error) { return false, nil }))
	require.Equal(t, []string{"someone-else"}, e.prepared(t), "every Treaty branch is resolved")
	require.Empty(t, e.ledgerOps(t, gid, "undecided"))
	_, err = e.pool.Exec(ctx, "ROLLBACK PREPARED 'someone-else'")
	require.NoError(t, err)

	otherIDs, err := tp.InDoubt(ctx, other)
	require.NoError(t, err)
	require.Len(t, otherIDs, 1, "the other database's branch was not touched")
	require.Equal(t, otherMD.GID, otherIDs[0].GID)
	require.NoError(t, tp.Rollback(ctx, other, otherMD))
}
