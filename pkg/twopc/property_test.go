package twopc_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"pgregory.net/rapid"

	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/twopc"
)

// TestProperties drives random 2PC transactions to the end the way the engine does (Advance,
// record the events before making the calls, feed outcomes back with Apply in any order, Advance
// again after each result and when woken), with random latencies, time jumps and crashes, and
// checks what the package doc promises against a record the test keeps itself rather than
// against the state under test.
func TestProperties(t *testing.T) {
	t.Parallel()
	rapid.Check(t, run2PC)
}

var ops = []twopc.Op{twopc.OpPrepare, twopc.OpCommit, twopc.OpRollback}

func opIndex(op twopc.Op) int { return slices.Index(ops, op) }

// world is the test's own record of what happened to the participants, across crashes.
type world struct {
	spec twopc.Spec

	sent       [3][]int  // calls per op and branch that left the coordinator (lost ones included)
	ok         [3][]bool // an OK was delivered for a call of this op and branch
	okThisLife [3][]bool // the same, since the last crash: what the machine in memory was told
	failBudget [2][]int  // failures a branch's commit and rollback give before they succeed
	failures   [2][]int
	inflight   []flight // calls made whose result has not been delivered (dropped on a crash)
	latencyMax int      // milliseconds, for most calls

	prepareRefused   bool // some prepare was answered with something other than OK
	decisionRecorded bool // an Advance that said "committing" was recorded
	crashUndecided   bool // a coordinator died while the recorded phase was preparing
}

// flight is a call made and the instant its result comes back.
type flight struct {
	call twopc.Call
	due  time.Time
}

func (w *world) inFlight(i int, op twopc.Op) bool {
	return slices.ContainsFunc(w.inflight, func(f flight) bool { return f.call.Branch == i && f.call.Op == op })
}

// latency draws how long a call takes: mostly quick, now and then a participant that hangs past
// any deadline.
func (w *world) latency(t *rapid.T) time.Duration {
	ms := rapid.IntRange(0, w.latencyMax).Draw(t, "latency_ms")
	if rapid.IntRange(0, 19).Draw(t, "slow") == 19 {
		ms += rapid.IntRange(0, 30_000).Draw(t, "slow_ms")
	}
	return time.Duration(ms) * time.Millisecond
}

// next returns the index of the call whose result comes back first, or -1.
func (w *world) next() int {
	k := -1
	for j, f := range w.inflight {
		if k < 0 || f.due.Before(w.inflight[k].due) {
			k = j
		}
	}
	return k
}

func (w *world) total(op twopc.Op) int {
	n := 0
	for _, k := range w.sent[opIndex(op)] {
		n += k
	}
	return n
}

func (w *world) allOK(op twopc.Op) bool {
	return !slices.Contains(w.ok[opIndex(op)], false)
}

func genSpec(t *rapid.T) twopc.Spec {
	n := rapid.IntRange(1, 8).Draw(t, "branches")
	spec := twopc.Spec{
		// rapid favours small numbers: without the offset, most deadlines would pass at once.
		Deadline: t0.Add(time.Second + time.Duration(rapid.IntRange(0, 20_000).Draw(t, "deadline_ms"))*time.Millisecond),
		// Listed so that the most likely draw lets a failure or two be retried.
		OperatorThreshold: rapid.SampledFrom([]int{3, 5, 1, 2, 8}).Draw(t, "operator_threshold"),
	}
	for i := range n {
		initial := time.Duration(rapid.IntRange(1, 2000).Draw(t, "initial_backoff_ms")) * time.Millisecond
		spec.Branches = append(spec.Branches, twopc.BranchPolicy{
			Name:           fmt.Sprintf("b%d", i),
			InitialBackoff: initial,
			MaxBackoff:     initial * time.Duration(rapid.IntRange(1, 8).Draw(t, "max_backoff_factor")),
		})
	}
	return spec
}

func branchOf(s twopc.State, i int, op twopc.Op) twopc.Branch {
	switch op {
	case twopc.OpCommit:
		return s.Branches[i].Commit
	case twopc.OpRollback:
		return s.Branches[i].Rollback
	}
	return s.Branches[i].Prepare
}

func anyInFlight(s twopc.State) bool {
	for i := range s.Branches {
		for _, op := range ops {
			if branchOf(s, i, op).InFlight {
				return true
			}
		}
	}
	return false
}

