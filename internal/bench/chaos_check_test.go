package bench

import (
	"context"
	"testing"

	"github.com/stretchr/testify/require"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/pgtest"
)

// TestChaosCheckerCatchesViolations: the campaign's checker reports each kind of violation it
// exists for, on a ledger that really holds them, and nothing on a consistent one.
func TestChaosCheckerCatchesViolations(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	l, err := startLedger(ctx, pgtest.NewDatabase(t), []string{"a", "b", "c"}, chaosBalance, nil)
	require.NoError(t, err)
	t.Cleanup(l.stop)
	insert := func(gid, branch, op, account string, balance int64) {
		_, err := l.pool.Exec(ctx, `INSERT INTO ledger (gid, branch, op, account, balance_delta, frozen_delta, pending_delta)
			VALUES ($1, $2, $3, $4, $5, 0, 0)`, gid, branch, op, account, balance)
		require.NoError(t, err)
		_, err = l.pool.Exec(ctx, `UPDATE accounts SET balance = balance + $2 WHERE id = $1`, account, balance)
		require.NoError(t, err)
	}
	succeeded := func(branches ...string) *treatyv1.Transaction {
		v := &treatyv1.Transaction{Status: treatyv1.Status_STATUS_SUCCEEDED}
		for _, b := range branches {
			v.Branches = append(v.Branches, &treatyv1.Branch{Name: b, Op: "action", Status: treatyv1.BranchStatus_BRANCH_STATUS_SUCCEEDED})
		}
		return v
	}
	run := func(txs []chaosTx, views map[string]*treatyv1.Transaction) ChaosResult {
		r := &chaosRun{ledger: l, accounts: []string{"a", "b", "c"}, txs: txs}
		require.NoError(t, r.check(ctx, views))
		return r.res
	}

	// Consistent: a transfer fully applied, one turned back with nothing left, one never started.
	insert("ok", "credit", "action", "b", 10)
	insert("ok", "debit", "action", "a", -10)
	insert("back", "credit", "action", "b", 5)
	insert("back", "credit", "compensate", "b", -5)
	txs := []chaosTx{{gid: "ok", mode: "saga", from: "a", to: "b", amount: 10}, {gid: "back", mode: "saga", from: "c", to: "b", amount: 5},
		{gid: "never", mode: "saga", from: "a", to: "c", amount: 1}}
	views := map[string]*treatyv1.Transaction{"ok": succeeded("credit", "debit"), "never": nil,
		"back": {Status: treatyv1.Status_STATUS_COMPENSATED, Branches: []*treatyv1.Branch{
			{Name: "credit", Op: "action", Status: treatyv1.BranchStatus_BRANCH_STATUS_SUCCEEDED},
			{Name: "credit", Op: "compensate", Status: treatyv1.BranchStatus_BRANCH_STATUS_SUCCEEDED}}}}
	res := run(txs, views)
	require.Zero(t, res.Violations, "%v", res.ViolationSamples)
	require.Equal(t, 3, res.Transactions)
	require.Equal(t, 1, res.Succeeded)
	require.Equal(t, 1, res.TurnedBack)
	require.Equal(t, 1, res.NeverStarted)

	// Half applied (the debit is missing), applied twice, unknown to the coordinator, money
	// created, a transaction that never ended.
	insert("half", "credit", "action", "c", 7)
	insert("twice", "credit", "action", "b", 3)
	insert("twice", "credit", "action", "b", 3)
	insert("twice", "debit", "action", "a", -3)
	insert("ghost", "credit", "action", "a", 2)
	txs = append(txs, chaosTx{gid: "half", mode: "saga", from: "a", to: "c", amount: 7}, chaosTx{gid: "twice", mode: "saga", from: "a", to: "b", amount: 3},
		chaosTx{gid: "ghost", mode: "saga", from: "c", to: "a", amount: 2}, chaosTx{gid: "stuck", mode: "tcc", from: "a", to: "b", amount: 1})
	views["half"] = succeeded("credit", "debit")
	views["twice"] = succeeded("credit", "debit")
	views["ghost"] = nil
	res = run(txs, views)
	all := ""
	for _, v := range res.ViolationSamples {
		all += v + "\n"
	}
	require.Contains(t, all, "half (saga, STATUS_SUCCEEDED): account a moved {balance:0 frozen:0 pending:0}, want {balance:-7")
	require.Contains(t, all, "twice: credit action applied twice")
	require.Contains(t, all, "ghost: the ledger changed for a transaction the coordinator never had")
	require.Contains(t, all, "money not conserved")
	require.GreaterOrEqual(t, res.Violations, 4)
}
