package admin_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

func faultEvents(tx admin.Transaction) []admin.Event {
	var out []admin.Event
	for _, e := range tx.Events {
		if e.Kind == "fault_injected" {
			out = append(out, e)
		}
	}
	return out
}

func (b *bundle) faults(t *testing.T, query string) admin.FaultList {
	t.Helper()
	var l admin.FaultList
	b.get(t, "/admin/v1/faults"+query, &l)
	return l
}

func (b *bundle) metric(t *testing.T, series string) float64 {
	t.Helper()
	res, err := http.Get(b.base + "/metrics")
	require.NoError(t, err)
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	require.NoError(t, err)
	return v
}

// TestFaultsOffWithoutFlag: a coordinator started without --allow-fault-injection refuses to
// store a rule, even for an operator, and applies none that another replica stored.
func TestFaultsOffWithoutFlag(t *testing.T) {
	t.Parallel()
	on := setup(t, setupOpts{allowFaults: true})
	off := setup(t, setupOpts{db: on.db})

	req := admin.FaultRequest{Target: "*", Effect: "status", Code: "UNAVAILABLE", Reason: "game day", ExpiresIn: "10m"}
	r := off.call(t, "POST", "/admin/v1/faults", operatorSecret, req)
	require.Equal(t, http.StatusConflict, r.status, "%s", r.body)
	e := r.apiError(t)
	require.Equal(t, "fault_injection_disabled", e["code"])
	require.Contains(t, e["message"], "--allow-fault-injection")
	require.False(t, off.faults(t, "").Enabled)

	// A rule stored through the replica that allows it does not touch the other one's calls.
	r = on.call(t, "POST", "/admin/v1/faults", operatorSecret, req)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	require.Len(t, off.faults(t, "").Faults, 1, "the rule is listed everywhere (the banner shows it)")
	tx := off.saga(t, "off-1", off.step("a"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	require.Empty(t, faultEvents(off.waitFor(t, "off-1", func(admin.Transaction) bool { return true })))
	require.Len(t, off.part.CallsFor("off-1"), 1)
}

// TestFaultRulesValidatedAndAudited: bad input is a 400 naming the field, nothing is written;
// a viewer cannot create or delete; deletion keeps the row with who deleted it.
func TestFaultRulesValidatedAndAudited(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{allowFaults: true})
	ok := admin.FaultRequest{Effect: "delay", Delay: "10ms", Reason: "game day", ExpiresIn: "1h"}
	for _, c := range []struct {
		edit  func(r *admin.FaultRequest)
		field string
	}{
		{func(r *admin.FaultRequest) { r.Reason = "" }, "reason"},
		{func(r *admin.FaultRequest) { r.ExpiresIn = "" }, "expires_in"},
		{func(r *admin.FaultRequest) { r.ExpiresIn = "25h" }, "expires_in"},
		{func(r *admin.FaultRequest) { r.Effect = "explode" }, "effect"},
		{func(r *admin.FaultRequest) { r.Delay = "10m" }, "delay"},
		{func(r *admin.FaultRequest) { r.Delay = "soon" }, "delay"},
		{func(r *admin.FaultRequest) { r.Op = "launch" }, "op"},
		{func(r *admin.FaultRequest) { r.Probability = 2 }, "probability"},
		{func(r *admin.FaultRequest) { r.MaxCount = -1 }, "max_count"},
		{func(r *admin.FaultRequest) { r.Target = strings.Repeat("x", 513) }, "target"},
		{func(r *admin.FaultRequest) { r.Effect, r.Delay, r.Code = "status", "", "NOPE" }, "code"},
	} {
		req := ok
		c.edit(&req)
		r := b.call(t, "POST", "/admin/v1/faults", operatorSecret, req)
		require.Equal(t, http.StatusBadRequest, r.status, "%+v: %s", req, r.body)
		require.Equal(t, c.field, r.apiError(t)["field"], "%s", r.body)
	}
	require.Empty(t, b.faults(t, "?all=true").Faults, "a refused rule writes nothing")

	require.Equal(t, http.StatusForbidden, b.call(t, "POST", "/admin/v1/faults", viewerSecret, ok).status)
	r := b.call(t, "POST", "/admin/v1/faults", operatorSecret, ok)
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	var f admin.Fault
	require.NoError(t, jsonUnmarshal(r.body, &f))
	require.Equal(t, "alice", f.CreatedBy)
	require.Equal(t, "10ms", f.Delay)
	require.EqualValues(t, 1, f.Probability)
	require.WithinDuration(t, time.Now().Add(time.Hour), f.ExpiresAt, time.Minute)
	require.Equal(t, http.StatusForbidden, b.call(t, "DELETE", "/admin/v1/faults/"+f.ID, viewerSecret, nil).status)
	r = b.call(t, "DELETE", "/admin/v1/faults/"+f.ID, operatorSecret, nil)
	require.Equal(t, http.StatusOK, r.status, "%s", r.body)
	require.Empty(t, b.faults(t, "").Faults)
	all := b.faults(t, "?all=true").Faults
	require.Len(t, all, 1)
	require.Equal(t, "alice", all[0].DeletedBy)
	require.NotNil(t, all[0].DeletedAt)
	require.Equal(t, http.StatusNotFound, b.call(t, "DELETE", "/admin/v1/faults/"+f.ID, operatorSecret, nil).status)
	require.Equal(t, http.StatusBadRequest, b.call(t, "DELETE", "/admin/v1/faults/x", operatorSecret, nil).status)
	require.Equal(t, http.StatusBadRequest, b.call(t, "GET", "/admin/v1/faults?all=maybe", viewerSecret, nil).status)
	require.Contains(t, b.logs.String(), "fault rule created")
	require.Contains(t, b.logs.String(), "fault rule deleted")
}

// TestFaultRulesApplyOnEveryReplica: a rule stored through one replica perturbs the calls of
// another; each perturbed call is in the transaction's history and in the metrics; max_count
// holds; the saga rides out the faults by retrying.
func TestFaultRulesApplyOnEveryReplica(t *testing.T) {
	t.Parallel()
	a := setup(t, setupOpts{allowFaults: true})
	b := setup(t, setupOpts{allowFaults: true, db: a.db})

	r := a.call(t, "POST", "/admin/v1/faults", operatorSecret, admin.FaultRequest{
		Target: "*/test.Svc/Do", Op: "action", GIDPrefix: "unavail-", Effect: "status", Code: "UNAVAILABLE",
		MaxCount: 2, Reason: "game day: ledger down", ExpiresIn: "10m"})
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	var rule admin.Fault
	require.NoError(t, jsonUnmarshal(r.body, &rule))
	// Replica b reloads the rules every second: wait until it has this one.
	require.Eventually(t, func() bool { return len(b.app.Faults.Rules()) == 1 }, 30*time.Second, 20*time.Millisecond)

	tx := b.saga(t, "unavail-1", b.step("a"), b.step("b"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	view := b.waitFor(t, "unavail-1", func(admin.Transaction) bool { return true })
	evs := faultEvents(view)
	require.Len(t, evs, 2, "max_count 2: %v", eventKinds(view))
	for _, e := range evs {
		require.Equal(t, "action", e.Op)
		require.Equal(t, "fault injected: rule "+rule.ID+": status Unavailable before sending (reason: game day: ledger down)", e.Detail)
	}
	// status fails before sending: the participant saw one action per step.
	require.Len(t, b.part.CallsFor("unavail-1"), 2)
	require.EqualValues(t, 2, b.metric(t, `treaty_faults_injected_total{effect="status",op="action"}`))
	require.EqualValues(t, 1, b.metric(t, `treaty_fault_rules_active`))
	require.EqualValues(t, 2, a.faults(t, "").Faults[0].Fired)

	// A transaction outside the gid prefix is untouched.
	tx = b.saga(t, "other-1", b.step("a"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	require.Empty(t, faultEvents(b.waitFor(t, "other-1", func(admin.Transaction) bool { return true })))
}

// TestFaultLostResponseAndAborted: a lost response reaches the participant and is retried
// (at-least-once, the barrier's job); an ABORTED status is a business "no" that compensates.
func TestFaultLostResponseAndAborted(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{allowFaults: true, script: testparticipant.Script(func(context.Context, testparticipant.Call) error { return nil })})
	for _, req := range []admin.FaultRequest{
		{GIDPrefix: "lost-", Op: "action", Effect: "lost_response", MaxCount: 1, Reason: "lost answers", ExpiresIn: "10m"},
		{GIDPrefix: "no-", Target: "*/test.Svc/Do", Op: "action", Effect: "status", Code: "ABORTED", Message: "insufficient funds (rehearsal)", Reason: "refusals", ExpiresIn: "10m"},
	} {
		r := b.call(t, "POST", "/admin/v1/faults", operatorSecret, req)
		require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	}
	tx := b.saga(t, "lost-1", b.step("a"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	calls := b.part.CallsFor("lost-1")
	require.Len(t, calls, 2, "the lost call took effect, the retry repeated it")
	require.Equal(t, calls[0].Op, calls[1].Op)
	evs := faultEvents(b.waitFor(t, "lost-1", func(admin.Transaction) bool { return true }))
	require.Len(t, evs, 1)
	require.Contains(t, evs[0].Detail, "call made, response lost")

	tx = b.saga(t, "no-1", b.step("a"), b.step("b"))
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	require.Empty(t, b.part.CallsFor("no-1"), "the first action was refused before sending; nothing to undo")
	require.EqualValues(t, 1, b.metric(t, `treaty_faults_injected_total{effect="status",op="action"}`))
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
