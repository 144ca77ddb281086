package proof

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/sdk"
)

// TestSagaCannotTakeBackSpentMoney: a saga credits B first, the money is spent at B, and then A
// refuses the debit. Taking the credit back would drive B's balance below zero, which its CHECK
// forbids and which no saga may paper over: the compensation answers FAILED_PRECONDITION, the
// coordinator retries it up to the operator threshold, and the saga waits for an operator with
// every balance intact.
func TestSagaCannotTakeBackSpentMoney(t *testing.T) {
	t.Parallel()
	const amount = 100
	// Alice's bank answers late, so Bob's bank holds the money a while before the refusal.
	a := newBank(t, bankOptions{Name: "A", Accounts: map[string]int64{"alice": 10}, Delays: map[string]time.Duration{methodDebit: 500 * time.Millisecond}})
	b := newBank(t, bankOptions{Name: "B", Accounts: map[string]int64{"bob": 0}})
	c := newCluster(t, 1, newInjector("no faults", 1, faultRates{})).client(t, 0, nil)

	gid := "spent-" + sdk.NewGID()
	from, to := order{Account: "alice", Amount: amount}, order{Account: "bob", Amount: amount}
	retry := &sdk.Retry{InitialBackoff: 10 * time.Millisecond, MaxBackoff: 50 * time.Millisecond}
	type outcome struct {
		tx  *sdk.Transaction
		err error
	}
	done := make(chan outcome, 1)
	go func() {
		tx, err := c.Saga(context.Background(), sdk.Saga{GID: gid, Wait: 30 * time.Second, Steps: []sdk.Step{
			{Name: "credit", Action: b.call(methodCredit, to), Compensate: b.call(methodUncredit, to), Retry: retry},
			{Name: "debit", Action: a.call(methodDebit, from), Compensate: a.call(methodRefund, from), Retry: retry},
		}})
		done <- outcome{tx, err}
	}()
	// Bob spends the money as soon as it arrives.
	require.Eventually(t, func() bool { return b.applied(gid) == 1 }, 30*time.Second, 10*time.Millisecond)
	_, err := b.pool.Exec(context.Background(), "UPDATE accounts SET balance = balance - $1 WHERE id = 'bob'", amount)
	require.NoError(t, err)

	got := <-done
	require.ErrorIs(t, got.err, sdk.ErrNeedsOperator)
	require.Equal(t, sdk.StatusNeedsOperator, got.tx.Status, "%s", history(got.tx))
	var uncredit string
	for _, br := range got.tx.Raw.Branches {
		if br.Name == "credit" && br.Op == "compensate" {
			uncredit = br.LastError
		}
	}
	require.Contains(t, uncredit, "FailedPrecondition", "%s", history(got.tx))
	require.Contains(t, uncredit, "an operator must look")
	require.Equal(t, map[string]account{"alice": {Balance: 10}}, a.accounts(t), "the refused debit changed nothing")
	require.Equal(t, map[string]account{"bob": {}}, b.accounts(t), "the balance stays at zero, not below")
	require.EqualValues(t, 1, b.applied(gid), "the credit was applied, the taking back was not")
}
