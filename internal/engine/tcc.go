package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/tcc"
)

// TCC limits.
const (
	DefaultTCCTimeout = time.Minute
	MaxTCCBranches    = 64
)

// ErrFailedPrecondition: the transaction is not in a state that allows the request (a commit
// after the coordinator cancelled, a registration after the decision).
var ErrFailedPrecondition = errors.New("failed precondition")

// tccBranch is a validated TCC branch.
type tccBranch struct {
	name        string
	confirm     call
	cancel      call
	policy      tcc.BranchPolicy
	callTimeout time.Duration
}

func planTCCBranch(b *treatyv1.TCCBranch, lim Limits) (tccBranch, error) {
	if b == nil {
		return tccBranch{}, invalid("branch", "is required")
	}
	out := tccBranch{name: b.Name}
	if b.Name == "" {
		return out, invalid("branch.name", "must not be empty")
	}
	if len(b.Name) > MaxStepNameBytes {
		return out, invalid("branch.name", "is %d bytes, limit %d", len(b.Name), MaxStepNameBytes)
	}
	if !nameRE.MatchString(b.Name) {
		return out, invalid("branch.name", "%q has characters outside [A-Za-z0-9._:-]", b.Name)
	}
	var err error
	if out.confirm, err = planCall("branch.confirm", b.Confirm, lim); err != nil {
		return out, err
	}
	if out.cancel, err = planCall("branch.cancel", b.Cancel, lim); err != nil {
		return out, err
	}
	if out.callTimeout, err = durationField("branch.call_timeout", b.CallTimeout, b.CallTimeout == nil, DefaultCallTimeout, MaxCallTimeout); err != nil {
		return out, err
	}
	out.policy = tcc.BranchPolicy{Name: b.Name, InitialBackoff: DefaultInitialBackoff, MaxBackoff: DefaultMaxBackoff}
	if r := b.Retry; r != nil {
		if out.policy.InitialBackoff, err = durationField("branch.retry.initial_backoff", r.InitialBackoff, r.InitialBackoff == nil, DefaultInitialBackoff, time.Hour); err != nil {
			return out, err
		}
		if out.policy.MaxBackoff, err = durationField("branch.retry.max_backoff", r.MaxBackoff, r.MaxBackoff == nil, DefaultMaxBackoff, 24*time.Hour); err != nil {
			return out, err
		}
		if out.policy.MaxBackoff < out.policy.InitialBackoff {
			return out, invalid("branch.retry.max_backoff", "%s is below initial_backoff %s", out.policy.MaxBackoff, out.policy.InitialBackoff)
		}
	}
	return out, nil
}

// BeginTCC stores a TCC transaction waiting for its initiator. Nobody drives it until the
// initiator decides, or until its deadline passes (then recovery cancels it).
func (e *Engine) BeginTCC(ctx context.Context, gid string, timeout time.Duration) (SubmitResult, error) {
	gid, err := e.gidOrNew(gid)
	if err != nil {
		return SubmitResult{}, err
	}
	if timeout < 0 {
		return SubmitResult{}, invalid("timeout", "must not be negative, got %s", timeout)
	}
	if timeout == 0 {
		timeout = DefaultTCCTimeout
	}
	if timeout > e.cfg.Limits.MaxTimeout {
		return SubmitResult{}, invalid("timeout", "is %s, limit %s", timeout, e.cfg.Limits.MaxTimeout)
	}
	if err := e.admit(); err != nil {
		return SubmitResult{}, err
	}
	spec := &treatyv1.BeginTCCRequest{Timeout: nil}
	raw, hash, err := encodeSpec(spec)
	if err != nil {
		return SubmitResult{}, err
	}
	res, err := e.create(ctx, store.CreateParams{
		GID: gid, Mode: "tcc", Status: string(tcc.PhaseTrying), Spec: raw, SpecHash: hash, Timeout: timeout,
		Events: []store.Event{{Kind: "begun", Detail: fmt.Sprintf("TCC, initiator has %s to decide", timeout)}},
	})
	if err != nil {
		return SubmitResult{}, err
	}
	if !res.Created {
		if res.Transaction.Mode != "tcc" {
			return SubmitResult{}, fmt.Errorf("gid %q: %w as a %s transaction", gid, ErrAlreadyExists, res.Transaction.Mode)
		}
		return SubmitResult{GID: gid, Existing: true}, nil
	}
	e.cfg.Observer.TransactionStarted("tcc")
	return SubmitResult{GID: gid}, nil
}

func (e *Engine) gidOrNew(gid string) (string, error) {
	if gid == "" {
		return newGID()
	}
	return gid, ValidateGID(gid)
}

