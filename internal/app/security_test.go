package app_test

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/grpcauth"
	"github.com/treatyhq/treaty/internal/grpcauth/grpcauthtest"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/sdk"
)

const (
	aliceSecret = "alice-grpc-secret-0123456789"
	bobSecret   = "bob-grpc-secret-0123456789ab"
	carolSecret = "carol-grpc-secret-0123456789"
)

// pki is a coordinator CA (server certificate and client certificates) for one test.
type pki struct {
	ca     *grpcauthtest.CA
	server grpcauthtest.Pair
	client grpcauthtest.Pair
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	ca := grpcauthtest.NewCA(t, "coordinator CA")
	return &pki{ca: ca, server: ca.Server(t, "coordinator"), client: ca.Client(t, "billing-service")}
}

// serverTLS is the coordinator's TLS; mutual when mtls.
func (p *pki) serverTLS(t *testing.T, mtls bool) *tls.Config {
	t.Helper()
	clientCA := ""
	if mtls {
		clientCA = p.ca.CertFile
	}
	cfg, err := grpcauth.ServerTLS(p.server.CertFile, p.server.KeyFile, clientCA, nil)
	require.NoError(t, err)
	return cfg
}

// startSecured starts a coordinator on a fresh database with the given gRPC security.
func startSecured(t *testing.T, sec grpcauth.Config, pt *grpcauth.ParticipantTLS, limits engine.Limits) *app.App {
	t.Helper()
	a, err := app.Start(context.Background(), app.Config{
		DB: pgtest.NewDatabase(t), Listen: "127.0.0.1:0", Migrate: true, Logger: testLogger(t),
		GRPC: sec, ParticipantTLS: pt,
		Engine: engine.Config{Lease: 3 * time.Second, RecoveryInterval: 100 * time.Millisecond, OperatorThreshold: 3, Limits: limits},
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, a.Stop(ctx))
	})
	return a
}

func dialCoordinator(t *testing.T, addr string, tlsCfg *tls.Config) *grpc.ClientConn {
	t.Helper()
	creds := insecure.NewCredentials()
	if tlsCfg != nil {
		creds = credentials.NewTLS(tlsCfg)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// listWorkflows is a cheap authenticated call.
func listWorkflows(ctx context.Context, conn *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := treatyv1.NewCoordinatorClient(conn).ListWorkflows(ctx, &treatyv1.ListWorkflowsRequest{})
	return err
}

func bearer(ctx context.Context, secret string) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+secret)
}

func requireHealthy(t *testing.T, conn *grpc.ClientConn) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	res, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: treatyv1.Coordinator_ServiceDesc.ServiceName})
	require.NoError(t, err)
	require.Equal(t, healthpb.HealthCheckResponse_SERVING, res.Status)
}

func TestGRPCTLSRequired(t *testing.T) {
	t.Parallel()
	p := newPKI(t)
	a := startSecured(t, grpcauth.Config{TLS: p.serverTLS(t, false)}, nil, engine.Limits{})

	err := listWorkflows(t.Context(), dialCoordinator(t, a.Addr, nil))
	require.Equal(t, codes.Unavailable, status.Code(err), "a plaintext client cannot talk to a TLS coordinator: %v", err)

	other := grpcauthtest.NewCA(t, "untrusted CA")
	err = listWorkflows(t.Context(), dialCoordinator(t, a.Addr, other.ClientTLS(nil)))
	require.Equal(t, codes.Unavailable, status.Code(err), "a server certificate of a CA the client does not trust: %v", err)

	conn := dialCoordinator(t, a.Addr, p.ca.ClientTLS(nil))
	require.NoError(t, listWorkflows(t.Context(), conn))
	requireHealthy(t, conn)
}

func TestGRPCMutualTLS(t *testing.T) {
	t.Parallel()
	p := newPKI(t)
	a := startSecured(t, grpcauth.Config{TLS: p.serverTLS(t, true)}, nil, engine.Limits{})

	err := listWorkflows(t.Context(), dialCoordinator(t, a.Addr, p.ca.ClientTLS(nil)))
	require.Error(t, err, "a client without a certificate is refused")
	require.Equal(t, codes.Unavailable, status.Code(err), "%v", err)

	stranger := grpcauthtest.NewCA(t, "someone else's CA").Client(t, "stranger")
	err = listWorkflows(t.Context(), dialCoordinator(t, a.Addr, p.ca.ClientTLS(&stranger)))
	require.Error(t, err, "a client certificate from another CA is refused")

	conn := dialCoordinator(t, a.Addr, p.ca.ClientTLS(&p.client))
	require.NoError(t, listWorkflows(t.Context(), conn))
	requireHealthy(t, conn)
}

