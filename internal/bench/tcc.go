package bench

import (
	"context"
	"fmt"
	"io"

	"github.com/treatyhq/treaty/internal/testparticipant"
	"github.com/treatyhq/treaty/sdk"
)

// tccMode runs each transaction the way an application does with the SDK: client.TCC begins it,
// the function registers each branch and calls its try on the participant itself
// (TCCScope.Try), one branch after another, and returning nil commits and waits until every
// branch is confirmed. Per transaction that is 2 + N coordinator calls (BeginTCC, N
// RegisterTCCBranch, CommitTCC) and N try calls, all in sequence, plus the N confirms the
// coordinator makes.
func tccMode() txMode {
	return txMode{name: "tcc", build: func(parts []*testparticipant.Participant, n int) txOp {
		branches := make([]sdk.TCCBranch, n)
		for i := range branches {
			p := parts[i%len(parts)]
			name := fmt.Sprintf("branch%d", i+1)
			branches[i] = sdk.TCCBranch{
				Name:    name,
				Try:     sdk.Call{Target: p.Target("bench.Branch/Try"), Payload: []byte("try " + name)},
				Confirm: sdk.Call{Target: p.Target("bench.Branch/Confirm"), Payload: []byte("confirm " + name)},
				Cancel:  sdk.Call{Target: p.Target("bench.Branch/Cancel"), Payload: []byte("cancel " + name)},
			}
		}
		return func(ctx context.Context, c *sdk.Client) error {
			tx, err := c.TCC(ctx, sdk.TCCOptions{}, func(ctx context.Context, s *sdk.TCCScope) error {
				for _, b := range branches {
					if _, err := s.Try(ctx, b); err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				return err
			}
			if tx.Status != sdk.StatusSucceeded {
				return fmt.Errorf("TCC %s ended %s (%s): %s", tx.GID, tx.Status, tx.Phase, tx.Reason)
			}
			return nil
		}
	}}
}

// RunTCC runs the TCC benchmark: the commit ceiling first, then a coordinator (in process unless
// cfg.Coordinator is set) serving cfg.Concurrency SDK clients that each run a TCC transaction
// of cfg.Branches no-op branches to its confirmation, then the next, for cfg.Duration after a
// warm-up. It returns the result even when some transactions failed (then with an error too).
func RunTCC(ctx context.Context, cfg TxConfig) (TxResult, error) {
	return runTx(ctx, cfg, tccMode())
}

const tccUsage = `treaty-bench tcc: throughput and latency of TCC transactions against the PostgreSQL ceiling.

Starts no-op gRPC participants and a coordinator in process (or uses --coordinator), measures the
server's raw commit rate (one-row autocommit INSERTs at --concurrency connections), then runs
--concurrency clients that each run a TCC transaction through the Go SDK, over and over, for
--duration after --warmup: client.TCC begins it, TCCScope.Try registers each of the --branches
branches with the coordinator and calls its try on the participant directly, and the commit
waits until the coordinator has confirmed every branch. Everything happens in a database created
for the run (treaty_bench_<random>) and dropped afterwards unless --keep.

The last line of the output is one JSON object: txns_per_sec, p50_ms, p99_ms, pg_commits_per_sec,
commits_per_txn (pg_stat_database.xact_commit delta / transactions; read-only ones count too),
ratio = txns_per_sec * commits_per_txn / pg_commits_per_sec, and more.

Example:
  treaty-bench tcc --branches 2 --concurrency 32 --duration 20s --db postgres://postgres@127.0.0.1:5432/postgres

Flags:`

// TCCMain is `treaty-bench tcc`: it parses args (without the command name), runs the bench,
// writes progress to stderr and the result to stdout (a summary, then the JSON line last), and
// returns the exit code.
func TCCMain(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	return txMain(ctx, tccMode(), tccUsage, args, stdout, stderr, getenv)
}