// RegisterTCCBranch durably records a branch's confirm and cancel endpoints, only while the
// transaction is still trying. Returns existing=true when the same branch was registered before.
func (e *Engine) RegisterTCCBranch(ctx context.Context, gid string, b *treatyv1.TCCBranch) (bool, error) {
	if gid == "" {
		return false, invalid("gid", "is required")
	}
	if err := ValidateGID(gid); err != nil {
		return false, err
	}
	if _, err := planTCCBranch(b, e.cfg.Limits); err != nil {
		return false, err
	}
	raw, _, err := encodeSpec(b)
	if err != nil {
		return false, err
	}
	res, err := e.cfg.Store.RegisterBranches(ctx, store.RegisterParams{
		GID: gid, Statuses: []string{string(tcc.PhaseTrying)},
		Branches: []store.Branch{
			{Branch: b.Name, Op: string(tcc.OpConfirm), Status: string(saga.StatusPending), Spec: raw},
			{Branch: b.Name, Op: string(tcc.OpCancel), Status: string(saga.StatusPending), Spec: raw},
		},
		Events: []store.Event{{Kind: "branch_registered", Branch: b.Name, Op: string(tcc.OpTry)}},
		// A TCC holds at most --max-steps branches (a confirm and a cancel row each): a commit
		// loads all of them, so their number is bounded like a saga's steps.
		MaxRows: 2 * e.cfg.Limits.MaxSteps,
	})
	if errors.Is(err, store.ErrNotFound) {
		return false, fmt.Errorf("gid %q: %w", gid, ErrNotFound)
	}
	if err != nil {
		return false, err
	}
	if !res.Open {
		t := res.Transaction
		if t.Mode != "tcc" {
			return false, fmt.Errorf("gid %q is a %s transaction, not TCC: %w", gid, t.Mode, ErrFailedPrecondition)
		}
		return false, fmt.Errorf("gid %q: cannot register branch %q: the transaction is %s%s: %w", gid, b.Name, t.Status, e.why(t), ErrFailedPrecondition)
	}
	prev, existed := res.Existing[b.Name]
	if !existed && res.Full {
		return false, invalid("branch", "gid %q has the most branches a TCC may have, %d (--max-steps); nothing was registered", gid, e.cfg.Limits.MaxSteps)
	}
	if existed && !bytes.Equal(prev, raw) {
		return false, fmt.Errorf("gid %q: branch %q: %w with a different spec", gid, b.Name, ErrAlreadyExists)
	}
	return existed, nil
}

func (e *Engine) why(t store.Transaction) string {
	switch {
	case t.Reason != "":
		return " (" + t.Reason + ")"
	case t.Status == string(tcc.PhaseTrying) && !t.Deadline.IsZero() && e.now().After(t.Deadline):
		return " (past its timeout, being cancelled)"
	}
	return ""
}

// DecideTCC commits (confirm every branch) or rolls back (cancel every branch) a TCC
// transaction, and drives the decision in this process at once.
func (e *Engine) DecideTCC(ctx context.Context, gid string, commit bool, reason string) error {
	if gid == "" {
		return invalid("gid", "is required")
	}
	if err := ValidateGID(gid); err != nil {
		return err
	}
	if err := e.admit(); err != nil {
		return err
	}
	// Driving the decision loads every branch's payloads: not on a replica over its budget.
	if err := e.admitBytes(0); err != nil {
		return err
	}
	to, kind := tcc.PhaseConfirming, "confirming"
	if !commit {
		to, kind = tcc.PhaseCancelling, "cancelling"
		if reason == "" {
			reason = "the initiator rolled back"
		}
	} else {
		reason = ""
	}
	sent := time.Now()
	p := store.TransitionParams{
		GID: gid, From: []string{string(tcc.PhaseTrying)}, To: string(to), Reason: reason,
		Owner: e.cfg.Owner, Lease: e.cfg.Lease,
		Events: []store.Event{{Kind: kind, Detail: map[bool]string{true: "initiator committed", false: reason}[commit]}},
		// A commit after the deadline is refused by the database clock, whether or not recovery
		// has cancelled yet; a rollback then is what would happen anyway.
		BeforeDeadline: commit,
	}
	res, err := e.transitionWaiting(ctx, p)
	if errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("gid %q: %w", gid, ErrNotFound)
	}
	if err != nil {
		return err
	}
	if !res.Done {
		t := res.Current
		if t.Mode != "tcc" {
			return fmt.Errorf("gid %q is a %s transaction, not TCC: %w", gid, t.Mode, ErrFailedPrecondition)
		}
		// Deciding the same way twice is fine; the other way is refused, saying why.
		state := tcc.State{Phase: tcc.Phase(t.Status), Reason: t.Reason}
		if t.Paused {
			return fmt.Errorf("gid %q: an operator paused the transaction; unpause it first: %w", gid, ErrFailedPrecondition)
		}
		if state.Phase == tcc.PhaseTrying {
			if !e.now().Before(t.Deadline) {
				return fmt.Errorf("gid %q: cannot commit: the transaction is past its timeout (%s) and being cancelled: %w",
					gid, t.Deadline.UTC().Format(time.RFC3339Nano), ErrFailedPrecondition)
			}
			return fmt.Errorf("gid %q: cannot decide now: replica %s holds the transaction until %s; try again: %w",
				gid, t.LeaseOwner, t.LeaseExpiresAt.UTC().Format(time.RFC3339Nano), ErrBusy)
		}
		if _, _, err := tcc.Decide(state, commit, reason); err != nil {
			return fmt.Errorf("gid %q: %w: %w", gid, err, ErrFailedPrecondition)
		}
		return nil
	}
	d, err := e.resume(res.Claimed, sent.Add(e.cfg.Lease))
	if err != nil {
		return err
	}
	d.parent = trace.SpanContextFromContext(ctx)
	if !e.start(d) {
		_ = e.cfg.Store.ReleaseLeases(context.WithoutCancel(ctx), e.cfg.Owner, []store.Release{{GID: gid, Epoch: d.epoch}})
	}
	return nil
}

