package msg_test

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"pgregory.net/rapid"

	"github.com/treatyhq/treaty/pkg/msg"
	"github.com/treatyhq/treaty/pkg/saga"
)

// TestProperties drives random messages to the end the way the engine and the application do:
// the application's local transaction commits at some instant or never, and the application
// submits after it or not at all; the engine advances, records the events before making the
// calls, feeds outcomes back with Apply in any order and advances again, with random latencies,
// time jumps and crashes. What the package doc promises is checked against a record the test
// keeps itself rather than against the state under test.
func TestProperties(t *testing.T) {
	t.Parallel()
	rapid.Check(t, runMsg)
}

// world is the test's own record of the application and the participants, across crashes.
type world struct {
	spec msg.Spec

	// The application's local transaction commits at commitAt if it means to, unless a query
	// reached its barrier first (barred): then it can never commit.
	commitPlanned bool
	commitAt      time.Time
	barred        bool
	everCommitted bool
	// The application submits at submitAt once committed, if it means to.
	submitPlanned bool
	submitAt      time.Time
	submitted     bool

	queryOK, queryAborted bool // what query-prepared has answered
	queryAnsweredThisLife bool // the machine in memory was told the answer

	sent           []int  // delivery calls that left the coordinator, lost ones included
	ok             []bool // an OK was delivered for this delivery
	okThisLife     []bool // the same, since the last crash
	failBudget     []int  // failures a delivery gives before it succeeds
	failures       []int
	queryInFlight  bool
	inflight       []flight // deliveries and queries made whose result has not been delivered
	latencyMax     int      // milliseconds, for most calls
	deliveryRecord bool     // the decision to deliver was recorded before a delivery went out
}

// committed reports whether the local transaction has committed by now, and records it.
func (w *world) committed(now time.Time) bool {
	if w.commitPlanned && !w.barred && !now.Before(w.commitAt) {
		w.everCommitted = true
	}
	return w.everCommitted
}

// flight is a call made and the instant its result comes back.
type flight struct {
	call msg.Call
	due  time.Time
}

func (w *world) inFlight(c msg.Call) bool {
	return slices.ContainsFunc(w.inflight, func(f flight) bool { return f.call.Delivery == c.Delivery && f.call.Op == c.Op })
}

// latency draws how long a call takes: mostly quick, now and then a participant that hangs.
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

func anyInFlight(s msg.State) bool {
	return s.Query.InFlight || slices.ContainsFunc(s.Deliveries, func(b msg.Branch) bool { return b.InFlight })
}

func branchOf(s msg.State, i int) msg.Branch {
	if i < 0 {
		return s.Query
	}
	return s.Deliveries[i]
}

func genSpec(t *rapid.T) msg.Spec {
	n := rapid.IntRange(1, 6).Draw(t, "deliveries")
	pol := func(name string) msg.Policy {
		initial := time.Duration(rapid.IntRange(1, 2000).Draw(t, "initial_backoff_ms")) * time.Millisecond
		return msg.Policy{Name: name, InitialBackoff: initial, MaxBackoff: initial * time.Duration(rapid.IntRange(1, 8).Draw(t, "max_backoff_factor"))}
	}
	spec := msg.Spec{
		Query: pol("query"),
		// rapid favours small numbers: without the offset, most deadlines would pass at once.
		Deadline: t0.Add(time.Second + time.Duration(rapid.IntRange(0, 20_000).Draw(t, "deadline_ms"))*time.Millisecond),
		// Listed so that the most likely draw lets a failure or two be retried.
		OperatorThreshold: rapid.SampledFrom([]int{3, 5, 1, 2, 8}).Draw(t, "operator_threshold"),
	}
	for i := range n {
		spec.Deliveries = append(spec.Deliveries, pol(fmt.Sprintf("d%d", i)))
	}
	return spec
}

