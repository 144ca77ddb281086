package invoke_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/treatyhq/treaty/internal/invoke"
)

// handlerFunc is what a test participant does with one call: it sees the method, the raw request
// bytes and the incoming context (metadata, deadline).
type handlerFunc func(ctx context.Context, method string, req []byte) ([]byte, error)

// participant is a real gRPC server on 127.0.0.1 that accepts any method name.
type participant struct {
	addr  string
	calls atomic.Int64 // handler invocations
	conns atomic.Int64 // transports accepted, counted by a stats handler
}

func startParticipant(t testing.TB, h handlerFunc) *participant {
	t.Helper()
	p := &participant{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p.addr = lis.Addr().String()
	srv := grpc.NewServer(
		grpc.ForceServerCodecV2(invoke.RawCodec{}),
		grpc.StatsHandler(connCounter{&p.conns}),
		grpc.UnknownServiceHandler(func(_ any, stream grpc.ServerStream) error {
			p.calls.Add(1)
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
		}),
	)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return p
}

func (p *participant) target(method string) string { return "grpc://" + p.addr + method }

// connCounter counts server transports, to prove the invoker reuses its connections.
type connCounter struct{ n *atomic.Int64 }

func (c connCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context   { return ctx }
func (c connCounter) HandleRPC(context.Context, stats.RPCStats)                         {}
func (c connCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (c connCounter) HandleConn(_ context.Context, s stats.ConnStats) {
	if _, ok := s.(*stats.ConnBegin); ok {
		c.n.Add(1)
	}
}

func echo(_ context.Context, _ string, req []byte) ([]byte, error) { return req, nil }

func newInvoker(t testing.TB, cfg invoke.Config) *invoke.Invoker {
	t.Helper()
	inv := invoke.New(cfg)
	t.Cleanup(func() { require.NoError(t, inv.Close()) })
	return inv
}

func TestCallPassesBytesThrough(t *testing.T) {
	t.Parallel()
	var gotMethod atomic.Value
	p := startParticipant(t, func(_ context.Context, method string, req []byte) ([]byte, error) {
		gotMethod.Store(method)
		// The response differs from the request so the test sees both directions.
		return append([]byte("re:"), req...), nil
	})
	inv := newInvoker(t, invoke.Config{})

	payload := make([]byte, 64<<10)
	_, _ = rand.Read(payload)
	// Bytes that are not valid protobuf prove nothing decodes them on the way.
	payload[0], payload[1] = 0xff, 0xff

	res := inv.Call(t.Context(), invoke.Request{Target: p.target("/travel.flight.v1.Flights/Reserve"), Payload: payload})
	require.NoError(t, res.Err)
	require.Equal(t, invoke.OK, res.Outcome)
	require.Equal(t, codes.OK, res.Code)
	require.True(t, bytes.Equal(append([]byte("re:"), payload...), res.Response), "response bytes come back unchanged")
	require.Equal(t, "/travel.flight.v1.Flights/Reserve", gotMethod.Load())
	require.Positive(t, res.Duration)

	t.Run("empty payload", func(t *testing.T) {
		res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/Empty")})
		require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)
		require.Equal(t, []byte("re:"), res.Response)
	})
}

func TestCallSendsMetadataAndDeadline(t *testing.T) {
	t.Parallel()
	type seen struct {
		md       metadata.MD
		deadline time.Time
		ok       bool
	}
	got := make(chan seen, 1)
	p := startParticipant(t, func(ctx context.Context, _ string, _ []byte) ([]byte, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		d, ok := ctx.Deadline()
		got <- seen{md, d, ok}
		return nil, nil
	})
	inv := newInvoker(t, invoke.Config{})

	before := time.Now()
	res := inv.Call(t.Context(), invoke.Request{
		Target:   p.target("/p.S/M"),
		Timeout:  3 * time.Second,
		Metadata: invoke.Metadata{GID: "order-42", Branch: "01", Op: "action", Mode: "saga"},
	})
	require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)
	require.Nil(t, res.Response)
	s := <-got
	require.Equal(t, []string{"order-42"}, s.md.Get(invoke.MetadataGID))
	require.Equal(t, []string{"01"}, s.md.Get(invoke.MetadataBranch))
	require.Equal(t, []string{"action"}, s.md.Get(invoke.MetadataOp))
	require.Equal(t, []string{"saga"}, s.md.Get(invoke.MetadataMode))
	require.True(t, s.ok, "the deadline travels as grpc-timeout")
	require.WithinDuration(t, before.Add(3*time.Second), s.deadline, time.Second)
}

func TestCallClassifiesStatus(t *testing.T) {
	t.Parallel()
	p := startParticipant(t, func(_ context.Context, method string, _ []byte) ([]byte, error) {
		name := method[strings.LastIndex(method, "/")+1:]
		for c := codes.OK; c <= codes.Unauthenticated; c++ {
			if c.String() == name {
				return nil, status.Error(c, "participant says "+name)
			}
		}
		return nil, errors.New("plain error") // arrives as codes.Unknown
	})
	// A threshold no test reaches: here the breaker would only hide the codes under test.
	inv := newInvoker(t, invoke.Config{Breaker: invoke.BreakerConfig{FailureThreshold: 1000}})

	cases := []struct {
		method  string
		outcome invoke.Outcome
		code    codes.Code
	}{
		{"Aborted", invoke.Aborted, codes.Aborted},
		{"Unavailable", invoke.Transient, codes.Unavailable},
		{"Internal", invoke.Transient, codes.Internal},
		{"DeadlineExceeded", invoke.Transient, codes.DeadlineExceeded},
		{"FailedPrecondition", invoke.Transient, codes.FailedPrecondition},
		{"ResourceExhausted", invoke.Transient, codes.ResourceExhausted},
		{"Plain", invoke.Transient, codes.Unknown},
	}
	for _, tc := range cases {
		t.Run(tc.method, func(t *testing.T) {
			t.Parallel()
			res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/" + tc.method)})
			require.Equal(t, tc.outcome, res.Outcome)
			require.Equal(t, tc.code, res.Code)
			require.Error(t, res.Err)
			require.Nil(t, res.Response)
			st, ok := status.FromError(res.Err)
			require.True(t, ok)
			require.Equal(t, tc.code, st.Code())
			if tc.method != "Plain" {
				require.Equal(t, "participant says "+tc.method, st.Message(), "the participant's message is preserved")
			}
		})
	}
}

func TestCallTimeout(t *testing.T) {
	t.Parallel()
	// The handler answers only when the call's context ends, so only a deadline can finish it.
	p := startParticipant(t, func(ctx context.Context, _ string, _ []byte) ([]byte, error) {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	})
	inv := newInvoker(t, invoke.Config{DefaultTimeout: 150 * time.Millisecond})

	t.Run("request timeout", func(t *testing.T) {
		t.Parallel()
		res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/Slow"), Timeout: 100 * time.Millisecond})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.Equal(t, codes.DeadlineExceeded, res.Code)
		require.GreaterOrEqual(t, res.Duration, 100*time.Millisecond)
		require.Less(t, res.Duration, 30*time.Second, "only the deadline ends this call")
	})
	t.Run("default timeout", func(t *testing.T) {
		t.Parallel()
		res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/Slow")})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.Equal(t, codes.DeadlineExceeded, res.Code)
		require.GreaterOrEqual(t, res.Duration, 150*time.Millisecond)
		require.Less(t, res.Duration, 30*time.Second, "only the deadline ends this call")
	})
	t.Run("context deadline shorter than timeout", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		res := inv.Call(ctx, invoke.Request{Target: p.target("/p.S/Slow"), Timeout: time.Minute})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.Equal(t, codes.DeadlineExceeded, res.Code)
		require.Less(t, res.Duration, 30*time.Second, "only the deadline ends this call")
	})
	t.Run("canceled context", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(t.Context())
		cancel()
		res := inv.Call(ctx, invoke.Request{Target: p.target("/p.S/Slow")})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.Equal(t, codes.Canceled, res.Code)
	})
	t.Run("negative timeout", func(t *testing.T) {
		t.Parallel()
		res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/Slow"), Timeout: -time.Second})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.ErrorIs(t, res.Err, invoke.ErrInvalidRequest)
		require.Equal(t, codes.InvalidArgument, res.Code)
	})
}

