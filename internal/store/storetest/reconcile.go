package storetest

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

func testReconcile(t *testing.T, s store.Store) {
	// A live transaction whose owner died and that nobody touched since: stuck.
	stuck := create(t, s, params("rc-stuck", "dead-owner", shortLease))
	// One still held and renewed, but making no progress (a hung driver): stuck, and taken away.
	held := create(t, s, params("rc-held", "hung-owner", longLease))
	// One waiting out a scheduled retry: legitimately idle, not stuck.
	waiting := create(t, s, params("rc-backoff", "owner", longLease))
	record(t, s, store.RecordParams{GID: waiting.GID, Epoch: waiting.Epoch, Status: "running", Lease: longLease,
		Branches: []store.Branch{{Branch: "flight", Op: "action", Position: 0, Status: "unknown", Attempts: 1,
			NextAttemptAt: dbNow(t, s).Add(time.Hour)}}})
	// A TCC whose initiator still has time: waiting, not stuck.
	create(t, s, openParams("rc-tcc-young", time.Hour))
	// A TCC whose initiator vanished, still trying past its deadline.
	tp := openParams("rc-tcc", 10*time.Millisecond)
	tcc := create(t, s, tp)
	waitDBTime(t, s, stuck.LeaseExpiresAt.Add(20*time.Millisecond))

	r, err := s.Reconcile(t.Context(), store.ReconcileParams{StuckAfter: time.Millisecond, Grace: time.Millisecond, Limit: 10})
	require.NoError(t, err)
	require.ElementsMatch(t, []string{stuck.GID, held.GID, tcc.GID}, r.Stuck)
	require.Equal(t, 3, r.StuckCount)
	require.Equal(t, []string{tcc.GID}, r.ExpiredTCC)
	require.Equal(t, 1, r.ExpiredCount)
	require.Empty(t, r.InDoubt2PC)

	// Re-driven: due now for anyone, the hung owner fenced out, and the history says why.
	res := record(t, s, store.RecordParams{GID: held.GID, Epoch: held.Epoch, Status: "running", Lease: longLease})
	require.False(t, res[0].Owned, "the hung owner must not write after the re-drive")
	claimGIDs(t, s, "recoverer", longLease, stuck.GID, held.GID, tcc.GID)
	evs := events(t, s, stuck.GID)
	require.Equal(t, "reconcile_stuck", evs[len(evs)-1].Kind)
}

func testDeleteFinished(t *testing.T, s store.Store) {
	done := create(t, s, params("del-done", "owner", longLease))
	record(t, s, store.RecordParams{GID: done.GID, Epoch: done.Epoch, Status: "succeeded", Terminal: true,
		Branches: []store.Branch{{Branch: "flight", Op: "action", Position: 0, Status: "succeeded", Attempts: 1}},
		Events:   []store.Event{{Kind: "succeeded"}}})
	stuck := create(t, s, params("del-operator", "owner", longLease))
	record(t, s, store.RecordParams{GID: stuck.GID, Epoch: stuck.Epoch, Status: "needs_operator", Terminal: true})
	live := create(t, s, params("del-live", "owner", longLease))

	// Too young to delete.
	n, err := s.DeleteFinished(t.Context(), time.Hour, 10)
	require.NoError(t, err)
	require.Zero(t, n)
	waitDBTime(t, s, dbNow(t, s).Add(5*time.Millisecond))
	n, err = s.DeleteFinished(t.Context(), time.Millisecond, 10)
	require.NoError(t, err)
	require.Equal(t, 1, n, "only the finished transaction goes; one waiting for an operator stays")
	_, _, err = s.GetTransaction(t.Context(), done.GID)
	require.True(t, errors.Is(err, store.ErrNotFound))
	require.Empty(t, events(t, s, done.GID), "its history goes with it")
	// Its branches went too: the gid can be used again and starts with nothing of the old one.
	again := create(t, s, params("del-done", "owner", longLease))
	_, bs := get(t, s, again.GID)
	require.Len(t, bs, 4)
	for _, b := range bs {
		require.Equal(t, "pending", b.Status, "%s %s left over from the deleted transaction", b.Branch, b.Op)
	}
	require.Len(t, events(t, s, again.GID), 1, "only the new transaction's history")
	get(t, s, stuck.GID)
	get(t, s, live.GID)

	// Batches: never more than asked.
	for _, g := range []string{"del-a", "del-b", "del-c"} {
		tx := create(t, s, params(g, "owner", longLease))
		record(t, s, store.RecordParams{GID: tx.GID, Epoch: tx.Epoch, Status: "compensated", Terminal: true})
	}
	waitDBTime(t, s, dbNow(t, s).Add(5*time.Millisecond))
	n, err = s.DeleteFinished(t.Context(), time.Millisecond, 2)
	require.NoError(t, err)
	require.Equal(t, 2, n)
	n, err = s.DeleteFinished(t.Context(), time.Millisecond, 2)
	require.NoError(t, err)
	require.Equal(t, 1, n)
}
