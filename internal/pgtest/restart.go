package pgtest

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Cluster is a throwaway PostgreSQL server of a test's own, which the test may stop and start
// again (same port, same data) to see what the coordinator makes of a database restart. It needs
// local PostgreSQL binaries (as root, it runs them as the postgres user); without them the test
// is skipped, or fails under CI=true.
type Cluster struct {
	// URL is the server's maintenance database.
	URL string

	postgres string
	dir      string
	data     string
	port     int
	cred     *syscall.Credential

	mu   sync.Mutex
	srv  *exec.Cmd
	done chan struct{}
	logs *bytes.Buffer
}

// NewCluster initialises and starts a cluster; it is stopped and removed when t ends.
func NewCluster(t testing.TB) *Cluster {
	t.Helper()
	c, err := newCluster()
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("pgtest: no restartable PostgreSQL cluster (CI=true, so this is a failure): %v", err)
		}
		t.Skipf("pgtest: SKIPPING, no restartable PostgreSQL cluster: %v (install PostgreSQL binaries)", err)
	}
	t.Cleanup(func() {
		c.stop()
		_ = os.RemoveAll(c.dir)
	})
	if err := c.start(); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	return c
}

func newCluster() (*Cluster, error) {
	initdb, err := findBin("initdb")
	if err != nil {
		return nil, err
	}
	postgres, err := findBin("postgres")
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "treaty-pgtest-restart-")
	if err != nil {
		return nil, fmt.Errorf("temp dir: %w", err)
	}
	c := &Cluster{postgres: postgres, dir: dir, data: filepath.Join(dir, "data")}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			return nil, fmt.Errorf("running as root and no postgres user to run the cluster as: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		c.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
		if err := os.Chown(dir, uid, gid); err != nil {
			return nil, fmt.Errorf("chown %s: %w", dir, err)
		}
	}
	cmd := exec.Command(initdb, "-D", c.data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("initdb: %w: %s", err, out)
	}
	if c.port, err = freePort(); err != nil {
		return nil, err
	}
	c.URL = fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", c.port)
	return c, nil
}

// Stop shuts the server down (fast shutdown: open connections are terminated) and waits for it.
func (c *Cluster) Stop(t testing.TB) {
	t.Helper()
	c.stop()
}

// Start starts the stopped server again on the same port and data, and waits until it accepts
// connections.
func (c *Cluster) Start(t testing.TB) {
	t.Helper()
	if err := c.start(); err != nil {
		t.Fatalf("pgtest: %v", err)
	}
}

func (c *Cluster) start() error {
	c.mu.Lock()
	if c.srv != nil {
		c.mu.Unlock()
		return nil
	}
	logs := &bytes.Buffer{}
	srv := exec.Command(c.postgres, "-D", c.data, "-p", strconv.Itoa(c.port), "-k", c.dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
		"-c", "full_page_writes=off", "-c", "max_connections=200", "-c", "max_prepared_transactions=50")
	srv.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred, Setpgid: true}
	srv.Stdout, srv.Stderr = logs, logs
	if err := srv.Start(); err != nil {
		c.mu.Unlock()
		return fmt.Errorf("start postgres: %w", err)
	}
	done := make(chan struct{})
	go func() { _ = srv.Wait(); close(done) }()
	c.srv, c.done, c.logs = srv, done, logs
	c.mu.Unlock()
	deadline := time.Now().Add(60 * time.Second)
	for {
		err := ping(c.URL)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			c.stop()
			return fmt.Errorf("postgres did not accept connections: %w; log: %s", err, logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Cluster) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.srv == nil {
		return
	}
	_ = c.srv.Process.Signal(syscall.SIGINT) // fast shutdown
	select {
	case <-c.done:
	case <-time.After(30 * time.Second):
		_ = c.srv.Process.Kill()
		<-c.done
	}
	c.srv = nil
}
