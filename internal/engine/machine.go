package engine

import (
	"time"

	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/saga"
)

// machine adapts one mode's pure state machine (pkg/saga, pkg/tcc, pkg/twopc) to the driver.
// The machine decides; the driver does the I/O and makes every decision durable before acting
// on it. Implementations hold no locks: one driver goroutine owns a machine.
type machine interface {
	// advance makes the decisions due at now. It returns the calls to make now (already marked in
	// flight), the events to record first, and when to look again (zero: only on a result).
	advance(now time.Time) ([]dispatch, []store.Event, time.Time)
	// apply feeds back a call's result and returns the events to record.
	apply(d dispatch, res invoke.Result, at time.Time, jitter float64) []store.Event
	status() string
	reason() string
	terminal() bool
	// branches is the durable view of every branch, in a fixed order; the driver writes only
	// those that changed since the last write.
	branches() []store.Branch
	// operate applies an operator action; branch names the branch for saga.ActionResolve. A
	// refusal wraps saga.ErrNotAllowed.
	operate(op saga.Operation, branch string) ([]store.Event, error)
}

// dispatch is one participant call a machine asked for.
type dispatch struct {
	key     int    // the machine's own reference to the branch and op
	branch  string // branch name, sent as metadata
	op      string // e.g. action, compensate, confirm, cancel, prepare, commit, rollback
	undo    bool   // a compensation, cancellation or rollback (crash points tell them apart)
	target  call
	timeout time.Duration
}

// outcomeOf classifies a result for the state machines, telling apart calls that never left
// this process.
func outcomeOf(res invoke.Result) (outcome saga.Outcome, notSent bool, msg string) {
	if res.Err != nil {
		msg = participantText(res.Err)
		notSent = errorsIsAny(res.Err, invoke.ErrBreakerOpen, invoke.ErrNoSlot, invoke.ErrTooManyEndpoints)
	}
	switch res.Outcome {
	case invoke.OK:
		return saga.OK, notSent, msg
	case invoke.Aborted:
		return saga.Aborted, notSent, msg
	}
	return saga.Transient, notSent, msg
}

// nextAttempt is the earliest retry time among branches (zero: now), for handing work back.
func nextAttempt(bs []store.Branch) time.Time {
	var next time.Time
	for _, b := range bs {
		if !b.NextAttemptAt.IsZero() && (next.IsZero() || b.NextAttemptAt.Before(next)) {
			next = b.NextAttemptAt
		}
	}
	return next
}

func sameBranch(a, b store.Branch) bool {
	return a.Status == b.Status && a.Attempts == b.Attempts && a.LastError == b.LastError &&
		a.NextAttemptAt.Equal(b.NextAttemptAt) && a.Uncertain == b.Uncertain
}

// branchIndex finds a branch by name; -1 when there is none.
func branchIndex(names func(i int) string, n int, name string) int {
	for i := range n {
		if names(i) == name {
			return i
		}
	}
	return -1
}

// waitsForInitiator reports a status in which nobody drives the transaction before its
// deadline: a TCC whose initiator has not decided, a message not yet submitted. The row must
// stay unleased then, so that the initiator's registration, commit or submit finds it free.
func waitsForInitiator(status string) bool { return status == "trying" || status == "prepared" }

// branchOf is the state machines' view of a stored branch (every mode shares saga.Branch).
func branchOf(r store.Branch) saga.Branch {
	return saga.Branch{Status: saga.Status(r.Status), Attempts: r.Attempts, LastError: r.LastError, NextAt: r.NextAttemptAt, Uncertain: r.Uncertain}
}

// rowOf is the stored view of one op of a machine's branch.
func rowOf(name, op string, pos int, b saga.Branch) store.Branch {
	return store.Branch{Branch: name, Op: op, Position: pos, Status: string(b.Status), Attempts: b.Attempts,
		LastError: b.LastError, NextAttemptAt: b.NextAt, Uncertain: b.Uncertain}
}
