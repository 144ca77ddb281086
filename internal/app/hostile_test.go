package app_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// procStatusKiB reads a "Name:   N kB" line of /proc/PID/status.
func procStatusKiB(t *testing.T, pid int, name string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	require.NoError(t, err)
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			require.NoError(t, err)
			return n
		}
	}
	t.Fatalf("no %s in /proc/%d/status", name, pid)
	return 0
}

// The issue: six anonymous SubmitSaga calls of ~120 MiB were read and decoded before the token
// check refused them, taking 16-20 s and the coordinator from 375 MB to 1.78 GB. Against a real
// coordinator process with tokens and a request limit above the calls' size, anonymous calls
// are refused from their headers: the process's peak RSS (VmHWM) grows by a small bounded amount.
func TestAnonymousHugeCallsRefusedBeforeReading(t *testing.T) {
	t.Parallel()
	if _, err := os.Stat("/proc/self/status"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("needs /proc (Linux): %v", err)
		}
		t.Skip("needs /proc (Linux)")
	}
	db := pgtest.NewDatabase(t)
	const secret = "alice-secret-0123456789"
	p := startProc(t, db, "TREATY_MIGRATE=true", "TREATY_GRPC_TOKENS=alice:"+secret,
		"TREATY_RATE_LIMIT=1000", fmt.Sprintf("TREATY_MAX_REQUEST_BYTES=%d", 200<<20))
	pid := p.cmd.Process.Pid
	before := procStatusKiB(t, pid, "VmHWM")

	conn, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(256<<20)))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	client := treatyv1.NewCoordinatorClient(conn)
	// Encoded once and sent as raw bytes: encoding 100 MiB takes the client itself a second or
	// more on a loaded machine, which is not what is measured here.
	req, err := proto.Marshal(&treatyv1.SubmitSagaRequest{Gid: "huge", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{
		Name: "s", Action: &treatyv1.Call{Target: "grpc://127.0.0.1:1/x.Y/Z", Payload: make([]byte, 100<<20)},
	}}}})
	require.NoError(t, err)
	const calls = 6
	var wg sync.WaitGroup
	errs := make([]error, calls)
	took := make([]time.Duration, calls)
	for i := range calls {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
			defer cancel()
			start := time.Now()
			var resp []byte
			errs[i] = conn.Invoke(ctx, treatyv1.Coordinator_SubmitSaga_FullMethodName, req, &resp, grpc.ForceCodecV2(invoke.RawCodec{}))
			took[i] = time.Since(start)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		require.Equal(t, codes.Unauthenticated, status.Code(err), "call %d: %v", i, err)
	}
	after := procStatusKiB(t, pid, "VmHWM")
	t.Logf("%d anonymous 100 MiB calls answered in %v; coordinator VmHWM %d KiB -> %d KiB (+%d KiB)", calls, took, before, after, after-before)
	// Reading one of these calls would have cost 100 MiB; all four were refused for less than 32.
	require.Less(t, after-before, int64(32<<10), "peak RSS grew by %d KiB", after-before)

	// The coordinator serves its clients meanwhile and after.
	ctx, cancel := context.WithTimeout(bearer(t.Context(), secret), 30*time.Second)
	defer cancel()
	_, err = client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "huge"})
	require.Equal(t, codes.NotFound, status.Code(err), "nothing was written: %v", err)
}

