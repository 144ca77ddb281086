// Package tcc is the TCC (try-confirm-cancel) state machine: a pure function of (spec, state,
// event, time) to the next state and the participant calls to make. No I/O, no clock.
//
// # Semantics
//
// The initiator begins a global transaction, registers each branch (its confirm and cancel
// endpoints) durably before calling the branch's try itself, then decides: commit confirms every
// registered branch, rollback cancels every registered branch, including those whose try never
// arrived or whose outcome is unknown (the participant's barrier turns such a cancel into a
// no-op). An initiator that never decides is cancelled once the deadline passes. Confirm and
// cancel never give up: they are retried with backoff, and after OperatorThreshold failed attempts
// of one call the transaction waits for an operator.
package tcc

import (
	"errors"
	"fmt"
	"time"

	"github.com/treatyhq/treaty/pkg/saga"
)

// Op is a coordinator-driven TCC endpoint.
type Op string

// The TCC ops.
const (
	OpTry     Op = "try" // called by the initiator, never by the coordinator
	OpConfirm Op = "confirm"
	OpCancel  Op = "cancel"
)

// Phase is where a TCC transaction is in its life.
type Phase string

// The TCC phases.
const (
	PhaseTrying        Phase = "trying"
	PhaseConfirming    Phase = "confirming"
	PhaseCancelling    Phase = "cancelling"
	PhaseConfirmed     Phase = "confirmed"
	PhaseCancelled     Phase = "cancelled"
	PhaseNeedsOperator Phase = "needs_operator"
)

// Terminal reports whether nothing more happens without an operator.
func (p Phase) Terminal() bool {
	return p == PhaseConfirmed || p == PhaseCancelled || p == PhaseNeedsOperator
}

// Branch aliases the saga package's branch record: the same durable fields and meaning.
type Branch = saga.Branch

// BranchPolicy is the retry policy of one registered branch.
type BranchPolicy struct {
	Name           string
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
}

// Spec is what the machine needs to know.
type Spec struct {
	Branches          []BranchPolicy
	Deadline          time.Time // the initiator must decide before this instant
	OperatorThreshold int
}

// BranchState holds a branch's two coordinator-driven ops.
type BranchState struct {
	Confirm Branch
	Cancel  Branch
}

// State is a TCC transaction's state.
type State struct {
	Phase    Phase
	Branches []BranchState
	Reason   string
}

// Call asks the engine to call one branch's confirm or cancel now.
type Call struct {
	Branch  int
	Op      Op
	Attempt int
}

// Event is something that happened, for the history.
type Event = saga.Event

// Result is a call's outcome, as in pkg/saga.
type Result struct {
	Branch  int
	Op      Op
	Outcome saga.Outcome
	Err     string
	At      time.Time
	Jitter  float64
	NotSent bool
}

// Errors of Decide.
var (
	// ErrCancelled: a commit arrived after the transaction was decided to cancel.
	ErrCancelled = errors.New("transaction is cancelled")
	// ErrConfirmed: a rollback arrived after the transaction was decided to commit.
	ErrConfirmed = errors.New("transaction is committed")
)

// New returns the state of a transaction with the registered branches, still trying.
func New(spec Spec) State {
	s := State{Phase: PhaseTrying, Branches: make([]BranchState, len(spec.Branches))}
	for i := range s.Branches {
		s.Branches[i] = BranchState{Confirm: Branch{Status: saga.StatusPending}, Cancel: Branch{Status: saga.StatusPending}}
	}
	return s
}

// Clone returns a deep copy.
func (s State) Clone() State {
	c := s
	c.Branches = append([]BranchState(nil), s.Branches...)
	return c
}

// Decide applies the initiator's decision. Deciding the same way twice is a no-op; deciding the
// other way once decided is an error naming what was decided and why.
func Decide(s State, commit bool, reason string) (State, []Event, error) {
	switch {
	case s.Phase == PhaseTrying && commit:
		s = s.Clone()
		s.Phase = PhaseConfirming
		return s, []Event{{Kind: "confirming", Detail: "initiator committed"}}, nil
	case s.Phase == PhaseTrying:
		s = s.Clone()
		s.Phase, s.Reason = PhaseCancelling, reason
		return s, []Event{{Kind: "cancelling", Detail: reason}}, nil
	case commit && (s.Phase == PhaseConfirming || s.Phase == PhaseConfirmed):
		return s, nil, nil
	case !commit && (s.Phase == PhaseCancelling || s.Phase == PhaseCancelled):
		return s, nil, nil
	case s.Phase == PhaseNeedsOperator:
		// Reached from confirming or from cancelling, and the phase no longer says which: a
		// commit must not be told the transaction was cancelled when its confirms are stuck.
		return s, nil, fmt.Errorf("transaction needs an operator: %s", s.Reason)
	case commit:
		return s, nil, fmt.Errorf("%w (%s): %s", ErrCancelled, s.Phase, s.Reason)
	}
	return s, nil, fmt.Errorf("%w (%s)", ErrConfirmed, s.Phase)
}

