package app_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/internal/store/postgres"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// wrappedCoordinator starts a coordinator on a fresh database through wrap's wrapper of the
// real PostgreSQL store (stopped when the test ends, if the test has not stopped it), a test
// participant, and a client of the coordinator.
func wrappedCoordinator[S store.Store](t *testing.T, wrap func(*postgres.Store) S, ec engine.Config) (S, *app.App, treatyv1.CoordinatorClient, *bundle) {
	t.Helper()
	ctx := context.Background()
	pg, err := postgres.Open(ctx, pgtest.NewDatabase(t), 16)
	require.NoError(t, err)
	_, err = postgres.Migrate(ctx, pg.Pool())
	require.NoError(t, err)
	st := wrap(pg)
	a, err := app.Start(ctx, app.Config{Store: st, Listen: "127.0.0.1:0", Logger: testLogger(t), Engine: ec})
	require.NoError(t, err)
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, a.Stop(sctx))
	})
	part, err := testparticipant.Start(testparticipant.Options{})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return st, a, treatyv1.NewCoordinatorClient(conn), &bundle{part: part}
}

// lostReplyStore is the real PostgreSQL store whose group commits of several records, the first
// few times, commit and then report an error: what a client sees when the connection drops
// after the server committed but before its reply arrived.
type lostReplyStore struct {
	*postgres.Store
	lost atomic.Int32
}

func (s *lostReplyStore) Commit(ctx context.Context, cs []store.CreateParams, ps []store.RecordParams) ([]store.CreateResult, []store.RecordResult, error) {
	created, res, err := s.Store.Commit(ctx, cs, ps)
	if err == nil && len(ps) > 1 && s.lost.Add(1) <= 3 {
		return nil, nil, errors.New("connection reset by peer (the commit happened)")
	}
	return created, res, err
}

// After a group commit whose reply was lost, the committer writes each record again alone:
// those writes committed already and must not be applied twice (no event twice in a history).
func TestGroupCommitLostReplyWritesEventsOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	st, _, client, b := wrappedCoordinator(t, func(pg *postgres.Store) *lostReplyStore { return &lostReplyStore{Store: pg} },
		engine.Config{Lease: 5 * time.Second, RecoveryInterval: 100 * time.Millisecond})

	var gids []string
	for round := 0; st.lost.Load() < 3; round++ {
		require.Less(t, round, 5, "no group commit of several records happened")
		var wg sync.WaitGroup
		for i := range 16 {
			gid := fmt.Sprintf("lost-%d-%d", round, i)
			gids = append(gids, gid)
			wg.Add(1)
			go func() {
				defer wg.Done()
				res, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: gid,
					Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a"), b.step("b", "a")}}, Wait: durationpb.New(30 * time.Second)})
				if !(err == nil && res.Transaction.Status == treatyv1.Status_STATUS_SUCCEEDED) {
					t.Errorf("saga %s: %v %v", gid, err, res)
				}
			}()
		}
		wg.Wait()
	}
	for _, gid := range gids {
		evs, err := st.ListEvents(ctx, gid)
		require.NoError(t, err)
		seen := map[string]bool{}
		for _, e := range evs {
			k := e.Kind + ":" + e.Branch + ":" + e.Op
			require.False(t, seen[k], "saga %s: event %s recorded twice: %v", gid, k, evs)
			seen[k] = true
		}
	}
}

// pacedStore is the real PostgreSQL store whose group commits each take at least pace, as on a
// slower disk, and which records how many are in flight at once and how large they are.
type pacedStore struct {
	*postgres.Store
	pace     time.Duration
	inflight atomic.Int32

	mu          sync.Mutex
	maxInflight int32
	maxBatch    int
	commits     int
	records     int
}

func (s *pacedStore) Commit(ctx context.Context, cs []store.CreateParams, ps []store.RecordParams) ([]store.CreateResult, []store.RecordResult, error) {
	n := s.inflight.Add(1)
	defer s.inflight.Add(-1)
	s.mu.Lock()
	s.maxInflight = max(s.maxInflight, n)
	s.maxBatch = max(s.maxBatch, len(cs)+len(ps))
	s.commits++
	s.records += len(cs) + len(ps)
	s.mu.Unlock()
	time.Sleep(s.pace)
	return s.Store.Commit(ctx, cs, ps)
}

