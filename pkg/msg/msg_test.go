package msg_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/msg"
	"github.com/treatyhq/treaty/pkg/saga"
)

// t0 is an arbitrary instant; the state machine reads no clock, so tests pick the time.
var t0 = time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)

// deadline is when an unsubmitted message is resolved by asking the application.
var deadline = t0.Add(30 * time.Second)

// policy is a retry policy slow enough that a test about something else is not disturbed by
// retries coming due. With the driver's jitter of 0.5, attempt n waits 0.75s, 1.5s, 3s, 6s.
func policy(name string) msg.Policy {
	return msg.Policy{Name: name, InitialBackoff: time.Second, MaxBackoff: 8 * time.Second}
}

// newSpec returns a spec of n deliveries named d0, d1, ...
func newSpec(n int, threshold int) msg.Spec {
	spec := msg.Spec{Query: policy("query"), Deadline: deadline, OperatorThreshold: threshold}
	for i := range n {
		spec.Deliveries = append(spec.Deliveries, policy(fmt.Sprintf("d%d", i)))
	}
	return spec
}

func deliver(i, attempt int) msg.Call {
	return msg.Call{Delivery: i, Op: msg.OpDeliver, Attempt: attempt}
}

func query(attempt int) msg.Call { return msg.Call{Delivery: -1, Op: msg.OpQuery, Attempt: attempt} }

// allDeliveries is one delivery call per participant, the way delivering fans out.
func allDeliveries(n, attempt int) []msg.Call {
	calls := make([]msg.Call, n)
	for i := range calls {
		calls[i] = deliver(i, attempt)
	}
	return calls
}

// driver plays the engine by hand: it holds the state and the clock and keeps every event, so a
// test reads as the sequence of calls and outcomes it describes.
type driver struct {
	t      *testing.T
	spec   msg.Spec
	state  msg.State
	now    time.Time
	jitter float64
	events []msg.Event
}

func newDriver(t *testing.T, spec msg.Spec) *driver {
	t.Helper()
	return &driver{t: t, spec: spec, state: msg.New(spec), now: t0, jitter: 0.5}
}

