package app_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// A replica full of sagas waiting out an outage (--max-active reached) still applies the
// operator actions queued for it.
func TestQueuedActionAppliedOnAFullReplica(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	a := setup(t, setupOpts{engine: engine.Config{MaxActive: 1}, script: slowIsDown})
	heldSaga(t, a, "full-queued")
	b := secondReplica(t, a)
	_, err := b.Engine.Operate(ctx, engine.Operation{GID: "full-queued", Action: engine.ActionRollback, Actor: "alice", Reason: "maintenance runs all day"})
	require.ErrorIs(t, err, engine.ErrQueued)
	waitUntil(t, "the full replica applies the queued rollback", func() bool {
		got, err := a.client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "full-queued"})
		require.NoError(t, err)
		return got.Transaction.Status == treatyv1.Status_STATUS_COMPENSATED
	})
}

// Sagas whose calls an open breaker holds back write nothing else; they must still look alive
// to the stuck-transaction job (even with a short --stuck-after), or it re-drives them and each
// new driver starts their retry window again, so that they never turn back.
func TestHeldBackSagasAreNotReDrivenAndTheirWindowEnds(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	a := setup(t, setupOpts{engine: engine.Config{Jobs: engine.JobsConfig{Interval: time.Second, StuckAfter: 4 * time.Second}},
		script: func(_ context.Context, c testparticipant.Call) error {
			if c.Op == "action" {
				return status.Error(codes.Unavailable, "down")
			}
			return nil
		}})
	const n = 20
	for i := range n {
		s := a.step("s")
		s.Retry = &treatyv1.RetryPolicy{RetryWindow: durationpb.New(8 * time.Second)}
		_, err := a.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: fmt.Sprintf("held-%d", i),
			Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{s}}})
		require.NoError(t, err)
	}
	waitUntil(t, "every saga's window ended and it compensated", func() bool {
		var running int
		require.NoError(t, a.pool.QueryRow(ctx, `SELECT count(*) FROM treaty_transactions WHERE gid LIKE 'held-%' AND status <> 'compensated'`).Scan(&running))
		return running == 0
	})
	var redriven int
	require.NoError(t, a.pool.QueryRow(ctx, `SELECT count(*) FROM treaty_events WHERE kind = 'reconcile_stuck'`).Scan(&redriven))
	require.Zero(t, redriven, "live sagas waiting out an outage were re-driven as stuck")
}