func run2PC(t *rapid.T) {
	spec := genSpec(t)
	n := len(spec.Branches)
	w := &world{spec: spec}
	for k := range ops {
		w.sent[k], w.ok[k], w.okThisLife[k] = make([]int, n), make([]bool, n), make([]bool, n)
	}
	for k := range 2 {
		w.failBudget[k], w.failures[k] = make([]int, n), make([]int, n)
		for i := range n {
			// Mostly none or a failure or two, sometimes enough to reach the operator threshold.
			if rapid.Bool().Draw(t, "second_phase_fails") {
				w.failBudget[k][i] = rapid.IntRange(1, 2).Draw(t, "second_phase_failures")
			}
			if rapid.IntRange(0, 7).Draw(t, "stubborn") == 7 {
				w.failBudget[k][i] = rapid.IntRange(0, 8).Draw(t, "stubborn_failures")
			}
		}
	}
	// How often prepares are refused, fail, or are never sent, in percent; often never, so that
	// transactions with many branches still commit.
	abortPct := rapid.SampledFrom([]int{0, 0, 2, 5, 20}).Draw(t, "abort_pct")
	transientPct := rapid.SampledFrom([]int{0, 0, 2, 5, 20}).Draw(t, "transient_pct")
	notSentPct := rapid.SampledFrom([]int{0, 5, 30}).Draw(t, "not_sent_pct")
	w.latencyMax = rapid.SampledFrom([]int{200, 1000, 5000}).Draw(t, "max_latency_ms")
	// At most this many crashes. Each is the largest value of a range below: rapid favours
	// small numbers, so that is the rare draw.
	crashes := rapid.IntRange(0, 3).Draw(t, "crashes")

	s := twopc.New(spec)
	durable := s     // what storage holds: the engine creates the transaction before any call
	pending := false // events returned but not recorded yet
	now := t0
	var last *twopc.Result // the latest result delivered, for duplicate deliveries

	crash := func() {
		crashes--
		// The coordinator dies; another one loads what was recorded. Results applied since the
		// last write are lost with the calls still out; the participants keep what they did.
		if durable.Phase == twopc.PhasePreparing {
			w.crashUndecided = true
		}
		s = twopc.Recover(durable)
		require.False(t, anyInFlight(s), "Recover leaves nothing in flight")
		evs := twopc.RecoverEvents(durable, s)
		if durable.Phase == twopc.PhasePreparing {
			require.Equal(t, twopc.PhaseRollingBack, s.Phase, "presumed abort")
			require.Equal(t, []twopc.Event{{Kind: "rolling_back", Detail: s.Reason}}, evs)
		} else {
			require.Equal(t, durable.Phase, s.Phase, "a recorded phase survives a crash")
			require.Empty(t, evs)
		}
		pending = len(evs) > 0 // the engine records them with its first write
		w.inflight = nil
		w.okThisLife = [3][]bool{make([]bool, n), make([]bool, n), make([]bool, n)}
		last = nil
	}

	for iter := 0; ; iter++ {
		require.Less(t, iter, 3000, "not terminal after %d rounds: phase %s, state %+v", iter, s.Phase, s)

		before := s
		next, calls, evs, wake := twopc.Advance(spec, s, now)
		w.checkDecision(t, before, next, now, "Advance")
		if len(evs) > 0 {
			pending = true
		}
		if crashes > 0 && rapid.IntRange(0, 40).Draw(t, "crash_before_write") == 40 {
			// Died before recording: with events pending, the calls were not made either (the
			// engine writes first); without, they may have left and are lost in flight.
			if !pending {
				w.checkCalls(t, before, next, durable, calls, now)
			}
			crash()
			continue
		}
		if pending {
			durable, pending = next, false
			if next.Phase == twopc.PhaseCommitting && slices.ContainsFunc(evs, func(e twopc.Event) bool { return e.Kind == "committing" }) {
				w.decisionRecorded = true
			}
		}
		s = next
		w.checkCalls(t, before, s, durable, calls, now)
		if s.Phase.Terminal() {
			require.Equal(t, s.Phase, durable.Phase, "the outcome is recorded before anyone is told")
			w.checkTerminal(t, s, now)
			return
		}
		require.False(t, len(calls) == 0 && len(w.inflight) == 0 && wake.IsZero(),
			"stalled in phase %s: nothing dispatched, nothing in flight, no wake; state %+v", s.Phase, s)
		if !wake.IsZero() {
			require.True(t, wake.After(now), "wake %s is not after now %s", wake, now)
		}
		if s.Phase == twopc.PhasePreparing {
			require.False(t, wake.IsZero() || wake.After(spec.Deadline), "preparing must wake by the deadline, wake %s", wake)
		}

		switch {
		case crashes > 0 && rapid.IntRange(0, 30).Draw(t, "crash") == 30:
			crash()

		case last != nil && !w.inFlight(last.Branch, last.Op) && rapid.IntRange(0, 9).Draw(t, "duplicate") == 0:
			got, evs := twopc.Apply(spec, s, *last)
			require.Empty(t, evs, "duplicate %+v", *last)
			require.Equal(t, s, got, "duplicate %+v", *last)

		case w.next() >= 0 && (wake.IsZero() || !w.inflight[w.next()].due.After(wake)):
			// The first result to come back, in the order the latencies drawn at dispatch say.
			k := w.next()
			c := w.inflight[k].call
			if w.inflight[k].due.After(now) {
				now = w.inflight[k].due
			}
			w.inflight = slices.Delete(w.inflight, k, k+1)
			r := twopc.Result{Branch: c.Branch, Op: c.Op, Err: "err", At: now, Jitter: rapid.Float64Range(0, 0.999).Draw(t, "jitter")}
			// rapid favours small draws: let them mean the common outcome, the last case below.
			x := 99 - rapid.IntRange(0, 99).Draw(t, "outcome")
			op := opIndex(c.Op)
			switch {
			case x < notSentPct/2 || (c.Op == twopc.OpPrepare && x < notSentPct):
				r.Outcome, r.NotSent = saga.Transient, true
				w.sent[op][c.Branch]--
			case c.Op == twopc.OpPrepare && x < notSentPct+abortPct:
				r.Outcome = saga.Aborted
				w.prepareRefused = true
			case c.Op == twopc.OpPrepare && x < notSentPct+abortPct+transientPct:
				r.Outcome = saga.Transient // a timeout or an error: the participant may have prepared
				w.prepareRefused = true
			case c.Op != twopc.OpPrepare && w.failures[op-1][c.Branch] < w.failBudget[op-1][c.Branch]:
				w.failures[op-1][c.Branch]++
				r.Outcome = rapid.SampledFrom([]saga.Outcome{saga.Transient, saga.Aborted}).Draw(t, "second_phase_failure")
			default:
				r.Outcome = saga.OK
				w.ok[op][c.Branch], w.okThisLife[op][c.Branch] = true, true
			}
			require.True(t, branchOf(s, c.Branch, c.Op).InFlight, "state does not know call %+v is in flight", c)
			prev := s
			var evs []twopc.Event
			s, evs = twopc.Apply(spec, s, r)
			require.False(t, branchOf(s, c.Branch, c.Op).InFlight)
			w.checkDecision(t, prev, s, now, "Apply")
			if len(evs) > 0 {
				pending = true
			} else {
				require.True(t, r.NotSent, "result %+v recorded no event", r)
			}
			last = &r

		default:
			require.False(t, wake.IsZero())
			if rapid.Bool().Draw(t, "peek_early") {
				// Nothing new is due before wake: an early Advance dispatches and decides nothing.
				early := now.Add(time.Duration(rapid.Int64Range(0, int64(wake.Sub(now))-1).Draw(t, "early_ns")))
				got, calls, evs, again := twopc.Advance(spec, s, early)
				require.Empty(t, calls, "Advance at %s, before wake %s", early, wake)
				require.Empty(t, evs, "Advance at %s, before wake %s", early, wake)
				require.Equal(t, wake, again)
				require.Equal(t, s, got)
				now = early
			}
			now = wake.Add(time.Duration(rapid.IntRange(0, 1000).Draw(t, "oversleep_ms")) * time.Millisecond)
		}
	}
}

