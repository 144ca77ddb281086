package app_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// An operator action asked of a replica that does not drive the transaction is queued in the
// database and applied by the replica that does: the operator never retries by hand.
func TestOperatorActionOnAnotherReplicaIsQueuedAndApplied(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	// Replica A drives a saga whose second step waits out a long backoff (its lease renewed).
	a := setup(t, setupOpts{script: slowIsDown})
	heldSaga(t, a, "queued-op")
	_, owner := a.epoch(t, "queued-op")
	require.Equal(t, a.app.Engine.Owner(), owner)

	// Replica B, same database, is asked to roll it back.
	bApp := secondReplica(t, a)
	_, err := bApp.Engine.Operate(ctx, engine.Operation{GID: "queued-op", Action: engine.ActionRollback, Actor: "alice", Reason: "maintenance runs all day"})
	require.ErrorIs(t, err, engine.ErrQueued)
	require.Contains(t, err.Error(), owner, "it says which replica applies it")

	// A applies it: the saga turns back and compensates the first step.
	waitUntil(t, "the queued rollback is applied by the driving replica", func() bool {
		got, err := a.client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "queued-op"})
		require.NoError(t, err)
		return got.Transaction.Status == treatyv1.Status_STATUS_COMPENSATED
	})
	got, err := a.client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "queued-op"})
	require.NoError(t, err)
	require.Contains(t, eventKinds(got.Transaction), "operator_rollback")
	require.Contains(t, got.Transaction.Reason, "rolled back by alice")
	waitUntil(t, "the queue is empty", func() bool {
		var n int
		require.NoError(t, a.pool.QueryRow(ctx, `SELECT count(*) FROM treaty_operator_queue`).Scan(&n))
		return n == 0
	})
}

// slowIsDown fails the "slow" step's action as a participant down for maintenance would.
func slowIsDown(_ context.Context, c testparticipant.Call) error {
	if c.Branch == "slow" && c.Op == "action" {
		return status.Error(codes.Unavailable, "down for maintenance")
	}
	return nil
}

// heldSaga submits gid through a, a saga whose "slow" step fails once and then waits an hour
// for its next attempt: a keeps driving it (its lease renewed) without calling anyone.
func heldSaga(t *testing.T, a *bundle, gid string) {
	t.Helper()
	ctx := context.Background()
	slow := a.step("slow", "first")
	slow.Retry = &treatyv1.RetryPolicy{MaxAttempts: 100, InitialBackoff: durationpb.New(time.Hour), MaxBackoff: durationpb.New(time.Hour)}
	_, err := a.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: gid,
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{a.step("first"), slow}}})
	require.NoError(t, err)
	waitUntil(t, "the slow step failed once and waits", func() bool {
		var n int
		err := a.pool.QueryRow(ctx, `SELECT attempts FROM treaty_branches WHERE gid = $1 AND branch = 'slow' AND op = 'action'`, gid).Scan(&n)
		if errors.Is(err, pgx.ErrNoRows) {
			return false // not touched yet: a branch's row is written once it is
		}
		require.NoError(t, err)
		return n == 1
	})
}

// secondReplica starts another coordinator on a's database, stopped when the test ends.
func secondReplica(t *testing.T, a *bundle) *app.App {
	t.Helper()
	b, err := app.Start(context.Background(), app.Config{DB: a.db, Listen: "127.0.0.1:0", Logger: testLogger(t),
		Engine: engine.Config{Lease: 3 * time.Second, RecoveryInterval: 100 * time.Millisecond}})
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		require.NoError(t, b.Stop(ctx))
	})
	return b
}
