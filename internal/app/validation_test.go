package app_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/grpcauth"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/metrics"
	"github.com/treatyhq/treaty/internal/pgtest"
)

const nul = "a\x00b"

const metricsMaxTargets = metrics.MaxTargetLabels

// Invalid google.protobuf.Duration values the issue found accepted.
var badDurations = []*durationpb.Duration{{Nanos: 2e9}, {Seconds: 1, Nanos: -5}, {Seconds: 315576000001}}

func goodCall() *treatyv1.Call { return &treatyv1.Call{Target: "grpc://127.0.0.1:1/x.Y/Z"} }

func goodSaga() *treatyv1.SagaSpec {
	return &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{Name: "s", Action: goodCall(), Compensate: goodCall()}}}
}

// requestCase is one request of one RPC that must be refused INVALID_ARGUMENT naming field.
type requestCase struct {
	method string
	field  string
	req    proto.Message
}

// badRequests has, for every RPC of treaty.v1.Coordinator, a NUL in each kind of string it takes
// and an invalid value in each duration.
func badRequests() []requestCase {
	var cs []requestCase
	add := func(method, field string, req proto.Message) {
		cs = append(cs, requestCase{"/treaty.v1.Coordinator/" + method, field, req})
	}
	add("SubmitSaga", "gid", &treatyv1.SubmitSagaRequest{Gid: nul, Saga: goodSaga()})
	s := goodSaga()
	s.Steps[0].Name = nul
	add("SubmitSaga", "saga.steps[0].name", &treatyv1.SubmitSagaRequest{Saga: s})
	s = goodSaga()
	s.Steps[0].Action.Target = "grpc://127.0.0.1:1/x.Y/Z\x00"
	add("SubmitSaga", "saga.steps[0].action.target", &treatyv1.SubmitSagaRequest{Saga: s})
	s = goodSaga()
	s.Steps[0].DependsOn = []string{nul}
	add("SubmitSaga", "saga.steps[0].depends_on[0]", &treatyv1.SubmitSagaRequest{Saga: s})
	add("GetTransaction", "gid", &treatyv1.GetTransactionRequest{Gid: nul})
	add("WaitTransaction", "gid", &treatyv1.WaitTransactionRequest{Gid: nul})
	add("BeginTCC", "gid", &treatyv1.BeginTCCRequest{Gid: nul})
	add("RegisterTCCBranch", "gid", &treatyv1.RegisterTCCBranchRequest{Gid: nul})
	add("RegisterTCCBranch", "branch.name", &treatyv1.RegisterTCCBranchRequest{Gid: "g", Branch: &treatyv1.TCCBranch{Name: nul, Confirm: goodCall(), Cancel: goodCall()}})
	add("CommitTCC", "gid", &treatyv1.CommitTCCRequest{Gid: nul})
	add("RollbackTCC", "gid", &treatyv1.RollbackTCCRequest{Gid: nul})
	add("RollbackTCC", "reason", &treatyv1.RollbackTCCRequest{Gid: "g", Reason: nul})
	add("Submit2PC", "gid", &treatyv1.Submit2PCRequest{Gid: nul})
	add("Submit2PC", "branches[0].name", &treatyv1.Submit2PCRequest{Branches: []*treatyv1.TwoPhaseBranch{{Name: nul}}})
	add("PrepareMsg", "gid", &treatyv1.PrepareMsgRequest{Gid: nul})
	add("PrepareMsg", "deliveries[0].name", &treatyv1.PrepareMsgRequest{Deliveries: []*treatyv1.MsgDelivery{{Name: nul}}})
	add("SubmitMsg", "gid", &treatyv1.SubmitMsgRequest{Gid: nul})
	add("RegisterWorkflow", "name", &treatyv1.RegisterWorkflowRequest{Name: nul, Saga: goodSaga()})
	add("ListWorkflows", "name", &treatyv1.ListWorkflowsRequest{Name: nul})
	add("StartWorkflow", "name", &treatyv1.StartWorkflowRequest{Name: nul})
	add("StartWorkflow", "gid", &treatyv1.StartWorkflowRequest{Name: "w", Gid: nul})
	add("StartWorkflow", `inputs key`, &treatyv1.StartWorkflowRequest{Name: "w", Inputs: map[string]*treatyv1.StepInput{nul: {}}})

	for _, d := range badDurations {
		s := goodSaga()
		s.Timeout = d
		add("SubmitSaga", "saga.timeout", &treatyv1.SubmitSagaRequest{Saga: s})
		s = goodSaga()
		s.Steps[0].CallTimeout = d
		add("SubmitSaga", "saga.steps[0].call_timeout", &treatyv1.SubmitSagaRequest{Saga: s})
		s = goodSaga()
		s.Steps[0].Retry = &treatyv1.RetryPolicy{InitialBackoff: d}
		add("SubmitSaga", "saga.steps[0].retry.initial_backoff", &treatyv1.SubmitSagaRequest{Saga: s})
		add("SubmitSaga", "wait", &treatyv1.SubmitSagaRequest{Saga: goodSaga(), Wait: d})
		add("WaitTransaction", "timeout", &treatyv1.WaitTransactionRequest{Gid: "g", Timeout: d})
		add("BeginTCC", "timeout", &treatyv1.BeginTCCRequest{Timeout: d})
		add("RegisterTCCBranch", "branch.call_timeout", &treatyv1.RegisterTCCBranchRequest{Gid: "g", Branch: &treatyv1.TCCBranch{Name: "b", CallTimeout: d}})
		add("CommitTCC", "wait", &treatyv1.CommitTCCRequest{Gid: "g", Wait: d})
		add("RollbackTCC", "wait", &treatyv1.RollbackTCCRequest{Gid: "g", Wait: d})
		add("Submit2PC", "timeout", &treatyv1.Submit2PCRequest{Timeout: d})
		add("Submit2PC", "wait", &treatyv1.Submit2PCRequest{Wait: d})
		add("Submit2PC", "branches[0].call_timeout", &treatyv1.Submit2PCRequest{Branches: []*treatyv1.TwoPhaseBranch{{Name: "b", CallTimeout: d}}})
		add("PrepareMsg", "timeout", &treatyv1.PrepareMsgRequest{Timeout: d})
		add("PrepareMsg", "deliveries[0].call_timeout", &treatyv1.PrepareMsgRequest{Deliveries: []*treatyv1.MsgDelivery{{Name: "d", CallTimeout: d}}})
		add("SubmitMsg", "wait", &treatyv1.SubmitMsgRequest{Gid: "g", Wait: d})
		add("StartWorkflow", "wait", &treatyv1.StartWorkflowRequest{Name: "w", Wait: d})
	}
	return cs
}

