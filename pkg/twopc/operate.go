package twopc

import (
	"fmt"

	"github.com/treatyhq/treaty/pkg/saga"
)

// Operate applies an operator action (see saga.Action) to a 2PC transaction. For ActionResolve,
// Step is the branch index and Op is commit or rollback.
func Operate(spec Spec, s State, op saga.Operation) (State, []Event, error) {
	s = s.Clone()
	deny := func(format string, args ...any) (State, []Event, error) {
		return s, nil, fmt.Errorf("%w: %s", saga.ErrNotAllowed, fmt.Sprintf(format, args...))
	}
	ops := func(o Op) []*Branch {
		out := make([]*Branch, len(s.Branches))
		for i := range s.Branches {
			out[i] = s.branch(i, o)
		}
		return out
	}
	switch op.Action {
	case saga.ActionRetry:
		if s.Phase != PhaseCommitting && s.Phase != PhaseRollingBack {
			return deny("the transaction is %s: nothing is waiting to be retried", s.Phase)
		}
		if saga.RetryNow(append(ops(OpCommit), ops(OpRollback)...)...) == 0 {
			return deny("no branch is waiting out a backoff")
		}
		return s, []Event{saga.OperatorEvent(op, "", "")}, nil
	case saga.ActionRollback:
		switch s.Phase {
		case PhasePreparing:
			s.Phase, s.Reason = PhaseRollingBack, "rolled back by "+op.Actor+": "+op.Reason
			return s, []Event{saga.OperatorEvent(op, "", ""), {Kind: "rolling_back", Detail: s.Reason}}, nil
		case PhaseCommitting, PhaseCommitted:
			return deny("the decision to commit is recorded: it cannot be rolled back")
		case PhaseRollingBack, PhaseRolledBack:
			return deny("the transaction is already %s", s.Phase)
		}
		return deny("a commit or rollback is stuck; resume the transaction or resolve the branch")
	case saga.ActionResume:
		if s.Phase != PhaseNeedsOperator {
			return deny("the transaction is %s; only one waiting for an operator can be resumed", s.Phase)
		}
		s.Phase, s.Reason = s.direction(), saga.ReasonBeforeOperator(s.Reason)
		saga.FreshAttempts(spec.OperatorThreshold, append(ops(OpCommit), ops(OpRollback)...)...)
		return s, []Event{saga.OperatorEvent(op, "", "")}, nil
	case saga.ActionResolve:
		if op.Step < 0 || op.Step >= len(s.Branches) || (Op(op.Op) != OpCommit && Op(op.Op) != OpRollback) {
			return deny("no such branch op: want a branch and commit or rollback")
		}
		phase := s.Phase
		if phase == PhaseNeedsOperator {
			phase = s.direction()
		}
		if (phase == PhaseCommitting) != (Op(op.Op) == OpCommit) || (phase != PhaseCommitting && phase != PhaseRollingBack) {
			return deny("the transaction is %s: %s is not what it is doing", s.Phase, op.Op)
		}
		if err := saga.ResolveBranch(s.branch(op.Step, Op(op.Op)), op.Actor); err != nil {
			return s, nil, err
		}
		s.Phase = phase
		return s, []Event{saga.OperatorEvent(op, spec.Branches[op.Step].Name, op.Op)}, nil
	}
	return deny("unknown action %q", op.Action)
}

// direction tells which way a transaction waiting for an operator was going: committing if any
// commit was attempted (the decision was recorded), else rolling back.
func (s State) direction() Phase {
	for _, b := range s.Branches {
		if b.Commit.Attempts > 0 || b.Commit.Status != saga.StatusPending {
			return PhaseCommitting
		}
	}
	return PhaseRollingBack
}
