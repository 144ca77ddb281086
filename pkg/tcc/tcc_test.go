package tcc_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/tcc"
)

// t0 is an arbitrary instant; the state machine reads no clock, so tests pick the time.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// policy is a branch retry policy slow enough that a test about something else is not disturbed
// by retries coming due.
func policy(name string) tcc.BranchPolicy {
	return tcc.BranchPolicy{Name: name, InitialBackoff: time.Second, MaxBackoff: 8 * time.Second}
}

// newSpec returns a spec of n branches named b0, b1, ...
func newSpec(n int, deadline time.Time, threshold int) tcc.Spec {
	spec := tcc.Spec{Deadline: deadline, OperatorThreshold: threshold}
	for i := range n {
		spec.Branches = append(spec.Branches, policy(fmt.Sprintf("b%d", i)))
	}
	return spec
}

// allCalls is one call of op per branch, the way a decision fans out.
func allCalls(n int, op tcc.Op, attempt int) []tcc.Call {
	calls := make([]tcc.Call, n)
	for i := range calls {
		calls[i] = tcc.Call{Branch: i, Op: op, Attempt: attempt}
	}
	return calls
}

// driver plays the engine by hand: it holds the state and the clock and keeps every event, so a
// test reads as the sequence of decisions, calls and outcomes it describes.
type driver struct {
	t      *testing.T
	spec   tcc.Spec
	state  tcc.State
	now    time.Time
	jitter float64
	events []tcc.Event
}

func newDriver(t *testing.T, spec tcc.Spec) *driver {
	t.Helper()
	return &driver{t: t, spec: spec, state: tcc.New(spec), now: t0, jitter: 0.5}
}

