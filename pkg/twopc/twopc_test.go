package twopc_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/twopc"
)

// t0 is an arbitrary instant; the state machine reads no clock, so tests pick the time.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// deadline is far enough away that a test about something else never reaches it.
var deadline = t0.Add(time.Minute)

// policy is a branch retry policy slow enough that a test about something else is not disturbed
// by retries coming due. With the driver's jitter of 0.5, attempt n waits 0.75s, 1.5s, 3s, 6s.
func policy(name string) twopc.BranchPolicy {
	return twopc.BranchPolicy{Name: name, InitialBackoff: time.Second, MaxBackoff: 8 * time.Second}
}

// newSpec returns a spec of n branches named b0, b1, ...
func newSpec(n int, deadline time.Time, threshold int) twopc.Spec {
	spec := twopc.Spec{Deadline: deadline, OperatorThreshold: threshold}
	for i := range n {
		spec.Branches = append(spec.Branches, policy(fmt.Sprintf("b%d", i)))
	}
	return spec
}

func call(i int, op twopc.Op, attempt int) twopc.Call {
	return twopc.Call{Branch: i, Op: op, Attempt: attempt}
}

// allCalls is one call of op per branch, the way each phase fans out.
func allCalls(n int, op twopc.Op, attempt int) []twopc.Call {
	calls := make([]twopc.Call, n)
	for i := range calls {
		calls[i] = call(i, op, attempt)
	}
	return calls
}

// driver plays the engine by hand: it holds the state and the clock and keeps every event, so a
// test reads as the sequence of calls and outcomes it describes.
type driver struct {
	t      *testing.T
	spec   twopc.Spec
	state  twopc.State
	now    time.Time
	jitter float64
	events []twopc.Event
}

func newDriver(t *testing.T, spec twopc.Spec) *driver {
	t.Helper()
	return &driver{t: t, spec: spec, state: twopc.New(spec), now: t0, jitter: 0.5}
}