// advance calls Advance and checks that it did not modify the state it was given: the engine
// keeps the old state until the new one is durable.
func (d *driver) advance() ([]msg.Call, []msg.Event, time.Time) {
	d.t.Helper()
	before := cloneState(d.state)
	s, calls, evs, wake := msg.Advance(d.spec, d.state, d.now)
	require.Equal(d.t, before, d.state, "Advance modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return calls, evs, wake
}

// expect advances and requires exactly these calls (in any order) and nothing else.
func (d *driver) expect(want ...msg.Call) time.Time {
	d.t.Helper()
	calls, _, wake := d.advance()
	if len(want) == 0 {
		require.Empty(d.t, calls, "calls at %s in phase %s", d.now, d.state.Phase)
	} else {
		require.ElementsMatch(d.t, want, calls, "calls at %s in phase %s", d.now, d.state.Phase)
	}
	return wake
}

// result is the outcome of a call observed now; delivery -1 is the query.
func (d *driver) result(i int, o saga.Outcome) msg.Result {
	op := msg.OpDeliver
	if i < 0 {
		op = msg.OpQuery
	}
	return msg.Result{Delivery: i, Op: op, Outcome: o, Err: fmt.Sprintf("%s %d said %s", op, i, o), At: d.now, Jitter: d.jitter}
}

func (d *driver) apply(r msg.Result) []msg.Event {
	d.t.Helper()
	before := cloneState(d.state)
	s, evs := msg.Apply(d.spec, d.state, r)
	require.Equal(d.t, before, d.state, "Apply modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return evs
}

func (d *driver) answer(i int, o saga.Outcome) []msg.Event {
	d.t.Helper()
	return d.apply(d.result(i, o))
}

// notSent reports that a call never left the coordinator.
func (d *driver) notSent(i int) []msg.Event {
	d.t.Helper()
	r := d.result(i, saga.Transient)
	r.Err, r.NotSent = "circuit breaker open", true
	return d.apply(r)
}

// submit applies the application's submit and keeps the new state even when it is refused, so
// that a test can check the refusal left it as it was.
func (d *driver) submit() ([]msg.Event, error) {
	d.t.Helper()
	before := cloneState(d.state)
	s, evs, err := msg.Submit(d.state)
	require.Equal(d.t, before, d.state, "Submit modified its input state")
	d.state, d.events = s, append(d.events, evs...)
	return evs, err
}

func (d *driver) count(kind string) int {
	n := 0
	for _, e := range d.events {
		if e.Kind == kind {
			n++
		}
	}
	return n
}

// requireNoDeliveries checks that no delivery was ever dispatched.
func (d *driver) requireNoDeliveries() {
	d.t.Helper()
	for i, b := range d.state.Deliveries {
		require.Equal(d.t, saga.StatusPending, b.Status, "d%d", i)
		require.Zero(d.t, b.Attempts, "d%d", i)
	}
}

// requireStaysPut checks that a terminal message does nothing more, however long the engine
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
func cloneState(s msg.State) msg.State {
	c := s
	c.Deliveries = slices.Clone(s.Deliveries) // keeps nil and empty apart, as require.Equal does
	return c
}

func kinds(evs []msg.Event) []string {
	out := make([]string, len(evs))
	for i, e := range evs {
		out[i] = e.Kind
	}
	return out
}

// pastDeadline moves a never-submitted message to its deadline and checks the query goes out.
func (d *driver) pastDeadline() {
	d.t.Helper()
	d.now = deadline
	wake := d.expect(query(1))
	require.True(d.t, wake.IsZero(), "waiting for the query's answer, not for a time")
	require.True(d.t, d.state.Query.InFlight)
	require.Equal(d.t, msg.PhasePrepared, d.state.Phase)
}

func TestTerminalPhases(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		phase    msg.Phase
		terminal bool
	}{
		{msg.PhasePrepared, false},
		{msg.PhaseDelivering, false},
		{msg.PhaseSucceeded, true},
		{msg.PhaseAborted, true},
		{msg.PhaseNeedsOperator, true},
	} {
		require.Equal(t, tc.terminal, tc.phase.Terminal(), "phase %s", tc.phase)
	}
}

func TestNew(t *testing.T) {
	t.Parallel()
	s := msg.New(newSpec(2, 3))
	require.Equal(t, msg.PhasePrepared, s.Phase)
	require.Equal(t, msg.Branch{Status: saga.StatusPending}, s.Query)
	require.Equal(t, []msg.Branch{{Status: saga.StatusPending}, {Status: saga.StatusPending}}, s.Deliveries)

	// Clone is deep: changing the copy leaves the original as it was.
	c := s.Clone()
	c.Deliveries[0].Attempts = 7
	require.Zero(t, s.Deliveries[0].Attempts)
}

// A prepared message waits for the application until its deadline: nothing is called, and the
// engine is told to look again at the deadline.
func TestPreparedWaitsForDeadline(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(2, 3))
	for _, now := range []time.Time{t0, t0.Add(10 * time.Second), deadline.Add(-time.Nanosecond)} {
		d.now = now
		calls, evs, wake := d.advance()
		require.Empty(t, calls, "at %s", now)
		require.Empty(t, evs, "at %s", now)
		require.Equal(t, deadline, wake, "at %s", now)
		require.Equal(t, msg.PhasePrepared, d.state.Phase)
	}
	require.Zero(t, d.state.Query.Attempts)
	d.requireNoDeliveries()
	d.pastDeadline()
}

func TestSubmitDelivers(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(3, 3))
	d.now = t0.Add(time.Second)
	evs, err := d.submit()
	require.NoError(t, err)
	require.Equal(t, []msg.Event{{Kind: "delivering", Detail: "submitted by the application"}}, evs)
	require.Equal(t, msg.PhaseDelivering, d.state.Phase)

	// A second submit (the application retrying after a lost answer) changes nothing.
	before := cloneState(d.state)
	evs, err = d.submit()
	require.NoError(t, err)
	require.Empty(t, evs)
	require.Equal(t, before, d.state)

	// Every delivery goes out at once; the query is never needed.
	wake := d.expect(allDeliveries(3, 1)...)
	require.True(t, wake.IsZero())
	d.expect()
	_, err = d.submit()
	require.NoError(t, err, "submit while delivering")
	for i := range 3 {
		require.Equal(t, msg.PhaseDelivering, d.state.Phase)
		evs := d.answer(i, saga.OK)
		require.Equal(t, []msg.Event{{Kind: "branch_succeeded", Step: fmt.Sprintf("d%d", i), Op: saga.Op(msg.OpDeliver), Detail: "attempt 1"}}, evs)
		d.expect()
	}
	require.Equal(t, msg.PhaseSucceeded, d.state.Phase)
	require.Equal(t, "succeeded", d.events[len(d.events)-1].Kind)
	require.Contains(t, d.events[len(d.events)-1].Detail, "3 deliveries")
	require.Zero(t, d.state.Query.Attempts, "a submitted message is never queried")
	require.Equal(t, saga.StatusPending, d.state.Query.Status)

	before = cloneState(d.state)
	evs, err = d.submit()
	require.NoError(t, err, "submit after delivery")
	require.Empty(t, evs)
	require.Equal(t, before, d.state)
	d.requireStaysPut()
}

