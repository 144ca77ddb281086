package app_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

func msgRequest(p *testparticipant.Participant, gid string, timeout time.Duration, names ...string) *treatyv1.PrepareMsgRequest {
	req := &treatyv1.PrepareMsgRequest{
		Gid:           gid,
		QueryPrepared: &treatyv1.Call{Target: p.Target("app.Orders/QueryPrepared")},
		Timeout:       durationpb.New(timeout),
	}
	for _, n := range names {
		req.Deliveries = append(req.Deliveries, &treatyv1.MsgDelivery{
			Name:  n,
			Call:  &treatyv1.Call{Target: p.Target("test.Svc/Deliver"), Payload: []byte("deliver-" + n)},
			Retry: &treatyv1.RetryPolicy{InitialBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(50 * time.Millisecond)},
		})
	}
	return req
}

func TestMsgSubmittedIsDelivered(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	ctx := context.Background()
	_, err := b.client.PrepareMsg(ctx, msgRequest(b.part, "msg-1", time.Minute, "points", "email"))
	require.NoError(t, err)
	require.Empty(t, b.part.CallsFor("msg-1"), "nothing is delivered before submit")
	res, err := b.client.SubmitMsg(ctx, &treatyv1.SubmitMsgRequest{Gid: "msg-1", Wait: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
	require.Equal(t, treatyv1.Mode_MODE_MESSAGE, res.Transaction.Mode)
	require.ElementsMatch(t, []string{"deliver:points", "deliver:email"}, ops(b.part, "msg-1"))
	// Submitting again is harmless.
	_, err = b.client.SubmitMsg(ctx, &treatyv1.SubmitMsgRequest{Gid: "msg-1"})
	require.NoError(t, err)
	require.Len(t, b.part.CallsFor("msg-1"), 2)
}

func TestMsgNeverSubmittedIsResolvedByQuery(t *testing.T) {
	t.Parallel()
	var queries atomic.Int32
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op != "query_prepared" {
			return nil
		}
		if queries.Add(1) == 1 {
			return status.Error(codes.Unavailable, "app restarting")
		}
		if c.GID == "msg-rolled-back" {
			return status.Error(codes.Aborted, "local transaction rolled back")
		}
		return nil
	}})
	ctx := context.Background()
	_, err := b.client.PrepareMsg(ctx, msgRequest(b.part, "msg-committed", 200*time.Millisecond, "points"))
	require.NoError(t, err)
	_, err = b.client.PrepareMsg(ctx, msgRequest(b.part, "msg-rolled-back", 200*time.Millisecond, "points"))
	require.NoError(t, err)

	res, err := b.client.WaitTransaction(ctx, &treatyv1.WaitTransactionRequest{Gid: "msg-committed", Timeout: durationpb.New(15 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "succeeded", res.Transaction.Phase)
	require.Contains(t, ops(b.part, "msg-committed"), "deliver:points")

	res, err = b.client.WaitTransaction(ctx, &treatyv1.WaitTransactionRequest{Gid: "msg-rolled-back", Timeout: durationpb.New(15 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "aborted", res.Transaction.Phase)
	require.Contains(t, res.Transaction.Reason, "local transaction rolled back")
	require.NotContains(t, ops(b.part, "msg-rolled-back"), "deliver:points")

	// A late submit of a dropped message is refused, saying why.
	_, err = b.client.SubmitMsg(ctx, &treatyv1.SubmitMsgRequest{Gid: "msg-rolled-back"})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	require.Contains(t, err.Error(), "aborted")
}

func TestMsgBadInput(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	ctx := context.Background()
	req := msgRequest(b.part, "", time.Minute)
	_, err := b.client.PrepareMsg(ctx, req)
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "deliveries: ")
	req = msgRequest(b.part, "", time.Minute, "a")
	req.QueryPrepared = nil
	_, err = b.client.PrepareMsg(ctx, req)
	require.Contains(t, status.Convert(err).Message(), "query_prepared: ")
	req = msgRequest(b.part, "", time.Minute, "a")
	req.Deliveries[0].Call.Target = "grpc://nohost/x"
	_, err = b.client.PrepareMsg(ctx, req)
	require.Contains(t, status.Convert(err).Message(), "deliveries[0].call.target: ")
	_, err = b.client.SubmitMsg(ctx, &treatyv1.SubmitMsgRequest{Gid: "missing"})
	require.Equal(t, codes.NotFound, status.Code(err))
	var n int
	require.NoError(t, b.pool.QueryRow(ctx, "SELECT count(*) FROM treaty_transactions").Scan(&n))
	require.Zero(t, n)
}