// advance calls Advance and checks that it did not modify the state it was given: the engine
// keeps the old state until the new one is durable.
func (d *driver) advance() ([]twopc.Call, []twopc.Event, time.Time) {
	d.t.Helper()
	before := cloneState(d.state)
	s, calls, evs, wake := twopc.Advance(d.spec, d.state, d.now)
	require.Equal(d.t, before, d.state, "Advance modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return calls, evs, wake
}

// expect advances and requires exactly these calls (in any order) and nothing else.
func (d *driver) expect(want ...twopc.Call) time.Time {
	d.t.Helper()
	calls, _, wake := d.advance()
	if len(want) == 0 {
		require.Empty(d.t, calls, "calls at %s in phase %s", d.now, d.state.Phase)
	} else {
		require.ElementsMatch(d.t, want, calls, "calls at %s in phase %s", d.now, d.state.Phase)
	}
	return wake
}

// result is the outcome of branch i's op observed now, with an error message naming both.
func (d *driver) result(i int, op twopc.Op, o saga.Outcome) twopc.Result {
	return twopc.Result{Branch: i, Op: op, Outcome: o, Err: fmt.Sprintf("b%d %s said %s", i, op, o), At: d.now, Jitter: d.jitter}
}

func (d *driver) apply(r twopc.Result) []twopc.Event {
	d.t.Helper()
	before := cloneState(d.state)
	s, evs := twopc.Apply(d.spec, d.state, r)
	require.Equal(d.t, before, d.state, "Apply modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return evs
}

func (d *driver) answer(i int, op twopc.Op, o saga.Outcome) []twopc.Event {
	d.t.Helper()
	return d.apply(d.result(i, op, o))
}

// notSent reports that branch i's op never left the coordinator.
func (d *driver) notSent(i int, op twopc.Op) []twopc.Event {
	d.t.Helper()
	r := d.result(i, op, saga.Transient)
	r.Err, r.NotSent = "circuit breaker open", true
	return d.apply(r)
}

func (d *driver) branch(i int, op twopc.Op) twopc.Branch {
	switch op {
	case twopc.OpCommit:
		return d.state.Branches[i].Commit
	case twopc.OpRollback:
		return d.state.Branches[i].Rollback
	}
	return d.state.Branches[i].Prepare
}

// count is the number of events of this kind that happened.
func (d *driver) count(kind string) int {
	n := 0
	for _, e := range d.events {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

func (d *driver) lastEvent() twopc.Event {
	d.t.Helper()
	require.NotEmpty(d.t, d.events)
	return d.events[len(d.events)-1]
}

// requireUntouched checks that op was never called on any branch.
func (d *driver) requireUntouched(op twopc.Op) {
	d.t.Helper()
	for i := range d.state.Branches {
		b := d.branch(i, op)
		require.Equal(d.t, saga.StatusPending, b.Status, "b%d %s", i, op)
		require.Zero(d.t, b.Attempts, "b%d %s", i, op)
	}
}

// requireStaysPut checks that a terminal transaction does nothing more, however long the engine
// waits.
func (d *driver) requireStaysPut() {
	d.t.Helper()
	phase := d.state.Phase
	require.True(d.t, phase.Terminal(), "phase %s", phase)
	n := len(d.events)
	d.now = d.now.Add(24 * time.Hour)
	wake := d.expect()
	require.True(d.t, wake.IsZero(), "terminal phase %s asks to be woken at %s", phase, wake)
	require.Equal(d.t, phase, d.state.Phase)
	require.Len(d.t, d.events, n, "events after the end: %+v", d.events[n:])
}

// cloneState is a deep copy that does not rely on State.Clone, which is under test.
func cloneState(s twopc.State) twopc.State {
	c := s
	c.Branches = slices.Clone(s.Branches) // keeps nil and empty apart, as require.Equal does
	return c
}

func kinds(evs []twopc.Event) []string {
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = e.Kind
	}
	return out
}

func TestTerminalPhases(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		phase    twopc.Phase
		terminal bool
	}{
		{twopc.PhasePreparing, false},
		{twopc.PhaseCommitting, false},
		{twopc.PhaseRollingBack, false},
		{twopc.PhaseCommitted, true},
		{twopc.PhaseRolledBack, true},
		{twopc.PhaseNeedsOperator, true},
	} {
		require.Equal(t, tc.terminal, tc.phase.Terminal(), "phase %s", tc.phase)
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	s := twopc.New(newSpec(3, deadline, 3))
	require.Equal(t, twopc.PhasePreparing, s.Phase)
	require.Empty(t, s.Reason)
	require.Len(t, s.Branches, 3)
	pending := twopc.Branch{Status: saga.StatusPending}
	for i, b := range s.Branches {
		require.Equal(t, twopc.BranchState{Prepare: pending, Commit: pending, Rollback: pending}, b, "b%d", i)
	}

	// Clone is deep: changing the copy leaves the original as it was.
	c := s.Clone()
	c.Branches[1].Prepare.Attempts = 7
	require.Zero(t, s.Branches[1].Prepare.Attempts)
}

func TestAllPreparedCommits(t *testing.T) {
	t.Parallel()
	for _, n := range []int{1, 3} {
		t.Run(fmt.Sprintf("branches=%d", n), func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(n, deadline, 3))

			// Every participant is asked to prepare at once.
			wake := d.expect(allCalls(n, twopc.OpPrepare, 1)...)
			require.Equal(t, deadline, wake, "preparing must look again at the deadline")
			require.Equal(t, twopc.PhasePreparing, d.state.Phase)
			for i := range n {
				require.True(t, d.branch(i, twopc.OpPrepare).InFlight, "b%d", i)
				require.Equal(t, saga.StatusUnknown, d.branch(i, twopc.OpPrepare).Status, "b%d", i)
			}
			// Nothing more while they are out; no prepare is sent twice.
			require.Equal(t, deadline, d.expect())

			for i := range n - 1 {
				d.now = d.now.Add(10 * time.Millisecond)
				evs := d.answer(i, twopc.OpPrepare, saga.OK)
				require.Equal(t, []twopc.Event{{Kind: "branch_prepared", Step: fmt.Sprintf("b%d", i), Op: saga.Op(twopc.OpPrepare)}}, evs)
				require.Equal(t, deadline, d.expect(), "one participant has not prepared yet")
				require.Equal(t, twopc.PhasePreparing, d.state.Phase)
			}
			d.now = d.now.Add(10 * time.Millisecond)
			d.answer(n-1, twopc.OpPrepare, saga.OK)
			require.Equal(t, twopc.PhasePreparing, d.state.Phase, "Apply only records; Advance decides")

			// The decision and the commit calls come out of one Advance, so the engine records the
			// decision before it makes the first commit call.
			calls, evs, wake := d.advance()
			require.ElementsMatch(t, allCalls(n, twopc.OpCommit, 1), calls)
			require.Equal(t, []string{"committing"}, kinds(evs))
			require.Contains(t, evs[0].Detail, fmt.Sprintf("all %d participants prepared", n))
			require.True(t, wake.IsZero(), "nothing to wait for but the commits")
			require.Equal(t, twopc.PhaseCommitting, d.state.Phase)
			require.Empty(t, d.expect(), "no commit is sent twice")

			for i := range n {
				require.Equal(t, twopc.PhaseCommitting, d.state.Phase)
				evs := d.answer(i, twopc.OpCommit, saga.OK)
				require.Equal(t, []string{"branch_succeeded"}, kinds(evs))
				d.expect()
			}
			require.Equal(t, twopc.PhaseCommitted, d.state.Phase)
			require.Equal(t, "committed", d.lastEvent().Kind)
			require.Equal(t, 1, d.count("committing"))
			require.Zero(t, d.count("rolling_back"))
			for i := range n {
				require.Equal(t, saga.StatusSucceeded, d.branch(i, twopc.OpPrepare).Status)
				require.Equal(t, saga.StatusSucceeded, d.branch(i, twopc.OpCommit).Status)
				require.Equal(t, 1, d.branch(i, twopc.OpCommit).Attempts)
			}
			d.requireUntouched(twopc.OpRollback)
			d.requireStaysPut()
		})
	}
}

// A refusal rolls back every participant; a branch whose prepare is still out is rolled back only
// once that prepare has landed, whatever it says, so the rollback cannot overtake it.
func TestAbortedPrepareRollsBackEveryBranch(t *testing.T) {
	t.Parallel()
	for _, late := range []saga.Outcome{saga.OK, saga.Aborted, saga.Transient} {
		t.Run("late_prepare="+late.String(), func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(3, deadline, 3))
			d.expect(allCalls(3, twopc.OpPrepare, 1)...)
			d.answer(0, twopc.OpPrepare, saga.OK)

			evs := d.answer(1, twopc.OpPrepare, saga.Aborted)
			require.Equal(t, []string{"branch_failed", "rolling_back"}, kinds(evs))
			require.Equal(t, twopc.PhaseRollingBack, d.state.Phase)
			require.Contains(t, d.state.Reason, `"b1"`)
			require.Contains(t, d.state.Reason, "aborted")
			require.Equal(t, d.state.Reason, evs[1].Detail)
			require.Equal(t, saga.StatusFailed, d.branch(1, twopc.OpPrepare).Status)
			require.False(t, d.branch(1, twopc.OpPrepare).Uncertain, "a refusal is certain")

			// b2's prepare is still out: its rollback waits for it.
			wake := d.expect(call(0, twopc.OpRollback, 1), call(1, twopc.OpRollback, 1))
			require.True(t, wake.IsZero())
			d.answer(0, twopc.OpRollback, saga.OK)
			d.answer(1, twopc.OpRollback, saga.OK)
			wake = d.expect()
			require.True(t, wake.IsZero(), "waiting for a result, not for a time")
			require.Equal(t, twopc.PhaseRollingBack, d.state.Phase, "b2 is not rolled back yet")

			evs = d.answer(2, twopc.OpPrepare, late)
			if late == saga.OK {
				require.Equal(t, []string{"branch_prepared"}, kinds(evs))
			} else {
				require.Equal(t, []string{"branch_failed"}, kinds(evs), "the decision is made already")
			}
			require.Equal(t, twopc.PhaseRollingBack, d.state.Phase)
			d.expect(call(2, twopc.OpRollback, 1))
			d.answer(2, twopc.OpRollback, saga.OK)
			d.expect()

			require.Equal(t, twopc.PhaseRolledBack, d.state.Phase)
			require.Equal(t, "rolled_back", d.lastEvent().Kind)
			require.Equal(t, 1, d.count("rolling_back"), "one decision")
			require.Zero(t, d.count("committing"))
			for i := range 3 {
				require.Equal(t, 1, d.branch(i, twopc.OpPrepare).Attempts, "b%d: prepare is never retried", i)
				require.Equal(t, saga.StatusSucceeded, d.branch(i, twopc.OpRollback).Status, "b%d", i)
			}
			d.requireUntouched(twopc.OpCommit)
			d.requireStaysPut()
		})
	}
}