// advance calls Advance and checks that it did not modify the state it was given: the engine
// keeps the old state until the new one is durable.
func (d *driver) advance() ([]tcc.Call, time.Time) {
	d.t.Helper()
	before := cloneState(d.state)
	s, calls, evs, wake := tcc.Advance(d.spec, d.state, d.now)
	require.Equal(d.t, before, d.state, "Advance modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return calls, wake
}

// expect advances and requires exactly these calls (in any order) and nothing else.
func (d *driver) expect(want ...tcc.Call) time.Time {
	d.t.Helper()
	calls, wake := d.advance()
	if len(want) == 0 {
		require.Empty(d.t, calls, "calls at %s in phase %s", d.now, d.state.Phase)
	} else {
		require.ElementsMatch(d.t, want, calls, "calls at %s in phase %s", d.now, d.state.Phase)
	}
	return wake
}

// result is the outcome of branch i's op observed now, with an error message naming both.
func (d *driver) result(i int, op tcc.Op, o saga.Outcome) tcc.Result {
	return tcc.Result{Branch: i, Op: op, Outcome: o, Err: fmt.Sprintf("b%d %s said %s", i, op, o), At: d.now, Jitter: d.jitter}
}

func (d *driver) apply(r tcc.Result) []tcc.Event {
	d.t.Helper()
	before := cloneState(d.state)
	s, evs := tcc.Apply(d.spec, d.state, r)
	require.Equal(d.t, before, d.state, "Apply modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return evs
}

func (d *driver) answer(i int, op tcc.Op, o saga.Outcome) []tcc.Event {
	d.t.Helper()
	return d.apply(d.result(i, op, o))
}

// decide applies the initiator's decision and keeps the new state even when it is refused, so
// that a test can check the refusal left it as it was.
func (d *driver) decide(commit bool, reason string) error {
	d.t.Helper()
	before := cloneState(d.state)
	s, evs, err := tcc.Decide(d.state, commit, reason)
	require.Equal(d.t, before, d.state, "Decide modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return err
}

func (d *driver) branch(i int, op tcc.Op) tcc.Branch {
	if op == tcc.OpCancel {
		return d.state.Branches[i].Cancel
	}
	return d.state.Branches[i].Confirm
}

func (d *driver) lastEvent() tcc.Event {
	d.t.Helper()
	require.NotEmpty(d.t, d.events)
	return d.events[len(d.events)-1]
}

// cloneState is a deep copy that does not rely on State.Clone, which is under test.
func cloneState(s tcc.State) tcc.State {
	c := s
	c.Branches = slices.Clone(s.Branches) // keeps nil and empty apart, as require.Equal does
	return c
}

// ops names the two directions a decided transaction can take, for tests that hold for both.
var ops = []struct {
	name   string
	commit bool
	op     tcc.Op
	other  tcc.Op
	final  tcc.Phase
	busy   tcc.Phase
	reason string // what Decide is given, and what State.Reason should say afterwards
}{
	{"commit", true, tcc.OpConfirm, tcc.OpCancel, tcc.PhaseConfirmed, tcc.PhaseConfirming, ""},
	{"rollback", false, tcc.OpCancel, tcc.OpConfirm, tcc.PhaseCancelled, tcc.PhaseCancelling, "the basket was emptied"},
}

func TestNewAndTerminal(t *testing.T) {
	t.Parallel()
	s := tcc.New(newSpec(3, t0.Add(time.Minute), 3))
	require.Equal(t, tcc.PhaseTrying, s.Phase)
	require.Empty(t, s.Reason)
	require.Len(t, s.Branches, 3)
	for i, b := range s.Branches {
		require.Equal(t, tcc.Branch{Status: saga.StatusPending}, b.Confirm, "branch %d", i)
		require.Equal(t, tcc.Branch{Status: saga.StatusPending}, b.Cancel, "branch %d", i)
	}
	empty := tcc.New(tcc.Spec{})
	require.Equal(t, tcc.PhaseTrying, empty.Phase)
	require.Empty(t, empty.Branches)

	for p, want := range map[tcc.Phase]bool{
		tcc.PhaseTrying: false, tcc.PhaseConfirming: false, tcc.PhaseCancelling: false,
		tcc.PhaseConfirmed: true, tcc.PhaseCancelled: true, tcc.PhaseNeedsOperator: true,
	} {
		require.Equal(t, want, p.Terminal(), string(p))
	}
}

func TestClone(t *testing.T) {
	t.Parallel()
	s := tcc.New(newSpec(2, time.Time{}, 1))
	c := s.Clone()
	c.Branches[0].Confirm.Attempts = 7
	c.Branches[1].Cancel.InFlight = true
	c.Phase = tcc.PhaseConfirming
	require.Equal(t, tcc.New(newSpec(2, time.Time{}, 1)), s, "a clone shares nothing with its original")
}

func TestTryingUntilDeadline(t *testing.T) {
	t.Parallel()
	deadline := t0.Add(30 * time.Second)
	cases := []struct {
		name     string
		branches int
		deadline time.Time
		nows     []time.Time
	}{
		{"before_deadline", 3, deadline, []time.Time{t0, t0.Add(10 * time.Second), deadline.Add(-time.Nanosecond)}},
		{"before_deadline_no_branches", 0, deadline, []time.Time{t0, deadline.Add(-time.Nanosecond)}},
		// Without a deadline only the initiator can end it; nothing is ever due on its own.
		{"no_deadline", 2, time.Time{}, []time.Time{t0, t0.Add(time.Hour), t0.Add(1000 * time.Hour)}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(tc.branches, tc.deadline, 3))
			for _, now := range tc.nows {
				d.now = now
				wake := d.expect()
				require.Equal(t, tc.deadline, wake, "while trying, the next thing due is the deadline")
				require.Equal(t, tcc.PhaseTrying, d.state.Phase)
				require.Empty(t, d.state.Reason)
				require.Len(t, d.state.Branches, tc.branches)
				for i, b := range d.state.Branches {
					require.Equal(t, tcc.New(d.spec).Branches[i], b, "branch %d: nothing changes while trying", i)
				}
			}
			require.Empty(t, d.events)
		})
	}
}

func TestDeadlineCancels(t *testing.T) {
	t.Parallel()
	// The reason names the deadline in UTC, whatever zone the engine keeps it in.
	deadline := t0.Add(30 * time.Second).In(time.FixedZone("UTC+5", 5*3600))
	const wantReason = "the initiator did not commit before the deadline 2030-01-02T03:04:35Z"
	for _, n := range []int{0, 1, 3} {
		for _, late := range []time.Duration{0, time.Nanosecond, time.Hour} {
			t.Run(fmt.Sprintf("branches=%d/late=%s", n, late), func(t *testing.T) {
				t.Parallel()
				d := newDriver(t, newSpec(n, deadline, 3))
				d.now = deadline.Add(late)
				// The turn and the cancels are one Advance: nothing waits for a second look.
				wake := d.expect(allCalls(n, tcc.OpCancel, 1)...)
				require.True(t, wake.IsZero(), "every cancel is in flight")
				require.Equal(t, wantReason, d.state.Reason)
				require.Equal(t, tcc.Event{Kind: "cancelling", Detail: wantReason}, d.events[0])
				if n == 0 {
					require.Equal(t, tcc.PhaseCancelled, d.state.Phase, "nothing to cancel: cancelled at once")
					require.Equal(t, []tcc.Event{{Kind: "cancelling", Detail: wantReason}, {Kind: "cancelled"}}, d.events)
				} else {
					require.Equal(t, tcc.PhaseCancelling, d.state.Phase)
					for i := range n {
						d.answer(i, tcc.OpCancel, saga.OK)
					}
					d.expect()
					require.Equal(t, tcc.PhaseCancelled, d.state.Phase)
					require.Equal(t, tcc.Event{Kind: "cancelled"}, d.lastEvent())
				}
				require.Equal(t, wantReason, d.state.Reason, "the reason survives the end")
				for i, b := range d.state.Branches {
					require.Equal(t, tcc.Branch{Status: saga.StatusPending}, b.Confirm, "branch %d: no confirm after a timeout", i)
				}

				// The initiator's commit arrives too late and is told why; a rollback agrees.
				err := d.decide(true, "")
				require.ErrorIs(t, err, tcc.ErrCancelled)
				require.NotErrorIs(t, err, tcc.ErrConfirmed)
				require.ErrorContains(t, err, wantReason)
				require.NoError(t, d.decide(false, "too late anyway"))
				require.Equal(t, wantReason, d.state.Reason, "a later rollback does not rewrite the reason")
			})
		}
	}
}

func TestDecideFromTrying(t *testing.T) {
	t.Parallel()
	for _, o := range ops {
		t.Run(o.name, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(2, t0.Add(time.Minute), 3))
			require.NoError(t, d.decide(o.commit, o.reason))
			require.Equal(t, o.busy, d.state.Phase)
			require.Equal(t, o.reason, d.state.Reason)
			want := tcc.Event{Kind: "confirming", Detail: "initiator committed"}
			if !o.commit {
				want = tcc.Event{Kind: "cancelling", Detail: o.reason}
			}
			require.Equal(t, []tcc.Event{want}, d.events)
			// Deciding dispatches nothing by itself: the engine advances after recording it.
			require.Equal(t, tcc.New(d.spec).Branches, d.state.Branches)
			wake := d.expect(allCalls(2, o.op, 1)...)
			require.True(t, wake.IsZero(), "the deadline no longer matters once decided")
		})
	}
}

