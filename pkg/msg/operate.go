package msg

import (
	"fmt"

	"github.com/treatyhq/treaty/pkg/saga"
)

// Operate applies an operator action (see saga.Action) to a transactional message. For
// ActionResolve, Step is the delivery index (-1 for the query) and Op is deliver or
// query_prepared; resolving the query means the operator found that the local transaction
// committed.
func Operate(spec Spec, s State, op saga.Operation) (State, []Event, error) {
	s = s.Clone()
	deny := func(format string, args ...any) (State, []Event, error) {
		return s, nil, fmt.Errorf("%w: %s", saga.ErrNotAllowed, fmt.Sprintf(format, args...))
	}
	all := func() []*Branch {
		out := []*Branch{&s.Query}
		for i := range s.Deliveries {
			out = append(out, &s.Deliveries[i])
		}
		return out
	}
	switch op.Action {
	case saga.ActionRetry:
		if s.Phase != PhasePrepared && s.Phase != PhaseDelivering {
			return deny("the message is %s: nothing is waiting to be retried", s.Phase)
		}
		if saga.RetryNow(all()...) == 0 {
			return deny("no call is waiting out a backoff")
		}
		return s, []Event{saga.OperatorEvent(op, "", "")}, nil
	case saga.ActionRollback:
		switch s.Phase {
		case PhasePrepared:
			s.Phase, s.Reason = PhaseAborted, "dropped by "+op.Actor+": "+op.Reason
			return s, []Event{saga.OperatorEvent(op, "", ""), {Kind: "aborted", Detail: s.Reason}}, nil
		case PhaseDelivering, PhaseSucceeded:
			return deny("the message was submitted: deliveries cannot be withdrawn")
		case PhaseAborted:
			return deny("the message is already aborted")
		}
		return deny("a call is stuck; resume the message or resolve the call")
	case saga.ActionResume:
		if s.Phase != PhaseNeedsOperator {
			return deny("the message is %s; only one waiting for an operator can be resumed", s.Phase)
		}
		s.Phase, s.Reason = s.direction(), saga.ReasonBeforeOperator(s.Reason)
		saga.FreshAttempts(spec.OperatorThreshold, all()...)
		return s, []Event{saga.OperatorEvent(op, "", "")}, nil
	case saga.ActionResolve:
		if op.Step < -1 || op.Step >= len(s.Deliveries) || (op.Step < 0) != (Op(op.Op) == OpQuery) {
			return deny("no such call: want a delivery and deliver, or the query and query_prepared")
		}
		name := spec.Query.Name
		if op.Step >= 0 {
			name = spec.Deliveries[op.Step].Name
		}
		if err := saga.ResolveBranch(s.branch(op.Step), op.Actor); err != nil {
			return s, nil, err
		}
		if op.Step < 0 || s.Phase == PhaseNeedsOperator {
			s.Phase = PhaseDelivering
		}
		return s, []Event{saga.OperatorEvent(op, name, op.Op)}, nil
	}
	return deny("unknown action %q", op.Action)
}

// direction tells what a message waiting for an operator was doing.
func (s State) direction() Phase {
	if s.Query.Status == saga.StatusSucceeded {
		return PhaseDelivering
	}
	for _, d := range s.Deliveries {
		if d.Attempts > 0 || d.Status != saga.StatusPending {
			return PhaseDelivering
		}
	}
	return PhasePrepared
}