func (s *pacedStore) stats() (maxInflight int32, maxBatch, commits, records int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxInflight, s.maxBatch, s.commits, s.records
}

// runPaced runs 64 three-step sagas at once against a coordinator whose group commits take
// 20 ms each, with the given batch bound and four commit workers.
func runPaced(t *testing.T, commitBatch int) *pacedStore {
	t.Helper()
	ctx := context.Background()
	st, _, client, b := wrappedCoordinator(t, func(pg *postgres.Store) *pacedStore { return &pacedStore{Store: pg, pace: 20 * time.Millisecond} },
		engine.Config{CommitWorkers: 4, CommitBatch: commitBatch, LazyProgress: -1})
	var wg sync.WaitGroup
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: fmt.Sprintf("paced-%d", i),
				Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a"), b.step("b", "a"), b.step("c", "b")}},
				Wait: durationpb.New(60 * time.Second)})
			if !(err == nil && res.Transaction.Status == treatyv1.Status_STATUS_SUCCEEDED) {
				t.Errorf("saga %d: %v %v", i, err, res)
			}
		}()
	}
	wg.Wait()
	return st
}

// While one group commit is in flight, the writes queued meanwhile wait for it and go in the
// next one, however many commit workers there are: one commit at a time, in fuller batches
// (issue 13: four commits in flight from the start cost the database twice the CPU per saga).
func TestGroupCommitOneAtATimeWhileItKeepsUp(t *testing.T) {
	t.Parallel()
	st := runPaced(t, 256)
	maxInflight, maxBatch, commits, records := st.stats()
	t.Logf("%d records in %d commits, largest %d, at most %d in flight", records, commits, maxBatch, maxInflight)
	require.EqualValues(t, 1, maxInflight, "commits in flight at once although no batch was full")
	require.Greater(t, maxBatch, 8, "writes queued during a commit did not go in one batch")
}

// When the next batch is full while a commit is in flight, it goes to a further worker at once:
// up to CommitWorkers in flight, none larger than CommitBatch.
func TestGroupCommitFullBatchesGoInParallel(t *testing.T) {
	t.Parallel()
	st := runPaced(t, 4)
	maxInflight, maxBatch, commits, records := st.stats()
	t.Logf("%d records in %d commits, largest %d, at most %d in flight", records, commits, maxBatch, maxInflight)
	require.Greater(t, maxInflight, int32(1), "full batches waited for the commit in flight")
	require.LessOrEqual(t, maxInflight, int32(4), "more commits in flight than workers")
	require.LessOrEqual(t, maxBatch, 4, "a batch larger than CommitBatch")
}

// Stopping while writes wait for the next group commit answers them (the coordinator is
// stopping) instead of leaving their callers waiting for a commit that never comes: Stop
// returns without needing its deadline, and every submission has its answer.
func TestGroupCommitStopAnswersQueuedWrites(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	st, a, client, b := wrappedCoordinator(t, func(pg *postgres.Store) *pacedStore { return &pacedStore{Store: pg, pace: time.Second} },
		engine.Config{})

	answered := make(chan error, 8)
	for i := range 8 {
		go func() {
			_, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: fmt.Sprintf("stop-%d", i),
				Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("a")}}})
			answered <- err
		}()
	}
	// One creation is in the commit in flight (a second long), the rest wait for the next.
	require.Eventually(t, func() bool { _, _, commits, _ := st.stats(); return commits >= 1 }, 20*time.Second, 5*time.Millisecond)
	time.Sleep(100 * time.Millisecond)

	sctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	stopped := make(chan error, 1)
	go func() { stopped <- a.Stop(sctx) }()
	select {
	case err := <-stopped:
		require.NoError(t, err)
	case <-sctx.Done():
		t.Fatal("Stop waited for its deadline: queued writes were never answered")
	}
	for range 8 {
		<-answered // each submission has its answer (created, or refused while stopping)
	}
}