func TestGRPCTokens(t *testing.T) {
	t.Parallel()
	tokens, err := grpcauth.ParseTokens("alice:" + aliceSecret)
	require.NoError(t, err)
	a := startSecured(t, grpcauth.Config{Tokens: tokens}, nil, engine.Limits{})
	conn := dialCoordinator(t, a.Addr, nil)
	ctx := t.Context()

	err = listWorkflows(ctx, conn)
	require.Equal(t, codes.Unauthenticated, status.Code(err), "no token: %v", err)
	err = listWorkflows(bearer(ctx, "not-the-right-secret-at-all"), conn)
	require.Equal(t, codes.Unauthenticated, status.Code(err), "wrong token: %v", err)
	require.NoError(t, listWorkflows(bearer(ctx, aliceSecret), conn))

	// Health checks and reflection need no token: load balancers and grpcurl.
	requireHealthy(t, conn)
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}))
	res, err := stream.Recv()
	require.NoError(t, err)
	var names []string
	for _, s := range res.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	require.Contains(t, names, treatyv1.Coordinator_ServiceDesc.ServiceName)
	require.NoError(t, stream.CloseSend())
}

func retryInfo(t *testing.T, err error) time.Duration {
	t.Helper()
	st := status.Convert(err)
	require.Equal(t, codes.ResourceExhausted, st.Code(), "%v", err)
	for _, d := range st.Details() {
		if ri, ok := d.(*errdetails.RetryInfo); ok {
			return ri.RetryDelay.AsDuration()
		}
	}
	t.Fatalf("RESOURCE_EXHAUSTED without RetryInfo: %v", err)
	return 0
}

// testClock is the rate limiter's clock, moved by the test: the buckets refill only when it
// says, so a slow (loaded, -race) machine cannot refill one between two calls.
type testClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *testClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *testClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func TestGRPCRateLimit(t *testing.T) {
	t.Parallel()
	tokens, err := grpcauth.ParseTokens("alice:" + aliceSecret + ",bob:" + bobSecret + ",carol:" + carolSecret)
	require.NoError(t, err)
	clock := &testClock{now: time.Unix(1_700_000_000, 0)}
	// 5 calls/s, burst 3.
	a := startSecured(t, grpcauth.Config{Tokens: tokens, RateLimit: 5, RateBurst: 3, Now: clock.Now}, nil, engine.Limits{})
	conn := dialCoordinator(t, a.Addr, nil)
	alice, bob := bearer(t.Context(), aliceSecret), bearer(t.Context(), bobSecret)

	for i := range 3 {
		require.NoError(t, listWorkflows(alice, conn), "call %d within the burst", i+1)
	}
	err = listWorkflows(alice, conn)
	delay := retryInfo(t, err)
	require.Greater(t, delay, time.Duration(0))
	require.LessOrEqual(t, delay, 200*time.Millisecond, "one token at 5/s")

	// Another identity is unaffected, and the coordinator stays healthy.
	for range 3 {
		require.NoError(t, listWorkflows(bob, conn))
	}
	requireHealthy(t, conn)

	// Alice is served again once the delay has passed, not before. Refusals spend nothing,
	// so asking again does not push the moment back.
	clock.Advance(delay / 2)
	_ = retryInfo(t, listWorkflows(alice, conn))
	clock.Advance(delay - delay/2)
	require.NoError(t, listWorkflows(alice, conn))

	// A sustained flood is refused, never queued: with the clock standing still, not one of
	// fifty calls gets through and each comes back (a queued call would wait for a token that
	// never comes).
	var ok, limited int
	for range 50 {
		err := listWorkflows(alice, conn)
		switch status.Code(err) {
		case codes.OK:
			ok++
		case codes.ResourceExhausted:
			limited++
		default:
			t.Fatalf("unexpected %v", err)
		}
	}
	require.Zero(t, ok, "no token came back: %d refused", limited)
	carol := bearer(t.Context(), carolSecret)
	require.NoError(t, listWorkflows(carol, conn), "another client is served during alice's flood")
}

func TestGRPCOversizedRequest(t *testing.T) {
	t.Parallel()
	// One step of at most 1 KiB per payload; requests up to the default 4 MiB.
	a := startSecured(t, grpcauth.Config{}, nil, engine.Limits{MaxSteps: 1, MaxPayloadBytes: 1024})
	conn := dialCoordinator(t, a.Addr, nil)
	client := treatyv1.NewCoordinatorClient(conn)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()

	huge := make([]byte, 5<<20)
	_, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "huge", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{
		Name: "s", Action: &treatyv1.Call{Target: "grpc://127.0.0.1:1/x.Y/Z", Payload: huge},
	}}}})
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), fmt.Sprintf("vs. %d", app.DefaultMaxRequestBytes), "the error names the request limit")

	// Within the message limit but over the payload limit: the engine names the limit.
	_, err = client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "big", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{
		Name: "s", Action: &treatyv1.Call{Target: "grpc://127.0.0.1:1/x.Y/Z", Payload: make([]byte, 4096)},
	}}}})
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)

	// The coordinator keeps serving, on the same connection.
	requireHealthy(t, conn)
	_, err = client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "huge"})
	require.Equal(t, codes.NotFound, status.Code(err), "nothing was written: %v", err)
	require.NoError(t, listWorkflows(t.Context(), conn))
}

