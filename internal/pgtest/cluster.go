package pgtest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// clusterDirPrefix names the temporary directories of throwaway clusters, so a later run can
// find the ones a killed run left behind.
const clusterDirPrefix = "treaty-pgtest-"

// ownerFile, in a cluster's directory, holds the pid and start time of the test process that
// owns it; a directory whose owner is gone is stale.
const ownerFile = "owner"

// stopOnSignal stops the cluster when the test process is interrupted (Ctrl-C, SIGTERM, SIGHUP)
// and then lets the signal do what it would have done. release ends the watch.
func stopOnSignal(stop func()) (release func()) {
	ch := make(chan os.Signal, 1)
	signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		select {
		case sig := <-ch:
			stop()
			signal.Reset(sig)
			_ = syscall.Kill(os.Getpid(), sig.(syscall.Signal))
		case <-done:
			signal.Stop(ch)
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(done) })
		<-finished
	}
}

// processStart returns a process's start time (in clock ticks since boot) from /proc, which
// tells a live owner from a new process that reused its pid.
func processStart(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return "", fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	fields := strings.Fields(string(b[i+1:]))
	if len(fields) < 20 {
		return "", fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	return fields[19], nil // field 22 of the whole line: starttime
}

func writeOwner(dir string) error {
	pid := os.Getpid()
	start, err := processStart(pid)
	if err != nil {
		return fmt.Errorf("pgtest: own start time: %w", err)
	}
	if err := os.WriteFile(filepath.Join(dir, ownerFile), []byte(fmt.Sprintf("%d %s\n", pid, start)), 0o644); err != nil {
		return fmt.Errorf("pgtest: write owner: %w", err)
	}
	return nil
}

// ownerAlive reports whether the process recorded in dir's owner file still runs. A directory
// without an owner file is never taken as stale: it may be another run's, still being created,
// or something else under the same prefix.
func ownerAlive(dir string) bool {
	b, err := os.ReadFile(filepath.Join(dir, ownerFile))
	if err != nil {
		return true
	}
	var pid int
	var start string
	if _, err := fmt.Sscan(string(b), &pid, &start); err != nil {
		return true
	}
	now, err := processStart(pid)
	return err == nil && now == start
}

// cleanStale stops the server of, and removes, every throwaway cluster directory under tmp
// whose owning test process is gone. It reports what it removed.
func cleanStale(tmp string) []string {
	dirs, _ := filepath.Glob(filepath.Join(tmp, clusterDirPrefix+"*"))
	var removed []string
	for _, dir := range dirs {
		if ownerAlive(dir) {
			continue
		}
		stopPostmaster(filepath.Join(dir, "data"))
		if err := os.RemoveAll(dir); err == nil {
			removed = append(removed, dir)
		}
	}
	return removed
}

// stopPostmaster stops the server whose postmaster.pid is in data, if it still runs: fast
// shutdown, then SIGKILL after ten seconds.
func stopPostmaster(data string) {
	b, err := os.ReadFile(filepath.Join(data, "postmaster.pid"))
	if err != nil {
		return
	}
	first, _, _ := strings.Cut(string(b), "\n")
	pid, err := strconv.Atoi(strings.TrimSpace(first))
	if err != nil || pid <= 0 {
		return
	}
	// Only a postgres process: the pid may have been reused since.
	if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err != nil || !bytes.Contains(cmd, []byte(data)) {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGINT)
	deadline := time.Now().Add(10 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// findBin looks for a PostgreSQL server binary on PATH, then under the Debian layout.
func findBin(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	if len(matches) == 0 {
		return "", fmt.Errorf("%s not found on PATH or under /usr/lib/postgresql/*/bin", name)
	}
	sort.Strings(matches)
	return matches[len(matches)-1], nil // newest major version
}

// startLocalCluster runs initdb and postgres in a temporary directory on a free port.
// PostgreSQL refuses to run as root, so as root both run as the postgres user.
func startLocalCluster() (string, func(), error) {
	initdb, err := findBin("initdb")
	if err != nil {
		return "", nil, err
	}
	postgres, err := findBin("postgres")
	if err != nil {
		return "", nil, err
	}
	// A run killed outright (SIGKILL, a test timeout's panic) left its cluster behind.
	cleanStale(os.TempDir())
	dir, err := os.MkdirTemp("", clusterDirPrefix)
	if err != nil {
		return "", nil, fmt.Errorf("temp dir: %w", err)
	}
	if err := writeOwner(dir); err != nil {
		_ = os.RemoveAll(dir)
		return "", nil, err
	}
	var cred *syscall.Credential
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return "", nil, fmt.Errorf("running as root and no postgres user to run the cluster as: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			return "", nil, fmt.Errorf("chown %s: %w", dir, err)
		}
	}
	data := filepath.Join(dir, "data")
	cmd := exec.Command(initdb, "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", nil, fmt.Errorf("initdb: %w: %s", err, out)
	}
	port, err := freePort()
	if err != nil {
		return "", nil, err
	}
	var logs bytes.Buffer
	srv := exec.Command(postgres, "-D", data, "-p", strconv.Itoa(port), "-k", dir,
		"-c", "listen_addresses=127.0.0.1",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "max_connections=400", "-c", "max_prepared_transactions=100",
		"-c", "shared_buffers=128MB")
	// Pdeathsig: should this process die without stopping the server, the kernel asks the
	// server to shut down (fast) too; cleanStale removes the directory at the next start.
	srv.SysProcAttr = &syscall.SysProcAttr{Credential: cred, Setpgid: true, Pdeathsig: syscall.SIGINT}
	srv.Stdout, srv.Stderr = &logs, &logs
	// The kernel sends Pdeathsig when the thread that started the child exits, not the process;
	// Go may end threads, so the start happens on a locked thread kept until the server stops.
	started, threadDone := make(chan error), make(chan struct{})
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine, after stop
		started <- srv.Start()
		<-threadDone
	}()
	if err := <-started; err != nil {
		close(threadDone)
		return "", nil, fmt.Errorf("start postgres: %w", err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			defer close(threadDone)
			_ = srv.Process.Signal(syscall.SIGINT) // fast shutdown
			done := make(chan struct{})
			go func() { _ = srv.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = srv.Process.Kill()
				<-done
			}
			_ = os.RemoveAll(dir)
		})
	}
	u := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := ping(u)
		if err == nil {
			release := stopOnSignal(stop)
			return u, func() { release(); stop() }, nil
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("postgres did not accept connections: %w; log: %s", err, logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

var errNoDocker = errors.New("no Docker engine answered")

// startContainer is the last resort when neither a URL nor local binaries exist.
func startContainer() (string, func(), error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	return runContainer(ctx)
}
