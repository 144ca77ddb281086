package sdk_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/internal/testparticipant"
	"github.com/treatyhq/treaty/sdk"
)

// Retry.Window reaches the coordinator: a step whose participant stays unavailable is retried
// for that long after its first failure, then the saga compensates and says why.
func TestRetryWindowThroughSDK(t *testing.T) {
	t.Parallel()
	e := setup(t, func(_ context.Context, c testparticipant.Call) error {
		if c.Branch == "pay" && c.Op == "action" {
			return status.Error(codes.Unavailable, "payments down")
		}
		return nil
	})
	retry := &sdk.Retry{Window: 2 * time.Second, InitialBackoff: 50 * time.Millisecond, MaxBackoff: 200 * time.Millisecond}
	tx, err := e.client.Saga(context.Background(), sdk.Saga{GID: "sdk-window", Wait: time.Minute, Steps: []sdk.Step{
		{Name: "hotel", Action: e.call("Reserve", "hotel"), Compensate: e.call("Cancel", "hotel")},
		{Name: "pay", Action: e.call("Charge", "pay"), Compensate: e.call("Refund", "pay"), Retry: retry},
	}})
	require.Error(t, err)
	require.Equal(t, sdk.StatusCompensated, tx.Status)
	require.Contains(t, tx.Reason, "retry window 2s ended")
	require.Contains(t, tx.Reason, "payments down")
	n := 0
	for _, c := range e.part.CallsFor("sdk-window") {
		if c.Branch == "pay" && c.Op == "action" {
			n++
		}
	}
	require.Greater(t, n, 5, "retried through the window, not a handful of attempts")
}
