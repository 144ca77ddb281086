package tcc_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/tcc"
)

// The operator actions on a TCC transaction, phase by phase (the rules it shares with 2PC).
func TestOperate(t *testing.T) {
	spec := tcc.Spec{Branches: []tcc.BranchPolicy{{Name: "flight"}, {Name: "hotel"}}, OperatorThreshold: 3}
	op := func(a saga.Action) saga.Operation { return saga.Operation{Action: a, Actor: "alice", Reason: "why"} }

	s := tcc.New(spec)
	got, evs, err := tcc.Operate(spec, s, op(saga.ActionRollback))
	require.NoError(t, err)
	require.Equal(t, tcc.PhaseCancelling, got.Phase)
	require.Equal(t, "cancelled by alice: why", got.Reason)
	require.Equal(t, []string{"operator_rollback", "cancelling"}, []string{evs[0].Kind, evs[1].Kind})

	_, _, err = tcc.Operate(spec, s, op(saga.ActionRetry))
	require.ErrorIs(t, err, saga.ErrNotAllowed)
	require.ErrorContains(t, err, "the transaction is trying: nothing is waiting to be retried")
	_, _, err = tcc.Operate(spec, s, op(saga.ActionResume))
	require.ErrorContains(t, err, "only one waiting for an operator can be resumed")

	confirming := s.Clone()
	confirming.Phase = tcc.PhaseConfirming
	_, _, err = tcc.Operate(spec, confirming, op(saga.ActionRollback))
	require.ErrorContains(t, err, "the initiator committed: confirmations cannot be undone")
	_, _, err = tcc.Operate(spec, confirming, op(saga.ActionRetry))
	require.ErrorContains(t, err, "no branch is waiting out a backoff")

	// Waiting for an operator after confirms failed: resume goes on confirming, with fresh
	// attempts; resolving a cancel is refused, resolving a confirm is taken.
	stuck := s.Clone()
	stuck.Phase, stuck.Reason = tcc.PhaseNeedsOperator, "a confirm failed 3 times: down"
	stuck.Branches[0].Confirm = saga.Branch{Status: saga.StatusFailed, Attempts: 3, LastError: "down"}
	_, _, err = tcc.Operate(spec, stuck, op(saga.ActionRollback))
	require.ErrorContains(t, err, "a confirm or cancel is stuck")
	got, _, err = tcc.Operate(spec, stuck, op(saga.ActionResume))
	require.NoError(t, err)
	require.Equal(t, tcc.PhaseConfirming, got.Phase)
	require.Equal(t, "down", got.Reason)
	require.Less(t, got.Branches[0].Confirm.Attempts, 3)
	res := op(saga.ActionResolve)
	res.Step, res.Op = 0, saga.Op(tcc.OpCancel)
	_, _, err = tcc.Operate(spec, stuck, res)
	require.ErrorContains(t, err, "the transaction is needs_operator: cancel is not what it is doing")
	res.Op = saga.Op(tcc.OpConfirm)
	got, evs, err = tcc.Operate(spec, stuck, res)
	require.NoError(t, err)
	require.Equal(t, tcc.PhaseConfirming, got.Phase)
	require.Equal(t, saga.StatusSucceeded, got.Branches[0].Confirm.Status)
	require.Equal(t, "flight", evs[0].Step)
	require.Equal(t, saga.StatusFailed, stuck.Branches[0].Confirm.Status, "the state given is not changed")
	res.Step = 2
	_, _, err = tcc.Operate(spec, stuck, res)
	require.ErrorContains(t, err, "no such branch op: want a registered branch and confirm or cancel")
}
