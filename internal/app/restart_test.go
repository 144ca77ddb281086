package app_test

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// A participant that can be stopped and started again on the same address, as a service is
// during a restart or a rolling deploy.
type restartable struct {
	t      *testing.T
	addr   string
	script testparticipant.Script

	mu  sync.Mutex
	cur *testparticipant.Participant
	all []*testparticipant.Participant
}

// newRestartable reserves a loopback address; the participant is down until start.
func newRestartable(t *testing.T, script testparticipant.Script) *restartable {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := lis.Addr().String()
	require.NoError(t, lis.Close())
	r := &restartable{t: t, addr: addr, script: script}
	t.Cleanup(r.stop)
	return r
}

func (r *restartable) start() time.Time {
	r.t.Helper()
	var p *testparticipant.Participant
	var err error
	// The port was free a moment ago; a listener in TIME_WAIT or a late close may delay it.
	require.Eventually(r.t, func() bool {
		p, err = testparticipant.Start(testparticipant.Options{Listen: r.addr, Script: r.script})
		return err == nil
	}, 30*time.Second, 50*time.Millisecond, "listen on %s: %v", r.addr, err)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cur = p
	r.all = append(r.all, p)
	return time.Now()
}

func (r *restartable) stop() {
	r.mu.Lock()
	p := r.cur
	r.cur = nil
	r.mu.Unlock()
	if p != nil {
		p.Stop()
	}
}

func (r *restartable) target(method string) string { return "grpc://" + r.addr + "/" + method }

// callsFor is every call that any incarnation of the participant received for gid.
func (r *restartable) callsFor(gid string) []testparticipant.Call {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []testparticipant.Call
	for _, p := range r.all {
		out = append(out, p.CallsFor(gid)...)
	}
	return out
}

// defaultStep is a step with no retry policy and no call timeout: the coordinator's defaults.
func defaultStep(name string, r *restartable) *treatyv1.SagaStep {
	return &treatyv1.SagaStep{
		Name:       name,
		Action:     &treatyv1.Call{Target: r.target("test.Svc/Do"), Payload: []byte("do-" + name)},
		Compensate: &treatyv1.Call{Target: r.target("test.Svc/Undo"), Payload: []byte("undo-" + name)},
	}
}

func submitSaga(t *testing.T, b *bundle, gid string, steps ...*treatyv1.SagaStep) {
	t.Helper()
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Gid: gid, Saga: &treatyv1.SagaSpec{Steps: steps}})
	require.NoError(t, err)
}

// waitTerminal polls the durable record until the transaction has finished.
func waitTerminal(t *testing.T, b *bundle, gid string, ceiling time.Duration) *treatyv1.Transaction {
	t.Helper()
	var tx *treatyv1.Transaction
	require.Eventually(t, func() bool {
		got, err := b.client.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: gid})
		if err != nil {
			return false
		}
		tx = got.Transaction
		return isTerminal(tx.Status)
	}, ceiling, 100*time.Millisecond, "transaction %s did not finish", gid)
	return tx
}

func history(tx *treatyv1.Transaction) string {
	var sb strings.Builder
	for _, e := range tx.Events {
		sb.WriteString(e.Kind + " " + e.Branch + " " + e.Op + ": " + e.Detail + "\n")
	}
	return sb.String()
}

// A participant that is down when the saga is submitted and comes up 30 s later is reached soon
// after it is back, with the default policy: the saga succeeds and nothing is compensated.
func TestSagaRidesOutParticipantDownAtSubmit(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	p := newRestartable(t, nil)
	gid := "down-at-submit"
	submitSaga(t, b, gid, b.step("first"), defaultStep("pay", p))

	// Down for 30 s from the submit; the saga must still be trying by then.
	time.Sleep(30 * time.Second) // the outage itself, not a wait for a condition
	got, err := b.client.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: gid})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_RUNNING, got.Transaction.Status, "still trying after 30 s down:\n%s", history(got.Transaction))
	back := p.start()

	tx := waitTerminal(t, b, gid, 60*time.Second)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status, "history:\n%s", history(tx))
	calls := p.callsFor(gid)
	require.NotEmpty(t, calls)
	for _, c := range calls {
		require.Equal(t, "action", c.Op, "nothing is compensated")
	}
	reached := calls[0].At.Sub(back)
	t.Logf("participant back at %s, first call reached it %s later; history:\n%s", back.Format("15:04:05.000"), reached, history(tx))
	// About a second by design (reconnect backoff and retry backoff are both capped at 1 s);
	// the ceiling leaves room for a loaded machine.
	require.Less(t, reached, 8*time.Second, "a participant that is back is reached soon")
	require.Contains(t, history(tx), "retrying until", "the history says how long the step is retried")
}