func TestCallLocalFailuresAreTransient(t *testing.T) {
	t.Parallel()
	inv := newInvoker(t, invoke.Config{})

	t.Run("invalid target", func(t *testing.T) {
		t.Parallel()
		res := inv.Call(t.Context(), invoke.Request{Target: "http://h:1/p.S/M"})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.Equal(t, codes.InvalidArgument, res.Code)
		require.ErrorIs(t, res.Err, invoke.ErrInvalidTarget)
		require.Equal(t, codes.InvalidArgument, status.Code(res.Err), "status.Code agrees with Result.Code")
	})
	t.Run("nobody listening", func(t *testing.T) {
		t.Parallel()
		lis, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		addr := lis.Addr().String()
		require.NoError(t, lis.Close())
		res := inv.Call(t.Context(), invoke.Request{Target: "grpc://" + addr + "/p.S/M", Timeout: 5 * time.Second})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.Equal(t, codes.Unavailable, res.Code)
		require.Less(t, res.Duration, 5*time.Second, "a refused connection fails fast")
	})
	t.Run("transport options fail", func(t *testing.T) {
		t.Parallel()
		inv := newInvoker(t, invoke.Config{TransportFor: func(addrs []string) ([]grpc.DialOption, error) {
			return nil, fmt.Errorf("no certificate for %v", addrs)
		}})
		res := inv.Call(t.Context(), invoke.Request{Target: "grpc://127.0.0.1:1/p.S/M"})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.ErrorIs(t, res.Err, invoke.ErrTransport)
		require.Contains(t, res.Err.Error(), "no certificate for [127.0.0.1:1]")
	})
}

