package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/saga"
)

// Operator actions on one transaction. Each is recorded in its history with who and why.
const (
	ActionRetry    = string(saga.ActionRetry)    // make every backoff due now
	ActionRollback = string(saga.ActionRollback) // turn back now (compensate, cancel, roll back)
	ActionResume   = string(saga.ActionResume)   // continue one waiting for an operator
	ActionResolve  = string(saga.ActionResolve)  // mark a branch as fixed by hand
	ActionPause    = "pause"                     // stop driving it until unpaused
	ActionUnpause  = "unpause"
)

// MaxReasonBytes bounds an operator's reason.
const MaxReasonBytes = 1024

// ErrConflict: the action makes no sense in the transaction's current state (or another replica
// is driving it right now); the error says why.
var ErrConflict = errors.New("conflict")

// Operation is an operator's request.
type Operation struct {
	GID    string
	Action string
	Branch string // for resolve
	Op     string // for resolve: the branch's op (compensate, confirm, cancel, commit, rollback, ...)
	Actor  string // who asks (from the admin token)
	Reason string // why; required
}

func (op Operation) validate() error {
	if op.GID == "" {
		return invalid("gid", "is required")
	}
	if err := ValidateGID(op.GID); err != nil {
		return err
	}
	switch op.Action {
	case ActionRetry, ActionRollback, ActionResume, ActionPause, ActionUnpause:
	case ActionResolve:
		if op.Branch == "" {
			return invalid("branch", "is required to resolve a branch")
		}
		if op.Op == "" {
			return invalid("op", "is required to resolve a branch")
		}
	default:
		return invalid("action", "%q is not one of retry, rollback, resume, resolve, pause, unpause", op.Action)
	}
	if op.Reason == "" {
		return invalid("reason", "is required: say why, for the history")
	}
	if len(op.Reason) > MaxReasonBytes {
		return invalid("reason", "is %d bytes, limit %d", len(op.Reason), MaxReasonBytes)
	}
	if op.Actor == "" {
		return invalid("actor", "is required")
	}
	return nil
}

type opRequest struct {
	op    Operation
	reply chan error
}

// Operate applies an operator action. The transaction's state machine decides whether it makes
// sense; a refusal is ErrConflict with the reason. A transaction driven by this replica gets the
// action through its driver; an idle one (waiting, paused, finished, or whose owner died) is
// claimed for it; one driven by another replica right now is ErrConflict naming that replica.
func (e *Engine) Operate(ctx context.Context, op Operation) (*treatyv1.Transaction, error) {
	if err := op.validate(); err != nil {
		return nil, err
	}
	e.mu.Lock()
	d := e.active[op.GID]
	e.mu.Unlock()
	if d != nil {
		req := opRequest{op: op, reply: make(chan error, 1)}
		select {
		case d.ops <- req:
			select {
			case err := <-req.reply:
				if err != nil {
					return nil, err
				}
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		case <-d.ctx.Done():
			return nil, fmt.Errorf("%w: the transaction's driver just stopped; try again", ErrConflict)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		return e.Get(ctx, op.GID)
	}
	if err := e.operateIdle(ctx, op); err != nil {
		return nil, err
	}
	return e.Get(ctx, op.GID)
}

func (e *Engine) operateIdle(ctx context.Context, op Operation) error {
	sent := time.Now()
	c, err := e.cfg.Store.ClaimForOperator(ctx, op.GID, e.cfg.Owner, e.cfg.Lease)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("gid %q: %w", op.GID, ErrNotFound)
	case errors.Is(err, store.ErrLeased):
		return fmt.Errorf("%w: %w; try again in a moment", ErrConflict, err)
	case err != nil:
		return err
	}
	d, err := e.resume(c, sent.Add(e.cfg.Lease))
	if err != nil {
		return err
	}
	defer d.cancel()
	d.paused = c.Transaction.Paused
	events, opErr := d.applyOperation(op)
	if opErr != nil {
		// Give it back as it was: ownership ends, nothing else changes.
		if !d.persist(nil) {
			return fmt.Errorf("%w: %w (and the transaction could not be handed back; it will be after its lease)", ErrConflict, opErr)
		}
		if !d.m.terminal() && !d.paused {
			d.release()
		}
		return fmt.Errorf("%w: %w", ErrConflict, opErr)
	}
	if !d.persist(events) {
		return fmt.Errorf("%w: lost the transaction while recording the action; try again", ErrConflict)
	}
	if d.m.terminal() || d.paused {
		return nil
	}
	if waitsForInitiator(d.m.status()) {
		// Still waiting for its initiator: hand it back (due at its deadline), free for the
		// initiator to register branches, commit or submit.
		d.release()
		return nil
	}
	// Drive it here at once, from the state just recorded.
	nd := e.newDriver(d.gid, d.mode, d.epoch, d.m, d.leaseUntil)
	nd.row = d.row
	if !e.start(nd) {
		d.release()
	}
	return nil
}

// applyOperation runs an action against the driver's machine; it returns the events to record.
func (d *driver) applyOperation(op Operation) ([]store.Event, error) {
	sop := saga.Operation{Action: saga.Action(op.Action), Op: saga.Op(op.Op), Actor: op.Actor, Reason: op.Reason}
	switch op.Action {
	case ActionPause:
		switch {
		case d.paused:
			return nil, fmt.Errorf("%w: the transaction is already paused", saga.ErrNotAllowed)
		case d.m.terminal():
			return nil, fmt.Errorf("%w: the transaction is %s; there is nothing to pause", saga.ErrNotAllowed, d.m.status())
		}
		d.paused = true
		return []store.Event{sagaEvents([]saga.Event{saga.OperatorEvent(sop, "", "")})[0]}, nil
	case ActionUnpause:
		if !d.paused {
			return nil, fmt.Errorf("%w: the transaction is not paused", saga.ErrNotAllowed)
		}
		d.paused = false
		return []store.Event{sagaEvents([]saga.Event{saga.OperatorEvent(sop, "", "")})[0]}, nil
	}
	if d.paused {
		return nil, fmt.Errorf("%w: the transaction is paused; unpause it first", saga.ErrNotAllowed)
	}
	return d.m.operate(sop, op.Branch)
}
