package bench

import (
	"context"
	"fmt"
	"io"

	"github.com/treatyhq/treaty/internal/testparticipant"
	"github.com/treatyhq/treaty/sdk"
)

// twoPhaseMode runs each transaction with one SDK call, client.TwoPhase, which submits every
// branch in one Submit2PC request and waits for the outcome: the coordinator drives the rest
// (prepare each branch, record the commit decision, commit each branch).
func twoPhaseMode() txMode {
	return txMode{name: "2pc", build: func(parts []*testparticipant.Participant, n int) txOp {
		t := sdk.TwoPhase{Branches: make([]sdk.TwoPhaseBranch, n)}
		for i := range t.Branches {
			p := parts[i%len(parts)]
			name := fmt.Sprintf("branch%d", i+1)
			t.Branches[i] = sdk.TwoPhaseBranch{
				Name:     name,
				Prepare:  sdk.Call{Target: p.Target("bench.Branch/Prepare"), Payload: []byte("prepare " + name)},
				Commit:   sdk.Call{Target: p.Target("bench.Branch/Commit"), Payload: []byte("commit " + name)},
				Rollback: sdk.Call{Target: p.Target("bench.Branch/Rollback"), Payload: []byte("rollback " + name)},
			}
		}
		return func(ctx context.Context, c *sdk.Client) error {
			tx, err := c.TwoPhase(ctx, t) // t is a value: each call gets its own gid
			if err != nil {
				return err
			}
			if tx.Status != sdk.StatusSucceeded {
				return fmt.Errorf("2PC %s ended %s (%s): %s", tx.GID, tx.Status, tx.Phase, tx.Reason)
			}
			return nil
		}
	}}
}

// RunTwoPhase runs the 2PC benchmark: the commit ceiling first, then a coordinator (in process
// unless cfg.Coordinator is set) serving cfg.Concurrency SDK clients that each submit a two-phase
// commit of cfg.Branches no-op branches and wait for its outcome, then the next, for
// cfg.Duration after a warm-up. It returns the result even when some transactions failed (then
// with an error too).
func RunTwoPhase(ctx context.Context, cfg TxConfig) (TxResult, error) {
	return runTx(ctx, cfg, twoPhaseMode())
}

const twoPhaseUsage = `treaty-bench 2pc: throughput and latency of two-phase commits against the PostgreSQL ceiling.

Starts no-op gRPC participants and a coordinator in process (or uses --coordinator), measures the
server's raw commit rate (one-row autocommit INSERTs at --concurrency connections), then runs
--concurrency clients that each submit a two-phase commit of --branches branches through the Go
SDK (client.TwoPhase: one Submit2PC call that waits for the outcome; the coordinator prepares
every branch, records the decision and commits every branch), over and over, for --duration after
--warmup. Everything happens in a database created for the run (treaty_bench_<random>) and
dropped afterwards unless --keep.

The last line of the output is one JSON object: txns_per_sec, p50_ms, p99_ms, pg_commits_per_sec,
commits_per_txn (pg_stat_database.xact_commit delta / transactions; read-only ones count too),
ratio = txns_per_sec * commits_per_txn / pg_commits_per_sec, and more.

Example:
  treaty-bench 2pc --branches 2 --concurrency 32 --duration 20s --db postgres://postgres@127.0.0.1:5432/postgres

Flags:`

// TwoPhaseMain is `treaty-bench 2pc`: it parses args (without the command name), runs the bench,
// writes progress to stderr and the result to stdout (a summary, then the JSON line last), and
// returns the exit code.
func TwoPhaseMain(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	return txMain(ctx, twoPhaseMode(), twoPhaseUsage, args, stdout, stderr, getenv)
}
