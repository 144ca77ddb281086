package engine

import (
	"bytes"
	"context"
	"fmt"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/twopc"
)

// DefaultTwoPhaseTimeout bounds the prepare phase when the request does not.
const DefaultTwoPhaseTimeout = time.Minute

type twopcBranch struct {
	name                      string
	prepare, commit, rollback call
	policy                    twopc.BranchPolicy
	callTimeout               time.Duration
}

type twopcPlan struct {
	branches []twopcBranch
	timeout  time.Duration
}

func planTwoPhase(req *treatyv1.Submit2PCRequest, lim Limits) (*twopcPlan, error) {
	if len(req.Branches) == 0 {
		return nil, invalid("branches", "at least one branch is required")
	}
	if len(req.Branches) > lim.MaxSteps {
		return nil, invalid("branches", "has %d branches, limit %d", len(req.Branches), lim.MaxSteps)
	}
	p := &twopcPlan{}
	var err error
	if p.timeout, err = durationField("timeout", req.Timeout, req.Timeout == nil, DefaultTwoPhaseTimeout, lim.MaxTimeout); err != nil {
		return nil, err
	}
	seen := map[string]int{}
	for i, b := range req.Branches {
		f := fmt.Sprintf("branches[%d]", i)
		if b == nil || b.Name == "" {
			return nil, invalid(f+".name", "must not be empty")
		}
		if len(b.Name) > MaxStepNameBytes {
			return nil, invalid(f+".name", "is %d bytes, limit %d", len(b.Name), MaxStepNameBytes)
		}
		if !nameRE.MatchString(b.Name) {
			return nil, invalid(f+".name", "%q has characters outside [A-Za-z0-9._:-]", b.Name)
		}
		if j, dup := seen[b.Name]; dup {
			return nil, invalid(f+".name", "%q duplicates branches[%d]", b.Name, j)
		}
		seen[b.Name] = i
		tb := twopcBranch{name: b.Name}
		if tb.prepare, err = planCall(f+".prepare", b.Prepare, lim); err != nil {
			return nil, err
		}
		if tb.commit, err = planCall(f+".commit", b.Commit, lim); err != nil {
			return nil, err
		}
		if tb.rollback, err = planCall(f+".rollback", b.Rollback, lim); err != nil {
			return nil, err
		}
		if tb.callTimeout, err = durationField(f+".call_timeout", b.CallTimeout, b.CallTimeout == nil, DefaultCallTimeout, MaxCallTimeout); err != nil {
			return nil, err
		}
		tb.policy = twopc.BranchPolicy{Name: b.Name, InitialBackoff: DefaultInitialBackoff, MaxBackoff: DefaultMaxBackoff}
		if r := b.Retry; r != nil {
			if tb.policy.InitialBackoff, err = durationField(f+".retry.initial_backoff", r.InitialBackoff, r.InitialBackoff == nil, DefaultInitialBackoff, time.Hour); err != nil {
				return nil, err
			}
			if tb.policy.MaxBackoff, err = durationField(f+".retry.max_backoff", r.MaxBackoff, r.MaxBackoff == nil, DefaultMaxBackoff, 24*time.Hour); err != nil {
				return nil, err
			}
			if tb.policy.MaxBackoff < tb.policy.InitialBackoff {
				return nil, invalid(f+".retry.max_backoff", "%s is below initial_backoff %s", tb.policy.MaxBackoff, tb.policy.InitialBackoff)
			}
		}
		p.branches = append(p.branches, tb)
	}
	return p, nil
}

// SubmitTwoPhase validates and stores a 2PC transaction, then drives it in this process at once.
func (e *Engine) SubmitTwoPhase(ctx context.Context, req *treatyv1.Submit2PCRequest) (SubmitResult, error) {
	gid, err := e.gidOrNew(req.Gid)
	if err != nil {
		return SubmitResult{}, err
	}
	plan, err := planTwoPhase(req, e.cfg.Limits)
	if err != nil {
		return SubmitResult{}, err
	}
	if err := e.admit(); err != nil {
		return SubmitResult{}, err
	}
	if err := e.admitBytes(int(payloadBytes(&twopcMachine{plan: plan}))); err != nil {
		return SubmitResult{}, err
	}
	// The stored spec is the request without gid and wait. A shallow copy, not a clone: a clone
	// would be one more copy of every payload. (A new request field must be added here.)
	stored := &treatyv1.Submit2PCRequest{Branches: req.Branches, Timeout: req.Timeout}
	raw, hash, err := encodeSpec(stored)
	if err != nil {
		return SubmitResult{}, err
	}
	var branches []store.Branch
	for i, b := range plan.branches {
		for _, op := range []twopc.Op{twopc.OpPrepare, twopc.OpCommit, twopc.OpRollback} {
			branches = append(branches, store.Branch{Branch: b.name, Op: string(op), Position: i, Status: string(saga.StatusPending)})
		}
	}
	sent := time.Now()
	res, err := e.create(ctx, store.CreateParams{
		GID: gid, Mode: "2pc", Status: string(twopc.PhasePreparing), Spec: raw, SpecHash: hash,
		Timeout: plan.timeout, Owner: e.cfg.Owner, Lease: e.cfg.Lease, Branches: branches,
		Events: []store.Event{{Kind: "submitted", Detail: fmt.Sprintf("2PC with %d participants", len(plan.branches))}},
	})
	if err != nil {
		return SubmitResult{}, err
	}
	if !res.Created {
		if !bytes.Equal(res.Transaction.SpecHash, hash) || res.Transaction.Mode != "2pc" {
			return SubmitResult{}, fmt.Errorf("gid %q: %w with a different spec", gid, ErrAlreadyExists)
		}
		return SubmitResult{GID: gid, Existing: true}, nil
	}
	e.cfg.Observer.TransactionStarted("2pc")
	e.cfg.CrashPoint(CrashAfterCreate)
	m := newTwopcMachine(plan, res.Transaction.Deadline, e.cfg.OperatorThreshold, twopc.New(twopcSpec(plan, time.Time{}, 0)))
	d := e.newDriver(gid, "2pc", 1, m, sent.Add(e.cfg.Lease))
	d.row = res.Transaction
	d.parent = trace.SpanContextFromContext(ctx)
	if !e.start(d) {
		_ = e.cfg.Store.ReleaseLeases(context.WithoutCancel(ctx), e.cfg.Owner, []store.Release{{GID: gid, Epoch: 1}})
	}
	return SubmitResult{GID: gid}, nil
}

