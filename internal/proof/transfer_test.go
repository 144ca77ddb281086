package proof

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/participant"
)

// The four ways a transfer can run.
const (
	modeTCC  = "tcc"
	modeSaga = "saga"
	mode2PC  = "2pc"
	modeMsg  = "msg"
)

func proofModes() []string { return []string{modeTCC, modeSaga, mode2PC, modeMsg} }

// Sizing: 4 x 500 transfers, 16 at a time, finish in about a minute on two shared cores.
const (
	transfersPerMode = 500
	concurrency      = 16
	crashes          = 8 // spread evenly over the run, alternating between the two coordinators
	accountsPerMode  = 8
	payerBalance     = 100_000
	payeeBalance     = 1_000
	// hugeAmount is more than any paying account ever holds: such a transfer must be refused.
	hugeAmount = 10_000_000
)

// transfer is one money transfer from an account at bank A to one at bank B.
type transfer struct {
	mode     string
	gid      string
	from, to string
	amount   int64
	coord    int // the coordinator the initiator talks to
	// dies: the initiator dies half way. A TCC initiator dies after its tries, before deciding
	// (the coordinator cancels at the timeout); a message initiator dies after its local
	// transaction committed, before submitting (the coordinator asks and delivers).
	dies bool
	// localCommitted: the message's local transaction (the debit at bank A) committed.
	localCommitted bool
	// creditFirst: the saga credits B before it debits A, so a refused debit takes a credit back.
	creditFirst bool
	// decideAfter: the TCC initiator decides only this long after its tries, close to its
	// timeout, so its commit races the coordinator's cancel.
	decideAfter time.Duration
	// localStartsAfter, localHolds: the message's local transaction starts only after the
	// coordinator began asking for it, or is still open when it asks.
	localStartsAfter, localHolds time.Duration

	err     error            // what the initiator was told
	final   *sdk.Transaction // what the coordinator recorded, once terminal; nil when it never heard of gid
	elapsed time.Duration
}

type proofEnv struct {
	a, b    *bank
	cluster *cluster
	clients []*sdk.Client
	// tries: plain connections to the banks, for the TCC initiators that die before deciding
	// and so go around the SDK's scope.
	tryA, tryB *grpc.ClientConn
}

// errInitiatorDied is what an initiator that "dies" half way returns.
var errInitiatorDied = errors.New("the initiator died")

func accountID(mode, side string, i int) string { return fmt.Sprintf("%s-%s%d", mode, side, i) }