func TestTransportForOptionsAreUsed(t *testing.T) {
	t.Parallel()
	p := startParticipant(t, echo)
	var calls atomic.Int64
	var clientConns atomic.Int64
	inv := newInvoker(t, invoke.Config{TransportFor: func(addrs []string) ([]grpc.DialOption, error) {
		calls.Add(1)
		return []grpc.DialOption{grpc.WithStatsHandler(connCounter{&clientConns})}, nil
	}})
	for range 3 {
		res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/M"), Payload: []byte("x")})
		require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)
	}
	require.EqualValues(t, 1, calls.Load(), "TransportFor runs once per endpoint")
	require.EqualValues(t, 1, clientConns.Load(), "its options reach the connection")
}

func TestBreaker(t *testing.T) {
	t.Parallel()
	var healthy atomic.Bool
	p := startParticipant(t, func(context.Context, string, []byte) ([]byte, error) {
		if !healthy.Load() {
			return nil, status.Error(codes.Unavailable, "down for maintenance")
		}
		return []byte("ok"), nil
	})
	inv := newInvoker(t, invoke.Config{Breaker: invoke.BreakerConfig{FailureThreshold: 3, OpenTimeout: time.Second}})
	target := p.target("/p.S/M")
	endpoint := p.addr

	for n := range 3 {
		res := inv.Call(t.Context(), invoke.Request{Target: target})
		require.Equal(t, invoke.Transient, res.Outcome)
		require.Equal(t, codes.Unavailable, res.Code)
		require.Contains(t, res.Err.Error(), "down for maintenance")
		if n < 2 {
			require.Equal(t, "closed", inv.BreakerStates()[endpoint])
		}
	}
	require.Equal(t, "open", inv.BreakerStates()[endpoint])

	// Open: fails fast without reaching the participant, whatever the method.
	before := p.calls.Load()
	res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/Other")})
	require.Equal(t, invoke.Transient, res.Outcome)
	require.ErrorIs(t, res.Err, invoke.ErrBreakerOpen)
	require.Contains(t, res.Err.Error(), "breaker for target "+endpoint+" is open")
	require.Equal(t, codes.Unavailable, res.Code)
	require.Equal(t, before, p.calls.Load(), "an open breaker sends nothing")

	// Still failing when half-open: one trial call, then open again.
	require.Eventually(t, func() bool { return inv.BreakerStates()[endpoint] == "half-open" }, 30*time.Second, 5*time.Millisecond, "breaker half-opens")
	res = inv.Call(t.Context(), invoke.Request{Target: target})
	require.Equal(t, codes.Unavailable, res.Code)
	require.NotErrorIs(t, res.Err, invoke.ErrBreakerOpen, "the trial call reached the participant")
	require.Equal(t, "open", inv.BreakerStates()[endpoint])

	// Recovered: the next trial call succeeds and closes the breaker.
	healthy.Store(true)
	require.Eventually(t, func() bool { return inv.BreakerStates()[endpoint] == "half-open" }, 30*time.Second, 5*time.Millisecond, "breaker half-opens again")
	res = inv.Call(t.Context(), invoke.Request{Target: target})
	require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)
	require.Equal(t, []byte("ok"), res.Response)
	require.Equal(t, "closed", inv.BreakerStates()[endpoint])
}

