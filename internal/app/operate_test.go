package app_test

import (
	"context"
	"errors"
	"sync/atomic"
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

func operate(b *bundle, op engine.Operation) (*treatyv1.Transaction, error) {
	if op.Actor == "" {
		op.Actor = "alice"
	}
	return b.app.Engine.Operate(context.Background(), op)
}

func lastEvent(tx *treatyv1.Transaction, kind string) *treatyv1.Event {
	for i := len(tx.Events) - 1; i >= 0; i-- {
		if tx.Events[i].Kind == kind {
			return tx.Events[i]
		}
	}
	return nil
}

// A saga stuck waiting for an operator is resumed once the participant is fixed, and the
// history says who resumed it and why.
func TestOperatorResumesStuckSaga(t *testing.T) {
	t.Parallel()
	var fixed atomic.Bool
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "action" && c.Branch == "second" {
			return status.Error(codes.Aborted, "no")
		}
		if c.Op == "compensate" && !fixed.Load() {
			return status.Error(codes.Unavailable, "compensation service down")
		}
		return nil
	}})
	tx := b.submitWait(t, "op-resume", b.step("first"), b.step("second"))
	require.Equal(t, treatyv1.Status_STATUS_NEEDS_OPERATOR, tx.Status)

	_, err := operate(b, engine.Operation{GID: "op-resume", Action: engine.ActionResume})
	var inv *engine.InvalidArgumentError
	require.True(t, errors.As(err, &inv), "a reason is required: %v", err)
	require.Equal(t, "reason", inv.Field)

	fixed.Store(true)
	_, err = operate(b, engine.Operation{GID: "op-resume", Action: engine.ActionResume, Reason: "compensation service redeployed"})
	require.NoError(t, err)
	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "op-resume", Timeout: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, res.Transaction.Status)
	ev := lastEvent(res.Transaction, "operator_resume")
	require.NotNil(t, ev)
	require.Equal(t, "by alice: compensation service redeployed", ev.Detail)

	// Resuming again makes no sense now: refused with the reason.
	_, err = operate(b, engine.Operation{GID: "op-resume", Action: engine.ActionResume, Reason: "again"})
	require.ErrorIs(t, err, engine.ErrConflict)
	require.Contains(t, err.Error(), "only a saga waiting for an operator can be resumed")
}

func TestOperatorResolvesBranchByHand(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "action" && c.Branch == "second" {
			return status.Error(codes.Aborted, "no")
		}
		if c.Op == "compensate" {
			return status.Error(codes.Internal, "cannot undo automatically")
		}
		return nil
	}})
	tx := b.submitWait(t, "op-resolve", b.step("first"), b.step("second"))
	require.Equal(t, treatyv1.Status_STATUS_NEEDS_OPERATOR, tx.Status)
	_, err := operate(b, engine.Operation{GID: "op-resolve", Action: engine.ActionResolve, Branch: "first", Op: "compensate", Reason: "refunded by hand, ticket 42"})
	require.NoError(t, err)
	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "op-resolve", Timeout: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, res.Transaction.Status)
	require.Contains(t, branch(res.Transaction, "first", "compensate").LastError, "resolved by hand by alice")
	require.NotNil(t, lastEvent(res.Transaction, "operator_resolve"))
}

func TestOperatorRetryNowSkipsBackoff(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Branch == "slow" && calls.Add(1) == 1 {
			return status.Error(codes.Unavailable, "later")
		}
		return nil
	}})
	slow := b.step("slow")
	slow.Retry = &treatyv1.RetryPolicy{MaxAttempts: 5, InitialBackoff: durationpb.New(time.Hour), MaxBackoff: durationpb.New(time.Hour)}
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Gid: "op-retry", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{slow}}})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return calls.Load() == 1 }, 30*time.Second, 10*time.Millisecond)
	require.Eventually(t, func() bool {
		_, err = operate(b, engine.Operation{GID: "op-retry", Action: engine.ActionRetry, Reason: "participant is back"})
		return err == nil
	}, 30*time.Second, 20*time.Millisecond, "retry: %v", err)
	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "op-retry", Timeout: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status, "an hour of backoff was skipped")
}

