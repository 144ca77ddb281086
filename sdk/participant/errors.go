package participant

import (
	"context"
	"errors"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Error is the type of this package's sentinel errors. Each carries the gRPC code a handler
// should answer with; it implements GRPCStatus, so a handler may also return one (or an error
// wrapping one) directly and gRPC sends that code.
type Error struct {
	code codes.Code
	msg  string
}

// Error is the message; the code is in Code.
func (e *Error) Error() string { return e.msg }

// GRPCStatus makes status.FromError (and so the gRPC server) see the error's code.
func (e *Error) GRPCStatus() *status.Status { return status.New(e.code, e.msg) }

// Code is the gRPC code the error maps to.
func (e *Error) Code() codes.Code { return e.code }

// Sentinel errors; match them with errors.Is. Errors returned by this package wrap them and add
// the gid, branch and operation concerned.
var (
	// ErrAborted is the participant's business "no". The barrier returns it (wrapped) for a
	// try, action or prepare that arrives after its cancel, compensate or rollback, so that no
	// reservation is left hanging. Business code may return it too (fmt.Errorf("no funds: %w",
	// participant.ErrAborted)). It maps to codes.Aborted: the coordinator turns the
	// transaction back and does not retry.
	ErrAborted = &Error{codes.Aborted, "treaty participant: aborted"}

	// ErrInvalidMetadata: the call's gid, branch, op or mode is missing or malformed. Maps to
	// codes.InvalidArgument.
	ErrInvalidMetadata = &Error{codes.InvalidArgument, "treaty participant: invalid metadata"}

	// ErrRolledBack: a 2PC commit for a branch that was rolled back. Maps to
	// codes.FailedPrecondition; the coordinator keeps retrying and flags the transaction for an
	// operator, because its recorded decision and this participant disagree.
	ErrRolledBack = &Error{codes.FailedPrecondition, "treaty participant: branch was rolled back"}

	// ErrCommitted: a 2PC rollback for a branch that was committed. Maps to
	// codes.FailedPrecondition, for the same reason as ErrRolledBack.
	ErrCommitted = &Error{codes.FailedPrecondition, "treaty participant: branch was committed"}

	// ErrNotPrepared: a 2PC commit for a branch that holds no prepared transaction and left no
	// barrier row. Maps to codes.FailedPrecondition.
	ErrNotPrepared = &Error{codes.FailedPrecondition, "treaty participant: branch is not prepared"}

	// ErrPreparedTransactionsDisabled: the PostgreSQL server has max_prepared_transactions = 0.
	ErrPreparedTransactionsDisabled = &Error{codes.FailedPrecondition,
		"treaty participant: PostgreSQL prepared transactions are disabled"}
)

// ToStatus converts a handler's error into the gRPC status error the coordinator understands:
// nil stays nil; this package's errors (and errors wrapping them) get their code (ErrAborted ->
// ABORTED); an error that already carries a gRPC status keeps it; context cancellation and
// deadline errors get CANCELED and DEADLINE_EXCEEDED; anything else becomes UNKNOWN, which the
// coordinator treats as transient and retries.
func ToStatus(err error) error {
	if err == nil {
		return nil
	}
	if s, ok := status.FromError(err); ok {
		return s.Err()
	}
	if errors.Is(err, context.Canceled) {
		return status.Error(codes.Canceled, err.Error())
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return status.Error(codes.DeadlineExceeded, err.Error())
	}
	return status.Error(codes.Unknown, err.Error())
}
