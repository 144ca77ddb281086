package pgtest

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// envHelper makes the test binary a child that starts a throwaway cluster, prints its
// directory and waits to be signalled.
const envHelper = "TREATY_PGTEST_HELPER"

func TestHelperCluster(t *testing.T) {
	if os.Getenv(envHelper) != "1" {
		t.Skip("run by TestClusterStoppedWhenInterrupted as a child process")
	}
	u, stop, err := startLocalCluster()
	if err != nil {
		fmt.Println("ERROR", strings.ReplaceAll(err.Error(), "\n", " | "))
		os.Exit(2)
	}
	defer stop()
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), clusterDirPrefix+"*"))
	for _, d := range dirs {
		if b, err := os.ReadFile(filepath.Join(d, ownerFile)); err == nil && strings.HasPrefix(string(b), fmt.Sprintf("%d ", os.Getpid())) {
			fmt.Println("DIR", d, u)
		}
	}
	select {} // until a signal ends the process
}

// startHelper runs the child in a private temporary directory and returns it, with the
// cluster directory the child printed.
func startHelper(t *testing.T) (*exec.Cmd, string) {
	t.Helper()
	// Short (the server's socket path is limited to 107 bytes) and reachable by the postgres
	// user the cluster may run as.
	tmp, err := os.MkdirTemp("", "pgt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(tmp) })
	if err := os.Chmod(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestHelperCluster$", "-test.count=1")
	cmd.Env = append(os.Environ(), envHelper+"=1", "TMPDIR="+tmp)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) >= 2 && f[0] == "DIR" {
			go func() {
				for sc.Scan() {
				}
			}()
			return cmd, f[1]
		}
		if len(f) >= 1 && f[0] == "ERROR" {
			t.Fatalf("child could not start a cluster: %s", sc.Text())
		}
	}
	t.Fatalf("child exited without starting a cluster: %v", sc.Err())
	return nil, ""
}

func postmasterPID(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "data", "postmaster.pid"))
	if err != nil {
		t.Fatalf("postmaster.pid: %v", err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil {
		t.Fatal(err)
	}
	return pid
}

// waitGone polls until pid no longer runs (a zombie counts as gone: it will not answer).
func waitGone(t *testing.T, pid int, what string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil || strings.Contains(string(b), ") Z ") {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s (pid %d) still runs after 60s", what, pid)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestClusterStoppedWhenInterrupted(t *testing.T) {
	if _, err := findBin("initdb"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("no local PostgreSQL binaries: %v", err)
		}
		t.Skipf("no local PostgreSQL binaries: %v", err)
	}
	t.Parallel()
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM} {
		// One at a time: each cluster takes its share of the machine's semaphores and memory.
		t.Run(sig.String(), func(t *testing.T) {
			cmd, dir := startHelper(t)
			pm := postmasterPID(t, dir)
			if err := cmd.Process.Signal(sig); err != nil {
				t.Fatal(err)
			}
			err := cmd.Wait()
			ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
			if !ws.Signaled() || ws.Signal() != sig {
				t.Fatalf("child should die of %s as it would without the handler, got %v", sig, err)
			}
			waitGone(t, pm, "postgres")
			if _, err := os.Stat(dir); !os.IsNotExist(err) {
				t.Fatalf("cluster directory %s left behind (%v)", dir, err)
			}
		})
	}
	// SIGKILL cannot be caught: the next start cleans up.
	t.Run("killed", func(t *testing.T) {
		cmd, dir := startHelper(t)
		pm := postmasterPID(t, dir)
		if err := cmd.Process.Kill(); err != nil {
			t.Fatal(err)
		}
		_ = cmd.Wait()
		// A live cluster of another run sits next to it and must be left alone.
		live := filepath.Join(filepath.Dir(dir), clusterDirPrefix+"live")
		if err := os.Mkdir(live, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := writeOwner(live); err != nil {
			t.Fatal(err)
		}
		// And a directory without an owner file (another tool's, or one being created).
		other := filepath.Join(filepath.Dir(dir), clusterDirPrefix+"other")
		if err := os.Mkdir(other, 0o700); err != nil {
			t.Fatal(err)
		}
		old := time.Now().Add(-time.Hour)
		if err := os.Chtimes(other, old, old); err != nil {
			t.Fatal(err)
		}
		removed := cleanStale(filepath.Dir(dir))
		if len(removed) != 1 || removed[0] != dir {
			t.Fatalf("cleanStale removed %v, want only %s", removed, dir)
		}
		waitGone(t, pm, "postgres of the killed run")
		for _, d := range []string{live, other} {
			if _, err := os.Stat(d); err != nil {
				t.Fatalf("%s was touched: %v", d, err)
			}
		}
	})
}
