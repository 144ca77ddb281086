package saga_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/saga"
)

// t0 is an arbitrary instant; the state machine reads no clock, so tests pick the time.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// step returns a step with a policy generous enough that retries do not get in the way of a
// test that is about something else.
func step(name string, deps ...string) saga.Step {
	return saga.Step{
		Name:           name,
		DependsOn:      deps,
		MaxAttempts:    3,
		InitialBackoff: time.Second,
		MaxBackoff:     8 * time.Second,
	}
}

// act and comp are the calls a test expects Advance to return.
func act(i, attempt int) saga.Call {
	return saga.Call{Step: i, Op: saga.OpAction, Attempt: attempt}
}

func comp(i, attempt int) saga.Call {
	return saga.Call{Step: i, Op: saga.OpCompensate, Attempt: attempt}
}

// driver plays the engine by hand: it holds the state and the clock and keeps every event, so a
// test reads as the sequence of calls and outcomes it describes.
type driver struct {
	t      *testing.T
	spec   saga.Spec
	state  saga.State
	now    time.Time
	jitter float64
	events []saga.Event
}

func newDriver(t *testing.T, spec saga.Spec) *driver {
	t.Helper()
	require.NoError(t, saga.Validate(spec))
	return &driver{t: t, spec: spec, state: saga.New(spec), now: t0, jitter: 0.5}
}

