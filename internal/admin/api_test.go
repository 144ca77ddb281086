package admin_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/store/postgres"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// refuseNo makes the participant refuse (ABORTED) the action of every branch named "no", so a
// saga with such a step compensates.
func refuseNo(_ context.Context, c testparticipant.Call) error {
	if c.Branch == "no" && c.Op == "action" {
		return status.Error(codes.Aborted, "insufficient funds")
	}
	return nil
}

func listGIDs(t *testing.T, b *bundle, query string) []string {
	t.Helper()
	var l admin.TransactionList
	b.get(t, "/admin/v1/transactions?"+query, &l)
	var out []string
	for _, tx := range l.Transactions {
		out = append(out, tx.GID)
	}
	sort.Strings(out)
	return out
}

// TestReadAPI covers the read-only routes against one coordinator: the list with each filter and
// cursor pagination, one transaction with branches and history, statistics, and the errors.
func TestReadAPI(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: refuseNo})
	before := time.Now().UTC().Add(-time.Minute)
	var okGIDs []string
	for i := range 5 {
		gid := "ok-" + string(rune('a'+i))
		okGIDs = append(okGIDs, gid)
		require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, b.saga(t, gid, b.step("a"), b.step("b")).Status)
	}
	for _, gid := range []string{"no-1", "no-2"} {
		require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, b.saga(t, gid, b.step("a"), b.step("no")).Status)
	}
	all := append(append([]string{}, okGIDs...), "no-1", "no-2")
	sort.Strings(all)

	t.Run("pagination", func(t *testing.T) {
		var seen []string
		var last time.Time
		cursor, pages := "", 0
		for {
			q := url.Values{"limit": {"3"}}
			if cursor != "" {
				q.Set("cursor", cursor)
			}
			var l admin.TransactionList
			b.get(t, "/admin/v1/transactions?"+q.Encode(), &l)
			pages++
			require.LessOrEqual(t, len(l.Transactions), 3)
			for _, tx := range l.Transactions {
				require.Empty(t, tx.Branches, "the list leaves branches out")
				require.Empty(t, tx.Events, "the list leaves events out")
				require.NotNil(t, tx.CreatedAt)
				if !last.IsZero() {
					require.False(t, tx.CreatedAt.After(last), "newest first")
				}
				last = *tx.CreatedAt
				seen = append(seen, tx.GID)
			}
			if l.NextCursor == "" {
				break
			}
			cursor = l.NextCursor
		}
		require.Equal(t, 3, pages)
		sort.Strings(seen)
		require.Equal(t, all, seen, "every transaction exactly once")
	})

	t.Run("filters", func(t *testing.T) {
		require.Equal(t, []string{"no-1", "no-2"}, listGIDs(t, b, "status=compensated"))
		require.Equal(t, okGIDs, listGIDs(t, b, "status=succeeded"))
		require.Equal(t, all, listGIDs(t, b, "status=succeeded,compensated"))
		require.Equal(t, all, listGIDs(t, b, "status=succeeded&status=compensated"))
		require.Equal(t, all, listGIDs(t, b, "mode=saga"))
		require.Empty(t, listGIDs(t, b, "mode=tcc,2pc"))
		require.Equal(t, []string{"no-1", "no-2"}, listGIDs(t, b, "gid_prefix=no-"))
		require.Equal(t, []string{"no-1"}, listGIDs(t, b, "gid_prefix=no-1&status=compensated"))
		require.Empty(t, listGIDs(t, b, "workflow=nope"))
		future := url.QueryEscape(time.Now().Add(time.Hour).UTC().Format(time.RFC3339))
		past := url.QueryEscape(before.Format(time.RFC3339Nano))
		require.Empty(t, listGIDs(t, b, "created_after="+future))
		require.Equal(t, all, listGIDs(t, b, "created_after="+past+"&created_before="+future))
		require.Empty(t, listGIDs(t, b, "updated_after="+future))
		require.Equal(t, all, listGIDs(t, b, "updated_after="+past+"&updated_before="+future))
		require.Empty(t, listGIDs(t, b, "updated_before="+past))
	})

	t.Run("bad filters name the parameter", func(t *testing.T) {
		for q, field := range map[string]string{
			"limit=0":                   "limit",
			"limit=501":                 "limit",
			"limit=ten":                 "limit",
			"status=bogus":              "status",
			"mode=xa":                   "mode",
			"cursor=not-a-cursor!":      "cursor",
			"created_after=yesterday":   "created_after",
			"updated_before=2025-13-1":  "updated_before",
			"stauts=running":            "stauts",
			"gid_prefix=a&gid_prefix=b": "gid_prefix",
		} {
			r := b.call(t, "GET", "/admin/v1/transactions?"+q, viewerSecret, nil)
			require.Equal(t, http.StatusBadRequest, r.status, "%s: %s", q, r.body)
			e := r.apiError(t)
			require.Equal(t, "invalid_argument", e["code"], q)
			require.Equal(t, field, e["field"], q)
		}
	})

	t.Run("get", func(t *testing.T) {
		var tx admin.Transaction
		b.get(t, "/admin/v1/transactions/no-1", &tx)
		require.Equal(t, "no-1", tx.GID)
		require.Equal(t, "saga", tx.Mode)
		require.Equal(t, "compensated", tx.Status)
		require.Equal(t, "compensated", tx.State)
		require.False(t, tx.Paused)
		require.NotEmpty(t, tx.Reason)
		byKey := map[string]admin.Branch{}
		for _, br := range tx.Branches {
			byKey[br.Op+":"+br.Name] = br
		}
		require.Equal(t, "failed", byKey["action:no"].Status)
		require.Contains(t, byKey["action:no"].LastError, "insufficient funds")
		require.Equal(t, "succeeded", byKey["action:a"].Status)
		require.Equal(t, "succeeded", byKey["compensate:a"].Status)
		kinds := eventKinds(tx)
		require.NotEmpty(t, kinds)
		require.Equal(t, "compensated", kinds[len(kinds)-1], "history: %v", kinds)
		for i := 1; i < len(tx.Events); i++ {
			require.Greater(t, tx.Events[i].ID, tx.Events[i-1].ID, "history oldest first")
		}

		r := b.call(t, "GET", "/admin/v1/transactions/missing", viewerSecret, nil)
		require.Equal(t, http.StatusNotFound, r.status)
		require.Equal(t, "not_found", r.apiError(t)["code"])
		r = b.call(t, "GET", "/admin/v1/transactions/a%20b", viewerSecret, nil)
		require.Equal(t, http.StatusBadRequest, r.status)
		require.Equal(t, "gid", r.apiError(t)["field"])
	})

	t.Run("stats", func(t *testing.T) {
		// Finished ones are one total estimated from the planner's statistics (cheap at any
		// size); an analyze of so small a table makes it exact.
		_, err := b.app.Store.(*postgres.Store).Pool().Exec(context.Background(), "ANALYZE treaty_transactions")
		require.NoError(t, err)
		var s admin.Stats
		b.get(t, "/admin/v1/stats", &s)
		require.Equal(t, 7, s.Finished)
		require.Equal(t, 7, s.Total)
		require.Empty(t, s.ByMode, "by mode and status: the unfinished")
		require.Empty(t, s.Counts)
		require.Zero(t, s.NeedsOperator)
		require.Zero(t, s.Overdue)
		require.Nil(t, s.OldestRunningCreatedAt, "nothing is unfinished")
	})

	t.Run("unknown routes and methods answer in JSON", func(t *testing.T) {
		r := b.call(t, "GET", "/admin/v1/nothing-here", viewerSecret, nil)
		require.Equal(t, http.StatusNotFound, r.status)
		require.Equal(t, "not_found", r.apiError(t)["code"])
		r = b.call(t, "DELETE", "/admin/v1/stats", viewerSecret, nil)
		require.Equal(t, http.StatusMethodNotAllowed, r.status)
		require.Equal(t, "method_not_allowed", r.apiError(t)["code"])
		require.Equal(t, "GET", r.header.Get("Allow"))
		r = b.call(t, "GET", "/admin/v1/transactions/no-1/retry", operatorSecret, nil)
		require.Equal(t, http.StatusMethodNotAllowed, r.status)
		require.Equal(t, "POST", r.header.Get("Allow"))
	})
}