// participantSetup is a participant that serves TLS only and requires the coordinator's client
// certificate, and the coordinator's matching participant TLS settings.
type participantSetup struct {
	part *grpcauthtest.Participant
	tls  *grpcauth.ParticipantTLS
}

func newTLSParticipant(t *testing.T) *participantSetup {
	t.Helper()
	partCA := grpcauthtest.NewCA(t, "participants CA")
	coordCA := grpcauthtest.NewCA(t, "coordinators (as clients) CA")
	srv := partCA.Server(t, "ledger")
	cfg, err := grpcauth.ServerTLS(srv.CertFile, srv.KeyFile, coordCA.CertFile, nil)
	require.NoError(t, err)
	coord := coordCA.Client(t, "treaty-coordinator")
	pt, err := grpcauth.NewParticipantTLS(grpcauth.ParticipantTLSConfig{
		Targets: []grpcauth.TargetTLS{{Match: "127.0.0.1", CA: partCA.CertFile, Cert: coord.CertFile, Key: coord.KeyFile}},
	}, nil)
	require.NoError(t, err)
	return &participantSetup{part: grpcauthtest.StartParticipant(t, cfg), tls: pt}
}

func TestParticipantCallsOverTLS(t *testing.T) {
	t.Parallel()
	ps := newTLSParticipant(t)
	a := startSecured(t, grpcauth.Config{}, ps.tls, engine.Limits{})
	client := treatyv1.NewCoordinatorClient(dialCoordinator(t, a.Addr, nil))
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	res, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{
		Gid: "tls-saga", Wait: durationpb.New(20 * time.Second),
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{
			Name:       "debit",
			Action:     &treatyv1.Call{Target: ps.part.Target("bank.Ledger/Debit"), Payload: []byte("x")},
			Compensate: &treatyv1.Call{Target: ps.part.Target("bank.Ledger/Credit"), Payload: []byte("x")},
		}}},
	})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
	calls := ps.part.Calls()
	require.Len(t, calls, 1)
	require.Equal(t, "/bank.Ledger/Debit", calls[0].Method)
	require.Equal(t, "tls-saga", calls[0].GID)
	require.Equal(t, "CN=treaty-coordinator,O=treaty tests", calls[0].ClientSubject, "the coordinator presented its client certificate")
}

func TestSDKAgainstSecuredCoordinator(t *testing.T) {
	t.Parallel()
	p := newPKI(t)
	ps := newTLSParticipant(t)
	tokens, err := grpcauth.ParseTokens("billing:" + aliceSecret)
	require.NoError(t, err)
	a := startSecured(t, grpcauth.Config{TLS: p.serverTLS(t, true), Tokens: tokens, RateLimit: 100, RateBurst: 100}, ps.tls, engine.Limits{})
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()

	dial := func(opts sdk.Options) *sdk.Client {
		opts.Address, opts.Retries, opts.CallTimeout = a.Addr, 1, 5*time.Second
		c, err := sdk.Dial(ctx, opts)
		require.NoError(t, err)
		t.Cleanup(func() { _ = c.Close() })
		return c
	}
	c := dial(sdk.Options{TLS: p.ca.ClientTLS(&p.client), Token: aliceSecret})
	tx, err := c.Saga(ctx, sdk.Saga{Steps: []sdk.Step{{
		Name:       "debit",
		Action:     sdk.MustCall(ps.part.Addr, "/bank.Ledger/Debit", &treatyv1.GetTransactionRequest{Gid: "a"}),
		Compensate: sdk.MustCall(ps.part.Addr, "/bank.Ledger/Credit", &treatyv1.GetTransactionRequest{Gid: "a"}),
	}}})
	require.NoError(t, err)
	require.Equal(t, tx.GID, ps.part.Calls()[0].GID)
	got, err := c.Get(ctx, tx.GID)
	require.NoError(t, err)
	require.True(t, got.Terminal())

	var se *sdk.Error
	_, err = dial(sdk.Options{TLS: p.ca.ClientTLS(&p.client), Token: bobSecret}).Get(ctx, tx.GID)
	require.True(t, errors.As(err, &se), "%v", err)
	require.Equal(t, codes.Unauthenticated, se.Code, "wrong token")
	_, err = dial(sdk.Options{TLS: p.ca.ClientTLS(&p.client)}).Get(ctx, tx.GID)
	require.True(t, errors.As(err, &se), "%v", err)
	require.Equal(t, codes.Unauthenticated, se.Code, "no token")
	_, err = dial(sdk.Options{TLS: p.ca.ClientTLS(nil), Token: aliceSecret}).Get(ctx, tx.GID)
	require.ErrorIs(t, err, sdk.ErrUnavailable, "no client certificate")
	_, err = dial(sdk.Options{Token: aliceSecret}).Get(ctx, tx.GID)
	require.Error(t, err, "plaintext")
}
