package engine

import (
	"context"
	"fmt"
	"math"
	"time"

	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/saga"
)

// recoveryLimits accept whatever was stored: limits apply when a request is accepted, not
// when a stored transaction is resumed after the limits were lowered.
var recoveryLimits = Limits{MaxSteps: math.MaxInt32, MaxPayloadBytes: math.MaxInt32, MaxTimeout: math.MaxInt64}

// recoveryLoop claims due work: transactions whose owner died (lease expired) or that were handed
// back. The replica that accepts a transaction drives it at once; this loop is only the safety net.
func (e *Engine) recoveryLoop(ctx context.Context) {
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		n, err := e.recoverOnce(ctx)
		if err != nil && ctx.Err() == nil {
			e.log.Warn("recovery: claim failed", "err", err)
		}
		// Queued operator actions are applied on every pass, also when this replica is full
		// (--max-active) and claims nothing: a full replica is when an operator most needs them.
		if !e.isStopping() {
			e.applyQueued(ctx)
		}
		next := e.cfg.RecoveryInterval
		if n == e.cfg.ClaimBatch {
			next = 0 // more may be waiting
		} else {
			// jitter so that replicas do not claim in lockstep
			next = time.Duration(float64(next) * (0.75 + 0.5*e.cfg.Rand()))
		}
		t.Reset(next)
	}
}

// recoverOnce claims one batch and starts a driver for each claimed transaction.
func (e *Engine) recoverOnce(ctx context.Context) (int, error) {
	room := e.cfg.MaxActive - e.Active()
	// A replica over its memory budget takes on no one else's work either; another replica
	// with room does.
	if room <= 0 || e.isStopping() || e.ActiveBytes() >= e.cfg.MaxActiveBytes {
		return 0, nil
	}
	sent := time.Now()
	claimed, err := e.cfg.Store.ClaimDue(ctx, store.ClaimParams{
		Owner: e.cfg.Owner, Lease: e.cfg.Lease, Limit: min(room, e.cfg.ClaimBatch),
	})
	if err != nil {
		return 0, err
	}
	if len(claimed) > 0 {
		e.cfg.Observer.LeasesClaimed(len(claimed))
	}
	for _, c := range claimed {
		d, err := e.resume(c, sent.Add(e.cfg.Lease))
		if err != nil {
			e.log.Error("recovery: cannot resume transaction; it stays due", "gid", c.Transaction.GID, "err", err)
			continue
		}
		if !e.start(d) {
			// Stopping: hand it straight back.
			_ = e.cfg.Store.ReleaseLeases(context.WithoutCancel(ctx), e.cfg.Owner, []store.Release{{GID: d.gid, Epoch: d.epoch}})
			continue
		}
		e.log.Info("recovery: resuming transaction", "gid", d.gid, "epoch", d.epoch, "status", c.Transaction.Status)
	}
	return len(claimed), nil
}

// resume rebuilds a driver from stored rows.
func (e *Engine) resume(c store.Claimed, leaseUntil time.Time) (*driver, error) {
	m, err := e.machineFromRows(c)
	if err != nil {
		return nil, err
	}
	d := e.newDriver(c.Transaction.GID, c.Transaction.Mode, c.Transaction.Epoch, m, leaseUntil)
	d.row = c.Transaction
	return d, nil
}

// machineFromRows rebuilds a transaction's state machine from its stored rows.
func (e *Engine) machineFromRows(c store.Claimed) (machine, error) {
	t := c.Transaction
	var m machine
	switch t.Mode {
	case "saga":
		spec, err := storedSagaSpec(t)
		if err != nil {
			return nil, err
		}
		plan, err := planSaga(spec, recoveryLimits, e.cfg.Retry)
		if err != nil {
			return nil, fmt.Errorf("stored spec no longer valid: %w", err)
		}
		sm := newSagaMachine(plan, t.Deadline, e.cfg.OperatorThreshold, sagaStateFromRows(plan, t, c.Branches))
		sm.state = saga.Recover(sm.spec, sm.state)
		m = sm
	case "tcc":
		tm, err := e.tccFromRows(t, c.Branches)
		if err != nil {
			return nil, err
		}
		m = tm
	case "2pc":
		tm, err := e.twopcFromRows(t, c.Branches)
		if err != nil {
			return nil, err
		}
		m = tm
	case "msg":
		mm, err := e.msgFromRows(t, c.Branches)
		if err != nil {
			return nil, err
		}
		m = mm
	default:
		return nil, fmt.Errorf("mode %q is not supported by this coordinator version", t.Mode)
	}
	return m, nil
}

func sagaStateFromRows(plan *sagaPlan, t store.Transaction, rows []store.Branch) saga.State {
	s := saga.New(saga.Spec{Steps: plan.policy})
	s.Phase = saga.Phase(t.Status)
	s.Reason = t.Reason
	idx := make(map[string]int, len(plan.steps))
	for i, st := range plan.steps {
		idx[st.name] = i
	}
	for _, r := range rows {
		i, ok := idx[r.Branch]
		if !ok {
			continue
		}
		b := branchOf(r)
		if r.Op == string(saga.OpCompensate) {
			s.Steps[i].Compensate = b
		} else {
			s.Steps[i].Action = b
		}
	}
	return s
}

// renewLoop extends the leases of every transaction this replica drives, and stops drivers whose
// lease another replica has taken.
func (e *Engine) renewLoop(ctx context.Context) {
	t := time.NewTicker(e.cfg.Lease / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		e.mu.Lock()
		ds := make([]*driver, 0, len(e.active))
		for _, d := range e.active {
			ds = append(ds, d)
		}
		e.mu.Unlock()
		if len(ds) == 0 {
			continue
		}
		refs := make([]store.LeaseRef, len(ds))
		for i, d := range ds {
			refs[i] = store.LeaseRef{GID: d.gid, Epoch: d.epoch}
		}
		sent := time.Now()
		res, err := e.cfg.Store.RenewLeases(ctx, store.RenewParams{Owner: e.cfg.Owner, Lease: e.cfg.Lease, Refs: refs})
		if err != nil {
			if ctx.Err() == nil {
				e.log.Warn("lease renewal failed; drivers stop on their own when their leases run out", "err", err)
			}
			continue
		}
		for _, d := range ds {
			if res.Renewed[d.gid] {
				d.extendLease(sent, e.cfg.Lease)
			} else {
				// Finished meanwhile, or taken over: either way this driver must not go on. Only
				// a takeover counts as a lost lease.
				d.cancelLost()
				if !d.ended.Load() {
					e.cfg.Observer.LeaseLost()
				}
			}
		}
	}
}
