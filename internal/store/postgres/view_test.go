package postgres_test

import (
	"context"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/store"
)

// GetView answers from one snapshot: while a writer keeps changing a transaction's reason and
// appending the matching event in one commit, every view shows the event of the reason it
// shows, and none newer. (Statements run one by one under READ COMMITTED would each see a
// later commit; the many branch rows make the gap between them wide enough to hit.)
func TestGetViewIsOneSnapshot(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	ctx := t.Context()
	p := store.CreateParams{GID: "view-snapshot", Mode: "saga", Status: "running", Spec: []byte("s"), SpecHash: []byte("h"),
		Timeout: 3600e9, Owner: "w", Lease: 3600e9, Events: []store.Event{{Kind: "change", Detail: "0"}}}
	for i := range 3000 {
		p.Branches = append(p.Branches, store.Branch{Branch: "b" + strconv.Itoa(i), Op: "action", Position: i, Status: "pending"})
	}
	_, err := s.CreateTransaction(ctx, p)
	require.NoError(t, err)
	_, err = s.Pool().Exec(ctx, `UPDATE treaty_transactions SET reason = '0' WHERE gid = 'view-snapshot'`)
	require.NoError(t, err)

	wctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 1; wctx.Err() == nil; i++ {
			_, _ = s.Pool().Exec(wctx, `WITH u AS (UPDATE treaty_transactions SET reason = $1 WHERE gid = 'view-snapshot')
				INSERT INTO treaty_events (gid, kind, detail) VALUES ('view-snapshot', 'change', $1)`, strconv.Itoa(i))
		}
	}()
	defer func() { stop(); wg.Wait() }()

	for range 200 {
		tx, bs, evs, err := s.GetView(ctx, "view-snapshot")
		require.NoError(t, err)
		require.Len(t, bs, 3000)
		last := evs[len(evs)-1]
		require.Equal(t, tx.Reason, last.Detail, "the newest event is the one of the reason shown: one snapshot")
	}
}

// A view of an unknown gid is ErrNotFound and leaves its connection idle in the pool.
func TestGetViewNotFoundKeepsConnection(t *testing.T) {
	t.Parallel()
	s := newStore(t)
	for range 20 {
		_, _, _, err := s.GetView(t.Context(), "no-such-gid")
		require.ErrorIs(t, err, store.ErrNotFound)
	}
	require.LessOrEqual(t, s.Pool().Stat().NewConnsCount(), int64(2), "not-found views reuse their connection")
}
