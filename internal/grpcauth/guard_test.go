package grpcauth_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"log/slog"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/treatyhq/treaty/internal/grpcauth"
	"github.com/treatyhq/treaty/internal/grpcauth/grpcauthtest"
)

// whoDesc is a one-method service that answers with the caller's identity as the guard saw it.
var whoDesc = grpc.ServiceDesc{
	ServiceName: "test.Who",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Who",
		Handler: func(srv any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			h := func(ctx context.Context, _ any) (any, error) { return wrapperspb.String(grpcauth.Identity(ctx)), nil }
			if icpt == nil {
				return h(ctx, in)
			}
			return icpt(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: "/test.Who/Who"}, h)
		},
	}},
}

// fakeClock is the rate limiter's clock, moved by the test.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// syncBuffer collects log output written from the server's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type server struct {
	addr  string
	logs  *syncBuffer
	clock *fakeClock
	reg   *prometheus.Registry
}

// serve starts a real gRPC server on loopback with the guard of cfg, the Who service, health
// checking and reflection.
func serve(t *testing.T, cfg grpcauth.Config) *server {
	t.Helper()
	s := &server{logs: &syncBuffer{}, clock: &fakeClock{now: time.Unix(1_700_000_000, 0)}, reg: prometheus.NewRegistry()}
	cfg.Logger = slog.New(slog.NewTextHandler(s.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg.Now = s.clock.Now
	cfg.Registerer = s.reg
	g, err := grpcauth.New(cfg)
	require.NoError(t, err)
	srv := grpc.NewServer(g.ServerOptions()...)
	srv.RegisterService(&whoDesc, struct{}{})
	hs := health.NewServer()
	healthpb.RegisterHealthServer(srv, hs)
	reflection.Register(srv)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s.addr = lis.Addr().String()
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return s
}

// dial connects with tlsCfg (nil: plaintext).
func (s *server) dial(t *testing.T, tlsCfg *tls.Config) *grpc.ClientConn {
	t.Helper()
	creds := insecure.NewCredentials()
	if tlsCfg != nil {
		creds = credentials.NewTLS(tlsCfg)
	}
	conn, err := grpc.NewClient(s.addr, grpc.WithTransportCredentials(creds))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func withToken(ctx context.Context, auth string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", auth)
}

func who(ctx context.Context, conn *grpc.ClientConn) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	out := new(wrapperspb.StringValue)
	err := conn.Invoke(ctx, "/test.Who/Who", &emptypb.Empty{}, out)
	return out.GetValue(), err
}

func healthy(t *testing.T, conn *grpc.ClientConn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	res, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, res.Status)
}

func TestTokens(t *testing.T) {
	t.Parallel()
	tokens, err := grpcauth.ParseTokens("alice:" + secretA + ",bob:" + secretB)
	require.NoError(t, err)
	s := serve(t, grpcauth.Config{Tokens: tokens})
	conn := s.dial(t, nil)
	ctx := t.Context()

	for _, tc := range []struct{ name, auth, want string }{
		{"missing", "", "bearer token is required"},
		{"wrong", "Bearer wrong-secret-0123456789", "not one of this coordinator's"},
		{"not bearer", "Basic " + secretA, "must be \"Bearer TOKEN\""},
		{"empty bearer", "Bearer ", "Bearer TOKEN"},
	} {
		c := ctx
		if tc.auth != "" {
			c = withToken(ctx, tc.auth)
		}
		_, err := who(c, conn)
		require.Equal(t, codes.Unauthenticated, status.Code(err), "%s: %v", tc.name, err)
		require.Contains(t, status.Convert(err).Message(), tc.want, tc.name)
	}

	id, err := who(withToken(ctx, "Bearer "+secretA), conn)
	require.NoError(t, err)
	require.Equal(t, "token:alice", id)
	id, err = who(withToken(ctx, "bearer "+secretB), conn)
	require.NoError(t, err, "the scheme is case-insensitive")
	require.Equal(t, "token:bob", id)

	// Health checks and reflection stay open.
	healthy(t, conn)
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}))
	res, err := stream.Recv()
	require.NoError(t, err)
	require.NotEmpty(t, res.GetListServicesResponse().GetService())
	require.NoError(t, stream.CloseSend())

	require.Equal(t, 4.0, metric(t, s.reg, "treaty_grpc_refused_total", "unauthenticated"))
	logs := s.logs.String()
	require.Contains(t, logs, "unauthenticated")
	for _, secret := range []string{secretA, secretB, "wrong-secret-0123456789"} {
		require.NotContains(t, logs, secret, "a token reached the logs")
	}
}