// A message submitted after its deadline, before anyone queried, is delivered like any other.
func TestSubmitAfterDeadline(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(1, 3))
	d.now = deadline.Add(time.Minute)
	_, err := d.submit()
	require.NoError(t, err)
	d.expect(deliver(0, 1))
	require.Zero(t, d.state.Query.Attempts)
}

func TestQueryOKDelivers(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(2, 3))
	d.pastDeadline()
	d.expect() // the query is not sent twice

	d.now = deadline.Add(time.Second)
	evs := d.answer(-1, saga.OK)
	require.Equal(t, []string{"branch_succeeded", "delivering"}, kinds(evs))
	require.Equal(t, "query", evs[0].Step)
	require.Equal(t, saga.Op(msg.OpQuery), evs[0].Op)
	require.Equal(t, msg.PhaseDelivering, d.state.Phase)
	require.Equal(t, saga.StatusSucceeded, d.state.Query.Status)

	d.expect(allDeliveries(2, 1)...)
	d.answer(0, saga.OK)
	d.answer(1, saga.OK)
	d.expect()
	require.Equal(t, msg.PhaseSucceeded, d.state.Phase)
	require.Equal(t, 1, d.state.Query.Attempts)
}

// ABORTED from query-prepared means the local transaction did not commit (and now cannot): the
// message is dropped, nothing is delivered, and a late submit is refused.
func TestQueryAbortedDrops(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(2, 3))
	d.pastDeadline()
	evs := d.answer(-1, saga.Aborted)
	require.Equal(t, []string{"branch_aborted", "aborted"}, kinds(evs))
	require.Equal(t, msg.PhaseAborted, d.state.Phase)
	require.Contains(t, d.state.Reason, "did not commit")
	require.Contains(t, d.state.Reason, "said aborted")
	require.Equal(t, d.state.Reason, evs[1].Detail)
	require.Equal(t, saga.StatusFailed, d.state.Query.Status)

	wake := d.expect()
	require.True(t, wake.IsZero())
	d.requireNoDeliveries()

	before := cloneState(d.state)
	evs, err := d.submit()
	require.Error(t, err)
	require.Contains(t, err.Error(), "aborted")
	require.Contains(t, err.Error(), d.state.Reason, "the refusal says why")
	require.Empty(t, evs)
	require.Equal(t, before, d.state, "a refused submit changes nothing")
	d.requireStaysPut()
	d.requireNoDeliveries()
}

// Anything else from query-prepared is no answer: asked again after a growing backoff, with no
// delivery in the meantime.
func TestQueryTransientRetried(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(1, 10))
	d.pastDeadline()
	for k, want := range []time.Duration{750 * time.Millisecond, 1500 * time.Millisecond, 3 * time.Second} {
		attempt := k + 1
		evs := d.answer(-1, saga.Transient)
		require.Equal(t, []string{"branch_retry"}, kinds(evs))
		require.Contains(t, evs[0].Detail, fmt.Sprintf("attempt %d", attempt))
		q := d.state.Query
		require.Equal(t, saga.StatusUnknown, q.Status)
		require.Equal(t, d.now.Add(want), q.NextAt, "backoff after attempt %d", attempt)
		require.Equal(t, msg.PhasePrepared, d.state.Phase)

		require.Equal(t, q.NextAt, d.expect())
		d.now = q.NextAt.Add(-time.Nanosecond)
		require.Equal(t, q.NextAt, d.expect())
		d.now = q.NextAt
		d.expect(query(attempt + 1))
	}
	d.requireNoDeliveries()
	d.answer(-1, saga.OK)
	d.expect(deliver(0, 1))
	require.Equal(t, 4, d.state.Query.Attempts)
}

func TestQueryOperatorThreshold(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(1, 2))
	d.pastDeadline()
	d.answer(-1, saga.Transient)
	d.now = d.state.Query.NextAt
	d.expect(query(2))
	d.answer(-1, saga.Transient)

	calls, evs, wake := d.advance()
	require.Empty(t, calls)
	require.True(t, wake.IsZero())
	require.Equal(t, msg.PhaseNeedsOperator, d.state.Phase)
	require.Equal(t, []string{"needs_operator"}, kinds(evs))
	require.Contains(t, d.state.Reason, "query-prepared failed 2 times")
	require.Contains(t, d.state.Reason, "said transient", "the reason carries the last error")
	d.requireNoDeliveries()
	d.requireStaysPut()

	// An operator has to resolve it; the application's word does not bypass that.
	_, err := d.submit()
	require.Error(t, err)
	require.Equal(t, msg.PhaseNeedsOperator, d.state.Phase)
}

