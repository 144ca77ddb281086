package storetest

import (
	"fmt"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

func listGIDs(t *testing.T, s store.Store, f store.ListFilter) []string {
	t.Helper()
	if f.Limit == 0 {
		f.Limit = 100
	}
	txs, err := s.ListTransactions(t.Context(), f)
	require.NoError(t, err)
	out := []string{}
	for _, tx := range txs {
		out = append(out, tx.GID)
	}
	return out
}

// testList pins filtering and keyset pagination, newest first.
func testList(t *testing.T, s store.Store) {
	var all []string
	for i := range 6 {
		p := params(fmt.Sprintf("list-%d", i), "owner", longLease)
		if i%2 == 1 {
			p.Mode, p.WorkflowName = "tcc", ""
		}
		tx := create(t, s, p)
		if i == 4 {
			record(t, s, store.RecordParams{GID: tx.GID, Epoch: tx.Epoch, Status: "succeeded", Terminal: true})
		}
		all = append([]string{tx.GID}, all...) // newest first
		time.Sleep(2 * time.Millisecond)       // distinct creation times, in order
	}
	require.Equal(t, all, listGIDs(t, s, store.ListFilter{}))
	require.Equal(t, []string{"list-5", "list-3", "list-1"}, listGIDs(t, s, store.ListFilter{Modes: []string{"tcc"}}))
	require.Equal(t, []string{"list-4"}, listGIDs(t, s, store.ListFilter{Statuses: []string{"succeeded"}}))
	require.Equal(t, []string{"list-4", "list-2", "list-0"}, listGIDs(t, s, store.ListFilter{Workflow: "booking"}))
	require.Equal(t, []string{"list-3"}, listGIDs(t, s, store.ListFilter{GIDPrefix: "list-3"}))
	require.Empty(t, listGIDs(t, s, store.ListFilter{GIDPrefix: "nope"}))

	// Pages of two, each continuing after the last row of the previous one.
	var paged []string
	f := store.ListFilter{Limit: 2}
	for {
		txs, err := s.ListTransactions(t.Context(), f)
		require.NoError(t, err)
		if len(txs) == 0 {
			break
		}
		for _, tx := range txs {
			paged = append(paged, tx.GID)
		}
		last := txs[len(txs)-1]
		f.AfterCreated, f.AfterGID = last.CreatedAt, last.GID
	}
	require.Equal(t, all, paged)

	// Time ranges.
	txs, err := s.ListTransactions(t.Context(), store.ListFilter{Limit: 100})
	require.NoError(t, err)
	mid := txs[2].CreatedAt // list-3
	require.Equal(t, []string{"list-5", "list-4", "list-3"}, listGIDs(t, s, store.ListFilter{CreatedAfter: mid}))
	require.Equal(t, []string{"list-2", "list-1", "list-0"}, listGIDs(t, s, store.ListFilter{CreatedBefore: mid}))
	// list-4 was updated right after it was created: after its creation, with list-5.
	require.Equal(t, []string{"list-5", "list-4"}, listGIDs(t, s, store.ListFilter{UpdatedAfter: txs[1].CreatedAt.Add(time.Microsecond)}))
	require.Equal(t, []string{"list-3", "list-2", "list-1", "list-0"}, listGIDs(t, s, store.ListFilter{UpdatedBefore: txs[1].CreatedAt}))
}
