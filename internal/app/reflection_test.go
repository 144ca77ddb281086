package app_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/descriptorpb"

	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/store/sqlite"
)

// TestReflectionShowsComments asks a running coordinator for its API over gRPC reflection, as
// grpcurl describe does, and finds the proto's comments on every message and field.
func TestReflectionShowsComments(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	st, err := sqlite.Open(ctx, sqlite.Memory)
	require.NoError(t, err)
	_, err = st.Migrate(ctx)
	require.NoError(t, err)
	a, err := app.Start(ctx, app.Config{Store: st, Listen: "127.0.0.1:0"})
	require.NoError(t, err)
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		require.NoError(t, a.Stop(sctx))
		st.Close()
	})
	conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(cctx)
	require.NoError(t, err)
	ask := func(symbol string) []*descriptorpb.FileDescriptorProto {
		require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{
			MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: symbol}}))
		res, err := stream.Recv()
		require.NoError(t, err)
		fds := res.GetFileDescriptorResponse()
		require.NotNil(t, fds, "reflection answered %v", res)
		var out []*descriptorpb.FileDescriptorProto
		for _, b := range fds.FileDescriptorProto {
			var fd descriptorpb.FileDescriptorProto
			require.NoError(t, proto.Unmarshal(b, &fd))
			out = append(out, &fd)
		}
		return out
	}
	files := ask("treaty.v1.Coordinator")
	reg, err := protodesc.NewFiles(&descriptorpb.FileDescriptorSet{File: files})
	require.NoError(t, err)
	d, err := reg.FindDescriptorByName("treaty.v1.Transaction")
	require.NoError(t, err)
	msg := d.(protoreflect.MessageDescriptor)
	require.Contains(t, comment(msg), "A transaction as the coordinator stores it")
	require.Contains(t, comment(msg.Fields().ByName("gid")), "idempotency key")
	svc, err := reg.FindDescriptorByName("treaty.v1.Coordinator")
	require.NoError(t, err)
	require.Contains(t, comment(svc.(protoreflect.ServiceDescriptor).Methods().ByName("SubmitSaga")), "stores a saga")

	// Every message, field, enum and value of the API says what it is.
	fd, err := reg.FindFileByPath("treaty/v1/treaty.proto")
	require.NoError(t, err)
	var missing []string
	var walk func(ms protoreflect.MessageDescriptors)
	walk = func(ms protoreflect.MessageDescriptors) {
		for i := range ms.Len() {
			m := ms.Get(i)
			if m.IsMapEntry() {
				continue
			}
			if comment(m) == "" {
				missing = append(missing, string(m.FullName()))
			}
			for j := range m.Fields().Len() {
				if f := m.Fields().Get(j); comment(f) == "" {
					missing = append(missing, string(f.FullName()))
				}
			}
			walk(m.Messages())
		}
	}
	walk(fd.Messages())
	for i := range fd.Enums().Len() {
		e := fd.Enums().Get(i)
		if comment(e) == "" {
			missing = append(missing, string(e.FullName()))
		}
		for j := range e.Values().Len() {
			if v := e.Values().Get(j); comment(v) == "" {
				missing = append(missing, string(v.FullName()))
			}
		}
	}
	require.Empty(t, missing, "undocumented in treaty.proto")

	// The health service still resolves (from the linked-in registry).
	require.NotEmpty(t, ask("grpc.health.v1.Health"))
}

func comment(d protoreflect.Descriptor) string {
	loc := d.ParentFile().SourceLocations().ByDescriptor(d)
	return strings.TrimSpace(loc.LeadingComments + loc.TrailingComments)
}
