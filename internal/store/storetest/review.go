package storetest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

// testTransitionBeforeDeadline: with BeforeDeadline, a transition after the deadline (database
// clock) is refused and writes nothing; without it, the same move goes through.
func testTransitionBeforeDeadline(t *testing.T, s store.Store) {
	open := create(t, s, openParams("before-deadline-open", time.Hour))
	res := transition(t, s, store.TransitionParams{GID: open.GID, From: []string{"trying"}, To: "confirming",
		Owner: "replica-b", Lease: longLease, BeforeDeadline: true, Events: []store.Event{{Kind: "confirming"}}})
	require.True(t, res.Done, "before its deadline the move goes through")

	late := create(t, s, openParams("before-deadline-late", 100*time.Millisecond))
	waitDBTime(t, s, late.Deadline)
	res = transition(t, s, store.TransitionParams{GID: late.GID, From: []string{"trying"}, To: "confirming",
		Owner: "replica-b", Lease: longLease, BeforeDeadline: true, Events: []store.Event{{Kind: "confirming"}}})
	require.False(t, res.Done, "past its deadline the commit is refused")
	require.Equal(t, "trying", res.Current.Status)
	require.Equal(t, late.Epoch, res.Current.Epoch)
	require.Len(t, events(t, s, late.GID), 1, "a refused transition writes no event")

	res = transition(t, s, store.TransitionParams{GID: late.GID, From: []string{"trying"}, To: "cancelling",
		Reason: "rolled back", Owner: "replica-b", Lease: longLease, Events: []store.Event{{Kind: "cancelling"}}})
	require.True(t, res.Done, "a move that does not ask for the deadline is not refused by it")
}

// testRecordAgainIsIdempotent: a write sent again with the same WriteID (its first commit's
// reply was lost) is owned and applies nothing twice; a new write applies as usual.
func testRecordAgainIsIdempotent(t *testing.T, s store.Store) {
	tx := create(t, s, params("record-again", "replica-a", longLease))
	w := store.RecordParams{GID: tx.GID, Epoch: tx.Epoch, Status: "running", Lease: longLease, WriteID: 1<<62 + 42,
		Branches: []store.Branch{{Branch: "flight", Op: "action", Position: 0, Status: "succeeded", Attempts: 1}},
		Events:   []store.Event{{Kind: "succeeded", Branch: "flight", Op: "action"}}}
	before := len(events(t, s, tx.GID))
	require.True(t, record(t, s, w)[0].Owned)
	require.True(t, record(t, s, w)[0].Owned, "the same write again is still owned")
	require.True(t, record(t, s, w, store.RecordParams{GID: "record-again-none", Epoch: 1, WriteID: 1<<62 + 42})[0].Owned, "also within a batch")
	require.Len(t, events(t, s, tx.GID), before+1, "its events are written once")

	next := store.RecordParams{GID: tx.GID, Epoch: tx.Epoch, Status: "compensating", Lease: longLease, WriteID: 43,
		Events: []store.Event{{Kind: "compensating"}}} // ids beyond 32 bits are kept whole
	require.True(t, record(t, s, next)[0].Owned)
	got, _ := get(t, s, tx.GID)
	require.Equal(t, "compensating", got.Status)
	require.Len(t, events(t, s, tx.GID), before+2)

	// The id does not stand in for the epoch: at a stale epoch nothing is owned.
	c := store.RecordParams{GID: tx.GID, Epoch: tx.Epoch - 1, Status: "x", Lease: longLease, WriteID: 43}
	require.False(t, record(t, s, c)[0].Owned)
	// Without an id, a repeated write applies again (events twice): ids are the writer's choice.
	plain := store.RecordParams{GID: tx.GID, Epoch: tx.Epoch, Status: "compensating", Lease: longLease, Events: []store.Event{{Kind: "tick"}}}
	record(t, s, plain)
	record(t, s, plain)
	require.Len(t, events(t, s, tx.GID), before+4)
}