// metric returns the value of a gauge or counter in reg, with label value want if not empty.
func metric(t *testing.T, reg *prometheus.Registry, name, want string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	require.NoError(t, err)
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if want != "" && (len(m.GetLabel()) == 0 || m.GetLabel()[0].GetValue() != want) {
				continue
			}
			if m.GetCounter() != nil {
				return m.GetCounter().GetValue()
			}
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no metric %s{%s}", name, want)
	return 0
}

func TestMutualTLS(t *testing.T) {
	t.Parallel()
	ca := grpcauthtest.NewCA(t, "treaty test CA")
	other := grpcauthtest.NewCA(t, "someone else's CA")
	srvPair := ca.Server(t, "coordinator")
	tlsCfg, err := grpcauth.ServerTLS(srvPair.CertFile, srvPair.KeyFile, ca.CertFile, nil)
	require.NoError(t, err)
	s := serve(t, grpcauth.Config{TLS: tlsCfg})
	ctx := t.Context()

	_, err = who(ctx, s.dial(t, nil))
	require.Equal(t, codes.Unavailable, status.Code(err), "plaintext against TLS: %v", err)

	_, err = who(ctx, s.dial(t, ca.ClientTLS(nil)))
	require.Error(t, err, "no client certificate")
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)

	stranger := other.Client(t, "stranger")
	_, err = who(ctx, s.dial(t, ca.ClientTLS(&stranger)))
	require.Error(t, err, "client certificate of another CA")

	client := ca.Client(t, "client-a")
	id, err := who(ctx, s.dial(t, ca.ClientTLS(&client)))
	require.NoError(t, err)
	require.Equal(t, "cert:CN=client-a,O=treaty tests", id, "without tokens the certificate names the client")
}

func TestServerTLSWithoutClientCA(t *testing.T) {
	t.Parallel()
	ca := grpcauthtest.NewCA(t, "treaty test CA")
	srvPair := ca.Server(t, "coordinator")
	tlsCfg, err := grpcauth.ServerTLS(srvPair.CertFile, srvPair.KeyFile, "", nil)
	require.NoError(t, err)
	s := serve(t, grpcauth.Config{TLS: tlsCfg})
	id, err := who(t.Context(), s.dial(t, ca.ClientTLS(nil)))
	require.NoError(t, err)
	require.Equal(t, "ip:127.0.0.1", id)

	_, err = grpcauth.ServerTLS(srvPair.CertFile, "", "", nil)
	require.ErrorContains(t, err, "key file")
	_, err = grpcauth.ServerTLS(srvPair.CertFile, srvPair.KeyFile, srvPair.KeyFile, nil)
	require.ErrorContains(t, err, "no PEM certificate")
}

func retryDelay(t *testing.T, err error) time.Duration {
	t.Helper()
	st := status.Convert(err)
	require.Equal(t, codes.ResourceExhausted, st.Code(), "%v", err)
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.RetryDelay.AsDuration()
		}
	}
	t.Fatalf("no RetryInfo in %v", err)
	return 0
}

