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
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

func twoPhaseBranch(p *testparticipant.Participant, name string) *treatyv1.TwoPhaseBranch {
	return &treatyv1.TwoPhaseBranch{
		Name:        name,
		Prepare:     &treatyv1.Call{Target: p.Target("test.Svc/Prepare"), Payload: []byte("prepare-" + name)},
		Commit:      &treatyv1.Call{Target: p.Target("test.Svc/Commit"), Payload: []byte("commit-" + name)},
		Rollback:    &treatyv1.Call{Target: p.Target("test.Svc/Rollback"), Payload: []byte("rollback-" + name)},
		Retry:       &treatyv1.RetryPolicy{InitialBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(50 * time.Millisecond)},
		CallTimeout: durationpb.New(time.Second),
	}
}

func submit2PC(t *testing.T, c treatyv1.CoordinatorClient, p *testparticipant.Participant, gid string, names ...string) *treatyv1.Transaction {
	t.Helper()
	var bs []*treatyv1.TwoPhaseBranch
	for _, n := range names {
		bs = append(bs, twoPhaseBranch(p, n))
	}
	res, err := c.Submit2PC(context.Background(), &treatyv1.Submit2PCRequest{Gid: gid, Branches: bs, Wait: durationpb.New(15 * time.Second)})
	require.NoError(t, err)
	got, err := c.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: res.Transaction.Gid})
	require.NoError(t, err)
	return got.Transaction
}

func TestTwoPhaseCommitsWhenAllPrepare(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	tx := submit2PC(t, b.client, b.part, "2pc-ok", "ledger-a", "ledger-b")
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	require.Equal(t, "committed", tx.Phase)
	require.Equal(t, treatyv1.Mode_MODE_TWO_PHASE, tx.Mode)
	got := ops(b.part, "2pc-ok")
	require.ElementsMatch(t, []string{"prepare:ledger-a", "prepare:ledger-b"}, got[:2])
	require.ElementsMatch(t, []string{"commit:ledger-a", "commit:ledger-b"}, got[2:])
	// The decision is in the history before any commit result.
	kinds := eventKinds(tx)
	require.Less(t, indexOfKind(kinds, "committing"), indexOfKind(kinds, "branch_succeeded:commit:ledger-a"))
	for _, c := range b.part.CallsFor("2pc-ok") {
		require.Equal(t, "2pc", c.Mode)
	}
}

func indexOfKind(kinds []string, k string) int {
	for i, x := range kinds {
		if x == k {
			return i
		}
	}
	return -1
}

func TestTwoPhaseRefusedPrepareRollsBackAll(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: abortOn("prepare", "ledger-b")})
	tx := submit2PC(t, b.client, b.part, "2pc-no", "ledger-a", "ledger-b", "ledger-c")
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	require.Equal(t, "rolled_back", tx.Phase)
	require.Contains(t, tx.Reason, `"ledger-b" did not prepare`)
	calls := countCalls(b.part, "2pc-no")
	for _, n := range []string{"ledger-a", "ledger-b", "ledger-c"} {
		require.Equal(t, 1, calls["rollback:"+n], n)
		require.Zero(t, calls["commit:"+n], n)
	}
}

func TestTwoPhaseSlowPrepareRollsBack(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: func(ctx context.Context, c testparticipant.Call) error {
		if c.Op == "prepare" && c.Branch == "slow" {
			<-ctx.Done() // never answers within the call timeout
			return ctx.Err()
		}
		return nil
	}})
	tx := submit2PC(t, b.client, b.part, "2pc-slow", "fast", "slow")
	require.Equal(t, "rolled_back", tx.Phase)
	require.Contains(t, tx.Reason, `"slow" did not prepare`)
	require.Zero(t, countCalls(b.part, "2pc-slow")["commit:fast"])
}

