package app_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// The coordinator binary, built once per test run: crash tests need a real process to kill.
var binary struct {
	once sync.Once
	path string
	err  error
	dir  string
}

func coordinatorBinary(t *testing.T) string {
	t.Helper()
	binary.once.Do(func() {
		binary.dir, binary.err = os.MkdirTemp("", "treaty-bin-")
		if binary.err != nil {
			return
		}
		binary.path = filepath.Join(binary.dir, "coordinator")
		out, err := exec.Command("go", "build", "-o", binary.path, "github.com/treatyhq/treaty/cmd/coordinator").CombinedOutput()
		if err != nil {
			binary.err = fmt.Errorf("go build: %w: %s", err, out)
		}
	})
	require.NoError(t, binary.err)
	return binary.path
}

// proc is a coordinator running as a child process.
type proc struct {
	cmd    *exec.Cmd
	addr   string
	logs   *syncBuffer
	done   chan struct{}
	client treatyv1.CoordinatorClient
	conn   *grpc.ClientConn
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func freeAddr(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	return l.Addr().String()
}

// startProc runs `coordinator serve` against db with extra environment, and waits until it
// answers gRPC health checks.
func startProc(t *testing.T, db string, env ...string) *proc {
	t.Helper()
	p := &proc{addr: freeAddr(t), logs: &syncBuffer{}, done: make(chan struct{})}
	p.cmd = exec.Command(coordinatorBinary(t), "serve", "--db", db, "--listen", p.addr,
		"--recovery-interval", "100ms", "--log-level", "debug", "--http-listen", "127.0.0.1:0")
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	require.NoError(t, p.cmd.Start())
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("coordinator %s logs:\n%s", p.addr, p.logs.String())
		}
	})
	conn, err := grpc.NewClient(p.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	p.conn, p.client = conn, treatyv1.NewCoordinatorClient(conn)
	deadline := time.Now().Add(60 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := p.client.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: "ping"})
		cancel()
		if err != nil && !isUnavailable(err) {
			break // NotFound: it answers
		}
		select {
		case <-p.done:
			t.Fatalf("coordinator exited during start-up: %s", p.logs.String())
		default:
		}
		require.True(t, time.Now().Before(deadline), "coordinator did not start: %s", p.logs.String())
		time.Sleep(50 * time.Millisecond)
	}
	return p
}

// waitKilled waits until the process died of SIGKILL (its own crash point).
func (p *proc) waitKilled(t *testing.T) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(30 * time.Second):
		t.Fatalf("coordinator did not crash at its crash point; logs:\n%s", p.logs.String())
	}
	ws, ok := p.cmd.ProcessState.Sys().(syscall.WaitStatus)
	require.True(t, ok)
	require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "want death by SIGKILL, got %v; logs:\n%s", p.cmd.ProcessState, p.logs.String())
}

func migrateDB(t *testing.T, db string) {
	t.Helper()
	out, err := exec.Command(coordinatorBinary(t), "migrate", "--db", db).CombinedOutput()
	require.NoError(t, err, "%s", out)
}
