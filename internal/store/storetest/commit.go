package storetest

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

// testCommitCreatesAndRecords: one group commit carries new transactions and writes to existing
// ones; each gets its own result, in the order asked, and a taken gid writes nothing.
func testCommitCreatesAndRecords(t *testing.T, s store.Store) {
	live := create(t, s, params("commit-live", "owner", longLease))
	taken := create(t, s, params("commit-taken", "owner", longLease))

	fresh := params("commit-new", "owner", longLease)
	fresh.Events = []store.Event{{Kind: "submitted", At: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}}
	again := params("commit-taken", "someone-else", longLease)
	again.Events = []store.Event{{Kind: "submitted-again"}}
	created, recorded, err := s.Commit(t.Context(), []store.CreateParams{fresh, again}, []store.RecordParams{
		{GID: live.GID, Epoch: live.Epoch, Status: "compensating", Lease: longLease,
			Events: []store.Event{{Kind: "turned_back"}}},
		{GID: live.GID, Epoch: live.Epoch + 7, Status: "stale", Lease: longLease},
	})
	require.NoError(t, err)
	require.Len(t, created, 2)
	require.Len(t, recorded, 2)

	require.True(t, created[0].Created)
	require.Equal(t, "commit-new", created[0].Transaction.GID)
	require.Equal(t, "owner", created[0].Transaction.LeaseOwner)
	tx, bs := get(t, s, "commit-new")
	require.Equal(t, "running", tx.Status)
	require.Len(t, bs, 4)
	evs := events(t, s, "commit-new")
	require.Len(t, evs, 1)
	require.True(t, evs[0].At.Equal(fresh.Events[0].At), "an event keeps the time it was given: %v", evs[0].At)

	require.False(t, created[1].Created, "the gid was taken")
	require.Equal(t, taken.Epoch, created[1].Transaction.Epoch)
	require.Equal(t, "owner", created[1].Transaction.LeaseOwner, "the stored row is reported, unchanged")
	require.Len(t, events(t, s, "commit-taken"), 1, "nothing written for a taken gid")

	require.True(t, recorded[0].Owned)
	require.False(t, recorded[1].Owned, "a stale epoch changes nothing")
	tx, _ = get(t, s, live.GID)
	require.Equal(t, "compensating", tx.Status)

	// Nothing at all is fine too.
	created, recorded, err = s.Commit(t.Context(), nil, nil)
	require.NoError(t, err)
	require.Empty(t, created)
	require.Empty(t, recorded)
}
