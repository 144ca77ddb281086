package grpcauth_test

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/treatyhq/treaty/internal/grpcauth"
)

// payloadCounter counts the request messages the server read off the wire.
type payloadCounter struct{ in atomic.Int64 }

func (c *payloadCounter) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (c *payloadCounter) HandleRPC(_ context.Context, s stats.RPCStats) {
	if _, ok := s.(*stats.InPayload); ok {
		c.in.Add(1)
	}
}
func (c *payloadCounter) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	return ctx
}
func (c *payloadCounter) HandleConn(context.Context, stats.ConnStats) {}

// A call refused for its token or its rate is refused from its headers: the server never reads
// its message, however large (the issue: 120 MiB anonymous calls were read and decoded first).
func TestRefusedBeforeTheMessageIsRead(t *testing.T) {
	t.Parallel()
	tokens, err := grpcauth.ParseTokens("alice:" + secretA)
	require.NoError(t, err)
	clock := &fakeClock{now: time.Unix(1_700_000_000, 0)}
	g, err := grpcauth.New(grpcauth.Config{Tokens: tokens, RateLimit: 1, RateBurst: 3, Now: clock.Now})
	require.NoError(t, err)
	counter := &payloadCounter{}
	srv := grpc.NewServer(append(g.ServerOptions(), grpc.MaxRecvMsgSize(256<<20), grpc.StatsHandler(counter))...)
	srv.RegisterService(&whoDesc, struct{}{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(256<<20)))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })

	big := &wrapperspb.BytesValue{Value: make([]byte, 64<<20)}
	call := func(ctx context.Context) error {
		ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		defer cancel()
		return conn.Invoke(ctx, "/test.Who/Who", big, new(wrapperspb.StringValue))
	}
	for range 3 {
		err := call(t.Context())
		require.Equal(t, codes.Unauthenticated, status.Code(err), "%v", err)
	}
	require.Zero(t, counter.in.Load(), "an anonymous call's message was read")

	// The address's burst is spent on failed authentications: the next call is refused by rate.
	err = call(t.Context())
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.Positive(t, retryDelay(t, err), "the refusal carries RetryInfo")
	require.Zero(t, counter.in.Load(), "a throttled call's message was read")

	// A caller with a token gets through, and its message is read once.
	require.NoError(t, call(withToken(t.Context(), "Bearer "+secretA)))
	require.Equal(t, int64(1), counter.in.Load())
}
