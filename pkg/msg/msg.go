// Package msg is the transactional message ("two-phase message", RocketMQ's half message) state
// machine: a pure function of (spec, state, event, time) to the next state and the calls to make.
//
// # Semantics
//
// An application prepares a message at the coordinator (its deliveries: participant calls to
// make), runs its local transaction (which writes a barrier row), then submits. Submitted
// messages are delivered at least once: each delivery is retried until it succeeds. A prepared
// message that is never submitted is resolved at its deadline by calling the application's
// query-prepared endpoint: OK (the local transaction committed) means deliver; ABORTED (it rolled
// back, or never ran and is now barred from committing) means drop; anything else is retried.
// After OperatorThreshold failed attempts of one call the message waits for an operator.
package msg

import (
	"fmt"
	"time"

	"github.com/treatyhq/treaty/pkg/saga"
)

// Op is an endpoint the coordinator calls.
type Op string

// The message ops.
const (
	OpDeliver Op = "deliver"
	OpQuery   Op = "query_prepared"
)

// Phase is where a message is in its life.
type Phase string

// The message phases.
const (
	PhasePrepared      Phase = "prepared"
	PhaseDelivering    Phase = "delivering"
	PhaseSucceeded     Phase = "succeeded"
	PhaseAborted       Phase = "aborted"
	PhaseNeedsOperator Phase = "needs_operator"
)

// Terminal reports whether nothing more happens without an operator.
func (p Phase) Terminal() bool {
	return p == PhaseSucceeded || p == PhaseAborted || p == PhaseNeedsOperator
}

// Branch aliases the saga package's branch record.
type Branch = saga.Branch

// Event aliases the saga package's history event.
type Event = saga.Event

// Policy is the retry policy of one call.
type Policy struct {
	Name           string
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
}

// Spec is what the machine needs to know.
type Spec struct {
	Deliveries        []Policy
	Query             Policy
	Deadline          time.Time // when an unsubmitted message is resolved by querying
	OperatorThreshold int
}

// State is a message's state.
type State struct {
	Phase      Phase
	Deliveries []Branch
	Query      Branch
	Reason     string
}

// Call asks the engine to make one call now. Delivery is -1 for the query.
type Call struct {
	Delivery int
	Op       Op
	Attempt  int
}

// Result is a call's outcome.
type Result struct {
	Delivery int
	Op       Op
	Outcome  saga.Outcome
	Err      string
	At       time.Time
	Jitter   float64
	NotSent  bool
}

// New returns a prepared message.
func New(spec Spec) State {
	s := State{Phase: PhasePrepared, Deliveries: make([]Branch, len(spec.Deliveries)), Query: Branch{Status: saga.StatusPending}}
	for i := range s.Deliveries {
		s.Deliveries[i] = Branch{Status: saga.StatusPending}
	}
	return s
}

// Clone returns a deep copy.
func (s State) Clone() State {
	c := s
	c.Deliveries = append([]Branch(nil), s.Deliveries...)
	return c
}

// Recover clears in-memory flags of a state loaded from storage.
func Recover(s State) State {
	s = s.Clone()
	s.Query.InFlight = false
	for i := range s.Deliveries {
		s.Deliveries[i].InFlight = false
	}
	return s
}

func (s *State) branch(c int) *Branch {
	if c < 0 {
		return &s.Query
	}
	return &s.Deliveries[c]
}

func policy(spec Spec, c int) Policy {
	if c < 0 {
		return spec.Query
	}
	return spec.Deliveries[c]
}

