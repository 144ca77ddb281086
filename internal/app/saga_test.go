package app_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

func TestSagaSucceeds(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	tx := b.submitWait(t, "trip-1", b.step("car"), b.step("hotel"), b.step("flight"))

	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	require.Equal(t, []string{"action:car", "action:hotel", "action:flight"}, ops(b.part, "trip-1"))
	for _, name := range []string{"car", "hotel", "flight"} {
		require.Equal(t, treatyv1.BranchStatus_BRANCH_STATUS_SUCCEEDED, branch(tx, name, "action").Status)
		require.EqualValues(t, 1, branch(tx, name, "action").Attempts)
		require.Equal(t, treatyv1.BranchStatus_BRANCH_STATUS_SKIPPED, branch(tx, name, "compensate").Status)
	}
	require.Equal(t, []string{"submitted", "branch_succeeded:action:car", "branch_succeeded:action:hotel",
		"branch_succeeded:action:flight", "succeeded"}, eventKinds(tx))

	// Every call carries the transaction's metadata, the payload as given, and a deadline.
	for _, c := range b.part.CallsFor("trip-1") {
		require.Equal(t, "saga", c.Mode)
		require.Equal(t, "action", c.Op)
		require.Equal(t, "/test.Svc/Do", c.Method)
		require.Equal(t, "do-"+c.Branch, string(c.Payload))
		require.False(t, c.Deadline.IsZero(), "call without deadline")
		require.WithinDuration(t, c.At.Add(2*time.Second), c.Deadline, time.Second)
	}

	// Get returns the same durable picture.
	got, err := b.client.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: "trip-1"})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, got.Transaction.Status)
	require.Len(t, got.Transaction.Branches, 6)
	require.Equal(t, branchStatuses(tx), branchStatuses(got.Transaction), "the stored picture is the one the caller was told")
	// Stored are the actions' rows only: a compensation that was never needed has no row (issue
	// 13: three rows and six index entries less per three-step saga), and reads as skipped.
	require.Equal(t, []string{"car/action", "flight/action", "hotel/action"}, b.storedBranchRows(t, "trip-1"))
}

