package cli_test

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/cli"
)

// startDev runs `coordinator dev` with args and env until the test ends; it returns the banner
// and the admin base URL the banner names.
func startDev(t *testing.T, env map[string]string, args ...string) (banner, base string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var out, errb syncBuffer
	ready := make(chan string, 1)
	done := make(chan int, 1)
	go func() {
		done <- cli.Main(ctx, append([]string{"dev", "--kafka-listen", ""}, args...), cli.Env{
			Stdout: &out, Stderr: &errb, Getenv: func(k string) string { return env[k] },
			Ready: func(addr string) { ready <- addr },
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case code := <-done:
			require.Equal(t, 0, code, errb.String())
		case <-time.After(30 * time.Second):
			t.Error("dev did not stop")
		}
	})
	select {
	case <-ready:
	case code := <-done:
		t.Fatalf("dev exited with %d: %s %s", code, out.String(), errb.String())
	case <-time.After(60 * time.Second):
		t.Fatal("dev did not start")
	}
	banner = out.String()
	m := regexp.MustCompile(`Dashboard +http://(\S+)/ui/`).FindStringSubmatch(banner)
	require.NotNil(t, m, "the banner names the dashboard: %s", banner)
	return banner, "http://" + m[1]
}

func getStatus(t *testing.T, url string) int {
	t.Helper()
	res, err := http.Get(url)
	require.NoError(t, err)
	_ = res.Body.Close()
	return res.StatusCode
}

// dev listens on loopback by default, serves the admin API and dashboard there without a token
// and says so, and keeps its SQLite file in the user's cache directory, not the working tree.
func TestDevModeLoopbackByDefault(t *testing.T) {
	t.Parallel()
	var help, errb syncBuffer
	require.Equal(t, 0, cli.Main(context.Background(), []string{"dev", "--help"}, cli.Env{Stdout: &help, Stderr: &errb, Getenv: func(string) string { return "" }}))
	require.Contains(t, help.String(), "--listen  [TREATY_LISTEN] (default 127.0.0.1:7600)")
	require.Contains(t, help.String(), "--http-listen  [TREATY_HTTP_LISTEN] (default 127.0.0.1:7601)")
	require.Contains(t, help.String(), "--db  [TREATY_DEV_DB]")

	cache := t.TempDir()
	cwd, err := os.Getwd()
	require.NoError(t, err)
	before, err := os.ReadDir(cwd)
	require.NoError(t, err)
	banner, base := startDev(t, map[string]string{"XDG_CACHE_HOME": cache}, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0")
	require.Contains(t, banner, "admin API: no token needed on loopback")
	require.NotContains(t, banner, "WARNING")
	require.Equal(t, http.StatusOK, getStatus(t, base+"/admin/v1/stats"), "no token needed on loopback")
	require.Equal(t, http.StatusOK, getStatus(t, base+"/ui/"))
	db := filepath.Join(cache, "treaty", "dev.db")
	require.FileExists(t, db)
	require.Contains(t, banner, "SQLite "+db)
	after, err := os.ReadDir(cwd)
	require.NoError(t, err)
	require.Equal(t, len(before), len(after), "dev wrote into the working directory")
}

// --db names the file; tokens, when configured, are required even on loopback.
func TestDevModeDBFlagAndTokens(t *testing.T) {
	t.Parallel()
	db := filepath.Join(t.TempDir(), "mine.db")
	banner, base := startDev(t, map[string]string{"TREATY_ADMIN_TOKENS": "viewer:0123456789abcdef0123"},
		"--db", db, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0")
	require.FileExists(t, db)
	require.Contains(t, banner, "bearer token required (1 configured)")
	require.Equal(t, http.StatusUnauthorized, getStatus(t, base+"/admin/v1/stats"))
}

// Another address is asked for explicitly, and then dev warns that nothing is authenticated;
// the admin API wants tokens there unless --admin-open.
func TestDevModeWarnsBeyondLoopback(t *testing.T) {
	t.Parallel()
	banner, base := startDev(t, nil, "--memory", "--listen", "0.0.0.0:0", "--http-listen", "0.0.0.0:0")
	require.Regexp(t, `WARNING: --listen 0\.0\.0\.0:0 is reachable from other machines, and nothing on it is authenticated`, banner)
	require.Regexp(t, `WARNING: --http-listen 0\.0\.0\.0:0 is reachable from other machines`, banner)
	require.Contains(t, banner, "no tokens configured: refuses every request")
	require.Equal(t, http.StatusUnauthorized, getStatus(t, base+"/admin/v1/stats"))
}
