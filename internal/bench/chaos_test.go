package bench_test

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/pgtest"
)

// TestChaosCampaign runs a short `treaty-bench chaos` as a user would (the built binary, which
// also runs the coordinator processes): three replicas killed, stopped and cut off from
// PostgreSQL, call faults on both sides, then every invariant checked. It must find no
// violation, and must really have injected each kind of fault.
func TestChaosCampaign(t *testing.T) {
	t.Parallel()
	base := pgtest.BaseURL(t)
	bin := filepath.Join(t.TempDir(), "treaty-bench")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/treatyhq/treaty/cmd/treaty-bench").CombinedOutput()
	require.NoError(t, err, "%s", out)

	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(t.Context(), bin, "chaos", "--db", base, "--duration", "40s", "--replicas", "3",
		"--concurrency", "4", "--process-fault-every", "3s", "--settle-timeout", "3m")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	require.NoError(t, err, "exit: stderr:\n%s\nstdout:\n%s", stderr.String(), stdout.String())
	res := lastJSON(t, stdout.String())
	t.Logf("%s", bytes.TrimSpace(stdout.Bytes()))
	require.Zero(t, res["violations"], "%v", res["violation_samples"])
	requirePositive(t, res, "transactions", "sagas", "tcc", "succeeded", "kills", "faults_injected", "faults_coordinator", "faults_participant")
	require.Positive(t, res["stops"].(float64)+res["partitions"].(float64)+res["resets"].(float64), "stops and network faults")
	require.Contains(t, res, "seconds_to_all_terminal")
}
