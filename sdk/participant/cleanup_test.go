package participant_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/sdk/participant"
)

func TestCleanupDeletesOldRowsInBatches(t *testing.T) {
	t.Parallel()
	e := setup(t)
	ctx := context.Background()
	// 250 old rows and 20 recent ones.
	_, err := e.pool.Exec(ctx, `INSERT INTO treaty_barrier (mode, gid, branch, op, reason, created_at)
		SELECT 'tcc', 'old-' || i, 'b', 'try', 'try', now() - interval '8 days' FROM generate_series(1, 250) i`)
	require.NoError(t, err)
	for i := range 20 {
		md := participant.Metadata{GID: newGID(), Branch: "b", Op: participant.OpTry, Mode: participant.ModeTCC}
		require.NoError(t, e.barrier.CallPgxDB(ctx, e.pool, md, func(context.Context, pgx.Tx) error { return nil }), i)
	}

	deleted, err := e.barrier.Cleanup(ctx, e.pool, participant.RecommendedRetention, 100)
	require.NoError(t, err)
	require.Equal(t, 250, deleted)
	require.Equal(t, 20, e.count(t, "SELECT count(*) FROM treaty_barrier"))
	require.Zero(t, e.count(t, "SELECT count(*) FROM treaty_barrier WHERE gid LIKE 'old-%'"))

	deleted, err = e.barrier.CleanupSQL(ctx, e.db, participant.RecommendedRetention, 0)
	require.NoError(t, err)
	require.Zero(t, deleted, "nothing old is left")

	deleted, err = e.barrier.CleanupSQL(ctx, e.db, time.Nanosecond, 7)
	require.NoError(t, err)
	require.Equal(t, 20, deleted)

	_, err = e.barrier.Cleanup(ctx, e.pool, 0, 10)
	require.ErrorContains(t, err, "olderThan is 0s, must be positive")
	_, err = e.barrier.Cleanup(ctx, e.pool, time.Hour, -1)
	require.ErrorContains(t, err, "batch is -1, must be positive")
}

func TestCleanupBatchesAreSmall(t *testing.T) {
	t.Parallel()
	e := setup(t)
	ctx := context.Background()
	_, err := e.pool.Exec(ctx, `INSERT INTO treaty_barrier (mode, gid, branch, op, reason, created_at)
		SELECT 'saga', 'old-' || i, 'b', 'action', 'action', now() - interval '30 days' FROM generate_series(1, 95) i`)
	require.NoError(t, err)

	// Count the statements Cleanup sends through a connection of our own that logs them.
	cfg, err := pgx.ParseConfig(e.url)
	require.NoError(t, err)
	tr := &statementCounter{}
	cfg.Tracer = tr
	conn, err := pgx.ConnectConfig(ctx, cfg)
	require.NoError(t, err)
	defer conn.Close(ctx)

	deleted, err := e.barrier.Cleanup(ctx, conn, 24*time.Hour, 10)
	require.NoError(t, err)
	require.Equal(t, 95, deleted)
	require.Equal(t, 10, tr.deletes(), "ten statements of at most ten rows each")

	// An index on the age lets each batch find its rows without scanning the table.
	rows, err := e.pool.Query(ctx, "SELECT indexdef FROM pg_indexes WHERE tablename = 'treaty_barrier' ORDER BY indexname")
	require.NoError(t, err)
	indexes, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	require.Contains(t, indexes, "CREATE INDEX treaty_barrier_created_idx ON public.treaty_barrier USING btree (created_at)")
}

type statementCounter struct {
	mu  sync.Mutex
	sql []string
}

func (s *statementCounter) TraceQueryStart(ctx context.Context, _ *pgx.Conn, data pgx.TraceQueryStartData) context.Context {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.sql = append(s.sql, data.SQL)
	return ctx
}

func (s *statementCounter) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (s *statementCounter) deletes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, q := range s.sql {
		if len(q) >= 6 && q[:6] == "DELETE" {
			n++
		}
	}
	return n
}

func TestBarrierTableNames(t *testing.T) {
	t.Parallel()
	for _, bad := range []string{"Barrier", "1barrier", "bar-rier", "a.b.c", ".barrier", "app.", "x234567890123456789012345678901234567890123456789"} {
		_, err := participant.NewBarrier(participant.BarrierOptions{Table: bad})
		require.Error(t, err, bad)
		require.Panics(t, func() { participant.BarrierSchema(bad) }, bad)
	}
	require.Contains(t, participant.BarrierSchema(""), `CREATE TABLE IF NOT EXISTS "treaty_barrier"`)
	require.Contains(t, participant.BarrierSchema("app.my_barrier"), `CREATE SCHEMA IF NOT EXISTS "app"`)

	// A schema-qualified table works end to end, through both drivers, and creating it twice at
	// once is fine.
	e := setup(t)
	ctx := context.Background()
	b, err := participant.NewBarrier(participant.BarrierOptions{Table: "app.my_barrier"})
	require.NoError(t, err)
	require.Equal(t, "app.my_barrier", b.Table())
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if i%2 == 0 {
				errs[i] = b.EnsureTable(ctx, e.pool)
			} else {
				errs[i] = b.EnsureTableSQL(ctx, e.db)
			}
		}()
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err)
	}
	md := participant.Metadata{GID: newGID(), Branch: "b", Op: participant.OpCancel, Mode: participant.ModeTCC}
	require.NoError(t, b.CallPgxDB(ctx, e.pool, md, func(context.Context, pgx.Tx) error { return nil }))
	require.Equal(t, 2, e.count(t, "SELECT count(*) FROM app.my_barrier WHERE gid = $1", md.GID))
	require.Zero(t, e.count(t, "SELECT count(*) FROM treaty_barrier"), "the default table is untouched")
}
