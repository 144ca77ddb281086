package app_test

import (
	"context"
	"errors"
	"sync"
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

// branchStatus reads a branch's durable status: "" while it has no row (a branch's row is
// written once the branch is touched).
func (b *bundle) branchStatus(t *testing.T, gid, branch, op string) string {
	t.Helper()
	var s string
	err := b.pool.QueryRow(context.Background(),
		`SELECT status FROM treaty_branches WHERE gid = $1 AND branch = $2 AND op = $3`, gid, branch, op).Scan(&s)
	if errors.Is(err, pgx.ErrNoRows) {
		return ""
	}
	require.NoError(t, err)
	return s
}

// TestLazyProgressWrittenWhileTheNextStepRuns: with the default --lazy-progress a step's result
// may wait to be written with the next one, but not for longer than the window: while the
// next step's call hangs, the earlier result becomes durable anyway.
func TestLazyProgressWrittenWhileTheNextStepRuns(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	b := setup(t, setupOpts{script: func(ctx context.Context, c testparticipant.Call) error {
		if c.Branch == "s1" && c.Op == "action" {
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil
	}})
	s0, s1 := b.step("s0"), b.step("s1", "s0")
	s1.CallTimeout = durationpb.New(time.Minute)
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
		Gid: "lazy-window", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{s0, s1}}})
	require.NoError(t, err)
	waitUntil(t, "s0's result is written while s1's call hangs", func() bool {
		return b.branchStatus(t, "lazy-window", "s0", "action") == "succeeded"
	})
	require.Equal(t, 1, countCalls(b.part, "lazy-window")["action:s1"], "s1 is being called")
	close(release)
	res, err := b.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "lazy-window", Timeout: durationpb.New(30 * time.Second)})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
}

// TestLazyProgressTurnBackIsDurableBeforeTheFirstUndo: unrecorded forward progress never
// reaches a compensation. When a step refuses, the results before it and the decision to turn
// back are in the database before any compensation is called, even with a window far longer
// than the saga.
func TestLazyProgressTurnBackIsDurableBeforeTheFirstUndo(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	var b *bundle     // set once setup returns; read by the participant under mu
	var seen []string // what each compensation found in the database when it was called
	bb := setup(t, setupOpts{engine: engine.Config{LazyProgress: time.Minute}, script: func(ctx context.Context, c testparticipant.Call) error {
		switch {
		case c.Op == "action" && c.Branch == "s2":
			return status.Error(codes.Aborted, "sold out")
		case c.Op == "compensate":
			mu.Lock()
			pool := b.pool
			mu.Unlock()
			var st, s0, s1 string
			err := pool.QueryRow(ctx, `SELECT t.status,
				(SELECT status FROM treaty_branches WHERE gid = t.gid AND branch = 's0' AND op = 'action'),
				(SELECT status FROM treaty_branches WHERE gid = t.gid AND branch = 's1' AND op = 'action')
				FROM treaty_transactions t WHERE gid = $1`, c.GID).Scan(&st, &s0, &s1)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				seen = append(seen, err.Error())
			} else {
				seen = append(seen, c.Branch+": "+st+" s0="+s0+" s1="+s1)
			}
		}
		return nil
	}})
	mu.Lock()
	b = bb
	mu.Unlock()
	tx := bb.submitWait(t, "lazy-turn-back", bb.step("s0"), bb.step("s1", "s0"), bb.step("s2", "s1"))
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	mu.Lock()
	defer mu.Unlock()
	require.Equal(t, []string{
		"s1: compensating s0=succeeded s1=succeeded",
		"s0: compensating s0=succeeded s1=succeeded",
	}, seen)
}
