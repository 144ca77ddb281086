package bench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/treatyhq/treaty/pkg/fault"
	"github.com/treatyhq/treaty/sdk/participant"
)

// The chaos campaign's ledger participant: accounts in a database of its own, every business
// change written to a ledger table in the same local transaction, behind the SDK's barrier (so
// that repeated calls do nothing) and the SDK's fault interceptor (so that the service itself
// also misbehaves). Its methods are served without generated code: the request is a
// google.protobuf.Struct {account, amount}, the answer google.protobuf.Empty.
const (
	ledgerService = "chaos.Ledger"
	// Saga: credit the payee, then debit the payer (refused without funds, which turns the
	// transfer back and uncredits the payee).
	opCredit   = "Credit"   // balance += amount
	opUncredit = "Uncredit" // balance -= amount (may go below zero: the payee spent it meanwhile)
	opDebit    = "Debit"    // balance -= amount, refused (ABORTED) without funds
	opRefund   = "Refund"   // balance += amount
	// TCC: freeze at the payer, announce at the payee; confirm moves, cancel releases.
	opFreeze      = "Freeze"      // try (payer): balance -> frozen, refused without funds
	opSpendFrozen = "SpendFrozen" // confirm (payer): frozen -= amount
	opUnfreeze    = "Unfreeze"    // cancel (payer): frozen -> balance
	opExpect      = "Expect"      // try (payee): pending += amount
	opReceive     = "Receive"     // confirm (payee): pending -> balance
	opUnexpect    = "Unexpect"    // cancel (payee): pending -= amount
)

const ledgerSchema = `
CREATE TABLE accounts (
    id      text PRIMARY KEY,
    balance bigint NOT NULL,
    frozen  bigint NOT NULL DEFAULT 0,
    pending bigint NOT NULL DEFAULT 0
);
CREATE TABLE ledger (
    id            bigserial PRIMARY KEY,
    gid           text   NOT NULL,
    branch        text   NOT NULL,
    op            text   NOT NULL,
    account       text   NOT NULL,
    balance_delta bigint NOT NULL,
    frozen_delta  bigint NOT NULL,
    pending_delta bigint NOT NULL
);
CREATE INDEX ledger_gid ON ledger (gid);
`

type ledgerDelta struct{ balance, frozen, pending int64 }

// ledgerOps says what each method does per unit of the amount, and whether it needs funds.
var ledgerOps = map[string]struct {
	d          ledgerDelta
	needsFunds bool // balance must cover the amount
}{
	opCredit: {ledgerDelta{1, 0, 0}, false}, opUncredit: {ledgerDelta{-1, 0, 0}, false},
	opDebit: {ledgerDelta{-1, 0, 0}, true}, opRefund: {ledgerDelta{1, 0, 0}, false},
	opFreeze: {ledgerDelta{-1, 1, 0}, true}, opSpendFrozen: {ledgerDelta{0, -1, 0}, false},
	opUnfreeze: {ledgerDelta{1, -1, 0}, false}, opExpect: {ledgerDelta{0, 0, 1}, false},
	opReceive: {ledgerDelta{1, 0, -1}, false}, opUnexpect: {ledgerDelta{0, 0, -1}, false},
}

type ledgerServer struct {
	pool    *pgxpool.Pool
	barrier *participant.Barrier
	srv     *grpc.Server
	addr    string
	via     string       // the address calls use (a proxy), when not addr
	faults  atomic.Int64 // calls the participant's own fault rules perturbed
}

func ledgerPayload(account string, amount int64) []byte {
	s, err := structpb.NewStruct(map[string]any{"account": account, "amount": amount})
	if err != nil {
		panic(err) // a string and an int64 always convert
	}
	b, err := proto.Marshal(s)
	if err != nil {
		panic(err)
	}
	return b
}

// startLedger creates the schema with accounts each holding balance, and serves the ledger
// behind rules (the participant's own faults; nil: none).
func startLedger(ctx context.Context, dbURL string, accounts []string, balance int64, rules *fault.Set) (*ledgerServer, error) {
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		return nil, fmt.Errorf("ledger database: %w", err)
	}
	l := &ledgerServer{pool: pool}
	fail := func(err error) (*ledgerServer, error) { pool.Close(); return nil, err }
	if _, err := pool.Exec(ctx, ledgerSchema); err != nil {
		return fail(fmt.Errorf("ledger schema: %w", err))
	}
	for _, a := range accounts {
		if _, err := pool.Exec(ctx, `INSERT INTO accounts (id, balance) VALUES ($1, $2)`, a, balance); err != nil {
			return fail(fmt.Errorf("ledger accounts: %w", err))
		}
	}
	if l.barrier, err = participant.NewBarrier(participant.BarrierOptions{}); err != nil {
		return fail(err)
	}
	if err := l.barrier.EnsureTable(ctx, pool); err != nil {
		return fail(err)
	}
	var chain []grpc.UnaryServerInterceptor
	if rules != nil {
		chain = append(chain, participant.FaultInterceptor(rules, &participant.FaultOptions{
			OnFault: func(context.Context, string, participant.Metadata, fault.Rule) { l.faults.Add(1) }}))
	}
	chain = append(chain, participant.UnaryServerInterceptor())
	l.srv = grpc.NewServer(grpc.ChainUnaryInterceptor(chain...))
	desc := grpc.ServiceDesc{ServiceName: ledgerService, HandlerType: (*any)(nil)}
	for name := range ledgerOps {
		desc.Methods = append(desc.Methods, grpc.MethodDesc{MethodName: name, Handler: l.handler(name)})
	}
	l.srv.RegisterService(&desc, l)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	l.addr = lis.Addr().String()
	go func() { _ = l.srv.Serve(lis) }()
	return l, nil
}

