package sdk

import (
	"fmt"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// Call is one participant endpoint with its request: what the coordinator will call.
type Call struct {
	// Target is grpc://host:port[,host:port]/package.Service/Method.
	Target string
	// Payload is the serialized request message.
	Payload []byte
}

// NewCall builds a Call from a participant's address, a method's full name as its generated code
// spells it (for example flightv1.Flights_Reserve_FullMethodName, "/flight.v1.Flights/Reserve")
// and the request message, which it marshals.
func NewCall(addr, fullMethod string, req proto.Message) (Call, error) {
	if addr == "" {
		return Call{}, fmt.Errorf("sdk: call address is empty: %w", ErrInvalidArgument)
	}
	if !strings.HasPrefix(fullMethod, "/") || strings.Count(fullMethod, "/") != 2 {
		return Call{}, fmt.Errorf("sdk: method %q: want the generated /package.Service/Method name: %w", fullMethod, ErrInvalidArgument)
	}
	b, err := proto.Marshal(req)
	if err != nil {
		return Call{}, fmt.Errorf("sdk: marshal request for %s: %w", fullMethod, err)
	}
	return Call{Target: "grpc://" + addr + fullMethod, Payload: b}, nil
}

// MustCall is NewCall that panics on error, for calls built from constants.
func MustCall(addr, fullMethod string, req proto.Message) Call {
	c, err := NewCall(addr, fullMethod, req)
	if err != nil {
		panic(err)
	}
	return c
}

func (c Call) proto() *treatyv1.Call {
	if c.Target == "" && c.Payload == nil {
		return nil
	}
	return &treatyv1.Call{Target: c.Target, Payload: c.Payload}
}

// Retry is a step's retry policy after a transient failure (any answer but OK and ABORTED: the
// participant is down, restarting, timed out). ABORTED is never retried: the saga turns back.
// A nil *Retry, or a zero field, takes the coordinator's default (`coordinator serve --help`).
//
// The coordinator's defaults ride out a participant's restart or rolling deploy: the action is
// retried for 5 minutes (--forward-retry-window) after its first transient failure, with backoff
// from 100ms doubling to at most 1s and half of each delay random, never past the saga's
// timeout; then the saga compensates, and its history says why. Compensations never give up.
type Retry struct {
	// MaxAttempts limits the action's attempts (1..1000). Set alone, it replaces the default
	// window: the step gives up after that many attempts however quickly they fail. Undo
	// calls never give up.
	MaxAttempts int
	// InitialBackoff is the delay before the second attempt (default 100ms); it doubles with
	// each attempt, half of it random.
	InitialBackoff time.Duration
	// MaxBackoff caps the delay (default 1s, or InitialBackoff if larger).
	MaxBackoff time.Duration
	// Window is how long the action is retried after its first transient failure (default 5m;
	// the saga's timeout ends it earlier). With MaxAttempts too, whichever ends first wins.
	Window time.Duration
}

func (r *Retry) proto() *treatyv1.RetryPolicy {
	if r == nil {
		return nil
	}
	return &treatyv1.RetryPolicy{MaxAttempts: int32(r.MaxAttempts), InitialBackoff: durationOrNil(r.InitialBackoff),
		MaxBackoff: durationOrNil(r.MaxBackoff), RetryWindow: durationOrNil(r.Window)}
}

func durationOrNil(d time.Duration) *durationpb.Duration {
	if d == 0 {
		return nil
	}
	return durationpb.New(d)
}

// Status is a transaction's outcome so far, common to every mode.
type Status = treatyv1.Status

// Statuses.
const (
	StatusRunning       = treatyv1.Status_STATUS_RUNNING
	StatusCommitting    = treatyv1.Status_STATUS_COMMITTING
	StatusCompensating  = treatyv1.Status_STATUS_COMPENSATING
	StatusSucceeded     = treatyv1.Status_STATUS_SUCCEEDED
	StatusCompensated   = treatyv1.Status_STATUS_COMPENSATED
	StatusNeedsOperator = treatyv1.Status_STATUS_NEEDS_OPERATOR
)

// Transaction is a transaction as the coordinator reports it.
type Transaction struct {
	GID    string
	Mode   treatyv1.Mode
	Status Status
	// Phase is the mode's own word for the status (e.g. "confirmed" for TCC).
	Phase  string
	Reason string
	// Workflow and WorkflowVersion name the registered workflow this transaction runs, if any.
	Workflow        string
	WorkflowVersion int
	// Raw is the full API message, with branches and history.
	Raw *treatyv1.Transaction
}

func newTransaction(t *treatyv1.Transaction) *Transaction {
	if t == nil {
		return nil
	}
	return &Transaction{GID: t.Gid, Mode: t.Mode, Status: t.Status, Phase: t.Phase, Reason: t.Reason,
		Workflow: t.WorkflowName, WorkflowVersion: int(t.WorkflowVersion), Raw: t}
}

// Terminal reports whether nothing more happens without an operator.
func (t *Transaction) Terminal() bool {
	return t.Status == StatusSucceeded || t.Status == StatusCompensated || t.Status == StatusNeedsOperator
}

// Err returns nil for a transaction that succeeded, ErrAborted (wrapped, with the reason) for one
// that was rolled back, ErrNeedsOperator for one waiting for an operator, and nil while running.
func (t *Transaction) Err() error {
	switch t.Status {
	case StatusCompensated:
		return fmt.Errorf("transaction %q: %s: %w", t.GID, t.Reason, ErrAborted)
	case StatusNeedsOperator:
		return fmt.Errorf("transaction %q: %s: %w", t.GID, t.Reason, ErrNeedsOperator)
	}
	return nil
}