// The issue: 100 sagas whose targets differed only in method added ~2,200 lines to /metrics. The
// target label is the endpoint, from a capped set: methods add no series, and endpoints past the
// cap share the value "other".
func TestMetricsTargetLabelsBounded(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{http: true})
	base := "http://" + b.app.HTTPAddr
	submit := func(gid, target string) {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		_, err := b.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: gid, Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{
			Name: "s", Action: &treatyv1.Call{Target: target}, Compensate: &treatyv1.Call{Target: target},
			Retry: &treatyv1.RetryPolicy{MaxAttempts: 1},
		}}}})
		require.NoError(t, err)
	}
	for i := range 100 {
		submit(fmt.Sprintf("method-%d", i), fmt.Sprintf("grpc://%s/test.Svc/Method%d", b.part.Addr, i))
	}
	// Endpoints nobody listens on: each call fails at once (not_sent), and each is a new endpoint.
	const endpoints = metricsMaxTargets + 20
	for i := range endpoints {
		submit(fmt.Sprintf("endpoint-%d", i), fmt.Sprintf("grpc://127.0.0.1:%d/x.Y/Z", 1+i))
	}
	var body string
	require.Eventually(t, func() bool {
		_, body = httpGet(t, base+"/metrics")
		return strings.Contains(body, `target="other"`) && strings.Contains(body, `target="`+b.part.Addr+`"`)
	}, 60*time.Second, 100*time.Millisecond, "no overflow label in /metrics")
	labels := map[string]bool{}
	for _, line := range strings.Split(body, "\n") {
		if !strings.HasPrefix(line, "treaty_branch_call_duration_seconds_count{") {
			continue
		}
		_, rest, _ := strings.Cut(line, `target="`)
		v, _, _ := strings.Cut(rest, `"`)
		labels[v] = true
	}
	require.LessOrEqual(t, len(labels), metricsMaxTargets+1, "target label values: %d", len(labels))
	for l := range labels {
		require.NotContains(t, l, "/", "a method reached the target label: %s", l)
	}
}

// The issue: the cloud metadata address, the admin HTTP port and the coordinator's own gRPC port
// were accepted as targets and called. They are refused on submit, naming the step and the
// rule, and nothing is written.
func TestTargetPolicy(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{http: true})
	_, grpcPort, _ := strings.Cut(b.app.Addr, ":")
	for target, rule := range map[string]string{
		"grpc://169.254.169.254:80/x.Y/Z":                            "rule link-local",
		"grpc://[fe80::1]:80/x.Y/Z":                                  "rule link-local",
		"grpc://" + b.app.Addr + "/treaty.v1.Coordinator/SubmitSaga": "rule own-address",
		"grpc://localhost:" + grpcPort + "/x.Y/Z":                    "rule own-address",
		"grpc://" + b.app.HTTPAddr + "/x.Y/Z":                        "rule own-address",
		"grpc://" + b.part.Addr + ",169.254.169.254:80/x.Y/Z":        "rule link-local",
	} {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		_, err := b.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "bad-target", Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{
			{Name: "ok", Action: &treatyv1.Call{Target: "grpc://" + b.part.Addr + "/test.Svc/Do"}, Compensate: &treatyv1.Call{Target: "grpc://" + b.part.Addr + "/test.Svc/Do"}},
			{Name: "bad", Action: &treatyv1.Call{Target: "grpc://" + b.part.Addr + "/test.Svc/Do"}, Compensate: &treatyv1.Call{Target: target}},
		}}})
		cancel()
		require.Equal(t, codes.InvalidArgument, status.Code(err), "%s: %v", target, err)
		msg := status.Convert(err).Message()
		require.True(t, strings.HasPrefix(msg, "saga.steps[1].compensate.target: "), "names the step: %s", msg)
		require.Contains(t, msg, rule, target)
	}
	_, err := b.client.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: "bad-target"})
	require.Equal(t, codes.NotFound, status.Code(err), "nothing was written")
	require.Empty(t, b.part.Calls())
}

// With --allow-targets, only matching addresses may be named.
func TestAllowTargets(t *testing.T) {
	t.Parallel()
	part := setup(t, setupOpts{}).part
	a, err := app.Start(context.Background(), app.Config{DB: pgtest.NewDatabase(t), Listen: "127.0.0.1:0", Migrate: true,
		Logger: testLogger(t), AllowTargets: []string{part.Addr}})
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, a.Stop(ctx))
	})
	client := treatyv1.NewCoordinatorClient(dialCoordinator(t, a.Addr, nil))
	submit := func(gid, addr string) error {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		c := &treatyv1.Call{Target: "grpc://" + addr + "/test.Svc/Do"}
		_, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: gid, Wait: durationpb.New(30 * time.Second),
			Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{Name: "s", Action: c, Compensate: c}}}})
		return err
	}
	require.NoError(t, submit("allowed", part.Addr))
	err = submit("other", "127.0.0.1:1")
	require.Equal(t, codes.InvalidArgument, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "rule allow-targets")
}

