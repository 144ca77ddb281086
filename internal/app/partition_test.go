package app_test

import (
	"context"
	"fmt"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/netfault"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// callLog records, on the coordinator's side, every participant call one replica makes.
type callLog struct {
	mu    sync.Mutex
	calls []loggedCall
}

type loggedCall struct {
	gid, branch, op string
	start, end      time.Time
}

func (l *callLog) option() grpc.DialOption {
	return grpc.WithChainUnaryInterceptor(func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, inv grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		md, _ := metadata.FromOutgoingContext(ctx)
		first := func(k string) string {
			if v := md.Get(k); len(v) > 0 {
				return v[0]
			}
			return ""
		}
		c := loggedCall{gid: first(invoke.MetadataGID), branch: first(invoke.MetadataBranch), op: first(invoke.MetadataOp), start: time.Now()}
		err := inv(ctx, method, req, reply, cc, opts...)
		c.end = time.Now()
		l.mu.Lock()
		l.calls = append(l.calls, c)
		l.mu.Unlock()
		return err
	})
}

func (l *callLog) all() []loggedCall {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]loggedCall(nil), l.calls...)
}

// viaProxy rewrites a database URL to go through a proxy.
func viaProxy(t *testing.T, db, proxyAddr string) string {
	t.Helper()
	u, err := url.Parse(db)
	require.NoError(t, err)
	u.Host = proxyAddr
	return u.String()
}

func hostOf(t *testing.T, db string) string {
	t.Helper()
	u, err := url.Parse(db)
	require.NoError(t, err)
	return u.Host
}

// TestReplicaCutOffFromPostgres: replica A loses its link to PostgreSQL in the middle of work
// (a blackhole longer than the lease). A makes no participant call once its lease could have
// expired; replica B takes the work over and finishes it. After the link heals, A writes nothing
// (its epochs are stale), every step ran at least once and at most once more (the call in flight
// at the cut, repeated by B), and nothing is left running.
func TestReplicaCutOffFromPostgres(t *testing.T) {
	t.Parallel()
	const lease = 2 * time.Second
	db := pgtest.NewDatabase(t)
	proxy, err := netfault.Start(hostOf(t, db))
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	part, err := testparticipant.Start(testparticipant.Options{Script: func(ctx context.Context, _ testparticipant.Call) error {
		select { // a little work per call, so that calls are in flight when the link is cut
		case <-time.After(20 * time.Millisecond):
		case <-ctx.Done():
		}
		return nil
	}})
	require.NoError(t, err)
	t.Cleanup(part.Stop)

	start := func(name, dsn string, log *callLog) *app.App {
		a, err := app.Start(context.Background(), app.Config{DB: dsn, Listen: "127.0.0.1:0", Migrate: true, Logger: testLogger(t),
			Engine: engine.Config{Owner: name, Lease: lease, RecoveryInterval: 100 * time.Millisecond},
			Invoke: invoke.Config{DialOptions: []grpc.DialOption{log.option()}}})
		require.NoError(t, err)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_ = a.Stop(ctx)
		})
		return a
	}
	var logA, logB callLog
	a := start("replica-a", viaProxy(t, db, proxy.Addr()), &logA)
	t.Cleanup(proxy.Heal) // runs before A's Stop: a blackholed replica cannot stop cleanly
	client := func(a *app.App) treatyv1.CoordinatorClient {
		conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		t.Cleanup(func() { _ = conn.Close() })
		return treatyv1.NewCoordinatorClient(conn)
	}
	ca := client(a)

	const sagas, steps = 8, 10
	var specs []*treatyv1.SagaStep
	for i := range steps {
		name := fmt.Sprintf("s%d", i)
		st := &treatyv1.SagaStep{Name: name,
			Action:      &treatyv1.Call{Target: part.Target("test.Svc/Do"), Payload: []byte("do")},
			Compensate:  &treatyv1.Call{Target: part.Target("test.Svc/Undo"), Payload: []byte("undo")},
			CallTimeout: durationpb.New(500 * time.Millisecond),
			Retry:       &treatyv1.RetryPolicy{MaxAttempts: 20, InitialBackoff: durationpb.New(20 * time.Millisecond), MaxBackoff: durationpb.New(200 * time.Millisecond)},
		}
		if i > 0 {
			st.DependsOn = []string{fmt.Sprintf("s%d", i-1)}
		}
		specs = append(specs, st)
	}
	gids := make([]string, sagas)
	for i := range gids {
		gids[i] = fmt.Sprintf("cut-%02d", i)
		_, err := ca.SubmitSaga(t.Context(), &treatyv1.SubmitSagaRequest{Gid: gids[i], Saga: &treatyv1.SagaSpec{Steps: specs}})
		require.NoError(t, err)
	}
	require.Eventually(t, func() bool { return len(part.Calls()) >= sagas*2 }, 60*time.Second, 5*time.Millisecond, "A is at work")

	cut := time.Now()
	proxy.Blackhole()
	b := start("replica-b", db, &logB)
	cb := client(b)

	terminal := func(c treatyv1.CoordinatorClient) bool {
		for _, gid := range gids {
			res, err := c.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: gid})
			if err != nil || !isTerminal(res.Transaction.Status) {
				return false
			}
		}
		return true
	}
	require.Eventually(t, func() bool { return terminal(cb) }, 90*time.Second, 50*time.Millisecond, "B finishes A's work")
	healed := time.Now()
	require.Greater(t, healed.Sub(cut), lease, "B could only take over once A's lease had expired")

	// A's calls: none started after its lease could have expired, and every call it had in flight
	// ended by then (its timeout is bounded by the lease). The slack covers scheduling between the
	// driver's decision and the wire on a loaded machine; B's work and the heal come much later.
	const slack = time.Second
	for _, c := range logA.all() {
		require.True(t, c.start.Before(cut.Add(lease+slack)), "A started %s %s of %s %s after the cut (lease %s)", c.op, c.branch, c.gid, c.start.Sub(cut), lease)
		require.True(t, c.end.Before(cut.Add(lease+2*slack)), "A's call %s %s of %s ended %s after the cut", c.op, c.branch, c.gid, c.end.Sub(cut))
	}
	require.NotEmpty(t, logB.all(), "B made calls: it took work over")
	afterCut := 0
	for _, c := range logA.all() {
		if c.end.After(cut) {
			afterCut++
		}
	}
	t.Logf("A made %d calls (%d still running at the cut), B %d; all terminal %s after the cut", len(logA.all()), afterCut, len(logB.all()), healed.Sub(cut).Round(time.Millisecond))

	proxy.Heal()
	// A reconnects; give it a few leases to try to act on its stale view, then check it did not.
	require.Eventually(t, func() bool { return a.Store.Ping(t.Context()) == nil }, 60*time.Second, 50*time.Millisecond)
	require.Eventually(t, func() bool { return a.Engine.Active() == 0 }, 60*time.Second, 50*time.Millisecond, "A drops what it lost")
	settle := time.Now().Add(3 * lease)
	require.Eventually(t, func() bool { return time.Now().After(settle) }, 30*time.Second, 100*time.Millisecond)
	for _, c := range logA.all() {
		require.True(t, c.start.Before(cut.Add(lease+slack)), "after heal A called %s %s of %s", c.op, c.branch, c.gid)
	}
	require.True(t, terminal(ca), "A, healed, reads the same finished transactions")

	repeats := 0
	defer func() { t.Logf("%d steps ran twice (in flight or unrecorded at the cut, repeated by B)", repeats) }()
	byA := map[string]bool{}
	for _, c := range logA.all() {
		byA[c.gid+"/"+c.branch+"/"+c.op] = true
	}
	for _, gid := range gids {
		res, err := cb.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: gid})
		require.NoError(t, err)
		require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status, gid)
		seen := map[string]int{}
		for _, c := range part.CallsFor(gid) {
			seen[c.Branch+"/"+c.Op]++
		}
		for i := range steps {
			k := fmt.Sprintf("s%d/action", i)
			if seen[k] > 1 {
				repeats++
			}
			require.GreaterOrEqual(t, seen[k], 1, "%s %s ran", gid, k)
			if seen[k] > 1 {
				require.Equal(t, 2, seen[k], "%s %s: at most the call in flight at the cut and B's repeat", gid, k)
				require.True(t, byA[gid+"/"+k], "%s %s repeated: A had called it", gid, k)
			}
		}
		require.Zero(t, seen["s0/compensate"], "%s: nothing turned back", gid)
	}
}

