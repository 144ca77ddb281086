package participant_test

import (
	"context"
	"database/sql"
	"fmt"
	"net"
	"sync/atomic"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/treatyhq/treaty/sdk/participant"
)

// serve starts a gRPC server on loopback with svc registered and returns a connection to it.
func serve(t *testing.T, svc *participant.Service, opts ...grpc.ServerOption) *grpc.ClientConn {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	srv := grpc.NewServer(opts...)
	svc.Register(srv)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// treatyCtx is a context carrying the metadata a coordinator sends.
func treatyCtx(md participant.Metadata) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(),
		participant.MetadataGID, md.GID, participant.MetadataBranch, md.Branch,
		participant.MetadataOp, md.Op, participant.MetadataMode, md.Mode)
}

func TestServiceTypedHandlers(t *testing.T) {
	t.Parallel()
	var intercepted atomic.Int32
	svc := participant.NewService("shop.Payments", nil)
	participant.Handle(svc, "Charge", func(ctx context.Context, in *structpb.Struct) (*wrapperspb.StringValue, error) {
		md, ok := participant.FromContext(ctx)
		if !ok {
			return wrapperspb.String("no treaty metadata"), nil
		}
		if in.Fields["amount"].GetNumberValue() > 100 {
			return nil, fmt.Errorf("card declined: %w", participant.ErrAborted)
		}
		return wrapperspb.String(md.GID + "/" + md.Branch + "/" + md.Op), nil
	})
	participant.Handle(svc, "Refund", func(ctx context.Context, in *wrapperspb.Int64Value) (*emptypb.Empty, error) {
		return &emptypb.Empty{}, nil
	})
	require.Equal(t, "/shop.Payments/Charge", svc.Method("Charge"))
	// The server's own interceptors run around the typed handlers too.
	conn := serve(t, svc, grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if info.FullMethod == "/shop.Payments/Charge" {
			intercepted.Add(1)
		}
		return h(ctx, req)
	}))

	md := participant.Metadata{GID: "g-1", Branch: "pay", Op: participant.OpAction, Mode: participant.ModeSaga}
	in, err := structpb.NewStruct(map[string]any{"amount": 30})
	require.NoError(t, err)
	out := &wrapperspb.StringValue{}
	require.NoError(t, conn.Invoke(treatyCtx(md), svc.Method("Charge"), in, out))
	require.Equal(t, "g-1/pay/action", out.Value, "the handler sees the coordinator's metadata")
	require.EqualValues(t, 1, intercepted.Load())

	// Without Treaty metadata the handler still runs, and says so.
	require.NoError(t, conn.Invoke(context.Background(), svc.Method("Charge"), in, out))
	require.Equal(t, "no treaty metadata", out.Value)

	// A business "no" is ABORTED, which the coordinator does not retry.
	big, err := structpb.NewStruct(map[string]any{"amount": 500})
	require.NoError(t, err)
	err = conn.Invoke(treatyCtx(md), svc.Method("Charge"), big, out)
	require.Equal(t, codes.Aborted, status.Code(err), "%v", err)
	require.Contains(t, err.Error(), "card declined")

	// Malformed metadata is refused before the handler runs.
	bad := md
	bad.Branch = "no spaces allowed"
	err = conn.Invoke(treatyCtx(bad), svc.Method("Charge"), in, out)
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)

	require.NoError(t, conn.Invoke(treatyCtx(md), svc.Method("Refund"), wrapperspb.Int64(3), &emptypb.Empty{}))
	err = conn.Invoke(treatyCtx(md), "/shop.Payments/Steal", in, out)
	require.Equal(t, codes.Unimplemented, status.Code(err))
}

func TestServiceMisuseIsNamed(t *testing.T) {
	t.Parallel()
	require.PanicsWithValue(t, `participant: service name "shop/Payments" is not a protobuf full name (letters, digits, _ and dots, such as shop.v1.Payments)`,
		func() { participant.NewService("shop/Payments", nil) })
	svc := participant.NewService("shop.Stock", nil)
	h := func(ctx context.Context, in *emptypb.Empty) (*emptypb.Empty, error) { return in, nil }
	require.PanicsWithValue(t, `participant: service shop.Stock: method name "Re serve" is not a protobuf identifier`,
		func() { participant.Handle(svc, "Re serve", h) })
	participant.Handle(svc, "Reserve", h)
	require.PanicsWithValue(t, "participant: /shop.Stock/Reserve added twice", func() { participant.Handle(svc, "Reserve", h) })
	require.PanicsWithValue(t, "participant: /shop.Stock/Release: HandlePgx needs ServiceOptions.Barrier and ServiceOptions.Pgx",
		func() {
			participant.HandlePgx(svc, "Release", func(ctx context.Context, tx pgx.Tx, in *emptypb.Empty) (*emptypb.Empty, error) { return in, nil })
		})
}