func runMsg(t *rapid.T) {
	spec := genSpec(t)
	n := len(spec.Deliveries)
	w := &world{
		spec:          spec,
		commitPlanned: rapid.IntRange(0, 3).Draw(t, "commits") > 0,
		commitAt:      t0.Add(time.Duration(rapid.IntRange(0, 15_000).Draw(t, "commit_ms")) * time.Millisecond),
		submitPlanned: rapid.IntRange(0, 3).Draw(t, "submits") > 0,
		sent:          make([]int, n), ok: make([]bool, n), okThisLife: make([]bool, n),
		failBudget: make([]int, n), failures: make([]int, n),
	}
	w.submitAt = w.commitAt.Add(time.Duration(rapid.IntRange(0, 5000).Draw(t, "submit_delay_ms")) * time.Millisecond)
	for i := range n {
		// Mostly none or a failure or two, sometimes enough to reach the operator threshold.
		if rapid.Bool().Draw(t, "delivery_fails") {
			w.failBudget[i] = rapid.IntRange(1, 2).Draw(t, "delivery_failures")
		}
		if rapid.IntRange(0, 7).Draw(t, "stubborn") == 7 {
			w.failBudget[i] = rapid.IntRange(0, 8).Draw(t, "stubborn_failures")
		}
	}
	queryTransientPct := rapid.SampledFrom([]int{0, 10, 60}).Draw(t, "query_transient_pct")
	notSentPct := rapid.SampledFrom([]int{0, 5, 20}).Draw(t, "not_sent_pct")
	w.latencyMax = rapid.SampledFrom([]int{200, 1000, 5000}).Draw(t, "max_latency_ms")
	// At most this many crashes. Each is the largest value of a range below: rapid favours
	// small numbers, so that is the rare draw.
	crashes := rapid.IntRange(0, 3).Draw(t, "crashes")

	s := msg.New(spec)
	durable := s     // what storage holds
	pending := false // events returned but not recorded yet
	now := t0
	var last *msg.Result

	crash := func() {
		crashes--
		// A query lost in flight may still have reached the application's barrier.
		if w.queryInFlight && !w.committed(now) && rapid.Bool().Draw(t, "lost_query_barred") {
			w.barred = true
		}
		s = msg.Recover(durable)
		require.False(t, anyInFlight(s), "Recover leaves nothing in flight")
		require.Equal(t, durable.Phase, s.Phase, "Recover keeps the recorded phase")
		pending = false
		w.inflight, w.queryInFlight = nil, false
		w.okThisLife, w.queryAnsweredThisLife = make([]bool, n), false
		last = nil
	}
	submitDue := func() bool {
		return w.submitPlanned && !w.submitted && !now.Before(w.submitAt) && w.committed(now)
	}

	for iter := 0; ; iter++ {
		require.Less(t, iter, 3000, "not terminal after %d rounds: phase %s, state %+v", iter, s.Phase, s)

		before := s
		next, calls, evs, wake := msg.Advance(spec, s, now)
		if len(evs) > 0 {
			pending = true
		}
		if crashes > 0 && rapid.IntRange(0, 40).Draw(t, "crash_before_write") == 40 {
			if !pending {
				w.checkCalls(t, before, next, durable, calls, now)
			}
			crash()
			continue
		}
		if pending {
			durable, pending = next, false
		}
		s = next
		w.checkCalls(t, before, s, durable, calls, now)
		if s.Phase.Terminal() {
			require.Equal(t, s.Phase, durable.Phase, "the outcome is recorded")
			w.checkTerminal(t, s, now)
			return
		}
		require.False(t, len(calls) == 0 && len(w.inflight) == 0 && wake.IsZero(),
			"stalled in phase %s: nothing dispatched, nothing in flight, no wake; state %+v", s.Phase, s)
		if !wake.IsZero() {
			require.True(t, wake.After(now), "wake %s is not after now %s", wake, now)
		}
		if s.Phase == msg.PhasePrepared && now.Before(spec.Deadline) {
			require.Equal(t, spec.Deadline, wake, "a prepared message waits for its deadline")
		}

		switch {
		case crashes > 0 && rapid.IntRange(0, 30).Draw(t, "crash") == 30:
			crash()

		case submitDue() && len(w.inflight) == 0 && rapid.IntRange(0, 3).Draw(t, "submit_now") < 3:
			// The coordinator moves a message on submit only while no replica is driving it;
			// otherwise its query will find the commit.
			prev := s
			got, evs, err := msg.Submit(s)
			require.NoError(t, err, "submit of a committed message in phase %s", s.Phase)
			if prev.Phase == msg.PhasePrepared {
				require.Equal(t, []string{"delivering"}, kinds(evs))
			} else {
				require.Empty(t, evs, "second submit")
				require.Equal(t, prev, got)
			}
			require.Equal(t, msg.PhaseDelivering, got.Phase)
			s, durable = got, got // one transition in storage, with its event
			w.submitted = true
			if rapid.Bool().Draw(t, "submit_twice") {
				again, evs, err := msg.Submit(s)
				require.NoError(t, err)
				require.Empty(t, evs)
				require.Equal(t, s, again)
			}

		case last != nil && !w.inFlight(msg.Call{Delivery: last.Delivery, Op: last.Op}) && rapid.IntRange(0, 9).Draw(t, "duplicate") == 0:
			got, evs := msg.Apply(spec, s, *last)
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
			r := msg.Result{Delivery: c.Delivery, Op: c.Op, Err: "err", At: now, Jitter: rapid.Float64Range(0, 0.999).Draw(t, "jitter")}
			// rapid favours small draws: let them mean the common outcome, the last case below.
			x := 99 - rapid.IntRange(0, 99).Draw(t, "outcome")
			switch {
			case x < notSentPct:
				r.Outcome, r.NotSent = saga.Transient, true
				if c.Op == msg.OpDeliver {
					w.sent[c.Delivery]--
				}
			case c.Op == msg.OpQuery && x < notSentPct+queryTransientPct:
				// No answer; the query may still have reached the barrier.
				r.Outcome = saga.Transient
				if !w.committed(now) && rapid.Bool().Draw(t, "transient_query_barred") {
					w.barred = true
				}
			case c.Op == msg.OpQuery:
				// The application answers from its barrier: committed, or now never will.
				if w.committed(now) {
					r.Outcome = saga.OK
					w.queryOK, w.queryAnsweredThisLife = true, true
				} else {
					r.Outcome = saga.Aborted
					w.barred, w.queryAborted, w.queryAnsweredThisLife = true, true, true
				}
			case w.failures[c.Delivery] < w.failBudget[c.Delivery]:
				w.failures[c.Delivery]++
				r.Outcome = rapid.SampledFrom([]saga.Outcome{saga.Transient, saga.Aborted}).Draw(t, "delivery_failure")
			default:
				r.Outcome = saga.OK
				w.ok[c.Delivery], w.okThisLife[c.Delivery] = true, true
			}
			if c.Op == msg.OpQuery {
				w.queryInFlight = false
			}
			require.True(t, branchOf(s, c.Delivery).InFlight, "state does not know call %+v is in flight", c)
			var evs []msg.Event
			s, evs = msg.Apply(spec, s, r)
			require.False(t, branchOf(s, c.Delivery).InFlight)
			if len(evs) > 0 {
				pending = true
			} else {
				require.True(t, r.NotSent, "result %+v recorded no event", r)
			}
			last = &r

		default:
			target := wake
			if w.submitPlanned && !w.submitted && w.submitAt.After(now) && (target.IsZero() || w.submitAt.Before(target)) {
				target = w.submitAt // the application acts on its own clock
			}
			require.False(t, target.IsZero(), "nothing to wait for in phase %s", s.Phase)
			if !wake.IsZero() && rapid.Bool().Draw(t, "peek_early") {
				// Nothing new is due before wake: an early Advance dispatches and decides nothing.
				early := now.Add(time.Duration(rapid.Int64Range(0, int64(wake.Sub(now))-1).Draw(t, "early_ns")))
				got, calls, evs, again := msg.Advance(spec, s, early)
				require.Empty(t, calls, "Advance at %s, before wake %s", early, wake)
				require.Empty(t, evs, "Advance at %s, before wake %s", early, wake)
				require.Equal(t, wake, again)
				require.Equal(t, s, got)
			}
			now = target.Add(time.Duration(rapid.IntRange(0, 1000).Draw(t, "oversleep_ms")) * time.Millisecond)
		}
	}
}