func TestBreakerHalfOpenAdmitsOneTrial(t *testing.T) {
	t.Parallel()
	var failing atomic.Bool
	failing.Store(true)
	entered := make(chan struct{}, 1)
	release := make(chan struct{})
	p := startParticipant(t, func(ctx context.Context, _ string, _ []byte) ([]byte, error) {
		if failing.Load() {
			return nil, status.Error(codes.Internal, "boom")
		}
		entered <- struct{}{}
		select {
		case <-release:
			return []byte("ok"), nil
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	})
	logs := &syncBuffer{}
	inv := newInvoker(t, invoke.Config{
		Logger:  slog.New(slog.NewTextHandler(logs, nil)),
		Breaker: invoke.BreakerConfig{FailureThreshold: 1, OpenTimeout: time.Second},
	})
	target := p.target("/p.S/M")

	res := inv.Call(t.Context(), invoke.Request{Target: target})
	require.Equal(t, codes.Internal, res.Code)
	require.Equal(t, "open", inv.BreakerStates()[p.addr])
	failing.Store(false)
	require.Eventually(t, func() bool { return inv.BreakerStates()[p.addr] == "half-open" }, 30*time.Second, 5*time.Millisecond, "breaker half-opens")

	trial := make(chan invoke.Result, 1)
	go func() { trial <- inv.Call(t.Context(), invoke.Request{Target: target, Timeout: 20 * time.Second}) }()
	<-entered

	// The one trial call is in flight: another fails fast instead of piling onto a sick target.
	res = inv.Call(t.Context(), invoke.Request{Target: target})
	require.ErrorIs(t, res.Err, invoke.ErrBreakerOpen)
	require.Contains(t, res.Err.Error(), "is half-open, failing fast")

	close(release)
	require.Equal(t, invoke.OK, (<-trial).Outcome)
	require.Equal(t, "closed", inv.BreakerStates()[p.addr])
	require.Contains(t, logs.String(), `level=WARN msg="invoke: circuit breaker state changed" endpoint=`+p.addr+" from=closed to=open")
	require.Contains(t, logs.String(), "from=half-open to=closed")
}

// syncBuffer is a bytes.Buffer safe for a logger writing while the test reads.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func TestBreakerIgnoresAborted(t *testing.T) {
	t.Parallel()
	p := startParticipant(t, func(context.Context, string, []byte) ([]byte, error) {
		return nil, status.Error(codes.Aborted, "insufficient funds")
	})
	inv := newInvoker(t, invoke.Config{Breaker: invoke.BreakerConfig{FailureThreshold: 2}})
	for range 10 {
		res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/M")})
		require.Equal(t, invoke.Aborted, res.Outcome)
		require.Equal(t, "insufficient funds", status.Convert(res.Err).Message())
	}
	require.Equal(t, map[string]string{p.addr: "closed"}, inv.BreakerStates())
	require.EqualValues(t, 10, p.calls.Load())
}

func TestBreakerIgnoresCallerCancel(t *testing.T) {
	t.Parallel()
	p := startParticipant(t, func(ctx context.Context, _ string, _ []byte) ([]byte, error) {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	})
	inv := newInvoker(t, invoke.Config{Breaker: invoke.BreakerConfig{FailureThreshold: 1}})
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	res := inv.Call(ctx, invoke.Request{Target: p.target("/p.S/M")})
	require.Equal(t, codes.Canceled, res.Code)
	require.Equal(t, "closed", inv.BreakerStates()[p.addr], "a caller that gave up says nothing about the participant")
}

