package invoke_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/treatyhq/treaty/internal/invoke"
)

// freeAddr reserves a loopback address with nobody listening on it.
func freeAddr(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := lis.Addr().String()
	require.NoError(t, lis.Close())
	return addr
}

// serveAt starts a participant on addr that answers every call with h.
func serveAt(t *testing.T, addr string, h handlerFunc) {
	t.Helper()
	var lis net.Listener
	require.Eventually(t, func() bool {
		var err error
		lis, err = net.Listen("tcp", addr)
		return err == nil
	}, 30*time.Second, 20*time.Millisecond, "listen on %s", addr)
	srv := grpc.NewServer(grpc.ForceServerCodecV2(invoke.RawCodec{}),
		grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
			method, _ := grpc.MethodFromServerStream(stream)
			var req []byte
			if err := stream.RecvMsg(&req); err != nil {
				return err
			}
			resp, err := h(stream.Context(), method, req)
			if err != nil {
				return err
			}
			return stream.SendMsg(resp)
		}))
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
}

// A participant that comes back is reached by the next call, not once the connection's reconnect
// backoff (grown by the failures while it was down) has run out. Calls while it is down still
// fail, each within about a second.
func TestCallReachesAParticipantThatIsBack(t *testing.T) {
	t.Parallel()
	addr := freeAddr(t)
	inv := newInvoker(t, invoke.Config{Breaker: invoke.BreakerConfig{FailureThreshold: 1000}})
	target := "grpc://" + addr + "/p.S/M"
	for range 8 {
		res := inv.Call(t.Context(), invoke.Request{Target: target, Timeout: 10 * time.Second})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.Equal(t, codes.Unavailable, res.Code)
		require.Contains(t, res.Err.Error(), "connection refused", "the failure says why")
		require.Less(t, res.Duration, 10*time.Second, "a call to a participant that is down does not wait out its timeout")
	}
	serveAt(t, addr, echo)
	res := inv.Call(t.Context(), invoke.Request{Target: target, Payload: []byte("hi"), Timeout: 10 * time.Second})
	require.Equal(t, invoke.OK, res.Outcome, "the first call after its return reaches it: %v", res.Err)
	require.Equal(t, []byte("hi"), res.Response)
}

// A dial that began while the participant was down and fails after it is back does not fail the
// next call: the call keeps asking for fresh dials until one succeeds. CI once saw the call in
// TestCallReachesAParticipantThatIsBack fail at once with "connection refused" although the
// participant was listening. The dialer here holds one refused dial until the participant
// listens, so the call starts while a doomed dial is under way.
func TestCallRedialsWhenADialFromBeforeTheReturnFails(t *testing.T) {
	t.Parallel()
	addr := freeAddr(t)
	var hold atomic.Bool
	held := make(chan struct{})    // a dial is being held
	release := make(chan struct{}) // let it return its (stale) error
	dialer := func(ctx context.Context, a string) (net.Conn, error) {
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", a)
		if err != nil && hold.CompareAndSwap(true, false) {
			close(held)
			<-release
		}
		return conn, err
	}
	inv := newInvoker(t, invoke.Config{
		Breaker:     invoke.BreakerConfig{FailureThreshold: 1000},
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(dialer)},
	})
	target := "grpc://" + addr + "/p.S/M"
	res := inv.Call(t.Context(), invoke.Request{Target: target, Timeout: 10 * time.Second})
	require.Equal(t, codes.Unavailable, res.Code)

	hold.Store(true) // the reconnect after the backoff is refused and held
	select {
	case <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("no reconnect attempt within 30s")
	}
	serveAt(t, addr, echo)
	go func() {
		time.Sleep(200 * time.Millisecond) // let the call find the connection CONNECTING
		close(release)
	}()
	res = inv.Call(t.Context(), invoke.Request{Target: target, Payload: []byte("hi"), Timeout: 10 * time.Second})
	require.Equal(t, invoke.OK, res.Outcome, "a dial from before the return does not fail the call: %v", res.Err)
	require.Equal(t, []byte("hi"), res.Response)
}

// An open breaker refuses without sending and says when a trial call may go; the trial call
// (half-open) reaches a participant that is back although the connection last failed.
func TestOpenBreakerSaysWhenAndItsTrialRedials(t *testing.T) {
	t.Parallel()
	addr := freeAddr(t)
	inv := newInvoker(t, invoke.Config{Breaker: invoke.BreakerConfig{FailureThreshold: 2, OpenTimeout: 3 * time.Second}})
	target := "grpc://" + addr + "/p.S/M"
	for range 2 {
		res := inv.Call(t.Context(), invoke.Request{Target: target})
		require.Equal(t, codes.Unavailable, res.Code)
		require.NotErrorIs(t, res.Err, invoke.ErrBreakerOpen)
	}
	require.Equal(t, "open", inv.BreakerStates()[addr])
	res := inv.Call(t.Context(), invoke.Request{Target: target})
	require.ErrorIs(t, res.Err, invoke.ErrBreakerOpen)
	require.Positive(t, res.RetryAfter, "an open breaker says when to come back")
	require.LessOrEqual(t, res.RetryAfter, 3*time.Second)

	serveAt(t, addr, func(context.Context, string, []byte) ([]byte, error) { return []byte("ok"), nil })
	require.Eventually(t, func() bool { return inv.BreakerStates()[addr] == "half-open" }, 30*time.Second, 10*time.Millisecond)
	res = inv.Call(t.Context(), invoke.Request{Target: target, Timeout: 10 * time.Second})
	require.Equal(t, invoke.OK, res.Outcome, "the trial call reaches the participant: %v", res.Err)
	require.Equal(t, "closed", inv.BreakerStates()[addr])
	require.Zero(t, res.RetryAfter)
}
