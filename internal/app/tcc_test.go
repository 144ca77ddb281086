package app_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

func (b *bundle) tccBranch(name string) *treatyv1.TCCBranch {
	return tccBranchOn(b.part, name)
}

func tccBranchOn(p *testparticipant.Participant, name string) *treatyv1.TCCBranch {
	return &treatyv1.TCCBranch{
		Name:        name,
		Confirm:     &treatyv1.Call{Target: p.Target("test.Svc/Confirm"), Payload: []byte("confirm-" + name)},
		Cancel:      &treatyv1.Call{Target: p.Target("test.Svc/Cancel"), Payload: []byte("cancel-" + name)},
		Retry:       &treatyv1.RetryPolicy{InitialBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(50 * time.Millisecond)},
		CallTimeout: durationpb.New(2 * time.Second),
	}
}

func (b *bundle) beginTCC(t *testing.T, gid string, timeout time.Duration, branches ...string) {
	t.Helper()
	ctx := context.Background()
	res, err := b.client.BeginTCC(ctx, &treatyv1.BeginTCCRequest{Gid: gid, Timeout: durationpb.New(timeout)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_RUNNING, res.Transaction.Status)
	require.Equal(t, "trying", res.Transaction.Phase)
	for _, n := range branches {
		_, err := b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: gid, Branch: b.tccBranch(n)})
		require.NoError(t, err)
	}
}

func TestTCCCommitConfirmsEveryBranch(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	b.beginTCC(t, "tcc-ok", time.Minute, "flight", "hotel")
	res, err := b.client.CommitTCC(context.Background(), &treatyv1.CommitTCCRequest{Gid: "tcc-ok", Wait: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	tx := res.Transaction
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	require.Equal(t, "confirmed", tx.Phase)
	require.ElementsMatch(t, []string{"confirm:flight", "confirm:hotel"}, ops(b.part, "tcc-ok"))
	for _, c := range b.part.CallsFor("tcc-ok") {
		require.Equal(t, "tcc", c.Mode)
		require.Equal(t, "confirm-"+c.Branch, string(c.Payload))
	}
	require.Equal(t, treatyv1.BranchStatus_BRANCH_STATUS_PENDING, branch(tx, "flight", "cancel").Status)

	// Committing again is a no-op; rolling back now is refused.
	_, err = b.client.CommitTCC(context.Background(), &treatyv1.CommitTCCRequest{Gid: "tcc-ok"})
	require.NoError(t, err)
	_, err = b.client.RollbackTCC(context.Background(), &treatyv1.RollbackTCCRequest{Gid: "tcc-ok"})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	require.Contains(t, err.Error(), "committed")
	// No branch can join a decided transaction.
	_, err = b.client.RegisterTCCBranch(context.Background(), &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-ok", Branch: b.tccBranch("car")})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	require.Len(t, b.part.CallsFor("tcc-ok"), 2)
}

func TestTCCRollbackCancelsEveryRegisteredBranch(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	b.beginTCC(t, "tcc-rb", time.Minute, "flight", "hotel", "car")
	res, err := b.client.RollbackTCC(context.Background(), &treatyv1.RollbackTCCRequest{Gid: "tcc-rb", Reason: "hotel try refused", Wait: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, res.Transaction.Status)
	require.Equal(t, "cancelled", res.Transaction.Phase)
	require.Equal(t, "hotel try refused", res.Transaction.Reason)
	require.ElementsMatch(t, []string{"cancel:flight", "cancel:hotel", "cancel:car"}, ops(b.part, "tcc-rb"))
	_, err = b.client.CommitTCC(context.Background(), &treatyv1.CommitTCCRequest{Gid: "tcc-rb"})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	require.Contains(t, err.Error(), "cancelled")
}

func TestTCCInitiatorGoneIsCancelledAtTimeout(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	// Long enough for the two registrations to arrive on a loaded machine; the deadline then
	// passes with nobody committing.
	b.beginTCC(t, "tcc-gone", 3*time.Second, "flight", "hotel")
	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "tcc-gone", Timeout: durationpb.New(60 * time.Second)})
	require.NoError(t, err)
	require.True(t, res.Terminal)
	require.Equal(t, "cancelled", res.Transaction.Phase)
	require.Contains(t, res.Transaction.Reason, "did not commit before the deadline")
	require.ElementsMatch(t, []string{"cancel:flight", "cancel:hotel"}, ops(b.part, "tcc-gone"))

	// The initiator wakes up and commits: refused, saying why.
	_, err = b.client.CommitTCC(context.Background(), &treatyv1.CommitTCCRequest{Gid: "tcc-gone"})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
	require.Contains(t, err.Error(), "did not commit before the deadline")
	// And it cannot register more branches either.
	_, err = b.client.RegisterTCCBranch(context.Background(), &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-gone", Branch: b.tccBranch("car")})
	require.Equal(t, codes.FailedPrecondition, status.Code(err))
}

func TestTCCRegisterIsIdempotentAndValidated(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	b.beginTCC(t, "tcc-reg", time.Minute, "flight")
	ctx := context.Background()
	res, err := b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-reg", Branch: b.tccBranch("flight")})
	require.NoError(t, err)
	require.True(t, res.Existing)
	other := b.tccBranch("flight")
	other.Confirm.Payload = []byte("different")
	_, err = b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-reg", Branch: other})
	require.Equal(t, codes.AlreadyExists, status.Code(err))

	bad := b.tccBranch("bad name")
	_, err = b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-reg", Branch: bad})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "branch.name: ")
	noCancel := b.tccBranch("car")
	noCancel.Cancel = nil
	_, err = b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-reg", Branch: noCancel})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "branch.cancel: ")
	_, err = b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: "nope", Branch: b.tccBranch("x")})
	require.Equal(t, codes.NotFound, status.Code(err))
	_, err = b.client.BeginTCC(ctx, &treatyv1.BeginTCCRequest{Gid: "bad gid"})
	require.Equal(t, codes.InvalidArgument, status.Code(err))

	got, err := b.client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "tcc-reg"})
	require.NoError(t, err)
	require.Len(t, got.Transaction.Branches, 2, "only flight's confirm and cancel: rejected registrations wrote nothing")
}

