// Package twopc is the two-phase commit state machine: a pure function of (spec, state, event,
// time) to the next state and the participant calls to make. No I/O, no clock.
//
// # Semantics
//
// The coordinator asks every participant to prepare, in parallel. When all answer OK it records
// the decision to commit, and only then commits every participant; commit is retried until it
// succeeds. A participant that refuses (ABORTED), fails, or does not answer within its call
// timeout, or a transaction that passes its deadline while preparing, leads to rolling back every
// participant (a rollback of a branch that never prepared is a no-op for the participant's
// barrier, and stops a late prepare). A coordinator that dies before the decision recorded
// nothing: the transaction is rolled back on recovery (presumed abort). Commit and rollback never
// give up; after OperatorThreshold failed attempts of one call the transaction waits for an
// operator.
package twopc

import (
	"fmt"
	"time"

	"github.com/treatyhq/treaty/pkg/saga"
)

// Op is a participant endpoint.
type Op string

// The 2PC ops.
const (
	OpPrepare  Op = "prepare"
	OpCommit   Op = "commit"
	OpRollback Op = "rollback"
)

// Phase is where a 2PC transaction is in its life.
type Phase string

// The 2PC phases.
const (
	PhasePreparing     Phase = "preparing"
	PhaseCommitting    Phase = "committing"
	PhaseRollingBack   Phase = "rolling_back"
	PhaseCommitted     Phase = "committed"
	PhaseRolledBack    Phase = "rolled_back"
	PhaseNeedsOperator Phase = "needs_operator"
)

// Terminal reports whether nothing more happens without an operator.
func (p Phase) Terminal() bool {
	return p == PhaseCommitted || p == PhaseRolledBack || p == PhaseNeedsOperator
}

// Branch aliases the saga package's branch record.
type Branch = saga.Branch

// Event aliases the saga package's history event.
type Event = saga.Event

// BranchPolicy is the retry policy of one participant's commit and rollback.
type BranchPolicy struct {
	Name           string
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
}

// Spec is what the machine needs to know.
type Spec struct {
	Branches          []BranchPolicy
	Deadline          time.Time // prepare must finish before this instant
	OperatorThreshold int
}

// BranchState holds one participant's three ops.
type BranchState struct {
	Prepare, Commit, Rollback Branch
}

// State is a 2PC transaction's state.
type State struct {
	Phase    Phase
	Branches []BranchState
	Reason   string
}

// Call asks the engine to call one participant now.
type Call struct {
	Branch  int
	Op      Op
	Attempt int
}

// Result is a call's outcome.
type Result struct {
	Branch  int
	Op      Op
	Outcome saga.Outcome
	Err     string
	At      time.Time
	Jitter  float64
	NotSent bool
}

// New returns the initial state: preparing.
func New(spec Spec) State {
	s := State{Phase: PhasePreparing, Branches: make([]BranchState, len(spec.Branches))}
	p := Branch{Status: saga.StatusPending}
	for i := range s.Branches {
		s.Branches[i] = BranchState{Prepare: p, Commit: p, Rollback: p}
	}
	return s
}

// Clone returns a deep copy.
func (s State) Clone() State {
	c := s
	c.Branches = append([]BranchState(nil), s.Branches...)
	return c
}

func (s *State) branch(i int, op Op) *Branch {
	switch op {
	case OpCommit:
		return &s.Branches[i].Commit
	case OpRollback:
		return &s.Branches[i].Rollback
	}
	return &s.Branches[i].Prepare
}

// Recover prepares a state loaded from storage after its driver died. Without a recorded
// decision, nothing may be committed: the transaction rolls back (presumed abort).
func Recover(s State) State {
	s = s.Clone()
	for i := range s.Branches {
		for _, op := range []Op{OpPrepare, OpCommit, OpRollback} {
			s.branch(i, op).InFlight = false
		}
	}
	if s.Phase == PhasePreparing {
		s.Phase = PhaseRollingBack
		s.Reason = "the coordinator restarted before deciding; no decision recorded means roll back"
	}
	return s
}

// RecoverEvents returns the history entry Recover's decision needs, if any.
func RecoverEvents(before, after State) []Event {
	if before.Phase == PhasePreparing && after.Phase == PhaseRollingBack {
		return []Event{{Kind: "rolling_back", Detail: after.Reason}}
	}
	return nil
}