// TestMoneyTransfersUnderFaults is issue 4's proof: thousands of transfers between two banks as
// TCC, saga, 2PC and transactional message, all at once, through two coordinators that crash and
// restart, with faults on every kind of call. Afterwards every transaction is terminal, no
// money was created or destroyed, every transfer moved its amount exactly once or not at all,
// and nothing is left frozen, pending or prepared.
func TestMoneyTransfersUnderFaults(t *testing.T) {
	t.Parallel()
	start := time.Now()
	seed := proofSeed(t)
	// Every participant call the coordinators make: about one in six suffers a fault.
	coordFaults := newInjector("coordinator->participants", seed,
		faultRates{Delay: 0.02, Drop: 0.04, Lose: 0.04, Duplicate: 0.04, Unavailable: 0.03})
	// The initiators' calls to the coordinators: idempotent by gid, retried on UNAVAILABLE.
	sdkFaults := newInjector("initiators->coordinators", seed, faultRates{Drop: 0.02, Lose: 0.02, Duplicate: 0.02})
	// TCC tries, which the SDK makes itself on connections without an interceptor hook: the
	// banks inject these faults on their side.
	tries := newInjector("tries at the banks", seed, faultRates{Delay: 0.02, Drop: 0.03, Lose: 0.03, Duplicate: 0.03, Unavailable: 0.02})

	payers, payees := map[string]int64{}, map[string]int64{}
	var closed []string
	for _, m := range proofModes() {
		for i := range accountsPerMode {
			payers[accountID(m, "a", i)] = payerBalance
			payees[accountID(m, "b", i)] = payeeBalance
		}
		closed = append(closed, accountID(m, "closed", 0))
		payees[accountID(m, "closed", 0)] = payeeBalance
	}
	env := &proofEnv{
		a: newBank(t, bankOptions{Name: "A", Accounts: payers, TryFaults: tries}),
		b: newBank(t, bankOptions{Name: "B", Accounts: payees, Closed: closed, TryFaults: tries}),
	}
	env.tryA, env.tryB = dialBank(t, env.a, nil), dialBank(t, env.b, nil)
	env.cluster = newCluster(t, 2, coordFaults)
	env.clients = []*sdk.Client{env.cluster.client(t, 0, sdkFaults), env.cluster.client(t, 1, sdkFaults)}
	t.Cleanup(sdkFaults.Wait)
	checker := env.cluster.client(t, 0, nil)

	// The workload, drawn from the seed: modes interleaved; one transfer in ten too large, and
	// (but for messages, which cannot be refused once sent) one in ten to a closed account;
	// initiators that die, decide late or run their local transaction at a bad moment.
	rng := rand.New(rand.NewPCG(seed, 0x70726f6f66))
	var transfers []*transfer
	for _, m := range proofModes() {
		for range transfersPerMode {
			tr := &transfer{
				mode:   m,
				gid:    m + "-" + sdk.NewGID(),
				from:   accountID(m, "a", rng.IntN(accountsPerMode)),
				to:     accountID(m, "b", rng.IntN(accountsPerMode)),
				amount: 1 + rng.Int64N(500),
				coord:  rng.IntN(2),
			}
			if rng.IntN(10) == 0 {
				tr.amount = hugeAmount
			}
			if m != modeMsg && rng.IntN(10) == 0 {
				tr.to = accountID(m, "closed", 0)
			}
			switch x := rng.IntN(100); {
			case m == modeSaga:
				tr.creditFirst = x < 50
			case m == modeTCC && x < 5:
				tr.dies = true
			case m == modeTCC && x < 9:
				tr.decideAfter = tccLateTimeout - 300*time.Millisecond + time.Duration(rng.Int64N(int64(600*time.Millisecond)))
			case m == modeMsg && x < 5:
				tr.dies = true
			case m == modeMsg && x < 8:
				tr.localStartsAfter = msgTimeout + 500*time.Millisecond
			case m == modeMsg && x < 11:
				tr.localHolds = msgTimeout + 500*time.Millisecond
			}
			transfers = append(transfers, tr)
		}
	}
	rng.Shuffle(len(transfers), func(i, j int) { transfers[i], transfers[j] = transfers[j], transfers[i] })

	// Run them, 16 at a time, while coordinators crash at evenly spaced points of the run.
	var done atomic.Int64
	queue := make(chan *transfer)
	var workers sync.WaitGroup
	for range concurrency {
		workers.Add(1)
		go func() {
			defer workers.Done()
			for tr := range queue {
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				began := time.Now()
				tr.err = env.run(ctx, tr)
				tr.elapsed = time.Since(began)
				cancel()
				done.Add(1)
			}
		}()
	}
	crashErr := make(chan error, 1)
	stopCrashing := make(chan struct{})
	go func() {
		crashErr <- crashDuring(env.cluster, &done, len(transfers), stopCrashing)
	}()
	for _, tr := range transfers {
		queue <- tr
	}
	close(queue)
	workers.Wait()
	close(stopCrashing)
	require.NoError(t, <-crashErr)
	runTime := time.Since(start)

	// Every transaction ends, on its own, as the surviving coordinators tell.
	env.settle(t, checker, transfers)
	coordFaults.Wait()
	tries.Wait()

	env.check(t, transfers, payers, payees)
	// The crashes left work behind that recovery finished.
	taken := env.cluster.takeovers(t)
	t.Logf("transactions taken over after a crash or a lost lease, per mode: %v", taken)
	require.Positive(t, taken[modeSaga]+taken[modeTCC]+taken[mode2PC]+taken[modeMsg], "no transaction was ever taken over")

	// The faults did happen, every kind of them.
	for _, in := range []*injector{coordFaults, tries} {
		t.Log(in.summary())
		for f := faultDelay; f < numFaults; f++ {
			require.Positive(t, in.count(f), "%s never injected %s", in.name, f)
		}
	}
	t.Log(sdkFaults.summary())
	require.Positive(t, sdkFaults.count(faultLose)+sdkFaults.count(faultDuplicate))
	env.cluster.mu.Lock()
	require.Equal(t, crashes, env.cluster.crashes)
	env.cluster.mu.Unlock()
	t.Logf("%d transfers, %d coordinator crashes: run %s, settled and checked after %s",
		len(transfers), crashes, runTime.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
}

// crashDuring crashes a coordinator each time another 1/(crashes+1) of the transfers is done,
// alternating between the two, until all crashes happened or stop closes.
func crashDuring(c *cluster, done *atomic.Int64, total int, stop <-chan struct{}) error {
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for k := 1; k <= crashes; k++ {
		at := int64(total * k / (crashes + 1))
		for done.Load() < at {
			select {
			case <-tick.C:
			case <-stop:
				return fmt.Errorf("the run ended before crash %d of %d (at %d transfers done)", k, crashes, at)
			}
		}
		if err := c.crash(k % 2); err != nil {
			return fmt.Errorf("crash %d: %w", k, err)
		}
	}
	return nil
}

const (
	callTimeout = time.Second
	// msgTimeout is how long the coordinator waits for a message's submit before it asks.
	msgTimeout = 2 * time.Second
	// tccLateTimeout is the timeout of TCC initiators that decide late.
	tccLateTimeout = 1500 * time.Millisecond
	// Backoffs short enough to keep the run brisk.
	initialBackoff = 20 * time.Millisecond
	maxBackoff     = 200 * time.Millisecond
)

// run makes one transfer through the SDK, as an application would.
func (e *proofEnv) run(ctx context.Context, tr *transfer) error {
	c := e.clients[tr.coord]
	from, to := order{Account: tr.from, Amount: tr.amount}, order{Account: tr.to, Amount: tr.amount}
	retry := &sdk.Retry{MaxAttempts: 6, InitialBackoff: initialBackoff, MaxBackoff: maxBackoff}
	const wait = 30 * time.Second
	var err error
	switch tr.mode {
	case modeSaga:
		steps := []sdk.Step{
			{Name: "debit", Action: e.a.call(methodDebit, from), Compensate: e.a.call(methodRefund, from), Retry: retry, CallTimeout: callTimeout},
			{Name: "credit", Action: e.b.call(methodCredit, to), Compensate: e.b.call(methodUncredit, to), Retry: retry, CallTimeout: callTimeout},
		}
		if tr.creditFirst {
			steps[0], steps[1] = steps[1], steps[0]
		}
		_, err = c.Saga(ctx, sdk.Saga{GID: tr.gid, Wait: wait, Steps: steps})
	case modeTCC:
		if tr.dies {
			return e.tccInitiatorDies(ctx, c, tr, from, to, retry)
		}
		timeout := 5 * time.Second
		if tr.decideAfter > 0 {
			timeout = tccLateTimeout
		}
		_, err = c.TCC(ctx, sdk.TCCOptions{GID: tr.gid, Timeout: timeout, Wait: wait}, func(ctx context.Context, s *sdk.TCCScope) error {
			if _, err := s.Try(ctx, sdk.TCCBranch{Name: "payer", Try: e.a.call(methodFreeze, from), Confirm: e.a.call(methodSpendFrozen, from),
				Cancel: e.a.call(methodUnfreeze, from), Retry: retry, CallTimeout: callTimeout}); err != nil {
				return err
			}
			if _, err := s.Try(ctx, sdk.TCCBranch{Name: "payee", Try: e.b.call(methodExpect, to), Confirm: e.b.call(methodReceive, to),
				Cancel: e.b.call(methodUnexpect, to), Retry: retry, CallTimeout: callTimeout}); err != nil {
				return err
			}
			return sleepCtx(ctx, tr.decideAfter)
		})
	case mode2PC:
		_, err = c.TwoPhase(ctx, sdk.TwoPhase{GID: tr.gid, Timeout: 5 * time.Second, Wait: wait, Branches: []sdk.TwoPhaseBranch{
			{Name: "payer", Prepare: e.a.call(methodPrepareDebit, from), Commit: e.a.call(methodCommit, from),
				Rollback: e.a.call(methodRollback, from), Retry: retry, CallTimeout: callTimeout},
			{Name: "payee", Prepare: e.b.call(methodPrepareCredit, to), Commit: e.b.call(methodCommit, to),
				Rollback: e.b.call(methodRollback, to), Retry: retry, CallTimeout: callTimeout},
		}})
	case modeMsg:
		_, err = c.Message(ctx, sdk.Message{
			GID: tr.gid, Timeout: msgTimeout, Wait: wait,
			QueryPrepared: sdk.Call{Target: "grpc://" + e.a.addr + methodQueryPrepared},
			Deliveries:    []sdk.Delivery{{Name: "credit", Call: e.b.call(methodDeliver, to), Retry: retry, CallTimeout: callTimeout}},
		}, func(ctx context.Context, gid string) error {
			if err := sleepCtx(ctx, tr.localStartsAfter); err != nil {
				return err
			}
			if err := e.a.localDebit(ctx, gid, from, tr.localHolds); err != nil {
				return err
			}
			tr.localCommitted = true
			if tr.dies {
				return errInitiatorDied // after the commit, before the submit
			}
			return nil
		})
	default:
		err = fmt.Errorf("unknown mode %q", tr.mode)
	}
	return err
}

// tccInitiatorDies begins a TCC transaction, registers and tries both branches the way the SDK
// does, and then dies without deciding. It uses the raw API, since the SDK's scope always
// decides.
func (e *proofEnv) tccInitiatorDies(ctx context.Context, c *sdk.Client, tr *transfer, from, to order, retry *sdk.Retry) error {
	api := c.API()
	if _, err := api.BeginTCC(ctx, &treatyv1.BeginTCCRequest{Gid: tr.gid, Timeout: durationpb.New(2 * time.Second)}); err != nil {
		return err
	}
	for _, br := range []struct {
		name                 string
		conn                 *grpc.ClientConn
		try, confirm, cancel string
		bank                 *bank
		o                    order
	}{
		{"payer", e.tryA, methodFreeze, methodSpendFrozen, methodUnfreeze, e.a, from},
		{"payee", e.tryB, methodExpect, methodReceive, methodUnexpect, e.b, to},
	} {
		confirm, cancel := br.bank.call(br.confirm, br.o), br.bank.call(br.cancel, br.o)
		_, err := api.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: tr.gid, Branch: &treatyv1.TCCBranch{
			Name:    br.name,
			Confirm: &treatyv1.Call{Target: confirm.Target, Payload: confirm.Payload},
			Cancel:  &treatyv1.Call{Target: cancel.Target, Payload: cancel.Payload},
			Retry:   &treatyv1.RetryPolicy{InitialBackoff: durationpb.New(retry.InitialBackoff), MaxBackoff: durationpb.New(retry.MaxBackoff)},
		}})
		if err != nil {
			return err
		}
		tctx, cancelTry := context.WithTimeout(ctx, callTimeout)
		err = callBank(tctx, br.conn, br.try, participant.Metadata{GID: tr.gid, Branch: br.name, Op: participant.OpTry, Mode: participant.ModeTCC}, br.o)
		cancelTry()
		if err != nil {
			return err
		}
	}
	return errInitiatorDied
}

