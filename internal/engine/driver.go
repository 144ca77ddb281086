package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/internal/tracing"
	"github.com/treatyhq/treaty/pkg/saga"
)

// driver runs one transaction while this replica owns it: the only place that does I/O on its
// behalf. The machine decides; the driver records each decision before acting on it.
type driver struct {
	e     *Engine
	gid   string
	mode  string
	epoch int64
	m     machine
	// persisted is the branch view last written, so that a write carries only what changed.
	persisted []store.Branch

	mu         sync.Mutex
	leaseUntil time.Time // local (monotonic) instant before which the lease certainly holds

	ctx         context.Context
	cancel      context.CancelFunc
	cancelCause context.CancelCauseFunc
	results     chan callResult
	ops         chan opRequest // operator actions for the transaction this driver owns
	// paused is set by an operator; a paused transaction is recorded without an owner and not
	// driven until unpaused.
	paused bool
	// parent is the trace context of the request that started this transaction, if any; the
	// driver's span joins that trace.
	parent trace.SpanContext
	span   trace.Span
	spanCx context.Context
	// row is the transaction row as last read (created or claimed); with the machine's state it
	// makes the final view handed to local waiters without reading the database again.
	row store.Transaction
	// payloadBytes is what this driver counts against Config.MaxActiveBytes (set by register).
	payloadBytes int64
	// lastWrite is when this driver last recorded anything; wroteOnce whether it has.
	lastWrite time.Time
	wroteOnce bool
	// ended is set once this driver gave the transaction up on purpose (finished, paused or
	// handed back): a renewal that then fails is no takeover.
	ended atomic.Bool
}

// heartbeat is how long a driver goes without writing before it writes anyway: a minute, or a
// third of --stuck-after when that is shorter, so the stuck-transaction job never takes a live
// driver's transaction (one whose calls an open breaker holds back writes nothing else).
func (e *Engine) heartbeat() time.Duration {
	return min(time.Minute, e.cfg.Jobs.StuckAfter/3)
}

type callResult struct {
	d   dispatch
	res invoke.Result
	at  time.Time
	// fault says how the fault injector perturbed the call ("" when it did not).
	fault string
}