// testRegisterConcurrentPositions: registrations racing on one transaction give every branch
// its own position.
func testRegisterConcurrentPositions(t *testing.T, s store.Store) {
	tx := create(t, s, openParams("register-race-positions", time.Hour))
	const n = 16
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name := fmt.Sprintf("b%02d", i)
			_, err := s.RegisterBranches(context.Background(), store.RegisterParams{GID: tx.GID, Statuses: []string{"trying"},
				Branches: pair(name, 0, []byte(name)), Events: []store.Event{registered(name)}})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		require.NoError(t, err)
	}
	_, bs := get(t, s, tx.GID)
	require.Len(t, bs, 2*n)
	byPos := map[int]string{}
	for _, b := range bs {
		if other, ok := byPos[b.Position]; ok {
			require.Equal(t, other, b.Branch, "position %d given to both %s and %s", b.Position, other, b.Branch)
		}
		byPos[b.Position] = b.Branch
	}
	require.Len(t, byPos, n, "one position per branch")
}

// testOperatorQueue: actions queue per transaction, oldest first, and go once deleted.
func testOperatorQueue(t *testing.T, s store.Store) {
	_, err := s.QueueOperation(t.Context(), store.QueuedOperation{GID: "no-such-gid", Action: "retry", Actor: "a", Reason: "r"})
	require.ErrorIs(t, err, store.ErrNotFound)
	tx := create(t, s, params("queue-ops", "replica-a", longLease))
	first, err := s.QueueOperation(t.Context(), store.QueuedOperation{GID: tx.GID, Action: "rollback", Actor: "alice", Reason: "why"})
	require.NoError(t, err)
	second, err := s.QueueOperation(t.Context(), store.QueuedOperation{GID: tx.GID, Action: "resolve", Branch: "flight", Op: "compensate", Actor: "bob", Reason: "by hand"})
	require.NoError(t, err)
	require.Greater(t, second.ID, first.ID)
	qs, err := s.QueuedOperations(t.Context(), "replica-b", 10)
	require.NoError(t, err)
	require.Empty(t, qs, "replica-a leases the transaction: its actions are not replica-b's to apply")
	qs, err = s.QueuedOperations(t.Context(), "replica-a", 10)
	require.NoError(t, err)
	require.Len(t, qs, 2)
	require.Equal(t, "rollback", qs[0].Action)
	require.Equal(t, "alice", qs[0].Actor)
	require.Equal(t, "flight", qs[1].Branch)
	require.Equal(t, "compensate", qs[1].Op)
	require.False(t, qs[1].QueuedAt.IsZero())
	require.NoError(t, s.DeleteQueuedOperation(t.Context(), first.ID))
	qs, err = s.QueuedOperations(t.Context(), "replica-a", 10)
	require.NoError(t, err)
	require.Len(t, qs, 1)
	require.Equal(t, second.ID, qs[0].ID)
}

// testRegisterMaxRows: past MaxRows nothing is added, not even an event, and a branch already
// there is still reported as existing.
func testRegisterMaxRows(t *testing.T, s store.Store) {
	tx := create(t, s, openParams("register-max-rows", time.Hour))
	reg := func(name string) store.RegisterResult {
		res, err := s.RegisterBranches(t.Context(), store.RegisterParams{GID: tx.GID, Statuses: []string{"trying"},
			Branches: pair(name, 0, []byte(name)), Events: []store.Event{registered(name)}, MaxRows: 4})
		require.NoError(t, err)
		require.True(t, res.Open)
		return res
	}
	require.False(t, reg("a").Full)
	require.False(t, reg("b").Full)
	before := len(events(t, s, tx.GID))
	res := reg("c")
	require.True(t, res.Full)
	require.NotContains(t, res.Existing, "c")
	_, bs := get(t, s, tx.GID)
	require.Len(t, bs, 4, "c was not added")
	require.Len(t, events(t, s, tx.GID), before, "nor its event")
	res = reg("a")
	require.Contains(t, res.Existing, "a", "a repeated registration is still recognised at the bound")
	require.Equal(t, []byte("a"), res.Existing["a"])
}
