package sqlite_test

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/internal/store/sqlite"
	"github.com/treatyhq/treaty/internal/store/storetest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// open opens dsn and closes it when the test ends.
func open(t *testing.T, dsn string) *sqlite.Store {
	t.Helper()
	s, err := sqlite.Open(t.Context(), dsn)
	require.NoError(t, err)
	t.Cleanup(s.Close)
	return s
}

// migrated opens dsn and applies the schema.
func migrated(t *testing.T, dsn string) *sqlite.Store {
	t.Helper()
	s := open(t, dsn)
	_, err := s.Migrate(t.Context())
	require.NoError(t, err)
	return s
}

func tempFile(t *testing.T) string {
	t.Helper()
	return filepath.Join(t.TempDir(), "treaty.db")
}

// The suite runs on both kinds of database dev mode offers: a file (WAL) and memory.
func TestConformance(t *testing.T) {
	t.Parallel()
	t.Run("File", func(t *testing.T) {
		t.Parallel()
		storetest.Run(t, func(t *testing.T) store.Store { return migrated(t, tempFile(t)) })
	})
	t.Run("Memory", func(t *testing.T) {
		t.Parallel()
		storetest.Run(t, func(t *testing.T) store.Store { return migrated(t, sqlite.Memory) })
	})
}

func TestOpenRefusesEmptyDSN(t *testing.T) {
	t.Parallel()
	_, err := sqlite.Open(t.Context(), " ")
	require.ErrorContains(t, err, "dsn is empty")
}

func TestOpenMissingDirectory(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "no", "such", "dir", "treaty.db")
	_, err := sqlite.Open(t.Context(), path)
	require.Error(t, err)
	require.Contains(t, err.Error(), path, "the error names the file")
}

// A file database is set up the way the package doc says: WAL, foreign keys, busy timeout.
func TestFilePragmas(t *testing.T) {
	t.Parallel()
	s := migrated(t, tempFile(t))
	var mode string
	var fk, busy, sync int
	require.NoError(t, s.DB().QueryRowContext(t.Context(), "PRAGMA journal_mode").Scan(&mode))
	require.NoError(t, s.DB().QueryRowContext(t.Context(), "PRAGMA foreign_keys").Scan(&fk))
	require.NoError(t, s.DB().QueryRowContext(t.Context(), "PRAGMA busy_timeout").Scan(&busy))
	require.NoError(t, s.DB().QueryRowContext(t.Context(), "PRAGMA synchronous").Scan(&sync))
	require.Equal(t, "wal", mode)
	require.Equal(t, 1, fk)
	require.Equal(t, int(sqlite.BusyTimeout.Milliseconds()), busy)
	require.Equal(t, 2, sync, "synchronous=FULL: a commit survives a power cut")
}

// The foreign keys are enforced: a branch cannot name a transaction that does not exist.
func TestForeignKeysEnforced(t *testing.T) {
	t.Parallel()
	s := migrated(t, sqlite.Memory)
	_, err := s.DB().ExecContext(t.Context(),
		`INSERT INTO treaty_branches (gid, branch, op, position, status, updated_at) VALUES ('nobody', 'b', 'action', 0, 'pending', 0)`)
	require.ErrorContains(t, err, "FOREIGN KEY")
}

func createParams(gid string) store.CreateParams {
	return store.CreateParams{
		GID: gid, Mode: "saga", Status: "running", Spec: []byte{1}, SpecHash: []byte{2},
		Timeout: time.Hour, Owner: "replica-a", Lease: time.Minute,
		Branches: []store.Branch{{Branch: "flight", Op: "action", Status: "pending"}},
		Events:   []store.Event{{Kind: "submitted"}},
	}
}

