package saga_test

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/saga"
)

// failUntil drives one step whose action fails transiently at every attempt, each result
// arriving as soon as the call is made, until the saga turns back or stop says so. It returns
// the state and the instants of the attempts.
func failUntil(t *testing.T, spec saga.Spec, start time.Time, jitter float64, stop func(time.Time) bool) (saga.State, []time.Time, []saga.Event) {
	t.Helper()
	s := saga.New(spec)
	now := start
	var at []time.Time
	var all []saga.Event
	for range 10000 {
		var calls []saga.Call
		var evs []saga.Event
		var wake time.Time
		if stop(now) {
			return s, at, all
		}
		s, calls, evs, wake = saga.Advance(spec, s, now)
		all = append(all, evs...)
		if s.Phase != saga.PhaseRunning {
			return s, at, all
		}
		if len(calls) == 0 {
			require.False(t, wake.IsZero(), "a waiting saga says when to look again")
			now = wake
			continue
		}
		at = append(at, now)
		s, evs = saga.Apply(spec, s, saga.Result{Step: 0, Op: saga.OpAction, Outcome: saga.Transient, Err: "connection refused", At: now, Jitter: jitter})
		all = append(all, evs...)
	}
	t.Fatal("the saga never turned back")
	return s, at, all
}

// The default policy has no attempt limit: a step is retried, with backoff capped at MaxBackoff,
// until its window has passed since its first failure; the last attempt falls at the window's end.
func TestRetryWindowRetriesUntilItEnds(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 2, 14, 0, 0, 0, time.UTC)
	spec := saga.Spec{
		Steps:             []saga.Step{{Name: "pay", InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second, RetryWindow: 5 * time.Minute}},
		Deadline:          t0.Add(time.Hour),
		OperatorThreshold: 1,
	}
	for _, jitter := range []float64{0, 0.5, 0.999} {
		s, at, evs := failUntil(t, spec, t0, jitter, func(time.Time) bool { return false })
		require.Equal(t, saga.PhaseCompensating, s.Phase)
		require.Greater(t, len(at), 250, "about one attempt a second for five minutes")
		for i := 1; i < len(at); i++ {
			require.LessOrEqual(t, at[i].Sub(at[i-1]), time.Second, "backoff is capped")
		}
		require.Equal(t, t0.Add(5*time.Minute), at[len(at)-1], "the last attempt is at the window's end")
		require.Equal(t, saga.StatusFailed, s.Steps[0].Action.Status)
		require.True(t, saga.NeedsCompensation(s.Steps[0]), "a transient failure may have taken effect")
		require.Contains(t, s.Reason, `step "pay" failed`)
		require.Contains(t, s.Reason, "retry window 5m0s ended 14:05:00.000Z")
		require.Contains(t, s.Reason, "connection refused")
		var retry saga.Event
		for _, e := range evs {
			if e.Kind == "branch_retry" && strings.HasPrefix(e.Detail, "attempt 7:") {
				retry = e
			}
		}
		require.Contains(t, retry.Detail, "retrying until 14:05:00.000Z", "the history says until when")
	}
}

// The window never passes the saga's deadline.
func TestRetryWindowEndsAtDeadline(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 2, 14, 0, 0, 0, time.UTC)
	spec := saga.Spec{
		Steps:             []saga.Step{{Name: "pay", InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second, RetryWindow: 5 * time.Minute}},
		Deadline:          t0.Add(30 * time.Second),
		OperatorThreshold: 1,
	}
	s, at, evs := failUntil(t, spec, t0, 0.5, func(time.Time) bool { return false })
	require.Equal(t, saga.PhaseCompensating, s.Phase)
	require.False(t, at[len(at)-1].After(spec.Deadline))
	require.Contains(t, evs[1].Detail, "retrying until 14:00:30.000Z")
}

// An explicit attempt limit wins over the window.
func TestMaxAttemptsWinsOverNoWindow(t *testing.T) {
	t.Parallel()
	t0 := time.Unix(1000, 0)
	spec := saga.Spec{
		Steps:             []saga.Step{{Name: "pay", MaxAttempts: 3, InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}},
		Deadline:          t0.Add(time.Hour),
		OperatorThreshold: 1,
	}
	s, at, evs := failUntil(t, spec, t0, 0.5, func(time.Time) bool { return false })
	require.Equal(t, saga.PhaseCompensating, s.Phase)
	require.Len(t, at, 3)
	require.Contains(t, s.Reason, "failed 3 times (max_attempts 3)")
	require.Contains(t, evs[1].Detail, "retrying up to attempt 3")
}

