package app_test

import (
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/gctune"
	"github.com/treatyhq/treaty/internal/pgtest"
)

// metricValue reads one unlabelled sample from a /metrics text.
func metricValue(t *testing.T, body, name string) float64 {
	t.Helper()
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			require.NoError(t, err, line)
			return f
		}
	}
	t.Fatalf("%s not in /metrics", name)
	return 0
}

// TestServeGarbageCollectorDefaults: `coordinator serve` runs its collector as documented (a GC
// target of 400 and a soft memory limit from --max-active-bytes), and the Go runtime's own
// variables win over both. Read from a real process's /metrics (the Go runtime's figures).
func TestServeGarbageCollectorDefaults(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	migrateDB(t, db)
	httpAddr := regexp.MustCompile(`msg="coordinator serving" grpc=\S+ http=(\S+)`)
	metrics := func(p *proc) string {
		m := httpAddr.FindStringSubmatch(p.logs.String())
		require.NotNil(t, m, "no http address in the logs: %s", p.logs.String())
		code, body := httpGet(t, "http://"+m[1]+"/metrics")
		require.Equal(t, 200, code)
		return body
	}

	// Whatever the test's own environment says, these two start without GOGC and GOMEMLIMIT.
	body := metrics(startProc(t, db, "GOGC=", "GOMEMLIMIT="))
	require.Equal(t, float64(gctune.DefaultGCPercent), metricValue(t, body, "go_gc_gogc_percent"))
	want, _ := gctune.Limit(engine.DefaultMaxActiveBytes, gctune.CgroupLimit("/"))
	require.Equal(t, float64(want), metricValue(t, body, "go_gc_gomemlimit_bytes"))

	body = metrics(startProc(t, db, "GOGC=", "GOMEMLIMIT=", "TREATY_MAX_ACTIVE_BYTES=1073741824", "TREATY_GC_PERCENT=250"))
	require.Equal(t, float64(250), metricValue(t, body, "go_gc_gogc_percent"))
	want, _ = gctune.Limit(1<<30, gctune.CgroupLimit("/"))
	require.Equal(t, float64(want), metricValue(t, body, "go_gc_gomemlimit_bytes"), "the limit follows the budget")

	body = metrics(startProc(t, db, "GOGC=100", "GOMEMLIMIT=300MiB", "TREATY_GC_PERCENT=250"))
	require.Equal(t, float64(100), metricValue(t, body, "go_gc_gogc_percent"), "GOGC wins")
	require.Equal(t, float64(300<<20), metricValue(t, body, "go_gc_gomemlimit_bytes"), "GOMEMLIMIT wins")
}