func TestConcurrencyLimit(t *testing.T) {
	t.Parallel()
	const limit = 2
	var inFlight, maxInFlight atomic.Int64
	release := make(chan struct{})
	p := startParticipant(t, func(ctx context.Context, _ string, _ []byte) ([]byte, error) {
		n := inFlight.Add(1)
		defer inFlight.Add(-1)
		for {
			m := maxInFlight.Load()
			if n <= m || maxInFlight.CompareAndSwap(m, n) {
				break
			}
		}
		select {
		case <-release:
			return []byte("done"), nil
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	})
	inv := newInvoker(t, invoke.Config{MaxConcurrentPerTarget: limit})
	target := p.target("/p.S/Block")

	const callers = 6
	var wg sync.WaitGroup
	results := make(chan invoke.Result, callers)
	for range callers {
		wg.Go(func() {
			results <- inv.Call(t.Context(), invoke.Request{Target: target, Timeout: 20 * time.Second})
		})
	}
	require.Eventually(t, func() bool { return inFlight.Load() == limit }, 30*time.Second, 5*time.Millisecond, "the first calls reach the handler")

	// With every slot taken, a call with a short timeout gives up waiting for one.
	res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/Other"), Timeout: 100 * time.Millisecond})
	require.Equal(t, invoke.Transient, res.Outcome)
	require.Equal(t, codes.ResourceExhausted, res.Code)
	require.ErrorIs(t, res.Err, invoke.ErrNoSlot)
	require.Contains(t, res.Err.Error(), "all 2 concurrent call slots stayed busy until the deadline")
	require.Equal(t, "closed", inv.BreakerStates()[p.addr], "waiting for a slot is not the participant's failure")

	for range callers {
		release <- struct{}{}
	}
	wg.Wait()
	close(results)
	for r := range results {
		require.Equal(t, invoke.OK, r.Outcome, "err: %v", r.Err)
	}
	require.EqualValues(t, limit, maxInFlight.Load(), "never more than the limit in flight")
	require.EqualValues(t, callers, p.calls.Load())
}

func TestRoundRobinOverAddresses(t *testing.T) {
	t.Parallel()
	a := startParticipant(t, echo)
	b := startParticipant(t, echo)
	inv := newInvoker(t, invoke.Config{})
	target := "grpc://" + a.addr + "," + b.addr + "/p.S/M"

	deadline := time.Now().Add(10 * time.Second)
	for a.calls.Load() == 0 || b.calls.Load() == 0 {
		require.True(t, time.Now().Before(deadline), "both addresses receive calls (a=%d b=%d)", a.calls.Load(), b.calls.Load())
		res := inv.Call(t.Context(), invoke.Request{Target: target, Payload: []byte("x")})
		require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)
	}
	// Once both are connected, round robin alternates: 20 more calls split evenly.
	a0, b0 := a.calls.Load(), b.calls.Load()
	for range 20 {
		res := inv.Call(t.Context(), invoke.Request{Target: target, Payload: []byte("x")})
		require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)
	}
	require.InDelta(t, 10, a.calls.Load()-a0, 1)
	require.InDelta(t, 10, b.calls.Load()-b0, 1)
	require.EqualValues(t, 1, a.conns.Load())
	require.EqualValues(t, 1, b.conns.Load())
}

