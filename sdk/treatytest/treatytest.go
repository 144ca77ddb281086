// Package treatytest starts a real Treaty coordinator for a test: on a fresh PostgreSQL database
// of its own, serving gRPC on loopback, stopped when the test ends. It is the one package of the
// SDK that reaches into the coordinator's internals, so that a user's test of a saga against a
// real coordinator takes three lines:
//
//	coord := treatytest.Start(t, treatytest.Options{})
//	client := coord.Client(t)
//	tx, err := client.Saga(ctx, sdk.Saga{...})
//
// The database comes from TREATY_TEST_DATABASE_URL when it is set, otherwise from a throwaway
// cluster built from local PostgreSQL binaries, otherwise from Docker (see internal/pgtest).
package treatytest

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/store/sqlite"
	"github.com/treatyhq/treaty/sdk"
)

// Options tune the test coordinator. Zero values suit tests: a short lease and a fast recovery
// loop so that recovery paths run in well under a second.
type Options struct {
	// DatabaseURL uses this database instead of creating one (it must be migrated or empty).
	DatabaseURL string
	// Lease, RecoveryInterval and OperatorThreshold default to 2s, 100ms and 5.
	Lease             time.Duration
	RecoveryInterval  time.Duration
	OperatorThreshold int
	// Logger receives the coordinator's logs; nil discards them.
	Logger *slog.Logger
}

// Coordinator is a running test coordinator.
type Coordinator struct {
	// Addr is the gRPC address, host:port.
	Addr string
	// DatabaseURL is the database it uses.
	DatabaseURL string
	app         *app.App
	stopOnce    sync.Once
	stopErr     error
}

// Start starts a coordinator for t and stops it when t ends.
func Start(t testing.TB, opts Options) *Coordinator {
	t.Helper()
	db := opts.DatabaseURL
	if db == "" {
		db = pgtest.NewDatabase(t)
	}
	ec := engine.Config{Lease: opts.Lease, RecoveryInterval: opts.RecoveryInterval, OperatorThreshold: opts.OperatorThreshold}
	if ec.Lease == 0 {
		ec.Lease = 2 * time.Second
	}
	if ec.RecoveryInterval == 0 {
		ec.RecoveryInterval = 100 * time.Millisecond
	}
	if ec.OperatorThreshold == 0 {
		ec.OperatorThreshold = 5
	}
	a, err := app.Start(context.Background(), app.Config{DB: db, Listen: "127.0.0.1:0", Migrate: true, Engine: ec, Logger: opts.Logger})
	if err != nil {
		t.Fatalf("treatytest: start coordinator: %v", err)
	}
	c := &Coordinator{Addr: a.Addr, DatabaseURL: db, app: a}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("treatytest: stop coordinator: %v", err)
		}
	})
	return c
}

// StartReplicas starts n coordinators sharing one database (opts.DatabaseURL, or a fresh one),
// as replicas behind a load balancer are. Stop one with Close to see the others take over.
func StartReplicas(t testing.TB, n int, opts Options) []*Coordinator {
	t.Helper()
	if opts.DatabaseURL == "" {
		opts.DatabaseURL = pgtest.NewDatabase(t)
	}
	out := make([]*Coordinator, n)
	for i := range out {
		out[i] = Start(t, opts)
	}
	return out
}

// ClientOf returns an SDK client of several coordinators (round-robin, moving to another
// replica when one is unavailable), closed when t ends.
func ClientOf(t testing.TB, coords ...*Coordinator) *sdk.Client {
	t.Helper()
	addrs := make([]string, len(coords))
	for i, c := range coords {
		addrs[i] = c.Addr
	}
	cl, err := sdk.Dial(context.Background(), sdk.Options{Addresses: addrs})
	if err != nil {
		t.Fatalf("treatytest: dial: %v", err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// Client returns an SDK client connected to the coordinator, closed when t ends.
func (c *Coordinator) Client(t testing.TB) *sdk.Client {
	t.Helper()
	cl, err := sdk.Dial(context.Background(), sdk.Options{Address: c.Addr})
	if err != nil {
		t.Fatalf("treatytest: dial: %v", err)
	}
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}

// RequireSucceeded fails t unless the transaction gid ends succeeded within timeout.
func (c *Coordinator) RequireSucceeded(t testing.TB, cl *sdk.Client, gid string, timeout time.Duration) *sdk.Transaction {
	t.Helper()
	tx, err := cl.Wait(context.Background(), gid, timeout)
	if err != nil {
		t.Fatalf("treatytest: transaction %q: %v", gid, err)
	}
	if tx.Status != sdk.StatusSucceeded {
		t.Fatalf("treatytest: transaction %q is %s (%s): %s", gid, tx.Status, tx.Phase, tx.Reason)
	}
	return tx
}

// WrapTestMain runs m and stops the throwaway PostgreSQL cluster if one was started. Call it
// from TestMain: os.Exit(treatytest.WrapTestMain(m)).
func WrapTestMain(m *testing.M) int { return pgtest.WrapTestMain(m) }

// NewEmbedded starts a coordinator on an in-memory embedded store, with no database server and
// no testing.TB: for Example functions, demos and programs. Close stops it.
func NewEmbedded(ctx context.Context) (*Coordinator, error) {
	st, err := sqlite.Open(ctx, sqlite.Memory)
	if err != nil {
		return nil, err
	}
	if _, err := st.Migrate(ctx); err != nil {
		st.Close()
		return nil, err
	}
	a, err := app.Start(ctx, app.Config{Store: st, Listen: "127.0.0.1:0",
		Engine: engine.Config{Lease: 2 * time.Second, RecoveryInterval: 100 * time.Millisecond, OperatorThreshold: 5}})
	if err != nil {
		st.Close()
		return nil, err
	}
	return &Coordinator{Addr: a.Addr, app: a}, nil
}

// Close stops the coordinator: one started by NewEmbedded when done with it, or one of
// Start's before the test ends (a replica going away). Later calls return the first's result.
func (c *Coordinator) Close() error {
	c.stopOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c.stopErr = c.app.Stop(ctx)
	})
	return c.stopErr
}
