package app_test

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/internal/testparticipant"
)

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	res, err := http.Get(url)
	require.NoError(t, err)
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	require.NoError(t, err)
	return res.StatusCode, string(b)
}

func TestMetricsHealthAndReadiness(t *testing.T) {
	t.Parallel()
	b := setup(t, setupOpts{http: true, script: func(_ context.Context, c testparticipant.Call) error {
		if c.Branch == "no" && c.Op == "action" {
			return status.Error(codes.Aborted, "refused")
		}
		return nil
	}})
	base := "http://" + b.app.HTTPAddr
	b.submitWait(t, "m-ok", b.step("a"), b.step("b"))
	b.submitWait(t, "m-no", b.step("a"), b.step("no"))

	code, body := httpGet(t, base+"/healthz")
	require.Equal(t, http.StatusOK, code)
	code, _ = httpGet(t, base+"/readyz")
	require.Equal(t, http.StatusOK, code)

	code, body = httpGet(t, base+"/metrics")
	require.Equal(t, http.StatusOK, code)
	for _, want := range []string{
		`treaty_transactions_started_total{mode="saga"} 2`,
		`treaty_transactions_finished_total{mode="saga",outcome="succeeded"} 1`,
		`treaty_transactions_finished_total{mode="saga",outcome="compensated"} 1`,
		`treaty_transactions_finished_stored `,
		`treaty_branch_call_duration_seconds_count{op="action",outcome="aborted",target="` + b.part.Addr + `"} 1`,
		`treaty_needs_operator 0`,
		`treaty_recovery_backlog{kind="due"} 0`,
		`treaty_circuit_breaker_open{target="` + b.part.Addr + `"} 0`,
		`treaty_group_commit_size_count`,
	} {
		require.Contains(t, body, want)
	}

	// Readiness follows the schema: an outdated schema makes the replica not ready.
	_, err := b.pool.Exec(context.Background(), "UPDATE treaty_schema_migrations SET version = version + 100 WHERE version = (SELECT max(version) FROM treaty_schema_migrations)")
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		code, body = httpGet(t, base+"/readyz")
		return code == http.StatusServiceUnavailable
	}, 30*time.Second, 50*time.Millisecond)
	require.Contains(t, body, "not ready")
}