func TestConnectionReuse(t *testing.T) {
	t.Parallel()
	p := startParticipant(t, echo)
	other := startParticipant(t, echo)
	inv := newInvoker(t, invoke.Config{})

	// Many first calls at once, over several methods: one connection, not one per racer.
	var wg sync.WaitGroup
	var failed atomic.Int64
	for n := range 32 {
		wg.Go(func() {
			res := inv.Call(t.Context(), invoke.Request{Target: p.target(fmt.Sprintf("/p.S/M%d", n%4)), Payload: []byte("x")})
			if res.Outcome != invoke.OK {
				failed.Add(1)
			}
		})
	}
	wg.Wait()
	require.Zero(t, failed.Load())
	require.EqualValues(t, 1, p.conns.Load(), "one connection per address set")

	// A different address set that includes p is a different endpoint with its own connection;
	// the same set in another order is the same endpoint.
	for _, target := range []string{
		"grpc://" + p.addr + "," + other.addr + "/p.S/M",
		"grpc://" + other.addr + "," + p.addr + "/p.S/N",
	} {
		res := inv.Call(t.Context(), invoke.Request{Target: target, Payload: []byte("x")})
		require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)
	}
	require.Len(t, inv.BreakerStates(), 2)
	require.Eventually(t, func() bool { return p.conns.Load() == 2 && other.conns.Load() == 1 }, 30*time.Second, 5*time.Millisecond, "the second endpoint connects to both its addresses")
	require.EqualValues(t, 32+2, p.calls.Load()+other.calls.Load())
}

func TestClose(t *testing.T) {
	t.Parallel()
	entered := make(chan struct{}, 1)
	p := startParticipant(t, func(ctx context.Context, method string, req []byte) ([]byte, error) {
		if strings.HasSuffix(method, "/Block") {
			entered <- struct{}{}
			<-ctx.Done()
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		return req, nil
	})
	inv := invoke.New(invoke.Config{})
	res := inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/M")})
	require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)

	// A call in flight when Close runs fails Transient and says why.
	inFlight := make(chan invoke.Result, 1)
	go func() {
		inFlight <- inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/Block"), Timeout: 20 * time.Second})
	}()
	<-entered

	// Calls racing with Close: each is OK or Transient, none panics (run with -race).
	var wg sync.WaitGroup
	outcomes := make(chan invoke.Outcome, 8*20)
	for range 8 {
		wg.Go(func() {
			for range 20 {
				outcomes <- inv.Call(t.Context(), invoke.Request{Target: p.target("/p.S/M"), Payload: []byte("x")}).Outcome
			}
		})
	}
	require.NoError(t, inv.Close())
	require.NoError(t, inv.Close(), "Close is idempotent")
	wg.Wait()
	close(outcomes)
	for o := range outcomes {
		require.Contains(t, []invoke.Outcome{invoke.OK, invoke.Transient}, o)
	}

	r := <-inFlight
	require.Equal(t, invoke.Transient, r.Outcome)
	require.ErrorIs(t, r.Err, invoke.ErrClosed)
	require.Less(t, r.Duration, 10*time.Second, "Close does not wait for the call's timeout")

	// After Close: Transient with a clear error, from any number of goroutines.
	var after sync.WaitGroup
	for range 8 {
		after.Go(func() {
			res := inv.Call(context.Background(), invoke.Request{Target: p.target("/p.S/M")})
			if res.Outcome != invoke.Transient || !errors.Is(res.Err, invoke.ErrClosed) ||
				!strings.Contains(res.Err.Error(), "invoker closed") {
				t.Errorf("call after Close: outcome %v, err %v; want transient, invoker closed", res.Outcome, res.Err)
			}
		})
	}
	after.Wait()
	require.Empty(t, inv.BreakerStates())
}

