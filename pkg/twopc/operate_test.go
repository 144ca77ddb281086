package twopc_test

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/twopc"
)

// The operator actions on a 2PC transaction in 2PC's words (the rules are TCC's).
func TestOperate(t *testing.T) {
	spec := twopc.Spec{Branches: []twopc.BranchPolicy{{Name: "bank"}}, OperatorThreshold: 3}
	op := func(a saga.Action) saga.Operation { return saga.Operation{Action: a, Actor: "bob", Reason: "why"} }
	pending := saga.Branch{Status: saga.StatusPending}
	s := twopc.State{Phase: twopc.PhasePreparing, Branches: []twopc.BranchState{{Prepare: pending, Commit: pending, Rollback: pending}}}
	got, evs, err := twopc.Operate(spec, s, op(saga.ActionRollback))
	require.NoError(t, err)
	require.Equal(t, twopc.PhaseRollingBack, got.Phase)
	require.Equal(t, "rolled back by bob: why", got.Reason)
	require.Equal(t, "rolling_back", evs[1].Kind)

	s.Phase = twopc.PhaseCommitted
	_, _, err = twopc.Operate(spec, s, op(saga.ActionRollback))
	require.ErrorContains(t, err, "the decision to commit is recorded: it cannot be rolled back")

	s.Phase = twopc.PhaseNeedsOperator
	_, _, err = twopc.Operate(spec, s, op(saga.ActionRollback))
	require.ErrorContains(t, err, "a commit or rollback is stuck")
	got, _, err = twopc.Operate(spec, s, op(saga.ActionResume))
	require.NoError(t, err)
	require.Equal(t, twopc.PhaseRollingBack, got.Phase, "no commit was attempted: it was rolling back")
	res := op(saga.ActionResolve)
	res.Op = saga.Op(twopc.OpPrepare)
	_, _, err = twopc.Operate(spec, s, res)
	require.ErrorContains(t, err, "no such branch op: want a branch and commit or rollback")
}
