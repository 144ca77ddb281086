package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/msg"
	"github.com/treatyhq/treaty/pkg/saga"
)

// DefaultMsgTimeout is how long a prepared message waits for SubmitMsg before querying.
const DefaultMsgTimeout = 30 * time.Second

// queryBranch names the query-prepared branch in storage and metadata.
const queryBranch = "query"

type msgDelivery struct {
	name        string
	target      call
	policy      msg.Policy
	callTimeout time.Duration
}

type msgPlan struct {
	deliveries []msgDelivery
	query      msgDelivery
	timeout    time.Duration
}

func retryPolicy(field, name string, r *treatyv1.RetryPolicy) (msg.Policy, error) {
	p := msg.Policy{Name: name, InitialBackoff: DefaultInitialBackoff, MaxBackoff: DefaultMaxBackoff}
	if r == nil {
		return p, nil
	}
	var err error
	if p.InitialBackoff, err = durationField(field+".initial_backoff", r.InitialBackoff, r.InitialBackoff == nil, DefaultInitialBackoff, time.Hour); err != nil {
		return p, err
	}
	if p.MaxBackoff, err = durationField(field+".max_backoff", r.MaxBackoff, r.MaxBackoff == nil, DefaultMaxBackoff, 24*time.Hour); err != nil {
		return p, err
	}
	if p.MaxBackoff < p.InitialBackoff {
		return p, invalid(field+".max_backoff", "%s is below initial_backoff %s", p.MaxBackoff, p.InitialBackoff)
	}
	return p, nil
}

func planMsg(req *treatyv1.PrepareMsgRequest, lim Limits) (*msgPlan, error) {
	if len(req.Deliveries) == 0 {
		return nil, invalid("deliveries", "at least one delivery is required")
	}
	if len(req.Deliveries) > lim.MaxSteps {
		return nil, invalid("deliveries", "has %d deliveries, limit %d", len(req.Deliveries), lim.MaxSteps)
	}
	p := &msgPlan{}
	var err error
	if p.timeout, err = durationField("timeout", req.Timeout, req.Timeout == nil, DefaultMsgTimeout, lim.MaxTimeout); err != nil {
		return nil, err
	}
	q, err := planCall("query_prepared", req.QueryPrepared, lim)
	if err != nil {
		return nil, err
	}
	p.query = msgDelivery{name: queryBranch, target: q, callTimeout: DefaultCallTimeout,
		policy: msg.Policy{Name: queryBranch, InitialBackoff: DefaultInitialBackoff, MaxBackoff: DefaultMaxBackoff}}
	seen := map[string]int{}
	for i, d := range req.Deliveries {
		f := fmt.Sprintf("deliveries[%d]", i)
		if d == nil || d.Name == "" {
			return nil, invalid(f+".name", "must not be empty")
		}
		if len(d.Name) > MaxStepNameBytes {
			return nil, invalid(f+".name", "is %d bytes, limit %d", len(d.Name), MaxStepNameBytes)
		}
		if !nameRE.MatchString(d.Name) || d.Name == queryBranch {
			return nil, invalid(f+".name", "%q must be [A-Za-z0-9._:-] and not %q", d.Name, queryBranch)
		}
		if j, dup := seen[d.Name]; dup {
			return nil, invalid(f+".name", "%q duplicates deliveries[%d]", d.Name, j)
		}
		seen[d.Name] = i
		md := msgDelivery{name: d.Name}
		if md.target, err = planCall(f+".call", d.Call, lim); err != nil {
			return nil, err
		}
		if md.callTimeout, err = durationField(f+".call_timeout", d.CallTimeout, d.CallTimeout == nil, DefaultCallTimeout, MaxCallTimeout); err != nil {
			return nil, err
		}
		if md.policy, err = retryPolicy(f+".retry", d.Name, d.Retry); err != nil {
			return nil, err
		}
		p.deliveries = append(p.deliveries, md)
	}
	return p, nil
}

// PrepareMsg stores a prepared transactional message. Nobody drives it until SubmitMsg, or
// until its timeout (then recovery asks the application's query-prepared endpoint).
func (e *Engine) PrepareMsg(ctx context.Context, req *treatyv1.PrepareMsgRequest) (SubmitResult, error) {
	gid, err := e.gidOrNew(req.Gid)
	if err != nil {
		return SubmitResult{}, err
	}
	plan, err := planMsg(req, e.cfg.Limits)
	if err != nil {
		return SubmitResult{}, err
	}
	if err := e.admit(); err != nil {
		return SubmitResult{}, err
	}
	if err := e.admitBytes(int(payloadBytes(&msgMachine{plan: plan}))); err != nil {
		return SubmitResult{}, err
	}
	// The stored spec is the request without gid: a shallow copy, not a clone, which would be
	// one more copy of every payload. (A new request field must be added here.)
	stored := &treatyv1.PrepareMsgRequest{Deliveries: req.Deliveries, QueryPrepared: req.QueryPrepared, Timeout: req.Timeout}
	raw, hash, err := encodeSpec(stored)
	if err != nil {
		return SubmitResult{}, err
	}
	branches := []store.Branch{{Branch: queryBranch, Op: string(msg.OpQuery), Position: 0, Status: string(saga.StatusPending)}}
	for i, d := range plan.deliveries {
		branches = append(branches, store.Branch{Branch: d.name, Op: string(msg.OpDeliver), Position: i + 1, Status: string(saga.StatusPending)})
	}
	res, err := e.create(ctx, store.CreateParams{
		GID: gid, Mode: "msg", Status: string(msg.PhasePrepared), Spec: raw, SpecHash: hash, Timeout: plan.timeout,
		Branches: branches,
		Events:   []store.Event{{Kind: "prepared", Detail: fmt.Sprintf("message with %d deliveries, waiting %s for submit", len(plan.deliveries), plan.timeout)}},
	})
	if err != nil {
		return SubmitResult{}, err
	}
	if !res.Created {
		if !bytes.Equal(res.Transaction.SpecHash, hash) || res.Transaction.Mode != "msg" {
			return SubmitResult{}, fmt.Errorf("gid %q: %w with a different spec", gid, ErrAlreadyExists)
		}
		return SubmitResult{GID: gid, Existing: true}, nil
	}
	e.cfg.Observer.TransactionStarted("msg")
	return SubmitResult{GID: gid}, nil
}

