package app_test

import (
	"context"
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

type bundle struct {
	app    *app.App
	client treatyv1.CoordinatorClient
	part   *testparticipant.Participant
	pool   *pgxpool.Pool
	db     string
}

type setupOpts struct {
	http   bool // serve /metrics, /healthz, /readyz
	engine engine.Config
	script testparticipant.Script
}

func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("TREATY_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

// setup starts a coordinator on a fresh database, a participant, and a client.
func setup(t *testing.T, o setupOpts) *bundle {
	t.Helper()
	ctx := context.Background()
	db := pgtest.NewDatabase(t)
	ec := o.engine
	if ec.Lease == 0 {
		ec.Lease = 3 * time.Second
	}
	if ec.RecoveryInterval == 0 {
		ec.RecoveryInterval = 100 * time.Millisecond
	}
	if ec.OperatorThreshold == 0 {
		ec.OperatorThreshold = 3
	}
	httpListen := ""
	if o.http {
		httpListen = "127.0.0.1:0"
	}
	a, err := app.Start(ctx, app.Config{DB: db, Listen: "127.0.0.1:0", HTTPListen: httpListen, Migrate: true, Engine: ec, Logger: testLogger(t)})
	require.NoError(t, err)
	t.Cleanup(func() {
		sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, a.Stop(sctx))
	})
	part, err := testparticipant.Start(testparticipant.Options{Script: o.script})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	pool, err := pgxpool.New(ctx, db)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return &bundle{app: a, client: treatyv1.NewCoordinatorClient(conn), part: part, pool: pool, db: db}
}

// step builds a saga step whose action and compensation are methods of the test participant.
func (b *bundle) step(name string, deps ...string) *treatyv1.SagaStep {
	return &treatyv1.SagaStep{
		Name:       name,
		Action:     &treatyv1.Call{Target: b.part.Target("test.Svc/Do"), Payload: []byte("do-" + name)},
		Compensate: &treatyv1.Call{Target: b.part.Target("test.Svc/Undo"), Payload: []byte("undo-" + name)},
		DependsOn:  deps,
		Retry: &treatyv1.RetryPolicy{
			MaxAttempts: 4, InitialBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(50 * time.Millisecond),
		},
		CallTimeout: durationpb.New(2 * time.Second),
	}
}

func (b *bundle) submitWait(t *testing.T, gid string, steps ...*treatyv1.SagaStep) *treatyv1.Transaction {
	t.Helper()
	res, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
		Gid: gid, Saga: &treatyv1.SagaSpec{Steps: steps}, Wait: durationpb.New(20 * time.Second),
	})
	require.NoError(t, err)
	require.True(t, isTerminal(res.Transaction.Status), "saga %s not terminal: %v", gid, res.Transaction.Status)
	// The waited-for answer carries no history; the durable record, read back, does.
	got, err := b.client.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: res.Transaction.Gid})
	require.NoError(t, err)
	require.Equal(t, res.Transaction.Status, got.Transaction.Status, "the answer and the record agree")
	return got.Transaction
}

func isTerminal(s treatyv1.Status) bool {
	return s == treatyv1.Status_STATUS_SUCCEEDED || s == treatyv1.Status_STATUS_COMPENSATED || s == treatyv1.Status_STATUS_NEEDS_OPERATOR
}

// ops renders the calls a participant saw for gid as "op:branch" in arrival order.
func ops(p *testparticipant.Participant, gid string) []string {
	var out []string
	for _, c := range p.CallsFor(gid) {
		out = append(out, c.Op+":"+c.Branch)
	}
	return out
}

func branch(tx *treatyv1.Transaction, name, op string) *treatyv1.Branch {
	for _, b := range tx.Branches {
		if b.Name == name && b.Op == op {
			return b
		}
	}
	return nil
}

func eventKinds(tx *treatyv1.Transaction) []string {
	var out []string
	for _, e := range tx.Events {
		k := e.Kind
		if e.Branch != "" {
			k += ":" + e.Op + ":" + e.Branch
		}
		out = append(out, k)
	}
	return out
}

func isUnavailable(err error) bool { return status.Code(err) == codes.Unavailable }
