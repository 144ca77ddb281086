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
	err := e.operateIdle(ctx, op)
	if errors.Is(err, store.ErrLeased) {
		// Another replica drives it now: queue the action durably; that replica (or whichever
		// claims the transaction next) applies it within a recovery pass.
		q, qerr := e.cfg.Store.QueueOperation(ctx, store.QueuedOperation{GID: op.GID, Action: op.Action, Branch: op.Branch,
			Op: op.Op, Actor: op.Actor, Reason: op.Reason})
		if qerr != nil {
			return nil, qerr
		}
		return nil, fmt.Errorf("%w (#%d): %w; the replica driving it applies it within a recovery pass and records it in the history", ErrQueued, q.ID, err)
	}
	if err != nil {
		return nil, err
	}
	return e.Get(ctx, op.GID)
}

// ErrQueued: the action was stored for the replica that drives the transaction, which applies
// it shortly (or refuses it, saying why in its log); not an error for the operator.
var ErrQueued = errors.New("queued")

// maxQueuedPerPass bounds the queued operator actions one recovery pass looks at.
const maxQueuedPerPass = 16

// applyQueued applies operator actions queued by other replicas: to a transaction this replica
// drives, through its driver; to an idle one, by claiming it. A transaction another replica
// drives is left to that replica. An action applied or refused is deleted; the refusal is
// logged (the state moved on since it was asked). If this replica dies after applying and
// before deleting, the next one applies it again, which the state machine then refuses.
func (e *Engine) applyQueued(ctx context.Context) {
	qs, err := e.cfg.Store.QueuedOperations(ctx, e.cfg.Owner, maxQueuedPerPass)
	if err != nil {
		if ctx.Err() == nil {
			e.log.Warn("reading queued operator actions failed", "err", err)
		}
		return
	}
	for _, q := range qs {
		op := Operation{GID: q.GID, Action: q.Action, Branch: q.Branch, Op: q.Op, Actor: q.Actor, Reason: q.Reason}
		e.mu.Lock()
		d := e.active[q.GID]
		e.mu.Unlock()
		var err error
		if d != nil {
			err = e.operateDriven(ctx, d, op)
		} else {
			err = e.operateIdle(ctx, op)
		}
		switch {
		case errors.Is(err, store.ErrLeased), errors.Is(err, errDriverGone), errors.Is(err, errTryAgain):
			continue // driven elsewhere, or just changing hands: a later pass
		case errors.Is(err, ErrConflict):
			e.log.Warn("queued operator action refused", "gid", q.GID, "action", q.Action, "actor", q.Actor, "queued_at", q.QueuedAt, "err", err)
		case errors.Is(err, store.ErrNotFound), errors.Is(err, ErrNotFound), err == nil:
			if err == nil {
				e.log.Info("queued operator action applied", "gid", q.GID, "action", q.Action, "actor", q.Actor, "queued_at", q.QueuedAt)
			}
		default:
			if ctx.Err() == nil {
				e.log.Warn("applying a queued operator action failed; it stays queued", "gid", q.GID, "action", q.Action, "err", err)
			}
			continue
		}
		if err := e.cfg.Store.DeleteQueuedOperation(ctx, q.ID); err != nil && ctx.Err() == nil {
			e.log.Warn("could not delete an applied operator action; it will be refused when seen again", "id", q.ID, "err", err)
		}
	}
}

var (
	errDriverGone = errors.New("the transaction's driver just stopped")
	// errTryAgain: refused for now, not for good (calls in flight, ownership changing hands).
	errTryAgain = errors.New("try again")
)

// operateDriven hands an action to the driver of a transaction this replica drives.
func (e *Engine) operateDriven(ctx context.Context, d *driver, op Operation) error {
	req := opRequest{op: op, reply: make(chan error, 1)}
	select {
	case d.ops <- req:
	case <-d.ctx.Done():
		return errDriverGone
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case err := <-req.reply:
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (e *Engine) operateIdle(ctx context.Context, op Operation) error {
	sent := time.Now()
	c, err := e.cfg.Store.ClaimForOperator(ctx, op.GID, e.cfg.Owner, e.cfg.Lease)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return fmt.Errorf("gid %q: %w", op.GID, ErrNotFound)
	case errors.Is(err, store.ErrLeased):
		return err
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
			// Not a refusal of the action: a queued one is kept and tried again.
			return fmt.Errorf("%w: %w: %w (and the transaction could not be handed back; it will be after its lease)", ErrConflict, errTryAgain, opErr)
		}
		if !d.m.terminal() && !d.paused {
			d.release()
		}
		return fmt.Errorf("%w: %w", ErrConflict, opErr)
	}
	if !d.persist(events) {
		// Nothing was recorded: a queued action stays queued and is tried again.
		return fmt.Errorf("%w: %w: lost the transaction while recording the action", ErrConflict, errTryAgain)
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
