package admin_test

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/testparticipant"
)

// The dashboard shows, for a branch waiting to be called again, when and why; in headless
// Chromium against a real coordinator.
func TestDashboardShowsWaitingBranch(t *testing.T) {
	t.Parallel()
	browser := chromiumPath(t)
	shots := screenshotDir(t)
	var healthy atomic.Bool
	b := setup(t, setupOpts{script: func(_ context.Context, c testparticipant.Call) error {
		if c.Branch == "pay" && !healthy.Load() {
			return status.Error(codes.Unavailable, "payments restarting")
		}
		return nil
	}})
	t.Cleanup(func() { healthy.Store(true) })
	pay := b.step("pay")
	pay.Retry = nil // the default policy
	const gid = "booking-2001"
	_, err := b.client.SubmitSaga(context.Background(), &treatyv1.SubmitSagaRequest{
		Gid: gid, Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{b.step("reserve-seat"), pay}},
	})
	require.NoError(t, err)

	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(browser), chromedp.Headless, chromedp.NoSandbox,
		chromedp.Flag("disable-gpu", true), chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true), chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true), chromedp.Flag("disable-dev-shm-usage", true),
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
	text := func(sel string) string {
		t.Helper()
		sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
		defer scancel()
		s, err := chromedp.Run(sctx, chromedp.Text(chromedp.CSS(sel)))
		require.NoError(t, err, sel)
		return s
	}

	do("sign in",
		chromedp.Navigate(b.base+"/ui/"), chromedp.WaitVisible(chromedp.CSS("#login-token")),
		chromedp.SendKeys(chromedp.CSS("#login-token"), viewerSecret),
		chromedp.Click(chromedp.CSS(`#login-form button[type="submit"]`)),
		chromedp.WaitVisible(chromedp.CSS("#who")))
	do("open the waiting booking",
		chromedp.Navigate(b.base+"/ui/#/tx/"+gid),
		chromedp.WaitVisible(chromedp.CSS(".next-attempt .waiting-reason")))
	require.Contains(t, text(".next-attempt .waiting-reason"), "payments restarting", "why it waits")
	require.Contains(t, text("#view table"), "next attempt")
	require.Regexp(t, `\d\d:\d\d:\d\d \((in \d+ s|due)\)`, text(".next-attempt"), "when it is tried next")
	sctx, scancel := context.WithTimeout(ctx, 30*time.Second)
	defer scancel()
	png, err := chromedp.Run(sctx, chromedp.FullScreenshot(100))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(shots, "dashboard-waiting-branch.png"), png, 0o644))
}