// advance calls Advance and checks that it did not modify the state it was given: the engine
// keeps the old state until the new one is durable.
func (d *driver) advance() ([]saga.Call, time.Time) {
	d.t.Helper()
	before := cloneState(d.state)
	s, calls, evs, wake := saga.Advance(d.spec, d.state, d.now)
	require.Equal(d.t, before, d.state, "Advance modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return calls, wake
}

// expect advances and requires exactly these calls (in any order) and nothing else.
func (d *driver) expect(want ...saga.Call) time.Time {
	d.t.Helper()
	calls, wake := d.advance()
	if len(want) == 0 {
		require.Empty(d.t, calls, "calls at %s in phase %s", d.now, d.state.Phase)
	} else {
		require.ElementsMatch(d.t, want, calls, "calls at %s in phase %s", d.now, d.state.Phase)
	}
	return wake
}

func (d *driver) apply(i int, op saga.Op, o saga.Outcome) []saga.Event {
	d.t.Helper()
	before := cloneState(d.state)
	s, evs := saga.Apply(d.spec, d.state, saga.Result{
		Step: i, Op: op, Outcome: o, Err: fmt.Sprintf("%s %s said %s", d.spec.Steps[i].Name, op, o), At: d.now, Jitter: d.jitter,
	})
	require.Equal(d.t, before, d.state, "Apply modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return evs
}

// hasEvent reports whether an event of this kind about this step ("" for the saga) happened.
func (d *driver) hasEvent(kind, stepName string) bool {
	for _, e := range d.events {
		if e.Kind == kind && e.Step == stepName {
			return true
		}
	}
	return false
}

// cloneState is a deep copy that does not rely on State.Clone, which is under test.
func cloneState(s saga.State) saga.State {
	c := s
	c.Steps = append([]saga.StepState(nil), s.Steps...)
	return c
}

func TestSequentialSuccess(t *testing.T) {
	t.Parallel()
	d := newDriver(t, saga.Spec{Steps: []saga.Step{step("a"), step("b"), step("c")}, OperatorThreshold: 3})

	for i := range 3 {
		wake := d.expect(act(i, 1))
		require.True(t, wake.IsZero(), "no deadline and nothing waiting: no wake")
		require.Equal(t, saga.PhaseRunning, d.state.Phase)
		require.True(t, d.state.InFlight())
		// Nothing else starts while step i is in flight: the steps form a chain.
		d.expect()
		d.apply(i, saga.OpAction, saga.OK)
		require.False(t, d.state.InFlight())
		require.Equal(t, saga.StatusSucceeded, d.state.Steps[i].Action.Status)
	}
	wake := d.expect()
	require.True(t, wake.IsZero())
	require.Equal(t, saga.PhaseSucceeded, d.state.Phase)
	require.True(t, d.state.Phase.Terminal())
	for i, st := range d.state.Steps {
		require.Equal(t, saga.StatusSucceeded, st.Action.Status, "step %d", i)
		require.Equal(t, 1, st.Action.Attempts, "step %d", i)
		require.Equal(t, saga.StatusSkipped, st.Compensate.Status, "step %d", i)
		require.Zero(t, st.Compensate.Attempts, "step %d", i)
	}
	require.Equal(t, "succeeded", d.events[len(d.events)-1].Kind)

	// A terminal saga stays put, whatever the time.
	d.now = d.now.Add(time.Hour)
	d.expect()
	require.Equal(t, saga.PhaseSucceeded, d.state.Phase)
}

func TestAbortedAtEachPosition(t *testing.T) {
	t.Parallel()
	const n = 4
	for k := range n {
		for _, transientFirst := range []bool{false, true} {
			t.Run(fmt.Sprintf("step%d/transient_first=%t", k, transientFirst), func(t *testing.T) {
				t.Parallel()
				steps := make([]saga.Step, n)
				for i := range steps {
					steps[i] = step(fmt.Sprintf("s%d", i))
				}
				d := newDriver(t, saga.Spec{Steps: steps, OperatorThreshold: 3})
				for i := range k {
					d.expect(act(i, 1))
					d.apply(i, saga.OpAction, saga.OK)
				}
				d.expect(act(k, 1))
				attempts := 1
				if transientFirst {
					// The first attempt may have taken effect; the second is refused.
					d.apply(k, saga.OpAction, saga.Transient)
					require.Equal(t, saga.PhaseRunning, d.state.Phase)
					d.now = d.state.Steps[k].Action.NextAt
					d.expect(act(k, 2))
					attempts = 2
				}
				d.apply(k, saga.OpAction, saga.Aborted)
				require.Equal(t, saga.PhaseCompensating, d.state.Phase)
				require.Equal(t, saga.StatusFailed, d.state.Steps[k].Action.Status)
				require.Equal(t, attempts, d.state.Steps[k].Action.Attempts)
				require.Contains(t, d.state.Reason, fmt.Sprintf("step %q aborted", steps[k].Name))
				require.True(t, d.hasEvent("compensating", ""))

				// One compensation at a time, newest first; each Advance must hand out the next
				// one by itself, or an engine that only advances after results would stall.
				var order []int
				if transientFirst {
					order = append(order, k)
				}
				for i := k - 1; i >= 0; i-- {
					order = append(order, i)
				}
				for _, i := range order {
					d.expect(comp(i, 1))
					d.apply(i, saga.OpCompensate, saga.OK)
				}
				d.expect()
				require.Equal(t, saga.PhaseCompensated, d.state.Phase)
				for i, st := range d.state.Steps {
					switch {
					case i < k || (i == k && transientFirst):
						require.Equal(t, saga.StatusSucceeded, st.Compensate.Status, "step %d", i)
						require.Equal(t, 1, st.Compensate.Attempts, "step %d", i)
					default:
						require.Equal(t, saga.StatusSkipped, st.Compensate.Status, "step %d", i)
						require.Zero(t, st.Compensate.Attempts, "step %d", i)
					}
					if i > k {
						require.Equal(t, saga.StatusPending, st.Action.Status, "step %d never ran", i)
						require.Zero(t, st.Action.Attempts, "step %d never ran", i)
					}
				}
				require.Equal(t, "compensated", d.events[len(d.events)-1].Kind)
			})
		}
	}
}

func TestDiamond(t *testing.T) {
	t.Parallel()
	// a; b and c depend on a; d depends on b and c. The listing order must not matter.
	orders := map[string][]string{
		"listed_in_order":    {"a", "b", "c", "d"},
		"listed_in_reverse":  {"d", "c", "b", "a"},
		"listed_interleaved": {"c", "a", "d", "b"},
	}
	deps := map[string][]string{"a": nil, "b": {"a"}, "c": {"a"}, "d": {"b", "c"}}
	for name, order := range orders {
		setup := func(t *testing.T) (*driver, map[string]int) {
			idx := make(map[string]int)
			var steps []saga.Step
			for i, n := range order {
				idx[n] = i
				steps = append(steps, step(n, deps[n]...))
			}
			return newDriver(t, saga.Spec{Steps: steps, OperatorThreshold: 3}), idx
		}

		t.Run(name+"/success", func(t *testing.T) {
			t.Parallel()
			d, ix := setup(t)
			d.expect(act(ix["a"], 1))
			d.apply(ix["a"], saga.OpAction, saga.OK)
			d.expect(act(ix["b"], 1), act(ix["c"], 1))
			d.apply(ix["c"], saga.OpAction, saga.OK)
			d.expect() // d waits for b too
			d.apply(ix["b"], saga.OpAction, saga.OK)
			d.expect(act(ix["d"], 1))
			d.apply(ix["d"], saga.OpAction, saga.OK)
			d.expect()
			require.Equal(t, saga.PhaseSucceeded, d.state.Phase)
		})

		t.Run(name+"/last_aborts", func(t *testing.T) {
			t.Parallel()
			d, ix := setup(t)
			d.expect(act(ix["a"], 1))
			d.apply(ix["a"], saga.OpAction, saga.OK)
			d.expect(act(ix["b"], 1), act(ix["c"], 1))
			d.apply(ix["b"], saga.OpAction, saga.OK)
			d.apply(ix["c"], saga.OpAction, saga.OK)
			d.expect(act(ix["d"], 1))
			d.apply(ix["d"], saga.OpAction, saga.Aborted)
			require.Equal(t, saga.PhaseCompensating, d.state.Phase)

			// b and c are compensated together; a only once both have succeeded.
			d.expect(comp(ix["b"], 1), comp(ix["c"], 1))
			d.apply(ix["b"], saga.OpCompensate, saga.OK)
			d.expect()
			d.apply(ix["c"], saga.OpCompensate, saga.Transient)
			wake := d.expect()
			require.Equal(t, d.state.Steps[ix["c"]].Compensate.NextAt, wake)
			d.now = wake
			d.expect(comp(ix["c"], 2))
			d.apply(ix["c"], saga.OpCompensate, saga.OK)
			d.expect(comp(ix["a"], 1))
			d.apply(ix["a"], saga.OpCompensate, saga.OK)
			d.expect()
			require.Equal(t, saga.PhaseCompensated, d.state.Phase)
			require.Equal(t, saga.StatusSkipped, d.state.Steps[ix["d"]].Compensate.Status)
		})

		t.Run(name+"/branch_aborts_while_sibling_in_flight", func(t *testing.T) {
			t.Parallel()
			d, ix := setup(t)
			d.expect(act(ix["a"], 1))
			d.apply(ix["a"], saga.OpAction, saga.OK)
			d.expect(act(ix["b"], 1), act(ix["c"], 1))
			d.apply(ix["c"], saga.OpAction, saga.Aborted)
			require.Equal(t, saga.PhaseCompensating, d.state.Phase)
			// b's outcome is not known yet: a must wait for it.
			d.expect()
			require.Equal(t, saga.PhaseCompensating, d.state.Phase)
			d.apply(ix["b"], saga.OpAction, saga.OK)
			d.expect(comp(ix["b"], 1))
			d.apply(ix["b"], saga.OpCompensate, saga.OK)
			d.expect(comp(ix["a"], 1))
			d.apply(ix["a"], saga.OpCompensate, saga.OK)
			d.expect()
			require.Equal(t, saga.PhaseCompensated, d.state.Phase)
			require.Equal(t, saga.StatusSkipped, d.state.Steps[ix["c"]].Compensate.Status)
			require.Equal(t, saga.StatusSkipped, d.state.Steps[ix["d"]].Compensate.Status)
			require.Zero(t, d.state.Steps[ix["d"]].Action.Attempts)
		})
	}
}

func TestTransientRetriesHonourNextAt(t *testing.T) {
	t.Parallel()
	a := saga.Step{Name: "a", MaxAttempts: 4, InitialBackoff: time.Second, MaxBackoff: 3 * time.Second}

	t.Run("no_deadline", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, saga.Spec{Steps: []saga.Step{a}, OperatorThreshold: 1})
		// With jitter 0.5 the delay is three quarters of the exponential one, capped at 3s.
		delays := []time.Duration{750 * time.Millisecond, 1500 * time.Millisecond, 2250 * time.Millisecond}
		for i, delay := range delays {
			attempt := i + 1
			d.expect(act(0, attempt))
			d.now = d.now.Add(100 * time.Millisecond)
			evs := d.apply(0, saga.OpAction, saga.Transient)
			require.Equal(t, "branch_retry", evs[0].Kind)
			b := d.state.Steps[0].Action
			require.Equal(t, saga.StatusUnknown, b.Status)
			require.True(t, b.Uncertain)
			require.Equal(t, d.now.Add(delay), b.NextAt, "attempt %d", attempt)
			require.Equal(t, saga.PhaseRunning, d.state.Phase)

			// Before NextAt nothing is dispatched and the engine is told when to come back.
			wake := d.expect()
			require.Equal(t, b.NextAt, wake)
			d.now = b.NextAt.Add(-time.Nanosecond)
			wake = d.expect()
			require.Equal(t, b.NextAt, wake)
			d.now = b.NextAt
		}
		d.expect(act(0, 4))
		d.apply(0, saga.OpAction, saga.OK)
		require.Equal(t, saga.StatusSucceeded, d.state.Steps[0].Action.Status)
		require.True(t, d.state.Steps[0].Action.NextAt.IsZero())
		d.expect()
		require.Equal(t, saga.PhaseSucceeded, d.state.Phase)
	})

	t.Run("deadline_before_next_attempt", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, saga.Spec{Steps: []saga.Step{a}, Deadline: t0.Add(500 * time.Millisecond), OperatorThreshold: 1})
		wake := d.expect(act(0, 1))
		require.Equal(t, t0.Add(500*time.Millisecond), wake, "the deadline is a reason to come back")
		d.apply(0, saga.OpAction, saga.Transient)
		// NextAt is 750ms away, the deadline 500ms: wake for the deadline.
		wake = d.expect()
		require.Equal(t, t0.Add(500*time.Millisecond), wake)
		d.now = wake
		d.expect(comp(0, 1))
		require.Equal(t, saga.PhaseCompensating, d.state.Phase)
	})
}

