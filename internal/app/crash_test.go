package app_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// crashSteps builds a saga of n steps on participant p.
func crashSteps(p *testparticipant.Participant, names ...string) []*treatyv1.SagaStep {
	var out []*treatyv1.SagaStep
	for _, n := range names {
		out = append(out, &treatyv1.SagaStep{
			Name:        n,
			Action:      &treatyv1.Call{Target: p.Target("test.Svc/Do"), Payload: []byte("do-" + n)},
			Compensate:  &treatyv1.Call{Target: p.Target("test.Svc/Undo"), Payload: []byte("undo-" + n)},
			Retry:       &treatyv1.RetryPolicy{MaxAttempts: 5, InitialBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(100 * time.Millisecond)},
			CallTimeout: durationpb.New(time.Second),
		})
	}
	return out
}

// countCalls returns how often each "op:branch" was called for gid.
func countCalls(p *testparticipant.Participant, gid string) map[string]int {
	out := map[string]int{}
	for _, c := range p.CallsFor(gid) {
		out[c.Op+":"+c.Branch]++
	}
	return out
}

// TestCrashRecovery kills a real coordinator process with SIGKILL at named points of a saga's
// life, starts a second one on the same database, and checks that it finishes the saga, that
// the outcome is consistent, and that only the call in flight at the crash was repeated. The
// first coordinator records every result before the next call (--lazy-progress 0);
// TestCrashRecoveryLazyProgress covers the default.
func TestCrashRecovery(t *testing.T) {
	t.Parallel()
	steps := []string{"s0", "s1", "s2"}
	cases := []struct {
		crashAt  string
		abortAt  string // step whose action the participant refuses ("" = none)
		want     treatyv1.Status
		repeated string         // the call allowed (and expected) to happen twice
		calls    map[string]int // exact call counts after recovery
	}{
		{
			crashAt: "after-create", want: treatyv1.Status_STATUS_SUCCEEDED,
			calls: map[string]int{"action:s0": 1, "action:s1": 1, "action:s2": 1},
		},
		{
			crashAt: "after-call:2", want: treatyv1.Status_STATUS_SUCCEEDED, repeated: "action:s1",
			calls: map[string]int{"action:s0": 1, "action:s1": 2, "action:s2": 1},
		},
		{
			crashAt: "after-record:1", want: treatyv1.Status_STATUS_SUCCEEDED,
			calls: map[string]int{"action:s0": 1, "action:s1": 1, "action:s2": 1},
		},
		{
			crashAt: "after-record:2", want: treatyv1.Status_STATUS_SUCCEEDED,
			calls: map[string]int{"action:s0": 1, "action:s1": 1, "action:s2": 1},
		},
		{
			crashAt: "after-compensate:1", abortAt: "s2", want: treatyv1.Status_STATUS_COMPENSATED, repeated: "compensate:s1",
			calls: map[string]int{"action:s0": 1, "action:s1": 1, "action:s2": 1, "compensate:s1": 2, "compensate:s0": 1},
		},
		{
			crashAt: "after-comp-record:1", abortAt: "s2", want: treatyv1.Status_STATUS_COMPENSATED,
			calls: map[string]int{"action:s0": 1, "action:s1": 1, "action:s2": 1, "compensate:s1": 1, "compensate:s0": 1},
		},
	}
	for _, tc := range cases {
		t.Run(tc.crashAt, func(t *testing.T) {
			t.Parallel()
			db := pgtest.NewDatabase(t)
			migrateDB(t, db)
			part, err := testparticipant.Start(testparticipant.Options{Script: abortOn("action", tc.abortAt)})
			require.NoError(t, err)
			t.Cleanup(part.Stop)

			first := startProc(t, db, "TREATY_CRASH_AT="+tc.crashAt, "TREATY_LEASE=1s", "TREATY_LAZY_PROGRESS=0")
			gid := "crash-" + tc.crashAt
			// The submit call itself may die with the process; the saga is durable either way.
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, _ = first.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{
				Gid: gid, Saga: &treatyv1.SagaSpec{Steps: crashSteps(part, steps...)}, Wait: durationpb.New(5 * time.Second),
			})
			cancel()
			first.waitKilled(t)

			second := startProc(t, db, "TREATY_LEASE=1s")
			res, err := second.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: gid, Timeout: durationpb.New(30 * time.Second)})
			require.NoError(t, err)
			require.True(t, res.Terminal, "saga not finished after recovery: %v", res.Transaction)
			require.Equal(t, tc.want, res.Transaction.Status)
			require.Equal(t, tc.calls, countCalls(part, gid))
			if tc.repeated == "" {
				for k, n := range countCalls(part, gid) {
					require.Equal(t, 1, n, "%s repeated though nothing was in flight", k)
				}
			}
		})
	}
}

