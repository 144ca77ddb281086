package migrate_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/fstest"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/migrate"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/migrations"
)

func TestMain(m *testing.M) {
	code := pgtest.WrapTestMain(m)
	if code == 0 {
		// pgxpool's health check goroutine ends shortly after Close, not during it.
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/jackc/pgx/v5/pgxpool.(*Pool).backgroundHealthCheck")); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// coordinatorTable is the version table the coordinator uses (store/postgres.VersionTable).
const coordinatorTable = "treaty_schema_migrations"

func newPool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	require.NoError(t, err)
	cfg.MaxConns = 2
	pool, err := pgxpool.NewWithConfig(t.Context(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

func coordinator(t *testing.T) *migrate.Migrator {
	t.Helper()
	m, err := migrate.New(migrations.FS, coordinatorTable, nil)
	require.NoError(t, err)
	require.GreaterOrEqual(t, m.Latest(), 1)
	return m
}

// steps is a three-migration set where every up and down leaves a trace in a log table, so a
// migration applied twice (or not at all) shows.
func steps() fstest.MapFS {
	return fstest.MapFS{
		"001_log.up.sql": {Data: []byte(`
			CREATE TABLE step_log (version int NOT NULL, dir text NOT NULL);
			INSERT INTO step_log VALUES (1, 'up');`)},
		"001_log.down.sql": {Data: []byte(`DROP TABLE step_log;`)},
		"002_widgets.up.sql": {Data: []byte(`
			CREATE TABLE widgets (id int PRIMARY KEY);
			INSERT INTO step_log VALUES (2, 'up');`)},
		"002_widgets.down.sql": {Data: []byte(`
			DROP TABLE widgets;
			INSERT INTO step_log VALUES (2, 'down');`)},
		"003_gadgets.up.sql": {Data: []byte(`
			CREATE TABLE gadgets (id int PRIMARY KEY);
			INSERT INTO step_log VALUES (3, 'up');`)},
		"003_gadgets.down.sql": {Data: []byte(`
			DROP TABLE gadgets;
			INSERT INTO step_log VALUES (3, 'down');`)},
		"README.md":     {Data: []byte("not a migration: ignored")},
		"migrations.go": {Data: []byte("package migrations")},
	}
}

func tableExists(t *testing.T, pool *pgxpool.Pool, name string) bool {
	t.Helper()
	var ok bool
	require.NoError(t, pool.QueryRow(t.Context(), "SELECT to_regclass($1) IS NOT NULL", name).Scan(&ok))
	return ok
}

func versions(t *testing.T, pool *pgxpool.Pool, table string) []int {
	t.Helper()
	rows, err := pool.Query(t.Context(), "SELECT version FROM "+table+" ORDER BY version")
	require.NoError(t, err)
	var out []int
	for rows.Next() {
		var v int
		require.NoError(t, rows.Scan(&v))
		out = append(out, v)
	}
	require.NoError(t, rows.Err())
	return out
}

func TestUpCreatesCoordinatorTables(t *testing.T) {
	t.Parallel()
	pool := newPool(t, pgtest.NewDatabase(t))
	m := coordinator(t)

	cur, err := m.Current(t.Context(), pool)
	require.NoError(t, err)
	require.Equal(t, 0, cur, "a database without the version table is at version 0")

	res, err := m.Up(t.Context(), pool)
	require.NoError(t, err)
	require.Equal(t, 0, res.From)
	require.Equal(t, m.Latest(), res.To)
	require.Len(t, res.Applied, m.Latest())
	for _, table := range []string{"treaty_transactions", "treaty_branches", "treaty_events", coordinatorTable} {
		require.True(t, tableExists(t, pool, table), "table %s", table)
	}
	cur, err = m.Current(t.Context(), pool)
	require.NoError(t, err)
	require.Equal(t, m.Latest(), cur)

	ms := m.Migrations()
	require.Equal(t, 1, ms[0].Version)
	require.Equal(t, "init", ms[0].Name)
	require.NotEmpty(t, ms[0].Up)
	require.NotEmpty(t, ms[0].Down)
}

func TestUpTwiceIsNoOp(t *testing.T) {
	t.Parallel()
	pool := newPool(t, pgtest.NewDatabase(t))
	m, err := migrate.New(steps(), "step_versions", nil)
	require.NoError(t, err)
	require.Equal(t, 3, m.Latest(), "files that are not NNN_name.(up|down).sql are ignored")

	first, err := m.Up(t.Context(), pool)
	require.NoError(t, err)
	require.Equal(t, []int{1, 2, 3}, first.Applied)

	second, err := m.Up(t.Context(), pool)
	require.NoError(t, err)
	require.Empty(t, second.Applied, "nothing left to apply")
	require.Equal(t, 3, second.From)
	require.Equal(t, 3, second.To)

	var n int
	require.NoError(t, pool.QueryRow(t.Context(), "SELECT count(*) FROM step_log").Scan(&n))
	require.Equal(t, 3, n, "each migration ran once")
}

func TestConcurrentUpAppliesEachOnce(t *testing.T) {
	t.Parallel()
	url := pgtest.NewDatabase(t)
	const n = 5

	for _, set := range []struct {
		name  string
		fsys  func() (*migrate.Migrator, error)
		count string // query counting the side effects of the migrations
	}{
		{"coordinator", func() (*migrate.Migrator, error) { return migrate.New(migrations.FS, coordinatorTable, nil) }, ""},
		{"steps", func() (*migrate.Migrator, error) { return migrate.New(steps(), "step_versions", nil) }, "SELECT count(*) FROM step_log"},
	} {
		t.Run(set.name, func(t *testing.T) {
			// Separate pools stand for separate processes starting at once.
			pools := make([]*pgxpool.Pool, n)
			for i := range pools {
				pools[i] = newPool(t, url)
			}
			var (
				wg    sync.WaitGroup
				start = make(chan struct{})
				res   = make([]migrate.Result, n)
				errs  = make([]error, n)
			)
			for i := range n {
				wg.Go(func() {
					m, err := set.fsys()
					if err != nil {
						errs[i] = err
						return
					}
					<-start
					res[i], errs[i] = m.Up(t.Context(), pools[i])
				})
			}
			close(start)
			wg.Wait()

			m, err := set.fsys()
			require.NoError(t, err)
			applied := map[int]int{}
			for i := range n {
				require.NoError(t, errs[i], "migrator %d", i)
				require.Equal(t, m.Latest(), res[i].To, "migrator %d ends at the latest version", i)
				for _, v := range res[i].Applied {
					applied[v]++
				}
			}
			for v := 1; v <= m.Latest(); v++ {
				require.Equal(t, 1, applied[v], "version %d applied by exactly one migrator", v)
			}
			table := coordinatorTable
			if set.count != "" {
				table = "step_versions"
				var c int
				require.NoError(t, pools[0].QueryRow(t.Context(), set.count).Scan(&c))
				require.Equal(t, m.Latest(), c, "each migration's SQL ran once")
			}
			want := make([]int, m.Latest())
			for i := range want {
				want[i] = i + 1
			}
			require.Equal(t, want, versions(t, pools[0], table))
		})
	}
}

func TestDownAndUpRoundTrip(t *testing.T) {
	t.Parallel()
	pool := newPool(t, pgtest.NewDatabase(t))

	t.Run("coordinator", func(t *testing.T) {
		m := coordinator(t)
		_, err := m.Up(t.Context(), pool)
		require.NoError(t, err)

		res, err := m.To(t.Context(), pool, 0)
		require.NoError(t, err)
		require.Equal(t, m.Latest(), res.From)
		require.Equal(t, 0, res.To)
		require.Len(t, res.Applied, m.Latest())
		require.Equal(t, -m.Latest(), res.Applied[0], "down steps are reported negative, newest first")
		for _, table := range []string{"treaty_transactions", "treaty_branches", "treaty_events"} {
			require.False(t, tableExists(t, pool, table), "%s dropped by the down migrations", table)
		}
		require.Empty(t, versions(t, pool, coordinatorTable))

		res, err = m.Up(t.Context(), pool)
		require.NoError(t, err)
		require.Len(t, res.Applied, m.Latest())
		require.True(t, tableExists(t, pool, "treaty_transactions"))
	})

	t.Run("steps", func(t *testing.T) {
		m, err := migrate.New(steps(), "step_versions", nil)
		require.NoError(t, err)
		_, err = m.Up(t.Context(), pool)
		require.NoError(t, err)

		res, err := m.To(t.Context(), pool, 1)
		require.NoError(t, err)
		require.Equal(t, []int{-3, -2}, res.Applied)
		require.Equal(t, []int{1}, versions(t, pool, "step_versions"))
		require.False(t, tableExists(t, pool, "widgets"))
		require.True(t, tableExists(t, pool, "step_log"))

		res, err = m.To(t.Context(), pool, 2)
		require.NoError(t, err)
		require.Equal(t, []int{2}, res.Applied)

		var log []string
		rows, err := pool.Query(t.Context(), "SELECT version || ':' || dir FROM step_log")
		require.NoError(t, err)
		for rows.Next() {
			var s string
			require.NoError(t, rows.Scan(&s))
			log = append(log, s)
		}
		require.NoError(t, rows.Err())
		require.ElementsMatch(t, []string{"1:up", "2:up", "3:up", "3:down", "2:down", "2:up"}, log)

		_, err = m.To(t.Context(), pool, 4)
		require.ErrorContains(t, err, "target version 4 out of range 0..3")
		_, err = m.To(t.Context(), pool, -1)
		require.ErrorContains(t, err, "out of range")
	})
}

func TestNewerDatabaseIsRefused(t *testing.T) {
	t.Parallel()
	pool := newPool(t, pgtest.NewDatabase(t))
	newer, err := migrate.New(steps(), "step_versions", nil)
	require.NoError(t, err)
	_, err = newer.Up(t.Context(), pool)
	require.NoError(t, err)

	// An older binary knows only the first two.
	fsys := steps()
	delete(fsys, "003_gadgets.up.sql")
	delete(fsys, "003_gadgets.down.sql")
	older, err := migrate.New(fsys, "step_versions", nil)
	require.NoError(t, err)

	for name, run := range map[string]func() (migrate.Result, error){
		"Up":   func() (migrate.Result, error) { return older.Up(t.Context(), pool) },
		"To 1": func() (migrate.Result, error) { return older.To(t.Context(), pool, 1) },
	} {
		_, err := run()
		require.Error(t, err, name)
		require.Contains(t, err.Error(), "database is at version 3, newer than this binary knows (2)", name)
		require.Contains(t, err.Error(), "upgrade the binary", name)
	}
	require.Equal(t, []int{1, 2, 3}, versions(t, pool, "step_versions"), "nothing was undone")
	require.True(t, tableExists(t, pool, "gadgets"))
}

func TestFailedMigrationRollsBack(t *testing.T) {
	t.Parallel()
	pool := newPool(t, pgtest.NewDatabase(t))
	fsys := steps()
	fsys["003_gadgets.up.sql"] = &fstest.MapFile{Data: []byte(`
		CREATE TABLE gadgets (id int PRIMARY KEY);
		SELECT no_such_function();`)}
	m, err := migrate.New(fsys, "step_versions", nil)
	require.NoError(t, err)

	res, err := m.Up(t.Context(), pool)
	require.Error(t, err)
	require.Contains(t, err.Error(), "migration 003_gadgets up", "the error names the migration")
	require.Contains(t, err.Error(), "no_such_function", "and what went wrong in it")
	require.Equal(t, []int{1, 2}, res.Applied, "the result says what did apply")
	require.Equal(t, 2, res.To)
	require.Equal(t, []int{1, 2}, versions(t, pool, "step_versions"))
	require.False(t, tableExists(t, pool, "gadgets"), "a failed migration leaves nothing behind")

	// The advisory lock was released: a fixed set carries on from there.
	fixed, err := migrate.New(steps(), "step_versions", nil)
	require.NoError(t, err)
	res, err = fixed.Up(t.Context(), pool)
	require.NoError(t, err)
	require.Equal(t, []int{3}, res.Applied)
}

func TestMissingDownIsRefused(t *testing.T) {
	t.Parallel()
	pool := newPool(t, pgtest.NewDatabase(t))
	fsys := steps()
	delete(fsys, "002_widgets.down.sql")
	m, err := migrate.New(fsys, "step_versions", nil)
	require.NoError(t, err, "a set without some down files can still go up")
	_, err = m.Up(t.Context(), pool)
	require.NoError(t, err)

	res, err := m.To(t.Context(), pool, 0)
	require.ErrorContains(t, err, "migration 002_widgets has no .down.sql")
	require.Equal(t, []int{-3}, res.Applied, "it went down as far as it could")
	require.Equal(t, []int{1, 2}, versions(t, pool, "step_versions"))
}

// Several sets (the coordinator's, the outbox's) live in one database, each in its own table.
func TestIndependentSetsShareADatabase(t *testing.T) {
	t.Parallel()
	pool := newPool(t, pgtest.NewDatabase(t))
	_, err := pool.Exec(t.Context(), "CREATE SCHEMA outbox")
	require.NoError(t, err)

	coord := coordinator(t)
	// The replace hook makes one set of files serve a configurable schema.
	other, err := migrate.New(fstest.MapFS{
		"001_messages.up.sql":   {Data: []byte("CREATE TABLE {{schema}}.messages (id bigint PRIMARY KEY)")},
		"001_messages.down.sql": {Data: []byte("DROP TABLE {{schema}}.messages")},
	}, migrate.QuoteIdent("outbox.schema_migrations"), func(sql string) string {
		return strings.ReplaceAll(sql, "{{schema}}", migrate.QuoteIdent("outbox"))
	})
	require.NoError(t, err)

	_, err = coord.Up(t.Context(), pool)
	require.NoError(t, err)
	res, err := other.Up(t.Context(), pool)
	require.NoError(t, err)
	require.Equal(t, []int{1}, res.Applied, "the other set is not confused by the coordinator's versions")
	require.True(t, tableExists(t, pool, "outbox.messages"))
	require.Equal(t, []int{1}, versions(t, pool, `"outbox"."schema_migrations"`))

	_, err = other.To(t.Context(), pool, 0)
	require.NoError(t, err)
	cur, err := coord.Current(t.Context(), pool)
	require.NoError(t, err)
	require.Equal(t, coord.Latest(), cur, "undoing one set leaves the other alone")
}

func TestBadFileSets(t *testing.T) {
	t.Parallel()
	sql := func(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }
	for _, tc := range []struct {
		name string
		fsys fstest.MapFS
		want string
	}{
		{
			name: "gap in numbering",
			fsys: fstest.MapFS{"001_a.up.sql": sql("SELECT 1"), "003_c.up.sql": sql("SELECT 1")},
			want: "migrations must be numbered 1, 2, 3, ...: found 3 at position 2",
		},
		{
			name: "does not start at 1",
			fsys: fstest.MapFS{"002_b.up.sql": sql("SELECT 1")},
			want: "found 2 at position 1",
		},
		{
			name: "version 0",
			fsys: fstest.MapFS{"000_zero.up.sql": sql("SELECT 1"), "001_a.up.sql": sql("SELECT 1")},
			want: "found 0 at position 1",
		},
		{
			name: "two names for one version",
			fsys: fstest.MapFS{"001_a.up.sql": sql("SELECT 1"), "001_b.down.sql": sql("SELECT 1")},
			want: `migration 1 has two names: "a" and "b"`,
		},
		{
			name: "missing up",
			fsys: fstest.MapFS{"001_a.up.sql": sql("SELECT 1"), "002_b.down.sql": sql("SELECT 1")},
			want: "migration 002_b has no .up.sql",
		},
		{
			name: "empty up",
			fsys: fstest.MapFS{"001_a.up.sql": sql("")},
			want: "migration 001_a has no .up.sql",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := migrate.New(tc.fsys, "versions", nil)
			require.ErrorContains(t, err, tc.want)
		})
	}

	t.Run("ordered by number, not by name", func(t *testing.T) {
		t.Parallel()
		fsys := fstest.MapFS{}
		for i := 1; i <= 12; i++ {
			fsys[fmt.Sprintf("%d_m%d.up.sql", i, i)] = sql("SELECT 1")
		}
		m, err := migrate.New(fsys, "versions", nil)
		require.NoError(t, err)
		require.Equal(t, 12, m.Latest())
		for i, mg := range m.Migrations() {
			require.Equal(t, i+1, mg.Version)
		}
	})
}

func TestQuoteIdent(t *testing.T) {
	t.Parallel()
	require.Equal(t, `"versions"`, migrate.QuoteIdent("versions"))
	require.Equal(t, `"outbox"."versions"`, migrate.QuoteIdent("outbox.versions"))
	require.Equal(t, `"we""ird"`, migrate.QuoteIdent(`we"ird`))
}

func TestCancelledContext(t *testing.T) {
	t.Parallel()
	pool := newPool(t, pgtest.NewDatabase(t))
	m := coordinator(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err := m.Up(ctx, pool)
	require.ErrorIs(t, err, context.Canceled)
	cur, err := m.Current(t.Context(), pool)
	require.NoError(t, err)
	require.Equal(t, 0, cur)
}
