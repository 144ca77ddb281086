package tcc_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"pgregory.net/rapid"

	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/tcc"
)

// TestProperties drives random TCC transactions to the end the way the engine does (a decision
// from the initiator or none, Advance, make the calls, feed outcomes back with Apply in any order,
// Advance again after each result and when woken), with random latencies, time jumps and crashes,
// and checks what the package doc promises against a record the test keeps itself rather than
// against the state under test.
func TestProperties(t *testing.T) {
	t.Parallel()
	rapid.Check(t, runTCC)
}

const (
	confirmOp = 0
	cancelOp  = 1
)

func opIndex(op tcc.Op) int {
	if op == tcc.OpCancel {
		return cancelOp
	}
	return confirmOp
}

// world is the test's own record of what happened, across crashes.
type world struct {
	spec    tcc.Spec
	decided bool // the transaction has left trying, by the initiator or by the deadline
	commit  bool // which way, once decided

	dispatches [2][]int  // calls made per op and branch, lost ones included
	succeeded  [2][]bool // an OK was delivered for a call of this op and branch
	failBudget [2][]int  // failures a branch's op gives before it succeeds
	failures   [2][]int
	inflight   []tcc.Call // calls made whose result has not been delivered (dropped on a crash)
}

func (w *world) inFlight(i int, op tcc.Op) bool {
	return slices.ContainsFunc(w.inflight, func(c tcc.Call) bool { return c.Branch == i && c.Op == op })
}

func (w *world) decidedOp() tcc.Op {
	if w.commit {
		return tcc.OpConfirm
	}
	return tcc.OpCancel
}

func genSpec(t *rapid.T) tcc.Spec {
	n := rapid.IntRange(0, 8).Draw(t, "branches")
	spec := tcc.Spec{
		// A deadline always: a transaction nobody decides must still end.
		Deadline:          t0.Add(time.Duration(rapid.IntRange(0, 60_000).Draw(t, "deadline_ms")) * time.Millisecond),
		OperatorThreshold: rapid.IntRange(1, 6).Draw(t, "operator_threshold"),
	}
	for i := range n {
		initial := time.Duration(rapid.IntRange(1, 2000).Draw(t, "initial_backoff_ms")) * time.Millisecond
		spec.Branches = append(spec.Branches, tcc.BranchPolicy{
			Name:           fmt.Sprintf("b%d", i),
			InitialBackoff: initial,
			MaxBackoff:     initial * time.Duration(rapid.IntRange(1, 8).Draw(t, "max_backoff_factor")),
		})
	}
	return spec
}