// A barrier-protected service: the business row and the barrier row commit together, a
// duplicate does not run the handler again, and an action after its compensate is refused.
func TestServiceBarrierInSameTransaction(t *testing.T) {
	t.Parallel()
	e := setup(t)
	var runs atomic.Int32
	record := func(ctx context.Context, exec func(ctx context.Context, q string, args ...any) error, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error) {
		runs.Add(1)
		md, _ := participant.FromContext(ctx)
		if in.Value == "fail" {
			// Written, then rolled back with the barrier row: a retry runs again.
			_ = exec(ctx, "INSERT INTO ledger (gid, branch, op) VALUES ($1, $2, 'doomed')", md.GID, md.Branch)
			return nil, fmt.Errorf("disk full")
		}
		if err := exec(ctx, "INSERT INTO ledger (gid, branch, op) VALUES ($1, $2, $3)", md.GID, md.Branch, md.Op); err != nil {
			return nil, err
		}
		return wrapperspb.String("done " + md.Op), nil
	}
	pgxSvc := participant.NewService("stock.Pgx", &participant.ServiceOptions{Barrier: e.barrier, Pgx: e.pool})
	sqlSvc := participant.NewService("stock.SQL", &participant.ServiceOptions{Barrier: e.barrier, SQL: e.db})
	for _, m := range []string{"Reserve", "Release"} {
		participant.HandlePgx(pgxSvc, m, func(ctx context.Context, tx pgx.Tx, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error) {
			return record(ctx, func(ctx context.Context, q string, args ...any) error { _, err := tx.Exec(ctx, q, args...); return err }, in)
		})
		participant.HandleSQL(sqlSvc, m, func(ctx context.Context, tx *sql.Tx, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error) {
			return record(ctx, func(ctx context.Context, q string, args ...any) error {
				_, err := tx.ExecContext(ctx, q, args...)
				return err
			}, in)
		})
	}
	for _, svc := range []*participant.Service{pgxSvc, sqlSvc} {
		t.Run(svc.Name(), func(t *testing.T) {
			conn := serve(t, svc)
			gid := newGID()
			action := participant.Metadata{GID: gid, Branch: "reserve", Op: participant.OpAction, Mode: participant.ModeSaga}
			out := &wrapperspb.StringValue{}
			before := runs.Load()

			err := conn.Invoke(treatyCtx(action), svc.Method("Reserve"), wrapperspb.String("fail"), out)
			require.Equal(t, codes.Unknown, status.Code(err), "a failure is transient: %v", err)
			require.Empty(t, e.ledgerOps(t, gid, "reserve"), "the failed work rolled back")
			require.Empty(t, e.barrierRows(t, gid, "reserve"), "and its barrier row with it")

			require.NoError(t, conn.Invoke(treatyCtx(action), svc.Method("Reserve"), wrapperspb.String("ok"), out))
			require.Equal(t, "done action", out.Value)
			require.NoError(t, conn.Invoke(treatyCtx(action), svc.Method("Reserve"), wrapperspb.String("ok"), out))
			require.Empty(t, out.Value, "the duplicate answers an empty response")
			require.Equal(t, []string{"action"}, e.ledgerOps(t, gid, "reserve"))
			require.EqualValues(t, 2, runs.Load()-before, "the duplicate did not run the handler")

			// Compensate before its action: an empty rollback, then the late action is refused.
			late := participant.Metadata{GID: gid, Branch: "late", Op: participant.OpCompensate, Mode: participant.ModeSaga}
			require.NoError(t, conn.Invoke(treatyCtx(late), svc.Method("Release"), wrapperspb.String("ok"), out))
			require.Empty(t, e.ledgerOps(t, gid, "late"))
			late.Op = participant.OpAction
			err = conn.Invoke(treatyCtx(late), svc.Method("Reserve"), wrapperspb.String("ok"), out)
			require.Equal(t, codes.Aborted, status.Code(err), "%v", err)
			require.Empty(t, e.ledgerOps(t, gid, "late"))

			// Without Treaty metadata there is no barrier key: refused, nothing written.
			err = conn.Invoke(context.Background(), svc.Method("Reserve"), wrapperspb.String("ok"), out)
			require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		})
	}
}
