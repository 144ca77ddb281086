package postgres_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/internal/store/postgres"
	"github.com/treatyhq/treaty/internal/store/storetest"
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

// open connects to url with a small pool: many tests run at once against one server.
func open(t *testing.T, url string) *postgres.Store {
	t.Helper()
	s, err := postgres.Open(t.Context(), url, 6)
	require.NoError(t, err)
	t.Cleanup(s.Close)
	return s
}

// newStore is a migrated store on a database of its own.
func newStore(t *testing.T) *postgres.Store {
	t.Helper()
	s := open(t, pgtest.NewDatabase(t))
	_, err := postgres.Migrate(t.Context(), s.Pool())
	require.NoError(t, err)
	return s
}

func TestConformance(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) store.Store { return newStore(t) })
}

func TestPingSchemaBehind(t *testing.T) {
	t.Parallel()
	s := open(t, pgtest.NewDatabase(t))
	m, err := postgres.Migrator()
	require.NoError(t, err)

	err = s.Ping(t.Context())
	require.Error(t, err, "an empty database is not ready")
	require.Contains(t, err.Error(), "coordinator migrate", "the error tells the operator what to run")
	require.Contains(t, err.Error(), fmt.Sprintf("schema at version 0, this binary needs %d", m.Latest()))

	// One version behind the binary (the latest migration not applied yet).
	_, err = m.To(t.Context(), s.Pool(), m.Latest()-1)
	require.NoError(t, err)
	err = s.Ping(t.Context())
	require.ErrorContains(t, err, "coordinator migrate")

	_, err = postgres.Migrate(t.Context(), s.Pool())
	require.NoError(t, err)
	require.NoError(t, s.Ping(t.Context()))
}

func TestPingSchemaNewer(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	// A newer binary migrated this database further than this binary knows.
	_, err := s.Pool().Exec(t.Context(), "INSERT INTO "+postgres.VersionTable+" (version, name) VALUES (999, 'from_the_future')")
	require.NoError(t, err)

	err = s.Ping(t.Context())
	require.Error(t, err)
	require.Contains(t, err.Error(), "999")
	require.Contains(t, err.Error(), "upgrade", "running migrate cannot help; the binary is what is old")
	require.NotContains(t, err.Error(), "run `coordinator migrate`")
}

func TestPingUnreachable(t *testing.T) {
	t.Parallel()
	// A port nobody listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close())

	s := open(t, "postgres://postgres@"+addr+"/treaty?sslmode=disable&connect_timeout=5")
	err = s.Ping(t.Context())
	require.ErrorContains(t, err, "database unreachable")
}

func TestOpenBadURL(t *testing.T) {
	t.Parallel()
	_, err := postgres.Open(t.Context(), "postgres://%zz", 0)
	require.ErrorContains(t, err, "parse database url")
}

func TestMigrateTwice(t *testing.T) {
	t.Parallel()
	s := open(t, pgtest.NewDatabase(t))
	m, err := postgres.Migrator()
	require.NoError(t, err)

	first, err := postgres.Migrate(t.Context(), s.Pool())
	require.NoError(t, err)
	require.Equal(t, 0, first.From)
	require.Equal(t, m.Latest(), first.To)
	require.Len(t, first.Applied, m.Latest())

	second, err := postgres.Migrate(t.Context(), s.Pool())
	require.NoError(t, err)
	require.Empty(t, second.Applied)
	require.Equal(t, m.Latest(), second.To)
}

// Record promises one commit for the whole batch: if one write fails, none is applied.
func TestRecordBatchIsOneCommit(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	ctx := t.Context()
	for _, gid := range []string{"one", "two"} {
		res, err := s.CreateTransaction(ctx, store.CreateParams{
			GID: gid, Mode: "saga", Status: "running", Spec: []byte{1}, SpecHash: []byte{2},
			Timeout: time.Hour, Owner: "replica-a", Lease: time.Minute,
			Branches: []store.Branch{{Branch: "flight", Op: "action", Status: "pending"}},
		})
		require.NoError(t, err)
		require.True(t, res.Created)
	}

	// The same branch twice in one write is an error in PostgreSQL (an upsert may not touch a
	// row twice), which makes a convenient failure in the middle of a batch.
	dup := store.Branch{Branch: "flight", Op: "action", Status: "succeeded"}
	_, err := s.Record(ctx, []store.RecordParams{
		{GID: "one", Epoch: 1, Status: "first-written", Lease: time.Minute, Events: []store.Event{{Kind: "x"}}},
		{GID: "two", Epoch: 1, Status: "broken", Lease: time.Minute, Branches: []store.Branch{dup, dup}},
	})
	require.ErrorContains(t, err, `record "two"`, "the error names the transaction whose write failed")

	tx, _, err := s.GetTransaction(ctx, "one")
	require.NoError(t, err)
	require.Equal(t, "running", tx.Status, "the first write of a failed batch is rolled back")
	es, err := s.ListEvents(ctx, "one")
	require.NoError(t, err)
	require.Empty(t, es)

	// The pool is still usable after a failed batch.
	res, err := s.Record(ctx, []store.RecordParams{{GID: "one", Epoch: 1, Status: "ok", Lease: time.Minute}})
	require.NoError(t, err)
	require.True(t, res[0].Owned)
}

// Two replicas are two pools, as in production; SKIP LOCKED must keep their claims disjoint.
func TestClaimTwoReplicas(t *testing.T) {
	t.Parallel()
	url := pgtest.NewDatabase(t)
	a := open(t, url)
	_, err := postgres.Migrate(t.Context(), a.Pool())
	require.NoError(t, err)
	b := open(t, url)
	ctx := t.Context()

	const n = 60
	for i := range n {
		gid := fmt.Sprintf("tx-%03d", i)
		res, err := a.CreateTransaction(ctx, store.CreateParams{
			GID: gid, Mode: "saga", Status: "running", Spec: []byte{1}, SpecHash: []byte{2},
			Timeout: time.Hour, Owner: "boot", Lease: time.Minute,
		})
		require.NoError(t, err)
		require.True(t, res.Created)
		require.NoError(t, a.ReleaseLeases(ctx, "boot", []store.Release{{GID: gid, Epoch: 1}}))
	}

	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		seen = map[string]string{}
		errs []error
	)
	for i, s := range []*postgres.Store{a, b, a, b} {
		owner := fmt.Sprintf("replica-%d", i)
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
	require.Empty(t, errs)
	rest, err := a.ClaimDue(ctx, store.ClaimParams{Owner: "sweeper", Lease: time.Minute, Limit: n})
	require.NoError(t, err)
	require.Equal(t, n, len(seen)+len(rest))

	var total, maxEpoch int64
	require.NoError(t, a.Pool().QueryRow(ctx, "SELECT count(*), max(epoch) FROM treaty_transactions").Scan(&total, &maxEpoch))
	require.Equal(t, int64(n), total)
	require.Equal(t, int64(2), maxEpoch, "no transaction was claimed twice")
}

// The store uses the pool it is given and closes it on Close.
func TestNewWrapsPool(t *testing.T) {
	t.Parallel()
	url := pgtest.NewDatabase(t)
	pool, err := pgxpool.New(context.Background(), url)
	require.NoError(t, err)
	s := postgres.New(pool)
	require.Same(t, pool, s.Pool())
	_, err = postgres.Migrate(t.Context(), pool)
	require.NoError(t, err)
	require.NoError(t, s.Ping(t.Context()))
	s.Close()
	require.Error(t, pool.Ping(t.Context()), "Close closes the pool")
}