func runTCC(t *rapid.T) {
	spec := genSpec(t)
	n := len(spec.Branches)
	w := &world{spec: spec}
	for op := range 2 {
		w.dispatches[op] = make([]int, n)
		w.succeeded[op] = make([]bool, n)
		w.failures[op] = make([]int, n)
		w.failBudget[op] = make([]int, n)
		for i := range n {
			// Mostly a failure or two, sometimes enough to reach the operator threshold.
			w.failBudget[op][i] = rapid.IntRange(0, 2).Draw(t, "failures")
			if rapid.IntRange(0, 4).Draw(t, "stubborn") == 0 {
				w.failBudget[op][i] = rapid.IntRange(0, 8).Draw(t, "stubborn_failures")
			}
		}
	}
	// What the initiator will say, if anything, and whether it says it again later.
	decision := rapid.SampledFrom([]string{"none", "commit", "rollback"}).Draw(t, "decision")
	notSentPct := rapid.IntRange(0, 20).Draw(t, "not_sent_pct")
	crashes := rapid.IntRange(0, 3).Draw(t, "crashes")

	s := tcc.New(spec)
	// durable is the state last recorded. The engine records, before dispatching, whenever an
	// Advance or an Apply since the last record produced events, and a decision at once; calls
	// dispatched by an Advance with nothing to record, and results without events, can be lost.
	durable := s
	unrecorded := false
	now := t0
	var last *tcc.Result // the latest result delivered, for duplicate deliveries

	crash := func(base tcc.State) {
		snapshot := cloneState(base)
		s = tcc.Recover(base)
		require.Equal(t, snapshot, base, "Recover modified its input")
		for i, b := range s.Branches {
			require.False(t, b.Confirm.InFlight || b.Cancel.InFlight, "branch %d in flight after Recover", i)
		}
		require.Equal(t, base.Phase, s.Phase)
		require.Equal(t, base.Reason, s.Reason)
		w.inflight = nil // their results die with the process
		last, unrecorded, durable = nil, false, s
	}

	for iter := 0; ; iter++ {
		require.Less(t, iter, 3000, "not terminal after %d rounds: phase %s, state %+v", iter, s.Phase, s)

		before := s
		snapshot := cloneState(s)
		next, calls, evs, wake := tcc.Advance(spec, s, now)
		require.Equal(t, snapshot, s, "Advance modified its input")
		w.checkAdvance(t, before, next, calls, evs, wake, now)
		s = next
		if len(evs) > 0 || unrecorded {
			durable, unrecorded = s, false
		}
		if s.Phase.Terminal() {
			w.checkTerminal(t, s, now)
			return
		}
		require.False(t, len(calls) == 0 && len(w.inflight) == 0 && wake.IsZero(),
			"stalled in phase %s: nothing dispatched, nothing in flight, no wake; state %+v", s.Phase, s)
		if !wake.IsZero() {
			require.True(t, wake.After(now), "wake %s is not after now %s", wake, now)
		}

		switch {
		case decision != "none" && (s.Phase == tcc.PhaseTrying && rapid.Bool().Draw(t, "decide_now") ||
			s.Phase != tcc.PhaseTrying && rapid.IntRange(0, 5).Draw(t, "decide_late") == 0):
			// Before the deadline the decision goes through; after it, it meets the cancel.
			reason := ""
			if decision == "rollback" {
				reason = "the initiator rolled back"
			}
			wasTrying := s.Phase == tcc.PhaseTrying
			s = w.decide(t, s, decision == "commit", reason)
			if wasTrying {
				durable, unrecorded = s, false // the decision is a durable transition
			}
			decision = "none"

		case w.decided && rapid.IntRange(0, 19).Draw(t, "decide_again") == 0:
			// A retried or confused initiator: either decision, any time after the first.
			s = w.decide(t, s, rapid.Bool().Draw(t, "commit_again"), "again")

		case crashes > 0 && rapid.IntRange(0, 15).Draw(t, "crash") == 0:
			crashes--
			// Either everything was recorded, or only what the engine must record before acting.
			if rapid.Bool().Draw(t, "lose_unrecorded") {
				crash(durable)
			} else {
				crash(s)
			}

		case last != nil && !w.inFlight(last.Branch, last.Op) && rapid.IntRange(0, 9).Draw(t, "duplicate") == 0:
			got, evs := tcc.Apply(spec, s, *last)
			require.Empty(t, evs, "duplicate %+v", *last)
			requireSameState(t, s, got, "duplicate %+v", *last)

		case len(w.inflight) > 0 && (wake.IsZero() || rapid.Bool().Draw(t, "deliver_before_wake")):
			k := rapid.IntRange(0, len(w.inflight)-1).Draw(t, "which_result")
			c := w.inflight[k]
			w.inflight = slices.Delete(w.inflight, k, k+1)
			now = now.Add(time.Duration(rapid.IntRange(0, 3000).Draw(t, "latency_ms")) * time.Millisecond)
			r := tcc.Result{Branch: c.Branch, Op: c.Op, Err: "err", At: now, Jitter: rapid.Float64Range(0, 0.999).Draw(t, "jitter")}
			o, i := opIndex(c.Op), c.Branch
			switch {
			case rapid.IntRange(0, 99).Draw(t, "not_sent") < notSentPct:
				r.NotSent = true
				r.Outcome = rapid.SampledFrom([]saga.Outcome{saga.Transient, saga.OK, saga.Aborted}).Draw(t, "not_sent_outcome")
			case w.failures[o][i] < w.failBudget[o][i]:
				w.failures[o][i]++
				r.Outcome = rapid.SampledFrom([]saga.Outcome{saga.Transient, saga.Aborted}).Draw(t, "failure")
			default:
				r.Outcome = saga.OK
				w.succeeded[o][i] = true
			}
			s = w.apply(t, s, r)
			last = &r
			if crashes > 0 && rapid.IntRange(0, 15).Draw(t, "crash_before_record") == 0 {
				// The result arrived and the process died before recording it: the participant
				// acted, the coordinator does not know.
				crashes--
				crash(durable)
			}

		case rapid.IntRange(0, 9).Draw(t, "stall") == 0:
			// The engine was busy elsewhere (GC pause, overloaded replica): time just passes.
			now = now.Add(time.Duration(rapid.IntRange(0, 600_000).Draw(t, "stall_ms")) * time.Millisecond)

		default:
			require.False(t, wake.IsZero())
			if rapid.Bool().Draw(t, "wake_early") {
				// Woken before the wake time (another result, a spurious timer): nothing new is due.
				early := now.Add(time.Duration(rapid.Int64Range(0, int64(wake.Sub(now))-1).Draw(t, "early_ns")))
				snapshot := cloneState(s)
				got, calls, evs, again := tcc.Advance(spec, s, early)
				require.Equal(t, snapshot, s, "Advance modified its input")
				require.Empty(t, calls, "Advance at %s, before wake %s", early, wake)
				require.Empty(t, evs, "Advance at %s, before wake %s", early, wake)
				require.Equal(t, wake, again)
				requireSameState(t, s, got, "Advance before wake")
				now = early
				break
			}
			now = wake.Add(time.Duration(rapid.IntRange(0, 1000).Draw(t, "oversleep_ms")) * time.Millisecond)
		}
	}
}

