package fault_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"

	"github.com/treatyhq/treaty/pkg/fault"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

func valid() fault.Rule {
	return fault.Rule{Target: "*/ledger.v1.Ledger/*", Effect: fault.EffectStatus, Code: "UNAVAILABLE",
		Reason: "game day", ExpiresAt: t0.Add(time.Hour)}
}

func TestValidateNamesFieldAndLimit(t *testing.T) {
	t.Parallel()
	require.NoError(t, valid().Validate(t0))
	cases := []struct {
		name   string
		edit   func(r *fault.Rule)
		substr string
	}{
		{"no reason", func(r *fault.Rule) { r.Reason = " " }, "reason is required"},
		{"long reason", func(r *fault.Rule) { r.Reason = strings.Repeat("x", fault.MaxReasonLen+1) }, "reason is 1001 bytes; the limit is 1000"},
		{"long target", func(r *fault.Rule) { r.Target = strings.Repeat("x", fault.MaxTargetLen+1) }, "target is 513 bytes; the limit is 512"},
		{"bad op", func(r *fault.Rule) { r.Op = "launch" }, `op "launch" is not one of action, compensate`},
		{"bad effect", func(r *fault.Rule) { r.Effect = "explode" }, `effect "explode" is not one of delay, status, lost_response, drop`},
		{"bad code", func(r *fault.Rule) { r.Code = "NOPE" }, `code "NOPE" is not a gRPC status code`},
		{"ok code", func(r *fault.Rule) { r.Code = "OK" }, "OK is not a fault"},
		{"delay too long", func(r *fault.Rule) { r.Effect, r.Code, r.Delay = fault.EffectDelay, "", fault.Duration(6*time.Minute) }, "delay 6m0s is outside 1ms..5m0s"},
		{"delay zero", func(r *fault.Rule) { r.Effect, r.Code = fault.EffectDelay, "" }, "delay 0s is outside"},
		{"delay on status", func(r *fault.Rule) { r.Delay = fault.Duration(time.Second) }, "delay is only for effect delay"},
		{"code on drop", func(r *fault.Rule) { r.Effect = fault.EffectDrop }, "code and message are only for effect status"},
		{"probability", func(r *fault.Rule) { r.Probability = 1.5 }, "probability 1.5 is outside 0..1"},
		{"max count", func(r *fault.Rule) { r.MaxCount = -1 }, "max_count -1 is outside"},
		{"no expiry", func(r *fault.Rule) { r.ExpiresAt = time.Time{} }, "expires_at is required"},
		{"expired", func(r *fault.Rule) { r.ExpiresAt = t0 }, "is not in the future"},
		{"too far", func(r *fault.Rule) { r.ExpiresAt = t0.Add(25 * time.Hour) }, "is 25h0m0s ahead; the limit is 24h0m0s"},
		{"nul", func(r *fault.Rule) { r.Workflow = "a\x00b" }, "workflow is not valid UTF-8 text"},
	}
	for _, c := range cases {
		r := valid()
		c.edit(&r)
		err := r.Validate(t0)
		require.Error(t, err, c.name)
		require.True(t, errors.Is(err, fault.ErrInvalid), c.name)
		require.Contains(t, err.Error(), c.substr, c.name)
	}
}

func TestMatches(t *testing.T) {
	t.Parallel()
	r := fault.Rule{Target: "*/ledger.v1.Ledger/Debit", Op: "action", GIDPrefix: "chaos-", Workflow: "transfer"}
	call := fault.Call{Target: "grpc://10.0.0.1:9000,10.0.0.2:9000/ledger.v1.Ledger/Debit", Op: "action", GID: "chaos-1", Workflow: "transfer"}
	require.True(t, r.Matches(call))
	// The same pattern matches the method as a participant sees it.
	require.True(t, r.Matches(fault.Call{Target: "/ledger.v1.Ledger/Debit", Op: "action", GID: "chaos-1", Workflow: "transfer"}))
	for _, c := range []fault.Call{
		{Target: "grpc://h:1/ledger.v1.Ledger/Credit", Op: "action", GID: "chaos-1", Workflow: "transfer"},
		{Target: call.Target, Op: "compensate", GID: "chaos-1", Workflow: "transfer"},
		{Target: call.Target, Op: "action", GID: "prod-1", Workflow: "transfer"},
		{Target: call.Target, Op: "action", GID: "chaos-1", Workflow: "refund"},
	} {
		require.False(t, r.Matches(c), "%+v", c)
	}
	require.True(t, fault.Rule{}.Matches(call), "an empty rule matches every call")
}

func TestGlob(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		p, s string
		ok   bool
	}{
		{"", "anything", true}, {"*", "", true}, {"a*c", "abc", true}, {"a*c", "ac", true}, {"a*c", "abd", false},
		{"*b*", "abc", true}, {"*/x", "grpc://h/x", true}, {"a**b", "ab", true}, {"abc", "abcd", false},
		{"*a*a*a*a*a*b", strings.Repeat("a", 200), false},
	} {
		require.Equal(t, c.ok, fault.Glob(c.p, c.s), "%q ~ %q", c.p, c.s)
	}
}

func TestSetCountsProbabilityAndExpiry(t *testing.T) {
	t.Parallel()
	r := valid()
	r.MaxCount = 2
	half := valid()
	half.Probability = 0.5
	half.Code = "ABORTED"
	s, err := fault.NewSet(t0, r, half)
	require.NoError(t, err)
	c := fault.Call{Target: "/ledger.v1.Ledger/Debit", Op: "action", GID: "g"}
	for range 2 {
		got, ok := s.Pick(c, t0, 0.9)
		require.True(t, ok)
		require.Equal(t, codes.Unavailable, got.StatusCode())
	}
	// The first rule is used up; the second fires only below its probability.
	_, ok := s.Pick(c, t0, 0.9)
	require.False(t, ok)
	got, ok := s.Pick(c, t0, 0.1)
	require.True(t, ok)
	require.Equal(t, codes.Aborted, got.StatusCode())
	_, ok = s.Pick(c, t0.Add(time.Hour), 0.1)
	require.False(t, ok, "expired rules do not fire")
	require.Equal(t, []int{2, 1}, s.Fired())

	_, err = fault.NewSet(t0, fault.Rule{Effect: fault.EffectDrop})
	require.ErrorContains(t, err, "rule 0: invalid fault rule: reason is required")
}

func TestJSONRoundTrip(t *testing.T) {
	t.Parallel()
	r := fault.Rule{Effect: fault.EffectDelay, Delay: fault.Duration(1500 * time.Millisecond), Reason: "r", ExpiresAt: t0}
	b, err := json.Marshal(r)
	require.NoError(t, err)
	require.Contains(t, string(b), `"delay":"1.5s"`)
	var back fault.Rule
	require.NoError(t, json.Unmarshal(b, &back))
	require.Equal(t, r, back)
	require.Error(t, json.Unmarshal([]byte(`{"delay":"soon"}`), &back))
	require.Equal(t, "rule 7: delayed 1.5s (reason: r)", func() string { r.ID = "7"; return r.Describe() }())
}