// The issue: "a\x00b" as gid or name reached PostgreSQL and came back INTERNAL with its text, and
// invalid durations were accepted. Every RPC now refuses both INVALID_ARGUMENT naming the field,
// and nothing is written.
func TestEveryRPCRefusesNULAndBadDurations(t *testing.T) {
	t.Parallel()
	a := startSecured(t, grpcauth.Config{}, nil, engine.Limits{})
	conn := dialCoordinator(t, a.Addr, nil)
	covered := map[string]bool{}
	for _, tc := range badRequests() {
		covered[tc.method] = true
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		var out []byte
		b, err := proto.Marshal(tc.req)
		require.NoError(t, err)
		err = conn.Invoke(ctx, tc.method, b, &out, grpc.ForceCodecV2(invoke.RawCodec{}))
		cancel()
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%s %s: %v", tc.method, tc.field, err)
		require.True(t, strings.HasPrefix(status.Convert(err).Message(), tc.field+": "), "%s: the error names %s: %v", tc.method, tc.field, err)
	}
	for _, m := range treatyv1.Coordinator_ServiceDesc.Methods {
		require.True(t, covered["/treaty.v1.Coordinator/"+m.MethodName], "no bad request for %s", m.MethodName)
	}

	// A string that is not UTF-8 at all (a raw client; Go's protobuf will not encode one):
	// GetTransactionRequest{gid: "\xff"} on the wire.
	var out []byte
	err := conn.Invoke(t.Context(), "/treaty.v1.Coordinator/GetTransaction", []byte{0x0a, 0x01, 0xff}, &out, grpc.ForceCodecV2(invoke.RawCodec{}))
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "UTF-8")

	client := treatyv1.NewCoordinatorClient(conn)
	ws, err := client.ListWorkflows(t.Context(), &treatyv1.ListWorkflowsRequest{})
	require.NoError(t, err)
	require.Empty(t, ws.Workflows, "nothing was written")
	txs, _, err := a.Engine.List(t.Context(), engine.ListFilter{})
	require.NoError(t, err)
	require.Empty(t, txs, "nothing was written")
}