// requireSameState compares states without telling a nil branch list from an empty one: Clone
// turns one into the other, which is not a change of state.
func requireSameState(t *rapid.T, want, got tcc.State, msgAndArgs ...any) {
	if len(want.Branches) == 0 {
		want.Branches = nil
	}
	if len(got.Branches) == 0 {
		got.Branches = nil
	}
	require.Equal(t, want, got, msgAndArgs...)
}

func branchOf(s tcc.State, i int, op tcc.Op) tcc.Branch {
	if op == tcc.OpCancel {
		return s.Branches[i].Cancel
	}
	return s.Branches[i].Confirm
}

// stuck reports whether some branch's op has failed as often as the operator threshold allows
// and is not being tried again: from then on nothing new is dispatched.
func (w *world) stuck(s tcc.State, op tcc.Op) bool {
	for i := range s.Branches {
		b := branchOf(s, i, op)
		if b.Status != saga.StatusSucceeded && !b.InFlight && b.Attempts >= w.spec.OperatorThreshold {
			return true
		}
	}
	return false
}

func (w *world) decide(t *rapid.T, s tcc.State, commit bool, reason string) tcc.State {
	snapshot := cloneState(s)
	got, evs, err := tcc.Decide(s, commit, reason)
	require.Equal(t, snapshot, s, "Decide modified its input")
	if s.Phase == tcc.PhaseTrying {
		require.False(t, w.decided)
		require.NoError(t, err)
		require.Len(t, evs, 1)
		w.decided, w.commit = true, commit
		if commit {
			require.Equal(t, tcc.PhaseConfirming, got.Phase)
		} else {
			require.Equal(t, tcc.PhaseCancelling, got.Phase)
			require.Equal(t, reason, got.Reason)
		}
		require.Equal(t, s.Branches, got.Branches, "a decision dispatches nothing by itself")
		return got
	}
	require.True(t, w.decided, "phase %s without a decision", s.Phase)
	requireSameState(t, s, got, "a second decision changes nothing")
	require.Empty(t, evs, "a second decision records nothing")
	switch {
	case s.Phase == tcc.PhaseNeedsOperator:
		require.Error(t, err)
		require.ErrorContains(t, err, s.Reason)
	case commit == w.commit:
		require.NoError(t, err, "the same decision twice")
		return s
	case w.commit:
		require.ErrorIs(t, err, tcc.ErrConfirmed)
	default:
		require.ErrorIs(t, err, tcc.ErrCancelled)
		require.ErrorContains(t, err, s.Reason)
	}
	// Whatever the error, it never claims the opposite of what was decided.
	if w.commit {
		require.NotErrorIs(t, err, tcc.ErrCancelled)
	} else {
		require.NotErrorIs(t, err, tcc.ErrConfirmed)
	}
	return s
}