// settle waits, through a client without faults, until every transaction is terminal.
func (e *proofEnv) settle(t *testing.T, checker *sdk.Client, transfers []*transfer) {
	t.Helper()
	queue := make(chan *transfer)
	errs := make(chan error, len(transfers))
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for tr := range queue {
				tx, err := checker.Wait(context.Background(), tr.gid, time.Minute)
				switch {
				case errors.Is(err, sdk.ErrNotFound):
					// Never created: the initiator's first call never got through.
				case err != nil:
					errs <- fmt.Errorf("%s %s: %w", tr.mode, tr.gid, err)
				default:
					tr.final = tx
				}
			}
		}()
	}
	for _, tr := range transfers {
		queue <- tr
	}
	close(queue)
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	require.NoError(t, errors.Join(all...), "transactions not terminal")
}

// check asserts the invariants.
func (e *proofEnv) check(t *testing.T, transfers []*transfer, payers, payees map[string]int64) {
	t.Helper()
	accA, accB := e.a.accounts(t), e.b.accounts(t)
	ledA, ledB := e.a.ledger(t), e.b.ledger(t)

	// Nothing prepared, frozen or pending; no balance below zero (the CHECKs forbid it too).
	require.Empty(t, e.a.prepared(t), "prepared transactions left at bank A")
	require.Empty(t, e.b.prepared(t), "prepared transactions left at bank B")
	for name, accs := range map[string]map[string]account{"A": accA, "B": accB} {
		for id, acc := range accs {
			require.GreaterOrEqual(t, acc.Balance, int64(0), "bank %s account %s", name, id)
			require.Zero(t, acc.Frozen, "bank %s account %s: money left frozen", name, id)
			require.Zero(t, acc.Pending, "bank %s account %s: money left pending", name, id)
		}
	}
	require.Zero(t, e.a.wrongCalls.Load(), "calls with the wrong Treaty metadata at bank A")
	require.Zero(t, e.b.wrongCalls.Load(), "calls with the wrong Treaty metadata at bank B")

	type tally struct {
		succeeded, rolledBack, never, refusedHuge, refusedClosed, died int
		late                                                           map[bool]int // late TCC deciders by outcome
		slowest                                                        time.Duration
		moved                                                          int64 // the amounts of the transfers that succeeded
		initiatorErrors                                                map[string]int
	}
	tallies := map[string]*tally{}
	for _, m := range proofModes() {
		tallies[m] = &tally{initiatorErrors: map[string]int{}, late: map[bool]int{}}
	}
	for _, tr := range transfers {
		ty := tallies[tr.mode]
		ty.slowest = max(ty.slowest, tr.elapsed)
		if tr.err != nil {
			ty.initiatorErrors[errorKind(tr.err)]++
		}
		succeeded := false
		switch {
		case tr.final == nil:
			ty.never++
		case tr.final.Status == sdk.StatusSucceeded:
			succeeded = true
			ty.succeeded++
			ty.moved += tr.amount
		case tr.final.Status == sdk.StatusCompensated:
			ty.rolledBack++
		default:
			require.Failf(t, "transaction not settled without an operator", "%s %s: %s (%s): %s\n%s",
				tr.mode, tr.gid, tr.final.Phase, tr.final.Reason, tr.final.Status, history(tr.final))
		}
		// The initiator was told the truth when it was told anything definite.
		if tr.err == nil {
			require.True(t, succeeded, "%s %s: the initiator was told it succeeded, the coordinator says %s\n%s",
				tr.mode, tr.gid, phase(tr.final), history(tr.final))
		}
		if errors.Is(tr.err, sdk.ErrAborted) {
			require.False(t, succeeded, "%s %s: the initiator was told it was rolled back, yet it succeeded: %v", tr.mode, tr.gid, tr.err)
		}
		if tr.amount == hugeAmount {
			require.False(t, succeeded, "%s %s: a transfer of %d succeeded", tr.mode, tr.gid, tr.amount)
			ty.refusedHuge++
		}
		if strings.Contains(tr.to, "closed") {
			require.False(t, succeeded, "%s %s: credited a closed account", tr.mode, tr.gid)
			ty.refusedClosed++
		}
		if errors.Is(tr.err, sdk.ErrFailedPrecondition) {
			require.False(t, succeeded, "%s %s: the initiator's decision was refused, yet it succeeded: %v", tr.mode, tr.gid, tr.err)
		}
		if tr.decideAfter > 0 {
			ty.late[succeeded]++
		}
		if tr.dies {
			ty.died++
			if tr.mode == modeTCC {
				require.False(t, succeeded, "%s %s: confirmed though its initiator never decided\n%s", tr.mode, tr.gid, history(tr.final))
			}
		}
		// A message is delivered if and only if its local transaction committed.
		if tr.mode == modeMsg {
			require.Equal(t, tr.localCommitted, succeeded, "%s %s: local transaction committed: %v, delivered: %v (initiator: %v)\n%s",
				tr.mode, tr.gid, tr.localCommitted, succeeded, tr.err, history(tr.final))
		}
		// Exactly once or not at all, on each side; nothing left in between; no change twice.
		want := int64(0)
		if succeeded {
			want = tr.amount
		}
		for _, side := range []struct {
			name string
			rows []ledgerRow
			want int64
		}{{"A", ledA[tr.gid], -want}, {"B", ledB[tr.gid], want}} {
			var bal, frozen, pending int64
			seen := map[string]bool{}
			for _, r := range side.rows {
				bal, frozen, pending = bal+r.Balance, frozen+r.Frozen, pending+r.Pending
				k := r.Branch + "/" + r.Op
				require.False(t, seen[k], "%s %s: bank %s applied %s twice: %+v", tr.mode, tr.gid, side.name, k, side.rows)
				seen[k] = true
			}
			require.Equal(t, side.want, bal, "%s %s (%s, amount %d): bank %s balance moved by %d: %+v\n%s",
				tr.mode, tr.gid, phase(tr.final), tr.amount, side.name, bal, side.rows, history(tr.final))
			require.Zero(t, frozen, "%s %s: bank %s left %d frozen: %+v", tr.mode, tr.gid, side.name, frozen, side.rows)
			require.Zero(t, pending, "%s %s: bank %s left %d pending: %+v", tr.mode, tr.gid, side.name, pending, side.rows)
		}
	}

	// The undo paths ran, with effect: refunds and taken-back credits (sagas), released
	// reservations on both sides (TCC).
	effects := map[string]int{}
	for bankName, led := range map[string]map[string][]ledgerRow{"A": ledA, "B": ledB} {
		for _, rows := range led {
			for _, r := range rows {
				effects[bankName+" "+r.Mode+" "+r.Op]++
			}
		}
	}
	t.Logf("business changes by bank, mode and operation: %v", effects)
	for _, k := range []string{"A saga compensate", "B saga compensate", "A tcc cancel", "B tcc cancel"} {
		require.Positive(t, effects[k], "no %s changed anything: the undo path went untested", k)
	}

	// Per mode, and so in total: the money that left A is the money that reached B, which is
	// the sum of the successful transfers' amounts.
	for _, m := range proofModes() {
		var lossA, gainB int64
		for id, initial := range payers {
			if strings.HasPrefix(id, m+"-") {
				lossA += initial - accA[id].Balance
			}
		}
		for id, initial := range payees {
			if strings.HasPrefix(id, m+"-") {
				gainB += accB[id].Balance - initial
			}
		}
		ty := tallies[m]
		require.Equal(t, ty.moved, lossA, "%s: bank A lost %d, successful transfers total %d", m, lossA, ty.moved)
		require.Equal(t, ty.moved, gainB, "%s: bank B gained %d, successful transfers total %d", m, gainB, ty.moved)
		require.Positive(t, ty.succeeded, "%s: no transfer succeeded", m)
		require.Positive(t, ty.refusedHuge, "%s: no transfer was refused", m)
		t.Logf("%-4s: %d succeeded (%d moved), %d rolled back (%d too large, %d to a closed account), %d never reached a coordinator, "+
			"%d initiators died, late deciders confirmed/cancelled %d/%d; initiator errors %v; slowest initiator %s",
			m, ty.succeeded, ty.moved, ty.rolledBack, ty.refusedHuge, ty.refusedClosed, ty.never, ty.died, ty.late[true], ty.late[false],
			ty.initiatorErrors, ty.slowest.Round(time.Millisecond))
	}
	var total, initial int64
	for id, acc := range accA {
		total += acc.Balance
		initial += payers[id]
	}
	for id, acc := range accB {
		total += acc.Balance
		initial += payees[id]
	}
	require.Equal(t, initial, total, "money was created or destroyed")
}