func TestWorkflows(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	ctx := context.Background()
	for _, steps := range [][]*treatyv1.SagaStep{{b.step("reserve")}, {b.step("reserve"), b.step("charge")}} {
		_, err := b.client.RegisterWorkflow(ctx, &treatyv1.RegisterWorkflowRequest{Name: "booking", Saga: &treatyv1.SagaSpec{Steps: steps}})
		require.NoError(t, err)
	}
	_, err := b.client.RegisterWorkflow(ctx, &treatyv1.RegisterWorkflowRequest{Name: "refund", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("pay-back")}}})
	require.NoError(t, err)

	var all admin.WorkflowList
	b.get(t, "/admin/v1/workflows", &all)
	require.Len(t, all.Workflows, 3)

	for _, path := range []string{"/admin/v1/workflows?name=booking", "/admin/v1/workflows/booking"} {
		var l admin.WorkflowList
		b.get(t, path, &l)
		require.Len(t, l.Workflows, 2, path)
		versions := map[int]int{}
		for _, w := range l.Workflows {
			require.Equal(t, "booking", w.Name)
			require.NotNil(t, w.CreatedAt)
			var def struct {
				Steps []struct {
					Name string `json:"name"`
				} `json:"steps"`
			}
			require.NoError(t, json.Unmarshal(w.Definition, &def))
			versions[w.Version] = len(def.Steps)
		}
		require.Equal(t, map[int]int{1: 1, 2: 2}, versions, "each version with its own steps")
	}

	r := b.call(t, "GET", "/admin/v1/workflows/nope", viewerSecret, nil)
	require.Equal(t, http.StatusNotFound, r.status)
	require.Equal(t, "not_found", r.apiError(t)["code"])

	// A workflow started by name shows in the list filter.
	_, err = b.client.StartWorkflow(ctx, &treatyv1.StartWorkflowRequest{Name: "refund", Gid: "wf-1", Wait: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, []string{"wf-1"}, listGIDs(t, b, "workflow=refund"))
	require.Empty(t, listGIDs(t, b, "workflow=booking"))
}