func (w *world) apply(t *rapid.T, s tcc.State, r tcc.Result) tcc.State {
	prev := branchOf(s, r.Branch, r.Op)
	require.True(t, prev.InFlight, "state does not know call %+v is in flight", r)
	snapshot := cloneState(s)
	got, evs := tcc.Apply(w.spec, s, r)
	require.Equal(t, snapshot, s, "Apply modified its input")
	require.Equal(t, s.Phase, got.Phase, "Apply never changes the phase; Advance does")
	b := branchOf(got, r.Branch, r.Op)
	require.False(t, b.InFlight)
	for i := range got.Branches {
		if i != r.Branch {
			require.Equal(t, s.Branches[i], got.Branches[i], "result %+v touched branch %d", r, i)
		}
	}
	switch {
	case r.NotSent:
		require.Empty(t, evs)
		require.Equal(t, prev.Attempts-1, b.Attempts, "a call never sent is not an attempt")
		require.True(t, b.NextAt.After(r.At), "retried after a backoff")
	case r.Outcome == saga.OK:
		require.Len(t, evs, 1)
		require.Equal(t, "branch_succeeded", evs[0].Kind)
		require.Equal(t, saga.StatusSucceeded, b.Status)
		require.Equal(t, prev.Attempts, b.Attempts)
	default:
		require.Len(t, evs, 1)
		require.Equal(t, "branch_retry", evs[0].Kind)
		require.Equal(t, saga.StatusUnknown, b.Status, "confirm and cancel never give up")
		require.Equal(t, prev.Attempts, b.Attempts)
		require.True(t, b.NextAt.After(r.At), "retried after a backoff")
		if r.Outcome == saga.Aborted {
			require.Contains(t, b.LastError, "participant refused to "+string(r.Op))
		}
	}
	return got
}

func (w *world) checkAdvance(t *rapid.T, before, next tcc.State, calls []tcc.Call, evs []tcc.Event, wake, now time.Time) {
	if before.Phase.Terminal() {
		require.Empty(t, calls, "calls made in terminal phase %s", before.Phase)
		require.Equal(t, before.Phase, next.Phase)
	}
	if before.Phase == tcc.PhaseTrying {
		if now.Before(w.spec.Deadline) {
			require.Equal(t, tcc.PhaseTrying, next.Phase, "cancelled before the deadline")
			require.Empty(t, evs)
			require.Equal(t, w.spec.Deadline, wake, "while trying, the deadline is what comes next")
		} else {
			require.NotEmpty(t, evs, "not cancelled once the deadline passed")
			require.Equal(t, "cancelling", evs[0].Kind)
			require.False(t, w.decided)
			require.Contains(t, next.Reason, "deadline")
			w.decided, w.commit = true, false
		}
	}
	if next.Phase == tcc.PhaseTrying || next.Phase.Terminal() {
		require.Empty(t, calls, "calls made in phase %s", next.Phase)
	}
	switch next.Phase {
	case tcc.PhaseConfirming, tcc.PhaseConfirmed:
		require.True(t, w.decided && w.commit, "phase %s without a commit", next.Phase)
	case tcc.PhaseCancelling, tcc.PhaseCancelled:
		require.True(t, w.decided && !w.commit, "phase %s without a rollback or a deadline", next.Phase)
	case tcc.PhaseNeedsOperator:
		require.True(t, w.decided)
		if before.Phase != tcc.PhaseNeedsOperator {
			require.True(t, w.stuck(before, w.decidedOp()), "needs an operator with no branch at the threshold")
			require.Equal(t, tcc.Event{Kind: "needs_operator", Detail: next.Reason}, evs[len(evs)-1])
		}
	}
	if len(calls) > 0 {
		require.False(t, w.stuck(before, w.decidedOp()), "calls %+v dispatched once an operator is needed", calls)
	}
	for _, c := range calls {
		i := c.Branch
		require.Equal(t, w.decidedOp(), c.Op, "call %+v against the decision", c)
		require.False(t, w.inFlight(i, c.Op), "call %+v while the same branch op is in flight", c)
		prev := branchOf(before, i, c.Op)
		require.False(t, prev.InFlight, "call %+v", c)
		require.NotEqual(t, saga.StatusSucceeded, prev.Status, "call %+v after its success was recorded", c)
		require.False(t, prev.NextAt.After(now), "call %+v at %s before its NextAt %s", c, now, prev.NextAt)
		require.Equal(t, prev.Attempts+1, c.Attempt, "call %+v", c)
		nb := branchOf(next, i, c.Op)
		require.True(t, nb.InFlight)
		require.Equal(t, c.Attempt, nb.Attempts)
		w.dispatches[opIndex(c.Op)][i]++
		w.inflight = append(w.inflight, c)
	}
	confirms, cancels := 0, 0
	for i := range w.spec.Branches {
		confirms += w.dispatches[confirmOp][i]
		cancels += w.dispatches[cancelOp][i]
	}
	require.False(t, confirms > 0 && cancels > 0, "both confirm (%d) and cancel (%d) dispatched", confirms, cancels)

	if next.Phase == tcc.PhaseConfirming || next.Phase == tcc.PhaseCancelling {
		// The wake is the earliest retry still waiting, and everything else due was dispatched;
		// once an operator is needed only results move the transaction.
		op := w.decidedOp()
		var want time.Time
		if !w.stuck(next, op) {
			for i := range next.Branches {
				b := branchOf(next, i, op)
				if b.InFlight || b.Status == saga.StatusSucceeded {
					continue
				}
				require.True(t, b.NextAt.After(now), "branch %d due at %s and not dispatched at %s", i, b.NextAt, now)
				if want.IsZero() || b.NextAt.Before(want) {
					want = b.NextAt
				}
			}
		}
		require.Equal(t, want, wake)
	}
}

