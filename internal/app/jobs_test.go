package app_test

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

func jobStatus(e *engine.Engine, name string) engine.JobStatus {
	for _, j := range e.Jobs() {
		if j.Name == name {
			return j
		}
	}
	return engine.JobStatus{}
}

func TestRetentionDeletesOnlyFinished(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{
		engine: engine.Config{Jobs: engine.JobsConfig{Interval: -1, Retention: time.Millisecond}},
		script: func(_ context.Context, c testparticipant.Call) error {
			if c.Branch == "stuck" {
				return status.Error(codes.Aborted, "no")
			}
			if c.Op == "compensate" {
				return status.Error(codes.Unavailable, "down")
			}
			return nil
		},
	})
	b.submitWait(t, "ret-done", b.step("a"))
	op := b.submitWait(t, "ret-operator", b.step("a"), b.step("stuck"))
	require.Equal(t, treatyv1.Status_STATUS_NEEDS_OPERATOR, op.Status)
	time.Sleep(5 * time.Millisecond) // older than the 1ms retention
	b.app.Engine.RunJobs(context.Background())

	_, err := b.client.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: "ret-done"})
	require.Equal(t, codes.NotFound, status.Code(err), "a finished saga past retention is deleted")
	_, err = b.client.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: "ret-operator"})
	require.NoError(t, err, "one waiting for an operator is kept")
	j := jobStatus(b.app.Engine, engine.JobRetention)
	require.Equal(t, 1, j.Findings)
	require.Empty(t, j.Err)
	require.False(t, j.LastRun.IsZero())
}

// A driver that makes no progress while its lease keeps being renewed (here: a participant call
// that hangs for longer than the stuck threshold) is re-driven by the reconciliation job: taken
// away at a new epoch and claimed by recovery, which finishes the saga.
func TestStuckTransactionIsRedriven(t *testing.T) {
	t.Parallel()
	hang := make(chan struct{})
	b := setup(t, setupOpts{
		engine: engine.Config{Lease: 3 * time.Second, Jobs: engine.JobsConfig{Interval: -1, StuckAfter: 300 * time.Millisecond}},
		script: func(ctx context.Context, c testparticipant.Call) error {
			select {
			case <-hang:
				<-ctx.Done() // the first call hangs until its deadline
				return ctx.Err()
			default:
				return nil
			}
		},
	})
	s := b.step("a")
	s.CallTimeout = durationpb.New(20 * time.Second)
	close(hang)
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Gid: "stuck-1", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{s}}})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(b.part.CallsFor("stuck-1")) == 1 }, 30*time.Second, 10*time.Millisecond)
	b.part.SetScript(nil)              // the participant recovers; the hung call stays hung
	time.Sleep(400 * time.Millisecond) // past the stuck threshold: the point of the test
	b.app.Engine.RunJobs(context.Background())
	j := jobStatus(b.app.Engine, engine.JobStuck)
	require.Equal(t, 1, j.Findings, j.Detail)
	require.Equal(t, []string{"stuck-1"}, j.Sample)

	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "stuck-1", Timeout: durationpb.New(15 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
	require.NotNil(t, lastEvent(res.Transaction, "reconcile_stuck"))
}