// What an endpoint that is not a gRPC server answers is kept short in last_error.
func TestNonGRPCAnswerCutShort(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	secret := strings.Repeat("metadata-secret ", 500)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; "+secret[:2000])
		w.Header().Set("Grpc-Message", secret)
		_, _ = w.Write([]byte(secret))
	}), Protocols: new(http.Protocols)}
	srv.Protocols.SetUnencryptedHTTP2(true)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(func() { _ = srv.Close() })

	target := "grpc://" + lis.Addr().String() + "/x.Y/Z"
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	res, err := b.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "web", Wait: durationpb.New(50 * time.Second),
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{Name: "s", Action: &treatyv1.Call{Target: target},
			Compensate: &treatyv1.Call{Target: "grpc://" + b.part.Addr + "/test.Svc/Do"}, Retry: &treatyv1.RetryPolicy{MaxAttempts: 1}}}}})
	require.NoError(t, err)
	br := branch(res.Transaction, "s", "action")
	require.NotNil(t, br)
	require.NotEmpty(t, br.LastError)
	require.True(t, strings.HasPrefix(br.LastError, "not a gRPC endpoint: "), br.LastError)
	require.LessOrEqual(t, len(br.LastError), 200, br.LastError)
}

// The memory budget: past --max-active-bytes of payloads held by active transactions, a new one
// is refused RESOURCE_EXHAUSTED with RetryInfo and nothing is written, while a small one still
// fits and succeeds and the held transactions' leases are still renewed.
func TestActiveBytesBudget(t *testing.T) {
	t.Parallel()
	release := make(chan struct{})
	b := setup(t, setupOpts{engine: engine.Config{MaxActiveBytes: 8<<20 + 512<<10}, script: func(ctx context.Context, c testparticipant.Call) error {
		if strings.HasPrefix(c.GID, "big-") && c.Op == "action" {
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil
	}})
	t.Cleanup(func() { close(release) }) // before the coordinator stops
	big := func(gid string) error {
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		_, err := b.client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: gid, Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{
			Name: "s", Action: &treatyv1.Call{Target: b.part.Target("test.Svc/Do"), Payload: make([]byte, 1<<20)},
			Compensate:  &treatyv1.Call{Target: b.part.Target("test.Svc/Undo")},
			CallTimeout: durationpb.New(2 * time.Minute),
		}}}})
		return err
	}
	for i := range 8 {
		require.NoError(t, big(fmt.Sprintf("big-%d", i)))
	}
	require.Equal(t, int64(8<<20), b.app.Engine.ActiveBytes())

	err := big("big-8")
	require.Equal(t, codes.ResourceExhausted, status.Code(err), "%v", err)
	require.Contains(t, status.Convert(err).Message(), "--max-active-bytes")
	require.Positive(t, retryInfo(t, err), "the refusal says when to come back")
	_, err = b.client.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: "big-8"})
	require.Equal(t, codes.NotFound, status.Code(err), "nothing was written: %v", err)

	// A small saga fits within what is left, and completes.
	tx := b.submitWait(t, "small", b.step("a"))
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, tx.Status)

	// The held transactions keep their leases: each was renewed (from the 3 s of --lease) to
	// outlive its 2-minute call before the call was made, and this replica still owns them.
	for i := range 8 {
		got, err := b.client.GetTransaction(t.Context(), &treatyv1.GetTransactionRequest{Gid: fmt.Sprintf("big-%d", i)})
		require.NoError(t, err)
		require.Equal(t, b.app.Engine.Owner(), got.Transaction.LeaseOwner)
		require.True(t, got.Transaction.LeaseExpiresAt.AsTime().After(time.Now().Add(time.Minute)),
			"big-%d: lease until %v, not renewed for its call", i, got.Transaction.LeaseExpiresAt.AsTime())
	}
}