// reach drives a transaction of two branches to a phase by the path the engine would take, so
// that decisions are checked against states the machine really produces.
func reach(t *testing.T, name string) *driver {
	t.Helper()
	deadline := t0.Add(time.Minute)
	d := newDriver(t, newSpec(2, deadline, 1))
	finish := func(op tcc.Op) {
		d.expect(allCalls(2, op, 1)...)
		d.answer(0, op, saga.OK)
		d.answer(1, op, saga.OK)
		d.expect()
	}
	stick := func(op tcc.Op) {
		d.expect(allCalls(2, op, 1)...)
		d.answer(0, op, saga.OK)
		d.answer(1, op, saga.Transient) // threshold 1: one failure calls the operator
		d.expect()
	}
	switch name {
	case "trying":
	case "confirming":
		require.NoError(t, d.decide(true, ""))
	case "confirming_in_flight":
		require.NoError(t, d.decide(true, ""))
		d.expect(allCalls(2, tcc.OpConfirm, 1)...)
	case "confirmed":
		require.NoError(t, d.decide(true, ""))
		finish(tcc.OpConfirm)
	case "cancelling":
		require.NoError(t, d.decide(false, "the basket was emptied"))
	case "cancelling_in_flight":
		require.NoError(t, d.decide(false, "the basket was emptied"))
		d.expect(allCalls(2, tcc.OpCancel, 1)...)
	case "cancelled":
		require.NoError(t, d.decide(false, "the basket was emptied"))
		finish(tcc.OpCancel)
	case "timed_out":
		d.now = deadline
		d.expect(allCalls(2, tcc.OpCancel, 1)...)
	case "needs_operator_after_confirm":
		require.NoError(t, d.decide(true, ""))
		stick(tcc.OpConfirm)
	case "needs_operator_after_cancel":
		require.NoError(t, d.decide(false, "the basket was emptied"))
		stick(tcc.OpCancel)
	default:
		t.Fatalf("no way to reach %q", name)
	}
	d.events = nil
	return d
}

