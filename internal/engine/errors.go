package engine

import (
	"errors"
	"fmt"
)

// Errors the server maps to gRPC codes (see internal/server). Check with errors.Is / errors.As.
var (
	// ErrAlreadyExists: the gid exists with a different spec.
	ErrAlreadyExists = errors.New("already exists")
	// ErrNotFound: no transaction with that gid.
	ErrNotFound = errors.New("not found")
	// ErrStopping: the engine is shutting down and accepts no new work.
	ErrStopping = errors.New("coordinator is shutting down")
	// ErrOverloaded: this replica drives MaxActive transactions already; retry later or elsewhere.
	ErrOverloaded = errors.New("coordinator at capacity")
	// ErrBusy: another replica holds the transaction for a moment longer than this request
	// could wait; retrying soon succeeds.
	ErrBusy = errors.New("transaction busy")
)

// InvalidArgumentError names the offending field and what was expected. Nothing is written for a
// request that fails validation.
type InvalidArgumentError struct {
	Field  string
	Reason string
}

func (e *InvalidArgumentError) Error() string { return e.Field + ": " + e.Reason }

func invalid(field, format string, args ...any) error {
	return &InvalidArgumentError{Field: field, Reason: fmt.Sprintf(format, args...)}
}
