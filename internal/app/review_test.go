package app_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/store/postgres"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// waitUntil polls cond every 50ms until it holds, failing after a generous ceiling.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	require.Eventually(t, cond, 45*time.Second, 50*time.Millisecond, what)
}

func (b *bundle) epoch(t *testing.T, gid string) (int64, string) {
	t.Helper()
	var epoch int64
	var owner string
	require.NoError(t, b.pool.QueryRow(context.Background(),
		`SELECT epoch, coalesce(lease_owner, '') FROM treaty_transactions WHERE gid = $1`, gid).Scan(&epoch, &owner))
	return epoch, owner
}

// A trying TCC that a replica claimed and never handed back (here: claimed for an operator
// action by a replica that then died) is claimed by recovery once that lease runs out. The
// recovering replica must hand it straight back, due at its deadline, so that the initiator can
// still register branches and commit: it must not sit on the row until the deadline and then
// cancel it against the initiator's commit.
func TestTCCClaimedWhileTryingIsHandedBackToTheInitiator(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	ctx := context.Background()
	const gid = "tcc-ghost"
	b.beginTCC(t, gid, 2*time.Minute, "b1")
	_, err := postgres.New(b.pool).ClaimForOperator(ctx, gid, "ghost", 300*time.Millisecond)
	require.NoError(t, err)
	waitUntil(t, "recovery claims the row once the ghost's lease ran out", func() bool {
		e, _ := b.epoch(t, gid)
		return e >= 3 // created at 1, ghost 2, recovery 3
	})
	// The initiator goes on: registering a branch and committing work well before the deadline.
	waitUntil(t, "the initiator can register a branch again", func() bool {
		_, err := b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: gid, Branch: b.tccBranch("b2")})
		return err == nil
	})
	_, owner := b.epoch(t, gid)
	require.Empty(t, owner, "nobody holds a TCC that waits for its initiator")
	res, err := b.client.CommitTCC(ctx, &treatyv1.CommitTCCRequest{Gid: gid, Wait: durationpb.New(20 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "confirmed", res.Transaction.Phase)
	require.ElementsMatch(t, []string{"confirm:b1", "confirm:b2"}, ops(b.part, gid))
}

// The same for a prepared message: a replica that claims it before its deadline hands it back
// at once, so SubmitMsg delivers it now rather than after the deadline.
func TestPreparedMessageClaimedEarlyIsHandedBack(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	ctx := context.Background()
	const gid = "msg-ghost"
	_, err := b.client.PrepareMsg(ctx, msgRequest(b.part, gid, 2*time.Minute, "d1"))
	require.NoError(t, err)
	_, err = postgres.New(b.pool).ClaimForOperator(ctx, gid, "ghost", 300*time.Millisecond)
	require.NoError(t, err)
	waitUntil(t, "recovery claims the row and hands it back", func() bool {
		e, owner := b.epoch(t, gid)
		return e >= 3 && owner == ""
	})
	var next time.Time
	var deadline time.Time
	require.NoError(t, b.pool.QueryRow(ctx, `SELECT next_attempt_at, deadline FROM treaty_transactions WHERE gid = $1`, gid).Scan(&next, &deadline))
	require.True(t, next.Equal(deadline), "due at its deadline (%s), got %s", deadline, next)
	_, err = b.client.SubmitMsg(ctx, &treatyv1.SubmitMsgRequest{Gid: gid})
	require.NoError(t, err)
	waitUntil(t, "the message is delivered at once", func() bool {
		return len(b.part.CallsFor(gid)) == 1
	})
}

// A commit that arrives after the deadline is refused, whether or not recovery has claimed the
// row yet: the database decides, with its own clock, in the same statement.
func TestTCCCommitAfterDeadlineIsRefused(t *testing.T) {
	t.Parallel()
	// Recovery claims once at start and then not for an hour: it cannot cancel first.
	b := setup(t, setupOpts{engine: engine.Config{RecoveryInterval: time.Hour}})
	ctx := context.Background()
	const gid = "tcc-late"
	b.beginTCC(t, gid, time.Second, "b1")
	waitUntil(t, "the deadline passes on the database clock", func() bool {
		var past bool
		require.NoError(t, b.pool.QueryRow(ctx, `SELECT deadline < now() FROM treaty_transactions WHERE gid = $1`, gid).Scan(&past))
		return past
	})
	_, err := b.client.CommitTCC(ctx, &treatyv1.CommitTCCRequest{Gid: gid})
	require.Equal(t, codes.FailedPrecondition, status.Code(err), "%v", err)
	require.Contains(t, err.Error(), "past its timeout")
	got, err := b.client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: gid})
	require.NoError(t, err)
	require.Equal(t, "trying", got.Transaction.Phase, "the refused commit changed nothing")
	require.Empty(t, ops(b.part, gid), "no confirm was sent")
	// A rollback after the deadline is what would happen anyway: accepted.
	_, err = b.client.RollbackTCC(ctx, &treatyv1.RollbackTCCRequest{Gid: gid, Reason: "gave up", Wait: durationpb.New(20 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, []string{"cancel:b1"}, ops(b.part, gid))
}

// A replica whose clock is off by ten minutes either way behaves as one whose clock is right:
// deadlines and retry times it persists are on the database clock. Ahead, it would turn a saga
// back at once ("deadline passed"); behind, it would write retry times in the past, and the
// stuck-transaction job would re-drive a saga that is only waiting for its backoff.
func TestSkewedReplicaClock(t *testing.T) {
	t.Parallel()
	for _, skew := range []time.Duration{10 * time.Minute, -10 * time.Minute} {
		t.Run(fmt.Sprintf("skew_%s", skew), func(t *testing.T) {
			t.Parallel()
			b := setup(t, setupOpts{
				engine: engine.Config{
					Now:  func() time.Time { return time.Now().Add(skew) },
					Jobs: engine.JobsConfig{Interval: -1, StuckAfter: time.Second},
				},
				script: func(_ context.Context, c testparticipant.Call) error {
					if c.Branch == "flaky" && c.Op == "action" {
						return status.Error(codes.Unavailable, "restarting")
					}
					return nil
				},
			})
			ctx := context.Background()

			// No early cancel: a saga with five minutes to go finishes.
			res, err := b.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{
				Gid:  "skew-ok",
				Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a"), b.step("b", "a")}, Timeout: durationpb.New(5 * time.Minute)},
				Wait: durationpb.New(30 * time.Second),
			})
			require.NoError(t, err)
			require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status, "reason: %s", res.Transaction.Reason)

			// Retry times on the database clock: a step that failed once retries in ten minutes
			// from the database's now, and the saga is not taken for stuck meanwhile.
			flaky := b.step("flaky")
			flaky.Retry = &treatyv1.RetryPolicy{MaxAttempts: 5, InitialBackoff: durationpb.New(10 * time.Minute), MaxBackoff: durationpb.New(10 * time.Minute)}
			_, err = b.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{
				Gid: "skew-retry", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{flaky}, Timeout: durationpb.New(time.Hour)},
			})
			require.NoError(t, err)
			var next, now time.Time
			waitUntil(t, "the failed attempt is recorded with its retry time", func() bool {
				err := b.pool.QueryRow(ctx, `SELECT next_attempt_at, now() FROM treaty_branches WHERE gid = 'skew-retry' AND op = 'action' AND attempts = 1 AND next_attempt_at IS NOT NULL`).Scan(&next, &now)
				return err == nil
			})
			// Jitter may shorten the backoff by up to half; never lengthen it, never put it in
			// the past.
			require.True(t, next.After(now.Add(4*time.Minute)) && next.Before(now.Add(11*time.Minute)),
				"retry at %s, database now %s: want within 10 minutes of the database clock", next, now)
			waitUntil(t, "no progress for longer than --stuck-after", func() bool {
				var idle bool
				require.NoError(t, b.pool.QueryRow(ctx, `SELECT updated_at < now() - interval '2 seconds' FROM treaty_transactions WHERE gid = 'skew-retry'`).Scan(&idle))
				return idle
			})
			b.app.Engine.RunJobs(ctx)
			j := jobStatus(b.app.Engine, engine.JobStuck)
			require.Empty(t, j.Err)
			require.Zero(t, j.Findings, "a saga waiting for its backoff is not stuck: %v", j.Sample)
			got, err := b.client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "skew-retry"})
			require.NoError(t, err)
			require.NotContains(t, eventKinds(got.Transaction), "reconcile_stuck")
		})
	}
}
