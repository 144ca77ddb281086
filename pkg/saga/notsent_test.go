package saga_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/saga"
)

// A call refused locally (open breaker, no slot) is not an attempt: it counts toward no limit,
// leaves the branch as it was, and is retried after a backoff.
func TestNotSentIsNotAnAttempt(t *testing.T) {
	t.Parallel()
	t0 := time.Unix(1000, 0)
	spec := saga.Spec{
		Steps:             []saga.Step{{Name: "a", MaxAttempts: 1, InitialBackoff: 100 * time.Millisecond, MaxBackoff: time.Second}},
		Deadline:          t0.Add(time.Hour),
		OperatorThreshold: 1,
	}
	s := saga.New(spec)
	for i := range 5 {
		now := t0.Add(time.Duration(i) * time.Second)
		var calls []saga.Call
		s, calls, _, _ = saga.Advance(spec, s, now)
		require.Len(t, calls, 1)
		var events []saga.Event
		s, events = saga.Apply(spec, s, saga.Result{Step: 0, Op: saga.OpAction, Outcome: saga.Transient, Err: "breaker open", At: now, NotSent: true})
		require.Empty(t, events)
		require.Equal(t, saga.PhaseRunning, s.Phase, "a call that was never sent must not exhaust MaxAttempts=1")
		require.Equal(t, saga.StatusPending, s.Steps[0].Action.Status)
		require.Zero(t, s.Steps[0].Action.Attempts)
		require.False(t, saga.NeedsCompensation(s.Steps[0]))
		// Nothing is due before the backoff.
		_, calls, _, wake := saga.Advance(spec, s, now)
		require.Empty(t, calls)
		require.True(t, wake.After(now))
	}
	s, calls, _, _ := saga.Advance(spec, s, t0.Add(time.Minute))
	require.Len(t, calls, 1)
	s, _ = saga.Apply(spec, s, saga.Result{Step: 0, Op: saga.OpAction, Outcome: saga.OK, At: t0.Add(time.Minute)})
	s, _, _, _ = saga.Advance(spec, s, t0.Add(time.Minute))
	require.Equal(t, saga.PhaseSucceeded, s.Phase)
	require.Equal(t, 1, s.Steps[0].Action.Attempts)
}