func TestRetriesExhausted(t *testing.T) {
	t.Parallel()
	for _, max := range []int{1, 2, 3} {
		t.Run(fmt.Sprintf("max_attempts=%d", max), func(t *testing.T) {
			t.Parallel()
			b := step("b")
			b.MaxAttempts = max
			d := newDriver(t, saga.Spec{Steps: []saga.Step{step("a"), b}, OperatorThreshold: 3})
			d.expect(act(0, 1))
			d.apply(0, saga.OpAction, saga.OK)
			for attempt := 1; attempt <= max; attempt++ {
				d.expect(act(1, attempt))
				require.Equal(t, saga.PhaseRunning, d.state.Phase)
				d.apply(1, saga.OpAction, saga.Transient)
				d.now = d.now.Add(time.Minute)
			}
			require.Equal(t, saga.PhaseCompensating, d.state.Phase)
			require.Equal(t, saga.StatusFailed, d.state.Steps[1].Action.Status)
			require.Contains(t, d.state.Reason, fmt.Sprintf(`step "b" failed %d times`, max))
			require.True(t, d.hasEvent("branch_exhausted", "b"))
			// Every transient attempt may have taken effect, a single one included.
			d.expect(comp(1, 1))
			d.apply(1, saga.OpCompensate, saga.OK)
			d.expect(comp(0, 1))
			d.apply(0, saga.OpCompensate, saga.OK)
			d.expect()
			require.Equal(t, saga.PhaseCompensated, d.state.Phase)
		})
	}
}

