package participant_test

import (
	"context"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/sdk/participant"
)

func msgSetup(t *testing.T) (*pgxpool.Pool, *participant.Barrier) {
	t.Helper()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, pgtest.NewDatabase(t))
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	b, err := participant.NewBarrier(participant.BarrierOptions{})
	require.NoError(t, err)
	require.NoError(t, b.EnsureTable(ctx, pool))
	_, err = pool.Exec(ctx, "CREATE TABLE orders (id text PRIMARY KEY)")
	require.NoError(t, err)
	return pool, b
}

func localTx(ctx context.Context, pool *pgxpool.Pool, b *participant.Barrier, gid string) error {
	return b.CallPgxDB(ctx, pool, participant.MsgMetadata(gid), func(ctx context.Context, tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO orders VALUES ($1)", gid)
		return err
	})
}

func TestQueryPreparedCommitted(t *testing.T) {
	t.Parallel()
	pool, b := msgSetup(t)
	ctx := context.Background()
	require.NoError(t, localTx(ctx, pool, b, "m1"))
	require.NoError(t, b.QueryPrepared(ctx, pool, "m1"))
	require.NoError(t, b.QueryPrepared(ctx, pool, "m1"), "asking again gives the same answer")
}

func TestQueryPreparedBeforeLocalTxBarsIt(t *testing.T) {
	t.Parallel()
	pool, b := msgSetup(t)
	ctx := context.Background()
	err := b.QueryPrepared(ctx, pool, "m2")
	require.ErrorIs(t, err, participant.ErrAborted)
	// The local transaction comes late: refused, nothing written.
	err = localTx(ctx, pool, b, "m2")
	require.ErrorIs(t, err, participant.ErrAborted)
	var n int
	require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM orders").Scan(&n))
	require.Zero(t, n)
	require.ErrorIs(t, b.QueryPrepared(ctx, pool, "m2"), participant.ErrAborted)
}

func TestQueryPreparedWaitsForOpenLocalTx(t *testing.T) {
	t.Parallel()
	pool, b := msgSetup(t)
	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, b.CallPgx(ctx, tx, participant.MsgMetadata("m3"), func(ctx context.Context) error {
		_, err := tx.Exec(ctx, "INSERT INTO orders VALUES ('m3')")
		return err
	}))
	answer := make(chan error, 1)
	go func() { answer <- b.QueryPrepared(ctx, pool, "m3") }()
	// The query blocks on the open transaction's row; commit it and the answer is "committed".
	require.Eventually(t, func() bool {
		var waiting int
		_ = pool.QueryRow(ctx, "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'").Scan(&waiting)
		return waiting > 0
	}, 10e9, 10e6)
	require.NoError(t, tx.Commit(ctx))
	require.NoError(t, <-answer)
}
