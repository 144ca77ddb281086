package admin_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/admin"
)

// TestDashboardFaultBanner: while a fault rule is live every page carries a banner naming it;
// once it is deleted the banner goes away.
func TestDashboardFaultBanner(t *testing.T) {
	t.Parallel()
	browser := chromiumPath(t)
	b := setup(t, setupOpts{allowFaults: true})
	r := b.call(t, "POST", "/admin/v1/faults", operatorSecret, admin.FaultRequest{
		Target: "*/ledger.v1.Ledger/*", Op: "confirm", Effect: "status", Code: "UNAVAILABLE",
		Reason: "game day 12", ExpiresIn: "1h"})
	require.Equal(t, http.StatusCreated, r.status, "%s", r.body)
	var f admin.Fault
	require.NoError(t, jsonUnmarshal(r.body, &f))

	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(browser), chromedp.Headless, chromedp.NoSandbox,
		chromedp.Flag("disable-gpu", true), chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(t.TempDir()), chromedp.WindowSize(1280, 860),
	)
	defer cancelAlloc()
	ctx, cancel := chromedp.NewContext(alloc)
	defer cancel()
	require.NoError(t, chromedp.Do(ctx), "start %s", browser)
	do := func(what string, actions ...chromedp.Action[chromedp.Void]) {
		t.Helper()
		sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
		defer scancel()
		require.NoError(t, chromedp.Do(sctx, actions...), what)
	}

	do("sign in as a viewer",
		chromedp.Navigate(b.base+"/ui/"), chromedp.WaitVisible(chromedp.CSS("#login-token")),
		chromedp.SendKeys(chromedp.CSS("#login-token"), viewerSecret),
		chromedp.Click(chromedp.CSS(`#login-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS("#faults-banner")))
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	banner, err := chromedp.Run(sctx, chromedp.Text(chromedp.CSS("#faults-banner")))
	scancel()
	require.NoError(t, err)
	require.Contains(t, banner, "Fault injection is ON: 1 live rule(s)")
	require.Contains(t, banner, "rule "+f.ID+": status UNAVAILABLE on confirm, target */ledger.v1.Ledger/*")
	require.Contains(t, banner, "game day 12, by alice")

	require.Equal(t, http.StatusOK, b.call(t, "DELETE", "/admin/v1/faults/"+f.ID, operatorSecret, nil).status)
	do("the banner goes once the rule is deleted", chromedp.WaitNotVisible(chromedp.CSS("#faults-banner")))
}
