package proof

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/participant"
)

// TestTwoPhaseInDoubtAfterCoordinatorKill kills a real coordinator process with SIGKILL while
// both banks hold a prepared transaction of a transfer (real PREPARE TRANSACTION), starts
// another coordinator on the same database, and checks that the transfer ends as the dead
// coordinator's recorded decision says: committed everywhere when the decision was recorded,
// rolled back everywhere when it was not, with pg_prepared_xacts empty on both banks.
//
// Bank B prepares 300ms after bank A, which orders the crash points: the first after-call and
// after-record are bank A's prepare; after-call:2 is bank B's prepare returning before anything
// recorded it (both prepared, no decision); after-record:2 is the write that records bank B's
// prepare together with the commit decision, before any commit is sent.
func TestTwoPhaseInDoubtAfterCoordinatorKill(t *testing.T) {
	t.Parallel()
	bin := buildCoordinator(t)
	cases := []struct {
		name    string
		crashAt string
		atCrash string // the phase the dead coordinator had recorded
		want    string // the phase after recovery
		// restartPayer: bank A crashes too while in doubt and, when it starts again, resolves
		// its prepared transaction itself from the coordinator's decision before serving.
		restartPayer bool
	}{
		{name: "decision recorded, no commit sent", crashAt: "after-record:2", atCrash: "committing", want: "committed"},
		{name: "both prepared, no decision recorded", crashAt: "after-call:2", atCrash: "preparing", want: "rolled_back"},
		{name: "decision recorded, the paying bank restarts in doubt too", crashAt: "after-record:2", atCrash: "committing", want: "committed", restartPayer: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			const amount = 300
			a := newBank(t, bankOptions{Name: "A", Accounts: map[string]int64{"alice": 1000}})
			b := newBank(t, bankOptions{Name: "B", Accounts: map[string]int64{"bob": 0}, Delays: map[string]time.Duration{methodPrepareCredit: 300 * time.Millisecond}})
			db := pgtest.NewDatabase(t)
			out, err := exec.Command(bin, "migrate", "--db", db).CombinedOutput()
			require.NoError(t, err, "%s", out)

			first := startProc(t, bin, db, "TREATY_CRASH_AT="+tc.crashAt, "TREATY_LEASE=1s")
			gid := "indoubt-" + sdk.NewGID()
			from, to := order{Account: "alice", Amount: amount}, order{Account: "bob", Amount: amount}
			retry := &sdk.Retry{InitialBackoff: 50 * time.Millisecond, MaxBackoff: 500 * time.Millisecond}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, err = dialCoordinator(t, first.addr).TwoPhase(ctx, sdk.TwoPhase{GID: gid, Wait: 10 * time.Second, Branches: []sdk.TwoPhaseBranch{
				{Name: "payer", Prepare: a.call(methodPrepareDebit, from), Commit: a.call(methodCommit, from), Rollback: a.call(methodRollback, from), Retry: retry},
				{Name: "payee", Prepare: b.call(methodPrepareCredit, to), Commit: b.call(methodCommit, to), Rollback: b.call(methodRollback, to), Retry: retry},
			}})
			require.Error(t, err, "the coordinator must die before it answers")
			first.waitKilled(t)

			// In doubt: each bank holds its branch prepared, nothing is visible yet, and the
			// coordinator's history stops exactly where the crash point says.
			payerID, err := participant.PreparedID(gid, "payer")
			require.NoError(t, err)
			payeeID, err := participant.PreparedID(gid, "payee")
			require.NoError(t, err)
			require.Equal(t, []string{payerID}, a.prepared(t))
			require.Equal(t, []string{payeeID}, b.prepared(t))
			require.Equal(t, map[string]account{"alice": {Balance: 1000}}, a.accounts(t))
			require.Equal(t, map[string]account{"bob": {Balance: 0}}, b.accounts(t))
			phase, events := recorded(t, db, gid)
			require.Equal(t, tc.atCrash, phase)
			wantEvents := []string{"submitted", "branch_prepared:payer"}
			if tc.atCrash == "committing" {
				wantEvents = append(wantEvents, "branch_prepared:payee", "committing")
			}
			require.Equal(t, wantEvents, events)

			var resolved []string
			if tc.restartPayer {
				a.down()
			}
			second := startProc(t, bin, db, "TREATY_LEASE=1s")
			checker := dialCoordinator(t, second.addr)
			if tc.restartPayer {
				// What a participant does at start, before serving: finish what it holds in doubt
				// as the coordinator decided. A decision not made yet leaves the branch prepared.
				require.NoError(t, a.up(func(ctx context.Context, gid, branch string) (bool, error) {
					tx, err := checker.Get(ctx, gid)
					if errors.Is(err, sdk.ErrNotFound) {
						return false, nil
					}
					if err != nil {
						return false, err
					}
					resolved = append(resolved, fmt.Sprintf("%s/%s:%s", gid, branch, tx.Phase))
					switch tx.Phase {
					case "committing", "committed":
						return true, nil
					case "rolling_back", "rolled_back":
						return false, nil
					}
					return false, fmt.Errorf("gid %q is %s: no decision yet, leave it prepared", gid, tx.Phase)
				}))
				require.Equal(t, []string{gid + "/payer:committing"}, resolved, "bank A resolved its branch from the recorded decision")
				require.Empty(t, a.prepared(t), "bank A finished its branch before serving")
			}

			tx, err := checker.Wait(ctx, gid, 30*time.Second)
			require.NoError(t, err)
			require.Equal(t, tc.want, tx.Phase, "%s\n%s", tx.Reason, history(tx))
			require.Empty(t, a.prepared(t), "pg_prepared_xacts at bank A")
			require.Empty(t, b.prepared(t), "pg_prepared_xacts at bank B")

			// Every participant agrees with the coordinator.
			moved := int64(0)
			if tc.want == "committed" {
				moved = amount
				for _, e := range tx.Raw.Events {
					require.NotEqual(t, "rolling_back", e.Kind, "a recorded commit decision was turned back\n%s", history(tx))
				}
			} else {
				require.Contains(t, tx.Reason, "no decision recorded")
			}
			require.Equal(t, map[string]account{"alice": {Balance: 1000 - moved}}, a.accounts(t))
			require.Equal(t, map[string]account{"bob": {Balance: moved}}, b.accounts(t))
			wantApplied := int64(0)
			if moved > 0 {
				wantApplied = 1
			}
			require.Equal(t, wantApplied, a.applied(gid))
			require.Equal(t, wantApplied, b.applied(gid))
		})
	}
}