// A saga is stored without branch rows; while its first call is out, a reader still sees every
// branch, pending, and the saga ends as usual once the call returns.
func TestSagaRunningReadsEveryBranch(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	b := setup(t, setupOpts{script: func(ctx context.Context, c testparticipant.Call) error {
		if c.Branch == "car" {
			select {
			case <-release:
			case <-ctx.Done():
				return ctx.Err()
			}
		}
		return nil
	}})
	_, err := b.client.SubmitSaga(t.Context(), &treatyv1.SubmitSagaRequest{
		Gid: "held", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("car"), b.step("hotel")}},
	})
	require.NoError(t, err)
	require.Eventually(t, func() bool { return len(b.part.CallsFor("held")) == 1 }, 20*time.Second, 10*time.Millisecond)

	require.Empty(t, b.storedBranchRows(t, "held"), "rows written before any branch was touched")
	got, err := b.client.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: "held"})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_RUNNING, got.Transaction.Status)
	require.Equal(t, map[string]string{
		"car/action": "BRANCH_STATUS_PENDING", "car/compensate": "BRANCH_STATUS_PENDING",
		"hotel/action": "BRANCH_STATUS_PENDING", "hotel/compensate": "BRANCH_STATUS_PENDING",
	}, branchStatuses(got.Transaction))
	for _, br := range got.Transaction.Branches {
		require.Equal(t, got.Transaction.CreatedAt.AsTime(), br.UpdatedAt.AsTime(), "%s/%s: a branch never written dates from the saga", br.Name, br.Op)
	}

	close(release)
	tx := b.submitWait(t, "held", b.step("car"), b.step("hotel"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	require.Equal(t, []string{"car/action", "hotel/action"}, b.storedBranchRows(t, "held"))
}

// branchStatuses is "name/op" -> status of every branch of tx.
func branchStatuses(tx *treatyv1.Transaction) map[string]string {
	out := map[string]string{}
	for _, br := range tx.Branches {
		out[br.Name+"/"+br.Op] = br.Status.String()
	}
	return out
}

// storedBranchRows lists the (branch, op) rows stored for gid, sorted.
func (b *bundle) storedBranchRows(t *testing.T, gid string) []string {
	t.Helper()
	rows, err := b.pool.Query(context.Background(), `SELECT branch || '/' || op FROM treaty_branches WHERE gid = $1 ORDER BY 1`, gid)
	require.NoError(t, err)
	out, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return out
}

func TestSagaGeneratesGID(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	tx := b.submitWait(t, "", b.step("only"))
	require.NotEmpty(t, tx.Gid)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
}

func abortOn(op, branch string) testparticipant.Script {
	return func(_ context.Context, c testparticipant.Call) error {
		if c.Op == op && c.Branch == branch {
			return status.Error(codes.Aborted, branch+" sold out")
		}
		return nil
	}
}

func TestSagaAbortedAtEachPosition(t *testing.T) {
	t.Parallel()
	names := []string{"s0", "s1", "s2", "s3"}
	for pos := range names {
		t.Run(fmt.Sprintf("abort_at_%d", pos), func(t *testing.T) {
			t.Parallel()
			b := setup(t, setupOpts{script: abortOn("action", names[pos])})
			var steps []*treatyv1.SagaStep
			for _, n := range names {
				steps = append(steps, b.step(n))
			}
			gid := fmt.Sprintf("abort-%d", pos)
			tx := b.submitWait(t, gid, steps...)
			require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
			require.Contains(t, tx.Reason, names[pos]+" sold out")

			var want []string
			for i := 0; i <= pos; i++ {
				want = append(want, "action:"+names[i])
			}
			for i := pos - 1; i >= 0; i-- { // reverse order; the refused step is not compensated
				want = append(want, "compensate:"+names[i])
			}
			require.Equal(t, want, ops(b.part, gid))
			require.Equal(t, treatyv1.BranchStatus_BRANCH_STATUS_FAILED, branch(tx, names[pos], "action").Status)
			require.Equal(t, treatyv1.BranchStatus_BRANCH_STATUS_SKIPPED, branch(tx, names[pos], "compensate").Status)
			for i := pos + 1; i < len(names); i++ {
				require.Equal(t, treatyv1.BranchStatus_BRANCH_STATUS_PENDING, branch(tx, names[i], "action").Status)
			}
			// A saga that turned back writes every compensation it touched (done or skipped)
			// and the actions it called; the actions it never reached have no row and read as
			// pending. The stored picture is the one the caller was told.
			got, err := b.client.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: gid})
			require.NoError(t, err)
			require.Equal(t, branchStatuses(tx), branchStatuses(got.Transaction))
			var stored []string
			for i, n := range names {
				if i <= pos {
					stored = append(stored, n+"/action")
				}
				stored = append(stored, n+"/compensate")
			}
			require.Equal(t, stored, b.storedBranchRows(t, gid))
		})
	}
}

