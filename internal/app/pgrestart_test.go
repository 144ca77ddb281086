package app_test

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
	"github.com/treatyhq/treaty/pkg/outbox"
)

// TestPostgresRestartMidRun: PostgreSQL goes down while two replicas drive sagas and a relay
// publishes outbox messages, then comes back. Nothing is restarted by hand: both replicas'
// readiness goes false and then true again, every saga they accepted finishes, new ones run,
// and every message written before, during (once writes work again) and after reaches Kafka.
func TestPostgresRestartMidRun(t *testing.T) {
	t.Parallel()
	cluster := pgtest.NewCluster(t)
	db := cluster.URL
	part, err := testparticipant.Start(testparticipant.Options{})
	require.NoError(t, err)
	t.Cleanup(part.Stop)

	var replicas []*app.App
	var clients []treatyv1.CoordinatorClient
	for i := range 2 {
		a, err := app.Start(context.Background(), app.Config{DB: db, Listen: "127.0.0.1:0", HTTPListen: "127.0.0.1:0", Migrate: i == 0,
			Logger: testLogger(t), Engine: engine.Config{Owner: fmt.Sprintf("r%d", i), Lease: 2 * time.Second, RecoveryInterval: 100 * time.Millisecond}})
		require.NoError(t, err)
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_ = a.Stop(ctx)
		})
		conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		require.NoError(t, err)
		t.Cleanup(func() { _ = conn.Close() })
		replicas, clients = append(replicas, a), append(clients, treatyv1.NewCoordinatorClient(conn))
	}

	kafka, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(1, "events"))
	require.NoError(t, err)
	t.Cleanup(kafka.Close)
	pool, err := pgxpool.New(context.Background(), db)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	require.NoError(t, outbox.Migrate(t.Context(), pool, outbox.MigrateOptions{}))
	relay, err := outbox.NewRelay(outbox.RelayConfig{Pool: pool, Brokers: kafka.ListenAddrs(), PollInterval: 200 * time.Millisecond,
		LeaseTTL: 2 * time.Second, BrokerBackoff: 20 * time.Millisecond, MaxBrokerBackoff: 200 * time.Millisecond, WriteTimeout: 3 * time.Second,
		Logger: testLogger(t)})
	require.NoError(t, err)
	require.NoError(t, relay.Start(context.Background()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		_ = relay.Stop(ctx)
	})

	step := func(name string) *treatyv1.SagaStep {
		return &treatyv1.SagaStep{Name: name,
			Action:      &treatyv1.Call{Target: part.Target("test.Svc/Do"), Payload: []byte("do")},
			Compensate:  &treatyv1.Call{Target: part.Target("test.Svc/Undo"), Payload: []byte("undo")},
			CallTimeout: durationpb.New(2 * time.Second),
			Retry:       &treatyv1.RetryPolicy{MaxAttempts: 50, InitialBackoff: durationpb.New(50 * time.Millisecond), MaxBackoff: durationpb.New(500 * time.Millisecond)},
		}
	}
	var mu sync.Mutex
	var accepted []string
	var seq atomic.Int64
	submit := func(c treatyv1.CoordinatorClient, wait time.Duration) error {
		gid := fmt.Sprintf("rs-%04d", seq.Add(1))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, err := c.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: gid, Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{step("a"), step("b"), step("c")}},
			Wait: durationpb.New(wait)})
		if err == nil {
			mu.Lock()
			accepted = append(accepted, gid)
			mu.Unlock()
		}
		return err
	}
	var msgs atomic.Int64
	enqueue := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		n := msgs.Load() + 1
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			return outbox.Enqueue(ctx, tx, outbox.Message{Topic: "events", Key: []byte("k"), Value: []byte(fmt.Sprintf("m-%d", n))})
		})
		if err == nil {
			msgs.Store(n)
		}
		return err
	}
	for i := range 6 {
		require.NoError(t, submit(clients[i%2], 0))
		require.NoError(t, enqueue())
	}

	// Load runs through the restart: submissions and enqueues fail while the database is away.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Millisecond):
			}
			_ = submit(clients[i%2], 0)
			_ = enqueue()
		}
	}()

	ready := func(a *app.App) int {
		res, err := http.Get("http://" + a.HTTPAddr + "/readyz")
		if err != nil {
			return 0
		}
		_ = res.Body.Close()
		return res.StatusCode
	}
	cluster.Stop(t)
	for _, a := range replicas {
		require.Eventually(t, func() bool { return ready(a) == http.StatusServiceUnavailable }, 30*time.Second, 50*time.Millisecond, "readiness false while PostgreSQL is down")
	}
	cluster.Start(t)
	for _, a := range replicas {
		require.Eventually(t, func() bool { return ready(a) == http.StatusOK }, 60*time.Second, 50*time.Millisecond, "readiness true again, without a restart")
	}
	// The replicas serve new work by themselves.
	for i := range 4 {
		require.Eventually(t, func() bool { return submit(clients[i%2], 20*time.Second) == nil }, 60*time.Second, 100*time.Millisecond)
	}
	close(stop)
	wg.Wait()
	require.Eventually(t, func() bool { return enqueue() == nil }, 60*time.Second, 100*time.Millisecond)

	mu.Lock()
	gids := append([]string(nil), accepted...)
	mu.Unlock()
	t.Logf("%d sagas accepted around the restart, %d messages written", len(gids), msgs.Load())
	for _, gid := range gids {
		require.Eventually(t, func() bool {
			res, err := clients[0].GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: gid})
			return err == nil && res.Transaction.Status == treatyv1.Status_STATUS_SUCCEEDED
		}, 90*time.Second, 100*time.Millisecond, "saga %s finishes", gid)
	}

	// Every committed message reaches Kafka (at least once).
	cl, err := kgo.NewClient(kgo.SeedBrokers(kafka.ListenAddrs()...), kgo.ConsumeTopics("events"),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(100*time.Millisecond))
	require.NoError(t, err)
	defer cl.Close()
	seen := map[string]bool{}
	require.Eventually(t, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) { seen[string(r.Value)] = true })
		return len(seen) >= int(msgs.Load())
	}, 90*time.Second, 10*time.Millisecond)
	for i := int64(1); i <= msgs.Load(); i++ {
		require.True(t, seen[fmt.Sprintf("m-%d", i)], "message m-%d", i)
	}
}