// Advance makes the decisions due at now and returns the calls to dispatch (marked in flight),
// the events to record first, and when to look again.
func Advance(spec Spec, s State, now time.Time) (State, []Call, []Event, time.Time) {
	s = s.Clone()
	var events []Event
	var calls []Call
	if s.Phase == PhasePreparing {
		prepared, inFlight := 0, 0
		for i := range s.Branches {
			p := &s.Branches[i].Prepare
			switch {
			case p.Status == saga.StatusSucceeded:
				prepared++
			case p.InFlight:
				inFlight++
			case p.Status == saga.StatusPending && !p.NextAt.After(now) && now.Before(spec.Deadline):
				p.InFlight, p.Status = true, saga.StatusUnknown
				p.Attempts++
				calls = append(calls, Call{Branch: i, Op: OpPrepare, Attempt: p.Attempts})
			}
		}
		switch {
		case prepared == len(s.Branches):
			s.Phase = PhaseCommitting
			events = append(events, Event{Kind: "committing", Detail: fmt.Sprintf("all %d participants prepared", prepared)})
		case !now.Before(spec.Deadline):
			s.Phase = PhaseRollingBack
			s.Reason = fmt.Sprintf("not every participant prepared before the deadline %s", spec.Deadline.UTC().Format(time.RFC3339))
			events = append(events, Event{Kind: "rolling_back", Detail: s.Reason})
		default:
			return s, calls, events, earliest(s, OpPrepare, spec.Deadline)
		}
	}
	if s.Phase.Terminal() {
		return s, calls, events, time.Time{}
	}
	op, final, kind := OpCommit, PhaseCommitted, "committed"
	if s.Phase == PhaseRollingBack {
		op, final, kind = OpRollback, PhaseRolledBack, "rolled_back"
	}
	done, inFlight, stuck := 0, 0, false
	for i := range s.Branches {
		b := s.branch(i, op)
		switch {
		case b.Status == saga.StatusSucceeded:
			done++
		case b.InFlight:
			inFlight++
		case b.Attempts >= spec.OperatorThreshold:
			stuck = true
		}
		if s.Branches[i].Prepare.InFlight {
			inFlight++ // a prepare still out: wait for it before the second phase touches the branch
		}
	}
	if done == len(s.Branches) && inFlight == 0 {
		s.Phase = final
		return s, calls, append(events, Event{Kind: kind}), time.Time{}
	}
	if stuck {
		if inFlight == 0 {
			s.Phase = PhaseNeedsOperator
			s.Reason = fmt.Sprintf("a %s failed %d times: %s", op, spec.OperatorThreshold, s.Reason)
			events = append(events, Event{Kind: "needs_operator", Detail: s.Reason})
		}
		return s, calls, events, time.Time{}
	}
	var wake time.Time
	for i := range s.Branches {
		b := s.branch(i, op)
		if b.Status == saga.StatusSucceeded || b.InFlight || s.Branches[i].Prepare.InFlight {
			continue
		}
		if b.NextAt.After(now) {
			if wake.IsZero() || b.NextAt.Before(wake) {
				wake = b.NextAt
			}
			continue
		}
		b.InFlight, b.Status = true, saga.StatusUnknown
		b.Attempts++
		calls = append(calls, Call{Branch: i, Op: op, Attempt: b.Attempts})
	}
	return s, calls, events, wake
}

func earliest(s State, op Op, deadline time.Time) time.Time {
	wake := deadline
	for i := range s.Branches {
		b := s.branch(i, op)
		if !b.InFlight && b.Status == saga.StatusPending && !b.NextAt.IsZero() && b.NextAt.Before(wake) {
			wake = b.NextAt
		}
	}
	return wake
}

// Apply records a call's result; call Advance afterwards.
func Apply(spec Spec, s State, r Result) (State, []Event) {
	s = s.Clone()
	if r.Branch < 0 || r.Branch >= len(s.Branches) || (r.Op != OpPrepare && r.Op != OpCommit && r.Op != OpRollback) {
		return s, nil
	}
	b := s.branch(r.Branch, r.Op)
	if !b.InFlight {
		return s, nil
	}
	b.InFlight = false
	pol := spec.Branches[r.Branch]
	name := pol.Name
	if r.NotSent {
		b.Attempts--
		if b.Attempts == 0 {
			b.Status = saga.StatusPending
		}
		b.NextAt = r.At.Add(saga.Backoff(pol.InitialBackoff, pol.MaxBackoff, b.Attempts+1, r.Jitter))
		return s, nil
	}
	ev := func(kind, detail string) []Event {
		return []Event{{Kind: kind, Step: name, Op: saga.Op(r.Op), Detail: detail}}
	}
	if r.Op == OpPrepare {
		switch {
		case r.Outcome == saga.OK:
			b.Status, b.LastError = saga.StatusSucceeded, ""
			return s, ev("branch_prepared", "")
		case s.Phase != PhasePreparing:
			b.Status, b.LastError = saga.StatusFailed, r.Err
			return s, ev("branch_failed", r.Err)
		default:
			// A refusal or a failure to answer in time: roll everything back.
			b.Status, b.LastError = saga.StatusFailed, r.Err
			b.Uncertain = r.Outcome != saga.Aborted
			s.Phase = PhaseRollingBack
			s.Reason = fmt.Sprintf("participant %q did not prepare (%s): %s", name, r.Outcome, r.Err)
			return s, append(ev("branch_failed", r.Err), Event{Kind: "rolling_back", Detail: s.Reason})
		}
	}
	if r.Outcome == saga.OK {
		b.Status, b.LastError, b.NextAt = saga.StatusSucceeded, "", time.Time{}
		return s, ev("branch_succeeded", fmt.Sprintf("attempt %d", b.Attempts))
	}
	msg := r.Err
	if r.Outcome == saga.Aborted {
		msg = fmt.Sprintf("participant refused to %s (ABORTED): %s", r.Op, r.Err)
	}
	b.Status, b.LastError = saga.StatusUnknown, msg
	b.NextAt = r.At.Add(saga.Backoff(pol.InitialBackoff, pol.MaxBackoff, b.Attempts, r.Jitter))
	return s, ev("branch_retry", fmt.Sprintf("attempt %d: %s", b.Attempts, msg))
}
