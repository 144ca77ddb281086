package sdk

import (
	"context"
	"time"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// Step is one saga step: an action and the compensation that undoes it.
type Step struct {
	Name       string
	Action     Call
	Compensate Call
	// DependsOn names steps that must succeed first. When no step names any, steps run in order.
	DependsOn   []string
	Retry       *Retry
	CallTimeout time.Duration
}

// Saga is an ad-hoc saga, built in code.
type Saga struct {
	// GID is the idempotency key; generated when empty.
	GID   string
	Steps []Step
	// Timeout bounds forward progress (coordinator default 1h).
	Timeout time.Duration
	// Wait is how long Saga waits for the outcome (default 30s); negative: do not wait.
	Wait time.Duration
}

func (s Saga) proto() *treatyv1.SagaSpec {
	spec := &treatyv1.SagaSpec{Timeout: durationOrNil(s.Timeout)}
	for _, st := range s.Steps {
		spec.Steps = append(spec.Steps, &treatyv1.SagaStep{
			Name: st.Name, Action: st.Action.proto(), Compensate: st.Compensate.proto(),
			DependsOn: st.DependsOn, Retry: st.Retry.proto(), CallTimeout: durationOrNil(st.CallTimeout),
		})
	}
	return spec
}

func waitOrDefault(d time.Duration) time.Duration {
	switch {
	case d < 0:
		return 0
	case d == 0:
		return 30 * time.Second
	}
	return d
}

// Saga submits a saga and, unless s.Wait is negative, waits for its outcome. The returned error
// is the transaction's outcome too: nil when it succeeded, ErrAborted when it was compensated,
// ErrNeedsOperator, or ErrTimeout when it was still running when the wait ended.
func (c *Client) Saga(ctx context.Context, s Saga) (*Transaction, error) {
	if s.GID == "" {
		s.GID = NewGID()
	}
	wait := waitOrDefault(s.Wait)
	res, err := rpc(ctx, c, "SubmitSaga", wait, func(ctx context.Context) (*treatyv1.SubmitSagaResponse, error) {
		return c.api.SubmitSaga(ctx, &treatyv1.SubmitSagaRequest{Gid: s.GID, Saga: s.proto(), Wait: durationOrNil(wait)})
	})
	if err != nil {
		return nil, err
	}
	return outcome(newTransaction(res.Transaction), wait)
}

// outcome turns a transaction into the error a caller that waited wants.
func outcome(tx *Transaction, waited time.Duration) (*Transaction, error) {
	if waited == 0 {
		return tx, nil
	}
	if !tx.Terminal() {
		return tx, &timeoutError{tx: tx, waited: waited}
	}
	return tx, tx.Err()
}

type timeoutError struct {
	tx     *Transaction
	waited time.Duration
}

func (e *timeoutError) Error() string {
	return "transaction " + e.tx.GID + " still " + e.tx.Phase + " after " + e.waited.String()
}

func (e *timeoutError) Unwrap() error { return ErrTimeout }
