package saga

import "fmt"

// TwoWay describes, in a mode's own words, a transaction that waits for a decision and then goes
// one of two ways: TCC confirms or cancels, 2PC commits or rolls back. The operator actions of
// both modes are the same rules over these words; OperateTwoWay applies them.
type TwoWay[P ~string] struct {
	// Open is the phase before the decision (trying, preparing); an operator may turn it back.
	Open P
	// Forward and Backward are the phases that carry the decision out, ForwardDone and
	// BackwardDone the phases once every branch did it.
	Forward, Backward, ForwardDone, BackwardDone P
	// NeedsOperator is the phase of a transaction waiting for an operator.
	NeedsOperator P
	// ForwardOp and BackwardOp are the branch ops of each way (confirm/cancel, commit/rollback).
	ForwardOp, BackwardOp Op
	// TurnedBackBy starts the reason of an operator's turn back ("cancelled by ").
	TurnedBackBy string
	// ForwardFinal says why a decided-forward transaction cannot be turned back.
	ForwardFinal string
	// ResolveWant says which branch op resolve expects.
	ResolveWant string
}

// TwoWayState is what OperateTwoWay reads and changes: the phase, the reason, and each branch's
// forward and backward op (by branch index, pointing into the mode's state).
type TwoWayState[P ~string] struct {
	Phase    P
	Reason   string
	Forward  []*Branch
	Backward []*Branch
	Names    []string
}

// OperateTwoWay applies an operator action (see Action) to st. For ActionResolve, op.Step is the
// branch index and op.Op the forward or backward op. A refusal wraps ErrNotAllowed and leaves
// st as it was.
func OperateTwoWay[P ~string](w TwoWay[P], st *TwoWayState[P], operatorThreshold int, op Operation) ([]Event, error) {
	deny := func(format string, args ...any) ([]Event, error) {
		return nil, fmt.Errorf("%w: %s", ErrNotAllowed, fmt.Sprintf(format, args...))
	}
	both := func() []*Branch { return append(append([]*Branch{}, st.Forward...), st.Backward...) }
	switch op.Action {
	case ActionRetry:
		if st.Phase != w.Forward && st.Phase != w.Backward {
			return deny("the transaction is %s: nothing is waiting to be retried", st.Phase)
		}
		if RetryNow(both()...) == 0 {
			return deny("no branch is waiting out a backoff")
		}
		return []Event{OperatorEvent(op, "", "")}, nil
	case ActionRollback:
		switch st.Phase {
		case w.Open:
			st.Phase, st.Reason = w.Backward, w.TurnedBackBy+op.Actor+": "+op.Reason
			return []Event{OperatorEvent(op, "", ""), {Kind: string(w.Backward), Detail: st.Reason}}, nil
		case w.Forward, w.ForwardDone:
			return deny("%s", w.ForwardFinal)
		case w.Backward, w.BackwardDone:
			return deny("the transaction is already %s", st.Phase)
		}
		return deny("a %s or %s is stuck; resume the transaction or resolve the branch", w.ForwardOp, w.BackwardOp)
	case ActionResume:
		if st.Phase != w.NeedsOperator {
			return deny("the transaction is %s; only one waiting for an operator can be resumed", st.Phase)
		}
		st.Phase, st.Reason = direction(w, st), ReasonBeforeOperator(st.Reason)
		FreshAttempts(operatorThreshold, both()...)
		return []Event{OperatorEvent(op, "", "")}, nil
	case ActionResolve:
		if op.Step < 0 || op.Step >= len(st.Forward) || (op.Op != w.ForwardOp && op.Op != w.BackwardOp) {
			return deny("no such branch op: want %s", w.ResolveWant)
		}
		phase := st.Phase
		if phase == w.NeedsOperator {
			phase = direction(w, st)
		}
		if (phase == w.Forward) != (op.Op == w.ForwardOp) || (phase != w.Forward && phase != w.Backward) {
			return deny("the transaction is %s: %s is not what it is doing", st.Phase, op.Op)
		}
		b := st.Backward[op.Step]
		if op.Op == w.ForwardOp {
			b = st.Forward[op.Step]
		}
		if err := ResolveBranch(b, op.Actor); err != nil {
			return nil, err
		}
		st.Phase = phase
		return []Event{OperatorEvent(op, st.Names[op.Step], op.Op)}, nil
	}
	return deny("unknown action %q", op.Action)
}

// direction tells which way a transaction waiting for an operator was going: forward if any
// forward op was attempted (the decision was recorded), else backward.
func direction[P ~string](w TwoWay[P], st *TwoWayState[P]) P {
	for _, b := range st.Forward {
		if b.Attempts > 0 || b.Status != StatusPending {
			return w.Forward
		}
	}
	return w.Backward
}
