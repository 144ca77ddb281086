package participant_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/sdk/participant"
)

// The coordinator (internal/invoke) sends these exact keys; the SDK cannot import it, so both
// sides are pinned to the same literals.
func TestMetadataKeysMatchCoordinator(t *testing.T) {
	t.Parallel()
	require.Equal(t, "x-treaty-gid", participant.MetadataGID)
	require.Equal(t, "x-treaty-branch", participant.MetadataBranch)
	require.Equal(t, "x-treaty-op", participant.MetadataOp)
	require.Equal(t, "x-treaty-mode", participant.MetadataMode)
}

func TestMetadataValidate(t *testing.T) {
	t.Parallel()
	ok := participant.Metadata{GID: strings.Repeat("g", 128), Branch: strings.Repeat("b", 64), Op: "try", Mode: "tcc"}
	require.NoError(t, ok.Validate())
	require.NoError(t, participant.Metadata{GID: "A-z_0.9:x", Branch: "b", Op: "action", Mode: "saga"}.Validate())

	for _, tc := range []struct {
		md   participant.Metadata
		want string
	}{
		{participant.Metadata{Branch: "b", Op: "try", Mode: "tcc"}, "gid is empty"},
		{participant.Metadata{GID: "g", Op: "try", Mode: "tcc"}, "branch is empty"},
		{participant.Metadata{GID: "g", Branch: "b", Mode: "tcc"}, "op is empty"},
		{participant.Metadata{GID: "g", Branch: "b", Op: "try"}, "mode is empty"},
		{participant.Metadata{GID: strings.Repeat("g", 129), Branch: "b", Op: "try", Mode: "tcc"}, "gid is 129 bytes, limit 128"},
		{participant.Metadata{GID: "g", Branch: strings.Repeat("b", 65), Op: "try", Mode: "tcc"}, "branch is 65 bytes, limit 64"},
		{participant.Metadata{GID: "a/b", Branch: "b", Op: "try", Mode: "tcc"}, `gid "a/b" has '/' at byte 1`},
		{participant.Metadata{GID: "g", Branch: "b c", Op: "try", Mode: "tcc"}, `branch "b c" has ' ' at byte 1`},
	} {
		err := tc.md.Validate()
		require.ErrorIs(t, err, participant.ErrInvalidMetadata)
		require.ErrorContains(t, err, tc.want)
		require.Equal(t, codes.InvalidArgument, status.Code(participant.ToStatus(err)))
	}
}

func TestContextRoundTrip(t *testing.T) {
	t.Parallel()
	_, ok := participant.FromContext(context.Background())
	require.False(t, ok)
	md := participant.Metadata{GID: "g", Branch: "b", Op: "try", Mode: "tcc"}
	got, ok := participant.FromContext(participant.NewContext(context.Background(), md))
	require.True(t, ok)
	require.Equal(t, md, got)
}

func TestToStatus(t *testing.T) {
	t.Parallel()
	require.NoError(t, participant.ToStatus(nil))
	for _, tc := range []struct {
		err  error
		code codes.Code
	}{
		{participant.ErrAborted, codes.Aborted},
		{fmt.Errorf("no funds: %w", participant.ErrAborted), codes.Aborted},
		{participant.ErrRolledBack, codes.FailedPrecondition},
		{status.Error(codes.NotFound, "x"), codes.NotFound},
		{fmt.Errorf("query: %w", context.DeadlineExceeded), codes.DeadlineExceeded},
		{fmt.Errorf("query: %w", context.Canceled), codes.Canceled},
		{errors.New("disk on fire"), codes.Unknown},
	} {
		st := participant.ToStatus(tc.err)
		require.Equal(t, tc.code, status.Code(st), "%v", tc.err)
		require.Contains(t, status.Convert(st).Message(), status.Convert(tc.err).Message(), "the message is kept")
	}
	// A handler may return the sentinel, wrapped, without ToStatus: gRPC finds its code.
	require.Equal(t, codes.Aborted, status.Code(fmt.Errorf("x: %w", participant.ErrAborted)))
}

// recorder is a real gRPC service (the standard health service) whose handlers report what
// FromContext gave them.
type recorder struct {
	healthpb.UnimplementedHealthServer
	seen chan seen
}

type seen struct {
	md participant.Metadata
	ok bool
}

func (r *recorder) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	md, ok := participant.FromContext(ctx)
	r.seen <- seen{md, ok}
	return &healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING}, nil
}

func (r *recorder) Watch(_ *healthpb.HealthCheckRequest, stream healthpb.Health_WatchServer) error {
	md, ok := participant.FromContext(stream.Context())
	r.seen <- seen{md, ok}
	return stream.Send(&healthpb.HealthCheckResponse{Status: healthpb.HealthCheckResponse_SERVING})
}

func startServer(t *testing.T) (healthpb.HealthClient, *recorder) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(participant.UnaryServerInterceptor()),
		grpc.ChainStreamInterceptor(participant.StreamServerInterceptor()),
	)
	rec := &recorder{seen: make(chan seen, 10)}
	healthpb.RegisterHealthServer(srv, rec)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()
	t.Cleanup(func() {
		srv.Stop()
		require.NoError(t, <-served)
	})
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return healthpb.NewHealthClient(conn), rec
}

func outgoing(md participant.Metadata) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(),
		participant.MetadataGID, md.GID,
		participant.MetadataBranch, md.Branch,
		participant.MetadataOp, md.Op,
		participant.MetadataMode, md.Mode,
	)
}

func TestInterceptorsOverGRPC(t *testing.T) {
	t.Parallel()
	client, rec := startServer(t)
	md := participant.Metadata{GID: "g-1", Branch: "flight", Op: "try", Mode: "tcc"}

	t.Run("unary", func(t *testing.T) {
		_, err := client.Check(outgoing(md), &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		require.Equal(t, seen{md, true}, <-rec.seen)
	})
	t.Run("stream", func(t *testing.T) {
		stream, err := client.Watch(outgoing(md), &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		_, err = stream.Recv()
		require.NoError(t, err)
		require.Equal(t, seen{md, true}, <-rec.seen)
	})
	t.Run("without Treaty metadata the handler runs untouched", func(t *testing.T) {
		ctx := metadata.AppendToOutgoingContext(context.Background(), "x-other", "1")
		_, err := client.Check(ctx, &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		require.Equal(t, seen{}, <-rec.seen)

		stream, err := client.Watch(context.Background(), &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		_, err = stream.Recv()
		require.NoError(t, err)
		require.Equal(t, seen{}, <-rec.seen)
	})
	t.Run("malformed Treaty metadata is refused before the handler", func(t *testing.T) {
		bad := md
		bad.GID = "a/b"
		_, err := client.Check(outgoing(bad), &healthpb.HealthCheckRequest{})
		require.Equal(t, codes.InvalidArgument, status.Code(err))
		require.ErrorContains(t, err, `gid "a/b"`)

		partial := metadata.AppendToOutgoingContext(context.Background(), participant.MetadataGID, "g-1")
		stream, err := client.Watch(partial, &healthpb.HealthCheckRequest{})
		require.NoError(t, err)
		_, err = stream.Recv()
		require.Equal(t, codes.InvalidArgument, status.Code(err))
		require.ErrorContains(t, err, "branch is empty")
		require.Empty(t, rec.seen, "no handler ran")
	})
}