// A participant that fails to answer, or does not answer in time, is not asked again: the
// coordinator cannot hold the others' locks for it, and rolls back.
func TestPrepareFailureRollsBackWithoutRetry(t *testing.T) {
	t.Parallel()
	for _, errMsg := range []string{"DEADLINE_EXCEEDED: call timeout 5s", "UNAVAILABLE: connection refused"} {
		t.Run(errMsg, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(2, deadline, 3))
			d.expect(allCalls(2, twopc.OpPrepare, 1)...)
			d.now = d.now.Add(5 * time.Second)
			r := d.result(0, twopc.OpPrepare, saga.Transient)
			r.Err = errMsg
			evs := d.apply(r)
			require.Equal(t, []string{"branch_failed", "rolling_back"}, kinds(evs))
			require.Equal(t, errMsg, evs[0].Detail)
			require.Equal(t, twopc.PhaseRollingBack, d.state.Phase)
			require.Contains(t, d.state.Reason, "transient")
			require.Contains(t, d.state.Reason, errMsg)
			p := d.branch(0, twopc.OpPrepare)
			require.Equal(t, saga.StatusFailed, p.Status)
			require.Equal(t, errMsg, p.LastError)
			require.True(t, p.Uncertain, "the participant may have prepared without answering")
			require.True(t, p.NextAt.IsZero(), "no retry is scheduled")

			d.expect(call(0, twopc.OpRollback, 1))
			// However long the coordinator waits, the failed prepare is not sent again.
			d.now = d.now.Add(time.Hour)
			d.expect()
			d.answer(0, twopc.OpRollback, saga.OK)
			d.expect()
			d.answer(1, twopc.OpPrepare, saga.OK)
			d.expect(call(1, twopc.OpRollback, 1))
			d.answer(1, twopc.OpRollback, saga.OK)
			d.expect()
			require.Equal(t, twopc.PhaseRolledBack, d.state.Phase)
			require.Equal(t, 1, d.branch(0, twopc.OpPrepare).Attempts)
			require.Equal(t, 1, d.branch(1, twopc.OpPrepare).Attempts)
			d.requireUntouched(twopc.OpCommit)
		})
	}
}