// Every admin route refuses a NUL in a path parameter, a query parameter or a body field with
// 400 invalid_argument naming it, never 500.
func TestEveryAdminRouteRefusesNUL(t *testing.T) {
	t.Parallel()
	a, err := app.Start(context.Background(), app.Config{
		DB: pgtest.NewDatabase(t), Listen: "127.0.0.1:0", HTTPListen: "127.0.0.1:0", Migrate: true, AdminOpen: true, Logger: testLogger(t),
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, a.Stop(ctx))
	})
	base := "http://" + a.HTTPAddr
	esc := url.PathEscape(nul)
	type tc struct{ method, path, body, field string }
	cases := []tc{
		{"GET", "/admin/v1/transactions?workflow=" + url.QueryEscape(nul), "", "workflow"},
		{"GET", "/admin/v1/transactions?gid_prefix=" + url.QueryEscape(nul), "", "gid_prefix"},
		{"GET", "/admin/v1/transactions?cursor=" + url.QueryEscape(nul), "", "cursor"},
		{"GET", "/admin/v1/transactions?status=" + url.QueryEscape(nul), "", "status"},
		{"GET", "/admin/v1/transactions/" + esc, "", "gid"},
		{"GET", "/admin/v1/workflows/" + esc, "", "name"},
		{"GET", "/admin/v1/workflows?name=" + url.QueryEscape(nul), "", "name"},
		{"GET", "/admin/v1/stats?x=" + url.QueryEscape(nul), "", "x"},
		{"GET", "/admin/v1/jobs?x=" + url.QueryEscape(nul), "", "x"},
		{"GET", "/admin/v1/whoami?x=" + url.QueryEscape(nul), "", "x"},
	}
	for _, action := range []string{"retry", "rollback", "resume", "resolve", "pause", "unpause"} {
		cases = append(cases,
			tc{"POST", "/admin/v1/transactions/" + esc + "/" + action, `{"reason":"r"}`, "gid"},
			tc{"POST", "/admin/v1/transactions/g/" + action, `{"reason":"a\u0000b"}`, "reason"},
			tc{"POST", "/admin/v1/transactions/g/" + action, `{"reason":"r","branch":"a\u0000b","op":"action"}`, "branch"})
	}
	for _, c := range cases {
		req, err := http.NewRequestWithContext(t.Context(), c.method, base+c.path, strings.NewReader(c.body))
		require.NoError(t, err)
		if c.body != "" {
			req.Header.Set("Content-Type", "application/json")
		}
		res, err := http.DefaultClient.Do(req)
		require.NoError(t, err)
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		require.Equal(t, http.StatusBadRequest, res.StatusCode, "%s %s: %s", c.method, c.path, body)
		var e struct{ Code, Field string }
		require.NoError(t, json.Unmarshal(body, &e))
		require.Equal(t, "invalid_argument", e.Code, "%s %s", c.method, c.path)
		require.Equal(t, c.field, e.Field, "%s %s: %s", c.method, c.path, body)
	}
}