// SubmitMsg records that the application's local transaction committed and delivers the
// message in this process at once.
func (e *Engine) SubmitMsg(ctx context.Context, gid string) error {
	if gid == "" {
		return invalid("gid", "is required")
	}
	if err := ValidateGID(gid); err != nil {
		return err
	}
	if err := e.admit(); err != nil {
		return err
	}
	sent := time.Now()
	res, err := e.transitionWaiting(ctx, store.TransitionParams{
		GID: gid, From: []string{string(msg.PhasePrepared)}, To: string(msg.PhaseDelivering),
		Owner: e.cfg.Owner, Lease: e.cfg.Lease,
		Events: []store.Event{{Kind: "delivering", Detail: "submitted by the application"}},
	})
	if errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("gid %q: %w", gid, ErrNotFound)
	}
	if err != nil {
		return err
	}
	if !res.Done {
		t := res.Current
		if t.Mode != "msg" {
			return fmt.Errorf("gid %q is a %s transaction, not a message: %w", gid, t.Mode, ErrFailedPrecondition)
		}
		if t.Status == string(msg.PhasePrepared) {
			// Past its timeout, a replica is asking query-prepared right now; it will find the
			// committed local transaction and deliver.
			return nil
		}
		if _, _, err := msg.Submit(msg.State{Phase: msg.Phase(t.Status), Reason: t.Reason}); err != nil {
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

// msgMachine adapts pkg/msg.
type msgMachine struct {
	plan  *msgPlan
	spec  msg.Spec
	state msg.State
}

func (e *Engine) msgFromRows(t store.Transaction, rows []store.Branch) (*msgMachine, error) {
	var req treatyv1.PrepareMsgRequest
	if err := proto.Unmarshal(t.Spec, &req); err != nil {
		return nil, fmt.Errorf("decode stored spec: %w", err)
	}
	plan, err := planMsg(&req, recoveryLimits)
	if err != nil {
		return nil, fmt.Errorf("stored spec no longer valid: %w", err)
	}
	m := &msgMachine{plan: plan, spec: msg.Spec{Query: plan.query.policy, Deadline: t.Deadline, OperatorThreshold: e.cfg.OperatorThreshold}}
	idx := map[string]int{}
	for i, d := range plan.deliveries {
		m.spec.Deliveries = append(m.spec.Deliveries, d.policy)
		idx[d.name] = i
	}
	m.state = msg.New(m.spec)
	m.state.Phase, m.state.Reason = msg.Phase(t.Status), t.Reason
	for _, r := range rows {
		b := branchOf(r)
		if r.Op == string(msg.OpQuery) {
			m.state.Query = b
		} else if i, ok := idx[r.Branch]; ok {
			m.state.Deliveries[i] = b
		}
	}
	m.state = msg.Recover(m.state)
	return m, nil
}

func (m *msgMachine) advance(now time.Time) ([]dispatch, []store.Event, time.Time) {
	var calls []msg.Call
	var evs []saga.Event
	var wake time.Time
	m.state, calls, evs, wake = msg.Advance(m.spec, m.state, now)
	out := make([]dispatch, len(calls))
	for i, c := range calls {
		d := m.plan.query
		if c.Delivery >= 0 {
			d = m.plan.deliveries[c.Delivery]
		}
		out[i] = dispatch{key: c.Delivery, branch: d.name, op: string(c.Op), target: d.target, timeout: d.callTimeout}
	}
	return out, sagaEvents(evs), wake
}

func (m *msgMachine) apply(d dispatch, res invoke.Result, at time.Time, jitter float64) []store.Event {
	outcome, notSent, errMsg := outcomeOf(res)
	r := msg.Result{Delivery: d.key, Op: msg.Op(d.op), Outcome: outcome, Err: errMsg, At: at, Jitter: jitter, NotSent: notSent}
	var evs []saga.Event
	m.state, evs = msg.Apply(m.spec, m.state, r)
	return sagaEvents(evs)
}

func (m *msgMachine) status() string { return string(m.state.Phase) }
func (m *msgMachine) reason() string { return m.state.Reason }
func (m *msgMachine) terminal() bool { return m.state.Phase.Terminal() }

func (m *msgMachine) branches() []store.Branch {
	out := []store.Branch{rowOf(queryBranch, string(msg.OpQuery), 0, m.state.Query)}
	for i, b := range m.state.Deliveries {
		out = append(out, rowOf(m.plan.deliveries[i].name, string(msg.OpDeliver), i+1, b))
	}
	return out
}

func (m *msgMachine) operate(op saga.Operation, branch string) ([]store.Event, error) {
	op.Step = -2
	if branch == queryBranch {
		op.Step = -1
	} else if i := branchIndex(func(i int) string { return m.plan.deliveries[i].name }, len(m.plan.deliveries), branch); i >= 0 {
		op.Step = i
	}
	var evs []saga.Event
	var err error
	m.state, evs, err = msg.Operate(m.spec, m.state, op)
	return sagaEvents(evs), err
}
