package proof

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/pkg/rawcodec"
	"github.com/treatyhq/treaty/sdk"
	"github.com/treatyhq/treaty/sdk/participant"
)

// The bank's gRPC methods, served without generated code through an unknown-service handler.
// Every bank serves all of them; transfers pay from bank A and receive at bank B.
const (
	methodDebit         = "/proof.Bank/Debit"         // saga action (A): balance -= amount, refused without funds
	methodRefund        = "/proof.Bank/Refund"        // saga compensate of Debit: balance += amount
	methodCredit        = "/proof.Bank/Credit"        // saga action (B): balance += amount, refused by a closed account
	methodUncredit      = "/proof.Bank/Uncredit"      // saga compensate of Credit: balance -= amount, never below zero
	methodFreeze        = "/proof.Bank/Freeze"        // TCC try (A): balance -> frozen, refused without funds
	methodSpendFrozen   = "/proof.Bank/SpendFrozen"   // TCC confirm (A): frozen -= amount
	methodUnfreeze      = "/proof.Bank/Unfreeze"      // TCC cancel (A): frozen -> balance
	methodExpect        = "/proof.Bank/Expect"        // TCC try (B): pending += amount, refused by a closed account
	methodReceive       = "/proof.Bank/Receive"       // TCC confirm (B): pending -> balance
	methodUnexpect      = "/proof.Bank/Unexpect"      // TCC cancel (B): pending -= amount
	methodPrepareDebit  = "/proof.Bank/PrepareDebit"  // 2PC prepare (A): a prepared debit, refused without funds
	methodPrepareCredit = "/proof.Bank/PrepareCredit" // 2PC prepare (B): a prepared credit, refused by a closed account
	methodCommit        = "/proof.Bank/Commit"        // 2PC commit: COMMIT PREPARED
	methodRollback      = "/proof.Bank/Rollback"      // 2PC rollback: ROLLBACK PREPARED
	methodQueryPrepared = "/proof.Bank/QueryPrepared" // message (A): did the local debit commit?
	methodDeliver       = "/proof.Bank/Deliver"       // message delivery (B): balance += amount
)

const bankSchema = `
CREATE TABLE accounts (
    id      text PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0),
    -- TCC, paying side: money reserved by a try, waiting for its confirm or cancel.
    frozen  bigint NOT NULL DEFAULT 0 CHECK (frozen >= 0),
    -- TCC, receiving side: money announced by a try, waiting for its confirm or cancel.
    pending bigint NOT NULL DEFAULT 0 CHECK (pending >= 0),
    -- A closed account takes no more money: credits to it are refused.
    closed  boolean NOT NULL DEFAULT false
);
-- One row per business change, written in the same local transaction, so the test can check
-- per transfer that it moved its amount exactly once or not at all.
CREATE TABLE ledger (
    id            bigserial PRIMARY KEY,
    gid           text   NOT NULL,
    mode          text   NOT NULL,
    branch        text   NOT NULL,
    op            text   NOT NULL,
    account       text   NOT NULL,
    balance_delta bigint NOT NULL,
    frozen_delta  bigint NOT NULL,
    pending_delta bigint NOT NULL
);
CREATE INDEX ledger_gid ON ledger (gid);
`

// order is a participant call's request: which account, how much. It travels as a
// google.protobuf.Struct, so the bank needs no generated code of its own.
type order struct {
	Account string
	Amount  int64
}

func (o order) payload() []byte {
	s, err := structpb.NewStruct(map[string]any{"account": o.Account, "amount": o.Amount})
	if err != nil {
		panic(err) // a string and an int64 always convert
	}
	b, err := proto.Marshal(s)
	if err != nil {
		panic(err)
	}
	return b
}

func decodeOrder(b []byte) (order, error) {
	var s structpb.Struct
	if err := proto.Unmarshal(b, &s); err != nil {
		return order{}, fmt.Errorf("payload is not a google.protobuf.Struct: %w", err)
	}
	o := order{Account: s.Fields["account"].GetStringValue()}
	amount := s.Fields["amount"].GetNumberValue()
	o.Amount = int64(amount)
	if o.Account == "" {
		return o, errors.New("payload field account is empty")
	}
	if float64(o.Amount) != amount || o.Amount <= 0 {
		return o, fmt.Errorf("payload field amount is %v, want a positive integer", amount)
	}
	return o, nil
}