func TestDecideAgain(t *testing.T) {
	t.Parallel()
	cases := []struct {
		from    string
		commit  bool
		wantErr error  // nil: a no-op
		wantMsg string // part of the error that says why
	}{
		// The same decision twice (a retried request) changes nothing.
		{"confirming", true, nil, ""},
		{"confirming_in_flight", true, nil, ""},
		{"confirmed", true, nil, ""},
		{"cancelling", false, nil, ""},
		{"cancelling_in_flight", false, nil, ""},
		{"cancelled", false, nil, ""},
		{"timed_out", false, nil, ""},
		// The other decision is refused, saying what was decided and why.
		{"confirming", false, tcc.ErrConfirmed, "confirming"},
		{"confirming_in_flight", false, tcc.ErrConfirmed, "confirming"},
		{"confirmed", false, tcc.ErrConfirmed, "confirmed"},
		{"cancelling", true, tcc.ErrCancelled, "the basket was emptied"},
		{"cancelling_in_flight", true, tcc.ErrCancelled, "the basket was emptied"},
		{"cancelled", true, tcc.ErrCancelled, "the basket was emptied"},
		{"timed_out", true, tcc.ErrCancelled, "the initiator did not commit before the deadline"},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/commit=%t", tc.from, tc.commit), func(t *testing.T) {
			t.Parallel()
			d := reach(t, tc.from)
			before := cloneState(d.state)
			err := d.decide(tc.commit, "changed my mind")
			require.Equal(t, before, d.state, "a repeated or refused decision changes nothing")
			require.Empty(t, d.events)
			if tc.wantErr == nil {
				require.NoError(t, err)
				return
			}
			require.ErrorIs(t, err, tc.wantErr)
			wrong := tcc.ErrCancelled
			if tc.wantErr == tcc.ErrCancelled {
				wrong = tcc.ErrConfirmed
			}
			require.NotErrorIs(t, err, wrong)
			require.ErrorContains(t, err, tc.wantMsg)
			require.NotContains(t, err.Error(), "changed my mind", "the refused request's reason is not the transaction's")
		})
	}
}

// A transaction waiting for an operator got there by confirming or by cancelling; a decision
// that arrives then must not claim the opposite of what happened.
func TestDecideNeedsOperator(t *testing.T) {
	t.Parallel()
	cases := []struct {
		from   string
		commit bool
		reason string
		wrong  error
	}{
		{"needs_operator_after_confirm", true, "a confirm failed 1 times", tcc.ErrCancelled},
		{"needs_operator_after_confirm", false, "a confirm failed 1 times", tcc.ErrCancelled},
		{"needs_operator_after_cancel", true, "a cancel failed 1 times: the basket was emptied", tcc.ErrConfirmed},
		{"needs_operator_after_cancel", false, "a cancel failed 1 times: the basket was emptied", tcc.ErrConfirmed},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%s/commit=%t", tc.from, tc.commit), func(t *testing.T) {
			t.Parallel()
			d := reach(t, tc.from)
			require.Equal(t, tcc.PhaseNeedsOperator, d.state.Phase)
			before := cloneState(d.state)
			err := d.decide(tc.commit, "")
			require.Equal(t, before, d.state)
			require.Empty(t, d.events)
			require.Error(t, err, "the operator decides now, not the initiator")
			require.NotErrorIs(t, err, tc.wrong)
			require.ErrorContains(t, err, "needs an operator")
			require.ErrorContains(t, err, tc.reason)
		})
	}
}

func TestDecisionDispatchesEveryBranchInParallel(t *testing.T) {
	t.Parallel()
	const n = 4
	for _, o := range ops {
		t.Run(o.name, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(n, t0.Add(time.Minute), 3))
			require.NoError(t, d.decide(o.commit, o.reason))
			wake := d.expect(allCalls(n, o.op, 1)...)
			require.True(t, wake.IsZero(), "everything is in flight")
			for i := range n {
				b := d.branch(i, o.op)
				require.True(t, b.InFlight, "branch %d", i)
				require.Equal(t, saga.StatusUnknown, b.Status, "branch %d: called, outcome not known", i)
				require.Equal(t, 1, b.Attempts, "branch %d", i)
				require.Equal(t, tcc.Branch{Status: saga.StatusPending}, d.branch(i, o.other), "branch %d: the other op is never touched", i)
			}
			d.expect() // nothing twice while in flight

			// Results land in any order; the transaction ends with the last one.
			for k, i := range []int{2, 0, 3, 1} {
				d.now = d.now.Add(10 * time.Millisecond)
				evs := d.answer(i, o.op, saga.OK)
				require.Equal(t, []tcc.Event{{Kind: "branch_succeeded", Step: fmt.Sprintf("b%d", i), Op: saga.Op(o.op), Detail: "attempt 1"}}, evs)
				b := d.branch(i, o.op)
				require.Equal(t, saga.StatusSucceeded, b.Status)
				require.False(t, b.InFlight)
				require.Empty(t, b.LastError)
				require.True(t, b.NextAt.IsZero())
				wake := d.expect()
				require.True(t, wake.IsZero())
				if k < n-1 {
					require.Equal(t, o.busy, d.state.Phase)
				}
			}
			require.Equal(t, o.final, d.state.Phase)
			require.True(t, d.state.Phase.Terminal())
			require.Equal(t, tcc.Event{Kind: string(o.final)}, d.lastEvent())
			require.Equal(t, o.reason, d.state.Reason)

			// A finished transaction stays put, however late it is looked at.
			d.now = d.now.Add(24 * time.Hour)
			wake = d.expect()
			require.True(t, wake.IsZero())
			require.Equal(t, o.final, d.state.Phase)
		})
	}
}

