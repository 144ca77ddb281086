package saga

import (
	"errors"
	"fmt"
	"regexp"
	"time"
)

// Operator actions. The state machine decides whether an action makes sense in the current
// state; a refusal wraps ErrNotAllowed and says why.
type Action string

const (
	// ActionRetry makes every branch waiting out a backoff due now.
	ActionRetry Action = "retry"
	// ActionRollback turns a transaction back now (compensate, cancel, roll back).
	ActionRollback Action = "rollback"
	// ActionResume continues a transaction that waits for an operator, with fresh attempts.
	ActionResume Action = "resume"
	// ActionResolve marks one branch as done: the operator fixed it by hand.
	ActionResolve Action = "resolve"
)

// ErrNotAllowed: the action makes no sense in the transaction's current state.
var ErrNotAllowed = errors.New("action not allowed")

// Operation is an operator's request.
type Operation struct {
	Action Action
	Step   int // for ActionResolve
	Op     Op  // for ActionResolve
	Reason string
	Actor  string
}

func notAllowed(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrNotAllowed, fmt.Sprintf(format, args...))
}

// RetryNow clears the backoff of every branch given that waits for a retry; it returns how many.
func RetryNow(bs ...*Branch) int {
	n := 0
	for _, b := range bs {
		if !b.InFlight && b.Status != StatusSucceeded && b.Status != StatusSkipped && !b.NextAt.IsZero() {
			b.NextAt = time.Time{}
			n++
		}
	}
	return n
}

// ResolveBranch marks a branch done by hand.
func ResolveBranch(b *Branch, who string) error {
	switch {
	case b.InFlight:
		return notAllowed("a call of this branch is in flight; try again once it lands")
	case b.Status == StatusSucceeded || b.Status == StatusSkipped:
		return notAllowed("the branch is already %s", b.Status)
	}
	b.Status, b.LastError, b.NextAt = StatusSucceeded, "resolved by hand by "+who, time.Time{}
	return nil
}

// FreshAttempts resets the attempt count of every unfinished branch given that reached the
// operator threshold, so that resuming gives them threshold more tries.
func FreshAttempts(threshold int, bs ...*Branch) {
	for _, b := range bs {
		if b.Status != StatusSucceeded && b.Status != StatusSkipped && b.Attempts >= threshold {
			b.Attempts, b.NextAt = 0, time.Time{}
		}
	}
}

func operatorEvent(op Operation, step string, bop Op) Event {
	return Event{Kind: "operator_" + string(op.Action), Step: step, Op: bop, Detail: fmt.Sprintf("by %s: %s", op.Actor, op.Reason)}
}

// operatorPrefix matches what the machines put before the reason when they stop for an operator.
var operatorPrefix = regexp.MustCompile(`^(a [a-z_]+|query-prepared) failed \d+ times(: )?`)

// ReasonBeforeOperator removes the "a compensation failed N times: " that a machine put before
// its reason when it stopped for an operator, so a resumed transaction shows why it turned back,
// not why it once stopped.
func ReasonBeforeOperator(reason string) string {
	return operatorPrefix.ReplaceAllString(reason, "")
}

// OperatorEvent is the history entry of an accepted operator action.
func OperatorEvent(op Operation, branch string, bop Op) Event { return operatorEvent(op, branch, bop) }

// Operate applies an operator action to a saga.
func Operate(spec Spec, s State, op Operation) (State, []Event, error) {
	s = s.Clone()
	switch op.Action {
	case ActionRetry:
		if s.Phase != PhaseRunning && s.Phase != PhaseCompensating {
			return s, nil, notAllowed("the saga is %s: nothing is waiting to be retried", s.Phase)
		}
		var bs []*Branch
		for i := range s.Steps {
			bs = append(bs, &s.Steps[i].Action, &s.Steps[i].Compensate)
		}
		if RetryNow(bs...) == 0 {
			return s, nil, notAllowed("no branch is waiting out a backoff")
		}
		return s, []Event{operatorEvent(op, "", "")}, nil
	case ActionRollback:
		switch s.Phase {
		case PhaseRunning:
			ev := operatorEvent(op, "", "")
			return s, append([]Event{ev}, s.turnBack("rolled back by "+op.Actor+": "+op.Reason)...), nil
		case PhaseCompensating:
			return s, nil, notAllowed("the saga is already compensating")
		case PhaseSucceeded:
			return s, nil, notAllowed("the saga succeeded: every step took effect and compensation is no longer offered; run a saga that undoes it")
		case PhaseCompensated:
			return s, nil, notAllowed("the saga is already compensated")
		}
		return s, nil, notAllowed("a compensation is stuck; resume the saga or resolve the branch")
	case ActionResume:
		if s.Phase != PhaseNeedsOperator {
			return s, nil, notAllowed("the saga is %s; only a saga waiting for an operator can be resumed", s.Phase)
		}
		var bs []*Branch
		for i := range s.Steps {
			bs = append(bs, &s.Steps[i].Compensate)
		}
		FreshAttempts(spec.OperatorThreshold, bs...)
		s.Phase = PhaseCompensating
		s.Reason = ReasonBeforeOperator(s.Reason)
		return s, []Event{operatorEvent(op, "", "")}, nil
	case ActionResolve:
		if op.Step < 0 || op.Step >= len(s.Steps) {
			return s, nil, notAllowed("no such step")
		}
		if s.Phase == PhaseSucceeded || s.Phase == PhaseCompensated {
			return s, nil, notAllowed("the saga is %s", s.Phase)
		}
		st := &s.Steps[op.Step]
		switch {
		case op.Op == OpCompensate && s.Phase == PhaseRunning:
			return s, nil, notAllowed("the saga is running forward; a compensation can only be resolved while compensating")
		case op.Op == OpAction && s.Phase != PhaseRunning && st.Action.Status == StatusPending:
			return s, nil, notAllowed("the action never ran and the saga is turning back")
		}
		b := s.branch(op.Step, op.Op)
		if op.Op != OpAction && op.Op != OpCompensate {
			return s, nil, notAllowed("op must be action or compensate")
		}
		if err := ResolveBranch(b, op.Actor); err != nil {
			return s, nil, err
		}
		if s.Phase == PhaseNeedsOperator {
			s.Phase = PhaseCompensating
			s.Reason = ReasonBeforeOperator(s.Reason)
		}
		return s, []Event{operatorEvent(op, spec.Steps[op.Step].Name, op.Op)}, nil
	}
	return s, nil, notAllowed("unknown action %q", op.Action)
}