// errorKind names an initiator error for the tally.
func errorKind(err error) string {
	for _, k := range []struct {
		name string
		err  error
	}{
		{"aborted", sdk.ErrAborted}, {"failed-precondition", sdk.ErrFailedPrecondition},
		{"unavailable", sdk.ErrUnavailable}, {"timeout", sdk.ErrTimeout}, {"needs-operator", sdk.ErrNeedsOperator},
		{"deadline", context.DeadlineExceeded},
	} {
		if errors.Is(err, k.err) {
			return k.name
		}
	}
	if errors.Is(err, errInitiatorDied) {
		return "died"
	}
	if strings.Contains(err.Error(), "local transaction failed") {
		return "local-failed"
	}
	return "other"
}

func phase(tx *sdk.Transaction) string {
	if tx == nil {
		return "never created"
	}
	return tx.Phase
}

// history renders a transaction's events, for failure messages.
func history(tx *sdk.Transaction) string {
	if tx == nil || tx.Raw == nil {
		return "(no history)"
	}
	var b strings.Builder
	evs := tx.Raw.Events
	sort.SliceStable(evs, func(i, j int) bool { return evs[i].Id < evs[j].Id })
	for _, e := range evs {
		fmt.Fprintf(&b, "  %s %s %s %s %s\n", e.At.AsTime().Format("15:04:05.000"), e.Kind, e.Op, e.Branch, e.Detail)
	}
	return b.String()
}
