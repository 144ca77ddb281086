package storetest

import (
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

// testFaults: rules round-trip, expire by the database clock, are listed live (oldest first) or
// all (newest first, deleted ones kept for the audit trail), and a deleted rule no longer fires.
func testFaults(t *testing.T, s store.Store) {
	ctx := t.Context()
	live, err := s.ListFaults(ctx, false, 0)
	require.NoError(t, err)
	require.Empty(t, live)

	before, err := s.Now(ctx)
	require.NoError(t, err)
	a, err := s.CreateFault(ctx, store.CreateFaultParams{Rule: []byte(`{"effect":"drop"}`), MaxCount: 0,
		Reason: "game day", CreatedBy: "alice", ExpiresIn: time.Hour})
	require.NoError(t, err)
	require.NotZero(t, a.ID)
	require.JSONEq(t, `{"effect":"drop"}`, string(a.Rule))
	require.Equal(t, "game day", a.Reason)
	require.Equal(t, "alice", a.CreatedBy)
	require.WithinDuration(t, before.Add(time.Hour), a.ExpiresAt, 10*time.Second, "expiry is database now + ExpiresIn")
	require.True(t, a.DeletedAt.IsZero())

	short, err := s.CreateFault(ctx, store.CreateFaultParams{Rule: []byte(`{"effect":"delay"}`), MaxCount: 1,
		Reason: "short", CreatedBy: "bob", ExpiresIn: shortLease})
	require.NoError(t, err)
	require.Greater(t, short.ID, a.ID)

	// The short rule expires by the store's clock: it drops out of the live list and stops firing.
	require.Eventually(t, func() bool {
		now, err := s.Now(ctx)
		return err == nil && now.After(short.ExpiresAt)
	}, waitFor, pollInterval)
	fired, err := s.FireFault(ctx, short.ID)
	require.NoError(t, err)
	require.False(t, fired, "an expired rule does not fire")
	live, err = s.ListFaults(ctx, false, 0)
	require.NoError(t, err)
	require.Len(t, live, 1)
	require.Equal(t, a.ID, live[0].ID)

	for range 3 {
		fired, err := s.FireFault(ctx, a.ID)
		require.NoError(t, err)
		require.True(t, fired, "max_count 0 fires without bound")
	}
	del, err := s.DeleteFault(ctx, a.ID, "carol")
	require.NoError(t, err)
	require.Equal(t, "carol", del.DeletedBy)
	require.False(t, del.DeletedAt.IsZero())
	require.EqualValues(t, 3, del.Fired)
	fired, err = s.FireFault(ctx, a.ID)
	require.NoError(t, err)
	require.False(t, fired, "a deleted rule does not fire")
	_, err = s.DeleteFault(ctx, a.ID, "carol")
	require.True(t, errors.Is(err, store.ErrNotFound), "deleting twice: %v", err)
	_, err = s.DeleteFault(ctx, 999999, "carol")
	require.True(t, errors.Is(err, store.ErrNotFound), "unknown rule: %v", err)

	live, err = s.ListFaults(ctx, false, 0)
	require.NoError(t, err)
	require.Empty(t, live)
	all, err := s.ListFaults(ctx, true, 0)
	require.NoError(t, err)
	require.Len(t, all, 2, "deleted and expired rules stay for the audit trail")
	require.Equal(t, short.ID, all[0].ID, "all: newest first")
	require.Equal(t, "carol", all[1].DeletedBy)
	all, err = s.ListFaults(ctx, true, 1)
	require.NoError(t, err)
	require.Len(t, all, 1, "limit")
}

// testFaultsMaxCountConcurrent: replicas firing one rule at once never exceed its MaxCount.
func testFaultsMaxCountConcurrent(t *testing.T, s store.Store) {
	ctx := t.Context()
	f, err := s.CreateFault(ctx, store.CreateFaultParams{Rule: []byte(`{}`), MaxCount: 5,
		Reason: "r", CreatedBy: "a", ExpiresIn: time.Hour})
	require.NoError(t, err)
	var wins atomic.Int64
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 4 {
				ok, err := s.FireFault(ctx, f.ID)
				if err == nil && ok {
					wins.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	require.EqualValues(t, 5, wins.Load())
	all, err := s.ListFaults(ctx, false, 0)
	require.NoError(t, err)
	require.Len(t, all, 1)
	require.EqualValues(t, 5, all[0].Fired)
}
