package admin_test

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/cli"
	"github.com/treatyhq/treaty/internal/pgtest"
)

// exercise sends good, bad and almost-right tokens at every kind of route, so that whatever the
// coordinator logs about requests, refusals and actions has had its chance to leak a token.
func exercise(t *testing.T, base string, good []string) {
	t.Helper()
	b := &bundle{base: base}
	bad := []string{"", "not-a-token-at-all-0000"}
	for _, g := range good {
		bad = append(bad, g+"x", g[:len(g)-1], strings.ToUpper(g))
	}
	for _, tok := range append(append([]string{}, good...), bad...) {
		for _, rt := range []struct{ method, path string }{
			{"GET", "/admin/v1/whoami"}, {"GET", "/admin/v1/stats"}, {"GET", "/admin/v1/transactions?limit=5"},
			{"GET", "/admin/v1/transactions/nope"}, {"GET", "/admin/v1/transactions?limit=nope"},
			{"POST", "/admin/v1/transactions/nope/resume"}, {"POST", "/admin/v1/transactions/nope/retry"},
			{"GET", "/ui/"}, {"GET", "/metrics"},
		} {
			var body any
			if rt.method == "POST" {
				body = admin.ActionRequest{Reason: "log test"}
			}
			b.call(t, rt.method, rt.path, tok, body)
		}
	}
}

func requireNoSecrets(t *testing.T, logs string, secrets ...string) {
	t.Helper()
	for _, s := range secrets {
		// The secrets, and any long enough piece of them, never appear.
		for i := 0; i+12 <= len(s); i += 4 {
			require.NotContains(t, logs, s[i:i+12], "a piece of a token is in the log")
		}
	}
}

// TestTokensNeverLogged greps the coordinator's logs (debug level) for the tokens, after
// requests with good, wrong and almost-right tokens, in process and through `coordinator serve`
// with tokens from a file and from TREATY_ADMIN_TOKENS.
func TestTokensNeverLogged(t *testing.T) {
	t.Parallel()

	t.Run("in process", func(t *testing.T) {
		t.Parallel()
		b := setup(t, setupOpts{})
		exercise(t, b.base, []string{viewerSecret, operatorSecret})
		logs := b.logs.String()
		require.Contains(t, logs, "admin request refused", "refusals are logged")
		require.Contains(t, logs, "admin request forbidden", "forbidden requests are logged")
		requireNoSecrets(t, logs, viewerSecret, operatorSecret)
	})

	t.Run("coordinator serve", func(t *testing.T) {
		t.Parallel()
		const fileSecret, envSecret, envViewer = "file-operator-secret-7f3a9c", "env-operator-secret-51bd02", "env-viewer-secret-c0ffee42"
		dir := t.TempDir()
		file := filepath.Join(dir, "tokens")
		require.NoError(t, os.WriteFile(file, []byte("operator:"+fileSecret+":carol\n"), 0o600))
		env := map[string]string{"TREATY_ADMIN_TOKENS": "operator:" + envSecret + ",viewer:" + envViewer}
		stdout, stderr := &syncBuffer{}, &syncBuffer{}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := make(chan int, 1)
		ready := make(chan string, 1)
		go func() {
			done <- cli.Main(ctx, []string{"serve", "--db", pgtest.NewDatabase(t), "--migrate",
				"--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--log-level", "debug",
				"--admin-tokens-file", file},
				cli.Env{Stdout: stdout, Stderr: stderr, Getenv: func(k string) string { return env[k] }, Ready: func(a string) { ready <- a }})
		}()
		select {
		case <-ready:
		case code := <-done:
			t.Fatalf("serve exited with %d: %s", code, stderr.String())
		case <-time.After(30 * time.Second):
			t.Fatal("serve did not start")
		}
		m := regexp.MustCompile(`http=(127\.0\.0\.1:\d+)`).FindStringSubmatch(stderr.String())
		require.NotNil(t, m, "the log says where HTTP is: %s", stderr.String())
		base := "http://" + m[1]
		var who admin.Whoami
		(&bundle{base: base}).getAs(t, "/admin/v1/whoami", fileSecret, &who)
		require.Equal(t, admin.Whoami{Role: admin.RoleOperator, Actor: "carol"}, who)
		(&bundle{base: base}).getAs(t, "/admin/v1/whoami", envViewer, &who)
		require.Equal(t, admin.RoleViewer, who.Role)
		exercise(t, base, []string{fileSecret, envSecret, envViewer})
		cancel()
		select {
		case code := <-done:
			require.Equal(t, 0, code, stderr.String())
		case <-time.After(30 * time.Second):
			t.Fatal("serve did not stop")
		}
		logs := stdout.String() + stderr.String()
		require.Contains(t, logs, "admin API requires a bearer token")
		require.Contains(t, logs, "admin request refused")
		requireNoSecrets(t, logs, fileSecret, envSecret, envViewer)
	})
}

// getAs decodes a 200 answer of a GET made with token into v.
func (b *bundle) getAs(t *testing.T, path, token string, v any) {
	t.Helper()
	r := b.call(t, "GET", path, token, nil)
	require.Equal(t, http.StatusOK, r.status, "GET %s: %s", path, r.body)
	require.NoError(t, json.Unmarshal(r.body, v))
}