func TestSagaParallelBranches(t *testing.T) {
	t.Parallel()
	// b and c depend on a; d on both. b waits until c has arrived too: it finishes only if the
	// coordinator really runs them at the same time.
	var cArrived sync.WaitGroup
	cArrived.Add(1)
	var once sync.Once
	script := func(ctx context.Context, c testparticipant.Call) error {
		if c.Op == "action" && c.Branch == "c" {
			once.Do(cArrived.Done)
		}
		if c.Op == "action" && c.Branch == "b" {
			done := make(chan struct{})
			go func() { cArrived.Wait(); close(done) }()
			select {
			case <-done:
			case <-ctx.Done():
				return status.Error(codes.DeadlineExceeded, "c never came")
			}
		}
		return nil
	}
	b := setup(t, setupOpts{script: script})
	tx := b.submitWait(t, "diamond", b.step("a"), b.step("b", "a"), b.step("c", "a"), b.step("d", "b", "c"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	got := ops(b.part, "diamond")
	require.Len(t, got, 4)
	require.Equal(t, "action:a", got[0])
	require.ElementsMatch(t, []string{"action:b", "action:c"}, got[1:3])
	require.Equal(t, "action:d", got[3])
	require.EqualValues(t, 1, branch(tx, "b", "action").Attempts, "b must not have needed a retry")
}

func TestSagaParallelCompensationInReverseDependencyOrder(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: abortOn("action", "d")})
	tx := b.submitWait(t, "diamond-abort", b.step("a"), b.step("b", "a"), b.step("c", "a"), b.step("d", "b", "c"))
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	got := ops(b.part, "diamond-abort")
	require.Len(t, got, 7)
	require.ElementsMatch(t, []string{"compensate:b", "compensate:c"}, got[4:6])
	require.Equal(t, "compensate:a", got[6])
}

func TestSagaTransientErrorsRetried(t *testing.T) {
	t.Parallel()
	var n atomic.Int32
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Branch == "flaky" && n.Add(1) <= 2 {
			return status.Error(codes.Unavailable, "try later")
		}
		return nil
	}})
	tx := b.submitWait(t, "flaky-1", b.step("first"), b.step("flaky"), b.step("last"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)
	require.EqualValues(t, 3, branch(tx, "flaky", "action").Attempts)
	require.Equal(t, []string{"action:first", "action:flaky", "action:flaky", "action:flaky", "action:last"}, ops(b.part, "flaky-1"))
	require.Contains(t, eventKinds(tx), "branch_retry:action:flaky")
}

func TestSagaRetriesExhaustedCompensates(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "action" && c.Branch == "broken" {
			return status.Error(codes.Internal, "disk on fire")
		}
		return nil
	}})
	tx := b.submitWait(t, "exhaust-1", b.step("ok"), b.step("broken"), b.step("never"))
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	require.Contains(t, tx.Reason, "broken")
	// The broken step may have run (its outcome was never known), so it is compensated too,
	// before the step it depends on.
	require.Equal(t, []string{"action:ok", "action:broken", "action:broken", "action:broken", "action:broken",
		"compensate:broken", "compensate:ok"}, ops(b.part, "exhaust-1"))
	require.EqualValues(t, 4, branch(tx, "broken", "action").Attempts)
	require.Contains(t, branch(tx, "broken", "action").LastError, "disk on fire")
}

func TestSagaCompensationRetriedUntilItSucceeds(t *testing.T) {
	t.Parallel()
	var undo atomic.Int32
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "action" && c.Branch == "second" {
			return status.Error(codes.Aborted, "no")
		}
		if c.Op == "compensate" && c.Branch == "first" && undo.Add(1) <= 2 {
			return status.Error(codes.Unavailable, "undo later")
		}
		return nil
	}})
	tx := b.submitWait(t, "comp-retry", b.step("first"), b.step("second"))
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	require.EqualValues(t, 3, branch(tx, "first", "compensate").Attempts)
	require.Equal(t, treatyv1.BranchStatus_BRANCH_STATUS_SUCCEEDED, branch(tx, "first", "compensate").Status)
}

func TestSagaNeedsOperatorAfterThreshold(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "action" && c.Branch == "second" {
			return status.Error(codes.Aborted, "no")
		}
		if c.Op == "compensate" {
			return status.Error(codes.Unavailable, "compensation service down")
		}
		return nil
	}})
	tx := b.submitWait(t, "operator-1", b.step("first"), b.step("second"))
	require.Equal(t, treatyv1.Status_STATUS_NEEDS_OPERATOR, tx.Status)
	require.EqualValues(t, 3, branch(tx, "first", "compensate").Attempts) // threshold 3 in setup
	require.Contains(t, branch(tx, "first", "compensate").LastError, "compensation service down")
	require.Contains(t, tx.Reason, "compensation failed 3 times")
	// The whole history is kept.
	kinds := eventKinds(tx)
	require.Contains(t, kinds, "branch_aborted:action:second")
	require.Contains(t, kinds, "compensating")
	require.Equal(t, "needs_operator", kinds[len(kinds)-1])
	// Nothing is retried after the flag: an operator decides.
	before := len(b.part.CallsFor("operator-1"))
	got, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "operator-1", Timeout: durationpb.New(300 * time.Millisecond)})
	require.NoError(t, err)
	require.True(t, got.Terminal)
	require.Len(t, b.part.CallsFor("operator-1"), before)
}

