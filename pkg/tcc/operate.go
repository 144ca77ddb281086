package tcc

import (
	"github.com/treatyhq/treaty/pkg/saga"
)

// way is TCC in the words of saga.TwoWay: decided, it confirms or cancels.
var way = saga.TwoWay[Phase]{
	Open: PhaseTrying, Forward: PhaseConfirming, Backward: PhaseCancelling,
	ForwardDone: PhaseConfirmed, BackwardDone: PhaseCancelled, NeedsOperator: PhaseNeedsOperator,
	ForwardOp: saga.Op(OpConfirm), BackwardOp: saga.Op(OpCancel),
	TurnedBackBy: "cancelled by ",
	ForwardFinal: "the initiator committed: confirmations cannot be undone",
	ResolveWant:  "a registered branch and confirm or cancel",
}

// Operate applies an operator action (see saga.Action) to a TCC transaction. For ActionResolve,
// Step is the branch index and Op is confirm or cancel.
func Operate(spec Spec, s State, op saga.Operation) (State, []Event, error) {
	s = s.Clone()
	st := saga.TwoWayState[Phase]{Phase: s.Phase, Reason: s.Reason}
	for i := range s.Branches {
		st.Forward = append(st.Forward, &s.Branches[i].Confirm)
		st.Backward = append(st.Backward, &s.Branches[i].Cancel)
		st.Names = append(st.Names, spec.Branches[i].Name)
	}
	evs, err := saga.OperateTwoWay(way, &st, spec.OperatorThreshold, op)
	if err != nil {
		return s, nil, err
	}
	s.Phase, s.Reason = st.Phase, st.Reason
	return s, evs, nil
}
