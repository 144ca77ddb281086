package ctl_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/ctl"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/store/sqlite"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

const (
	viewerSecret   = "viewer-secret-0123456789abcdef"
	operatorSecret = "operator-secret-fedcba9876543210"
)

type env struct {
	base   string
	bases  []string
	part   *testparticipant.Participant
	client treatyv1.CoordinatorClient
}

// setup starts a real coordinator (embedded store, admin API with a viewer and an operator
// token) and a participant whose "stuck" action is unavailable until the test ends.
func setup(t *testing.T) *env { return setupWith(t, envOptions{}) }

type envOptions struct {
	allowFaults bool // start the coordinators with fault injection allowed
	replicas    int  // coordinators on the one store; default 1 (env.bases has each one's admin API)
}

func setupWith(t *testing.T, o envOptions) *env {
	t.Helper()
	ctx := context.Background()
	st, err := sqlite.Open(ctx, sqlite.Memory)
	require.NoError(t, err)
	t.Cleanup(func() { st.Close() })
	_, err = st.Migrate(ctx)
	require.NoError(t, err)
	viewer, err := admin.NewToken(admin.RoleViewer, viewerSecret, "")
	require.NoError(t, err)
	operator, err := admin.NewToken(admin.RoleOperator, operatorSecret, "alice")
	require.NoError(t, err)
	e := &env{}
	for i := range max(o.replicas, 1) {
		a, err := app.Start(ctx, app.Config{Store: st, Listen: "127.0.0.1:0", HTTPListen: "127.0.0.1:0",
			AdminTokens: []admin.Token{viewer, operator}, AllowFaultInjection: o.allowFaults,
			Engine: engine.Config{Owner: fmt.Sprintf("replica-%d", i), Lease: 3 * time.Second,
				RecoveryInterval: 100 * time.Millisecond, OperatorThreshold: 3}})
		require.NoError(t, err)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			require.NoError(t, a.Stop(ctx))
		})
		e.bases = append(e.bases, "http://"+a.HTTPAddr)
		if i == 0 {
			conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			require.NoError(t, err)
			t.Cleanup(func() { _ = conn.Close() })
			e.client = treatyv1.NewCoordinatorClient(conn)
		}
	}
	e.base = e.bases[0]
	part, err := testparticipant.Start(testparticipant.Options{Script: func(ctx context.Context, c testparticipant.Call) error {
		if c.Branch == "stuck" && c.Op == "action" {
			return status.Error(codes.Unavailable, "warehouse offline")
		}
		return nil
	}})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	e.part = part
	return e
}

func (e *env) step(name string) *treatyv1.SagaStep {
	return &treatyv1.SagaStep{Name: name,
		Action:     &treatyv1.Call{Target: e.part.Target("shop.Stock/Reserve")},
		Compensate: &treatyv1.Call{Target: e.part.Target("shop.Stock/Release")},
		Retry:      &treatyv1.RetryPolicy{MaxAttempts: 1000, InitialBackoff: durationpb.New(50 * time.Millisecond), MaxBackoff: durationpb.New(200 * time.Millisecond)}}
}

// run runs treatyctl against the coordinator with token (TREATY_TOKEN) and returns its output
// and exit code.
func (e *env) run(t *testing.T, token string, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	code = ctl.Main(ctx, append(args, "--addr", e.base), ctl.Env{Stdout: &out, Stderr: &errb,
		Getenv: func(k string) string {
			if k == "TREATY_TOKEN" {
				return token
			}
			return ""
		}})
	return out.String(), errb.String(), code
}

