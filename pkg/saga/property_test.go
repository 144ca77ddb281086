package saga_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"pgregory.net/rapid"

	"github.com/treatyhq/treaty/pkg/saga"
)

// TestProperties drives random sagas to the end the way the engine does (Advance, make the calls,
// feed outcomes back with Apply in any order, Advance again after each result and when woken),
// with random time steps and crashes, and checks what the package doc promises against a record
// the test keeps itself rather than against the state under test.
func TestProperties(t *testing.T) {
	t.Parallel()
	rapid.Check(t, runSaga)
}

// world is the test's own record of what happened to the participants, across crashes.
type world struct {
	spec       saga.Spec
	deps       [][]int // worked out from the generated graph, not by saga.Deps
	dependents [][]int

	actionDispatches []int  // action calls made, lost ones included
	cleanAborts      []int  // action calls answered ABORTED (known not to have taken effect)
	actionOK         []bool // an action call answered OK
	compDispatches   []int
	compOK           []bool
	compFailBudget   []int // failures a compensation gives before it succeeds
	compFailures     []int
	// readyAtLostDispatch marks steps that were ready when a crash lost the record of an
	// Advance: a real engine may have called them without a trace, so Recover must assume so.
	readyAtLostDispatch []bool
	turnedBack          bool // a compensation has been dispatched
	inflight            []saga.Call
}

// mayHaveRun reports whether some call of step i's action may have taken effect: every call
// except those answered with a clean ABORTED.
func (w *world) mayHaveRun(i int) bool { return w.actionDispatches[i] > w.cleanAborts[i] }

func (w *world) inFlight(i int, op saga.Op) bool {
	return slices.ContainsFunc(w.inflight, func(c saga.Call) bool { return c.Step == i && c.Op == op })
}

func genSpec(t *rapid.T) (saga.Spec, [][]int) {
	n := rapid.IntRange(1, 8).Draw(t, "steps")
	dag := rapid.Bool().Draw(t, "dag")
	edges := make([][]int, n) // over logical ids; j < i keeps the graph acyclic
	any := false
	if dag {
		for i := 1; i < n; i++ {
			for j := range i {
				if rapid.IntRange(0, 2).Draw(t, fmt.Sprintf("edge_%d_%d", i, j)) == 0 {
					edges[i] = append(edges[i], j)
					any = true
				}
			}
		}
	}
	ids := make([]int, n)
	for i := range ids {
		ids[i] = i
	}
	// Listing order is independent of dependency order when there are dependencies.
	perm := rapid.Permutation(ids).Draw(t, "listing")
	posOf := make([]int, n)
	for pos, id := range perm {
		posOf[id] = pos
	}
	spec := saga.Spec{OperatorThreshold: rapid.IntRange(1, 6).Draw(t, "operator_threshold")}
	if rapid.Bool().Draw(t, "has_deadline") {
		spec.Deadline = t0.Add(time.Duration(rapid.IntRange(0, 60_000).Draw(t, "deadline_ms")) * time.Millisecond)
	}
	deps := make([][]int, n)
	for pos, id := range perm {
		initial := time.Duration(rapid.IntRange(1, 2000).Draw(t, "initial_backoff_ms")) * time.Millisecond
		st := saga.Step{
			Name:           fmt.Sprintf("s%d", id),
			MaxAttempts:    rapid.IntRange(1, 4).Draw(t, "max_attempts"),
			InitialBackoff: initial,
			MaxBackoff:     initial * time.Duration(rapid.IntRange(1, 8).Draw(t, "max_backoff_factor")),
		}
		for _, j := range edges[id] {
			st.DependsOn = append(st.DependsOn, fmt.Sprintf("s%d", j))
			deps[pos] = append(deps[pos], posOf[j])
		}
		spec.Steps = append(spec.Steps, st)
	}
	if !any {
		// No dependency named anywhere: the steps run one after the other as listed.
		for pos := 1; pos < n; pos++ {
			deps[pos] = []int{pos - 1}
		}
	}
	return spec, deps
}