// TestHealthService calls a real generated service, grpc.health.v1.Health, through the raw
// codec: the payload is a marshalled request and the response unmarshals with generated code.
func TestHealthService(t *testing.T) {
	t.Parallel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer() // the ordinary proto codec, as any participant has
	hs := health.NewServer()
	hs.SetServingStatus("travel.flight.v1.Flights", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("travel.hotel.v1.Hotels", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	inv := newInvoker(t, invoke.Config{})
	target := "grpc://" + lis.Addr().String() + "/grpc.health.v1.Health/Check"

	check := func(service string) invoke.Result {
		payload, err := proto.Marshal(&healthpb.HealthCheckRequest{Service: service})
		require.NoError(t, err)
		return inv.Call(t.Context(), invoke.Request{Target: target, Payload: payload})
	}
	for service, want := range map[string]healthpb.HealthCheckResponse_ServingStatus{
		"travel.flight.v1.Flights": healthpb.HealthCheckResponse_SERVING,
		"travel.hotel.v1.Hotels":   healthpb.HealthCheckResponse_NOT_SERVING,
	} {
		res := check(service)
		require.Equal(t, invoke.OK, res.Outcome, "err: %v", res.Err)
		var resp healthpb.HealthCheckResponse
		require.NoError(t, proto.Unmarshal(res.Response, &resp))
		require.Equal(t, want, resp.GetStatus(), service)
	}

	res := check("no.such.Service")
	require.Equal(t, invoke.Transient, res.Outcome)
	require.Equal(t, codes.NotFound, res.Code)

	// A method the server does not have is a participant error like any other.
	res = inv.Call(t.Context(), invoke.Request{Target: "grpc://" + lis.Addr().String() + "/grpc.health.v1.Health/Nope"})
	require.Equal(t, invoke.Transient, res.Outcome)
	require.Equal(t, codes.Unimplemented, res.Code)
}

func BenchmarkCall(b *testing.B) {
	p := startParticipant(b, func(context.Context, string, []byte) ([]byte, error) { return nil, nil })
	inv := newInvoker(b, invoke.Config{})
	req := invoke.Request{
		Target:   p.target("/bench.S/Noop"),
		Payload:  make([]byte, 256),
		Metadata: invoke.Metadata{GID: "gid-1", Branch: "01", Op: "action", Mode: "saga"},
	}
	ctx := context.Background()
	if res := inv.Call(ctx, req); res.Outcome != invoke.OK {
		b.Fatalf("warm-up call: %v", res.Err)
	}

	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if res := inv.Call(ctx, req); res.Outcome != invoke.OK {
				b.Fatalf("call: %v", res.Err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if res := inv.Call(ctx, req); res.Outcome != invoke.OK {
					b.Errorf("call: %v", res.Err)
					return
				}
			}
		})
	})
}

// Clients choose targets, so the endpoints kept (a connection and a breaker each) are bounded:
// past MaxEndpoints a new one replaces the one idle longest, or waits its turn.
func TestEndpointsBounded(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	a, b, c := startParticipant(t, echo), startParticipant(t, echo), startParticipant(t, echo)
	key := func(p *participant) string {
		tg, err := invoke.ParseTarget(p.target("/svc.S/M"))
		require.NoError(t, err)
		return tg.Endpoint()
	}

	// None idle long enough: the third endpoint is refused, transiently, and nothing is dropped.
	busy := newInvoker(t, invoke.Config{MaxEndpoints: 2, EndpointIdle: time.Hour})
	for _, p := range []*participant{a, b} {
		require.Equal(t, invoke.OK, busy.Call(ctx, invoke.Request{Target: p.target("/svc.S/M"), Payload: []byte("x")}).Outcome)
	}
	res := busy.Call(ctx, invoke.Request{Target: c.target("/svc.S/M"), Payload: []byte("x")})
	require.Equal(t, invoke.Transient, res.Outcome)
	require.ErrorIs(t, res.Err, invoke.ErrTooManyEndpoints)
	require.Equal(t, int64(0), c.calls.Load())
	// Many methods on a known endpoint add no endpoint.
	for n := range 50 {
		require.Equal(t, invoke.OK, busy.Call(ctx, invoke.Request{Target: a.target(fmt.Sprintf("/svc.S/M%d", n)), Payload: []byte("x")}).Outcome)
	}
	require.Len(t, busy.BreakerStates(), 2)

	// Idle endpoints make room: the one unused longest goes, and comes back when called again.
	roomy := newInvoker(t, invoke.Config{MaxEndpoints: 2, EndpointIdle: time.Nanosecond})
	for _, p := range []*participant{a, b, c, a} {
		require.Equal(t, invoke.OK, roomy.Call(ctx, invoke.Request{Target: p.target("/svc.S/M"), Payload: []byte("x")}).Outcome)
	}
	states := roomy.BreakerStates()
	require.Len(t, states, 2)
	require.Contains(t, states, key(c))
	require.Contains(t, states, key(a))
	require.NotContains(t, states, key(b), "b was unused longest when a came back")
}