func TestDeadline(t *testing.T) {
	t.Parallel()
	deadline := t0.Add(10 * time.Second)
	setup := func(t *testing.T) *driver {
		d := newDriver(t, saga.Spec{Steps: []saga.Step{step("a"), step("b"), step("c")}, Deadline: deadline, OperatorThreshold: 3})
		wake := d.expect(act(0, 1))
		require.Equal(t, deadline, wake)
		d.apply(0, saga.OpAction, saga.OK)
		d.expect(act(1, 1))
		d.now = deadline
		d.expect() // a's compensation waits for b's outcome
		require.Equal(t, saga.PhaseCompensating, d.state.Phase)
		require.Contains(t, d.state.Reason, "deadline")
		require.Contains(t, d.state.Reason, "passed")
		require.True(t, d.state.Steps[1].Action.InFlight)
		return d
	}

	t.Run("late_ok_is_compensated", func(t *testing.T) {
		t.Parallel()
		d := setup(t)
		d.apply(1, saga.OpAction, saga.OK)
		require.Equal(t, saga.StatusSucceeded, d.state.Steps[1].Action.Status, "the result is recorded")
		require.Equal(t, saga.PhaseCompensating, d.state.Phase, "and does not resume the saga")
		d.expect(comp(1, 1))
		d.apply(1, saga.OpCompensate, saga.OK)
		d.expect(comp(0, 1))
		d.apply(0, saga.OpCompensate, saga.OK)
		d.expect()
		require.Equal(t, saga.PhaseCompensated, d.state.Phase)
		require.Zero(t, d.state.Steps[2].Action.Attempts, "c never ran")
	})

	t.Run("late_abort_is_not_compensated", func(t *testing.T) {
		t.Parallel()
		d := setup(t)
		d.apply(1, saga.OpAction, saga.Aborted)
		require.Equal(t, saga.StatusFailed, d.state.Steps[1].Action.Status)
		require.Equal(t, saga.PhaseCompensating, d.state.Phase)
		require.Contains(t, d.state.Reason, "deadline", "the first reason to turn back stays")
		d.expect(comp(0, 1))
		d.apply(0, saga.OpCompensate, saga.OK)
		d.expect()
		require.Equal(t, saga.PhaseCompensated, d.state.Phase)
		require.Equal(t, saga.StatusSkipped, d.state.Steps[1].Compensate.Status)
	})

	t.Run("late_transient_is_compensated_not_retried", func(t *testing.T) {
		t.Parallel()
		d := setup(t)
		d.apply(1, saga.OpAction, saga.Transient)
		require.Equal(t, saga.StatusUnknown, d.state.Steps[1].Action.Status)
		d.now = d.now.Add(time.Hour)
		d.expect(comp(1, 1))
		d.apply(1, saga.OpCompensate, saga.OK)
		d.expect(comp(0, 1))
		d.apply(0, saga.OpCompensate, saga.OK)
		d.expect()
		require.Equal(t, saga.PhaseCompensated, d.state.Phase)
		require.Equal(t, 1, d.state.Steps[1].Action.Attempts)
	})

	t.Run("while_waiting_to_retry", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, saga.Spec{Steps: []saga.Step{step("a")}, Deadline: deadline, OperatorThreshold: 3})
		d.expect(act(0, 1))
		d.now = deadline.Add(-100 * time.Millisecond) // the retry would be due after the deadline
		d.apply(0, saga.OpAction, saga.Transient)
		require.True(t, d.state.Steps[0].Action.NextAt.After(deadline))
		wake := d.expect()
		require.Equal(t, deadline, wake)
		d.now = wake
		d.expect(comp(0, 1))
	})
}