// tccMachine adapts pkg/tcc.
type tccMachine struct {
	branches_ []tccBranch
	spec      tcc.Spec
	state     tcc.State
}

func (e *Engine) tccFromRows(t store.Transaction, rows []store.Branch) (*tccMachine, error) {
	m := &tccMachine{}
	idx := map[string]int{}
	for _, r := range rows {
		if _, ok := idx[r.Branch]; ok {
			continue
		}
		var b treatyv1.TCCBranch
		if err := proto.Unmarshal(r.Spec, &b); err != nil {
			return nil, fmt.Errorf("decode branch %q: %w", r.Branch, err)
		}
		pb, err := planTCCBranch(&b, recoveryLimits)
		if err != nil {
			return nil, fmt.Errorf("stored branch %q no longer valid: %w", r.Branch, err)
		}
		idx[r.Branch] = len(m.branches_)
		m.branches_ = append(m.branches_, pb)
		m.spec.Branches = append(m.spec.Branches, pb.policy)
	}
	m.spec.Deadline = t.Deadline
	m.spec.OperatorThreshold = e.cfg.OperatorThreshold
	m.state = tcc.New(m.spec)
	m.state.Phase = tcc.Phase(t.Status)
	m.state.Reason = t.Reason
	for _, r := range rows {
		b := branchOf(r)
		i := idx[r.Branch]
		if r.Op == string(tcc.OpCancel) {
			m.state.Branches[i].Cancel = b
		} else {
			m.state.Branches[i].Confirm = b
		}
	}
	m.state = tcc.Recover(m.state)
	return m, nil
}

func (m *tccMachine) advance(now time.Time) ([]dispatch, []store.Event, time.Time) {
	var calls []tcc.Call
	var evs []saga.Event
	var wake time.Time
	m.state, calls, evs, wake = tcc.Advance(m.spec, m.state, now)
	out := make([]dispatch, len(calls))
	for i, c := range calls {
		b := m.branches_[c.Branch]
		d := dispatch{key: c.Branch, branch: b.name, op: string(c.Op), target: b.confirm, timeout: b.callTimeout}
		if c.Op == tcc.OpCancel {
			d.undo, d.target = true, b.cancel
		}
		out[i] = d
	}
	return out, sagaEvents(evs), wake
}

func (m *tccMachine) apply(d dispatch, res invoke.Result, at time.Time, jitter float64) []store.Event {
	outcome, notSent, msg := outcomeOf(res)
	r := tcc.Result{Branch: d.key, Op: tcc.Op(d.op), Outcome: outcome, Err: msg, At: at, Jitter: jitter, NotSent: notSent}
	var evs []saga.Event
	m.state, evs = tcc.Apply(m.spec, m.state, r)
	return sagaEvents(evs)
}

func (m *tccMachine) status() string { return string(m.state.Phase) }
func (m *tccMachine) reason() string { return m.state.Reason }
func (m *tccMachine) terminal() bool { return m.state.Phase.Terminal() }

func (m *tccMachine) branches() []store.Branch {
	out := make([]store.Branch, 0, 2*len(m.state.Branches))
	for i, st := range m.state.Branches {
		for _, x := range []struct {
			op tcc.Op
			b  saga.Branch
		}{{tcc.OpConfirm, st.Confirm}, {tcc.OpCancel, st.Cancel}} {
			out = append(out, rowOf(m.branches_[i].name, string(x.op), i, x.b))
		}
	}
	return out
}

func (m *tccMachine) operate(op saga.Operation, branch string) ([]store.Event, error) {
	op.Step = branchIndex(func(i int) string { return m.branches_[i].name }, len(m.branches_), branch)
	var evs []saga.Event
	var err error
	m.state, evs, err = tcc.Operate(m.spec, m.state, op)
	return sagaEvents(evs), err
}

// transitionWaiting moves a transaction out of a status in which it waits for its initiator.
// Such a row is unleased except for a moment (a replica that claimed it hands it straight back),
// or until the lease of a replica that died while holding it runs out: the initiator's decision
// waits that out, up to a lease and a little more, rather than fail.
func (e *Engine) transitionWaiting(ctx context.Context, p store.TransitionParams) (store.TransitionResult, error) {
	give := time.Now().Add(e.cfg.Lease + time.Second)
	backoff := 20 * time.Millisecond
	for {
		res, err := e.cfg.Store.Transition(ctx, p)
		if err != nil || res.Done {
			return res, err
		}
		t := res.Current
		held := slices.Contains(p.From, t.Status) && !t.Paused && t.LeaseOwner != "" && e.now().Before(t.Deadline)
		if !held || time.Now().Add(backoff).After(give) {
			return res, nil
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}