func (w *world) checkTerminal(t *rapid.T, s tcc.State, now time.Time) {
	require.Empty(t, w.inflight, "phase %s with calls in flight", s.Phase)
	for i, b := range s.Branches {
		require.False(t, b.Confirm.InFlight || b.Cancel.InFlight, "branch %d in flight in phase %s", i, s.Phase)
	}
	switch s.Phase {
	case tcc.PhaseConfirmed:
		for i, b := range s.Branches {
			require.True(t, w.succeeded[confirmOp][i], "branch %d confirmed without an OK", i)
			require.Equal(t, saga.StatusSucceeded, b.Confirm.Status)
			require.Zero(t, w.dispatches[cancelOp][i], "branch %d cancelled in a confirmed transaction", i)
			require.Equal(t, tcc.Branch{Status: saga.StatusPending}, b.Cancel)
		}
	case tcc.PhaseCancelled:
		require.NotEmpty(t, s.Reason, "a cancelled transaction says why")
		for i, b := range s.Branches {
			require.True(t, w.succeeded[cancelOp][i], "branch %d cancelled without an OK", i)
			require.Equal(t, saga.StatusSucceeded, b.Cancel.Status)
			require.Zero(t, w.dispatches[confirmOp][i], "branch %d confirmed in a cancelled transaction", i)
			require.Equal(t, tcc.Branch{Status: saga.StatusPending}, b.Confirm)
		}
	case tcc.PhaseNeedsOperator:
		op := w.decidedOp()
		require.True(t, w.stuck(s, op), "needs an operator with no %s at the threshold; state %+v", op, s)
		require.True(t, strings.HasPrefix(s.Reason, fmt.Sprintf("a %s failed %d times", op, w.spec.OperatorThreshold)), "reason %q", s.Reason)
	default:
		t.Fatalf("unknown terminal phase %s", s.Phase)
	}
	// Nothing more happens, however long the engine waits or however often it restarts.
	got, calls, evs, wake := tcc.Advance(w.spec, s, now.Add(24*time.Hour))
	require.Empty(t, calls)
	require.Empty(t, evs)
	require.True(t, wake.IsZero())
	requireSameState(t, s, got, "Advance of a terminal state")
	requireSameState(t, s, tcc.Recover(s), "Recover of a terminal state")
	// And the initiator, whatever it says now, is told the truth.
	w.decide(t, s, true, "late")
	w.decide(t, s, false, "late")
}
