package engine

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/saga"
)

// driver runs one saga while this replica owns it.
type driver struct {
	e     *Engine
	gid   string
	epoch int64
	plan  *sagaPlan
	spec  saga.Spec
	state saga.State
	// persisted is the branch state last written, to write only what changed.
	persisted saga.State

	mu         sync.Mutex
	leaseUntil time.Time // local (monotonic) instant before which the lease certainly holds

	ctx         context.Context
	cancel      context.CancelFunc
	cancelCause context.CancelCauseFunc
	results     chan callResult
}

type callResult struct {
	call saga.Call
	res  invoke.Result
	at   time.Time
}

// newDriver builds a driver; it does not start it.
func (e *Engine) newDriver(gid string, epoch int64, plan *sagaPlan, deadline time.Time, state saga.State, leaseUntil time.Time) *driver {
	d := &driver{
		e: e, gid: gid, epoch: epoch, plan: plan,
		spec:       saga.Spec{Steps: plan.policy, Deadline: deadline, OperatorThreshold: e.cfg.OperatorThreshold},
		state:      state,
		persisted:  state.Clone(),
		leaseUntil: leaseUntil,
		results:    make(chan callResult, len(plan.steps)*2),
	}
	d.ctx, d.cancelCause = context.WithCancelCause(e.baseCtx)
	d.cancel = func() { d.cancelCause(context.Canceled) }
	return d
}

// start registers and runs the driver; false when the engine is stopping or already drives gid.
func (e *Engine) start(d *driver) bool {
	if !e.register(d) {
		d.cancel()
		return false
	}
	go d.run()
	return true
}

func (d *driver) extendLease(sent time.Time, lease time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if u := sent.Add(lease); u.After(d.leaseUntil) {
		d.leaseUntil = u
	}
}

func (d *driver) leaseRemaining() time.Duration {
	d.mu.Lock()
	defer d.mu.Unlock()
	return time.Until(d.leaseUntil)
}

func (d *driver) log() *slog.Logger { return d.e.log.With("gid", d.gid, "epoch", d.epoch) }

func (d *driver) run() {
	terminal := false
	inFlight := 0
	defer func() {
		d.cancel()
		d.e.unregister(d, terminal)
	}()
	stopCh := d.e.stopCh
	stopping := false
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var pending []saga.Event // results applied but not yet recorded
	hadResults := false
	for {
		var calls []saga.Call
		var wake time.Time
		if !stopping {
			var events []saga.Event
			d.state, calls, events, wake = saga.Advance(d.spec, d.state, d.e.cfg.Now())
			pending = append(pending, events...)
		}
		// Results and decisions (turning back, finishing) are durable before anything depends
		// on them: before the next call and before a caller is told. One write carries them all.
		if len(pending) > 0 {
			if !d.persist(pending) {
				return
			}
			pending = pending[:0]
			if hadResults {
				d.crashAfterRecord()
			}
		}
		hadResults = false
		if d.state.Phase.Terminal() {
			terminal = true
			return
		}
		if len(calls) > 0 && !d.ensureLease(calls) {
			return
		}
		for _, c := range calls {
			inFlight++
			go d.call(c)
		}
		if stopping && inFlight == 0 {
			d.release()
			return
		}
		var timerC <-chan time.Time
		if !wake.IsZero() && !stopping {
			timer.Reset(max(0, wake.Sub(d.e.cfg.Now())))
			timerC = timer.C
		}
		select {
		case r := <-d.results:
			inFlight--
			pending = append(pending, d.apply(r)...)
		drain: // results that arrived together share one write
			for inFlight > 0 {
				select {
				case r := <-d.results:
					inFlight--
					pending = append(pending, d.apply(r)...)
				default:
					break drain
				}
			}
			hadResults = true
		case <-timerC:
		case <-stopCh:
			stopping, stopCh = true, nil
		case <-d.ctx.Done():
			d.log().Warn("driver cancelled; the lease will expire and another replica continues", "cause", context.Cause(d.ctx))
			return
		}
		timer.Stop()
	}
}

func (d *driver) crashAfterRecord() {
	for _, st := range d.state.Steps {
		if st.Compensate.Status == saga.StatusSucceeded {
			d.e.cfg.CrashPoint(CrashAfterCompRecord)
			return
		}
	}
	d.e.cfg.CrashPoint(CrashAfterRecord)
}

func (d *driver) apply(r callResult) []saga.Event {
	if r.call.Op == saga.OpCompensate {
		d.e.cfg.CrashPoint(CrashAfterCompCall)
	} else {
		d.e.cfg.CrashPoint(CrashAfterCall)
	}
	out := saga.Result{Step: r.call.Step, Op: r.call.Op, At: r.at, Jitter: d.e.cfg.Rand()}
	switch r.res.Outcome {
	case invoke.OK:
		out.Outcome = saga.OK
	case invoke.Aborted:
		out.Outcome = saga.Aborted
	default:
		out.Outcome = saga.Transient
	}
	if r.res.Err != nil {
		out.Err = r.res.Err.Error()
		out.NotSent = errors.Is(r.res.Err, invoke.ErrBreakerOpen) || errors.Is(r.res.Err, invoke.ErrNoSlot)
	}
	var events []saga.Event
	d.state, events = saga.Apply(d.spec, d.state, out)
	return events
}

