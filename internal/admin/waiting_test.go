package admin_test

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// A branch waiting to be called again after a transient failure shows when its next attempt is
// and why it waits; once it succeeded, neither.
func TestWaitingBranchShowsNextAttemptAndWhy(t *testing.T) {
	t.Parallel()
	var healthy atomic.Bool
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Branch == "pay" && !healthy.Load() {
			return status.Error(codes.Unavailable, "payments restarting")
		}
		return nil
	}})
	pay := b.step("pay")
	pay.Retry = nil // the default policy: retried for minutes
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
		Gid: "waiting-1", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("first"), pay}},
	})
	require.NoError(t, err)

	tx := b.waitFor(t, "waiting-1", func(tx admin.Transaction) bool {
		for _, br := range tx.Branches {
			if br.Name == "pay" && br.Op == "action" && br.NextAttemptAt != nil && br.Attempts >= 2 {
				return true
			}
		}
		return false
	})
	var br admin.Branch
	for _, x := range tx.Branches {
		if x.Name == "pay" && x.Op == "action" {
			br = x
		}
	}
	require.Equal(t, "running", tx.State)
	require.Contains(t, br.WaitingReason, "payments restarting", "why it waits")
	require.True(t, strings.HasPrefix(br.WaitingReason, "retry after attempt "), br.WaitingReason)
	require.WithinDuration(t, time.Now(), *br.NextAttemptAt, time.Minute, "the next attempt is soon")
	for _, x := range tx.Branches {
		if x.Name == "first" {
			require.Nil(t, x.NextAttemptAt, "a branch that is not waiting has no next attempt")
			require.Empty(t, x.WaitingReason)
		}
	}
	var retried bool
	for _, e := range tx.Events {
		if e.Kind == "branch_retry" && strings.Contains(e.Detail, "retrying until ") {
			retried = true
		}
	}
	require.True(t, retried, "the history says until when it is retried")

	healthy.Store(true)
	tx = b.waitFor(t, "waiting-1", func(tx admin.Transaction) bool { return tx.State == "succeeded" })
	for _, x := range tx.Branches {
		require.Nil(t, x.NextAttemptAt, "%s:%s", x.Name, x.Op)
		require.Empty(t, x.WaitingReason)
	}
}