// newDriver builds a driver; it does not start it.
func (e *Engine) newDriver(gid, mode string, epoch int64, m machine, leaseUntil time.Time) *driver {
	bs := m.branches()
	d := &driver{
		e: e, gid: gid, mode: mode, epoch: epoch, m: m,
		persisted:  bs,
		leaseUntil: leaseUntil,
		results:    make(chan callResult, len(bs)+1),
		ops:        make(chan opRequest),
		lastWrite:  time.Now(), // it was just created or claimed: a write
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
	d.spanCx, d.span = d.e.cfg.Tracer.Start(trace.ContextWithRemoteSpanContext(context.Background(), d.parent),
		"treaty.transaction "+d.mode, trace.WithAttributes(
			attribute.String("treaty.gid", d.gid), attribute.String("treaty.mode", d.mode), attribute.Int64("treaty.epoch", d.epoch)))
	defer func() {
		d.span.SetAttributes(attribute.String("treaty.status", d.m.status()), attribute.Bool("treaty.terminal", terminal))
		if d.m.reason() != "" {
			d.span.SetAttributes(attribute.String("treaty.reason", d.m.reason()))
		}
		d.span.End()
		d.cancel()
		var final *treatyv1.Transaction
		if terminal {
			final = d.finalView()
		}
		d.e.unregister(d, final)
	}()
	stopCh := d.e.stopCh
	stopping := false
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var pending []store.Event     // results applied but not yet recorded
	var unrecordedSince time.Time // when the oldest of them was applied (zero: none)
	recorded := ""                // crash point to pass once the pending results are recorded
	flush := time.NewTimer(time.Hour)
	defer flush.Stop()
	for {
		var calls []dispatch
		var wake time.Time
		if !stopping {
			var events []store.Event
			calls, events, wake = d.m.advance(d.e.now())
			pending = append(pending, events...)
		}
		// Decisions (turning back, finishing) are durable before anything depends on them:
		// before the next call and before a caller is told. One write carries them all, with
		// the results before them.
		// A driver that has written nothing for a while (calls refused by an open breaker are
		// not recorded) writes anyway: a live driver looks alive to the stuck-transaction job,
		// a hung one does not. A finished state is always written, even with nothing new, so
		// that a claim of a finished row ends with nothing due.
		// Forward progress alone may wait (Config.LazyProgress): it is then written with the
		// next result, decision or outcome, or when the window ends while calls run.
		if len(pending) > 0 && unrecordedSince.IsZero() {
			unrecordedSince = time.Now()
		}
		if len(pending) > 0 && d.mayDefer(calls, unrecordedSince, stopping) {
			stampEvents(pending, d.e.now())
		} else if len(pending) > 0 || (d.m.terminal() && !d.wroteOnce) || time.Since(d.lastWrite) > d.e.heartbeat() {
			stampEvents(pending, d.e.now())
			if !d.persist(pending) {
				return
			}
			pending, unrecordedSince = pending[:0], time.Time{}
			if recorded != "" {
				d.e.cfg.CrashPoint(recorded)
			}
			recorded = ""
		}
		if d.m.terminal() {
			terminal = true
			d.e.cfg.Observer.TransactionFinished(d.mode, outcomeLabel(d.m.status()))
			return
		}
		if len(calls) == 0 && inFlight == 0 && !stopping && waitsForInitiator(d.m.status()) &&
			d.e.now().Before(d.row.Deadline) {
			// Nothing to do before the deadline but wait for the initiator, who needs the row
			// unleased to register, commit or submit: hand it back, due at its deadline.
			d.release()
			return
		}
		if len(calls) > 0 && !d.ensureLease(calls) {
			return
		}
		for _, c := range calls {
			inFlight++
			d.e.calls.run(func() { d.call(c) })
		}
		if stopping && inFlight == 0 {
			d.release()
			return
		}
		var timerC, flushC <-chan time.Time
		if !wake.IsZero() && !stopping {
			timer.Reset(max(0, wake.Sub(d.e.now())))
			timerC = timer.C
		}
		if len(pending) > 0 {
			// Calls are running with results still unrecorded: write them when the window
			// ends even if no call has answered by then.
			flush.Reset(max(0, time.Until(unrecordedSince.Add(d.e.cfg.LazyProgress))))
			flushC = flush.C
		}
		apply := func(r callResult) {
			inFlight--
			if r.d.undo {
				d.e.cfg.CrashPoint(CrashAfterCompCall)
				recorded = CrashAfterCompRecord
			} else {
				d.e.cfg.CrashPoint(CrashAfterCall)
				if recorded == "" {
					recorded = CrashAfterRecord
				}
			}
			if r.fault != "" {
				pending = append(pending, faultEvent(r.d, r.fault))
			}
			pending = append(pending, d.m.apply(r.d, r.res, r.at, d.e.cfg.Rand())...)
		}
		select {
		case r := <-d.results:
			apply(r)
		drain: // results that arrived together share one write
			for inFlight > 0 {
				select {
				case r := <-d.results:
					apply(r)
				default:
					break drain
				}
			}
		case req := <-d.ops:
			if req.op.Action == ActionPause && inFlight > 0 {
				req.reply <- fmt.Errorf("%w: %w: %d participant calls are in flight; pause once they land", ErrConflict, errTryAgain, inFlight)
				break
			}
			events, err := d.applyOperation(req.op)
			if err != nil {
				req.reply <- fmt.Errorf("%w: %w", ErrConflict, err)
				break
			}
			if !d.persist(append(pending, events...)) {
				req.reply <- fmt.Errorf("%w: %w: lost the transaction while recording the action", ErrConflict, errTryAgain)
				return
			}
			pending = pending[:0]
			req.reply <- nil
			if d.paused {
				return // recorded without an owner; nobody drives it until unpaused
			}
		case <-timerC:
		case <-flushC:
		case <-stopCh:
			stopping, stopCh = true, nil
		case <-d.ctx.Done():
			d.log().Warn("driver cancelled; the lease will expire and another replica continues", "cause", context.Cause(d.ctx))
			return
		}
		timer.Stop()
		flush.Stop()
	}
}

// mayDefer says whether the results applied since unrecordedSince may stay unrecorded while
// calls go out. Only a saga's forward progress may (../DESIGN.md: the transaction before the
// first call, a decision to turn back before the first undo and the outcome before anyone is
// told must be durable; every participant call is safe to repeat): not when the saga turned
// back or finished, nor when nothing is to be called (a wait for a retry, where a write costs
// no latency), nor past the window or the heartbeat.
func (d *driver) mayDefer(calls []dispatch, unrecordedSince time.Time, stopping bool) bool {
	if d.e.cfg.LazyProgress <= 0 || d.mode != "saga" || stopping || d.paused || len(calls) == 0 ||
		d.m.terminal() || d.m.status() != string(saga.PhaseRunning) {
		return false
	}
	for _, c := range calls {
		if c.undo {
			return false
		}
	}
	return time.Since(unrecordedSince) < d.e.cfg.LazyProgress && time.Since(d.lastWrite) <= d.e.heartbeat()
}

// stampEvents dates events when they happen, not when they are written (a write may come a
// lazy-progress window later).
func stampEvents(evs []store.Event, now time.Time) {
	for i := range evs {
		if evs[i].At.IsZero() {
			evs[i].At = now
		}
	}
}

// finalView is the finished transaction as just recorded, without its history (which only the
// database has in full).
func (d *driver) finalView() *treatyv1.Transaction {
	t := d.row
	t.GID, t.Mode, t.Status, t.Reason = d.gid, d.mode, d.m.status(), d.m.reason()
	t.UpdatedAt = time.Now()
	t.NextAttemptAt, t.LeaseOwner, t.LeaseExpiresAt, t.Paused = time.Time{}, "", time.Time{}, false
	return toProto(t, d.m.branches(), nil)
}

// ensureLease makes sure the lease outlives every call about to be made; it renews synchronously
// when it would not. False means ownership is lost: stop.
func (d *driver) ensureLease(calls []dispatch) bool {
	need := time.Duration(0)
	for _, c := range calls {
		need = max(need, c.timeout)
	}
	need += time.Second
	if d.leaseRemaining() > need {
		return true
	}
	lease := max(d.e.cfg.Lease, need+d.e.cfg.Lease/2)
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

func (d *driver) call(c dispatch) {
	// The call never outlives the lease: once the lease could have passed to another replica,
	// this replica must not be talking to the participant on the transaction's behalf.
	timeout := min(c.timeout, d.leaseRemaining())
	_, span := d.e.cfg.Tracer.Start(d.spanCx, "treaty.call "+c.op+" "+c.branch, trace.WithSpanKind(trace.SpanKindClient),
		trace.WithAttributes(attribute.String("treaty.branch", c.branch), attribute.String("treaty.op", c.op),
			attribute.String("treaty.target", c.target.label)))
	defer span.End()
	// The call is cancelled with the driver; it carries the call span's trace context.
	callCtx := tracing.Inject(trace.ContextWithSpan(d.ctx, span))
	var res invoke.Result
	var fault string
	if timeout <= 0 {
		res = invoke.Result{Outcome: invoke.Transient, Err: errors.New("lease too short to call")}
	} else {
		res, fault = d.invokeWithFaults(callCtx, invoke.Request{
			Target:   c.target.target,
			Payload:  c.target.payload,
			Timeout:  timeout,
			Metadata: invoke.Metadata{GID: d.gid, Branch: c.branch, Op: c.op, Mode: d.mode},
		})
	}
	outcome, notSent, _ := outcomeOf(res)
	label := map[saga.Outcome]string{saga.OK: "ok", saga.Aborted: "aborted"}[outcome]
	if notSent {
		label = "not_sent"
	} else if label == "" {
		label = "transient"
	}
	d.e.cfg.Observer.BranchCall(c.target.label, c.op, label, res.Duration)
	span.SetAttributes(attribute.String("treaty.outcome", label))
	if label != "ok" && res.Err != nil {
		span.SetStatus(codes.Error, res.Err.Error())
	}
	d.results <- callResult{d: c, res: res, at: d.e.now(), fault: fault}
}

// outcomeLabel maps every mode's terminal phases onto the three outcomes.
func outcomeLabel(phase string) string {
	switch phase {
	case "succeeded", "confirmed", "committed":
		return "succeeded"
	case "needs_operator":
		return "needs_operator"
	}
	return "compensated"
}

// persist writes the branches that changed since the last write, the events and the status, fenced
// by epoch. False means the write did not happen and the driver must stop (ownership lost, or the
// database unreachable until the lease ran out).
func (d *driver) persist(events []store.Event) bool {
	p := store.RecordParams{
		GID: d.gid, Epoch: d.epoch,
		Status:   d.m.status(),
		Reason:   d.m.reason(),
		Terminal: d.m.terminal() || d.paused,
		Paused:   d.paused,
		Lease:    d.e.cfg.Lease,
		Events:   events,
		// The same id on every try of this write: one that committed although its reply was
		// lost (the group committer's fallback, or the retry below) is not applied twice.
		WriteID: rand.Int64N(math.MaxInt64) + 1,
	}
	now := d.m.branches()
	for i, b := range now {
		if i >= len(d.persisted) || !sameBranch(b, d.persisted[i]) {
			if !storedSagaRow(d.m, p, b) {
				continue
			}
			b.LastError = storable(b.LastError)
			p.Branches = append(p.Branches, b)
		}
	}
	p.Reason = storable(p.Reason)
	for i := range p.Events {
		p.Events[i].Detail = storable(p.Events[i].Detail)
	}
	if p.Terminal {
		// Set before the write: the renewer may see the lease gone as soon as it commits.
		d.ended.Store(true)
	}
	backoff := 50 * time.Millisecond
	for {
		res, sent, err := d.e.record(d.ctx, p)
		if err == nil {
			if !res.Owned {
				d.log().Warn("lost ownership: another replica took over this transaction; stopping without writing")
				d.e.cfg.Observer.LeaseLost()
				return false
			}
			d.extendLease(sent, d.e.cfg.Lease)
			d.persisted = now
			d.lastWrite, d.wroteOnce = time.Now(), true
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
	ctx, cancel := context.WithTimeout(context.WithoutCancel(d.ctx), 5*time.Second)
	defer cancel()
	d.ended.Store(true)
	rel := store.Release{GID: d.gid, Epoch: d.epoch, NextAttemptAt: nextAttempt(d.m.branches())}
	if err := d.e.cfg.Store.ReleaseLeases(ctx, d.e.cfg.Owner, []store.Release{rel}); err != nil {
		d.log().Warn("could not release lease at shutdown; it will expire", "err", err)
	}
}

// maxStoredText bounds error messages and details kept in the history.
const maxStoredText = 2000

// storable makes participant-supplied text safe to store: valid UTF-8 without NUL bytes (which
// PostgreSQL's text refuses, failing the whole group commit) and bounded in length.
func storable(s string) string {
	s = strings.ToValidUTF8(strings.ReplaceAll(s, "\x00", ""), "\uFFFD")
	if len(s) > maxStoredText {
		s = strings.ToValidUTF8(s[:maxStoredText], "") + "..."
	}
	return s
}

var errLeaseLost = errors.New("lease lost")

// cancelLost stops a driver whose lease is gone, unless it already finished.
func (d *driver) cancelLost() { d.cancelCause(errLeaseLost) }

func errorsIsAny(err error, targets ...error) bool {
	for _, t := range targets {
		if errors.Is(err, t) {
			return true
		}
	}
	return false
}