// checkDecision checks that a step leaving preparing had a reason to: committing only once every
// participant prepared, rolling back only after a refusal, a failure or the deadline.
func (w *world) checkDecision(t *rapid.T, before, next twopc.State, now time.Time, what string) {
	if before.Phase != twopc.PhasePreparing || next.Phase == twopc.PhasePreparing {
		return
	}
	switch next.Phase {
	case twopc.PhaseCommitting, twopc.PhaseCommitted:
		require.Equal(t, "Advance", what, "only Advance decides to commit")
		require.True(t, w.allOK(twopc.OpPrepare), "committing before every participant prepared")
		require.False(t, w.prepareRefused, "committing after a participant did not prepare")
	case twopc.PhaseRollingBack, twopc.PhaseRolledBack:
		require.True(t, w.prepareRefused || !now.Before(w.spec.Deadline),
			"%s rolled back at %s (deadline %s) though no participant refused", what, now, w.spec.Deadline)
	default:
		t.Fatalf("%s moved from preparing to %s", what, next.Phase)
	}
}

func (w *world) checkCalls(t *rapid.T, before, next, durable twopc.State, calls []twopc.Call, now time.Time) {
	if before.Phase.Terminal() || next.Phase.Terminal() {
		require.Empty(t, calls, "calls made in terminal phase %s", next.Phase)
	}
	for _, c := range calls {
		i := c.Branch
		require.False(t, w.inFlight(i, c.Op), "call %+v while the same op of the branch is in flight", c)
		prev := branchOf(before, i, c.Op)
		require.False(t, prev.NextAt.After(now), "call %+v at %s before its NextAt %s", c, now, prev.NextAt)
		require.Equal(t, prev.Attempts+1, c.Attempt, "call %+v", c)
		require.NotEqual(t, saga.StatusSucceeded, prev.Status, "call %+v of a branch that succeeded", c)
		require.False(t, w.okThisLife[opIndex(c.Op)][i], "call %+v after this coordinator was told it succeeded", c)
		require.True(t, branchOf(next, i, c.Op).InFlight, "call %+v not marked in flight", c)
		switch c.Op {
		case twopc.OpPrepare:
			require.Equal(t, twopc.PhasePreparing, next.Phase, "prepare %+v outside preparing", c)
			require.True(t, now.Before(w.spec.Deadline), "prepare %+v at %s, deadline %s", c, now, w.spec.Deadline)
			require.Zero(t, w.sent[0][i], "prepare %+v sent again", c)
		case twopc.OpCommit:
			require.Equal(t, twopc.PhaseCommitting, next.Phase, "commit %+v outside committing", c)
			require.Equal(t, twopc.PhaseCommitting, durable.Phase, "commit %+v before the decision was recorded", c)
			require.True(t, w.decisionRecorded, "commit %+v without a committing event", c)
			require.True(t, w.allOK(twopc.OpPrepare), "commit %+v before every participant prepared", c)
			require.False(t, w.prepareRefused, "commit %+v after a participant did not prepare", c)
			require.False(t, w.crashUndecided, "commit %+v after a crash before the decision", c)
			require.Zero(t, w.total(twopc.OpRollback), "commit %+v after a rollback", c)
		case twopc.OpRollback:
			require.Equal(t, twopc.PhaseRollingBack, next.Phase, "rollback %+v outside rolling_back", c)
			require.False(t, w.inFlight(i, twopc.OpPrepare), "rollback %+v while its prepare is in flight", c)
			require.Zero(t, w.total(twopc.OpCommit), "rollback %+v after a commit", c)
		default:
			t.Fatalf("call with unknown op: %+v", c)
		}
		w.sent[opIndex(c.Op)][i]++
		w.inflight = append(w.inflight, flight{call: c, due: now.Add(w.latency(t))})
	}
}

