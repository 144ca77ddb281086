package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/sdk/treatytest"
)

// TestGuideRuns runs what docs/GETTING_STARTED.md runs, against an embedded coordinator in
// place of `coordinator dev`.
func TestGuideRuns(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	coord, err := treatytest.NewEmbedded(ctx)
	require.NoError(t, err)
	defer coord.Close()
	var out bytes.Buffer
	require.NoError(t, run(ctx, &out, coord.Addr, filepath.Join(t.TempDir(), "stock.db")), out.String())
	got := regexp.MustCompile(`[0-9a-f]{8}-[0-9a-f-]{27}`).ReplaceAllString(out.String(), "<gid>")
	require.Equal(t, `order 1: 2 apples
  payments: <gid> charged 500
  => succeeded
order 2: 5 apples
  payments: <gid> charged 1200
  payments: <gid> refunded 1200
  => compensated: step "reserve" aborted: rpc error: code = Aborted desc = not enough apple: treaty participant: aborted
transfer: alice -> bob 30
  bank: Try debit alice -30: err=<nil>
  bank: Try credit bob 30: err=<nil>
  bank: Confirm debit alice -30: err=<nil>
  bank: Confirm credit bob 30: err=<nil>
  => confirmed
workflow place-order version 1: 1 apple
  payments: <gid> charged 250
  => succeeded (place-order v1)
apples left: 0
`, sortConfirms(got))
}

// sortConfirms orders the two confirm lines, which the coordinator sends concurrently.
func sortConfirms(s string) string {
	a, b := "  bank: Confirm credit bob 30: err=<nil>\n", "  bank: Confirm debit alice -30: err=<nil>\n"
	return strings.Replace(s, a+b, b+a, 1)
}

// TestGuideSnippetsCompile checks that every Go snippet of docs/GETTING_STARTED.md is code of
// this program (or of the quickstart), so the guide cannot drift from code that compiles and runs.
func TestGuideSnippetsCompile(t *testing.T) {
	t.Parallel()
	guide, err := os.ReadFile("../../docs/GETTING_STARTED.md")
	require.NoError(t, err)
	var src strings.Builder
	for _, pattern := range []string{"*.go", "../quickstart/main.go"} {
		files, err := filepath.Glob(pattern)
		require.NoError(t, err)
		for _, f := range files {
			b, err := os.ReadFile(f)
			require.NoError(t, err)
			src.Write(b)
		}
	}
	code := src.String()
	blocks := regexp.MustCompile("(?s)```go\n(.*?)```").FindAllStringSubmatch(string(guide), -1)
	require.NotEmpty(t, blocks)
	for _, b := range blocks {
		require.Contains(t, code, b[1], "a snippet of the guide that is not in the code")
	}
}
