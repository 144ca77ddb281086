package participant_test

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/treatyhq/treaty/pkg/fault"
	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/participant"
	"github.com/treatyhq/treaty/sdk/treatytest"
)

// faultyService is a real gRPC service (the health service's Check as its one method) behind
// FaultInterceptor, recording which calls reached the handler.
type faultyService struct {
	addr string
	mu   sync.Mutex
	ran  []participant.Metadata
	hits []string // rule ids that fired, from OnFault
}

func startFaulty(t *testing.T, rules ...fault.Rule) *faultyService {
	t.Helper()
	set, err := fault.NewSet(time.Now(), rules...)
	require.NoError(t, err)
	s := &faultyService{}
	record := func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		md, _ := participant.FromContext(ctx)
		s.mu.Lock()
		s.ran = append(s.ran, md)
		s.mu.Unlock()
		return h(ctx, req)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(
		participant.FaultInterceptor(set, &participant.FaultOptions{OnFault: func(_ context.Context, _ string, _ participant.Metadata, r fault.Rule) {
			s.mu.Lock()
			s.hits = append(s.hits, r.ID)
			s.mu.Unlock()
		}}),
		participant.UnaryServerInterceptor(), record))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	s.addr = lis.Addr().String()
	return s
}

func (s *faultyService) ranFor(gid string) []participant.Metadata {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []participant.Metadata
	for _, md := range s.ran {
		if md.GID == gid {
			out = append(out, md)
		}
	}
	return out
}

func rule(id string, f func(r *fault.Rule)) fault.Rule {
	r := fault.Rule{ID: id, Reason: "rehearsal", ExpiresAt: time.Now().Add(time.Hour)}
	f(&r)
	return r
}

// TestFaultInterceptorWithCoordinator: a real coordinator drives sagas against a service that
// rehearses failing. A lost response ran the handler and the coordinator's retry ran it again
// (at-least-once; the barrier absorbs it); an injected ABORTED turns the saga back.
func TestFaultInterceptorWithCoordinator(t *testing.T) {
	t.Parallel()
	svc := startFaulty(t,
		rule("lost", func(r *fault.Rule) {
			r.Target, r.Op, r.GIDPrefix, r.Effect, r.MaxCount = "*/grpc.health.v1.Health/Check", "action", "lost-", fault.EffectLostResponse, 1
		}),
		rule("no", func(r *fault.Rule) {
			r.Op, r.GIDPrefix, r.Effect, r.Code, r.Message = "action", "no-", fault.EffectStatus, "ABORTED", "rehearsed refusal"
		}),
	)
	coord := treatytest.Start(t, treatytest.Options{})
	cl := coord.Client(t)
	payload, err := proto.Marshal(&healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	call := sdk.Call{Target: "grpc://" + svc.addr + "/grpc.health.v1.Health/Check", Payload: payload}
	step := func(name string) sdk.Step {
		return sdk.Step{Name: name, Action: call, Compensate: call, CallTimeout: 5 * time.Second,
			Retry: &sdk.Retry{MaxAttempts: 5, InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}}
	}

	tx, err := cl.Saga(t.Context(), sdk.Saga{GID: "lost-1", Steps: []sdk.Step{step("a"), step("b")}, Wait: 30 * time.Second})
	require.NoError(t, err)
	require.Equal(t, sdk.StatusSucceeded, tx.Status)
	ran := svc.ranFor("lost-1")
	require.Len(t, ran, 3, "step a ran twice (its first answer was lost), step b once: %v", ran)
	require.Equal(t, "a", ran[0].Branch)
	require.Equal(t, "a", ran[1].Branch)

	_, err = cl.Saga(t.Context(), sdk.Saga{GID: "no-1", Steps: []sdk.Step{step("a"), step("b")}, Wait: 30 * time.Second})
	require.ErrorContains(t, err, "rehearsed refusal")
	tx, err = cl.Wait(t.Context(), "no-1", 30*time.Second)
	require.NoError(t, err)
	require.Equal(t, sdk.StatusCompensated, tx.Status)
	require.Empty(t, svc.ranFor("no-1"), "the refused action never reached the handler")
	svc.mu.Lock()
	require.Equal(t, []string{"lost", "no"}, svc.hits)
	svc.mu.Unlock()
}

// TestFaultInterceptorDelayAndDrop: a delay runs the handler late; a drop never runs it and the
// caller hears its own deadline; calls outside the rules pass untouched.
func TestFaultInterceptorDelayAndDrop(t *testing.T) {
	t.Parallel()
	svc := startFaulty(t,
		rule("slow", func(r *fault.Rule) {
			r.GIDPrefix, r.Effect, r.Delay = "slow-", fault.EffectDelay, fault.Duration(200*time.Millisecond)
		}),
		rule("silent", func(r *fault.Rule) { r.GIDPrefix, r.Effect = "drop-", fault.EffectDrop }),
	)
	conn, err := grpc.NewClient(svc.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	with := func(gid string) context.Context {
		return metadata.AppendToOutgoingContext(t.Context(), participant.MetadataGID, gid, participant.MetadataBranch, "b",
			participant.MetadataOp, "action", participant.MetadataMode, "saga")
	}

	start := time.Now()
	_, err = hc.Check(with("slow-1"), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.GreaterOrEqual(t, time.Since(start), 200*time.Millisecond, "the delay is a lower bound")
	require.Len(t, svc.ranFor("slow-1"), 1)

	ctx, cancel := context.WithTimeout(with("drop-1"), time.Second)
	defer cancel()
	start = time.Now()
	_, err = hc.Check(ctx, &healthpb.HealthCheckRequest{})
	// The caller's deadline ends the call. Which side's timer speaks first is a race: the
	// client's own (DeadlineExceeded), or the server's copy of the same deadline (sent as the
	// grpc-timeout header, a little shorter by the time it arrives), on which grpc-go resets
	// the stream (RST_STREAM CANCEL: Canceled at the client), as it does for any handler past
	// its deadline. Both happen (CI saw the second).
	require.Contains(t, []codes.Code{codes.DeadlineExceeded, codes.Canceled}, status.Code(err), "%v", err)
	require.GreaterOrEqual(t, time.Since(start), 900*time.Millisecond, "the dropped call was not held until the deadline")
	require.Empty(t, svc.ranFor("drop-1"))

	_, err = hc.Check(with("plain-1"), &healthpb.HealthCheckRequest{})
	require.NoError(t, err)
	require.Len(t, svc.ranFor("plain-1"), 1)
}
