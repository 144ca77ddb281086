package sdk_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/testparticipant"
	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/treatytest"
)

func TestMain(m *testing.M) {
	code := treatytest.WrapTestMain(m)
	if code == 0 {
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/jackc/pgx/v5/pgxpool.(*Pool).backgroundHealthCheck")); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

type env struct {
	client *sdk.Client
	part   *testparticipant.Participant
}

func setup(t *testing.T, script testparticipant.Script) *env {
	t.Helper()
	coord := treatytest.Start(t, treatytest.Options{})
	p, err := testparticipant.Start(testparticipant.Options{Script: script})
	require.NoError(t, err)
	t.Cleanup(p.Stop)
	return &env{client: coord.Client(t), part: p}
}

// A request message of some generated type: any proto message works as a payload.
func payload(s string) proto.Message { return &treatyv1.GetTransactionRequest{Gid: s} }

func (e *env) call(method, s string) sdk.Call {
	return sdk.MustCall(e.part.Addr, "/test.Svc/"+method, payload(s))
}

func (e *env) calls(gid string) []string {
	var out []string
	for _, c := range e.part.CallsFor(gid) {
		out = append(out, c.Op+":"+c.Branch)
	}
	return out
}

func TestSagaThroughSDK(t *testing.T) {
	t.Parallel()
	e := setup(t, nil)
	tx, err := e.client.Saga(context.Background(), sdk.Saga{GID: "sdk-saga", Steps: []sdk.Step{
		{Name: "car", Action: e.call("Reserve", "car"), Compensate: e.call("Cancel", "car")},
		{Name: "hotel", Action: e.call("Reserve", "hotel"), Compensate: e.call("Cancel", "hotel")},
	}})
	require.NoError(t, err)
	require.Equal(t, sdk.StatusSucceeded, tx.Status)
	require.Equal(t, []string{"action:car", "action:hotel"}, e.calls("sdk-saga"))
	// The payload arrives as the marshalled request message.
	var got treatyv1.GetTransactionRequest
	require.NoError(t, proto.Unmarshal(e.part.CallsFor("sdk-saga")[0].Payload, &got))
	require.Equal(t, "car", got.Gid)
	require.Equal(t, "/test.Svc/Reserve", e.part.CallsFor("sdk-saga")[0].Method)
}

func TestSagaAbortedIsErrAborted(t *testing.T) {
	t.Parallel()
	e := setup(t, func(_ context.Context, c testparticipant.Call) error {
		if c.Branch == "flight" && c.Op == "action" {
			return status.Error(codes.Aborted, "sold out")
		}
		return nil
	})
	tx, err := e.client.Saga(context.Background(), sdk.Saga{GID: "sdk-abort", Steps: []sdk.Step{
		{Name: "hotel", Action: e.call("Reserve", "hotel"), Compensate: e.call("Cancel", "hotel")},
		{Name: "flight", Action: e.call("Reserve", "flight"), Compensate: e.call("Cancel", "flight")},
	}})
	require.ErrorIs(t, err, sdk.ErrAborted)
	require.Contains(t, err.Error(), "sold out")
	require.Equal(t, sdk.StatusCompensated, tx.Status)
	require.Equal(t, []string{"action:hotel", "action:flight", "compensate:hotel"}, e.calls("sdk-abort"))
}

func TestInvalidArgumentNamesTheField(t *testing.T) {
	t.Parallel()
	e := setup(t, nil)
	_, err := e.client.Saga(context.Background(), sdk.Saga{Steps: []sdk.Step{{Name: "x", Action: e.call("A", "x")}}})
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	var se *sdk.Error
	require.True(t, errors.As(err, &se))
	require.Equal(t, "saga.steps[0].compensate", se.Field)
	require.Equal(t, codes.InvalidArgument, se.Code)

	_, err = sdk.NewCall(e.part.Addr, "NoSlash", payload("x"))
	require.ErrorIs(t, err, sdk.ErrInvalidArgument)
	_, err = e.client.Get(context.Background(), "missing")
	require.ErrorIs(t, err, sdk.ErrNotFound)
}

func (e *env) tccBranch(name string) sdk.TCCBranch {
	return sdk.TCCBranch{Name: name, Try: e.call("Try", name), Confirm: e.call("Confirm", name), Cancel: e.call("Cancel", name)}
}

func TestTCCCommit(t *testing.T) {
	t.Parallel()
	e := setup(t, nil)
	var seenGID string
	tx, err := e.client.TCC(context.Background(), sdk.TCCOptions{GID: "sdk-tcc"}, func(ctx context.Context, s *sdk.TCCScope) error {
		seenGID, _ = sdk.GIDFromContext(ctx)
		for _, n := range []string{"flight", "hotel"} {
			if _, err := s.Try(ctx, e.tccBranch(n)); err != nil {
				return err
			}
		}
		return nil
	})
	require.NoError(t, err)
	require.Equal(t, "sdk-tcc", seenGID)
	require.Equal(t, "confirmed", tx.Phase)
	got := e.calls("sdk-tcc")
	require.Equal(t, []string{"try:flight", "try:hotel"}, got[:2])
	require.ElementsMatch(t, []string{"confirm:flight", "confirm:hotel"}, got[2:])
	for _, c := range e.part.CallsFor("sdk-tcc") {
		require.Equal(t, "tcc", c.Mode)
	}
}

func TestTCCRefusedTryCancelsEverything(t *testing.T) {
	t.Parallel()
	e := setup(t, func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "try" && c.Branch == "hotel" {
			return status.Error(codes.Aborted, "no rooms")
		}
		return nil
	})
	tx, err := e.client.TCC(context.Background(), sdk.TCCOptions{GID: "sdk-tcc-no"}, func(ctx context.Context, s *sdk.TCCScope) error {
		for _, n := range []string{"flight", "hotel", "car"} {
			if _, err := s.Try(ctx, e.tccBranch(n)); err != nil {
				return err
			}
		}
		return nil
	})
	require.ErrorIs(t, err, sdk.ErrAborted)
	require.Contains(t, err.Error(), "no rooms")
	require.Equal(t, "cancelled", tx.Phase)
	// flight and hotel registered (hotel's try may have reserved before refusing): both
	// cancelled; car never registered, never called.
	got := e.calls("sdk-tcc-no")
	require.ElementsMatch(t, []string{"try:flight", "try:hotel", "cancel:flight", "cancel:hotel"}, got)
}

func TestTCCPanicRollsBackAndRepanics(t *testing.T) {
	t.Parallel()
	e := setup(t, nil)
	require.PanicsWithValue(t, "boom", func() {
		_, _ = e.client.TCC(context.Background(), sdk.TCCOptions{GID: "sdk-tcc-panic"}, func(ctx context.Context, s *sdk.TCCScope) error {
			_, err := s.Try(ctx, e.tccBranch("flight"))
			require.NoError(t, err)
			panic("boom")
		})
	})
	tx, err := e.client.Wait(context.Background(), "sdk-tcc-panic", 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, "cancelled", tx.Phase)
	require.Contains(t, tx.Reason, "panicked: boom")
}

func TestTwoPhaseThroughSDK(t *testing.T) {
	t.Parallel()
	e := setup(t, nil)
	tx, err := e.client.TwoPhase(context.Background(), sdk.TwoPhase{GID: "sdk-2pc", Branches: []sdk.TwoPhaseBranch{
		{Name: "a", Prepare: e.call("Prepare", "a"), Commit: e.call("Commit", "a"), Rollback: e.call("Rollback", "a")},
		{Name: "b", Prepare: e.call("Prepare", "b"), Commit: e.call("Commit", "b"), Rollback: e.call("Rollback", "b")},
	}})
	require.NoError(t, err)
	require.Equal(t, "committed", tx.Phase)
}

func TestMessageDeliveredOnlyWhenLocalCommits(t *testing.T) {
	t.Parallel()
	e := setup(t, func(_ context.Context, c testparticipant.Call) error {
		if c.Op == "query_prepared" {
			return status.Error(codes.Aborted, "no barrier row: rolled back")
		}
		return nil
	})
	// The message that commits gets a timeout it cannot miss, however slow the machine: past it
	// the coordinator would ask QueryPrepared, which says "rolled back". The one that fails is
	// never submitted, so its short timeout is what makes the coordinator look.
	m := func(gid string, timeout time.Duration) sdk.Message {
		return sdk.Message{GID: gid, Timeout: timeout, QueryPrepared: e.call("QueryPrepared", ""),
			Deliveries: []sdk.Delivery{{Name: "points", Call: e.call("AddPoints", "points")}}, Wait: 10 * time.Second}
	}
	tx, err := e.client.Message(context.Background(), m("sdk-msg-ok", time.Minute), func(ctx context.Context, gid string) error { return nil })
	require.NoError(t, err)
	require.Equal(t, "succeeded", tx.Phase)
	require.Equal(t, []string{"deliver:points"}, e.calls("sdk-msg-ok"))

	_, err = e.client.Message(context.Background(), m("sdk-msg-fail", 200*time.Millisecond), func(ctx context.Context, gid string) error { return errors.New("insufficient stock") })
	require.ErrorContains(t, err, "insufficient stock")
	tx, err = e.client.Wait(context.Background(), "sdk-msg-fail", 10*time.Second)
	require.NoError(t, err)
	require.Equal(t, "aborted", tx.Phase)
	require.NotContains(t, e.calls("sdk-msg-fail"), "deliver:points")
}

func TestUnavailableAfterRetries(t *testing.T) {
	t.Parallel()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := l.Addr().String()
	require.NoError(t, l.Close()) // nothing listens there now
	c, err := sdk.Dial(context.Background(), sdk.Options{Address: addr, Retries: 2, CallTimeout: time.Second})
	require.NoError(t, err)
	defer c.Close()
	start := time.Now()
	_, err = c.Get(context.Background(), "x")
	require.ErrorIs(t, err, sdk.ErrUnavailable)
	require.True(t, strings.Contains(err.Error(), "GetTransaction"), err.Error())
	require.Less(t, time.Since(start), 10*time.Second)
}