// Deliveries go out in parallel and are retried until each succeeds: delivery is at least once,
// so a participant's refusal is retried like a failure.
func TestDeliveriesRetriedUntilOK(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(3, 10))
	_, err := d.submit()
	require.NoError(t, err)
	d.expect(allDeliveries(3, 1)...)

	d.answer(0, saga.OK)
	evs := d.answer(1, saga.Transient)
	require.Equal(t, []string{"branch_retry"}, kinds(evs))
	require.Equal(t, t0.Add(750*time.Millisecond), d.state.Deliveries[1].NextAt)
	d.now = t0.Add(100 * time.Millisecond)
	evs = d.answer(2, saga.Aborted)
	require.Equal(t, []string{"branch_retry"}, kinds(evs))
	require.Contains(t, d.state.Deliveries[2].LastError, "ABORTED")
	require.Equal(t, t0.Add(850*time.Millisecond), d.state.Deliveries[2].NextAt)

	// The earliest retry is the wake; each goes out on its own time.
	require.Equal(t, t0.Add(750*time.Millisecond), d.expect())
	d.now = t0.Add(750 * time.Millisecond)
	require.Equal(t, t0.Add(850*time.Millisecond), d.expect(deliver(1, 2)))
	d.now = t0.Add(850 * time.Millisecond)
	d.expect(deliver(2, 2))

	d.answer(1, saga.OK)
	d.answer(2, saga.Transient)
	require.Equal(t, d.now.Add(1500*time.Millisecond), d.state.Deliveries[2].NextAt, "the backoff grows")
	d.now = d.state.Deliveries[2].NextAt
	d.expect(deliver(2, 3))
	require.Equal(t, msg.PhaseDelivering, d.state.Phase)
	d.answer(2, saga.OK)
	d.expect()
	require.Equal(t, msg.PhaseSucceeded, d.state.Phase)
	for i, want := range []int{1, 2, 3} {
		b := d.state.Deliveries[i]
		require.Equal(t, saga.StatusSucceeded, b.Status, "d%d", i)
		require.Equal(t, want, b.Attempts, "d%d", i)
		require.Empty(t, b.LastError, "d%d", i)
		require.True(t, b.NextAt.IsZero(), "d%d", i)
	}
}

// After OperatorThreshold failed attempts of one delivery the message waits for an operator, but
// only once every delivery still out has landed.
func TestDeliveryOperatorThreshold(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(3, 2))
	_, err := d.submit()
	require.NoError(t, err)
	d.expect(allDeliveries(3, 1)...)
	d.answer(0, saga.Transient)
	d.answer(2, saga.Transient)
	d.now = d.state.Deliveries[0].NextAt
	d.expect(deliver(0, 2), deliver(2, 2))
	d.answer(0, saga.Aborted)

	// d0 is at the threshold, d1 and d2 are still out: nothing new starts, nothing is decided.
	wake := d.expect()
	require.True(t, wake.IsZero())
	require.Equal(t, msg.PhaseDelivering, d.state.Phase)
	d.answer(2, saga.Transient) // d2 reaches the threshold too
	d.expect()
	require.Equal(t, msg.PhaseDelivering, d.state.Phase, "d1 is still out")

	d.answer(1, saga.OK)
	calls, evs, wake := d.advance()
	require.Empty(t, calls)
	require.True(t, wake.IsZero())
	require.Equal(t, msg.PhaseNeedsOperator, d.state.Phase)
	require.Equal(t, []string{"needs_operator"}, kinds(evs))
	require.Contains(t, d.state.Reason, "a delivery failed 2 times")
	require.Equal(t, saga.StatusSucceeded, d.state.Deliveries[1].Status, "d1's late OK is kept")
	d.requireStaysPut()
}