func TestDeadlineWhilePreparing(t *testing.T) {
	t.Parallel()
	dl := t0.Add(10 * time.Second)
	d := newDriver(t, newSpec(2, dl, 3))
	require.Equal(t, dl, d.expect(allCalls(2, twopc.OpPrepare, 1)...))
	d.now = t0.Add(time.Second)
	d.answer(0, twopc.OpPrepare, saga.OK)

	d.now = dl.Add(-time.Nanosecond)
	require.Equal(t, dl, d.expect(), "still before the deadline")
	require.Equal(t, twopc.PhasePreparing, d.state.Phase)

	d.now = dl
	calls, evs, wake := d.advance()
	require.Equal(t, twopc.PhaseRollingBack, d.state.Phase, "the deadline is the first instant not allowed")
	require.Equal(t, []string{"rolling_back"}, kinds(evs))
	require.Contains(t, d.state.Reason, "deadline")
	require.Contains(t, d.state.Reason, dl.Format(time.RFC3339))
	// b1's prepare is still out: only b0 is rolled back now.
	require.Equal(t, []twopc.Call{call(0, twopc.OpRollback, 1)}, calls)
	require.True(t, wake.IsZero())

	// The late prepare answers after the decision; it changes nothing but lets b1's rollback go.
	d.now = dl.Add(2 * time.Second)
	evs = d.answer(1, twopc.OpPrepare, saga.Transient)
	require.Equal(t, []string{"branch_failed"}, kinds(evs))
	d.expect(call(1, twopc.OpRollback, 1))
	d.answer(0, twopc.OpRollback, saga.OK)
	d.answer(1, twopc.OpRollback, saga.OK)
	d.expect()
	require.Equal(t, twopc.PhaseRolledBack, d.state.Phase)
	require.Equal(t, 1, d.count("rolling_back"))
	d.requireUntouched(twopc.OpCommit)
}