// A step that fails for a while and then succeeds inside its window succeeds: the saga never
// turns back.
func TestRetryWindowSucceedsWhenBack(t *testing.T) {
	t.Parallel()
	t0 := time.Unix(1000, 0)
	spec := saga.Spec{
		Steps:             []saga.Step{{Name: "pay", InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second, RetryWindow: time.Minute}},
		Deadline:          t0.Add(time.Hour),
		OperatorThreshold: 1,
	}
	back := t0.Add(55 * time.Second)
	s, at, _ := failUntil(t, spec, t0, 0.5, func(now time.Time) bool { return !now.Before(back) })
	require.Equal(t, saga.PhaseRunning, s.Phase)
	due := back
	if next := s.Steps[0].Action.NextAt; next.After(back) {
		due = next
	}
	require.LessOrEqual(t, due.Sub(back), time.Second, "called again within the backoff cap of its return")
	s, calls, _, _ := saga.Advance(spec, s, due)
	require.Len(t, calls, 1)
	s, _ = saga.Apply(spec, s, saga.Result{Step: 0, Op: saga.OpAction, Outcome: saga.OK, At: back.Add(time.Second)})
	s, _, _, _ = saga.Advance(spec, s, back.Add(time.Second))
	require.Equal(t, saga.PhaseSucceeded, s.Phase)
	require.Equal(t, len(at)+1, s.Steps[0].Action.Attempts)
}

// A call refused by an open breaker comes back when the breaker lets calls through, not after
// the step's backoff, and is not an attempt.
func TestNotSentComesBackAfterRetryAfter(t *testing.T) {
	t.Parallel()
	t0 := time.Unix(1000, 0)
	spec := saga.Spec{
		Steps:             []saga.Step{{Name: "pay", InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second, RetryWindow: time.Minute}},
		Deadline:          t0.Add(time.Hour),
		OperatorThreshold: 1,
	}
	s := saga.New(spec)
	s, calls, _, _ := saga.Advance(spec, s, t0)
	require.Len(t, calls, 1)
	s, _ = saga.Apply(spec, s, saga.Result{Step: 0, Op: saga.OpAction, Outcome: saga.Transient, Err: "breaker open", At: t0, NotSent: true, RetryAfter: 1500 * time.Millisecond, Jitter: 0.5})
	require.Zero(t, s.Steps[0].Action.Attempts)
	require.Equal(t, t0.Add(1550*time.Millisecond), s.Steps[0].Action.NextAt)
}

// A step whose calls are all held back (the breaker stays open) turns back when its window ends,
// although no call was ever sent; nothing needs compensating for it.
func TestRetryWindowEndsForCallsHeldBack(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 2, 14, 0, 0, 0, time.UTC)
	spec := saga.Spec{
		Steps:             []saga.Step{{Name: "pay", InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second, RetryWindow: time.Minute}},
		Deadline:          t0.Add(time.Hour),
		OperatorThreshold: 1,
	}
	s := saga.New(spec)
	now := t0
	var evs []saga.Event
	for range 1000 {
		var calls []saga.Call
		var wake time.Time
		s, calls, _, wake = saga.Advance(spec, s, now)
		if s.Phase != saga.PhaseRunning {
			break
		}
		if len(calls) == 0 {
			now = wake
			continue
		}
		s, evs = saga.Apply(spec, s, saga.Result{Step: 0, Op: saga.OpAction, Outcome: saga.Transient, Err: "breaker open", At: now, NotSent: true, RetryAfter: time.Second})
		require.Zero(t, s.Steps[0].Action.Attempts, "held back is not an attempt")
		if s.Phase != saga.PhaseRunning {
			break
		}
	}
	require.Equal(t, saga.PhaseCompensating, s.Phase)
	require.Equal(t, t0.Add(time.Minute), now, "it turns back when the window ends")
	require.Equal(t, "branch_exhausted", evs[0].Kind)
	require.Contains(t, s.Reason, "retry window 1m0s ended 14:01:00.000Z, calls held back without being sent: breaker open")
	require.False(t, saga.NeedsCompensation(s.Steps[0]), "a call never sent needs no compensation")
	s, _, _, _ = saga.Advance(spec, s, now)
	require.Equal(t, saga.PhaseCompensated, s.Phase)
}

// A step that failed, then had its calls held back until the window ended, gives up with the
// participant's last answer, not the breaker's.
func TestRetryWindowEndsHeldBackAfterFailures(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 1, 2, 14, 0, 0, 0, time.UTC)
	spec := saga.Spec{
		Steps:             []saga.Step{{Name: "pay", InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second, RetryWindow: 10 * time.Second}},
		Deadline:          t0.Add(time.Hour),
		OperatorThreshold: 1,
	}
	s := saga.New(spec)
	s, _, _, _ = saga.Advance(spec, s, t0)
	s, _ = saga.Apply(spec, s, saga.Result{Step: 0, Op: saga.OpAction, Outcome: saga.Transient, Err: "payments down", At: t0})
	now := s.Steps[0].Action.NextAt
	for s.Phase == saga.PhaseRunning {
		var calls []saga.Call
		var wake time.Time
		s, calls, _, wake = saga.Advance(spec, s, now)
		if len(calls) == 0 {
			now = wake
			continue
		}
		s, _ = saga.Apply(spec, s, saga.Result{Step: 0, Op: saga.OpAction, Outcome: saga.Transient, Err: "breaker open", At: now, NotSent: true, RetryAfter: time.Second})
	}
	require.Equal(t, `step "pay" failed 1 times, retry window 10s ended 14:00:10.000Z, the last calls held back: payments down`, s.Reason)
	require.True(t, saga.NeedsCompensation(s.Steps[0]), "the one real attempt may have taken effect")
}