func TestZeroBranches(t *testing.T) {
	t.Parallel()
	deadline := t0.Add(time.Minute)
	cases := []struct {
		name       string
		decide     func(d *driver)
		wantPhase  tcc.Phase
		wantEvents []tcc.Event
	}{
		{"commit", func(d *driver) { require.NoError(d.t, d.decide(true, "")) }, tcc.PhaseConfirmed,
			[]tcc.Event{{Kind: "confirming", Detail: "initiator committed"}, {Kind: "confirmed"}}},
		{"rollback", func(d *driver) { require.NoError(d.t, d.decide(false, "no")) }, tcc.PhaseCancelled,
			[]tcc.Event{{Kind: "cancelling", Detail: "no"}, {Kind: "cancelled"}}},
		{"deadline", func(d *driver) { d.now = deadline }, tcc.PhaseCancelled,
			[]tcc.Event{{Kind: "cancelling", Detail: "the initiator did not commit before the deadline 2030-01-02T03:05:05Z"}, {Kind: "cancelled"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(0, deadline, 3))
			tc.decide(d)
			wake := d.expect()
			require.True(t, wake.IsZero())
			require.Equal(t, tc.wantPhase, d.state.Phase, "nothing to call: done in the first Advance")
			require.Equal(t, tc.wantEvents, d.events)
		})
	}
}

func TestRetriesHonourNextAt(t *testing.T) {
	t.Parallel()
	for _, o := range ops {
		t.Run(o.name+"/one_branch", func(t *testing.T) {
			t.Parallel()
			spec := newSpec(1, t0.Add(time.Minute), 10)
			spec.Branches[0].MaxBackoff = 3 * time.Second
			d := newDriver(t, spec)
			require.NoError(t, d.decide(o.commit, o.reason))
			// With jitter 0.5 the delay is three quarters of the exponential one, capped at 3s.
			delays := []time.Duration{750 * time.Millisecond, 1500 * time.Millisecond, 2250 * time.Millisecond, 2250 * time.Millisecond}
			for k, delay := range delays {
				attempt := k + 1
				d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: attempt})
				d.now = d.now.Add(100 * time.Millisecond)
				r := d.result(0, o.op, saga.Transient)
				evs := d.apply(r)
				require.Equal(t, []tcc.Event{{Kind: "branch_retry", Step: "b0", Op: saga.Op(o.op), Detail: fmt.Sprintf("attempt %d: %s", attempt, r.Err)}}, evs)
				b := d.branch(0, o.op)
				require.Equal(t, saga.StatusUnknown, b.Status)
				require.Equal(t, attempt, b.Attempts)
				require.Equal(t, r.Err, b.LastError)
				require.False(t, b.InFlight)
				require.Equal(t, d.now.Add(delay), b.NextAt, "attempt %d", attempt)
				require.Equal(t, o.busy, d.state.Phase, "%s never gives up", o.op)

				// Before NextAt nothing is dispatched and the engine is told when to come back.
				wake := d.expect()
				require.Equal(t, b.NextAt, wake)
				d.now = b.NextAt.Add(-time.Nanosecond)
				wake = d.expect()
				require.Equal(t, b.NextAt, wake)
				d.now = b.NextAt
			}
			d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: len(delays) + 1})
			d.answer(0, o.op, saga.OK)
			b := d.branch(0, o.op)
			require.Equal(t, saga.StatusSucceeded, b.Status)
			require.Empty(t, b.LastError, "success clears the last error")
			require.True(t, b.NextAt.IsZero())
			d.expect()
			require.Equal(t, o.final, d.state.Phase)
		})

		t.Run(o.name+"/wake_is_the_earliest_retry", func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(3, t0.Add(time.Minute), 10))
			require.NoError(t, d.decide(o.commit, o.reason))
			d.expect(allCalls(3, o.op, 1)...)
			// b0 fails first but with more jitter; b1 fails later and is due earlier.
			d.jitter = 0.9
			d.answer(0, o.op, saga.Transient) // due at t0 + 950ms
			d.now = t0.Add(200 * time.Millisecond)
			d.jitter = 0
			d.answer(1, o.op, saga.Transient) // due at t0 + 700ms
			require.Equal(t, t0.Add(950*time.Millisecond), d.branch(0, o.op).NextAt)
			require.Equal(t, t0.Add(700*time.Millisecond), d.branch(1, o.op).NextAt)

			wake := d.expect() // b2 is still in flight, neither retry is due
			require.Equal(t, t0.Add(700*time.Millisecond), wake)
			d.now = wake
			wake = d.expect(tcc.Call{Branch: 1, Op: o.op, Attempt: 2})
			require.Equal(t, t0.Add(950*time.Millisecond), wake)
			d.now = wake.Add(time.Second) // a late wake-up still dispatches what is due
			wake = d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 2})
			require.True(t, wake.IsZero(), "everything left is in flight")
			for i := range 3 {
				d.answer(i, o.op, saga.OK)
			}
			d.expect()
			require.Equal(t, o.final, d.state.Phase)
		})
	}
}

