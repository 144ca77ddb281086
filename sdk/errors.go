package sdk

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Sentinel errors. Every error the SDK returns wraps one of them (or a context error), so callers
// branch with errors.Is; *Error carries the details.
var (
	// ErrInvalidArgument: the request was rejected as malformed; nothing was written. The *Error
	// names the offending field.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrAlreadyExists: the gid exists with a different spec.
	ErrAlreadyExists = errors.New("already exists")
	// ErrNotFound: no transaction with that gid.
	ErrNotFound = errors.New("not found")
	// ErrFailedPrecondition: the transaction's state does not allow the request (for example a
	// TCC commit after the coordinator cancelled it at its timeout).
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrUnavailable: the coordinator could not be reached, after retries.
	ErrUnavailable = errors.New("coordinator unavailable")
	// ErrResourceExhausted: the coordinator refused for now (rate limit, a replica at capacity,
	// or a request over the size limit), after retries where it said when to retry.
	ErrResourceExhausted = errors.New("coordinator refused: resource exhausted")
	// ErrTimeout: waiting for a transaction ended before it was terminal.
	ErrTimeout = errors.New("timed out waiting")

	// ErrAborted: the transaction was rolled back (a participant refused, a step gave up, the
	// deadline passed, or the initiator rolled back). Every step that may have run was undone.
	ErrAborted = errors.New("transaction rolled back")
	// ErrNeedsOperator: the transaction could not be rolled back or completed automatically and
	// waits for an operator.
	ErrNeedsOperator = errors.New("transaction needs an operator")
)

// Error is a coordinator error with its gRPC code and, for invalid arguments, the field.
type Error struct {
	RPC     string
	Code    codes.Code
	Field   string
	Message string
	kind    error
}

// Error says which call failed and why.
func (e *Error) Error() string { return fmt.Sprintf("treaty %s: %s", e.RPC, e.Message) }

// Unwrap returns the sentinel the error's code maps to.
func (e *Error) Unwrap() error { return e.kind }

var codeErrors = map[codes.Code]error{
	codes.InvalidArgument:    ErrInvalidArgument,
	codes.AlreadyExists:      ErrAlreadyExists,
	codes.NotFound:           ErrNotFound,
	codes.FailedPrecondition: ErrFailedPrecondition,
	codes.Unavailable:        ErrUnavailable,
	codes.ResourceExhausted:  ErrResourceExhausted,
}

func fromStatus(rpc string, err error) error {
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("treaty %s: %w", rpc, err)
	}
	st := status.Convert(err)
	e := &Error{RPC: rpc, Code: st.Code(), Message: st.Message(), kind: codeErrors[st.Code()]}
	if st.Code() == codes.DeadlineExceeded {
		e.kind = context.DeadlineExceeded
	}
	if e.kind == nil {
		e.kind = fmt.Errorf("coordinator error %s", st.Code())
	}
	for _, d := range st.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok && len(br.FieldViolations) > 0 {
			e.Field = br.FieldViolations[0].Field
		}
	}
	// gRPC's own receive limit answers before the coordinator reads the request, so its text
	// cannot name the setting; say which limit it is and what to do.
	if st.Code() == codes.ResourceExhausted && strings.Contains(st.Message(), "received message larger than max") {
		e.Field = "request"
		e.Message += " (the whole encoded request is larger than the coordinator's --max-request-bytes: " +
			"send smaller payloads, or raise the limit on every replica, at most 256 MiB)"
	}
	return e
}