func runSaga(t *rapid.T) {
	spec, deps := genSpec(t)
	require.NoError(t, saga.Validate(spec))
	n := len(spec.Steps)
	w := &world{
		spec: spec, deps: deps, dependents: make([][]int, n),
		actionDispatches: make([]int, n), cleanAborts: make([]int, n), actionOK: make([]bool, n),
		compDispatches: make([]int, n), compOK: make([]bool, n), compFailures: make([]int, n),
		compFailBudget: make([]int, n), readyAtLostDispatch: make([]bool, n),
	}
	for i, ds := range deps {
		for _, d := range ds {
			w.dependents[d] = append(w.dependents[d], i)
		}
		// Mostly a failure or two, sometimes enough to reach the operator threshold.
		w.compFailBudget[i] = rapid.IntRange(0, 2).Draw(t, "compensation_failures")
		if rapid.IntRange(0, 4).Draw(t, "stubborn_compensation") == 0 {
			w.compFailBudget[i] = rapid.IntRange(0, 8).Draw(t, "stubborn_compensation_failures")
		}
	}
	// How often this saga's participants refuse or fail, in percent of action calls.
	abortPct := rapid.IntRange(0, 25).Draw(t, "abort_pct")
	transientPct := rapid.IntRange(0, 50).Draw(t, "transient_pct")
	crashes := rapid.IntRange(0, 3).Draw(t, "crashes")

	s := saga.New(spec)
	now := t0
	var last *saga.Result // the latest result delivered, for duplicate deliveries
	for iter := 0; ; iter++ {
		require.Less(t, iter, 2000, "not terminal after %d rounds: phase %s, state %+v", iter, s.Phase, s)

		before := s
		next, calls, _, wake := saga.Advance(spec, s, now)
		w.checkCalls(t, before, next, calls, now)
		s = next
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
		case crashes > 0 && rapid.IntRange(0, 15).Draw(t, "crash") == 0:
			crashes--
			// The engine dies. Either the state after this Advance was recorded, or only the
			// one before it: then the calls it made happened without a trace.
			base := s
			if rapid.Bool().Draw(t, "lost_advance") {
				base = before
				if base.Phase == saga.PhaseRunning {
					for i := range n {
						if base.Steps[i].Action.Status == saga.StatusPending && depsDone(base, deps[i]) {
							w.readyAtLostDispatch[i] = true
						}
					}
				}
			}
			s = saga.Recover(spec, base)
			require.False(t, s.InFlight(), "Recover leaves nothing in flight")
			w.inflight = nil // their results die with the process
			last = nil

		case last != nil && !w.inFlight(last.Step, last.Op) && rapid.IntRange(0, 9).Draw(t, "duplicate") == 0:
			got, evs := saga.Apply(spec, s, *last)
			require.Empty(t, evs, "duplicate %+v", *last)
			require.Equal(t, s, got, "duplicate %+v", *last)

		case len(w.inflight) > 0 && (wake.IsZero() || rapid.Bool().Draw(t, "deliver_before_wake")):
			k := rapid.IntRange(0, len(w.inflight)-1).Draw(t, "which_result")
			c := w.inflight[k]
			w.inflight = slices.Delete(w.inflight, k, k+1)
			now = now.Add(time.Duration(rapid.IntRange(0, 3000).Draw(t, "latency_ms")) * time.Millisecond)
			r := saga.Result{Step: c.Step, Op: c.Op, Err: "err", At: now, Jitter: rapid.Float64Range(0, 0.999).Draw(t, "jitter")}
			if c.Op == saga.OpAction {
				switch x := rapid.IntRange(0, 99).Draw(t, "action_outcome"); {
				case x < abortPct:
					r.Outcome = saga.Aborted
					w.cleanAborts[c.Step]++
				case x < abortPct+transientPct:
					r.Outcome = saga.Transient
				default:
					r.Outcome = saga.OK
					w.actionOK[c.Step] = true
				}
			} else {
				if w.compFailures[c.Step] < w.compFailBudget[c.Step] {
					w.compFailures[c.Step]++
					r.Outcome = rapid.SampledFrom([]saga.Outcome{saga.Transient, saga.Aborted}).Draw(t, "compensation_failure")
				} else {
					r.Outcome = saga.OK
					w.compOK[c.Step] = true
				}
			}
			b := branchOf(s, c.Step, c.Op)
			require.True(t, b.InFlight, "state does not know call %+v is in flight", c)
			s, _ = saga.Apply(spec, s, r)
			require.False(t, branchOf(s, c.Step, c.Op).InFlight)
			last = &r

		default:
			require.False(t, wake.IsZero())
			if rapid.Bool().Draw(t, "peek_early") {
				// Nothing new is due before wake: an early Advance dispatches nothing.
				early := now.Add(time.Duration(rapid.Int64Range(0, int64(wake.Sub(now))-1).Draw(t, "early_ns")))
				got, calls, _, again := saga.Advance(spec, s, early)
				require.Empty(t, calls, "Advance at %s, before wake %s", early, wake)
				require.Equal(t, wake, again)
				require.Equal(t, s.Phase, got.Phase)
				s, now = got, early
			}
			now = wake.Add(time.Duration(rapid.IntRange(0, 1000).Draw(t, "oversleep_ms")) * time.Millisecond)
		}
	}
}