// A transaction whose deadline has already passed when it is first advanced prepares nobody.
func TestDeadlinePassedBeforeFirstPrepare(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(2, t0, 3))
	calls, evs, _ := d.advance()
	require.Equal(t, []string{"rolling_back"}, kinds(evs))
	require.ElementsMatch(t, allCalls(2, twopc.OpRollback, 1), calls)
	d.requireUntouched(twopc.OpPrepare)
}

// A prepare that never left the coordinator (open breaker, no concurrency slot) is no answer at
// all: it is tried again after a backoff, as often as needed, and counts as no attempt.
func TestNotSentPrepareRetried(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(2, deadline, 1))
	d.expect(allCalls(2, twopc.OpPrepare, 1)...)
	d.answer(1, twopc.OpPrepare, saga.OK)
	for range 5 {
		require.Empty(t, d.notSent(0, twopc.OpPrepare))
		p := d.branch(0, twopc.OpPrepare)
		require.Equal(t, saga.StatusPending, p.Status)
		require.Zero(t, p.Attempts)
		require.Equal(t, twopc.PhasePreparing, d.state.Phase)
		// 0.75s is the first backoff with jitter 0.5: the retry waits as a first retry would.
		require.Equal(t, d.now.Add(750*time.Millisecond), p.NextAt)

		// Nothing before the backoff has passed; the wake says when.
		wake := d.expect()
		require.Equal(t, p.NextAt, wake)
		d.now = wake.Add(-time.Nanosecond)
		require.Equal(t, p.NextAt, d.expect())
		d.now = wake
		d.expect(call(0, twopc.OpPrepare, 1))
	}
	d.answer(0, twopc.OpPrepare, saga.OK)
	d.expect(allCalls(2, twopc.OpCommit, 1)...)
	require.Equal(t, twopc.PhaseCommitting, d.state.Phase)
	require.Equal(t, 1, d.branch(0, twopc.OpPrepare).Attempts)
}

// A prepare that cannot be sent before the deadline leads to rolling back at the deadline, not at
// its retry time.
func TestNotSentPrepareUntilDeadline(t *testing.T) {
	t.Parallel()
	dl := t0.Add(500 * time.Millisecond)
	d := newDriver(t, newSpec(1, dl, 3))
	d.expect(call(0, twopc.OpPrepare, 1))
	d.notSent(0, twopc.OpPrepare)
	require.True(t, d.branch(0, twopc.OpPrepare).NextAt.After(dl), "the test needs the retry to fall after the deadline")
	require.Equal(t, dl, d.expect())
	d.now = dl
	calls, evs, _ := d.advance()
	require.Equal(t, []string{"rolling_back"}, kinds(evs))
	// The prepare never left: rolling back the branch is harmless and bars a late prepare.
	require.Equal(t, []twopc.Call{call(0, twopc.OpRollback, 1)}, calls)
	require.Zero(t, d.branch(0, twopc.OpPrepare).Attempts)
}

// Commit never gives up: a transient failure or a refusal is retried with a growing backoff until
// the participant says OK. Nothing is rolled back once the decision is made.
func TestCommitRetriedUntilOK(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(2, t0.Add(time.Second), 10))
	d.expect(allCalls(2, twopc.OpPrepare, 1)...)
	d.answer(0, twopc.OpPrepare, saga.OK)
	d.answer(1, twopc.OpPrepare, saga.OK)
	d.expect(allCalls(2, twopc.OpCommit, 1)...)
	d.answer(1, twopc.OpCommit, saga.OK)

	// The prepare deadline does not apply to the second phase.
	d.now = t0.Add(time.Hour)
	backoffs := []time.Duration{750 * time.Millisecond, 1500 * time.Millisecond, 3 * time.Second, 6 * time.Second, 6 * time.Second}
	for k, want := range backoffs {
		attempt := k + 1
		o := saga.Transient
		if attempt%2 == 0 {
			o = saga.Aborted // a refusal to commit is not a way out either
		}
		evs := d.answer(0, twopc.OpCommit, o)
		require.Equal(t, []string{"branch_retry"}, kinds(evs))
		require.Contains(t, evs[0].Detail, fmt.Sprintf("attempt %d", attempt))
		c := d.branch(0, twopc.OpCommit)
		require.Equal(t, saga.StatusUnknown, c.Status)
		require.Equal(t, d.now.Add(want), c.NextAt, "backoff after attempt %d", attempt)
		if o == saga.Aborted {
			require.Contains(t, c.LastError, "ABORTED")
		}
		require.Equal(t, c.NextAt, d.expect())
		require.Equal(t, twopc.PhaseCommitting, d.state.Phase)
		d.now = c.NextAt
		d.expect(call(0, twopc.OpCommit, attempt+1))
	}
	d.answer(0, twopc.OpCommit, saga.OK)
	d.expect()
	require.Equal(t, twopc.PhaseCommitted, d.state.Phase)
	c := d.branch(0, twopc.OpCommit)
	require.Equal(t, len(backoffs)+1, c.Attempts)
	require.Empty(t, c.LastError)
	require.True(t, c.NextAt.IsZero())
	d.requireUntouched(twopc.OpRollback)
}