func (w *world) checkCalls(t *rapid.T, before, next, durable msg.State, calls []msg.Call, now time.Time) {
	if before.Phase.Terminal() || next.Phase.Terminal() {
		require.Empty(t, calls, "calls made in terminal phase %s", next.Phase)
	}
	for _, c := range calls {
		require.False(t, w.inFlight(c), "call %+v while the same call is in flight", c)
		prev := branchOf(before, c.Delivery)
		require.False(t, prev.NextAt.After(now), "call %+v at %s before its NextAt %s", c, now, prev.NextAt)
		require.Equal(t, prev.Attempts+1, c.Attempt, "call %+v", c)
		require.NotEqual(t, saga.StatusSucceeded, prev.Status, "call %+v of a branch that succeeded", c)
		require.True(t, branchOf(next, c.Delivery).InFlight, "call %+v not marked in flight", c)
		switch c.Op {
		case msg.OpQuery:
			require.Equal(t, -1, c.Delivery)
			require.Equal(t, msg.PhasePrepared, next.Phase, "query %+v outside prepared", c)
			require.False(t, now.Before(w.spec.Deadline), "query %+v at %s before the deadline %s", c, now, w.spec.Deadline)
			require.False(t, w.submitted, "query %+v of a submitted message", c)
			require.False(t, w.queryAnsweredThisLife, "query %+v after this coordinator was told the answer", c)
			w.queryInFlight = true
		case msg.OpDeliver:
			require.True(t, c.Delivery >= 0 && c.Delivery < len(w.sent), "call %+v", c)
			require.Equal(t, msg.PhaseDelivering, next.Phase, "delivery %+v outside delivering", c)
			require.Equal(t, msg.PhaseDelivering, durable.Phase, "delivery %+v before the decision to deliver was recorded", c)
			require.False(t, w.queryAborted, "delivery %+v after query-prepared said ABORTED", c)
			require.True(t, w.submitted || w.queryOK, "delivery %+v of a message neither submitted nor confirmed", c)
			require.True(t, w.everCommitted, "delivery %+v of a local transaction that never committed", c)
			require.False(t, w.okThisLife[c.Delivery], "delivery %+v after this coordinator was told it succeeded", c)
			w.sent[c.Delivery]++
		default:
			t.Fatalf("call with unknown op: %+v", c)
		}
		w.inflight = append(w.inflight, flight{call: c, due: now.Add(w.latency(t))})
	}
}