func twopcSpec(plan *twopcPlan, deadline time.Time, threshold int) twopc.Spec {
	s := twopc.Spec{Deadline: deadline, OperatorThreshold: threshold}
	for _, b := range plan.branches {
		s.Branches = append(s.Branches, b.policy)
	}
	return s
}

// twopcMachine adapts pkg/twopc.
type twopcMachine struct {
	plan    *twopcPlan
	spec    twopc.Spec
	state   twopc.State
	pending []store.Event // decided on recovery, recorded with the first write
}

func newTwopcMachine(plan *twopcPlan, deadline time.Time, threshold int, state twopc.State) *twopcMachine {
	return &twopcMachine{plan: plan, spec: twopcSpec(plan, deadline, threshold), state: state}
}

func (e *Engine) twopcFromRows(t store.Transaction, rows []store.Branch) (*twopcMachine, error) {
	var req treatyv1.Submit2PCRequest
	if err := proto.Unmarshal(t.Spec, &req); err != nil {
		return nil, fmt.Errorf("decode stored spec: %w", err)
	}
	plan, err := planTwoPhase(&req, recoveryLimits)
	if err != nil {
		return nil, fmt.Errorf("stored spec no longer valid: %w", err)
	}
	m := newTwopcMachine(plan, t.Deadline, e.cfg.OperatorThreshold, twopc.New(twopcSpec(plan, t.Deadline, 0)))
	m.state.Phase, m.state.Reason = twopc.Phase(t.Status), t.Reason
	idx := map[string]int{}
	for i, b := range plan.branches {
		idx[b.name] = i
	}
	for _, r := range rows {
		i, ok := idx[r.Branch]
		if !ok {
			continue
		}
		b := branchOf(r)
		switch twopc.Op(r.Op) {
		case twopc.OpPrepare:
			m.state.Branches[i].Prepare = b
		case twopc.OpCommit:
			m.state.Branches[i].Commit = b
		case twopc.OpRollback:
			m.state.Branches[i].Rollback = b
		}
	}
	before := m.state
	m.state = twopc.Recover(m.state)
	m.pending = sagaEvents(twopc.RecoverEvents(before, m.state))
	return m, nil
}

func (m *twopcMachine) advance(now time.Time) ([]dispatch, []store.Event, time.Time) {
	var calls []twopc.Call
	var evs []saga.Event
	var wake time.Time
	m.state, calls, evs, wake = twopc.Advance(m.spec, m.state, now)
	out := make([]dispatch, len(calls))
	for i, c := range calls {
		b := m.plan.branches[c.Branch]
		d := dispatch{key: c.Branch, branch: b.name, op: string(c.Op), timeout: b.callTimeout}
		switch c.Op {
		case twopc.OpPrepare:
			d.target = b.prepare
		case twopc.OpCommit:
			d.target = b.commit
		case twopc.OpRollback:
			d.target, d.undo = b.rollback, true
		}
		out[i] = d
	}
	events := append(m.pending, sagaEvents(evs)...)
	m.pending = nil
	return out, events, wake
}

func (m *twopcMachine) apply(d dispatch, res invoke.Result, at time.Time, jitter float64) []store.Event {
	outcome, notSent, msg := outcomeOf(res)
	r := twopc.Result{Branch: d.key, Op: twopc.Op(d.op), Outcome: outcome, Err: msg, At: at, Jitter: jitter, NotSent: notSent}
	var evs []saga.Event
	m.state, evs = twopc.Apply(m.spec, m.state, r)
	return sagaEvents(evs)
}

func (m *twopcMachine) status() string { return string(m.state.Phase) }
func (m *twopcMachine) reason() string { return m.state.Reason }
func (m *twopcMachine) terminal() bool { return m.state.Phase.Terminal() }

func (m *twopcMachine) branches() []store.Branch {
	out := make([]store.Branch, 0, 3*len(m.state.Branches))
	for i, st := range m.state.Branches {
		for _, x := range []struct {
			op twopc.Op
			b  saga.Branch
		}{{twopc.OpPrepare, st.Prepare}, {twopc.OpCommit, st.Commit}, {twopc.OpRollback, st.Rollback}} {
			out = append(out, rowOf(m.plan.branches[i].name, string(x.op), i, x.b))
		}
	}
	return out
}

func (m *twopcMachine) operate(op saga.Operation, branch string) ([]store.Event, error) {
	op.Step = branchIndex(func(i int) string { return m.plan.branches[i].name }, len(m.plan.branches), branch)
	var evs []saga.Event
	var err error
	m.state, evs, err = twopc.Operate(m.spec, m.state, op)
	return sagaEvents(evs), err
}