func TestRollbackRetriedUntilOK(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(1, deadline, 10))
	d.expect(call(0, twopc.OpPrepare, 1))
	d.answer(0, twopc.OpPrepare, saga.Aborted)
	d.expect(call(0, twopc.OpRollback, 1))
	for attempt := 1; attempt <= 3; attempt++ {
		d.answer(0, twopc.OpRollback, saga.Transient)
		d.now = d.branch(0, twopc.OpRollback).NextAt
		d.expect(call(0, twopc.OpRollback, attempt+1))
	}
	d.answer(0, twopc.OpRollback, saga.OK)
	d.expect()
	require.Equal(t, twopc.PhaseRolledBack, d.state.Phase)
	require.Equal(t, 4, d.branch(0, twopc.OpRollback).Attempts)
}

// A commit or rollback that cannot be sent is not an attempt: it never brings the transaction to
// an operator.
func TestNotSentSecondPhaseIsNotAnAttempt(t *testing.T) {
	t.Parallel()
	for _, op := range []twopc.Op{twopc.OpCommit, twopc.OpRollback} {
		t.Run(string(op), func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(1, deadline, 1))
			d.expect(call(0, twopc.OpPrepare, 1))
			final := twopc.PhaseCommitted
			if op == twopc.OpCommit {
				d.answer(0, twopc.OpPrepare, saga.OK)
			} else {
				d.answer(0, twopc.OpPrepare, saga.Aborted)
				final = twopc.PhaseRolledBack
			}
			d.expect(call(0, op, 1))
			for range 5 {
				require.Empty(t, d.notSent(0, op))
				require.Zero(t, d.branch(0, op).Attempts)
				require.Equal(t, saga.StatusPending, d.branch(0, op).Status)
				d.now = d.expect()
				require.False(t, d.now.IsZero())
				require.False(t, d.state.Phase.Terminal(), "phase %s after a call that was never sent", d.state.Phase)
				d.expect(call(0, op, 1))
			}
			d.answer(0, op, saga.OK)
			d.expect()
			require.Equal(t, final, d.state.Phase)
			require.Equal(t, 1, d.branch(0, op).Attempts)
		})
	}
}

