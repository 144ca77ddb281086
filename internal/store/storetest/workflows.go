package storetest

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

// ---- registered workflows ----

func registerWorkflow(t *testing.T, s store.Store, name, spec string) (store.Workflow, bool) {
	t.Helper()
	w, created, err := s.RegisterWorkflow(t.Context(), name, []byte(spec), []byte("hash of "+spec))
	require.NoError(t, err)
	return w, created
}

func testWorkflowVersions(t *testing.T, s store.Store) {
	ctx := t.Context()
	before := dbNow(t, s)
	v1, created := registerWorkflow(t, s, "booking", "one")
	after := dbNow(t, s)
	require.True(t, created)
	require.Equal(t, "booking", v1.Name)
	require.Equal(t, 1, v1.Version)
	require.Equal(t, []byte("one"), v1.Spec)
	require.Equal(t, []byte("hash of one"), v1.SpecHash)
	requireBetween(t, v1.CreatedAt, before, after, "CreatedAt")

	// The same definition again is the same version.
	same, created := registerWorkflow(t, s, "booking", "one")
	require.False(t, created)
	require.Equal(t, 1, same.Version)
	require.True(t, v1.CreatedAt.Equal(same.CreatedAt), "the stored version, not a new one")

	// A changed one is a new version; going back to an older definition is newer still (only
	// the newest version is compared).
	v2, created := registerWorkflow(t, s, "booking", "two")
	require.True(t, created)
	require.Equal(t, 2, v2.Version)
	v3, created := registerWorkflow(t, s, "booking", "one")
	require.True(t, created)
	require.Equal(t, 3, v3.Version)
	other, created := registerWorkflow(t, s, "refund", "one")
	require.True(t, created)
	require.Equal(t, 1, other.Version, "versions count per name")

	newest, err := s.GetWorkflow(ctx, "booking", 0)
	require.NoError(t, err)
	require.Equal(t, 3, newest.Version, "version 0 is the newest")
	require.Equal(t, []byte("one"), newest.Spec)
	pinned, err := s.GetWorkflow(ctx, "booking", 2)
	require.NoError(t, err)
	require.Equal(t, []byte("two"), pinned.Spec)
	require.Equal(t, []byte("hash of two"), pinned.SpecHash)
	require.True(t, v2.CreatedAt.Equal(pinned.CreatedAt))

	_, err = s.GetWorkflow(ctx, "booking", 9)
	require.ErrorIs(t, err, store.ErrNotFound)
	require.ErrorContains(t, err, "booking")
	_, err = s.GetWorkflow(ctx, "nobody", 0)
	require.ErrorIs(t, err, store.ErrNotFound)
	require.ErrorContains(t, err, "nobody")

	all, err := s.ListWorkflows(ctx, "")
	require.NoError(t, err)
	var got []string
	for _, w := range all {
		got = append(got, fmt.Sprintf("%s@%d", w.Name, w.Version))
	}
	require.Equal(t, []string{"booking@1", "booking@2", "booking@3", "refund@1"}, got, "by name, then version")
	one, err := s.ListWorkflows(ctx, "refund")
	require.NoError(t, err)
	require.Len(t, one, 1)
	require.Equal(t, []byte("one"), one[0].Spec)
	none, err := s.ListWorkflows(ctx, "nobody")
	require.NoError(t, err)
	require.Empty(t, none)
}

// Replicas registering one definition at once (each at start-up, say) make one version.
func testWorkflowConcurrent(t *testing.T, s store.Store) {
	const n = 8
	var (
		wg      sync.WaitGroup
		start   = make(chan struct{})
		ws      = make([]store.Workflow, n)
		created = make([]bool, n)
		errs    = make([]error, n)
	)
	for i := range n {
		wg.Go(func() {
			<-start
			ws[i], created[i], errs[i] = s.RegisterWorkflow(t.Context(), "booking", []byte("one"), []byte("hash of one"))
		})
	}
	close(start)
	wg.Wait()
	creators := 0
	for i := range n {
		require.NoError(t, errs[i], "registrant %d", i)
		require.Equal(t, 1, ws[i].Version, "registrant %d", i)
		if created[i] {
			creators++
		}
	}
	require.Equal(t, 1, creators, "exactly one registrant creates the version")
	all, err := s.ListWorkflows(t.Context(), "booking")
	require.NoError(t, err)
	require.Len(t, all, 1)
}

// ---- Stats ----

func testStats(t *testing.T, s store.Store) {
	st, err := s.Stats(t.Context())
	require.NoError(t, err)
	require.Empty(t, st.ByStatus, "an empty store")
	require.Zero(t, st.Due)
	require.Zero(t, st.Overdue)
	require.Zero(t, st.NeedsOperator)
	require.Zero(t, st.Finished)
	require.True(t, st.OldestRunning.IsZero())

	first := create(t, s, params("stats-leased", "replica-a", longLease))
	done := create(t, s, params("stats-done", "replica-a", longLease))
	record(t, s, store.RecordParams{GID: done.GID, Epoch: 1, Status: "succeeded", Terminal: true})
	stuck := params("stats-stuck", "replica-a", longLease)
	stuck.Status = "needs_operator"
	create(t, s, stuck)
	create(t, s, openParams("stats-open", time.Hour))
	releasedAt := dbNow(t, s)
	create(t, s, params("stats-due", "replica-a", longLease))
	require.NoError(t, s.ReleaseLeases(t.Context(), "replica-a", []store.Release{{GID: "stats-due", Epoch: 1}}))

	st, err = s.Stats(t.Context())
	after := dbNow(t, s)
	require.NoError(t, err)
	require.Equal(t, []store.StatusCount{
		{Mode: "saga", Status: "needs_operator", Count: 1},
		{Mode: "saga", Status: "running", Count: 2},
		{Mode: "tcc", Status: "trying", Count: 1},
	}, st.ByStatus, "the unfinished, by mode, then status")
	// The finished total may be an estimate (PostgreSQL: from the planner's statistics, which
	// an analyze refreshes): at most every row, never negative.
	require.GreaterOrEqual(t, st.Finished, 0)
	require.LessOrEqual(t, st.Finished, 5)
	require.Equal(t, 1, st.NeedsOperator)
	require.Equal(t, 1, st.Due, "only the released one is due; the rest are leased, waiting for a deadline, or done")
	require.Zero(t, st.Overdue)
	require.GreaterOrEqual(t, st.OldestDue, time.Duration(0))
	require.LessOrEqual(t, st.OldestDue, after.Sub(releasedAt), "OldestDue")
	require.True(t, first.CreatedAt.Equal(st.OldestRunning), "OldestRunning is the creation of the oldest live transaction: want %s, got %s", first.CreatedAt, st.OldestRunning)
}