// change is what one operation does to an account, per unit of the amount.
type change struct{ balance, frozen, pending int64 }

func (c change) times(n int64) change { return change{c.balance * n, c.frozen * n, c.pending * n} }

type bankOptions struct {
	Name     string
	Accounts map[string]int64
	// Closed lists accounts (of Accounts) that refuse credits.
	Closed []string
	// TryFaults, when set, injects faults into TCC tries on the server side: the SDK calls tries
	// itself, on connections it dials without a hook for interceptors.
	TryFaults *injector
	// Delays holds every call of a method this long before its handler runs, so a test can
	// order what happens at two banks.
	Delays map[string]time.Duration
}

// bank is a participant: a gRPC server on 127.0.0.1 over its own PostgreSQL database, with the
// barrier table. Every handler runs its business change through the barrier, so duplicates,
// empty compensations and late tries are harmless.
type bank struct {
	opts    bankOptions
	name    string
	url     string
	pool    *pgxpool.Pool
	barrier *participant.Barrier
	tp      *participant.TwoPhase

	srv    *grpc.Server
	addr   string
	served chan struct{}

	// wrongCalls counts calls whose Treaty metadata did not match the method: a coordinator
	// sending the wrong op or mode would show here.
	wrongCalls atomic.Int64
	mu         sync.Mutex
	handledBy  map[string]int64 // gid -> handler runs
}

func newBank(t *testing.T, opts bankOptions) *bank {
	t.Helper()
	ctx := context.Background()
	b := &bank{opts: opts, name: opts.Name, url: pgtest.NewDatabase(t), handledBy: map[string]int64{}}
	var err error
	b.barrier, err = participant.NewBarrier(participant.BarrierOptions{})
	require.NoError(t, err)
	b.tp, err = participant.NewTwoPhase(participant.TwoPhaseOptions{})
	require.NoError(t, err)
	require.NoError(t, b.open(ctx))
	require.NoError(t, b.tp.CheckServer(ctx, b.pool))
	require.NoError(t, b.barrier.EnsureTable(ctx, b.pool))
	_, err = b.pool.Exec(ctx, bankSchema)
	require.NoError(t, err)
	for id, balance := range opts.Accounts {
		_, err := b.pool.Exec(ctx, "INSERT INTO accounts (id, balance, closed) VALUES ($1, $2, $3)", id, balance, slices.Contains(opts.Closed, id))
		require.NoError(t, err)
	}
	require.NoError(t, b.serve("127.0.0.1:0"))
	t.Cleanup(func() {
		b.stopServing()
		if opts.TryFaults != nil {
			opts.TryFaults.Wait()
		}
		// A prepared transaction left behind (the test failed before its checks passed) would
		// keep this database from being dropped and hold one of the server's slots: roll back.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		left, err := b.tp.InDoubt(ctx, b.pool)
		if err == nil && len(left) > 0 {
			t.Logf("bank %s: rolling back %d prepared transactions left behind", b.name, len(left))
			_ = b.tp.Resolve(ctx, b.pool, func(context.Context, string, string) (bool, error) { return false, nil })
		}
		b.pool.Close()
	})
	return b
}

func (b *bank) open(ctx context.Context) error {
	cfg, err := pgxpool.ParseConfig(b.url)
	if err != nil {
		return err
	}
	cfg.MaxConns = 12
	b.pool, err = pgxpool.NewWithConfig(ctx, cfg)
	return err
}

func (b *bank) serve(addr string) error {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("bank %s: listen %s: %w", b.name, addr, err)
	}
	b.addr = lis.Addr().String()
	b.srv = grpc.NewServer(
		grpc.UnknownServiceHandler(b.handle),
		grpc.ForceServerCodecV2(rawcodec.Codec{}),
		// The unknown-service handler runs behind stream interceptors, so the participant's
		// interceptor reads (and validates) the Treaty metadata as for any generated service.
		grpc.ChainStreamInterceptor(participant.StreamServerInterceptor()),
		// Stop waits for running handlers, so the pool is never closed under one.
		grpc.WaitForHandlers(true),
	)
	b.served = make(chan struct{})
	srv, served := b.srv, b.served
	go func() {
		defer close(served)
		_ = srv.Serve(lis)
	}()
	return nil
}

func (b *bank) stopServing() {
	b.srv.Stop()
	<-b.served
}