// A call that never left the coordinator is not an attempt: retried after a backoff, it never
// brings the message to an operator.
func TestNotSentIsNotAnAttempt(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name  string
		setup func(d *driver)
		call  int
		want  msg.Call
		final msg.Phase
	}{
		{"query", func(d *driver) { d.pastDeadline() }, -1, query(1), msg.PhaseDelivering},
		{"delivery", func(d *driver) {
			_, err := d.submit()
			require.NoError(d.t, err)
			d.expect(deliver(0, 1))
		}, 0, deliver(0, 1), msg.PhaseSucceeded},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := newDriver(t, newSpec(1, 1))
			tc.setup(d)
			for range 5 {
				require.Empty(t, d.notSent(tc.call))
				b := d.state.Query
				if tc.call >= 0 {
					b = d.state.Deliveries[tc.call]
				}
				require.Zero(t, b.Attempts)
				require.Equal(t, saga.StatusPending, b.Status)
				require.Equal(t, d.now.Add(750*time.Millisecond), b.NextAt)
				wake := d.expect()
				require.Equal(t, b.NextAt, wake)
				require.False(t, d.state.Phase.Terminal(), "phase %s after a call that was never sent", d.state.Phase)
				d.now = wake
				d.expect(tc.want)
			}
			d.answer(tc.call, saga.OK)
			d.advance()
			require.Equal(t, tc.final, d.state.Phase)
		})
	}
}

// Recover clears what only the dead driver knew (calls in flight); the phase and the attempts
// made stay, and the lost calls are made again.
func TestRecover(t *testing.T) {
	t.Parallel()
	t.Run("query_in_flight", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, newSpec(1, 3))
		d.pastDeadline()
		before := cloneState(d.state)
		after := msg.Recover(d.state)
		require.Equal(t, before, d.state, "Recover modified its input state")
		require.Equal(t, msg.PhasePrepared, after.Phase)
		require.False(t, after.Query.InFlight)
		require.Equal(t, 1, after.Query.Attempts)
		d.state = after
		d.expect(query(2))
	})
	t.Run("prepared_before_deadline", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, newSpec(1, 3))
		d.state = msg.Recover(d.state)
		require.Equal(t, deadline, d.expect(), "still waiting for the application")
	})
	t.Run("deliveries_in_flight", func(t *testing.T) {
		t.Parallel()
		d := newDriver(t, newSpec(3, 3))
		_, err := d.submit()
		require.NoError(t, err)
		d.expect(allDeliveries(3, 1)...)
		d.answer(1, saga.OK)
		after := msg.Recover(d.state)
		require.Equal(t, msg.PhaseDelivering, after.Phase)
		for i, b := range after.Deliveries {
			require.False(t, b.InFlight, "d%d", i)
		}
		d.state = after
		d.expect(deliver(0, 2), deliver(2, 2))
	})
	t.Run("terminal_unchanged", func(t *testing.T) {
		t.Parallel()
		for _, p := range []msg.Phase{msg.PhaseSucceeded, msg.PhaseAborted, msg.PhaseNeedsOperator} {
			s := msg.New(newSpec(2, 3))
			s.Phase, s.Reason = p, "why"
			require.Equal(t, s, msg.Recover(s), "phase %s", p)
		}
	})
}

// Results the machine is not waiting for change nothing: duplicates, results that mix up the
// query and a delivery, and results for calls that do not exist.
func TestStrayResultsIgnored(t *testing.T) {
	t.Parallel()
	d := newDriver(t, newSpec(2, 3))
	d.pastDeadline()

	mixed := d.result(-1, saga.Aborted)
	mixed.Op = msg.OpDeliver // the query's slot with a delivery's op
	wrongSlot := d.result(0, saga.Aborted)
	wrongSlot.Op = msg.OpQuery // a delivery's slot with the query's op
	unknownOp := d.result(-1, saga.Aborted)
	unknownOp.Op = msg.Op("commit")
	stray := []msg.Result{
		d.result(0, saga.OK), // a delivery never made
		d.result(2, saga.OK),
		mixed, wrongSlot, unknownOp,
	}
	check := func() {
		t.Helper()
		for _, r := range stray {
			before := cloneState(d.state)
			evs := d.apply(r)
			require.Empty(t, evs, "result %+v", r)
			require.Equal(t, before, d.state, "result %+v", r)
		}
	}
	check()
	require.True(t, d.state.Query.InFlight, "the real query is still awaited")

	d.answer(-1, saga.OK)
	// The same answer again, or a contrary one, is a duplicate now.
	stray = append(stray, d.result(-1, saga.OK), d.result(-1, saga.Aborted))
	check()
	require.Equal(t, msg.PhaseDelivering, d.state.Phase)

	d.expect(allDeliveries(2, 1)...)
	d.answer(0, saga.OK)
	stray = append(stray, d.result(0, saga.Transient)) // a failure after the OK
	check()
	require.True(t, d.state.Deliveries[1].InFlight)
}
