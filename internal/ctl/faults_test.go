package ctl_test

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/ctl"
)

func TestFaultsCommands(t *testing.T) {
	t.Parallel()
	e := setupWith(t, envOptions{allowFaults: true})
	ctx := context.Background()

	// What the API requires is asked for before anything is sent; a viewer cannot make rules.
	_, errOut, code := e.run(t, operatorSecret, "faults", "create", "--effect", "status", "--code", "UNAVAILABLE", "--expires-in", "10m")
	require.Equal(t, ctl.ExitUsage, code, errOut)
	require.Contains(t, errOut, "--reason is required")
	_, errOut, code = e.run(t, viewerSecret, "faults", "create", "--effect", "drop", "--reason", "r", "--expires-in", "10m")
	require.Equal(t, ctl.ExitAuth, code, errOut)
	_, errOut, code = e.run(t, operatorSecret, "faults", "create", "--effect", "explode", "--reason", "r", "--expires-in", "10m")
	require.Equal(t, ctl.ExitUsage, code, "the coordinator refuses an unknown effect: %s", errOut)
	require.Contains(t, errOut, "effect")

	// One UNAVAILABLE for the first action of game-day transactions.
	out, errOut, code := e.run(t, operatorSecret, "faults", "create", "--effect", "status", "--code", "UNAVAILABLE",
		"--op", "action", "--gid-prefix", "gameday-", "--max-count", "1", "--reason", "rehearse a flaky stock service", "--expires-in", "10m")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Regexp(t, `fault rule \d+ created: status UNAVAILABLE on op=action gid=gameday-`, out)

	out, errOut, code = e.run(t, viewerSecret, "faults", "list", "-o", "json")
	require.Equal(t, ctl.ExitOK, code, errOut)
	var list admin.FaultList
	require.NoError(t, json.Unmarshal([]byte(out), &list))
	require.True(t, list.Enabled)
	require.Len(t, list.Faults, 1)
	id := list.Faults[0].ID
	require.Equal(t, "alice", list.Faults[0].CreatedBy)

	// The rule reaches the engine within its refresh interval; the saga rides the fault out.
	require.Eventually(t, func() bool {
		res, err := e.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "gameday-" + time.Now().Format("150405.000000"),
			Wait: durationpb.New(30 * time.Second), Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{e.step("pay")}}})
		require.NoError(t, err)
		require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
		out, _, _ := e.run(t, viewerSecret, "tx", "show", res.Transaction.Gid)
		return strings.Contains(out, "fault injected")
	}, 60*time.Second, 200*time.Millisecond, "a game-day saga records the injected fault in its history")

	out, errOut, code = e.run(t, viewerSecret, "faults", "list")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Contains(t, out, "1/1", "fired once of at most once")
	require.Contains(t, out, "rehearse a flaky stock service")

	out, errOut, code = e.run(t, operatorSecret, "faults", "delete", id)
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Contains(t, out, "fault rule "+id+" deleted")
	out, _, code = e.run(t, viewerSecret, "faults", "list")
	require.Equal(t, ctl.ExitOK, code)
	require.NotContains(t, out, "rehearse")
	out, _, code = e.run(t, viewerSecret, "faults", "list", "--all")
	require.Equal(t, ctl.ExitOK, code)
	require.Contains(t, out, "deleted by alice")
	_, _, code = e.run(t, operatorSecret, "faults", "delete", "999999")
	require.Equal(t, ctl.ExitNotFound, code)
}

func TestFaultsRefusedWithoutTheFlag(t *testing.T) {
	t.Parallel()
	e := setup(t)
	out, errOut, code := e.run(t, operatorSecret, "faults", "create", "--effect", "drop", "--reason", "r", "--expires-in", "10m")
	require.Equal(t, ctl.ExitConflict, code, out)
	require.Contains(t, errOut, "fault_injection_disabled")
	out, _, code = e.run(t, viewerSecret, "faults", "list")
	require.Equal(t, ctl.ExitOK, code)
	require.Contains(t, out, "fault injection is off")
}

// An action sent to a replica that does not drive the transaction is queued for the one that
// does: treatyctl says so and succeeds, and the owner applies it.
func TestActionQueuedForTheDrivingReplica(t *testing.T) {
	t.Parallel()
	e := setupWith(t, envOptions{replicas: 2})
	ctx := context.Background()
	stuck := e.step("stuck")
	// The first replica keeps the transaction (its lease renewed) while the step waits an hour.
	stuck.Retry = &treatyv1.RetryPolicy{MaxAttempts: 100, InitialBackoff: durationpb.New(time.Hour), MaxBackoff: durationpb.New(time.Hour)}
	_, err := e.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "order-queued",
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{e.step("pay"), stuck}}})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		got, err := e.client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "order-queued"})
		require.NoError(t, err)
		for _, b := range got.Transaction.Branches {
			if b.Name == "stuck" && b.Op == "action" && b.Attempts >= 1 {
				return true
			}
		}
		return false
	}, 60*time.Second, 50*time.Millisecond, "the stuck step failed once and waits")

	var out, errOut string
	var code int
	func() {
		saved := e.base
		defer func() { e.base = saved }()
		e.base = e.bases[1]
		out, errOut, code = e.run(t, operatorSecret, "tx", "rollback", "order-queued", "--reason", "customer cancelled")
	}()
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Contains(t, out, "rollback order-queued: queued")
	require.Contains(t, out, "replica-0", "it names the replica that applies it")

	out, errOut, code = e.run(t, viewerSecret, "tx", "watch", "order-queued", "--interval", "100ms")
	require.Equal(t, ctl.ExitOK, code, errOut)
	require.Contains(t, out, "order-queued: compensated")
}