// A participant restarted while a saga is calling it: the saga succeeds, nothing compensated.
func TestSagaRidesOutParticipantRestartMidSaga(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	arrived := make(chan struct{}, 1)
	first := true
	var mu sync.Mutex
	p := newRestartable(t, func(ctx context.Context, c testparticipant.Call) error {
		mu.Lock()
		hang := first && c.Branch == "two"
		if hang {
			first = false
		}
		mu.Unlock()
		if hang {
			arrived <- struct{}{}
			<-ctx.Done() // in flight when the server goes away
			return status.Error(codes.Unavailable, "shutting down")
		}
		return nil
	})
	p.start()
	gid := "restart-mid-saga"
	submitSaga(t, b, gid, defaultStep("one", p), defaultStep("two", p), defaultStep("three", p))
	select {
	case <-arrived:
	case <-time.After(60 * time.Second):
		t.Fatal("step two was never called")
	}
	p.stop()
	time.Sleep(5 * time.Second) // the restart takes a while
	p.start()

	tx := waitTerminal(t, b, gid, 60*time.Second)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status, "history:\n%s", history(tx))
	for _, c := range p.callsFor(gid) {
		require.Equal(t, "action", c.Op, "nothing is compensated")
	}
}

// A participant that stays down past the retry window: the step gives up, the saga compensates
// once the participant is back, and the history says why.
func TestSagaCompensatesWhenDownPastRetryWindow(t *testing.T) {
	t.Parallel()
	// Compensations to the participant fail until it is back: a threshold that leaves room for that.
	b := setup(t, setupOpts{engine: engine.Config{Retry: engine.RetryDefaults{Window: 3 * time.Second}, OperatorThreshold: 20}})
	p := newRestartable(t, nil)
	gid := "down-past-window"
	submitSaga(t, b, gid, b.step("first"), defaultStep("pay", p))
	var tx *treatyv1.Transaction
	require.Eventually(t, func() bool {
		got, err := b.client.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: gid})
		if err != nil {
			return false
		}
		tx = got.Transaction
		return tx.Status == treatyv1.Status_STATUS_COMPENSATING
	}, 60*time.Second, 100*time.Millisecond, "the step gives up after its window")
	h := history(tx)
	require.Contains(t, h, "branch_exhausted pay action")
	require.Contains(t, h, "retry window 3s")
	require.Contains(t, tx.Reason, `step "pay"`)
	require.Contains(t, tx.Reason, "retry window 3s")

	p.start() // its compensation is retried until it is back
	tx = waitTerminal(t, b, gid, 60*time.Second)
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status, "history:\n%s", history(tx))
	require.Contains(t, tx.Reason, "retry window 3s", "the outcome says why")
	require.Contains(t, ops(b.part, gid), "compensate:first")
}

// ABORTED is the participant's "no": compensated at once, not retried, with the default policy.
func TestSagaAbortedCompensatesAtOnce(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	p := newRestartable(t, func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "action" {
			return status.Error(codes.Aborted, "card declined")
		}
		return nil
	})
	p.start()
	gid := "aborted-at-once"
	submitSaga(t, b, gid, b.step("first"), defaultStep("pay", p))
	tx := waitTerminal(t, b, gid, 60*time.Second)
	require.Equal(t, treatyv1.Status_STATUS_COMPENSATED, tx.Status)
	require.Equal(t, int32(1), branch(tx, "pay", "action").Attempts, "a refusal is not retried")
	require.NotContains(t, history(tx), "branch_retry")
	require.Contains(t, tx.Reason, "card declined")
	require.Equal(t, []string{"action:first", "compensate:first"}, ops(b.part, gid))
}

// A request's own max_attempts wins over the default window: the step gives up after that many
// attempts, and the history says which limit ended it.
func TestSagaExplicitMaxAttemptsWins(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	p := newRestartable(t, nil)
	s := defaultStep("pay", p)
	s.Retry = &treatyv1.RetryPolicy{MaxAttempts: 2}
	gid := "explicit-attempts"
	submitSaga(t, b, gid, b.step("first"), s)
	var tx *treatyv1.Transaction
	require.Eventually(t, func() bool {
		got, err := b.client.GetTransaction(context.Background(), &treatyv1.GetTransactionRequest{Gid: gid})
		if err != nil {
			return false
		}
		tx = got.Transaction
		return tx.Status != treatyv1.Status_STATUS_RUNNING
	}, 60*time.Second, 100*time.Millisecond)
	require.Equal(t, int32(2), branch(tx, "pay", "action").Attempts)
	require.Contains(t, tx.Reason, `step "pay" failed 2 times (max_attempts 2)`)
	require.Contains(t, history(tx), "retrying up to attempt 2")
}

// A retry window out of range is refused, naming the field and the limit, and nothing is written.
func TestSagaRetryWindowValidated(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	for _, tc := range []struct {
		window time.Duration
		msg    string
	}{
		{-time.Second, "must not be negative"},
		{8 * 24 * time.Hour, "limit 168h0m0s"},
	} {
		s := b.step("s")
		s.Retry.RetryWindow = durationpb.New(tc.window)
		_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{s}}})
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
		require.Contains(t, status.Convert(err).Message(), "saga.steps[0].retry.retry_window: ")
		require.Contains(t, status.Convert(err).Message(), tc.msg)
	}
	var n int
	require.NoError(t, b.pool.QueryRow(context.Background(), "SELECT count(*) FROM treaty_transactions").Scan(&n))
	require.Zero(t, n, "a rejected request writes nothing")
}
