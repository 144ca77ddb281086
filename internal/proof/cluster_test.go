package proof

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"

	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/sdk"
)

func testLogger() *slog.Logger {
	if os.Getenv("TREATY_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// cluster is a set of in-process coordinators sharing one database. Every participant call
// they make goes through faults. crash stops one abruptly and starts a fresh one in its place,
// on the same address, so clients reconnect to it.
type cluster struct {
	db     string
	faults *injector
	log    *slog.Logger

	mu      sync.Mutex
	nodes   []*node
	crashes int
}

// node is one coordinator.
type node struct {
	addr string
	app  *app.App
	// dying is set when the node crashes: from then on its drivers record nothing more.
	dying atomic.Bool
}

func newCluster(t *testing.T, n int, faults *injector) *cluster {
	t.Helper()
	c := &cluster{db: pgtest.NewDatabase(t), faults: faults, log: testLogger()}
	for range n {
		nd, err := c.start("127.0.0.1:0")
		require.NoError(t, err)
		c.nodes = append(c.nodes, nd)
	}
	t.Cleanup(func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		for _, nd := range c.nodes {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			if err := nd.app.Stop(ctx); err != nil {
				t.Errorf("stop coordinator %s: %v", nd.addr, err)
			}
			cancel()
		}
		faults.Close()
	})
	return c
}

// start starts a coordinator on addr. A crashed node's port may not be free at once, so
// binding it again is retried for a few seconds.
func (c *cluster) start(addr string) (*node, error) {
	nd := &node{}
	cfg := app.Config{
		DB: c.db, DBMaxConns: 8, Listen: addr, Migrate: true, Logger: c.log,
		Engine: engine.Config{
			// Short leases and fast recovery: a crashed node's work moves on within a second or two.
			Lease: time.Second, RecoveryInterval: 100 * time.Millisecond,
			// Undo and commit calls fail about one time in six here, independently; ten failures
			// in a row of one call happen about once in sixty million.
			OperatorThreshold: 10,
			CrashPoint: func(point string) {
				// A driver passing a crash point after its coordinator began to crash ends there,
				// recording nothing, as if the process had died. (after-create is passed on a gRPC
				// handler's goroutine, which must return.)
				if nd.dying.Load() && point != engine.CrashAfterCreate {
					runtime.Goexit()
				}
			},
		},
		Invoke: invoke.Config{
			DialOptions: []grpc.DialOption{grpc.WithChainUnaryInterceptor(c.faults.client())},
			// The injected faults trip the breaker now and then; keep its pauses short.
			Breaker: invoke.BreakerConfig{FailureThreshold: 8, OpenTimeout: 300 * time.Millisecond},
		},
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		a, err := app.Start(context.Background(), cfg)
		if err == nil {
			nd.app, nd.addr = a, a.Addr
			return nd, nil
		}
		if addr == "127.0.0.1:0" || time.Now().After(deadline) {
			return nil, fmt.Errorf("start coordinator on %s: %w", addr, err)
		}
		t := time.NewTimer(50 * time.Millisecond)
		<-t.C
	}
}

// crash stops node i the way a crash would, as far as can be done in process: its drivers stop
// at their next crash point without recording, Stop runs with an already cancelled context so
// in-flight work is abandoned to lease expiry, and the gRPC server drops its connections. A
// fresh coordinator then starts on the same address. (Drivers idle in a retry backoff still hand
// their transaction back on the way out; a real crash would leave those to lease expiry too.)
func (c *cluster) crash(i int) error {
	c.mu.Lock()
	nd := c.nodes[i]
	c.mu.Unlock()
	nd.dying.Store(true)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_ = nd.app.Stop(ctx) // "engine stop: context canceled": nothing was handed back
	fresh, err := c.start(nd.addr)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.nodes[i] = fresh
	c.crashes++
	c.mu.Unlock()
	return nil
}

func (c *cluster) addr(i int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[i].addr
}

// takeovers returns, per mode, how many transactions were claimed again after their first
// owner: the work the crashes left to recovery. Saga and 2PC transactions are first claimed by
// their submit (epoch 1); TCC ones when the initiator decides and messages when submitted
// (epoch 2, after the unowned begin or prepare).
func (c *cluster) takeovers(t *testing.T) map[string]int64 {
	t.Helper()
	conn, err := pgx.Connect(context.Background(), c.db)
	require.NoError(t, err)
	defer conn.Close(context.Background())
	rows, err := conn.Query(context.Background(), `SELECT mode, count(*) FILTER (WHERE epoch > CASE WHEN mode IN ('tcc', 'msg') THEN 2 ELSE 1 END)
		FROM treaty_transactions GROUP BY mode`)
	require.NoError(t, err)
	out := map[string]int64{}
	var mode string
	var n int64
	_, err = pgx.ForEachRow(rows, []any{&mode, &n}, func() error {
		out[mode] = n
		return nil
	})
	require.NoError(t, err)
	return out
}

// client dials node i's address: it follows the node across crashes. faults, when set, apply to
// the client's calls to the coordinator.
func (c *cluster) client(t *testing.T, i int, faults *injector) *sdk.Client {
	t.Helper()
	opts := sdk.Options{Address: c.addr(i), Retries: 12, CallTimeout: 10 * time.Second}
	if faults != nil {
		opts.DialOptions = []grpc.DialOption{grpc.WithChainUnaryInterceptor(faults.client())}
	}
	cl, err := sdk.Dial(context.Background(), opts)
	require.NoError(t, err)
	t.Cleanup(func() { _ = cl.Close() })
	return cl
}