// call builds the sdk.Call of one of this bank's methods.
func (b *bank) call(method string, o order) sdk.Call {
	return sdk.Call{Target: "grpc://" + b.addr + method, Payload: o.payload()}
}

// endpoint is one method: the Treaty metadata it must be called with, and what it does.
type endpoint struct {
	mode, op  string
	noPayload bool
	run       func(ctx context.Context, md participant.Metadata, o order) error
}

func (b *bank) endpoint(method string) (endpoint, bool) {
	// A forward operation refuses what it cannot do (pay without the funds, credit a closed
	// account): the participant's business "no".
	refuse := func(md participant.Metadata, o order, why string) error {
		return fmt.Errorf("%w: bank %s: account %q refuses %s of %d: %s", participant.ErrAborted, b.name, o.Account, md.Op, o.Amount, why)
	}
	// Confirm and undo operations cannot refuse; if one could not apply its change (which a
	// correct run never sees), the coordinator retries and finally asks an operator.
	stuck := func(md participant.Metadata, o order, why string) error {
		return status.Errorf(codes.FailedPrecondition, "bank %s: %s of %d on account %q cannot apply: %s; an operator must look",
			b.name, md, o.Amount, o.Account, why)
	}
	barrier := func(c change, short func(participant.Metadata, order, string) error) func(context.Context, participant.Metadata, order) error {
		return func(ctx context.Context, md participant.Metadata, o order) error {
			return b.barrier.CallPgxDB(ctx, b.pool, md, func(ctx context.Context, tx pgx.Tx) error {
				return b.apply(ctx, tx, md, o, c.times(o.Amount), short)
			})
		}
	}
	prepare := func(c change, short func(participant.Metadata, order, string) error) func(context.Context, participant.Metadata, order) error {
		return func(ctx context.Context, md participant.Metadata, o order) error {
			return b.tp.Prepare(ctx, b.pool, md, func(ctx context.Context, tx pgx.Tx) error {
				return b.apply(ctx, tx, md, o, c.times(o.Amount), short)
			})
		}
	}
	const saga, tcc, twopc, msg = participant.ModeSaga, participant.ModeTCC, participant.Mode2PC, participant.ModeMsg
	switch method {
	case methodDebit:
		return endpoint{mode: saga, op: participant.OpAction, run: barrier(change{balance: -1}, refuse)}, true
	case methodRefund:
		return endpoint{mode: saga, op: participant.OpCompensate, run: barrier(change{balance: 1}, stuck)}, true
	case methodCredit:
		return endpoint{mode: saga, op: participant.OpAction, run: barrier(change{balance: 1}, refuse)}, true
	case methodUncredit:
		// Taking back a credit whose money was spent meanwhile would break CHECK (balance >= 0):
		// that is not a business "no" the saga could act on, it needs a person.
		return endpoint{mode: saga, op: participant.OpCompensate, run: barrier(change{balance: -1}, stuck)}, true
	case methodFreeze:
		return endpoint{mode: tcc, op: participant.OpTry, run: barrier(change{balance: -1, frozen: 1}, refuse)}, true
	case methodSpendFrozen:
		return endpoint{mode: tcc, op: participant.OpConfirm, run: barrier(change{frozen: -1}, stuck)}, true
	case methodUnfreeze:
		return endpoint{mode: tcc, op: participant.OpCancel, run: barrier(change{balance: 1, frozen: -1}, stuck)}, true
	case methodExpect:
		return endpoint{mode: tcc, op: participant.OpTry, run: barrier(change{pending: 1}, refuse)}, true
	case methodReceive:
		return endpoint{mode: tcc, op: participant.OpConfirm, run: barrier(change{balance: 1, pending: -1}, stuck)}, true
	case methodUnexpect:
		return endpoint{mode: tcc, op: participant.OpCancel, run: barrier(change{pending: -1}, stuck)}, true
	case methodPrepareDebit:
		return endpoint{mode: twopc, op: participant.OpPrepare, run: prepare(change{balance: -1}, refuse)}, true
	case methodPrepareCredit:
		return endpoint{mode: twopc, op: participant.OpPrepare, run: prepare(change{balance: 1}, refuse)}, true
	case methodCommit:
		return endpoint{mode: twopc, op: participant.OpCommit, noPayload: true, run: func(ctx context.Context, md participant.Metadata, _ order) error {
			return b.tp.Commit(ctx, b.pool, md)
		}}, true
	case methodRollback:
		return endpoint{mode: twopc, op: participant.OpRollback, noPayload: true, run: func(ctx context.Context, md participant.Metadata, _ order) error {
			return b.tp.Rollback(ctx, b.pool, md)
		}}, true
	case methodQueryPrepared:
		return endpoint{mode: msg, op: participant.OpQueryPrepared, noPayload: true, run: func(ctx context.Context, md participant.Metadata, _ order) error {
			return b.barrier.QueryPrepared(ctx, b.pool, md.GID)
		}}, true
	case methodDeliver:
		return endpoint{mode: msg, op: "deliver", run: barrier(change{balance: 1}, stuck)}, true
	}
	return endpoint{}, false
}