// Advance cancels a transaction whose initiator did not decide in time, finishes one whose
// calls all succeeded, and returns the calls due now (marked in flight) and the next wake-up.
func Advance(spec Spec, s State, now time.Time) (State, []Call, []Event, time.Time) {
	s = s.Clone()
	var events []Event
	if s.Phase == PhaseTrying {
		if spec.Deadline.IsZero() || now.Before(spec.Deadline) {
			return s, nil, nil, spec.Deadline
		}
		s.Phase = PhaseCancelling
		s.Reason = fmt.Sprintf("the initiator did not commit before the deadline %s", spec.Deadline.UTC().Format(time.RFC3339))
		events = append(events, Event{Kind: "cancelling", Detail: s.Reason})
	}
	if s.Phase.Terminal() {
		return s, nil, events, time.Time{}
	}
	op := OpConfirm
	if s.Phase == PhaseCancelling {
		op = OpCancel
	}
	var calls []Call
	var wake time.Time
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
	}
	if done == len(s.Branches) {
		if op == OpConfirm {
			s.Phase = PhaseConfirmed
			events = append(events, Event{Kind: "confirmed"})
		} else {
			s.Phase = PhaseCancelled
			events = append(events, Event{Kind: "cancelled"})
		}
		return s, nil, events, time.Time{}
	}
	if stuck {
		if inFlight == 0 {
			s.Phase = PhaseNeedsOperator
			s.Reason = fmt.Sprintf("a %s failed %d times: %s", op, spec.OperatorThreshold, s.Reason)
			events = append(events, Event{Kind: "needs_operator", Detail: s.Reason})
		}
		return s, nil, events, time.Time{}
	}
	for i := range s.Branches {
		b := s.branch(i, op)
		if b.Status == saga.StatusSucceeded || b.InFlight {
			continue
		}
		if b.NextAt.After(now) {
			if wake.IsZero() || b.NextAt.Before(wake) {
				wake = b.NextAt
			}
			continue
		}
		b.InFlight = true
		b.Attempts++
		b.Status = saga.StatusUnknown
		calls = append(calls, Call{Branch: i, Op: op, Attempt: b.Attempts})
	}
	return s, calls, events, wake
}

func (s *State) branch(i int, op Op) *Branch {
	if op == OpCancel {
		return &s.Branches[i].Cancel
	}
	return &s.Branches[i].Confirm
}

// Apply records a call's result; call Advance afterwards.
func Apply(spec Spec, s State, r Result) (State, []Event) {
	s = s.Clone()
	if r.Branch < 0 || r.Branch >= len(s.Branches) || (r.Op != OpConfirm && r.Op != OpCancel) {
		return s, nil
	}
	b := s.branch(r.Branch, r.Op)
	if !b.InFlight {
		return s, nil
	}
	b.InFlight = false
	pol := spec.Branches[r.Branch]
	if r.NotSent {
		b.Attempts--
		if b.Attempts == 0 {
			b.Status = saga.StatusPending
		}
		b.NextAt = r.At.Add(saga.Backoff(pol.InitialBackoff, pol.MaxBackoff, b.Attempts+1, r.Jitter))
		return s, nil
	}
	name := pol.Name
	if r.Outcome == saga.OK {
		b.Status, b.LastError, b.NextAt = saga.StatusSucceeded, "", time.Time{}
		return s, []Event{{Kind: "branch_succeeded", Step: name, Op: saga.Op(r.Op), Detail: fmt.Sprintf("attempt %d", b.Attempts)}}
	}
	msg := r.Err
	if r.Outcome == saga.Aborted {
		// Confirm and cancel must not refuse; a refusal is retried like any failure.
		msg = fmt.Sprintf("participant refused to %s (ABORTED): %s", r.Op, r.Err)
	}
	b.Status, b.LastError = saga.StatusUnknown, msg
	b.NextAt = r.At.Add(saga.Backoff(pol.InitialBackoff, pol.MaxBackoff, b.Attempts, r.Jitter))
	return s, []Event{{Kind: "branch_retry", Step: name, Op: saga.Op(r.Op), Detail: fmt.Sprintf("attempt %d: %s", b.Attempts, msg)}}
}

// Recover clears in-memory flags of a state loaded from storage.
func Recover(s State) State {
	s = s.Clone()
	for i := range s.Branches {
		s.Branches[i].Confirm.InFlight = false
		s.Branches[i].Cancel.InFlight = false
	}
	return s
}