func (w *world) checkTerminal(t *rapid.T, s msg.State, now time.Time) {
	require.Empty(t, w.inflight, "phase %s with calls in flight", s.Phase)
	require.False(t, anyInFlight(s))
	w.committed(now)
	delivered := slices.ContainsFunc(w.sent, func(k int) bool { return k > 0 })
	if w.submitted || w.everCommitted {
		require.Contains(t, []msg.Phase{msg.PhaseSucceeded, msg.PhaseNeedsOperator}, s.Phase,
			"a committed message (submitted: %t) ended %s", w.submitted, s.Phase)
	}
	if !w.everCommitted {
		require.False(t, delivered, "a message whose local transaction never committed was delivered")
	}
	if w.queryAborted {
		require.False(t, delivered, "a message query-prepared said ABORTED for was delivered")
	}
	switch s.Phase {
	case msg.PhaseSucceeded:
		require.NotContains(t, w.ok, false, "succeeded without every delivery succeeding")
		for i, b := range s.Deliveries {
			require.Equal(t, saga.StatusSucceeded, b.Status, "d%d", i)
		}
		got, evs, err := msg.Submit(s)
		require.NoError(t, err, "a late submit of a delivered message is fine")
		require.Empty(t, evs)
		require.Equal(t, s, got)
	case msg.PhaseAborted:
		require.True(t, w.queryAborted, "aborted without query-prepared saying so")
		require.False(t, w.submitted)
		require.False(t, delivered)
		got, evs, err := msg.Submit(s)
		require.Error(t, err, "submit once aborted")
		require.Empty(t, evs)
		require.Equal(t, s, got)
	case msg.PhaseNeedsOperator:
		stuck := s.Query.Attempts >= w.spec.OperatorThreshold && s.Query.Status != saga.StatusSucceeded
		for _, b := range s.Deliveries {
			if b.Status != saga.StatusSucceeded && b.Attempts >= w.spec.OperatorThreshold {
				stuck = true
			}
		}
		require.True(t, stuck, "needs an operator with no call at the threshold; state %+v", s)
	default:
		t.Fatalf("unknown terminal phase %s", s.Phase)
	}
	got, calls, evs, wake := msg.Advance(w.spec, s, now.Add(24*time.Hour))
	require.Empty(t, calls)
	require.Empty(t, evs)
	require.True(t, wake.IsZero())
	require.Equal(t, s, got)
}
