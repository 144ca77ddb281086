package admin_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// chromiumPath finds Debian's chromium (or TREATY_CHROMIUM). Missing, the test fails under CI
// (.ci/run installs it) and is skipped on a developer's machine.
func chromiumPath(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("TREATY_CHROMIUM"); p != "" {
		return p
	}
	for _, name := range []string{"chromium", "/usr/bin/chromium"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") == "true" {
		t.Fatal("the browser test needs Chromium: apt-get install -y chromium (or set TREATY_CHROMIUM)")
	}
	t.Skip("no chromium on this machine: apt-get install -y chromium (CI fails instead of skipping)")
	return ""
}

// screenshotDir is TREATY_SCREENSHOTS (relative paths from the repository's root), so that
// `TREATY_SCREENSHOTS=docs/screenshots go test ./internal/admin -run TestDashboard` refreshes
// the documentation's pictures; otherwise a temporary directory.
func screenshotDir(t *testing.T) string {
	dir := os.Getenv("TREATY_SCREENSHOTS")
	if dir == "" {
		return t.TempDir()
	}
	if !filepath.IsAbs(dir) {
		dir = filepath.Join("..", "..", dir)
	}
	require.NoError(t, os.MkdirAll(dir, 0o755))
	return dir
}

// TestDashboardInBrowser drives the dashboard in headless Chromium against a real coordinator:
// sign in, the overview lists a transaction that needs an operator, the list finds it by gid,
// its page shows branches and history, and resuming it with a reason (after a confirmation)
// shows the operator's entry and the transaction finishing. Each page is photographed.
func TestDashboardInBrowser(t *testing.T) {
	t.Parallel()
	browser := chromiumPath(t)
	shots := screenshotDir(t)

	const stuck = "booking-1003"
	var fixed atomic.Bool
	b := setup(t, setupOpts{script: func(ctx context.Context, c testparticipant.Call) error {
		if c.GID == stuck && c.Op == "compensate" && !fixed.Load() {
			return status.Error(codes.Unavailable, "refund service unavailable")
		}
		if c.GID == stuck && c.Branch == "charge-card" && c.Op == "action" {
			return status.Error(codes.Aborted, "card declined")
		}
		return refuseNo(ctx, c)
	}})
	b.saga(t, "booking-1001", b.step("reserve-seat"), b.step("charge-card"))
	b.saga(t, "booking-1002", b.step("reserve-seat"), b.step("no"))
	require.Equal(t, treatyv1.Status_STATUS_NEEDS_OPERATOR, b.saga(t, stuck, b.step("reserve-seat"), b.step("charge-card")).Status)
	b.saga(t, "refund-77", b.step("pay-back"))

	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(browser),
		chromedp.Headless,
		chromedp.NoSandbox, // root in CI containers
		chromedp.Flag("disable-gpu", true),
		chromedp.Flag("disable-quic", true),
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(t.TempDir()),
		chromedp.WindowSize(1280, 860),
	)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(alloc)
	defer cancel()
	// The first call starts the browser; it must not carry a timeout (that would end the browser).
	require.NoError(t, chromedp.Do(ctx), "start %s", browser)

	do := func(what string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
		defer scancel()
		require.NoError(t, chromedp.Do(sctx, actions...), what)
	}
	text := func(sel string) string {
		t.Helper()
		sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
		defer scancel()
		s, err := chromedp.Run(sctx, chromedp.Text(chromedp.CSS(sel)))
		require.NoError(t, err, sel)
		return s
	}
	count := func(sel string) int {
		t.Helper()
		n, err := chromedp.Run(ctx, chromedp.Evaluate[int](`document.querySelectorAll(`+jsString(sel)+`).length`))
		require.NoError(t, err, sel)
		return n
	}
	shot := func(name string) {
		t.Helper()
		sctx, scancel := context.WithTimeout(ctx, 20*time.Second)
		defer scancel()
		png, err := chromedp.Run(sctx, chromedp.FullScreenshot(100))
		require.NoError(t, err, name)
		require.NoError(t, os.WriteFile(filepath.Join(shots, name), png, 0o644))
	}

	// Sign in: the API answers 401, the page asks for a token.
	do("open the dashboard", chromedp.Navigate(b.base+"/ui/"), chromedp.WaitVisible(chromedp.CSS("#login-token")))
	shot("dashboard-sign-in.png")
	do("sign in",
		chromedp.SendKeys(chromedp.CSS("#login-token"), operatorSecret),
		chromedp.Click(chromedp.CSS(`#login-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#view tr[data-gid="`+stuck+`"]`)))
	require.Equal(t, "alice · operator", text("#who"))

	// Overview: counts, the needs-an-operator list, recent failures.
	require.Equal(t, "Overview", text("#view h1"))
	require.Contains(t, text("#view"), "need an operator")
	require.Equal(t, 1, count(`#view tr[data-gid="booking-1002"]`), "the compensated booking is a recent failure")
	shot("dashboard-overview.png")

	// The list, searched by gid prefix.
	do("search",
		chromedp.Click(chromedp.CSS(`a[data-nav="transactions"]`)),
		chromedp.WaitVisible(chromedp.CSS(`#search input[name="gid_prefix"]`)),
		chromedp.SendKeys(chromedp.CSS(`#search input[name="gid_prefix"]`), "booking-"),
		chromedp.Click(chromedp.CSS(`#search button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS(`table.txs tr[data-gid="`+stuck+`"]`)))
	do("the search result settles", chromedp.Poll[chromedp.Void](`document.querySelectorAll("table.txs tbody tr").length === 3`))
	require.Zero(t, count(`table.txs tr[data-gid="refund-77"]`))
	shot("dashboard-transactions.png")

	// The stuck transaction's page: branches and history.
	do("open the stuck booking",
		chromedp.Click(chromedp.CSS(`table.txs tr[data-gid="`+stuck+`"] a`)),
		chromedp.WaitVisible(chromedp.CSS(`.facts [data-status="needs_operator"]`)))
	require.Equal(t, stuck, text("#gid"))
	require.Contains(t, text("#view table"), "refund service unavailable")
	require.Positive(t, count(`#timeline li[data-kind="needs_operator"]`))
	shot("dashboard-transaction.png")

	// Resume it: a reason, a confirmation, then the history shows who and why.
	fixed.Store(true)
	const reason = "refund service redeployed, ticket OPS-42"
	do("ask to resume",
		chromedp.Click(chromedp.CSS(`button[data-action="resume"]`)),
		chromedp.WaitVisible(chromedp.CSS("#act-reason")),
		chromedp.SendKeys(chromedp.CSS("#act-reason"), reason))
	require.Equal(t, "Confirm resume", text("#act-confirm"))
	shot("dashboard-action.png")
	do("confirm",
		chromedp.Click(chromedp.CSS("#act-confirm")),
		chromedp.WaitVisible(chromedp.CSS(`#timeline li[data-kind="operator_resume"]`)))
	require.Contains(t, text(`#timeline li[data-kind="operator_resume"]`), "by alice: "+reason)
	do("the page follows the transaction to its end", chromedp.WaitVisible(chromedp.CSS(`.facts [data-status="compensated"]`)))
	require.Zero(t, count(`button[data-action="rollback"]`), "a compensated transaction offers no force rollback")
	require.Contains(t, text("#flash"), "Resume: recorded")
	shot("dashboard-transaction-resumed.png")

	// The API agrees with what the page showed.
	tx := b.waitFor(t, stuck, func(tx admin.Transaction) bool { return tx.Status == "compensated" })
	require.Contains(t, eventKinds(tx), "operator_resume")
	for _, f := range []string{"dashboard-sign-in.png", "dashboard-overview.png", "dashboard-transactions.png", "dashboard-transaction.png", "dashboard-action.png", "dashboard-transaction-resumed.png"} {
		fi, err := os.Stat(filepath.Join(shots, f))
		require.NoError(t, err)
		require.Greater(t, fi.Size(), int64(1000), f)
	}
}

func jsString(s string) string {
	return "'" + strings.ReplaceAll(strings.ReplaceAll(s, `\`, `\\`), `'`, `\'`) + "'"
}