// Advance returns the calls due at now (marked in flight), the events, and the next wake-up.
func Advance(spec Spec, s State, now time.Time) (State, []Call, []Event, time.Time) {
	s = s.Clone()
	var events []Event
	switch s.Phase {
	case PhasePrepared:
		if now.Before(spec.Deadline) {
			return s, nil, nil, spec.Deadline
		}
		q := &s.Query
		if q.InFlight {
			return s, nil, nil, time.Time{}
		}
		if q.Attempts >= spec.OperatorThreshold {
			s.Phase = PhaseNeedsOperator
			s.Reason = fmt.Sprintf("query-prepared failed %d times: %s", q.Attempts, q.LastError)
			return s, nil, []Event{{Kind: "needs_operator", Detail: s.Reason}}, time.Time{}
		}
		if q.NextAt.After(now) {
			return s, nil, nil, q.NextAt
		}
		q.InFlight, q.Status = true, saga.StatusUnknown
		q.Attempts++
		return s, []Call{{Delivery: -1, Op: OpQuery, Attempt: q.Attempts}}, nil, time.Time{}
	case PhaseDelivering:
	default:
		return s, nil, nil, time.Time{}
	}
	done, inFlight, stuck := 0, 0, false
	for i := range s.Deliveries {
		b := &s.Deliveries[i]
		switch {
		case b.Status == saga.StatusSucceeded:
			done++
		case b.InFlight:
			inFlight++
		case b.Attempts >= spec.OperatorThreshold:
			stuck = true
		}
	}
	if done == len(s.Deliveries) {
		s.Phase = PhaseSucceeded
		return s, nil, []Event{{Kind: "succeeded", Detail: fmt.Sprintf("%d deliveries made", done)}}, time.Time{}
	}
	if stuck {
		if inFlight == 0 {
			s.Phase = PhaseNeedsOperator
			s.Reason = fmt.Sprintf("a delivery failed %d times", spec.OperatorThreshold)
			events = append(events, Event{Kind: "needs_operator", Detail: s.Reason})
		}
		return s, nil, events, time.Time{}
	}
	var calls []Call
	var wake time.Time
	for i := range s.Deliveries {
		b := &s.Deliveries[i]
		if b.Status == saga.StatusSucceeded || b.InFlight {
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
		calls = append(calls, Call{Delivery: i, Op: OpDeliver, Attempt: b.Attempts})
	}
	return s, calls, events, wake
}

// Submit is the application's word that its local transaction committed.
func Submit(s State) (State, []Event, error) {
	switch s.Phase {
	case PhasePrepared:
		s = s.Clone()
		s.Phase = PhaseDelivering
		return s, []Event{{Kind: "delivering", Detail: "submitted by the application"}}, nil
	case PhaseDelivering, PhaseSucceeded:
		return s, nil, nil
	}
	return s, nil, fmt.Errorf("message is %s: %s", s.Phase, s.Reason)
}

// Apply records a call's result; call Advance afterwards.
func Apply(spec Spec, s State, r Result) (State, []Event) {
	s = s.Clone()
	if (r.Op == OpQuery) != (r.Delivery < 0) || r.Delivery >= len(s.Deliveries) || (r.Op != OpQuery && r.Op != OpDeliver) {
		return s, nil
	}
	b := s.branch(r.Delivery)
	if !b.InFlight {
		return s, nil
	}
	b.InFlight = false
	pol := policy(spec, r.Delivery)
	if r.NotSent {
		b.Attempts--
		if b.Attempts == 0 {
			b.Status = saga.StatusPending
		}
		b.NextAt = r.At.Add(saga.Backoff(pol.InitialBackoff, pol.MaxBackoff, b.Attempts+1, r.Jitter))
		return s, nil
	}
	ev := func(kind, detail string) Event {
		return Event{Kind: kind, Step: pol.Name, Op: saga.Op(r.Op), Detail: detail}
	}
	if r.Op == OpQuery && s.Phase == PhasePrepared {
		switch r.Outcome {
		case saga.OK:
			b.Status, b.LastError = saga.StatusSucceeded, ""
			s.Phase = PhaseDelivering
			return s, []Event{ev("branch_succeeded", "the local transaction committed"), {Kind: "delivering", Detail: "resolved by query-prepared"}}
		case saga.Aborted:
			b.Status, b.LastError = saga.StatusFailed, r.Err
			s.Phase = PhaseAborted
			s.Reason = "the local transaction did not commit: " + r.Err
			return s, []Event{ev("branch_aborted", r.Err), {Kind: "aborted", Detail: s.Reason}}
		}
	}
	if r.Outcome == saga.OK {
		b.Status, b.LastError, b.NextAt = saga.StatusSucceeded, "", time.Time{}
		return s, []Event{ev("branch_succeeded", fmt.Sprintf("attempt %d", b.Attempts))}
	}
	msg := r.Err
	if r.Outcome == saga.Aborted {
		msg = fmt.Sprintf("participant refused (ABORTED): %s", r.Err)
	}
	b.Status, b.LastError = saga.StatusUnknown, msg
	b.NextAt = r.At.Add(saga.Backoff(pol.InitialBackoff, pol.MaxBackoff, b.Attempts, r.Jitter))
	return s, []Event{ev("branch_retry", fmt.Sprintf("attempt %d: %s", b.Attempts, msg))}
}