// TestCrashRecoveryManySagas crashes a coordinator in the middle of 30 concurrent sagas. Each
// saga must end consistent, and each may repeat at most the one call that was in flight.
func TestCrashRecoveryManySagas(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	migrateDB(t, db)
	part, err := testparticipant.Start(testparticipant.Options{Script: func(ctx context.Context, c testparticipant.Call) error {
		time.Sleep(2 * time.Millisecond)
		return abortOn("action", "s2")(ctx, c) // every saga turns back at its last step
	}})
	require.NoError(t, err)
	t.Cleanup(part.Stop)

	first := startProc(t, db, "TREATY_CRASH_AT=after-record:40", "TREATY_LEASE=1s", "TREATY_LAZY_PROGRESS=0")
	const n = 30
	for i := range n {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_, _ = first.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{
				Gid: fmt.Sprintf("many-%d", i), Saga: &treatyv1.SagaSpec{Steps: crashSteps(part, "s0", "s1", "s2")},
			})
		}()
	}
	first.waitKilled(t)
	second := startProc(t, db, "TREATY_LEASE=1s")
	for i := range n {
		gid := fmt.Sprintf("many-%d", i)
		res, err := second.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: gid, Timeout: durationpb.New(30 * time.Second)})
		if err != nil {
			// Submitted after the crash began: never stored, never called.
			require.Contains(t, err.Error(), "not found")
			require.Empty(t, part.CallsFor(gid))
			continue
		}
		require.True(t, res.Terminal, "%s not finished", gid)
		require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, res.Transaction.Status, gid)
		calls := countCalls(part, gid)
		repeats := 0
		for k, c := range calls {
			require.LessOrEqual(t, c, 2, "%s: %s called %d times", gid, k, c)
			if c == 2 {
				repeats++
			}
		}
		require.LessOrEqual(t, repeats, 1, "%s: more than the in-flight call was repeated: %v", gid, calls)
		// Consistent: every action that ran was compensated.
		for _, s := range []string{"s0", "s1"} {
			require.GreaterOrEqual(t, calls["action:"+s], 1, gid)
			require.GreaterOrEqual(t, calls["compensate:"+s], 1, "%s: %s ran but was not compensated", gid, s)
		}
	}
}

// TestCrashRecoveryLazyProgress crashes a coordinator that records a saga's forward progress
// lazily (--lazy-progress, long enough here that the three steps fit in it): a crash before the
// saga's one write after its creation repeats the calls that had answered, and nothing else;
// a crash right after that write repeats nothing, because that write carried every result and
// the outcome.
func TestCrashRecoveryLazyProgress(t *testing.T) {
	t.Parallel()
	cases := []struct {
		crashAt string
		calls   map[string]int
	}{
		// s0 and s1 answered, unrecorded: both run again; s2 once (it was never called).
		{crashAt: "after-call:2", calls: map[string]int{"action:s0": 2, "action:s1": 2, "action:s2": 1}},
		// The first record after the creation is the saga's last: all three results in it.
		{crashAt: "after-record:1", calls: map[string]int{"action:s0": 1, "action:s1": 1, "action:s2": 1}},
	}
	for _, tc := range cases {
		t.Run(tc.crashAt, func(t *testing.T) {
			t.Parallel()
			db := pgtest.NewDatabase(t)
			migrateDB(t, db)
			part, err := testparticipant.Start(testparticipant.Options{})
			require.NoError(t, err)
			t.Cleanup(part.Stop)

			first := startProc(t, db, "TREATY_CRASH_AT="+tc.crashAt, "TREATY_LEASE=1s", "TREATY_LAZY_PROGRESS=1m")
			gid := "lazy-" + tc.crashAt
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_, _ = first.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{
				Gid: gid, Saga: &treatyv1.SagaSpec{Steps: crashSteps(part, "s0", "s1", "s2")}, Wait: durationpb.New(5 * time.Second),
			})
			cancel()
			first.waitKilled(t)

			second := startProc(t, db, "TREATY_LEASE=1s")
			res, err := second.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: gid, Timeout: durationpb.New(30 * time.Second)})
			require.NoError(t, err)
			require.True(t, res.Terminal, "saga not finished after recovery: %v", res.Transaction)
			require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
			require.Equal(t, tc.calls, countCalls(part, gid))
			// The history dates each step when it answered, not when it was written.
			var at []time.Time
			for _, ev := range res.Transaction.Events {
				if ev.Kind == "branch_succeeded" {
					at = append(at, ev.At.AsTime())
				}
			}
			require.NotEmpty(t, at)
			for i := 1; i < len(at); i++ {
				require.False(t, at[i].Before(at[i-1]), "history out of order: %v", at)
			}
		})
	}
}