func TestCompensationRetries(t *testing.T) {
	t.Parallel()
	d := newDriver(t, saga.Spec{Steps: []saga.Step{step("a"), step("b")}, OperatorThreshold: 5})
	d.expect(act(0, 1))
	d.apply(0, saga.OpAction, saga.OK)
	d.expect(act(1, 1))
	d.apply(1, saga.OpAction, saga.Aborted)

	// Compensations never give up: three failures of any kind, then success.
	failures := []saga.Outcome{saga.Transient, saga.Aborted, saga.Transient}
	for i, o := range failures {
		d.expect(comp(0, i+1))
		d.apply(0, saga.OpCompensate, o)
		c := d.state.Steps[0].Compensate
		require.Equal(t, saga.StatusUnknown, c.Status)
		require.Equal(t, i+1, c.Attempts)
		require.Equal(t, d.now.Add(saga.Backoff(time.Second, 8*time.Second, i+1, d.jitter)), c.NextAt)
		if o == saga.Aborted {
			require.Contains(t, c.LastError, "refused to compensate")
		}
		wake := d.expect()
		require.Equal(t, c.NextAt, wake)
		require.Equal(t, saga.PhaseCompensating, d.state.Phase)
		d.now = wake
	}
	d.expect(comp(0, 4))
	d.apply(0, saga.OpCompensate, saga.OK)
	d.expect()
	require.Equal(t, saga.PhaseCompensated, d.state.Phase)
	require.Equal(t, 4, d.state.Steps[0].Compensate.Attempts)
	require.Empty(t, d.state.Steps[0].Compensate.LastError)
}

func TestNeedsOperator(t *testing.T) {
	t.Parallel()

	t.Run("threshold_reached", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, saga.Spec{Steps: []saga.Step{step("a"), step("b")}, OperatorThreshold: 3})
		d.expect(act(0, 1))
		d.apply(0, saga.OpAction, saga.OK)
		d.expect(act(1, 1))
		d.apply(1, saga.OpAction, saga.Aborted)
		for attempt := 1; attempt <= 3; attempt++ {
			d.expect(comp(0, attempt))
			d.apply(0, saga.OpCompensate, saga.Transient)
			d.now = d.state.Steps[0].Compensate.NextAt
		}
		wake := d.expect()
		require.True(t, wake.IsZero())
		require.Equal(t, saga.PhaseNeedsOperator, d.state.Phase)
		require.True(t, d.state.Phase.Terminal())
		require.Contains(t, d.state.Reason, "a compensation failed 3 times")
		require.Contains(t, d.state.Reason, `step "b" aborted`, "the original reason is kept")
		require.Equal(t, "needs_operator", d.events[len(d.events)-1].Kind)
		d.now = d.now.Add(time.Hour)
		d.expect()
		require.Equal(t, saga.PhaseNeedsOperator, d.state.Phase)
	})

	for _, last := range []saga.Outcome{saga.OK, saga.Transient} {
		t.Run("waits_for_calls_in_flight/"+last.String(), func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, saga.Spec{
				Steps:             []saga.Step{step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c")},
				OperatorThreshold: 2,
			})
			d.expect(act(0, 1))
			d.apply(0, saga.OpAction, saga.OK)
			d.expect(act(1, 1), act(2, 1))
			d.apply(1, saga.OpAction, saga.OK)
			d.apply(2, saga.OpAction, saga.OK)
			d.expect(act(3, 1))
			d.apply(3, saga.OpAction, saga.Aborted)
			d.expect(comp(1, 1), comp(2, 1))
			// b fails twice while c's compensation is still out.
			d.apply(1, saga.OpCompensate, saga.Transient)
			d.now = d.expect()
			d.expect(comp(1, 2))
			d.apply(1, saga.OpCompensate, saga.Aborted)
			wake := d.expect()
			require.True(t, wake.IsZero())
			require.Equal(t, saga.PhaseCompensating, d.state.Phase, "c's compensation is still in flight")
			d.apply(2, saga.OpCompensate, last)
			d.now = d.now.Add(time.Hour)
			d.expect() // neither c retried nor a compensated
			require.Equal(t, saga.PhaseNeedsOperator, d.state.Phase)
			require.False(t, d.state.InFlight())
			require.Zero(t, d.state.Steps[0].Compensate.Attempts)
			require.Equal(t, 1, d.state.Steps[2].Compensate.Attempts)
		})
	}
}

