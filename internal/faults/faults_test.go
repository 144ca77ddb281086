package faults_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"

	"github.com/treatyhq/treaty/internal/faults"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store/sqlite"
	"github.com/treatyhq/treaty/pkg/fault"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type bundle struct {
	inj   *faults.Injector
	reg   *prometheus.Registry
	calls atomic.Int64
}

// setup builds an injector on a real (embedded) store.
func setup(t *testing.T, enabled bool) *bundle {
	t.Helper()
	st, err := sqlite.Open(t.Context(), sqlite.Memory)
	require.NoError(t, err)
	_, err = st.Migrate(t.Context())
	require.NoError(t, err)
	t.Cleanup(st.Close)
	b := &bundle{reg: prometheus.NewRegistry()}
	b.inj, err = faults.New(faults.Config{Store: st, Enabled: enabled, Registerer: b.reg, Refresh: time.Hour})
	require.NoError(t, err)
	b.inj.Start(context.Background())
	t.Cleanup(b.inj.Stop)
	return b
}

func (b *bundle) next(context.Context, invoke.Request) invoke.Result {
	b.calls.Add(1)
	return invoke.Result{Outcome: invoke.OK, Code: codes.OK}
}

func req(gid string, timeout time.Duration) invoke.Request {
	return invoke.Request{Target: "grpc://127.0.0.1:1/bank.Ledger/Debit", Timeout: timeout,
		Metadata: invoke.Metadata{GID: gid, Branch: "debit", Op: "action", Mode: "saga"}}
}

func TestDisabledRefusesAndNeverInjects(t *testing.T) {
	t.Parallel()
	b := setup(t, false)
	_, err := b.inj.Create(t.Context(), fault.Rule{Effect: fault.EffectDrop, Reason: "r"}, time.Hour, "alice")
	require.True(t, errors.Is(err, faults.ErrDisabled), "%v", err)
	res, note := b.inj.Call(t.Context(), "", req("g", time.Second), b.next)
	require.Equal(t, invoke.OK, res.Outcome)
	require.Empty(t, note)
	require.EqualValues(t, 0, b.metric(t, "treaty_fault_rules_active"))
}

// TestDelayCountsAgainstTimeout: a delayed call gets only what is left of its timeout, and a
// delay longer than the timeout never sends the call: an injected fault cannot make a call
// outlive the lease the engine sized its timeout by.
func TestDelayCountsAgainstTimeout(t *testing.T) {
	t.Parallel()
	b := setup(t, true)
	_, err := b.inj.Create(t.Context(), fault.Rule{GIDPrefix: "d-", Effect: fault.EffectDelay, Delay: fault.Duration(100 * time.Millisecond), Reason: "slow"}, time.Hour, "alice")
	require.NoError(t, err)
	var got time.Duration
	res, note := b.inj.Call(t.Context(), "", req("d-1", 2*time.Second), func(ctx context.Context, r invoke.Request) invoke.Result {
		got = r.Timeout
		return b.next(ctx, r)
	})
	require.Equal(t, invoke.OK, res.Outcome)
	// What is left: 2s less the delay, less the time taking a firing from the store took.
	require.LessOrEqual(t, got, 1900*time.Millisecond)
	require.Greater(t, got, time.Duration(0))
	require.Contains(t, note, "delayed 100ms")
	require.GreaterOrEqual(t, res.Duration, 100*time.Millisecond)

	res, _ = b.inj.Call(t.Context(), "", req("d-2", 50*time.Millisecond), b.next)
	require.Equal(t, invoke.Transient, res.Outcome)
	require.Equal(t, codes.DeadlineExceeded, res.Code)
	require.EqualValues(t, 1, b.calls.Load(), "the over-long delay did not send the call")
}

func TestDropWaitsForTimeoutAndMaxCountExhausts(t *testing.T) {
	t.Parallel()
	b := setup(t, true)
	_, err := b.inj.Create(t.Context(), fault.Rule{Effect: fault.EffectDrop, MaxCount: 1, Reason: "silent"}, time.Hour, "alice")
	require.NoError(t, err)
	res, note := b.inj.Call(t.Context(), "", req("x-1", 50*time.Millisecond), b.next)
	require.Equal(t, codes.DeadlineExceeded, res.Code)
	require.GreaterOrEqual(t, res.Duration, 50*time.Millisecond)
	require.Contains(t, note, "call dropped")
	require.Zero(t, b.calls.Load())
	for range 3 {
		res, note = b.inj.Call(t.Context(), "", req("x-2", time.Second), b.next)
		require.Equal(t, invoke.OK, res.Outcome)
		require.Empty(t, note)
	}
	require.EqualValues(t, 1, b.metric(t, "treaty_faults_injected_total"))
}

func TestDeletedRuleStopsAndWorkflowMatches(t *testing.T) {
	t.Parallel()
	b := setup(t, true)
	s, err := b.inj.Create(t.Context(), fault.Rule{Workflow: "transfer", Effect: fault.EffectStatus, Code: "UNAVAILABLE", Reason: "r"}, time.Hour, "alice")
	require.NoError(t, err)
	res, _ := b.inj.Call(t.Context(), "refund", req("w-1", time.Second), b.next)
	require.Equal(t, invoke.OK, res.Outcome, "another workflow is untouched")
	res, _ = b.inj.Call(t.Context(), "transfer", req("w-2", time.Second), b.next)
	require.Equal(t, codes.Unavailable, res.Code)
	_, err = b.inj.Delete(t.Context(), mustID(t, s.Rule.ID), "bob")
	require.NoError(t, err)
	res, _ = b.inj.Call(t.Context(), "transfer", req("w-3", time.Second), b.next)
	require.Equal(t, invoke.OK, res.Outcome)
}

func mustID(t *testing.T, s string) int64 {
	t.Helper()
	var id int64
	for _, c := range s {
		id = id*10 + int64(c-'0')
	}
	require.Positive(t, id)
	return id
}

// metric sums every series of a metric family.
func (b *bundle) metric(t *testing.T, name string) float64 {
	t.Helper()
	mfs, err := b.reg.Gather()
	require.NoError(t, err)
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// TestLiveRulesBounded: every participant call is matched against every live rule, so their
// number is bounded; past MaxLiveRules creating one is refused, and deleting one makes room.
func TestLiveRulesBounded(t *testing.T) {
	t.Parallel()
	b := setup(t, true)
	var last faults.Stored
	for i := range faults.MaxLiveRules {
		s, err := b.inj.Create(t.Context(), fault.Rule{GIDPrefix: "n-", Effect: fault.EffectDrop, Reason: "r"}, time.Hour, "alice")
		require.NoError(t, err, "rule %d", i+1)
		last = s
	}
	_, err := b.inj.Create(t.Context(), fault.Rule{Effect: fault.EffectDrop, Reason: "r"}, time.Hour, "alice")
	require.True(t, errors.Is(err, faults.ErrTooManyRules), "%v", err)
	require.Len(t, b.inj.Rules(), faults.MaxLiveRules)
	_, err = b.inj.Delete(t.Context(), mustID(t, last.Rule.ID), "alice")
	require.NoError(t, err)
	_, err = b.inj.Create(t.Context(), fault.Rule{Effect: fault.EffectDrop, Reason: "r"}, time.Hour, "alice")
	require.NoError(t, err)
}