// What was committed to a file is there after it is closed and opened again.
func TestFileSurvivesReopen(t *testing.T) {
	t.Parallel()
	path := tempFile(t)
	s, err := sqlite.Open(t.Context(), path)
	require.NoError(t, err)
	_, err = s.Migrate(t.Context())
	require.NoError(t, err)
	res, err := s.CreateTransaction(t.Context(), createParams("durable"))
	require.NoError(t, err)
	require.True(t, res.Created)
	s.Close()

	again := open(t, path)
	require.NoError(t, again.Ping(t.Context()), "the schema is still current")
	tx, bs, err := again.GetTransaction(t.Context(), "durable")
	require.NoError(t, err)
	require.Equal(t, "replica-a", tx.LeaseOwner)
	require.True(t, res.Transaction.LeaseExpiresAt.Equal(tx.LeaseExpiresAt))
	require.Len(t, bs, 1)
}

// Each ":memory:" store is a database of its own.
func TestMemoryStoresAreSeparate(t *testing.T) {
	t.Parallel()
	a := migrated(t, sqlite.Memory)
	b := migrated(t, sqlite.Memory)
	_, err := a.CreateTransaction(t.Context(), createParams("only-in-a"))
	require.NoError(t, err)
	_, _, err = b.GetTransaction(t.Context(), "only-in-a")
	require.ErrorIs(t, err, store.ErrNotFound)
}

// Times are stored as integer unix microseconds in UTC, and read back in UTC.
func TestTimestampsAreUnixMicros(t *testing.T) {
	t.Parallel()
	s := migrated(t, sqlite.Memory)
	res, err := s.CreateTransaction(t.Context(), createParams("micros"))
	require.NoError(t, err)
	var created, lease int64
	require.NoError(t, s.DB().QueryRowContext(t.Context(),
		`SELECT created_at, lease_expires_at FROM treaty_transactions WHERE gid = 'micros'`).Scan(&created, &lease))
	require.Equal(t, res.Transaction.CreatedAt.UnixMicro(), created)
	require.Equal(t, res.Transaction.LeaseExpiresAt.UnixMicro(), lease)
	require.Equal(t, time.UTC, res.Transaction.CreatedAt.Location())
	require.Zero(t, res.Transaction.CreatedAt.Nanosecond()%1000, "microsecond precision, as PostgreSQL keeps")
}

func TestPingSchemaBehind(t *testing.T) {
	t.Parallel()
	s := open(t, tempFile(t))
	m, err := sqlite.Migrations()
	require.NoError(t, err)

	err = s.Ping(t.Context())
	require.Error(t, err, "an empty database is not ready")
	require.Contains(t, err.Error(), fmt.Sprintf("schema at version 0, this binary needs %d", m.Latest()))
	require.Contains(t, err.Error(), "Migrate", "the error says what to do")

	// One version behind the binary.
	_, err = s.MigrateTo(t.Context(), m.Latest()-1)
	require.NoError(t, err)
	require.ErrorContains(t, s.Ping(t.Context()), fmt.Sprintf("schema at version %d", m.Latest()-1))

	_, err = s.Migrate(t.Context())
	require.NoError(t, err)
	require.NoError(t, s.Ping(t.Context()))
}

func TestPingSchemaNewer(t *testing.T) {
	t.Parallel()
	s := migrated(t, sqlite.Memory)
	// A newer binary migrated this database further than this binary knows.
	_, err := s.DB().ExecContext(t.Context(), "INSERT INTO "+sqlite.VersionTable+" (version, name, applied_at) VALUES (999, 'from_the_future', 0)")
	require.NoError(t, err)

	err = s.Ping(t.Context())
	require.Error(t, err)
	require.Contains(t, err.Error(), "999")
	require.Contains(t, err.Error(), "upgrade", "migrating cannot help; the binary is what is old")
	require.NotContains(t, err.Error(), "Migrate")

	_, err = s.Migrate(t.Context())
	require.ErrorContains(t, err, "upgrade the binary", "an old binary does not touch a newer schema")
}