func TestRecover(t *testing.T) {
	t.Parallel()
	deadline := t0.Add(time.Minute)
	spec := saga.Spec{Steps: []saga.Step{step("a"), step("b"), step("c")}, Deadline: deadline, OperatorThreshold: 3}

	// afterA returns a driver whose state is the one persisted after a's success was recorded
	// but before the Advance that dispatched b was.
	afterA := func(t *testing.T) *driver {
		d := newDriver(t, spec)
		d.expect(act(0, 1))
		d.apply(0, saga.OpAction, saga.OK)
		d.state = saga.Recover(spec, d.state)
		require.True(t, d.state.Steps[1].Action.Uncertain, "b was ready: it may have been called")
		require.False(t, d.state.Steps[2].Action.Uncertain, "c was not ready")
		require.False(t, d.state.Steps[0].Action.Uncertain, "a's outcome is known")
		return d
	}

	t.Run("ready_unrecorded_step_compensated_on_turning_back", func(t *testing.T) {
		t.Parallel()
		d := afterA(t)
		d.now = deadline
		d.expect(comp(1, 1))
		d.apply(1, saga.OpCompensate, saga.OK)
		d.expect(comp(0, 1))
		d.apply(0, saga.OpCompensate, saga.OK)
		d.expect()
		require.Equal(t, saga.PhaseCompensated, d.state.Phase)
		require.Equal(t, saga.StatusSkipped, d.state.Steps[2].Compensate.Status)
	})

	t.Run("ready_unrecorded_step_clean_abort_still_compensated", func(t *testing.T) {
		t.Parallel()
		d := afterA(t)
		d.expect(act(1, 1))
		d.apply(1, saga.OpAction, saga.Aborted)
		// This ABORTED answers the second call; the lost first one may have taken effect.
		d.expect(comp(1, 1))
		d.apply(1, saga.OpCompensate, saga.OK)
		d.expect(comp(0, 1))
	})

	t.Run("in_flight_action_retried", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, spec)
		d.expect(act(0, 1))
		d.state = saga.Recover(spec, d.state)
		a := d.state.Steps[0].Action
		require.False(t, a.InFlight)
		require.False(t, d.state.InFlight())
		require.True(t, a.Uncertain)
		require.Equal(t, saga.StatusUnknown, a.Status)
		// The lost call's result cannot be fed back any more.
		evs := d.apply(0, saga.OpAction, saga.OK)
		require.Empty(t, evs)
		require.Equal(t, saga.StatusUnknown, d.state.Steps[0].Action.Status)
		d.expect(act(0, 2))
		d.apply(0, saga.OpAction, saga.Aborted)
		d.expect(comp(0, 1))
	})

	t.Run("in_flight_compensation_retried", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, spec)
		d.expect(act(0, 1))
		d.apply(0, saga.OpAction, saga.OK)
		d.expect(act(1, 1))
		d.apply(1, saga.OpAction, saga.Aborted)
		d.expect(comp(0, 1))
		d.state = saga.Recover(spec, d.state)
		require.Equal(t, saga.PhaseCompensating, d.state.Phase)
		d.expect(comp(0, 2))
		d.apply(0, saga.OpCompensate, saga.OK)
		d.expect()
		require.Equal(t, saga.PhaseCompensated, d.state.Phase)
	})

	t.Run("uncertain_single_attempt_survives_recover", func(t *testing.T) {
		t.Parallel()
		one := spec
		one.Steps = []saga.Step{step("a"), step("b"), step("c")}
		one.Steps[1].MaxAttempts = 1
		d := newDriver(t, one)
		d.expect(act(0, 1))
		d.apply(0, saga.OpAction, saga.OK)
		d.expect(act(1, 1))
		d.apply(1, saga.OpAction, saga.Transient)
		require.Equal(t, saga.PhaseCompensating, d.state.Phase)
		// The process dies before compensating; b's only attempt may have taken effect.
		d.state = saga.Recover(one, d.state)
		d.expect(comp(1, 1))
		d.apply(1, saga.OpCompensate, saga.OK)
		d.expect(comp(0, 1))
	})

	t.Run("terminal_untouched", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, spec)
		for i := range 3 {
			d.expect(act(i, 1))
			d.apply(i, saga.OpAction, saga.OK)
		}
		d.expect()
		require.Equal(t, saga.PhaseSucceeded, d.state.Phase)
		d.state = saga.Recover(spec, d.state)
		d.now = deadline
		d.expect()
		require.Equal(t, saga.PhaseSucceeded, d.state.Phase)
	})
}

