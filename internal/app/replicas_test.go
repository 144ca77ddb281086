package app_test

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// TestTwoReplicasShareWork runs 200 sagas on two coordinator processes sharing one database.
// One replica is frozen with SIGSTOP long enough for its leases to expire, so the other takes
// its sagas over, and is then resumed: the stale replica must not overwrite anything, and no
// step may be driven by both at once.
func TestTwoReplicasShareWork(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	migrateDB(t, db)
	type span struct{ start, end time.Time }
	var mu sync.Mutex
	spans := map[string][]span{} // gid/op:branch -> call spans
	part, err := testparticipant.Start(testparticipant.Options{Script: func(ctx context.Context, c testparticipant.Call) error {
		start := time.Now()
		time.Sleep(15 * time.Millisecond)
		mu.Lock()
		k := c.GID + "/" + c.Op + ":" + c.Branch
		spans[k] = append(spans[k], span{start, time.Now()})
		mu.Unlock()
		return nil
	}})
	require.NoError(t, err)
	t.Cleanup(part.Stop)

	a := startProc(t, db, "TREATY_LEASE=1500ms")
	b := startProc(t, db, "TREATY_LEASE=1500ms")

	const n = 200
	var wg sync.WaitGroup
	submitted := make(chan struct{}, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := a.client
			if i%2 == 1 {
				c = b.client
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, err := c.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{
				Gid: fmt.Sprintf("r-%03d", i), Saga: &treatyv1.SagaSpec{Steps: crashSteps(part, "s0", "s1", "s2")},
			})
			if err == nil {
				submitted <- struct{}{}
			}
		}()
	}
	// Freeze a once it has work in flight; keep it frozen past its lease.
	for range n / 2 {
		<-submitted
	}
	require.NoError(t, a.cmd.Process.Signal(syscall.SIGSTOP))
	time.Sleep(3 * time.Second) // the point of the test: a pause longer than the lease
	require.NoError(t, a.cmd.Process.Signal(syscall.SIGCONT))
	wg.Wait()

	for i := range n {
		gid := fmt.Sprintf("r-%03d", i)
		res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: gid, Timeout: durationpb.New(30 * time.Second)})
		require.NoError(t, err, gid)
		require.True(t, res.Terminal, "%s not terminal", gid)
		require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status, gid)
		// The history records each step's success exactly once: a stale replica wrote nothing.
		succeeded := map[string]int{}
		for _, e := range res.Transaction.Events {
			if e.Kind == "branch_succeeded" {
				succeeded[e.Branch]++
			}
		}
		require.Equal(t, map[string]int{"s0": 1, "s1": 1, "s2": 1}, succeeded, gid)
		require.Equal(t, "succeeded", res.Transaction.Events[len(res.Transaction.Events)-1].Kind)
	}
	// No branch was ever called by two replicas at once.
	mu.Lock()
	defer mu.Unlock()
	takenOver := 0
	for k, ss := range spans {
		sort.Slice(ss, func(i, j int) bool { return ss[i].start.Before(ss[j].start) })
		for i := 1; i < len(ss); i++ {
			require.False(t, ss[i].start.Before(ss[i-1].end), "%s: overlapping calls %v and %v", k, ss[i-1], ss[i])
		}
		if len(ss) > 1 {
			takenOver++
		}
	}
	t.Logf("%d branch calls repeated after a takeover", takenOver)
	// b took over a's work: a's logs say it lost ownership or found its lease gone.
	require.Eventually(t, func() bool {
		l := a.logs.String()
		return strings.Contains(l, "lost ownership") || strings.Contains(l, "could not renew lease") || strings.Contains(l, "driver cancelled")
	}, 30*time.Second, 50*time.Millisecond, "the stale replica never noticed it lost its leases")
}