// A call refused locally (open breaker, no concurrency slot) never reached the participant: it
// is not an attempt, counts toward no threshold, and is tried again after a backoff.
func TestNotSentIsNotAnAttempt(t *testing.T) {
	t.Parallel()
	for _, o := range ops {
		for _, outcome := range []saga.Outcome{saga.Transient, saga.OK, saga.Aborted} {
			t.Run(fmt.Sprintf("%s/first_attempt/%s", o.name, outcome), func(t *testing.T) {
				t.Parallel()
				spec := newSpec(1, t0.Add(time.Minute), 1) // one real failure would call the operator
				spec.Branches[0].InitialBackoff, spec.Branches[0].MaxBackoff = 100*time.Millisecond, time.Second
				d := newDriver(t, spec)
				require.NoError(t, d.decide(o.commit, o.reason))
				for range 5 {
					d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 1})
					r := d.result(0, o.op, outcome)
					r.NotSent, r.Err = true, "circuit breaker is open"
					require.Empty(t, d.apply(r), "nothing happened that the history should show")
					require.Equal(t, tcc.Branch{
						Status: saga.StatusPending,
						NextAt: d.now.Add(saga.Backoff(100*time.Millisecond, time.Second, 1, d.jitter)),
					}, d.branch(0, o.op), "back to never called, with a backoff")
					wake := d.expect()
					require.Equal(t, o.busy, d.state.Phase, "a call never sent must not reach the operator threshold")
					require.Equal(t, d.branch(0, o.op).NextAt, wake)
					d.now = wake
				}
				d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 1})
				d.answer(0, o.op, saga.OK)
				d.expect()
				require.Equal(t, o.final, d.state.Phase)
				require.Equal(t, 1, d.branch(0, o.op).Attempts)
			})
		}

		t.Run(o.name+"/after_a_real_attempt", func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(1, t0.Add(time.Minute), 3))
			require.NoError(t, d.decide(o.commit, o.reason))
			d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 1})
			first := d.result(0, o.op, saga.Transient)
			d.apply(first)
			d.now = d.branch(0, o.op).NextAt
			for range 3 {
				d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 2})
				r := d.result(0, o.op, saga.Transient)
				r.NotSent = true
				require.Empty(t, d.apply(r))
				b := d.branch(0, o.op)
				require.Equal(t, 1, b.Attempts, "only the call that was sent counts")
				require.Equal(t, saga.StatusUnknown, b.Status, "the first call may have taken effect")
				require.Equal(t, first.Err, b.LastError, "the participant's last word is kept")
				require.Equal(t, d.now.Add(saga.Backoff(time.Second, 8*time.Second, 2, d.jitter)), b.NextAt)
				d.now = d.expect()
			}
			d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 2})
			d.answer(0, o.op, saga.OK)
			d.expect()
			require.Equal(t, o.final, d.state.Phase)
		})
	}
}

// Confirm and cancel must not refuse: the try reserved what they need. A refusal is a bug or
// an outage on the participant's side, so it is retried like any failure, and says so.
func TestAbortedIsRetried(t *testing.T) {
	t.Parallel()
	for _, o := range ops {
		t.Run(o.name, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(2, t0.Add(time.Minute), 5))
			require.NoError(t, d.decide(o.commit, o.reason))
			d.expect(allCalls(2, o.op, 1)...)
			d.answer(1, o.op, saga.OK)
			r := d.result(0, o.op, saga.Aborted)
			r.Err = "insufficient funds"
			evs := d.apply(r)
			msg := fmt.Sprintf("participant refused to %s (ABORTED): insufficient funds", o.op)
			require.Equal(t, []tcc.Event{{Kind: "branch_retry", Step: "b0", Op: saga.Op(o.op), Detail: "attempt 1: " + msg}}, evs)
			b := d.branch(0, o.op)
			require.Equal(t, saga.StatusUnknown, b.Status, "a refusal is not a final answer")
			require.Equal(t, msg, b.LastError)
			require.Equal(t, d.now.Add(saga.Backoff(time.Second, 8*time.Second, 1, d.jitter)), b.NextAt)

			wake := d.expect()
			require.Equal(t, o.busy, d.state.Phase, "ABORTED does not turn the decision around")
			require.Equal(t, b.NextAt, wake)
			for i := range 2 {
				require.Zero(t, d.branch(i, o.other).Attempts, "branch %d: no %s after a refused %s", i, o.other, o.op)
			}
			d.now = wake
			d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 2})
			d.answer(0, o.op, saga.OK)
			d.expect()
			require.Equal(t, o.final, d.state.Phase)
		})
	}
}