// ensureLease makes sure the lease outlives every call about to be made; it renews synchronously
// when it would not. False means ownership is lost: stop.
func (d *driver) ensureLease(calls []saga.Call) bool {
	need := time.Duration(0)
	for _, c := range calls {
		if t := d.plan.steps[c.Step].callTimeout; t > need {
			need = t
		}
	}
	need += time.Second
	if d.leaseRemaining() > need {
		return true
	}
	lease := d.e.cfg.Lease
	if need+d.e.cfg.Lease/2 > lease {
		lease = need + d.e.cfg.Lease/2
	}
	sent := time.Now()
	res, err := d.e.cfg.Store.RenewLeases(d.ctx, store.RenewParams{
		Owner: d.e.cfg.Owner, Lease: lease, Refs: []store.LeaseRef{{GID: d.gid, Epoch: d.epoch}},
	})
	if err != nil || !res.Renewed[d.gid] {
		d.log().Warn("could not renew lease before calling participants; leaving the transaction to recovery", "err", err)
		return false
	}
	d.extendLease(sent, lease)
	return true
}

func (d *driver) call(c saga.Call) {
	st := d.plan.steps[c.Step]
	target := st.action
	if c.Op == saga.OpCompensate {
		target = st.compensate
	}
	// The call never outlives the lease: once the lease could have passed to another replica,
	// this replica must not be talking to the participant on the transaction's behalf.
	timeout := st.callTimeout
	if rem := d.leaseRemaining(); rem < timeout {
		timeout = rem
	}
	var res invoke.Result
	if timeout <= 0 {
		res = invoke.Result{Outcome: invoke.Transient, Err: errors.New("lease too short to call")}
	} else {
		res = d.e.cfg.Invoker.Call(d.ctx, invoke.Request{
			Target:  target.target,
			Payload: target.payload,
			Timeout: timeout,
			Metadata: invoke.Metadata{
				GID: d.gid, Branch: st.name, Op: string(c.Op), Mode: "saga",
			},
		})
	}
	d.results <- callResult{call: c, res: res, at: d.e.cfg.Now()}
}

// persist writes the branches that changed since the last write, the events and the status, fenced
// by epoch. False means the write did not happen and the driver must stop (ownership lost, or the
// database unreachable until the lease ran out).
func (d *driver) persist(events []saga.Event) bool {
	p := store.RecordParams{
		GID: d.gid, Epoch: d.epoch,
		Status:   string(d.state.Phase),
		Reason:   d.state.Reason,
		Terminal: d.state.Phase.Terminal(),
		Lease:    d.e.cfg.Lease,
	}
	for i := range d.state.Steps {
		for _, op := range []saga.Op{saga.OpAction, saga.OpCompensate} {
			now, before := branchOf(d.state, i, op), branchOf(d.persisted, i, op)
			if now.Status != before.Status || now.Attempts != before.Attempts || now.LastError != before.LastError ||
				!now.NextAt.Equal(before.NextAt) || now.Uncertain != before.Uncertain {
				p.Branches = append(p.Branches, store.Branch{
					Branch: d.plan.steps[i].name, Op: string(op), Position: i,
					Status: string(now.Status), Attempts: now.Attempts, LastError: now.LastError, NextAttemptAt: now.NextAt,
					Uncertain: now.Uncertain,
				})
			}
		}
	}
	for _, ev := range events {
		p.Events = append(p.Events, store.Event{Kind: ev.Kind, Branch: ev.Step, Op: string(ev.Op), Detail: ev.Detail})
	}
	backoff := 50 * time.Millisecond
	for {
		res, sent, err := d.e.record(d.ctx, p)
		if err == nil {
			if !res.Owned {
				d.log().Warn("lost ownership: another replica took over this transaction; stopping without writing")
				return false
			}
			d.extendLease(sent, d.e.cfg.Lease)
			d.persisted = d.state.Clone()
			return true
		}
		if d.ctx.Err() != nil {
			return false
		}
		if d.leaseRemaining() < backoff {
			d.log().Error("could not record progress before the lease ran out; leaving it to recovery", "err", err)
			return false
		}
		d.log().Warn("recording progress failed; retrying", "err", err, "backoff", backoff)
		select {
		case <-time.After(backoff):
		case <-d.ctx.Done():
			return false
		}
		backoff = min(backoff*2, time.Second)
	}
}

// release hands the transaction back at shutdown so another replica continues at once.
func (d *driver) release() {
	next := time.Time{}
	for _, st := range d.state.Steps {
		for _, b := range []saga.Branch{st.Action, st.Compensate} {
			if !b.NextAt.IsZero() && (next.IsZero() || b.NextAt.Before(next)) {
				next = b.NextAt
			}
		}
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(d.ctx), 5*time.Second)
	defer cancel()
	if err := d.e.cfg.Store.ReleaseLeases(ctx, d.e.cfg.Owner, []store.Release{{GID: d.gid, Epoch: d.epoch, NextAttemptAt: next}}); err != nil {
		d.log().Warn("could not release lease at shutdown; it will expire", "err", err)
	}
}

func branchOf(s saga.State, i int, op saga.Op) saga.Branch {
	if op == saga.OpCompensate {
		return s.Steps[i].Compensate
	}
	return s.Steps[i].Action
}

var errLeaseLost = errors.New("lease lost")

// cancelLost stops a driver whose lease is gone, unless it already finished.
func (d *driver) cancelLost() { d.cancelCause(errLeaseLost) }
