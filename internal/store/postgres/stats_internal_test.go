package postgres

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/store"
)

func migratedStore(t testing.TB, ctx context.Context) *Store {
	t.Helper()
	s, err := Open(ctx, pgtest.NewDatabase(t), 4)
	require.NoError(t, err)
	t.Cleanup(s.Close)
	_, err = Migrate(ctx, s.Pool())
	require.NoError(t, err)
	return s
}

// The SQL list of finished statuses is store.FinishedStatuses: the partial index and the
// statistics query must agree with what retention deletes.
func TestFinishedSQLListIsFinishedStatuses(t *testing.T) {
	var got []string
	for _, q := range strings.Split(finishedSQLList, ",") {
		got = append(got, strings.Trim(strings.TrimSpace(q), "'"))
	}
	require.Equal(t, store.FinishedStatuses, got)
}

// The statistics never read the whole table: with sequential scans priced out, every statement
// has an index to use (the partial index of unfinished transactions repeats the query's
// predicate, so a drifting list would show up here), and the finished total is estimated from
// the planner's statistics.
func TestStatsReadIndexesOnly(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := migratedStore(t, ctx)
	_, err := s.pool.Exec(ctx, `INSERT INTO treaty_transactions (gid, mode, status, spec, spec_hash, deadline, next_attempt_at)
SELECT 'f' || i, 'saga', CASE WHEN i % 2 = 0 THEN 'succeeded' ELSE 'compensated' END, ''::bytea, ''::bytea, now(), NULL FROM generate_series(1, 5000) i
UNION ALL SELECT 'u' || i, 'tcc', 'trying', ''::bytea, ''::bytea, now() + interval '1 hour', now() + interval '1 hour' FROM generate_series(1, 7) i`)
	require.NoError(t, err)
	_, err = s.pool.Exec(ctx, `ANALYZE treaty_transactions`)
	require.NoError(t, err)

	conn, err := s.pool.Acquire(ctx)
	require.NoError(t, err)
	defer conn.Release()
	_, err = conn.Exec(ctx, `SET enable_seqscan = off`)
	require.NoError(t, err)
	defer func() { _, _ = conn.Exec(context.Background(), `RESET enable_seqscan`) }()
	for q, index := range map[string]string{
		statsUnfinishedSQL: "treaty_transactions_unfinished",
		strings.ReplaceAll(statsBacklogSQL, "$1::interval", "interval '30 seconds'"): "treaty_transactions_due",
	} {
		var plan strings.Builder
		rows, err := conn.Query(ctx, "EXPLAIN "+q)
		require.NoError(t, err)
		for rows.Next() {
			var line string
			require.NoError(t, rows.Scan(&line))
			plan.WriteString(line + "\n")
		}
		require.NoError(t, rows.Err())
		require.NotContains(t, plan.String(), "Seq Scan", "query:\n%s\nplan:\n%s", q, plan.String())
		require.Contains(t, plan.String(), index, "query:\n%s\nplan:\n%s", q, plan.String())
	}

	st, err := s.Stats(ctx)
	require.NoError(t, err)
	require.Equal(t, []store.StatusCount{{Mode: "tcc", Status: "trying", Count: 7}}, st.ByStatus)
	require.InDelta(t, 5000, st.Finished, 50, "the finished total, estimated after an analyze")
}

// BenchmarkStatsScrape is what one /metrics scrape costs the database with many finished
// transactions kept (TREATY_BENCH_STATS_ROWS, default 1,000,000) and a few hundred unfinished:
// "stats" is Store.Stats, "full_count" the per-status count over the whole table it replaced.
//
//	TREATY_TEST_DATABASE_URL=... go test -run '^$' -bench BenchmarkStatsScrape -benchtime 20x ./internal/store/postgres/
func BenchmarkStatsScrape(b *testing.B) {
	ctx := context.Background()
	n := 1_000_000
	if v := os.Getenv("TREATY_BENCH_STATS_ROWS"); v != "" {
		var err error
		n, err = strconv.Atoi(v)
		require.NoError(b, err)
	}
	s := migratedStore(b, ctx)
	start := time.Now()
	_, err := s.pool.Exec(ctx, `INSERT INTO treaty_transactions (gid, mode, status, spec, spec_hash, deadline, next_attempt_at, created_at, updated_at)
SELECT 'f' || i, (ARRAY['saga','tcc','2pc','msg'])[1 + i % 4],
       (ARRAY['succeeded','confirmed','committed','aborted'])[1 + i % 4], '\x0a0b'::bytea, '\x01'::bytea, now(), NULL,
       now() - (i || ' seconds')::interval, now() - (i || ' seconds')::interval
FROM generate_series(1, $1::int) i
UNION ALL SELECT 'u' || i, 'saga', 'running', '\x0a0b'::bytea, '\x01'::bytea, now() + interval '1 hour', now() + interval '10 seconds', now(), now()
FROM generate_series(1, 300) i`, n)
	require.NoError(b, err)
	_, err = s.pool.Exec(ctx, `VACUUM ANALYZE treaty_transactions`)
	require.NoError(b, err)
	b.Logf("loaded %d finished and 300 unfinished transactions in %s", n, time.Since(start).Round(time.Millisecond))

	b.Run("stats", func(b *testing.B) {
		for b.Loop() {
			st, err := s.Stats(ctx)
			require.NoError(b, err)
			require.Len(b, st.ByStatus, 1)
		}
	})
	b.Run("full_count", func(b *testing.B) {
		for b.Loop() {
			rows, err := s.pool.Query(ctx, `SELECT mode, status, count(*) FROM treaty_transactions GROUP BY mode, status ORDER BY mode, status`)
			require.NoError(b, err)
			var got []string
			for rows.Next() {
				var m, st string
				var c int
				require.NoError(b, rows.Scan(&m, &st, &c))
				got = append(got, fmt.Sprint(m, st, c))
			}
			require.NoError(b, rows.Err())
			require.True(b, slices.IsSorted(got))
		}
	})
}

// The admin list pages newest first: its order has an index, so a page is read from the top
// of that index, not sorted from the whole table.
func TestListOrderHasAnIndex(t *testing.T) {
	t.Parallel()
	ctx := t.Context()
	s := migratedStore(t, ctx)
	_, err := s.pool.Exec(ctx, `INSERT INTO treaty_transactions (gid, mode, status, spec, spec_hash, deadline, created_at)
SELECT 'f' || i, 'saga', 'succeeded', ''::bytea, ''::bytea, now(), now() - (i || ' seconds')::interval FROM generate_series(1, 20000) i`)
	require.NoError(t, err)
	_, err = s.pool.Exec(ctx, `ANALYZE treaty_transactions`)
	require.NoError(t, err)
	rows, err := s.pool.Query(ctx, "EXPLAIN "+listSQL, []string{}, []string{}, "", "", nil, nil, nil, nil, nil, "", 50)
	require.NoError(t, err)
	var plan strings.Builder
	for rows.Next() {
		var line string
		require.NoError(t, rows.Scan(&line))
		plan.WriteString(line + "\n")
	}
	require.NoError(t, rows.Err())
	require.Contains(t, plan.String(), "treaty_transactions_created", "plan:\n%s", plan.String())
	require.NotContains(t, plan.String(), "Sort", "plan:\n%s", plan.String())
}