func TestRateLimit(t *testing.T) {
	t.Parallel()
	tokens, err := grpcauth.ParseTokens("alice:" + secretA + ",bob:" + secretB)
	require.NoError(t, err)
	s := serve(t, grpcauth.Config{Tokens: tokens, RateLimit: 2, RateBurst: 3})
	conn := s.dial(t, nil)
	alice := withToken(t.Context(), "Bearer "+secretA)
	bob := withToken(t.Context(), "Bearer "+secretB)

	for i := range 3 {
		_, err := who(alice, conn)
		require.NoError(t, err, "call %d within the burst", i+1)
	}
	_, err = who(alice, conn)
	delay := retryDelay(t, err)
	require.Equal(t, 500*time.Millisecond, delay, "one token at 2/s")
	require.Contains(t, status.Convert(err).Message(), "token:alice")

	// Another identity has its own bucket; health checks are never limited.
	for range 3 {
		_, err := who(bob, conn)
		require.NoError(t, err)
	}
	for range 10 {
		healthy(t, conn)
	}

	// Just before the delay, still refused (and refusals spend nothing); at the delay, served.
	s.clock.Advance(delay - time.Millisecond)
	_, err = who(alice, conn)
	require.Equal(t, codes.ResourceExhausted, status.Code(err))
	s.clock.Advance(time.Millisecond)
	_, err = who(alice, conn)
	require.NoError(t, err)

	require.Equal(t, 2.0, metric(t, s.reg, "treaty_grpc_refused_total", "rate_limited"))
	require.Contains(t, s.logs.String(), "rate limit")
}

func TestFailedAuthenticationIsRateLimitedByAddress(t *testing.T) {
	t.Parallel()
	tokens, err := grpcauth.ParseTokens("alice:" + secretA)
	require.NoError(t, err)
	s := serve(t, grpcauth.Config{Tokens: tokens, RateLimit: 1, RateBurst: 2})
	conn := s.dial(t, nil)
	bad := withToken(t.Context(), "Bearer guess-guess-guess-guess")
	for range 2 {
		_, err := who(bad, conn)
		require.Equal(t, codes.Unauthenticated, status.Code(err))
	}
	_, err = who(bad, conn)
	require.Greater(t, retryDelay(t, err), time.Duration(0), "guessing is rate limited")
	_, err = who(withToken(t.Context(), "Bearer "+secretA), conn)
	require.NoError(t, err, "the token's own bucket is untouched")
}

func TestRateLimitByAddressWithoutTokens(t *testing.T) {
	t.Parallel()
	s := serve(t, grpcauth.Config{RateLimit: 1})
	conn := s.dial(t, nil)
	id, err := who(t.Context(), conn)
	require.NoError(t, err)
	require.Equal(t, "ip:127.0.0.1", id)
	_, err = who(t.Context(), conn)
	require.Equal(t, time.Second, retryDelay(t, err), "burst defaults to the rate, rounded up: 1")
	require.Equal(t, 1.0, metric(t, s.reg, "treaty_grpc_rate_limit_clients", ""))
}

func TestNewRejectsBadSettings(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		cfg  grpcauth.Config
		want string
	}{
		{grpcauth.Config{RateLimit: -1}, "rate limit -1"},
		{grpcauth.Config{RateLimit: 1, RateBurst: -1}, "rate burst -1"},
		{grpcauth.Config{MaxClients: -5}, "max clients -5"},
	} {
		_, err := grpcauth.New(tc.cfg)
		require.ErrorContains(t, err, tc.want)
	}
	g, err := grpcauth.New(grpcauth.Config{})
	require.NoError(t, err)
	require.True(t, g.Open())
	require.Len(t, g.ServerOptions(), 3, "tap handle and interceptors only: no credentials")
	require.True(t, strings.Contains(strings.Join(anyStrings(g.Describe()), " "), "off"))
}

func anyStrings(as []any) []string {
	var out []string
	for _, a := range as {
		if s, ok := a.(string); ok {
			out = append(out, s)
		}
	}
	return out
}