func TestTxCommandsAgainstACoordinator(t *testing.T) {
	t.Parallel()
	e := setup(t)
	ctx := context.Background()
	_, err := e.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "order-ok", Wait: durationpb.New(30 * time.Second),
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{e.step("pay"), e.step("reserve")}}})
	require.NoError(t, err)
	_, err = e.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "order-stuck",
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{e.step("pay"), e.step("stuck")}}})
	require.NoError(t, err)

	// list: a table for people, the API's JSON for scripts, the API's filters.
	out, errOut, code := e.run(t, viewerSecret, "tx", "list")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Regexp(t, `(?m)^GID +MODE +STATUS +STATE`, out)
	require.Regexp(t, `(?m)^order-ok +saga +succeeded +succeeded`, out)
	require.Regexp(t, `(?m)^order-stuck +saga +running +running`, out)
	out, _, code = e.run(t, viewerSecret, "tx", "list", "--status", "succeeded", "-o", "json")
	require.Equal(t, ctl.ExitOK, code)
	var list admin.TransactionList
	require.NoError(t, json.Unmarshal([]byte(out), &list))
	require.Len(t, list.Transactions, 1)
	require.Equal(t, "order-ok", list.Transactions[0].GID)
	_, errOut, code = e.run(t, viewerSecret, "tx", "list", "--limit", "0")
	require.Equal(t, ctl.ExitUsage, code, "refused input is a usage error")
	require.Contains(t, errOut, "limit")

	// show: branches and history.
	out, errOut, code = e.run(t, viewerSecret, "tx", "show", "order-ok")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Regexp(t, `(?m)^status +succeeded \(succeeded\)`, out)
	require.Regexp(t, `(?m)^  reserve +action +succeeded +1`, out)
	require.Contains(t, out, "history:")
	require.Contains(t, out, "branch_succeeded action:reserve")
	_, errOut, code = e.run(t, viewerSecret, "tx", "show", "no-such-order")
	require.Equal(t, ctl.ExitNotFound, code)
	require.Contains(t, errOut, "not found")

	// Actions: a reason is required, a viewer may not act, an operator may.
	_, errOut, code = e.run(t, operatorSecret, "tx", "pause", "order-stuck")
	require.Equal(t, ctl.ExitUsage, code)
	require.Contains(t, errOut, "--reason is required")
	_, _, code = e.run(t, viewerSecret, "tx", "pause", "order-stuck", "--reason", "warehouse down")
	require.Equal(t, ctl.ExitAuth, code)
	_, _, code = e.run(t, "wrong-secret-0123456789abcdef", "tx", "list")
	require.Equal(t, ctl.ExitAuth, code)
	// A pause is refused (409, exit 5) while a call is in flight; try until it lands between two.
	deadline := time.Now().Add(60 * time.Second)
	for {
		out, errOut, code = e.run(t, operatorSecret, "tx", "pause", "order-stuck", "--reason", "warehouse down")
		if code != ctl.ExitConflict || time.Now().After(deadline) {
			break
		}
		require.Contains(t, errOut, "in flight")
		time.Sleep(20 * time.Millisecond)
	}
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Contains(t, out, "pause order-stuck: now running (running, paused)")
	out, _, code = e.run(t, viewerSecret, "tx", "list", "--gid-prefix", "order-st")
	require.Equal(t, ctl.ExitOK, code)
	require.Contains(t, out, "running (paused)")
	_, errOut, code = e.run(t, operatorSecret, "tx", "retry", "order-ok", "--reason", "why not")
	require.Equal(t, ctl.ExitConflict, code, "nothing to retry in a finished transaction: %s", errOut)
	_, errOut, code = e.run(t, operatorSecret, "tx", "unpause", "order-stuck", "--reason", "go on")
	require.Equal(t, ctl.ExitOK, code, errOut)
	_, errOut, code = e.run(t, operatorSecret, "tx", "rollback", "order-stuck", "--reason", "customer cancelled")
	require.Equal(t, ctl.ExitOK, code, errOut)

	// watch follows the history until the rollback has compensated the payment.
	out, errOut, code = e.run(t, viewerSecret, "tx", "watch", "order-stuck", "--interval", "100ms")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Contains(t, out, "operator_rollback")
	require.Contains(t, out, "order-stuck: compensated")
	require.Contains(t, out, "compensate:pay")

	out, errOut, code = e.run(t, viewerSecret, "stats")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Regexp(t, `(?m)^total +2`, out)
	require.Regexp(t, `(?m)^finished \(kept\) +2`, out, "both orders have finished: one succeeded, one compensated")
}

func TestWorkflowsAndErrors(t *testing.T) {
	t.Parallel()
	e := setup(t)
	_, err := e.client.RegisterWorkflow(context.Background(), &treatyv1.RegisterWorkflowRequest{Name: "place-order",
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{e.step("pay")}}})
	require.NoError(t, err)
	out, errOut, code := e.run(t, viewerSecret, "workflows", "list")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Regexp(t, `(?m)^place-order +1 `, out)
	out, errOut, code = e.run(t, viewerSecret, "workflows", "show", "place-order")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Contains(t, out, "place-order version 1")
	require.Contains(t, out, `"name": "pay"`)

	// Usage mistakes, and a coordinator that is not there.
	_, errOut, code = e.run(t, viewerSecret, "tx", "frobnicate")
	require.Equal(t, ctl.ExitUsage, code)
	require.Contains(t, errOut, `unknown command "tx frobnicate"`)
	_, _, code = e.run(t, viewerSecret, "tx", "show")
	require.Equal(t, ctl.ExitUsage, code)
	_, _, code = e.run(t, viewerSecret, "stats", "-o", "yaml")
	require.Equal(t, ctl.ExitUsage, code)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closed := lis.Addr().String()
	require.NoError(t, lis.Close())
	var stderr bytes.Buffer
	code = ctl.Main(context.Background(), []string{"--addr", "http://" + closed, "stats"}, ctl.Env{Stdout: &bytes.Buffer{}, Stderr: &stderr, Getenv: func(string) string { return "" }})
	require.Equal(t, ctl.ExitUnavailable, code)
	require.True(t, strings.Contains(stderr.String(), "did not answer"), stderr.String())
}