func TestPingClosed(t *testing.T) {
	t.Parallel()
	s, err := sqlite.Open(t.Context(), sqlite.Memory)
	require.NoError(t, err)
	s.Close()
	require.ErrorContains(t, s.Ping(t.Context()), "database unreachable")
}

func TestMigrateTwiceAndDown(t *testing.T) {
	t.Parallel()
	s := open(t, tempFile(t))
	m, err := sqlite.Migrations()
	require.NoError(t, err)

	first, err := s.Migrate(t.Context())
	require.NoError(t, err)
	require.Equal(t, 0, first.From)
	require.Equal(t, m.Latest(), first.To)
	require.Len(t, first.Applied, m.Latest())

	second, err := s.Migrate(t.Context())
	require.NoError(t, err)
	require.Empty(t, second.Applied)
	require.Equal(t, m.Latest(), second.From)
	require.Equal(t, m.Latest(), second.To)

	// Down to nothing removes every table but the version table; up again works.
	down, err := s.MigrateTo(t.Context(), 0)
	require.NoError(t, err)
	require.Equal(t, 0, down.To)
	require.Len(t, down.Applied, m.Latest())
	require.Less(t, down.Applied[0], 0, "a down step is reported negative")
	var n int
	require.NoError(t, s.DB().QueryRowContext(t.Context(),
		`SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name LIKE 'treaty_%' AND name <> ?`, sqlite.VersionTable).Scan(&n))
	require.Zero(t, n)
	require.Error(t, s.Ping(t.Context()))

	_, err = s.Migrate(t.Context())
	require.NoError(t, err)
	require.NoError(t, s.Ping(t.Context()))

	_, err = s.MigrateTo(t.Context(), m.Latest()+1)
	require.ErrorContains(t, err, "out of range")
}

// Several processes (here: handles) migrating one file at once apply each migration once.
func TestConcurrentMigrators(t *testing.T) {
	t.Parallel()
	path := tempFile(t)
	const n = 4
	stores := make([]*sqlite.Store, n)
	for i := range stores {
		stores[i] = open(t, path)
	}
	var wg sync.WaitGroup
	applied := make([]int, n)
	errs := make([]error, n)
	for i, s := range stores {
		wg.Go(func() {
			res, err := s.Migrate(t.Context())
			applied[i], errs[i] = len(res.Applied), err
		})
	}
	wg.Wait()
	total := 0
	for i := range n {
		require.NoError(t, errs[i], "migrator %d", i)
		total += applied[i]
	}
	m, err := sqlite.Migrations()
	require.NoError(t, err)
	require.Equal(t, m.Latest(), total, "each migration applied once")
}

// Record promises one commit for the whole batch: if one write fails, none is applied.
func TestRecordBatchIsOneCommit(t *testing.T) {
	t.Parallel()
	s := migrated(t, sqlite.Memory)
	ctx := t.Context()
	for _, gid := range []string{"one", "two"} {
		res, err := s.CreateTransaction(ctx, createParams(gid))
		require.NoError(t, err)
		require.True(t, res.Created)
	}
	// A trigger makes the second write of the batch fail after the first was made.
	_, err := s.DB().ExecContext(ctx, `CREATE TRIGGER fail_broken BEFORE UPDATE ON treaty_transactions
		WHEN NEW.status = 'broken' BEGIN SELECT RAISE(ABORT, 'broken on purpose'); END`)
	require.NoError(t, err)

	_, err = s.Record(ctx, []store.RecordParams{
		{GID: "one", Epoch: 1, Status: "first-written", Lease: time.Minute, Events: []store.Event{{Kind: "x"}}},
		{GID: "two", Epoch: 1, Status: "broken", Lease: time.Minute},
	})
	require.ErrorContains(t, err, `record "two"`, "the error names the transaction whose write failed")

	tx, _, err := s.GetTransaction(ctx, "one")
	require.NoError(t, err)
	require.Equal(t, "running", tx.Status, "the first write of a failed batch is rolled back")
	es, err := s.ListEvents(ctx, "one")
	require.NoError(t, err)
	require.Len(t, es, 1, "only the creation's event")

	// The store is still usable after a failed batch.
	res, err := s.Record(ctx, []store.RecordParams{{GID: "one", Epoch: 1, Status: "ok", Lease: time.Minute}})
	require.NoError(t, err)
	require.True(t, res[0].Owned)
}