func TestSagaDeadlineCompensates(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: func(ctx context.Context, c testparticipant.Call) error {
		if c.Op == "action" && c.Branch == "slow" {
			return status.Error(codes.Unavailable, "busy")
		}
		return nil
	}})
	slow := b.step("slow")
	slow.Retry = &treatyv1.RetryPolicy{MaxAttempts: 1000, InitialBackoff: durationpb.New(20 * time.Millisecond), MaxBackoff: durationpb.New(20 * time.Millisecond)}
	res, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
		Gid: "deadline-1",
		// The deadline leaves a loaded machine time to reach the slow step (the assertion below
		// needs it tried), and then passes while it keeps failing.
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("fast"), slow}, Timeout: durationpb.New(3 * time.Second)},
		Wait: durationpb.New(60 * time.Second),
	})
	require.NoError(t, err)
	tx := res.Transaction
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	require.Contains(t, tx.Reason, "deadline")
	got := ops(b.part, "deadline-1")
	require.Equal(t, []string{"compensate:slow", "compensate:fast"}, got[len(got)-2:])
}

func TestSubmitIsIdempotent(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	steps := []*treatyv1.SagaStep{b.step("a"), b.step("b")}
	first := b.submitWait(t, "idem-1", steps...)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, first.Status)

	res, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
		Gid: "idem-1", Saga: &treatyv1.SagaSpec{Steps: steps}, Wait: durationpb.New(5 * time.Second),
	})
	require.NoError(t, err)
	require.True(t, res.Existing)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
	require.Len(t, b.part.CallsFor("idem-1"), 2, "a resubmitted saga must not run again")

	other := b.step("a")
	other.Action.Payload = []byte("something else")
	_, err = b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
		Gid: "idem-1", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{other, b.step("b")}},
	})
	require.Equal(t, codes.AlreadyExists, status.Code(err))
	require.Contains(t, status.Convert(err).Message(), `"idem-1"`)
	require.Len(t, b.part.CallsFor("idem-1"), 2)
}

func TestSubmitConcurrentSameGIDRunsOnce(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	steps := []*treatyv1.SagaStep{b.step("a"), b.step("b")}
	var wg sync.WaitGroup
	var existing atomic.Int32
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
				Gid: "race-1", Saga: &treatyv1.SagaSpec{Steps: steps}, Wait: durationpb.New(10 * time.Second),
			})
			require.NoError(t, err)
			if res.Existing {
				existing.Add(1)
			}
		}()
	}
	wg.Wait()
	require.EqualValues(t, 7, existing.Load())
	require.Equal(t, []string{"action:a", "action:b"}, ops(b.part, "race-1"))
}

func TestWaitTimesOutOnRunningSaga(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	b := setup(t, setupOpts{script: func(ctx context.Context, c testparticipant.Call) error {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	}})
	t.Cleanup(func() { close(release) })
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Gid: "slow-1", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("x")}}})
	require.NoError(t, err)
	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "slow-1", Timeout: durationpb.New(200 * time.Millisecond)})
	require.NoError(t, err)
	require.False(t, res.Terminal)
	require.Equal(t, treatyv1.Status_STATUS_RUNNING, res.Transaction.Status)

	_, err = b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "nope"})
	require.Equal(t, codes.NotFound, status.Code(err))
}