// localDebit is the paying application's local transaction of a transactional message: the
// debit and the message's barrier row commit together, or neither does. hold keeps the
// transaction open that long after the debit, before it commits.
func (b *bank) localDebit(ctx context.Context, gid string, o order, hold time.Duration) error {
	md := participant.MsgMetadata(gid)
	return b.barrier.CallPgxDB(ctx, b.pool, md, func(ctx context.Context, tx pgx.Tx) error {
		err := b.apply(ctx, tx, md, o, change{balance: -1}.times(o.Amount), func(md participant.Metadata, o order, why string) error {
			return fmt.Errorf("%w: bank %s: account %q cannot pay %d: %s", participant.ErrAborted, b.name, o.Account, o.Amount, why)
		})
		if err != nil || hold <= 0 {
			return err
		}
		return sleepCtx(ctx, hold)
	})
}

// sleepCtx waits d or until ctx ends: the tests' way of being slow on purpose.
func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// apply changes one account and writes the ledger row, in tx. A change that would break a
// CHECK, or add money to a closed account, changes nothing and returns short's error.
func (b *bank) apply(ctx context.Context, tx pgx.Tx, md participant.Metadata, o order, c change, short func(participant.Metadata, order, string) error) error {
	tag, err := tx.Exec(ctx, `UPDATE accounts SET balance = balance + $2, frozen = frozen + $3, pending = pending + $4
		WHERE id = $1 AND balance + $2 >= 0 AND frozen + $3 >= 0 AND pending + $4 >= 0
		  AND NOT (closed AND ($2 > 0 OR $4 > 0))`, o.Account, c.balance, c.frozen, c.pending)
	if err != nil {
		return fmt.Errorf("bank %s: update account %q: %w", b.name, o.Account, err)
	}
	if tag.RowsAffected() == 0 {
		var bal, frozen, pending int64
		var closed bool
		err := tx.QueryRow(ctx, "SELECT balance, frozen, pending, closed FROM accounts WHERE id = $1", o.Account).Scan(&bal, &frozen, &pending, &closed)
		if errors.Is(err, pgx.ErrNoRows) {
			return status.Errorf(codes.NotFound, "bank %s: no account %q", b.name, o.Account)
		}
		if err != nil {
			return fmt.Errorf("bank %s: read account %q: %w", b.name, o.Account, err)
		}
		return short(md, o, fmt.Sprintf("balance %d, frozen %d, pending %d, closed %v", bal, frozen, pending, closed))
	}
	_, err = tx.Exec(ctx, `INSERT INTO ledger (gid, mode, branch, op, account, balance_delta, frozen_delta, pending_delta)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8)`, md.GID, md.Mode, md.Branch, md.Op, o.Account, c.balance, c.frozen, c.pending)
	if err != nil {
		return fmt.Errorf("bank %s: write ledger: %w", b.name, err)
	}
	return nil
}