// Two handles on one file stand for two processes on one machine: SQLite's file lock, taken by
// BEGIN IMMEDIATE, must keep their claims disjoint.
func TestClaimTwoHandles(t *testing.T) {
	t.Parallel()
	path := tempFile(t)
	a := migrated(t, path)
	b := open(t, path)
	ctx := t.Context()

	const n = 60
	for i := range n {
		gid := fmt.Sprintf("tx-%03d", i)
		res, err := a.CreateTransaction(ctx, createParams(gid))
		require.NoError(t, err)
		require.True(t, res.Created)
		require.NoError(t, a.ReleaseLeases(ctx, "replica-a", []store.Release{{GID: gid, Epoch: 1}}))
	}

	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		seen = map[string]string{}
		errs []error
	)
	for i, s := range []*sqlite.Store{a, b, a, b} {
		owner := fmt.Sprintf("claimer-%d", i)
		wg.Go(func() {
			for {
				cs, err := s.ClaimDue(ctx, store.ClaimParams{Owner: owner, Lease: time.Minute, Limit: 4})
				mu.Lock()
				if err != nil {
					errs = append(errs, err)
				}
				for _, c := range cs {
					if prev, ok := seen[c.Transaction.GID]; ok {
						errs = append(errs, fmt.Errorf("%s claimed by %s and %s", c.Transaction.GID, prev, owner))
					}
					seen[c.Transaction.GID] = owner
				}
				mu.Unlock()
				if err != nil || len(cs) == 0 {
					return
				}
			}
		})
	}
	wg.Wait()
	require.NoError(t, errors.Join(errs...))
	require.Len(t, seen, n, "with the lock held, a claimer stops only when nothing is left")

	var maxEpoch int64
	require.NoError(t, a.DB().QueryRowContext(ctx, "SELECT max(epoch) FROM treaty_transactions").Scan(&maxEpoch))
	require.Equal(t, int64(2), maxEpoch, "no transaction was claimed twice")
}

// A write from another process that holds the lock is waited for (busy timeout), not failed.
func TestWaitsForOtherWriter(t *testing.T) {
	t.Parallel()
	path := tempFile(t)
	a := migrated(t, path)
	b := open(t, path)
	ctx := t.Context()

	// b holds the write lock, as another process in the middle of a commit would.
	held, err := b.DB().BeginTx(ctx, nil)
	require.NoError(t, err)
	_, err = held.ExecContext(ctx, "INSERT INTO "+sqlite.VersionTable+" (version, name, applied_at) VALUES (-1, 'held', 0)")
	require.NoError(t, err)

	done := make(chan error, 1)
	go func() {
		_, err := a.CreateTransaction(ctx, createParams("after-lock"))
		done <- err
	}()
	select {
	case err := <-done:
		t.Fatalf("create finished while another writer held the lock: %v", err)
	case <-time.After(100 * time.Millisecond):
		// Still waiting, as it should be.
	}
	require.NoError(t, held.Rollback())
	require.NoError(t, <-done)
	_, _, err = a.GetTransaction(ctx, "after-lock")
	require.NoError(t, err)
}

// Every embedded migration can be undone (TestMigrateTwiceAndDown runs them).
func TestSchemaFilesNamed(t *testing.T) {
	t.Parallel()
	m, err := sqlite.Migrations()
	require.NoError(t, err)
	require.GreaterOrEqual(t, m.Latest(), 1)
	for _, mg := range m.Migrations() {
		require.NotEmpty(t, mg.Down, "migration %03d_%s has a .down.sql", mg.Version, mg.Name)
	}
}
