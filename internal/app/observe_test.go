package app_test

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
)

// leaseObserver counts lost leases and claims; the rest it ignores.
type leaseObserver struct {
	lost, renewTicks atomic.Int64
}

func (*leaseObserver) TransactionStarted(string)                        {}
func (*leaseObserver) TransactionFinished(string, string)               {}
func (*leaseObserver) BranchCall(string, string, string, time.Duration) {}
func (*leaseObserver) LeasesClaimed(int)                                {}
func (o *leaseObserver) LeaseLost()                                     { o.lost.Add(1) }
func (*leaseObserver) GroupCommit(int)                                  {}
func (*leaseObserver) JobRan(string, int, bool)                         {}

// A lease that is not renewed because its transaction just finished is no lost lease:
// treaty_leases_lost_total counts takeovers only. Sagas finish all the time while the renewer
// (every lease/3, here 500ms) runs; none was taken over, so none may be counted. (The lease is
// long enough that a loaded machine does not let one run out for real.)
func TestFinishedTransactionsAreNoLostLeases(t *testing.T) {
	t.Parallel()
	obs := &leaseObserver{}
	b := setup(t, setupOpts{engine: engine.Config{Lease: 1500 * time.Millisecond, Observer: obs}})
	ctx := context.Background()
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 150 {
				_, err := b.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: fmt.Sprintf("lease-%d-%d", w, i),
					Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a"), b.step("b", "a")}}, Wait: durationpb.New(30 * time.Second)})
				if err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	require.Zero(t, obs.lost.Load(), "no transaction was taken over")
}

// The history says why a compensation is skipped: a refused action left nothing to undo, an
// action that never ran neither.
func TestSkippedCompensationSaysWhy(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{script: abortOn("action", "b")})
	tx := b.submitWait(t, "skip-why", b.step("a"), b.step("b", "a"), b.step("c", "b"))
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	details := map[string]string{}
	for _, e := range tx.Events {
		if e.Kind == "branch_skipped" {
			details[e.Branch] = e.Detail
		}
	}
	require.Equal(t, map[string]string{
		"b": "action was refused; nothing to undo",
		"c": "action never ran; nothing to undo",
	}, details)
}