// After OperatorThreshold failed attempts of one commit or rollback the transaction waits for an
// operator, but only once every call it made has landed: a result still out must be recorded.
func TestOperatorThreshold(t *testing.T) {
	t.Parallel()
	t.Run("commit", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, newSpec(2, deadline, 2))
		d.expect(allCalls(2, twopc.OpPrepare, 1)...)
		d.answer(0, twopc.OpPrepare, saga.OK)
		d.answer(1, twopc.OpPrepare, saga.OK)
		d.expect(allCalls(2, twopc.OpCommit, 1)...)
		d.answer(0, twopc.OpCommit, saga.Transient)
		d.now = d.branch(0, twopc.OpCommit).NextAt
		d.expect(call(0, twopc.OpCommit, 2))
		d.answer(0, twopc.OpCommit, saga.Transient)

		// b0 has failed twice, b1's first commit is still out.
		wake := d.expect()
		require.True(t, wake.IsZero(), "no retry of b0 is scheduled past the threshold")
		require.Equal(t, twopc.PhaseCommitting, d.state.Phase)
		require.Zero(t, d.count("needs_operator"))
		d.now = d.now.Add(time.Hour)
		d.expect()

		d.answer(1, twopc.OpCommit, saga.OK)
		calls, evs, wake := d.advance()
		require.Empty(t, calls)
		require.True(t, wake.IsZero())
		require.Equal(t, twopc.PhaseNeedsOperator, d.state.Phase)
		require.Equal(t, []string{"needs_operator"}, kinds(evs))
		require.Contains(t, d.state.Reason, "a commit failed 2 times")
		require.Equal(t, d.state.Reason, evs[0].Detail)
		require.Equal(t, saga.StatusSucceeded, d.branch(1, twopc.OpCommit).Status, "b1's late OK is kept")
		d.requireUntouched(twopc.OpRollback)
		d.requireStaysPut()
	})
	t.Run("rollback_with_prepare_out", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, newSpec(2, deadline, 1))
		d.expect(allCalls(2, twopc.OpPrepare, 1)...)
		d.answer(0, twopc.OpPrepare, saga.Aborted)
		d.expect(call(0, twopc.OpRollback, 1))
		d.answer(0, twopc.OpRollback, saga.Transient)

		// b0 is stuck, but b1's prepare is still out: wait for it, and start nothing new.
		wake := d.expect()
		require.True(t, wake.IsZero())
		require.Equal(t, twopc.PhaseRollingBack, d.state.Phase)
		d.answer(1, twopc.OpPrepare, saga.OK)
		d.expect()
		require.Equal(t, twopc.PhaseNeedsOperator, d.state.Phase)
		require.Contains(t, d.state.Reason, "a rollback failed 1 times")
		require.Contains(t, d.state.Reason, `participant "b0" did not prepare`, "the reason keeps why it turned back")
		require.Zero(t, d.branch(1, twopc.OpRollback).Attempts, "no new call once an operator is needed")
		d.requireUntouched(twopc.OpCommit)
		d.requireStaysPut()
	})
}