func TestBadInputRejectedAndNothingWritten(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	ok := func() *treatyv1.SagaStep { return b.step("s") }
	big := make([]byte, 1<<20+1)
	cases := []struct {
		name  string
		req   *treatyv1.SubmitSagaRequest
		field string
		msg   string
	}{
		{"no steps", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{}}, "saga.steps", "at least one step"},
		{"no saga", &treatyv1.SubmitSagaRequest{}, "saga.steps", "at least one step"},
		{"duplicate names", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{ok(), ok()}}}, "saga.steps[1].name", `"s" duplicates saga.steps[0]`},
		{"unknown dependency", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a", "ghost")}}}, "saga.steps[0].depends_on", `"ghost" is not a step`},
		{"cycle", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a", "c"), b.step("b", "a"), b.step("c", "b")}}}, "saga.steps.depends_on", "cycle"},
		{"malformed target", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{func() *treatyv1.SagaStep {
			s := ok()
			s.Action.Target = "http://localhost:1/x.Y/Z"
			return s
		}()}}}, "saga.steps[0].action.target", "grpc"},
		{"missing compensation", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{func() *treatyv1.SagaStep {
			s := ok()
			s.Compensate = nil
			return s
		}()}}}, "saga.steps[0].compensate", "required"},
		{"payload over limit", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{func() *treatyv1.SagaStep {
			s := ok()
			s.Action.Payload = big
			return s
		}()}}}, "saga.steps[0].action.payload", "limit 1 MiB"},
		{"too many steps", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: func() []*treatyv1.SagaStep {
			var ss []*treatyv1.SagaStep
			for i := range 65 {
				ss = append(ss, b.step(fmt.Sprintf("s%d", i)))
			}
			return ss
		}()}}, "saga.steps", "65 steps, limit 64"},
		{"gid too long", &treatyv1.SubmitSagaRequest{Gid: strings.Repeat("g", 129), Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{ok()}}}, "gid", "129 bytes, limit 128"},
		{"gid bad characters", &treatyv1.SubmitSagaRequest{Gid: "trip/1 ", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{ok()}}}, "gid", "[A-Za-z0-9._:-]"},
		{"negative timeout", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{ok()}, Timeout: durationpb.New(-time.Second)}}, "saga.timeout", "negative"},
		{"too many attempts", &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{func() *treatyv1.SagaStep {
			s := ok()
			s.Retry.MaxAttempts = 1001
			return s
		}()}}}, "saga.steps[0].retry.max_attempts", "1000"},
	}
	for _, tc := range cases {
		_, err := b.client.SubmitSaga(context.Background(), tc.req)
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%s: %v", tc.name, err)
		msg := status.Convert(err).Message()
		require.True(t, strings.HasPrefix(msg, tc.field+": "), "%s: message %q should name field %q", tc.name, msg, tc.field)
		require.Contains(t, msg, tc.msg, tc.name)
	}
	var n int
	require.NoError(t, b.pool.QueryRow(context.Background(), "SELECT count(*) FROM treaty_transactions").Scan(&n))
	require.Zero(t, n, "a rejected request must write nothing")
	require.NoError(t, b.pool.QueryRow(context.Background(), "SELECT count(*) FROM treaty_events").Scan(&n))
	require.Zero(t, n)
}

func TestSubmitRefusedAtCapacity(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	b := setup(t, setupOpts{engine: engine.Config{MaxActive: 1}, script: func(ctx context.Context, c testparticipant.Call) error {
		select {
		case <-release:
		case <-ctx.Done():
		}
		return nil
	}})
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Gid: "cap-1", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("x")}}})
	require.NoError(t, err)
	_, err = b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Gid: "cap-2", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("x")}}})
	require.Equal(t, codes.ResourceExhausted, status.Code(err))
	require.Contains(t, err.Error(), "max-active")
	close(release)
	_, err = b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "cap-2"})
	require.Equal(t, codes.NotFound, status.Code(err), "a refused request writes nothing")
}
