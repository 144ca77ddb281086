package app_test

import (
	"bufio"
	"context"
	"fmt"
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

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/pgtest"
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
