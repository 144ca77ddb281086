package gctune_test

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/gctune"
)

func TestLimit(t *testing.T) {
	t.Parallel()
	l, _ := gctune.Limit(256<<20, 0)
	require.Equal(t, int64(768<<20), l, "three times the default budget")
	l, _ = gctune.Limit(16<<20, 0)
	require.Equal(t, int64(gctune.MinMemoryLimit), l, "never below the minimum")
	l, why := gctune.Limit(256<<20, 512<<20)
	require.Equal(t, int64(512<<20)*4/5, l, "a smaller container wins")
	require.Contains(t, why, "container")
	l, _ = gctune.Limit(256<<20, 8<<30)
	require.Equal(t, int64(768<<20), l, "a larger container does not raise it")
}

// fakeRoot writes files under a temporary root.
func fakeRoot(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for name, body := range files {
		p := filepath.Join(root, name)
		require.NoError(t, os.MkdirAll(filepath.Dir(p), 0o755))
		require.NoError(t, os.WriteFile(p, []byte(body), 0o644))
	}
	return root
}

func TestCgroupLimit(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name  string
		files map[string]string
		want  int64
	}{
		{"v2 own group", map[string]string{
			"proc/self/cgroup":                       "0::/kubepods/pod1\n",
			"sys/fs/cgroup/kubepods/pod1/memory.max": "1073741824\n",
		}, 1 << 30},
		{"v2 namespaced: the top of what the container sees", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "536870912\n",
		}, 512 << 20},
		{"v2 unlimited", map[string]string{
			"proc/self/cgroup":         "0::/\n",
			"sys/fs/cgroup/memory.max": "max\n",
		}, 0},
		{"v1", map[string]string{
			"proc/self/cgroup": "4:memory:/docker/abc\n0::/\n",
			"sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": "2147483648\n",
		}, 2 << 30},
		{"v1 unlimited", map[string]string{
			"proc/self/cgroup":                           "4:memory:/x\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
		}, 0},
		{"nothing readable", map[string]string{}, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tc.want, gctune.CgroupLimit(fakeRoot(t, tc.files)))
		})
	}
}

// Not parallel: it changes this process's collector.
func TestApplyLeavesTheGoVariablesAlone(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(-1))
	env := map[string]string{}
	getenv := func(k string) string { return env[k] }

	s := gctune.Apply(getenv, gctune.Config{MaxActiveBytes: 256 << 20})
	require.Equal(t, gctune.DefaultGCPercent, s.GCPercent)
	require.Equal(t, gctune.DefaultGCPercent, debug.SetGCPercent(s.GCPercent))
	require.Positive(t, s.MemoryLimit)
	require.LessOrEqual(t, s.MemoryLimit, int64(768<<20))
	require.Equal(t, s.MemoryLimit, debug.SetMemoryLimit(-1))

	s = gctune.Apply(getenv, gctune.Config{GCPercent: 150, MemoryLimit: 900 << 20})
	require.Equal(t, 150, debug.SetGCPercent(150))
	require.Equal(t, int64(900<<20), debug.SetMemoryLimit(-1))

	debug.SetGCPercent(77)
	debug.SetMemoryLimit(123 << 20)
	env["GOGC"], env["GOMEMLIMIT"] = "77", "123MiB"
	s = gctune.Apply(getenv, gctune.Config{GCPercent: 150, MemoryLimit: 900 << 20})
	require.Equal(t, 77, s.GCPercent, "GOGC wins")
	require.Equal(t, int64(123<<20), s.MemoryLimit, "GOMEMLIMIT wins")
	require.Equal(t, 77, debug.SetGCPercent(77))
	require.Contains(t, s.Source, "GOGC from the environment")
}