func TestNeedsOperator(t *testing.T) {
	t.Parallel()
	for _, o := range ops {
		wantReason := fmt.Sprintf("a %s failed 3 times: %s", o.op, o.reason)

		t.Run(o.name+"/threshold_reached", func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(2, t0.Add(time.Minute), 3))
			require.NoError(t, d.decide(o.commit, o.reason))
			d.expect(allCalls(2, o.op, 1)...)
			d.answer(1, o.op, saga.OK)
			for attempt, outcome := range []saga.Outcome{saga.Transient, saga.Aborted, saga.Transient} {
				if attempt > 0 {
					d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: attempt + 1})
				}
				d.answer(0, o.op, outcome)
				if attempt < 2 {
					require.Equal(t, o.busy, d.state.Phase)
					d.now = d.branch(0, o.op).NextAt
				}
			}
			wake := d.expect()
			require.True(t, wake.IsZero(), "nothing happens on its own any more")
			require.Equal(t, tcc.PhaseNeedsOperator, d.state.Phase)
			require.True(t, d.state.Phase.Terminal())
			require.Equal(t, wantReason, d.state.Reason)
			require.Equal(t, tcc.Event{Kind: "needs_operator", Detail: wantReason}, d.lastEvent())
			require.Equal(t, 3, d.branch(0, o.op).Attempts)

			d.now = d.now.Add(24 * time.Hour)
			d.expect()
			require.Equal(t, tcc.PhaseNeedsOperator, d.state.Phase)
			require.Equal(t, wantReason, d.state.Reason, "the reason is not prefixed again")
		})

		t.Run(o.name+"/success_on_the_last_attempt", func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(1, t0.Add(time.Minute), 2))
			require.NoError(t, d.decide(o.commit, o.reason))
			d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 1})
			d.answer(0, o.op, saga.Transient)
			d.now = d.branch(0, o.op).NextAt
			d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 2})
			d.answer(0, o.op, saga.OK)
			d.expect()
			require.Equal(t, o.final, d.state.Phase, "a success at the threshold is a success")
		})

		for _, last := range []saga.Outcome{saga.OK, saga.Transient, saga.Aborted} {
			t.Run(fmt.Sprintf("%s/waits_for_calls_in_flight/%s", o.name, last), func(t *testing.T) {
				t.Parallel()
				d := newDriver(t, newSpec(3, t0.Add(time.Minute), 2))
				require.NoError(t, d.decide(o.commit, o.reason))
				d.expect(allCalls(3, o.op, 1)...)
				// b0 fails twice while b1 and b2 are still out.
				d.answer(0, o.op, saga.Transient)
				d.now = d.expect()
				d.expect(tcc.Call{Branch: 0, Op: o.op, Attempt: 2})
				d.answer(0, o.op, saga.Aborted)
				wake := d.expect()
				require.True(t, wake.IsZero(), "only results can move it now")
				require.Equal(t, o.busy, d.state.Phase, "calls are still in flight")

				// b1 fails; its retry comes due but is not made once an operator is needed.
				d.answer(1, o.op, saga.Transient)
				d.now = d.branch(1, o.op).NextAt.Add(time.Hour)
				wake = d.expect()
				require.True(t, wake.IsZero())
				require.Equal(t, o.busy, d.state.Phase, "b2 is still in flight")

				d.answer(2, o.op, last)
				d.expect()
				require.Equal(t, tcc.PhaseNeedsOperator, d.state.Phase)
				require.Equal(t, fmt.Sprintf("a %s failed 2 times: %s", o.op, o.reason), d.state.Reason)
				require.Equal(t, 1, d.branch(1, o.op).Attempts, "b1 not retried")
				for i := range 3 {
					require.False(t, d.branch(i, o.op).InFlight)
					require.Zero(t, d.branch(i, o.other).Attempts)
				}
			})
		}
	}
}