func depsDone(s saga.State, deps []int) bool {
	for _, d := range deps {
		if s.Steps[d].Action.Status != saga.StatusSucceeded {
			return false
		}
	}
	return true
}

func branchOf(s saga.State, i int, op saga.Op) saga.Branch {
	if op == saga.OpCompensate {
		return s.Steps[i].Compensate
	}
	return s.Steps[i].Action
}

func (w *world) checkCalls(t *rapid.T, before, next saga.State, calls []saga.Call, now time.Time) {
	if before.Phase.Terminal() || next.Phase.Terminal() {
		require.Empty(t, calls, "calls made in terminal phase %s", next.Phase)
	}
	for _, c := range calls {
		i := c.Step
		require.False(t, w.inFlight(i, c.Op), "call %+v while the same branch is in flight", c)
		prev := branchOf(before, i, c.Op)
		require.False(t, prev.NextAt.After(now), "call %+v at %s before its NextAt %s", c, now, prev.NextAt)
		require.Equal(t, prev.Attempts+1, c.Attempt, "call %+v", c)
		switch c.Op {
		case saga.OpAction:
			require.Equal(t, saga.PhaseRunning, next.Phase, "action %+v outside running", c)
			require.False(t, w.turnedBack, "action %+v after a compensation was dispatched", c)
			require.False(t, w.actionOK[i], "action %+v after it succeeded", c)
			for _, d := range w.deps[i] {
				require.True(t, w.actionOK[d], "action %+v before its dependency %d succeeded", c, d)
			}
			w.actionDispatches[i]++
		case saga.OpCompensate:
			require.Equal(t, saga.PhaseCompensating, next.Phase, "compensation %+v outside compensating", c)
			require.True(t, w.actionDispatches[i] > 0 || w.readyAtLostDispatch[i],
				"compensation %+v of an action never dispatched", c)
			require.False(t, w.compOK[i], "compensation %+v after it succeeded", c)
			require.False(t, w.inFlight(i, saga.OpAction), "compensation %+v while its action is in flight", c)
			for _, d := range w.dependents[i] {
				require.False(t, w.inFlight(d, saga.OpAction), "compensation %+v while dependent %d's action is in flight", c, d)
				if w.mayHaveRun(d) {
					require.True(t, w.compOK[d], "compensation %+v before dependent %d was compensated", c, d)
				}
			}
			w.compDispatches[i]++
			w.turnedBack = true
		default:
			t.Fatalf("call with unknown op: %+v", c)
		}
		w.inflight = append(w.inflight, c)
	}
}

func (w *world) checkTerminal(t *rapid.T, s saga.State, now time.Time) {
	require.Empty(t, w.inflight, "phase %s with calls in flight", s.Phase)
	require.False(t, s.InFlight())
	switch s.Phase {
	case saga.PhaseSucceeded:
		for i, st := range s.Steps {
			require.True(t, w.actionOK[i], "step %d succeeded without an OK", i)
			require.Equal(t, saga.StatusSucceeded, st.Action.Status)
			require.Zero(t, w.compDispatches[i], "step %d compensated in a saga that succeeded", i)
		}
	case saga.PhaseCompensated:
		for i, st := range s.Steps {
			if w.mayHaveRun(i) {
				require.True(t, w.compOK[i], "step %d may have run and was not compensated; state %+v", i, st)
			}
			require.Contains(t, []saga.Status{saga.StatusSucceeded, saga.StatusSkipped}, st.Compensate.Status, "step %d", i)
			require.Equal(t, w.compOK[i], st.Compensate.Status == saga.StatusSucceeded, "step %d", i)
		}
	case saga.PhaseNeedsOperator:
		stuck := slices.ContainsFunc(s.Steps, func(st saga.StepState) bool {
			return st.Compensate.Status != saga.StatusSucceeded && st.Compensate.Attempts >= w.spec.OperatorThreshold
		})
		require.True(t, stuck, "needs an operator with no compensation at the threshold; state %+v", s)
	default:
		t.Fatalf("unknown terminal phase %s", s.Phase)
	}
	// Nothing more happens, however long the engine waits.
	got, calls, _, wake := saga.Advance(w.spec, s, now.Add(24*time.Hour))
	require.Empty(t, calls)
	require.True(t, wake.IsZero())
	require.Equal(t, s.Phase, got.Phase)
}