func TestTwoPhaseCommitRetriedUntilItSucceeds(t *testing.T) {
	t.Parallel()
	var n atomic.Int32
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "commit" && c.Branch == "b" && n.Add(1) <= 2 {
			return status.Error(codes.Unavailable, "later")
		}
		return nil
	}})
	tx := submit2PC(t, b.client, b.part, "2pc-retry", "a", "b")
	require.Equal(t, "committed", tx.Phase)
	require.EqualValues(t, 3, branch(tx, "b", "commit").Attempts)
}

func TestTwoPhaseBadInput(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	ctx := context.Background()
	_, err := b.client.Submit2PC(ctx, &treatyv1.Submit2PCRequest{})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "branches: at least one branch")
	noCommit := twoPhaseBranch(b.part, "a")
	noCommit.Commit = nil
	_, err = b.client.Submit2PC(ctx, &treatyv1.Submit2PCRequest{Branches: []*treatyv1.TwoPhaseBranch{noCommit}})
	require.Equal(t, codes.InvalidArgument, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), "branches[0].commit: ")
	_, err = b.client.Submit2PC(ctx, &treatyv1.Submit2PCRequest{Branches: []*treatyv1.TwoPhaseBranch{twoPhaseBranch(b.part, "a"), twoPhaseBranch(b.part, "a")}})
	require.Contains(t, status.Convert(err).Message(), "branches[1].name: ")
	var n int
	require.NoError(t, b.pool.QueryRow(ctx, "SELECT count(*) FROM treaty_transactions").Scan(&n))
	require.Zero(t, n)
}

// TestTwoPhaseCrashBeforeDecisionRollsBack kills the coordinator after every participant
// prepared but before the decision was recorded: no decision recorded means roll back.
func TestTwoPhaseCrashBeforeDecisionRollsBack(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	migrateDB(t, db)
	part, err := testparticipant.Start(testparticipant.Options{})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	first := startProc(t, db, "TREATY_CRASH_AT=after-call:2", "TREATY_LEASE=1s")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = first.client.Submit2PC(ctx, &treatyv1.Submit2PCRequest{Gid: "2pc-crash-1", Branches: []*treatyv1.TwoPhaseBranch{
		twoPhaseBranch(part, "a"), twoPhaseBranch(part, "b")}, Wait: durationpb.New(5 * time.Second)})
	first.waitKilled(t)
	second := startProc(t, db, "TREATY_LEASE=1s")
	res, err := second.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "2pc-crash-1", Timeout: durationpb.New(20 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "rolled_back", res.Transaction.Phase)
	require.Contains(t, res.Transaction.Reason, "no decision recorded")
	calls := countCalls(part, "2pc-crash-1")
	require.Equal(t, 1, calls["rollback:a"])
	require.Equal(t, 1, calls["rollback:b"])
	require.Zero(t, calls["commit:a"]+calls["commit:b"])
}

// TestTwoPhaseCrashAfterDecisionCommits kills the coordinator after the decision was recorded
// and the first commit returned: recovery commits every participant, never rolls back.
func TestTwoPhaseCrashAfterDecisionCommits(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	migrateDB(t, db)
	part, err := testparticipant.Start(testparticipant.Options{})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	first := startProc(t, db, "TREATY_CRASH_AT=after-call:3", "TREATY_LEASE=1s")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, _ = first.client.Submit2PC(ctx, &treatyv1.Submit2PCRequest{Gid: "2pc-crash-2", Branches: []*treatyv1.TwoPhaseBranch{
		twoPhaseBranch(part, "a"), twoPhaseBranch(part, "b")}, Wait: durationpb.New(5 * time.Second)})
	first.waitKilled(t)
	second := startProc(t, db, "TREATY_LEASE=1s")
	res, err := second.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "2pc-crash-2", Timeout: durationpb.New(20 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, "committed", res.Transaction.Phase)
	calls := countCalls(part, "2pc-crash-2")
	require.Zero(t, calls["rollback:a"]+calls["rollback:b"])
	require.GreaterOrEqual(t, calls["commit:a"], 1)
	require.GreaterOrEqual(t, calls["commit:b"], 1)
}