func TestUnexpectedResultsIgnored(t *testing.T) {
	t.Parallel()
	d := newDriver(t, saga.Spec{Steps: []saga.Step{step("a"), step("b")}, OperatorThreshold: 3})
	d.expect(act(0, 1))
	inFlight := cloneState(d.state)

	ignored := func(r saga.Result) {
		t.Helper()
		s, evs := saga.Apply(d.spec, d.state, r)
		require.Empty(t, evs, "%+v", r)
		require.Equal(t, d.state, s, "%+v", r)
	}
	for _, r := range []saga.Result{
		{Step: 1, Op: saga.OpAction, Outcome: saga.OK},         // never dispatched
		{Step: 1, Op: saga.OpAction, Outcome: saga.Aborted},    // never dispatched
		{Step: 0, Op: saga.OpCompensate, Outcome: saga.OK},     // the other op of a busy step
		{Step: -1, Op: saga.OpAction, Outcome: saga.OK},        // no such step
		{Step: 2, Op: saga.OpAction, Outcome: saga.OK},         // no such step
		{Step: 0, Op: saga.Op("bogus"), Outcome: saga.Aborted}, // no such op
		{Step: 0, Op: "", Outcome: saga.OK},                    // no op at all
	} {
		ignored(r)
	}
	require.Equal(t, inFlight, d.state)

	d.apply(0, saga.OpAction, saga.OK)
	after := cloneState(d.state)
	// A duplicate delivery, whatever it says, changes nothing.
	for _, o := range []saga.Outcome{saga.OK, saga.Aborted, saga.Transient} {
		ignored(saga.Result{Step: 0, Op: saga.OpAction, Outcome: o, At: d.now})
	}
	require.Equal(t, after, d.state)
	require.Equal(t, saga.PhaseRunning, d.state.Phase)
	d.expect(act(1, 1))
}

func TestValidate(t *testing.T) {
	t.Parallel()
	ok := func(name string, deps ...string) saga.Step { return step(name, deps...) }
	with := func(s saga.Step, f func(*saga.Step)) saga.Step { f(&s); return s }
	cases := []struct {
		name    string
		spec    saga.Spec
		wantErr string
	}{
		{"valid_chain", saga.Spec{Steps: []saga.Step{ok("a"), ok("b")}, OperatorThreshold: 1}, ""},
		{"valid_diamond", saga.Spec{Steps: []saga.Step{ok("d", "b", "c"), ok("b", "a"), ok("c", "a"), ok("a")}, OperatorThreshold: 1}, ""},
		{"empty_steps", saga.Spec{OperatorThreshold: 1}, "steps: at least one step is required"},
		{"empty_name", saga.Spec{Steps: []saga.Step{ok("a"), ok("")}, OperatorThreshold: 1}, "steps[1].name: must not be empty"},
		{"duplicate_name", saga.Spec{Steps: []saga.Step{ok("a"), ok("b"), ok("a")}, OperatorThreshold: 1}, `steps[2].name: "a" duplicates steps[0]`},
		{"unknown_dependency", saga.Spec{Steps: []saga.Step{ok("a"), ok("b", "a", "zz")}, OperatorThreshold: 1}, `steps[1].depends_on: "zz" is not a step of this saga`},
		{"self_dependency", saga.Spec{Steps: []saga.Step{ok("a"), ok("b", "b")}, OperatorThreshold: 1}, `steps[1].depends_on: step "b" depends on itself`},
		{"cycle_of_three", saga.Spec{Steps: []saga.Step{ok("a", "b"), ok("b", "c"), ok("c", "a")}, OperatorThreshold: 1}, "steps.depends_on: dependency cycle a -> b -> c -> a"},
		{"cycle_of_two_behind_an_entry", saga.Spec{Steps: []saga.Step{ok("x", "a"), ok("a", "b"), ok("b", "a")}, OperatorThreshold: 1}, "steps.depends_on: dependency cycle a -> b -> a"},
		{"zero_max_attempts", saga.Spec{Steps: []saga.Step{with(ok("a"), func(s *saga.Step) { s.MaxAttempts = 0 })}, OperatorThreshold: 1}, `steps[0] "a": needs max_attempts >= 1 or a retry window > 0`},
		{"negative_max_attempts", saga.Spec{Steps: []saga.Step{ok("a"), with(ok("b"), func(s *saga.Step) { s.MaxAttempts = -1 })}, OperatorThreshold: 1}, `steps[1] "b": needs max_attempts >= 1 or a retry window > 0`},
		{"window_only", saga.Spec{Steps: []saga.Step{with(ok("a"), func(s *saga.Step) { s.MaxAttempts, s.RetryWindow = 0, time.Minute })}, OperatorThreshold: 1}, ""},
		{"negative_window", saga.Spec{Steps: []saga.Step{with(ok("a"), func(s *saga.Step) { s.RetryWindow = -1 })}, OperatorThreshold: 1}, `steps[0] "a": needs max_attempts >= 1 or a retry window > 0`},
		{"zero_initial_backoff", saga.Spec{Steps: []saga.Step{with(ok("a"), func(s *saga.Step) { s.InitialBackoff = 0 })}, OperatorThreshold: 1}, `steps[0] "a": backoff must satisfy 0 < initial <= max`},
		{"max_below_initial", saga.Spec{Steps: []saga.Step{with(ok("a"), func(s *saga.Step) { s.MaxBackoff = s.InitialBackoff - 1 })}, OperatorThreshold: 1}, `steps[0] "a": backoff must satisfy 0 < initial <= max`},
		{"zero_operator_threshold", saga.Spec{Steps: []saga.Step{ok("a")}}, "operator threshold must be >= 1"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := saga.Validate(tc.spec)
			if tc.wantErr == "" {
				require.NoError(t, err)
				return
			}
			require.EqualError(t, err, tc.wantErr)
		})
	}
}