func (l *ledgerServer) target(method string) string {
	addr := l.addr
	if l.via != "" {
		addr = l.via
	}
	return "grpc://" + addr + "/" + ledgerService + "/" + method
}

func (l *ledgerServer) stop() {
	l.srv.Stop()
	l.pool.Close()
}

func (l *ledgerServer) handler(name string) func(any, context.Context, func(any) error, grpc.UnaryServerInterceptor) (any, error) {
	return func(_ any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
		var in structpb.Struct
		if err := dec(&in); err != nil {
			return nil, err
		}
		h := func(ctx context.Context, _ any) (any, error) { return &emptypb.Empty{}, l.apply(ctx, name, &in) }
		if icpt == nil {
			return h(ctx, &in)
		}
		return icpt(ctx, &in, &grpc.UnaryServerInfo{Server: l, FullMethod: "/" + ledgerService + "/" + name}, h)
	}
}

func (l *ledgerServer) apply(ctx context.Context, name string, in *structpb.Struct) error {
	md, ok := participant.FromContext(ctx)
	if !ok {
		return status.Error(codes.InvalidArgument, "no treaty metadata: the ledger serves only transactions")
	}
	account := in.Fields["account"].GetStringValue()
	amount := int64(in.Fields["amount"].GetNumberValue())
	if account == "" || amount <= 0 {
		return status.Error(codes.InvalidArgument, "payload: want {account, amount > 0}")
	}
	op := ledgerOps[name]
	err := l.barrier.CallPgxDB(ctx, l.pool, md, func(ctx context.Context, tx pgx.Tx) error {
		d := ledgerDelta{op.d.balance * amount, op.d.frozen * amount, op.d.pending * amount}
		tag, err := tx.Exec(ctx, `UPDATE accounts SET balance = balance + $2, frozen = frozen + $3, pending = pending + $4
			WHERE id = $1 AND (NOT $5 OR balance >= $6)`, account, d.balance, d.frozen, d.pending, op.needsFunds, amount)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return fmt.Errorf("%w: account %s cannot cover %d", participant.ErrAborted, account, amount)
		}
		_, err = tx.Exec(ctx, `INSERT INTO ledger (gid, branch, op, account, balance_delta, frozen_delta, pending_delta)
			VALUES ($1, $2, $3, $4, $5, $6, $7)`, md.GID, md.Branch, md.Op, account, d.balance, d.frozen, d.pending)
		return err
	})
	return participant.ToStatus(err)
}

// ledgerRow is one business change as the ledger recorded it.
type ledgerRow struct {
	branch, op, account string
	d                   ledgerDelta
}

// rows returns every ledger row by gid.
func (l *ledgerServer) rows(ctx context.Context) (map[string][]ledgerRow, error) {
	rs, err := l.pool.Query(ctx, `SELECT gid, branch, op, account, balance_delta, frozen_delta, pending_delta FROM ledger ORDER BY id`)
	if err != nil {
		return nil, err
	}
	defer rs.Close()
	out := map[string][]ledgerRow{}
	for rs.Next() {
		var gid string
		var r ledgerRow
		if err := rs.Scan(&gid, &r.branch, &r.op, &r.account, &r.d.balance, &r.d.frozen, &r.d.pending); err != nil {
			return nil, err
		}
		out[gid] = append(out[gid], r)
	}
	return out, rs.Err()
}

// totals returns the sums over all accounts.
func (l *ledgerServer) totals(ctx context.Context) (ledgerDelta, error) {
	var t ledgerDelta
	err := l.pool.QueryRow(ctx, `SELECT coalesce(sum(balance), 0), coalesce(sum(frozen), 0), coalesce(sum(pending), 0) FROM accounts`).
		Scan(&t.balance, &t.frozen, &t.pending)
	if err != nil {
		return t, errors.Join(errors.New("read account totals"), err)
	}
	return t, nil
}