// Recover runs on a state loaded from storage after its driver died. Calls in flight then are
// unknown now. Without a recorded decision the transaction rolls back (presumed abort); with one,
// it carries on.
func TestRecover(t *testing.T) {
	t.Parallel()
	t.Run("preparing_rolls_back", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, newSpec(3, deadline, 3))
		d.expect(allCalls(3, twopc.OpPrepare, 1)...)
		d.answer(0, twopc.OpPrepare, saga.OK)
		d.answer(1, twopc.OpPrepare, saga.OK)
		// b2's prepare was in flight when the coordinator died.
		before := cloneState(d.state)
		after := twopc.Recover(d.state)
		require.Equal(t, before, d.state, "Recover modified its input state")

		require.Equal(t, twopc.PhaseRollingBack, after.Phase)
		require.Contains(t, after.Reason, "no decision recorded")
		for i, b := range after.Branches {
			require.False(t, b.Prepare.InFlight || b.Commit.InFlight || b.Rollback.InFlight, "b%d", i)
		}
		require.Equal(t, saga.StatusUnknown, after.Branches[2].Prepare.Status, "the lost prepare's outcome is unknown")
		require.Equal(t, []twopc.Event{{Kind: "rolling_back", Detail: after.Reason}}, twopc.RecoverEvents(d.state, after))

		d.state = after
		d.expect(allCalls(3, twopc.OpRollback, 1)...)
		for i := range 3 {
			d.answer(i, twopc.OpRollback, saga.OK)
		}
		d.expect()
		require.Equal(t, twopc.PhaseRolledBack, d.state.Phase)
		d.requireUntouched(twopc.OpCommit)
	})
	t.Run("all_prepared_but_undecided_rolls_back", func(t *testing.T) {
		t.Parallel()
		// Every prepare answered OK, but the decision to commit was never written: a commit now
		// could not be told apart from one made after a rollback another replica started.
		d := newDriver(t, newSpec(2, deadline, 3))
		d.expect(allCalls(2, twopc.OpPrepare, 1)...)
		d.answer(0, twopc.OpPrepare, saga.OK)
		d.answer(1, twopc.OpPrepare, saga.OK)
		after := twopc.Recover(d.state)
		require.Equal(t, twopc.PhaseRollingBack, after.Phase)
		require.Len(t, twopc.RecoverEvents(d.state, after), 1)
		d.state = after
		d.expect(allCalls(2, twopc.OpRollback, 1)...)
	})
	t.Run("committing_carries_on", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, newSpec(2, t0.Add(time.Second), 3))
		d.expect(allCalls(2, twopc.OpPrepare, 1)...)
		d.answer(0, twopc.OpPrepare, saga.OK)
		d.answer(1, twopc.OpPrepare, saga.OK)
		d.expect(allCalls(2, twopc.OpCommit, 1)...)
		d.answer(0, twopc.OpCommit, saga.OK)

		// Long after the prepare deadline, another replica loads the state.
		after := twopc.Recover(d.state)
		require.Equal(t, twopc.PhaseCommitting, after.Phase)
		require.Empty(t, after.Reason)
		require.Empty(t, twopc.RecoverEvents(d.state, after))
		require.False(t, after.Branches[1].Commit.InFlight)
		d.state = after
		d.now = t0.Add(time.Hour)
		d.expect(call(1, twopc.OpCommit, 2))
		d.answer(1, twopc.OpCommit, saga.OK)
		d.expect()
		require.Equal(t, twopc.PhaseCommitted, d.state.Phase)
		d.requireUntouched(twopc.OpRollback)
	})
	t.Run("rolling_back_carries_on", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, newSpec(2, deadline, 3))
		d.expect(allCalls(2, twopc.OpPrepare, 1)...)
		d.answer(0, twopc.OpPrepare, saga.Aborted)
		d.expect(call(0, twopc.OpRollback, 1))
		reason := d.state.Reason

		// b0's rollback and b1's prepare were both out.
		after := twopc.Recover(d.state)
		require.Equal(t, twopc.PhaseRollingBack, after.Phase)
		require.Equal(t, reason, after.Reason, "the original reason is kept")
		require.Empty(t, twopc.RecoverEvents(d.state, after))
		d.state = after
		d.expect(call(0, twopc.OpRollback, 2), call(1, twopc.OpRollback, 1))
	})
	t.Run("terminal_unchanged", func(t *testing.T) {
		t.Parallel()
		for _, p := range []twopc.Phase{twopc.PhaseCommitted, twopc.PhaseRolledBack, twopc.PhaseNeedsOperator} {
			s := twopc.New(newSpec(2, deadline, 3))
			s.Phase, s.Reason = p, "why"
			after := twopc.Recover(s)
			require.Equal(t, s, after, "phase %s", p)
			require.Empty(t, twopc.RecoverEvents(s, after), "phase %s", p)
		}
	})
}

// Results the machine is not waiting for change nothing: duplicates, results for branches or ops
// that do not exist, and results for calls that were never made.
func TestStrayResultsIgnored(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(2, deadline, 3))
	d.expect(allCalls(2, twopc.OpPrepare, 1)...)
	d.answer(0, twopc.OpPrepare, saga.OK)

	stray := []twopc.Result{
		d.result(0, twopc.OpPrepare, saga.Aborted),    // a duplicate of a prepare already answered
		d.result(0, twopc.OpCommit, saga.OK),          // a commit never made
		d.result(1, twopc.OpRollback, saga.Transient), // a rollback never made
		d.result(-1, twopc.OpPrepare, saga.Aborted),
		d.result(2, twopc.OpPrepare, saga.Aborted),
		d.result(1, twopc.Op("confirm"), saga.Aborted), // an op 2PC does not have, on a branch in flight
		d.result(1, twopc.Op(""), saga.Aborted),
	}
	notSent := d.result(0, twopc.OpPrepare, saga.Transient)
	notSent.NotSent = true
	stray = append(stray, notSent)
	for _, r := range stray {
		before := cloneState(d.state)
		evs := d.apply(r)
		require.Empty(t, evs, "result %+v", r)
		require.Equal(t, before, d.state, "result %+v", r)
	}
	require.True(t, d.branch(1, twopc.OpPrepare).InFlight, "b1's real prepare is still awaited")
	d.answer(1, twopc.OpPrepare, saga.OK)
	d.expect(allCalls(2, twopc.OpCommit, 1)...)

	// A second OK for the same commit is ignored too.
	d.answer(0, twopc.OpCommit, saga.OK)
	before := cloneState(d.state)
	require.Empty(t, d.answer(0, twopc.OpCommit, saga.Transient))
	require.Equal(t, before, d.state)
}