func TestDeps(t *testing.T) {
	t.Parallel()
	chain := saga.Spec{Steps: []saga.Step{step("a"), step("b"), step("c")}}
	require.Equal(t, [][]int{nil, {0}, {1}}, saga.Deps(chain))
	dag := saga.Spec{Steps: []saga.Step{step("d", "b", "c"), step("b", "a"), step("c", "a"), step("a")}}
	require.Equal(t, [][]int{{1, 2}, {3}, {3}, nil}, saga.Deps(dag))
	// One dependency anywhere turns the chain off: independent steps run in parallel.
	partial := saga.Spec{Steps: []saga.Step{step("a"), step("b"), step("c", "a")}}
	require.Equal(t, [][]int{nil, nil, {0}}, saga.Deps(partial))
}

func TestNeedsCompensation(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		a    saga.Branch
		want bool
	}{
		{"pending", saga.Branch{Status: saga.StatusPending}, false},
		{"pending_uncertain_after_recover", saga.Branch{Status: saga.StatusPending, Uncertain: true}, true},
		{"in_flight", saga.Branch{Status: saga.StatusUnknown, Attempts: 1, InFlight: true}, true},
		{"unknown", saga.Branch{Status: saga.StatusUnknown, Attempts: 1, Uncertain: true}, true},
		{"succeeded", saga.Branch{Status: saga.StatusSucceeded, Attempts: 1}, true},
		{"clean_abort", saga.Branch{Status: saga.StatusFailed, Attempts: 1}, false},
		{"abort_after_transient", saga.Branch{Status: saga.StatusFailed, Attempts: 2, Uncertain: true}, true},
		{"abort_on_second_attempt", saga.Branch{Status: saga.StatusFailed, Attempts: 2}, true},
		{"single_transient_exhausted", saga.Branch{Status: saga.StatusFailed, Attempts: 1, Uncertain: true}, true},
		{"skipped", saga.Branch{Status: saga.StatusSkipped}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tc.want, saga.NeedsCompensation(saga.StepState{Action: tc.a}))
		})
	}
}

func TestNewAndTerminal(t *testing.T) {
	t.Parallel()
	s := saga.New(saga.Spec{Steps: []saga.Step{step("a"), step("b")}, OperatorThreshold: 1})
	require.Equal(t, saga.PhaseRunning, s.Phase)
	require.Len(t, s.Steps, 2)
	for _, st := range s.Steps {
		require.Equal(t, saga.Branch{Status: saga.StatusPending}, st.Action)
		require.Equal(t, saga.Branch{Status: saga.StatusPending}, st.Compensate)
	}
	for p, want := range map[saga.Phase]bool{
		saga.PhaseRunning: false, saga.PhaseCompensating: false,
		saga.PhaseSucceeded: true, saga.PhaseCompensated: true, saga.PhaseNeedsOperator: true,
	} {
		require.Equal(t, want, p.Terminal(), string(p))
	}
	require.Equal(t, "ok", saga.OK.String())
	require.Equal(t, "aborted", saga.Aborted.String())
	require.Equal(t, "transient", saga.Transient.String())
	require.Equal(t, "outcome(0)", saga.Outcome(0).String())
}