// TestJobs: the reconciliation jobs' last runs on the answering replica.
func TestJobs(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	var before admin.JobList
	b.get(t, "/admin/v1/jobs", &before)
	require.Equal(t, b.app.Engine.Owner(), before.Replica)
	var names []string
	for _, j := range before.Jobs {
		names = append(names, j.Name)
	}
	require.Equal(t, []string{"stuck_transactions", "expired_tcc", "in_doubt_2pc", "retention"}, names)

	b.app.Engine.RunJobs(context.Background())
	var after admin.JobList
	b.get(t, "/admin/v1/jobs", &after)
	require.Len(t, after.Jobs, 4)
	for _, j := range after.Jobs {
		require.NotNil(t, j.LastRun, j.Name)
		require.Empty(t, j.Error, j.Name)
		require.Zero(t, j.Findings, j.Name)
	}
	r := b.call(t, "GET", "/admin/v1/jobs?job=retention", viewerSecret, nil)
	require.Equal(t, http.StatusBadRequest, r.status)
	require.Equal(t, "job", r.apiError(t)["field"])
}

// TestAuth: no token 401, a viewer may read but not act (403), an operator may do both; the
// probes, metrics, the OpenAPI document and the dashboard's files need no token.
func TestAuth(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: refuseNo})
	b.saga(t, "auth-1", b.step("a"))

	for _, auth := range []string{"", "Bearer ", "Bearer wrong-token-0123456789", "Basic " + viewerSecret, viewerSecret, "Bearer " + viewerSecret + "x"} {
		for _, rt := range []struct{ method, path string }{
			{"GET", "/admin/v1/stats"}, {"GET", "/admin/v1/transactions"}, {"GET", "/admin/v1/transactions/auth-1"},
			{"GET", "/admin/v1/workflows"}, {"GET", "/admin/v1/whoami"}, {"GET", "/admin/v1/jobs"},
			{"POST", "/admin/v1/transactions/auth-1/retry"},
		} {
			req, err := http.NewRequest(rt.method, b.base+rt.path, strings.NewReader(`{"reason":"x"}`))
			require.NoError(t, err)
			if auth != "" {
				req.Header.Set("Authorization", auth)
			}
			res, err := http.DefaultClient.Do(req)
			require.NoError(t, err)
			var e map[string]string
			require.NoError(t, json.NewDecoder(res.Body).Decode(&e))
			_ = res.Body.Close()
			require.Equal(t, http.StatusUnauthorized, res.StatusCode, "%s %s with %q", rt.method, rt.path, auth)
			require.Equal(t, "unauthenticated", e["code"])
			require.Equal(t, "Authorization", e["field"])
			require.Equal(t, `Bearer realm="treaty-admin"`, res.Header.Get("WWW-Authenticate"))
		}
	}

	var who admin.Whoami
	b.get(t, "/admin/v1/whoami", &who)
	require.Equal(t, admin.RoleViewer, who.Role)
	require.Regexp(t, `^viewer token sha256:[0-9a-f]{8}$`, who.Actor)
	require.False(t, who.Open)
	r := b.call(t, "GET", "/admin/v1/whoami", operatorSecret, nil)
	require.Equal(t, http.StatusOK, r.status)
	require.NoError(t, json.Unmarshal(r.body, &who))
	require.Equal(t, admin.Whoami{Role: admin.RoleOperator, Actor: "alice"}, who)

	for _, action := range admin.Actions() {
		r := b.call(t, "POST", "/admin/v1/transactions/auth-1/"+action, viewerSecret, admin.ActionRequest{Reason: "trying", Branch: "a", Op: "compensate"})
		require.Equal(t, http.StatusForbidden, r.status, action)
		e := r.apiError(t)
		require.Equal(t, "permission_denied", e["code"])
		require.Contains(t, e["message"], "needs operator")
	}
	var tx admin.Transaction
	b.get(t, "/admin/v1/transactions/auth-1", &tx)
	for _, k := range eventKinds(tx) {
		require.False(t, strings.HasPrefix(k, "operator_"), "a refused request changed nothing: %v", eventKinds(tx))
	}
	r = b.call(t, "GET", "/admin/v1/transactions/auth-1", operatorSecret, nil)
	require.Equal(t, http.StatusOK, r.status, "an operator reads too")

	for _, path := range []string{"/metrics", "/healthz", "/readyz", "/admin/v1/openapi.json"} {
		r := b.call(t, "GET", path, "", nil)
		require.Equal(t, http.StatusOK, r.status, path)
	}
	r = b.call(t, "GET", "/ui/", "", nil)
	require.Equal(t, http.StatusOK, r.status)
	require.Contains(t, string(r.body), `<script src="app.js"`)
	require.Contains(t, r.header.Get("Content-Security-Policy"), "default-src 'self'")
	for _, f := range []string{"/ui/app.js", "/ui/style.css"} {
		require.Equal(t, http.StatusOK, b.call(t, "GET", f, "", nil).status, f)
	}
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	for path, to := range map[string]string{"/": "/ui/", "/ui": "/ui/"} {
		res, err := noRedirect.Get(b.base + path)
		require.NoError(t, err)
		_ = res.Body.Close()
		require.Equal(t, to, res.Header.Get("Location"), path)
	}
}

