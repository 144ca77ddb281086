// Package participant is the participant side of Treaty: what a service that Treaty calls
// needs so that every call is safe to repeat and to receive out of order.
//
// The coordinator calls participants over gRPC and retries whatever did not answer OK or
// ABORTED. Networks lose responses, deliver late and duplicate, so a participant sees the same
// call twice, a cancel before its try, and a try after its cancel. This package turns those
// into no-ops or refusals, using a table in the participant's own PostgreSQL database.
// It depends on gRPC and pgx only, never on the coordinator's code.
//
// # Metadata
//
// Every call carries gRPC metadata naming the global transaction (MetadataGID), the branch
// (MetadataBranch), the operation (MetadataOp: action/compensate for sagas, try/confirm/cancel
// for TCC, prepare/commit/rollback for 2PC) and the mode (MetadataMode). Install
// UnaryServerInterceptor (and StreamServerInterceptor for streaming methods) and a handler
// gets them with FromContext:
//
//	srv := grpc.NewServer(
//		grpc.ChainUnaryInterceptor(participant.UnaryServerInterceptor()),
//		grpc.ChainStreamInterceptor(participant.StreamServerInterceptor()),
//	)
//
// Calls without Treaty metadata pass through untouched (FromContext reports false); calls with
// malformed Treaty metadata are refused with INVALID_ARGUMENT naming the field.
//
// # Methods without .proto files
//
// A participant needs no .proto file and no generated code: Service serves typed Go functions
// over protobuf messages (well-known types such as structpb.Struct and wrapperspb.StringValue
// will do), reads the metadata itself, and with HandlePgx or HandleSQL runs each call under the
// barrier in the handler's own transaction:
//
//	svc := participant.NewService("shop.Stock", &participant.ServiceOptions{Barrier: barrier, Pgx: pool})
//	participant.HandlePgx(svc, "Reserve", func(ctx context.Context, tx pgx.Tx, in *structpb.Struct) (*emptypb.Empty, error) {
//		...
//	})
//	svc.Register(grpcServer)
//
// The coordinator calls it as grpc://host:port + svc.Method("Reserve"); sdk.NewCall takes the
// same name and the request message.
//
// # The barrier
//
// A Barrier records each call as a row of a table (DefaultBarrierTable, or your own name),
// unique on (mode, gid, branch, op), inserted in the same local transaction as the handler's
// business work. Create the table with Barrier.EnsureTable (or EnsureTableSQL), or put
// BarrierSchema's DDL in your migrations. Then run each handler's work through
// Barrier.CallPgx (caller's pgx.Tx), CallSQL (caller's *sql.Tx), or CallPgxDB / CallSQLDB
// (which begin and commit the transaction themselves). The rules:
//
//   - A repeated call does nothing and reports the first call's success (nil).
//   - An undo (compensate, cancel, rollback) whose forward operation (action, try, prepare)
//     never committed does nothing, records a marker, and succeeds: an empty rollback.
//   - A forward operation that arrives after that marker does nothing and fails with an error
//     wrapping ErrAborted, which the coordinator reads as a business "no": no reservation is
//     left hanging that nothing would ever undo.
//   - A forward call and its undo racing each other serialize on the table's unique key: the
//     second waits for the first's transaction, and whichever commits first decides.
//   - If the business function fails, its work and the barrier row are rolled back together
//     and its error is returned unchanged, so a retry runs it again.
//
// confirm, commit and any other operation are forward operations without a marker rule: the
// barrier makes them idempotent. Handlers end with ToStatus, which maps ErrAborted to gRPC
// ABORTED (and the rest as documented), so a handler is a few lines; see the examples.
//
// # Retention and cleanup
//
// Barrier rows must outlive every call that may still arrive for their branch. Delete old ones
// with Barrier.Cleanup, which works in small batches, each its own short transaction, so it
// never holds long locks. Keep rows longer than the longest transaction timeout plus all its
// retries and the time an operator may take to resume a flagged transaction;
// RecommendedRetention (7 days) is a safe default. Running Cleanup hourly from one place is
// plenty.
//
// # Two-phase commit with prepared transactions
//
// TwoPhase is the 2PC participant for PostgreSQL-backed services. Prepare runs the business
// work in a transaction that also inserts the branch's barrier row and ends with PREPARE
// TRANSACTION under PreparedID(gid, branch) ("tr/" + gid + "/" + branch); Commit and Rollback
// finish it with COMMIT PREPARED and ROLLBACK PREPARED. All three are idempotent: a repeated
// prepare or commit succeeds, a rollback of a branch never prepared leaves a marker so that a
// late prepare is refused with ErrAborted, and contradictions (commit after rollback, rollback
// after commit) are reported as ErrRolledBack and ErrCommitted.
//
// The server needs max_prepared_transactions > 0 (ALTER SYSTEM SET
// max_prepared_transactions = 100; then restart); TwoPhase.CheckServer says so at start.
// Prepared transactions hold their locks until phase two, so after a crash they must be
// finished: TwoPhase.InDoubt lists the Treaty-prefixed entries of pg_prepared_xacts for the
// current database and TwoPhase.Resolve commits or rolls back each according to the
// coordinator's recorded decision, which the caller's callback supplies (no decision recorded
// means roll back).
//
// # Rehearsing failure
//
// FaultInterceptor applies fault rules (package pkg/fault, the format of the coordinator's
// /admin/v1/faults) to the calls a service receives: delays, error statuses, answers lost after
// the work committed, calls never answered. Every rule needs a reason and an expiry, so a
// forgotten rehearsal ends by itself. It is how a team checks, before production does, that its
// handlers are idempotent and that its compensations cope.
package participant