// handle serves every method: it checks the metadata against the method, decodes the order,
// and runs the endpoint (under server-side faults for TCC tries, when configured).
func (b *bank) handle(_ any, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	ep, ok := b.endpoint(method)
	if !ok {
		return status.Errorf(codes.Unimplemented, "bank %s: no method %s", b.name, method)
	}
	var in []byte
	if err := stream.RecvMsg(&in); err != nil {
		return err
	}
	ctx := stream.Context()
	if len(metadata.ValueFromIncomingContext(ctx, faultHeader)) > 0 {
		return status.Errorf(codes.Unavailable, "bank %s: unavailable (injected fault)", b.name)
	}
	md, ok := participant.FromContext(ctx)
	if !ok || md.Mode != ep.mode || md.Op != ep.op {
		b.wrongCalls.Add(1)
		return status.Errorf(codes.InvalidArgument, "bank %s: %s wants Treaty metadata with mode %q op %q, got %+v (present: %v)",
			b.name, method, ep.mode, ep.op, md, ok)
	}
	var o order
	if !ep.noPayload {
		var err error
		if o, err = decodeOrder(in); err != nil {
			return status.Errorf(codes.InvalidArgument, "bank %s: %s: %v", b.name, method, err)
		}
	}
	run := func(ctx context.Context) error {
		if err := sleepCtx(ctx, b.opts.Delays[method]); err != nil {
			return participant.ToStatus(err)
		}
		b.mu.Lock()
		b.handledBy[md.GID]++
		b.mu.Unlock()
		return participant.ToStatus(ep.run(ctx, md, o))
	}
	var err error
	if b.opts.TryFaults != nil && md.Op == participant.OpTry {
		err = b.opts.TryFaults.serve(ctx, run)
	} else {
		err = run(ctx)
	}
	if err != nil {
		return err
	}
	return stream.SendMsg([]byte{})
}

// handled is how often a handler ran for gid (duplicates included).
func (b *bank) handled(gid string) int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.handledBy[gid]
}

// applied is how many business changes gid made here.
func (b *bank) applied(gid string) int64 {
	var n int64
	if err := b.pool.QueryRow(context.Background(), "SELECT count(*) FROM ledger WHERE gid = $1", gid).Scan(&n); err != nil {
		return -1
	}
	return n
}

type account struct{ Balance, Frozen, Pending int64 }

func (b *bank) accounts(t *testing.T) map[string]account {
	t.Helper()
	rows, err := b.pool.Query(context.Background(), "SELECT id, balance, frozen, pending FROM accounts")
	require.NoError(t, err)
	out := map[string]account{}
	var id string
	var a account
	_, err = pgx.ForEachRow(rows, []any{&id, &a.Balance, &a.Frozen, &a.Pending}, func() error {
		out[id] = a
		return nil
	})
	require.NoError(t, err)
	return out
}

// ledgerRow is one business change.
type ledgerRow struct {
	GID, Mode, Branch, Op, Account string
	Balance, Frozen, Pending       int64
}

func (b *bank) ledger(t *testing.T) map[string][]ledgerRow {
	t.Helper()
	rows, err := b.pool.Query(context.Background(),
		"SELECT gid, mode, branch, op, account, balance_delta, frozen_delta, pending_delta FROM ledger ORDER BY id")
	require.NoError(t, err)
	out := map[string][]ledgerRow{}
	var r ledgerRow
	_, err = pgx.ForEachRow(rows, []any{&r.GID, &r.Mode, &r.Branch, &r.Op, &r.Account, &r.Balance, &r.Frozen, &r.Pending}, func() error {
		out[r.GID] = append(out[r.GID], r)
		return nil
	})
	require.NoError(t, err)
	return out
}

// prepared lists the prepared transactions of this bank's database, Treaty's or not.
func (b *bank) prepared(t *testing.T) []string {
	t.Helper()
	rows, err := b.pool.Query(context.Background(), "SELECT gid FROM pg_prepared_xacts WHERE database = current_database() ORDER BY gid")
	require.NoError(t, err)
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	require.NoError(t, err)
	return ids
}

// dialBank connects to a bank, with faults on every call when in is set.
func dialBank(t *testing.T, b *bank, in *injector) *grpc.ClientConn {
	t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	if in != nil {
		opts = append(opts, grpc.WithChainUnaryInterceptor(in.client()))
	}
	conn, err := grpc.NewClient(b.addr, opts...)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// callBank calls a bank method as the coordinator would: Treaty metadata, raw payload.
func callBank(ctx context.Context, conn *grpc.ClientConn, method string, md participant.Metadata, o order) error {
	ctx = metadata.AppendToOutgoingContext(ctx, participant.MetadataGID, md.GID, participant.MetadataBranch, md.Branch,
		participant.MetadataOp, md.Op, participant.MetadataMode, md.Mode)
	var resp []byte
	return conn.Invoke(ctx, method, o.payload(), &resp, grpc.ForceCodecV2(rawcodec.Codec{}))
}
