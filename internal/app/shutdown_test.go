package app_test

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// TestGracefulShutdownHandsWorkBack sends SIGTERM while a participant call is in flight: the
// coordinator stops accepting, lets the call finish and records it, releases its lease, and
// exits 0; a second coordinator continues at once instead of waiting for the lease to expire.
func TestGracefulShutdownHandsWorkBack(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	migrateDB(t, db)
	inFlight := make(chan struct{}, 1)
	part, err := testparticipant.Start(testparticipant.Options{Script: func(ctx context.Context, c testparticipant.Call) error {
		if c.Branch == "s0" {
			select {
			case inFlight <- struct{}{}:
			default:
			}
			time.Sleep(500 * time.Millisecond)
		}
		return nil
	}})
	require.NoError(t, err)
	t.Cleanup(part.Stop)

	// A long lease: if the work were not handed back, the second replica would wait a minute.
	first := startProc(t, db, "TREATY_LEASE=60s")
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, _ = first.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "term-1", Saga: &treatyv1.SagaSpec{Steps: crashSteps(part, "s0", "s1", "s2")}})
	}()
	<-inFlight
	require.NoError(t, first.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-first.done:
	case <-time.After(20 * time.Second):
		t.Fatal("coordinator did not exit after SIGTERM")
	}
	require.Equal(t, 0, first.cmd.ProcessState.ExitCode(), first.logs.String())

	pool, err := pgxpool.New(context.Background(), db)
	require.NoError(t, err)
	defer pool.Close()
	var owner *string
	var s0 string
	require.NoError(t, pool.QueryRow(context.Background(), `SELECT t.lease_owner, b.status FROM treaty_transactions t
		JOIN treaty_branches b ON b.gid = t.gid AND b.branch = 's0' AND b.op = 'action' WHERE t.gid = 'term-1'`).Scan(&owner, &s0))
	require.Nil(t, owner, "lease must be released at shutdown")
	require.Equal(t, "succeeded", s0, "the call in flight at SIGTERM must be recorded")

	second := startProc(t, db, "TREATY_LEASE=60s")
	start := time.Now()
	res, err := second.client.WaitTransaction(context.Background(), &treatyv1.WaitTransactionRequest{Gid: "term-1", Timeout: durationpb.New(20 * time.Second)})
	require.NoError(t, err)
	require.True(t, res.Terminal)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
	require.Less(t, time.Since(start), 10*time.Second, "handed-back work must not wait for the lease")
	require.Equal(t, map[string]int{"action:s0": 1, "action:s1": 1, "action:s2": 1}, countCalls(part, "term-1"))
}