// down stops the bank as a crash would: it stops serving and drops its database connections;
// its prepared transactions stay in the database.
func (b *bank) down() {
	b.stopServing()
	b.pool.Close()
}

// up starts the bank again after down: it connects, resolves its in-doubt prepared
// transactions with decide, and serves on its old address.
func (b *bank) up(decide func(ctx context.Context, gid, branch string) (bool, error)) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := b.open(ctx); err != nil {
		return err
	}
	if err := b.tp.Resolve(ctx, b.pool, decide); err != nil {
		return err
	}
	var err error
	for ctx.Err() == nil {
		if err = b.serve(b.addr); err == nil {
			return nil
		}
		t := time.NewTimer(50 * time.Millisecond)
		select {
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
	}
	return err
}

// recorded reads a transaction's status and history straight from the coordinator's database,
// as "kind" or "kind:branch".
func recorded(t *testing.T, db, gid string) (string, []string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, db)
	require.NoError(t, err)
	defer conn.Close(ctx)
	var status string
	require.NoError(t, conn.QueryRow(ctx, "SELECT status FROM treaty_transactions WHERE gid = $1", gid).Scan(&status))
	rows, err := conn.Query(ctx, "SELECT kind, branch FROM treaty_events WHERE gid = $1 ORDER BY id", gid)
	require.NoError(t, err)
	var events []string
	var kind, branch string
	_, err = pgx.ForEachRow(rows, []any{&kind, &branch}, func() error {
		if branch != "" {
			kind += ":" + branch
		}
		events = append(events, kind)
		return nil
	})
	require.NoError(t, err)
	return status, events
}

func dialCoordinator(t *testing.T, addr string) *sdk.Client {
	t.Helper()
	c, err := sdk.Dial(context.Background(), sdk.Options{Address: addr, Retries: 2})
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// buildCoordinator builds cmd/coordinator: the crash test needs a real process to kill.
func buildCoordinator(t *testing.T) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "coordinator")
	out, err := exec.Command("go", "build", "-o", path, "github.com/treatyhq/treaty/cmd/coordinator").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return path
}

// proc is a coordinator running as a child process.
type proc struct {
	cmd  *exec.Cmd
	addr string
	logs *syncBuffer
	done chan struct{}
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

// startProc runs `coordinator serve` on db with extra environment and waits until it answers.
func startProc(t *testing.T, bin, db string, env ...string) *proc {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &proc{addr: l.Addr().String(), logs: &syncBuffer{}, done: make(chan struct{})}
	require.NoError(t, l.Close())
	p.cmd = exec.Command(bin, "serve", "--db", db, "--listen", p.addr, "--http-listen", "", "--recovery-interval", "100ms", "--log-level", "debug")
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stdout, p.cmd.Stderr = p.logs, p.logs
	require.NoError(t, p.cmd.Start())
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("coordinator %s logs:\n%s", p.addr, p.logs.String())
		}
	})
	c := dialCoordinator(t, p.addr)
	deadline := time.Now().Add(60 * time.Second)
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.Get(ctx, "ping")
		cancel()
		if errors.Is(err, sdk.ErrNotFound) {
			return p
		}
		require.True(t, time.Now().Before(deadline), "coordinator did not start: %v\n%s", err, p.logs.String())
		select {
		case <-p.done:
			t.Fatalf("coordinator exited during start-up:\n%s", p.logs.String())
		case <-tick.C:
		}
	}
}

// waitKilled waits until the process died of SIGKILL: its own crash point fired.
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
