package twopc

import (
	"github.com/treatyhq/treaty/pkg/saga"
)

// way is 2PC in the words of saga.TwoWay: decided, it commits or rolls back.
var way = saga.TwoWay[Phase]{
	Open: PhasePreparing, Forward: PhaseCommitting, Backward: PhaseRollingBack,
	ForwardDone: PhaseCommitted, BackwardDone: PhaseRolledBack, NeedsOperator: PhaseNeedsOperator,
	ForwardOp: saga.Op(OpCommit), BackwardOp: saga.Op(OpRollback),
	TurnedBackBy: "rolled back by ",
	ForwardFinal: "the decision to commit is recorded: it cannot be rolled back",
	ResolveWant:  "a branch and commit or rollback",
}

// Operate applies an operator action (see saga.Action) to a 2PC transaction. For ActionResolve,
// Step is the branch index and Op is commit or rollback.
func Operate(spec Spec, s State, op saga.Operation) (State, []Event, error) {
	s = s.Clone()
	st := saga.TwoWayState[Phase]{Phase: s.Phase, Reason: s.Reason}
	for i := range s.Branches {
		st.Forward = append(st.Forward, &s.Branches[i].Commit)
		st.Backward = append(st.Backward, &s.Branches[i].Rollback)
		st.Names = append(st.Names, spec.Branches[i].Name)
	}
	evs, err := saga.OperateTwoWay(way, &st, spec.OperatorThreshold, op)
	if err != nil {
		return s, nil, err
	}
	s.Phase, s.Reason = st.Phase, st.Reason
	return s, evs, nil
}
