package cli_test

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// The default retry policy and the breaker are product decisions a user must be able to read
// and change: each is a flag with its environment variable and default in `serve --help`.
func TestServeHelpDocumentsRetryDefaults(t *testing.T) {
	t.Parallel()
	r := run(t, nil, "serve", "--help")
	require.Equal(t, 0, r.code)
	help := r.stdout + r.stderr
	requireFlagsDocumented(t, help, []flagDoc{
		{"forward-retry-window", "TREATY_FORWARD_RETRY_WINDOW", "5m0s"},
		{"forward-max-attempts", "TREATY_FORWARD_MAX_ATTEMPTS", ""},
		{"retry-initial-backoff", "TREATY_RETRY_INITIAL_BACKOFF", "100ms"},
		{"retry-max-backoff", "TREATY_RETRY_MAX_BACKOFF", "1s"},
		{"breaker-failures", "TREATY_BREAKER_FAILURES", "5"},
		{"breaker-open-timeout", "TREATY_BREAKER_OPEN_TIMEOUT", "1s"},
	})
	require.Contains(t, help, "0 = no attempt limit")
}

func TestRetryFlagErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want []string
	}{
		{"zero window", nil, []string{"--forward-retry-window", "0s"}, []string{"--forward-retry-window 0s", "must be positive"}},
		{"window too long", map[string]string{"TREATY_FORWARD_RETRY_WINDOW": "200h"}, nil, []string{"forward retry window 200h0m0s", "0..168h0m0s"}},
		{"negative attempts", nil, []string{"--forward-max-attempts", "-1"}, []string{"forward max attempts -1", "0..1000"}},
		{"backoff inverted", nil, []string{"--retry-initial-backoff", "2s", "--retry-max-backoff", "1s"}, []string{"retry max backoff 1s is below the initial backoff 2s"}},
		{"breaker failures", map[string]string{"TREATY_BREAKER_FAILURES": "0"}, nil, []string{"--breaker-failures 0", "1..1000000"}},
		{"breaker open", nil, []string{"--breaker-open-timeout", "2h"}, []string{"--breaker-open-timeout 2h0m0s"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := run(t, tc.env, append([]string{"serve", "--db", "postgres://unused"}, tc.args...)...)
			require.Equal(t, 1, r.code, "stderr: %s", r.stderr)
			for _, w := range tc.want {
				require.Contains(t, r.stdout+r.stderr, w)
			}
		})
	}
}
