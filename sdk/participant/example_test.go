package participant_test

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/sdk/participant"
)

// A TCC participant that holds seats. Its try and cancel handlers run their work through the
// barrier; here they are called directly with the metadata the interceptor would have put in
// their context, in the disorder a network produces.
func Example() {
	url, done := exampleDatabase()
	defer done()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		panic(err)
	}
	defer pool.Close()

	barrier, err := participant.NewBarrier(participant.BarrierOptions{})
	if err != nil {
		panic(err)
	}
	if err := barrier.EnsureTable(ctx, pool); err != nil {
		panic(err)
	}
	if _, err := pool.Exec(ctx, "CREATE TABLE seat_hold (gid text PRIMARY KEY)"); err != nil {
		panic(err)
	}

	// The handlers: in a service these are gRPC methods behind participant.UnaryServerInterceptor.
	try := func(ctx context.Context) error {
		md, _ := participant.FromContext(ctx)
		err := barrier.CallPgxDB(ctx, pool, md, func(ctx context.Context, tx pgx.Tx) error {
			_, err := tx.Exec(ctx, "INSERT INTO seat_hold (gid) VALUES ($1)", md.GID)
			return err
		})
		return participant.ToStatus(err)
	}
	cancel := func(ctx context.Context) error {
		md, _ := participant.FromContext(ctx)
		err := barrier.CallPgxDB(ctx, pool, md, func(ctx context.Context, tx pgx.Tx) error {
			_, err := tx.Exec(ctx, "DELETE FROM seat_hold WHERE gid = $1", md.GID)
			return err
		})
		return participant.ToStatus(err)
	}

	call := func(what string, handler func(context.Context) error, gid, op string) {
		md := participant.Metadata{GID: gid, Branch: "seat", Op: op, Mode: participant.ModeTCC}
		err := handler(participant.NewContext(ctx, md))
		fmt.Printf("%-24s %v\n", what, status.Code(err))
	}
	call("try", try, "order-1", participant.OpTry)
	call("try again", try, "order-1", participant.OpTry)
	call("cancel", cancel, "order-1", participant.OpCancel)
	call("cancel before its try", cancel, "order-2", participant.OpCancel)
	call("the late try", try, "order-2", participant.OpTry)

	var held int
	if err := pool.QueryRow(ctx, "SELECT count(*) FROM seat_hold").Scan(&held); err != nil {
		panic(err)
	}
	fmt.Println("seats held:", held)
	// Output:
	// try                      OK
	// try again                OK
	// cancel                   OK
	// cancel before its try    OK
	// the late try             Aborted
	// seats held: 0
}

// A 2PC participant debits an account in a prepared transaction. The participant "crashes"
// before phase two arrives; at restart it resolves what it finds in doubt from the
// coordinator's recorded decision.
func ExampleTwoPhase() {
	url, done := exampleDatabase()
	defer done()
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		panic(err)
	}
	defer pool.Close()

	tp, err := participant.NewTwoPhase(participant.TwoPhaseOptions{})
	if err != nil {
		panic(err)
	}
	if err := tp.CheckServer(ctx, pool); err != nil {
		panic(err) // says how to enable prepared transactions
	}
	if err := tp.Barrier().EnsureTable(ctx, pool); err != nil {
		panic(err)
	}
	if _, err := pool.Exec(ctx, `CREATE TABLE account (id text PRIMARY KEY, balance int NOT NULL);
		INSERT INTO account VALUES ('alice', 100)`); err != nil {
		panic(err)
	}
	balance := func() (n int) {
		if err := pool.QueryRow(ctx, "SELECT balance FROM account WHERE id = 'alice'").Scan(&n); err != nil {
			panic(err)
		}
		return n
	}

	// Prepared transaction ids are server-wide, so the example uses a fresh gid.
	md := participant.Metadata{GID: "transfer-" + uuid.NewString(), Branch: "debit-alice",
		Op: participant.OpPrepare, Mode: participant.Mode2PC}
	err = tp.Prepare(ctx, pool, md, func(ctx context.Context, tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "UPDATE account SET balance = balance - 30 WHERE id = 'alice' AND balance >= 30")
		if err == nil && tag.RowsAffected() == 0 {
			err = fmt.Errorf("alice cannot pay 30: %w", participant.ErrAborted)
		}
		return err
	})
	if err != nil {
		panic(err)
	}
	fmt.Println("balance while prepared:", balance())

	inDoubt, err := tp.InDoubt(ctx, pool)
	if err != nil {
		panic(err)
	}
	for _, b := range inDoubt {
		fmt.Println("in doubt:", b.Branch)
	}
	// The callback asks the coordinator; here it recorded commit for this gid.
	err = tp.Resolve(ctx, pool, func(ctx context.Context, gid, branch string) (bool, error) {
		return gid == md.GID, nil
	})
	if err != nil {
		panic(err)
	}
	fmt.Println("balance after commit:", balance())
	// Output:
	// balance while prepared: 100
	// in doubt: debit-alice
	// balance after commit: 70
}

// The interceptor puts the coordinator's metadata in the handler's context.
func ExampleUnaryServerInterceptor() {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	srv := grpc.NewServer(grpc.ChainUnaryInterceptor(participant.UnaryServerInterceptor()))
	rec := &recorder{seen: make(chan seen, 1)}
	healthpb.RegisterHealthServer(srv, rec)
	go func() { _ = srv.Serve(lis) }()
	defer srv.Stop()

	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	defer conn.Close()
	// What the coordinator sends with every call.
	ctx := metadata.AppendToOutgoingContext(context.Background(),
		participant.MetadataGID, "order-7", participant.MetadataBranch, "seat",
		participant.MetadataOp, participant.OpTry, participant.MetadataMode, participant.ModeTCC)
	if _, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
		panic(err)
	}
	got := <-rec.seen
	fmt.Println(got.ok, got.md)
	// Output:
	// true tcc try of gid "order-7" branch "seat"
}

func ExamplePreparedID() {
	id, err := participant.PreparedID("order-42", "payment")
	if err != nil {
		panic(err)
	}
	fmt.Println(id)
	fmt.Println(participant.ParsePreparedID(id))
	// Output:
	// tr/order-42/payment
	// order-42 payment true
}

func ExampleToStatus() {
	refusal := fmt.Errorf("seat 12A is taken: %w", participant.ErrAborted)
	fmt.Println(status.Code(participant.ToStatus(refusal)))
	fmt.Println(status.Code(participant.ToStatus(errors.New("connection reset"))))
	fmt.Println(status.Code(participant.ToStatus(nil)))
	// Output:
	// Aborted
	// Unknown
	// OK
}