func (w *world) checkTerminal(t *rapid.T, s twopc.State, now time.Time) {
	require.Empty(t, w.inflight, "phase %s with calls in flight", s.Phase)
	require.False(t, anyInFlight(s))
	require.False(t, w.total(twopc.OpCommit) > 0 && w.total(twopc.OpRollback) > 0, "both committed and rolled back")
	switch s.Phase {
	case twopc.PhaseCommitted:
		require.True(t, w.allOK(twopc.OpCommit), "committed without every commit succeeding: %v", w.ok[1])
		require.True(t, w.allOK(twopc.OpPrepare))
		require.True(t, w.decisionRecorded)
		require.False(t, w.crashUndecided)
		for i := range s.Branches {
			require.Equal(t, saga.StatusSucceeded, s.Branches[i].Commit.Status, "b%d", i)
		}
	case twopc.PhaseRolledBack:
		require.True(t, w.allOK(twopc.OpRollback), "rolled back without every rollback succeeding: %v", w.ok[2])
		require.Zero(t, w.total(twopc.OpCommit))
		for i := range s.Branches {
			require.Equal(t, saga.StatusSucceeded, s.Branches[i].Rollback.Status, "b%d", i)
		}
	case twopc.PhaseNeedsOperator:
		stuck := false
		for i := range s.Branches {
			for _, op := range []twopc.Op{twopc.OpCommit, twopc.OpRollback} {
				b := branchOf(s, i, op)
				if b.Status != saga.StatusSucceeded && b.Attempts >= w.spec.OperatorThreshold {
					stuck = true
				}
			}
		}
		require.True(t, stuck, "needs an operator with no commit or rollback at the threshold; state %+v", s)
	default:
		t.Fatalf("unknown terminal phase %s", s.Phase)
	}
	// Nothing more happens, however long the engine waits.
	got, calls, evs, wake := twopc.Advance(w.spec, s, now.Add(24*time.Hour))
	require.Empty(t, calls)
	require.Empty(t, evs)
	require.True(t, wake.IsZero())
	require.Equal(t, s, got)
}