func TestTCCConfirmRetriedUntilItSucceeds(t *testing.T) {
	t.Parallel()
	var n atomic.Int32
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "confirm" && c.Branch == "hotel" && n.Add(1) <= 2 {
			return status.Error(codes.Unavailable, "later")
		}
		return nil
	}})
	b.beginTCC(t, "tcc-retry", time.Minute, "flight", "hotel")
	res, err := b.client.CommitTCC(context.Background(), &treatyv1.CommitTCCRequest{Gid: "tcc-retry", Wait: durationpb.New(10 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "confirmed", res.Transaction.Phase)
	require.EqualValues(t, 3, branch(res.Transaction, "hotel", "confirm").Attempts)
}

// TestTCCCrashAfterDecision kills the coordinator after the commit decision is durable and one
// confirm returned; a second coordinator confirms the rest.
func TestTCCCrashAfterDecision(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	migrateDB(t, db)
	part, err := testparticipant.Start(testparticipant.Options{})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	first := startProc(t, db, "TREATY_CRASH_AT=after-call:1", "TREATY_LEASE=1s")
	ctx := context.Background()
	_, err = first.client.BeginTCC(ctx, &treatyv1.BeginTCCRequest{Gid: "tcc-crash", Timeout: durationpb.New(time.Minute)})
	require.NoError(t, err)
	for _, n := range []string{"a", "b", "c"} {
		_, err := first.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-crash", Branch: tccBranchOn(part, n)})
		require.NoError(t, err)
	}
	_, _ = first.client.CommitTCC(ctx, &treatyv1.CommitTCCRequest{Gid: "tcc-crash", Wait: durationpb.New(5 * time.Second)})
	first.waitKilled(t)
	second := startProc(t, db, "TREATY_LEASE=1s")
	res, err := second.client.WaitTransaction(ctx, &treatyv1.WaitTransactionRequest{Gid: "tcc-crash", Timeout: durationpb.New(20 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "confirmed", res.Transaction.Phase)
	calls := countCalls(part, "tcc-crash")
	for _, n := range []string{"a", "b", "c"} {
		require.GreaterOrEqual(t, calls["confirm:"+n], 1)
		require.LessOrEqual(t, calls["confirm:"+n], 2)
		require.Zero(t, calls["cancel:"+n])
	}
}

// A TCC holds at most --max-steps branches, like a saga's steps: a commit loads them all.
func TestTCCBranchesBoundedByMaxSteps(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{engine: engine.Config{Limits: engine.Limits{MaxSteps: 2}}})
	b.beginTCC(t, "tcc-many", time.Minute, "flight", "hotel")
	ctx := context.Background()
	_, err := b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-many", Branch: b.tccBranch("car")})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "branch: ")
	require.Contains(t, status.Convert(err).Message(), "2 (--max-steps)")
	res, err := b.client.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: "tcc-many", Branch: b.tccBranch("hotel")})
	require.NoError(t, err, "a repeated registration at the bound is still recognised")
	require.True(t, res.Existing)
	got, err := b.client.CommitTCC(ctx, &treatyv1.CommitTCCRequest{Gid: "tcc-many", Wait: durationpb.New(30 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, got.Transaction.Status)
	require.ElementsMatch(t, []string{"confirm:flight", "confirm:hotel"}, ops(b.part, "tcc-many"), "the refused branch was never registered")
}
