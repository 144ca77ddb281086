package cli_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/cli"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// TestDevModeFaultInjectionFromEnvironment: TREATY_ALLOW_FAULT_INJECTION turns fault injection
// on in dev mode (the embedded SQLite store keeps the rules); a rule then shows in a saga's
// history. Without it the same request is refused.
func TestDevModeFaultInjectionFromEnvironment(t *testing.T) {
	t.Parallel()
	for _, allow := range []bool{false, true} {
		ctx, cancel := context.WithCancel(t.Context())
		var out, errb syncBuffer
		addrs := make(chan string, 1)
		done := make(chan int, 1)
		env := map[string]string{}
		if allow {
			env["TREATY_ALLOW_FAULT_INJECTION"] = "true"
		}
		go func() {
			done <- cli.Main(ctx, []string{"dev", "--memory", "--admin-open", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--kafka-listen", ""}, cli.Env{
				Stdout: &out, Stderr: &errb, Getenv: func(k string) string { return env[k] },
				Ready: func(addr string) { addrs <- addr },
			})
		}()
		var addr string
		select {
		case addr = <-addrs:
		case code := <-done:
			t.Fatalf("dev exited with %d: %s %s", code, out.String(), errb.String())
		case <-time.After(30 * time.Second):
			t.Fatal("dev did not start")
		}
		var dashboard string
		for _, line := range strings.Split(out.String(), "\n") {
			if f := strings.Fields(line); len(f) >= 2 && f[0] == "Dashboard" {
				dashboard = strings.TrimSuffix(f[1], "/ui/")
			}
		}
		require.NotEmpty(t, dashboard, out.String())
		body, _ := json.Marshal(map[string]any{"op": "action", "effect": "status", "code": "UNAVAILABLE", "max_count": 1,
			"reason": "dev rehearsal", "expires_in": "10m"})
		res, err := http.Post(dashboard+"/admin/v1/faults", "application/json", bytes.NewReader(body))
		require.NoError(t, err)
		answer, _ := io.ReadAll(res.Body)
		_ = res.Body.Close()
		if !allow {
			require.Equal(t, http.StatusConflict, res.StatusCode, "%s", answer)
			require.Contains(t, string(answer), "--allow-fault-injection")
		} else {
			require.Equal(t, http.StatusCreated, res.StatusCode, "%s", answer)
			part, err := testparticipant.Start(testparticipant.Options{})
			require.NoError(t, err)
			conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
			require.NoError(t, err)
			client := treatyv1.NewCoordinatorClient(conn)
			sub, err := client.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: "dev-fault-1", Wait: durationpb.New(20 * time.Second),
				Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{Name: "a",
					Action: &treatyv1.Call{Target: part.Target("x.Y/Do")}, Compensate: &treatyv1.Call{Target: part.Target("x.Y/Undo")},
					Retry: &treatyv1.RetryPolicy{MaxAttempts: 3, InitialBackoff: durationpb.New(10 * time.Millisecond)}}}}})
			require.NoError(t, err)
			require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, sub.Transaction.Status)
			got, err := client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "dev-fault-1"})
			require.NoError(t, err)
			injected := 0
			for _, e := range got.Transaction.Events {
				if e.Kind == "fault_injected" {
					injected++
					require.Contains(t, e.Detail, "fault injected: rule 1: status Unavailable before sending (reason: dev rehearsal)")
				}
			}
			require.Equal(t, 1, injected)
			_ = conn.Close()
			part.Stop()
		}
		cancel()
		select {
		case code := <-done:
			require.Equal(t, 0, code, errb.String())
		case <-time.After(20 * time.Second):
			t.Fatal("dev did not stop")
		}
	}
}