// TestParticipantLinkLatencyAndResets: the link between the coordinator and a participant is
// slow and its connections are reset again and again; every saga still finishes, every step
// ran, none was turned back.
func TestParticipantLinkLatencyAndResets(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	proxy, err := netfault.Start(b.part.Addr)
	require.NoError(t, err)
	t.Cleanup(proxy.Close)
	proxy.SetLatency(5 * time.Millisecond)
	step := func(name string) *treatyv1.SagaStep {
		return &treatyv1.SagaStep{Name: name,
			Action:      &treatyv1.Call{Target: "grpc://" + proxy.Addr() + "/test.Svc/Do", Payload: []byte("do")},
			Compensate:  &treatyv1.Call{Target: "grpc://" + proxy.Addr() + "/test.Svc/Undo", Payload: []byte("undo")},
			CallTimeout: durationpb.New(2 * time.Second),
			Retry:       &treatyv1.RetryPolicy{MaxAttempts: 100, InitialBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(100 * time.Millisecond)},
		}
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
				proxy.Reset()
			}
		}
	}()
	// Sagas keep arriving while connections are reset under them.
	n := 0
	for n < 10 || proxy.Resets() < 20 {
		_, err := b.client.SubmitSaga(t.Context(), &treatyv1.SubmitSagaRequest{Gid: fmt.Sprintf("rst-%02d", n),
			Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{step("a"), step("b"), step("c")}}})
		require.NoError(t, err)
		n++
		require.Less(t, n, 10000, "the proxy resets connections")
		select {
		case <-time.After(10 * time.Millisecond):
		case <-t.Context().Done():
		}
	}
	close(stop)
	<-done
	for i := range n {
		gid := fmt.Sprintf("rst-%02d", i)
		require.Eventually(t, func() bool {
			res, err := b.client.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: gid})
			return err == nil && isTerminal(res.Transaction.Status)
		}, 60*time.Second, 20*time.Millisecond)
		res, err := b.client.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: gid})
		require.NoError(t, err)
		require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status, gid)
		for _, s := range []string{"a", "b", "c"} {
			found := false
			for _, c := range b.part.CallsFor(gid) {
				found = found || (c.Branch == s && c.Op == "action")
			}
			require.True(t, found, "%s step %s ran", gid, s)
		}
	}
	t.Logf("%d sagas, %d connections reset", n, proxy.Resets())
}