func TestOperatorPauseAndRollback(t *testing.T) {
	t.Parallel()
	var calls atomic.Int32
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "action" && c.Branch == "slow" {
			calls.Add(1)
			return status.Error(codes.Unavailable, "later")
		}
		return nil
	}})
	slow := b.step("slow")
	slow.Retry = &treatyv1.RetryPolicy{MaxAttempts: 1000, InitialBackoff: durationpb.New(200 * time.Millisecond), MaxBackoff: durationpb.New(200 * time.Millisecond)}
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Gid: "op-pause", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("fast"), slow}}})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return calls.Load() >= 1 }, 30*time.Second, 10*time.Millisecond)
	var tx *treatyv1.Transaction
	require.Eventually(t, func() bool {
		tx, err = operate(b, engine.Operation{GID: "op-pause", Action: engine.ActionPause, Reason: "investigating"})
		return err == nil
	}, 30*time.Second, 20*time.Millisecond, "pause: %v", err)
	require.True(t, tx.Paused)
	require.Empty(t, tx.LeaseOwner)
	before := calls.Load()
	// Paused: nobody calls the participant; a wait of several backoffs proves it.
	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "op-pause", Timeout: durationpb.New(time.Second)})
	require.NoError(t, err)
	require.False(t, res.Terminal)
	require.Equal(t, before, calls.Load())
	_, err = operate(b, engine.Operation{GID: "op-pause", Action: engine.ActionRetry, Reason: "x"})
	require.ErrorIs(t, err, engine.ErrConflict)
	require.Contains(t, err.Error(), "paused")

	// Roll back needs it unpaused; unpause, then roll back.
	_, err = operate(b, engine.Operation{GID: "op-pause", Action: engine.ActionUnpause, Reason: "found it"})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		_, err = operate(b, engine.Operation{GID: "op-pause", Action: engine.ActionRollback, Reason: "customer cancelled"})
		return err == nil
	}, 30*time.Second, 20*time.Millisecond, "rollback: %v", err)
	res, err = b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "op-pause", Timeout: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, res.Transaction.Status)
	require.Contains(t, res.Transaction.Reason, "rolled back by alice: customer cancelled")
	for _, k := range []string{"operator_pause", "operator_unpause", "operator_rollback"} {
		require.NotNil(t, lastEvent(res.Transaction, k), k)
	}
	// A finished saga cannot be rolled back.
	_, err = operate(b, engine.Operation{GID: "op-pause", Action: engine.ActionRollback, Reason: "again"})
	require.ErrorIs(t, err, engine.ErrConflict)
}

func TestOperatorRollsBackWaitingTCC(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	b.beginTCC(t, "op-tcc", time.Hour, "flight")
	_, err := operate(b, engine.Operation{GID: "op-tcc", Action: engine.ActionRollback, Reason: "initiator is gone"})
	require.NoError(t, err)
	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "op-tcc", Timeout: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "cancelled", res.Transaction.Phase)
	require.Equal(t, []string{"cancel:flight"}, ops(b.part, "op-tcc"))
	_, err = b.client.CommitTCC(context.Background(), &treatyv1.CommitTCCRequest{Gid: "op-tcc"})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))

	_, err = operate(b, engine.Operation{GID: "nope", Action: engine.ActionRetry, Reason: "x"})
	require.ErrorIs(t, err, engine.ErrNotFound)
}

// An operator action refused on a TCC still waiting for its initiator hands it back free: the
// initiator can still register branches and commit.
func TestRefusedActionLeavesWaitingTCCToItsInitiator(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	b.beginTCC(t, "op-tcc-open", time.Hour, "flight")
	_, err := operate(b, engine.Operation{GID: "op-tcc-open", Action: engine.ActionRetry, Reason: "poke"})
	require.ErrorIs(t, err, engine.ErrConflict)
	_, err = b.client.RegisterTCCBranch(context.Background(), &treatyv1.RegisterTCCBranchRequest{Gid: "op-tcc-open", Branch: b.tccBranch("hotel")})
	require.NoError(t, err, "the refused action must not have left the transaction held")
	res, err := b.client.CommitTCC(context.Background(), &treatyv1.CommitTCCRequest{Gid: "op-tcc-open", Wait: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "confirmed", res.Transaction.Phase)
	require.ElementsMatch(t, []string{"confirm:flight", "confirm:hotel"}, ops(b.part, "op-tcc-open"))
}
