package admin_test

import (
	"context"
	"net/http"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/cli"
)

// runDev starts `coordinator dev` in memory and returns its banner and HTTP base URL; the
// coordinator stops at the end of the test.
func runDev(t *testing.T, env map[string]string, args ...string) (banner, base string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stdout, stderr := &syncBuffer{}, &syncBuffer{}
	done := make(chan int, 1)
	ready := make(chan string, 1)
	go func() {
		done <- cli.Main(ctx, append([]string{"dev", "--memory", "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--kafka-listen", ""}, args...),
			cli.Env{Stdout: stdout, Stderr: stderr, Getenv: func(k string) string { return env[k] }, Ready: func(a string) { ready <- a }})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-done:
			require.Equal(t, 0, code, stderr.String())
		case <-time.After(30 * time.Second):
			t.Error("dev did not stop")
		}
	})
	select {
	case <-ready:
	case code := <-done:
		t.Fatalf("dev exited with %d: %s", code, stderr.String())
	case <-time.After(30 * time.Second):
		t.Fatal("dev did not start")
	}
	banner = stdout.String()
	m := regexp.MustCompile(`Dashboard +http://(\S+)/ui/`).FindStringSubmatch(banner)
	require.NotNil(t, m, "the banner names the dashboard: %s", banner)
	return banner + stderr.String(), "http://" + m[1]
}

// Dev mode may run the admin API open, and then says so; it does on loopback without tokens.
// Elsewhere, without --admin-open, it wants tokens like serve does.
func TestDevModeAdminAccess(t *testing.T) {
	t.Parallel()
	t.Run("open", func(t *testing.T) {
		t.Parallel()
		out, base := runDev(t, nil, "--admin-open")
		require.Contains(t, out, "OPEN: no token needed")
		require.Contains(t, out, "admin API and dashboard are OPEN")
		var who admin.Whoami
		(&bundle{base: base}).getAs(t, "/admin/v1/whoami", "", &who)
		require.True(t, who.Open)
		require.Equal(t, admin.RoleOperator, who.Role)
		r := (&bundle{base: base}).call(t, "GET", "/ui/", "", nil)
		require.Equal(t, http.StatusOK, r.status)
	})
	t.Run("tokens", func(t *testing.T) {
		t.Parallel()
		out, base := runDev(t, map[string]string{"TREATY_ADMIN_TOKENS": "viewer:" + viewerSecret})
		require.Contains(t, out, "bearer token required (1 configured)")
		b := &bundle{base: base}
		require.Equal(t, http.StatusUnauthorized, b.call(t, "GET", "/admin/v1/stats", "", nil).status)
		var s admin.Stats
		b.getAs(t, "/admin/v1/stats", viewerSecret, &s)
		require.Zero(t, s.Total)
	})
	t.Run("loopback", func(t *testing.T) {
		t.Parallel()
		out, base := runDev(t, nil) // on 127.0.0.1 only this machine reaches it: no token needed
		require.Contains(t, out, "no token needed on loopback")
		var who admin.Whoami
		(&bundle{base: base}).getAs(t, "/admin/v1/whoami", "", &who)
		require.True(t, who.Open)
	})
	t.Run("none", func(t *testing.T) {
		t.Parallel()
		out, base := runDev(t, nil, "--http-listen", "0.0.0.0:0") // beyond loopback: tokens or --admin-open
		require.Contains(t, out, "no tokens configured: refuses every request")
		r := (&bundle{base: base}).call(t, "GET", "/admin/v1/stats", "", nil)
		require.Equal(t, http.StatusUnauthorized, r.status)
		require.Contains(t, r.apiError(t)["message"], "no admin tokens configured")
	})
}