func TestUnexpectedResultsIgnored(t *testing.T) {
	t.Parallel()
	for _, o := range ops {
		t.Run(o.name, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(2, t0.Add(time.Minute), 3))
			ignored := func(r tcc.Result) {
				t.Helper()
				s, evs := tcc.Apply(d.spec, d.state, r)
				require.Empty(t, evs, "%+v", r)
				require.Equal(t, d.state, s, "%+v", r)
			}
			// Before the decision nothing was called: nothing can answer.
			for _, op := range []tcc.Op{tcc.OpConfirm, tcc.OpCancel} {
				ignored(tcc.Result{Branch: 0, Op: op, Outcome: saga.OK, At: d.now})
			}

			require.NoError(t, d.decide(o.commit, o.reason))
			d.expect(allCalls(2, o.op, 1)...)
			d.answer(0, o.op, saga.OK)
			after := cloneState(d.state)
			for _, r := range []tcc.Result{
				{Branch: 0, Op: o.op, Outcome: saga.OK},                // duplicate delivery
				{Branch: 0, Op: o.op, Outcome: saga.Transient},         // duplicate delivery, other outcome
				{Branch: 0, Op: o.op, Outcome: saga.Aborted},           // duplicate delivery, other outcome
				{Branch: 0, Op: o.op, Outcome: saga.OK, NotSent: true}, // duplicate delivery, not sent
				{Branch: 1, Op: o.other, Outcome: saga.OK},             // the other op of a busy branch
				{Branch: 1, Op: o.other, Outcome: saga.Transient},      // the other op of a busy branch
				{Branch: -1, Op: o.op, Outcome: saga.OK},               // no such branch
				{Branch: 2, Op: o.op, Outcome: saga.OK},                // no such branch
				{Branch: 1, Op: tcc.OpTry, Outcome: saga.OK},           // the initiator calls try, never the coordinator
				{Branch: 1, Op: tcc.Op("bogus"), Outcome: saga.Aborted},
				{Branch: 1, Op: "", Outcome: saga.OK},
			} {
				r.At, r.Err = d.now, "stray"
				ignored(r)
			}
			require.Equal(t, after, d.state)

			// A stray result for a branch waiting to retry does not count as its retry.
			d.answer(1, o.op, saga.Transient)
			waiting := cloneState(d.state)
			for _, out := range []saga.Outcome{saga.OK, saga.Transient, saga.Aborted} {
				ignored(tcc.Result{Branch: 1, Op: o.op, Outcome: out, At: d.now, Err: "stray"})
			}
			require.Equal(t, waiting, d.state)
			d.now = d.expect()
			d.expect(tcc.Call{Branch: 1, Op: o.op, Attempt: 2})
			d.answer(1, o.op, saga.OK)
			d.expect()
			require.Equal(t, o.final, d.state.Phase)
		})
	}
}

func TestRecover(t *testing.T) {
	t.Parallel()
	for _, o := range ops {
		t.Run(o.name+"/in_flight_calls_redispatched", func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(3, t0.Add(time.Minute), 5))
			require.NoError(t, d.decide(o.commit, o.reason))
			d.expect(allCalls(3, o.op, 1)...)
			d.answer(0, o.op, saga.OK)
			d.answer(1, o.op, saga.Transient)
			loaded := d.state
			snapshot := cloneState(loaded)

			// The process dies with b2's call out; its successor loads the state.
			d.state = tcc.Recover(loaded)
			require.Equal(t, snapshot, loaded, "Recover does not modify its input")
			require.True(t, loaded.Branches[2].Confirm.InFlight || loaded.Branches[2].Cancel.InFlight)
			for i := range 3 {
				require.False(t, d.branch(i, o.op).InFlight, "branch %d", i)
			}
			b2 := d.branch(2, o.op)
			require.Equal(t, saga.StatusUnknown, b2.Status, "the lost call may have taken effect")
			require.Equal(t, 1, b2.Attempts)
			require.Equal(t, o.busy, d.state.Phase)
			require.Equal(t, o.reason, d.state.Reason)
			require.Equal(t, loaded.Branches[0], d.state.Branches[0], "a recorded success stays")
			require.Equal(t, loaded.Branches[1], d.state.Branches[1], "a recorded failure and its backoff stay")

			// The lost call's result cannot be fed back any more.
			require.Empty(t, d.answer(2, o.op, saga.OK))
			require.Equal(t, saga.StatusUnknown, d.branch(2, o.op).Status)

			wake := d.expect(tcc.Call{Branch: 2, Op: o.op, Attempt: 2})
			require.Equal(t, d.branch(1, o.op).NextAt, wake)
			d.answer(2, o.op, saga.OK)
			d.now = wake
			d.expect(tcc.Call{Branch: 1, Op: o.op, Attempt: 2})
			d.answer(1, o.op, saga.OK)
			d.expect()
			require.Equal(t, o.final, d.state.Phase)
			for i := range 3 {
				require.Zero(t, d.branch(i, o.other).Attempts)
			}
		})
	}

	for _, from := range []string{
		"trying", "confirming", "confirmed", "cancelling", "cancelled", "timed_out",
		"needs_operator_after_confirm", "needs_operator_after_cancel",
	} {
		t.Run("nothing_in_flight/"+from, func(t *testing.T) {
			t.Parallel()
			d := reach(t, from)
			if from == "timed_out" {
				for i := range 2 {
					d.answer(i, tcc.OpCancel, saga.Transient)
				}
			}
			require.Equal(t, d.state, tcc.Recover(d.state), "only in-flight flags are lost with a process")
		})
	}
}