// TestActions drives every action through HTTP: each records who and why; one that makes no
// sense now is 409 with the state machine's reason; a bad body is 400 naming the field.
func TestActions(t *testing.T) {
	t.Parallel()
	var fixed atomic.Bool
	var slowCalls atomic.Int32
	b := setup(t, setupOpts{script: func(ctx context.Context, c testparticipant.Call) error {
		if c.Branch == "slow" && c.Op == "action" {
			slowCalls.Add(1)
			return status.Error(codes.Unavailable, "later")
		}
		if c.Op == "compensate" && !fixed.Load() {
			return status.Error(codes.Unavailable, "refund service down")
		}
		return refuseNo(ctx, c)
	}})
	done := b.saga(t, "act-done", b.step("a"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, done.Status)
	stuck := b.saga(t, "act-stuck", b.step("a"), b.step("no"))
	require.Equal(t, treatyv1.Status_STATUS_NEEDS_OPERATOR, stuck.Status)

	post := func(gid, action string, body any) response {
		return b.call(t, "POST", "/admin/v1/transactions/"+gid+"/"+action, operatorSecret, body)
	}

	t.Run("the transaction lists the actions its state machine allows", func(t *testing.T) {
		var tx admin.Transaction
		b.get(t, "/admin/v1/transactions/act-done", &tx)
		require.Empty(t, tx.Actions, "a finished saga offers nothing (no force rollback)")
		b.get(t, "/admin/v1/transactions/act-stuck", &tx)
		require.Contains(t, tx.Actions, "resume")
		require.NotContains(t, tx.Actions, "unpause")
		for _, a := range tx.Actions {
			require.Contains(t, []string{"retry", "resume", "rollback", "pause", "unpause"}, a)
		}
	})

	t.Run("409 when the action makes no sense", func(t *testing.T) {
		for _, action := range []string{"retry", "resume", "rollback", "pause", "unpause"} {
			r := post("act-done", action, admin.ActionRequest{Reason: "why not"})
			require.Equal(t, http.StatusConflict, r.status, "%s: %s", action, r.body)
			e := r.apiError(t)
			require.Equal(t, "conflict", e["code"])
			require.Greater(t, len(e["message"]), len("conflict: "), "the reason is given: %s", e["message"])
		}
		r := post("act-done", "resolve", admin.ActionRequest{Reason: "x", Branch: "a", Op: "action"})
		require.Equal(t, http.StatusConflict, r.status, "%s", r.body)
	})

	t.Run("bad requests name the field", func(t *testing.T) {
		for _, c := range []struct {
			action string
			body   any
			field  string
		}{
			{"resume", admin.ActionRequest{}, "reason"},
			{"resume", admin.ActionRequest{Reason: "   "}, "reason"},
			{"resume", admin.ActionRequest{Reason: strings.Repeat("x", 1025)}, "reason"},
			{"resume", map[string]string{"reason": "x", "why": "typo"}, "body"},
			{"resume", nil, "body"},
			{"resolve", admin.ActionRequest{Reason: "x", Op: "compensate"}, "branch"},
			{"resolve", admin.ActionRequest{Reason: "x", Branch: "a"}, "op"},
		} {
			r := post("act-stuck", c.action, c.body)
			require.Equal(t, http.StatusBadRequest, r.status, "%+v: %s", c, r.body)
			e := r.apiError(t)
			require.Equal(t, "invalid_argument", e["code"])
			require.Equal(t, c.field, e["field"], "%+v", c)
		}
		req, err := http.NewRequest("POST", b.base+"/admin/v1/transactions/act-stuck/resume", strings.NewReader("reason=x"))
		require.NoError(t, err)
		req.Header.Set("Authorization", "Bearer "+operatorSecret)
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		res, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		_ = res.Body.Close()
		require.Equal(t, http.StatusUnsupportedMediaType, res.StatusCode)

		r := post("act-missing", "resume", admin.ActionRequest{Reason: "x"})
		require.Equal(t, http.StatusNotFound, r.status)
		require.Equal(t, "not_found", r.apiError(t)["code"])
	})

	t.Run("resume records who and why and the saga finishes", func(t *testing.T) {
		fixed.Store(true)
		r := post("act-stuck", "resume", admin.ActionRequest{Reason: "refund service redeployed, OPS-7"})
		require.Equal(t, http.StatusOK, r.status, "%s", r.body)
		var after admin.Transaction
		require.NoError(t, json.Unmarshal(r.body, &after))
		require.Contains(t, eventKinds(after), "operator_resume")
		tx := b.waitFor(t, "act-stuck", func(tx admin.Transaction) bool { return tx.Status == "compensated" })
		var ev *admin.Event
		for i := range tx.Events {
			if tx.Events[i].Kind == "operator_resume" {
				ev = &tx.Events[i]
			}
		}
		require.NotNil(t, ev, "history: %v", eventKinds(tx))
		require.Equal(t, "by alice: refund service redeployed, OPS-7", ev.Detail)
		require.Contains(t, b.logs.String(), "operator action")
	})

	t.Run("pause, unpause, rollback", func(t *testing.T) {
		slow := b.step("slow")
		slow.Retry = &treatyv1.RetryPolicy{MaxAttempts: 1000, InitialBackoff: durationpb.New(100 * time.Millisecond), MaxBackoff: durationpb.New(100 * time.Millisecond)}
		_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Gid: "act-slow", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a"), slow}}})
		require.NoError(t, err)
		b.waitFor(t, "act-slow", func(admin.Transaction) bool { return slowCalls.Load() >= 1 })
		// A call in flight makes the driver refuse for a moment: that is a 409 to try again.
		postUntil := func(action, reason string) response {
			deadline := time.After(10 * time.Second)
			tick := time.NewTicker(20 * time.Millisecond)
			defer tick.Stop()
			for {
				r := post("act-slow", action, admin.ActionRequest{Reason: reason})
				if r.status != http.StatusConflict {
					return r
				}
				select {
				case <-tick.C:
				case <-deadline:
					return r
				}
			}
		}
		r := postUntil("pause", "investigating")
		require.Equal(t, http.StatusOK, r.status, "%s", r.body)
		var tx admin.Transaction
		require.NoError(t, json.Unmarshal(r.body, &tx))
		require.True(t, tx.Paused)

		r = post("act-slow", "pause", admin.ActionRequest{Reason: "again"})
		require.Equal(t, http.StatusConflict, r.status)
		require.Contains(t, r.apiError(t)["message"], "already paused")

		r = post("act-slow", "unpause", admin.ActionRequest{Reason: "found it"})
		require.Equal(t, http.StatusOK, r.status, "%s", r.body)
		require.NoError(t, json.Unmarshal(r.body, &tx))
		require.False(t, tx.Paused)

		r = postUntil("rollback", "customer cancelled")
		require.Equal(t, http.StatusOK, r.status, "%s", r.body)
		tx = b.waitFor(t, "act-slow", func(tx admin.Transaction) bool { return tx.Status == "compensated" })
		require.Contains(t, tx.Reason, "customer cancelled")
		kinds := strings.Join(eventKinds(tx), " ")
		for _, k := range []string{"operator_pause", "operator_unpause", "operator_rollback"} {
			require.Contains(t, kinds, k)
		}
	})
}
