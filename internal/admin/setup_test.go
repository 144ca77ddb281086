package admin_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// The secrets of the tests' tokens. The log test greps for each.
const (
	viewerSecret   = "viewer-secret-0123456789abcdef"
	operatorSecret = "operator-secret-fedcba9876543210"
)

// syncBuffer collects the coordinator's log lines from many goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type bundle struct {
	db     string
	app    *app.App
	base   string // http://host:port
	client treatyv1.CoordinatorClient
	part   *testparticipant.Participant
	logs   *syncBuffer
}

type setupOpts struct {
	open   bool
	script testparticipant.Script
	// allowFaults starts the coordinator with --allow-fault-injection.
	allowFaults bool
	// db, when set, is the database to use (a second replica of another bundle).
	db string
}

// setup starts a real coordinator on a fresh PostgreSQL database with the admin API on its HTTP
// port, a participant, and a gRPC client. Its log goes to a buffer at debug level (and to stderr
// as well when TREATY_TEST_LOG is set).
func setup(t *testing.T, o setupOpts) *bundle {
	t.Helper()
	db := o.db
	if db == "" {
		db = pgtest.NewDatabase(t)
	}
	logs := &syncBuffer{}
	var w io.Writer = logs
	if os.Getenv("TREATY_TEST_LOG") != "" {
		w = io.MultiWriter(logs, os.Stderr)
	}
	log := slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
	viewer, err := admin.NewToken(admin.RoleViewer, viewerSecret, "")
	require.NoError(t, err)
	operator, err := admin.NewToken(admin.RoleOperator, operatorSecret, "alice")
	require.NoError(t, err)
	a, err := app.Start(context.Background(), app.Config{
		DB: db, Listen: "127.0.0.1:0", HTTPListen: "127.0.0.1:0", Migrate: true, Logger: log,
		AdminTokens: []admin.Token{viewer, operator}, AdminOpen: o.open, AllowFaultInjection: o.allowFaults,
		Engine: engine.Config{Lease: 3 * time.Second, RecoveryInterval: 100 * time.Millisecond, OperatorThreshold: 3},
	})
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, a.Stop(ctx))
	})
	part, err := testparticipant.Start(testparticipant.Options{Script: o.script})
	require.NoError(t, err)
	t.Cleanup(part.Stop)
	conn, err := grpc.NewClient(a.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return &bundle{db: db, app: a, base: "http://" + a.HTTPAddr, client: treatyv1.NewCoordinatorClient(conn), part: part, logs: logs}
}

// step is a saga step whose action and compensation are the test participant's.
func (b *bundle) step(name string) *treatyv1.SagaStep {
	return &treatyv1.SagaStep{
		Name:       name,
		Action:     &treatyv1.Call{Target: b.part.Target("test.Svc/Do"), Payload: []byte("do-" + name)},
		Compensate: &treatyv1.Call{Target: b.part.Target("test.Svc/Undo"), Payload: []byte("undo-" + name)},
		Retry: &treatyv1.RetryPolicy{
			MaxAttempts: 4, InitialBackoff: durationpb.New(10 * time.Millisecond), MaxBackoff: durationpb.New(50 * time.Millisecond),
		},
		CallTimeout: durationpb.New(2 * time.Second),
	}
}

// saga submits a saga and waits until it is finished or waits for an operator.
func (b *bundle) saga(t *testing.T, gid string, steps ...*treatyv1.SagaStep) *treatyv1.Transaction {
	t.Helper()
	res, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
		Gid: gid, Saga: &treatyv1.SagaSpec{Steps: steps}, Wait: durationpb.New(20 * time.Second),
	})
	require.NoError(t, err)
	return res.Transaction
}

type response struct {
	status int
	header http.Header
	body   []byte
}

func (r response) apiError(t *testing.T) map[string]string {
	t.Helper()
	var e map[string]string
	require.NoError(t, json.Unmarshal(r.body, &e), "error body: %s", r.body)
	require.NotEmpty(t, e["code"])
	require.NotEmpty(t, e["message"])
	return e
}

// call makes one request; token "" sends none.
func (b *bundle) call(t *testing.T, method, path, token string, body any) response {
	t.Helper()
	var rd io.Reader
	if body != nil {
		raw, err := json.Marshal(body)
		require.NoError(t, err)
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, b.base+path, rd)
	require.NoError(t, err)
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer res.Body.Close()
	raw, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	return response{status: res.StatusCode, header: res.Header, body: raw}
}

// get decodes a 200 answer of a GET into v.
func (b *bundle) get(t *testing.T, path string, v any) {
	t.Helper()
	r := b.call(t, "GET", path, viewerSecret, nil)
	require.Equal(t, http.StatusOK, r.status, "GET %s: %s", path, r.body)
	require.True(t, strings.HasPrefix(r.header.Get("Content-Type"), "application/json"))
	require.NoError(t, json.Unmarshal(r.body, v))
}

// waitFor polls the admin API until the transaction satisfies ok, or fails after a deadline.
func (b *bundle) waitFor(t *testing.T, gid string, ok func(admin.Transaction) bool) admin.Transaction {
	t.Helper()
	deadline := time.After(20 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		var tx admin.Transaction
		b.get(t, "/admin/v1/transactions/"+gid, &tx)
		if ok(tx) {
			return tx
		}
		select {
		case <-tick.C:
		case <-deadline:
			require.FailNow(t, "transaction never got there", "%s; last: %+v", gid, tx)
		}
	}
}

func eventKinds(tx admin.Transaction) []string {
	var out []string
	for _, e := range tx.Events {
		out = append(out, e.Kind)
	}
	return out
}
