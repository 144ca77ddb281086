package engine

import (
	"time"

	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/saga"
)

// sagaMachine adapts pkg/saga.
type sagaMachine struct {
	plan  *sagaPlan
	spec  saga.Spec
	state saga.State
}

func newSagaMachine(plan *sagaPlan, deadline time.Time, threshold int, state saga.State) *sagaMachine {
	return &sagaMachine{
		plan:  plan,
		spec:  saga.Spec{Steps: plan.policy, Deadline: deadline, OperatorThreshold: threshold},
		state: state,
	}
}

func sagaEvents(evs []saga.Event) []store.Event {
	out := make([]store.Event, len(evs))
	for i, ev := range evs {
		out[i] = store.Event{Kind: ev.Kind, Branch: ev.Step, Op: string(ev.Op), Detail: ev.Detail}
	}
	return out
}

func (m *sagaMachine) advance(now time.Time) ([]dispatch, []store.Event, time.Time) {
	var calls []saga.Call
	var evs []saga.Event
	var wake time.Time
	m.state, calls, evs, wake = saga.Advance(m.spec, m.state, now)
	out := make([]dispatch, len(calls))
	for i, c := range calls {
		st := m.plan.steps[c.Step]
		d := dispatch{key: c.Step, branch: st.name, op: string(c.Op), target: st.action, timeout: st.callTimeout}
		if c.Op == saga.OpCompensate {
			d.key, d.undo, d.target = -1-c.Step, true, st.compensate
		}
		out[i] = d
	}
	return out, sagaEvents(evs), wake
}

func (m *sagaMachine) apply(d dispatch, res invoke.Result, at time.Time, jitter float64) []store.Event {
	r := saga.Result{Step: d.key, Op: saga.OpAction, At: at, Jitter: jitter}
	if d.undo {
		r.Step, r.Op = -1-d.key, saga.OpCompensate
	}
	outcome, notSent, msg := outcomeOf(res)
	r.Outcome, r.NotSent, r.Err = outcome, notSent, msg
	if notSent {
		r.RetryAfter = res.RetryAfter
	}
	var evs []saga.Event
	m.state, evs = saga.Apply(m.spec, m.state, r)
	return sagaEvents(evs)
}

func (m *sagaMachine) status() string { return string(m.state.Phase) }
func (m *sagaMachine) reason() string { return m.state.Reason }
func (m *sagaMachine) terminal() bool { return m.state.Phase.Terminal() }

func (m *sagaMachine) branches() []store.Branch {
	out := make([]store.Branch, 0, 2*len(m.state.Steps))
	for i, st := range m.state.Steps {
		for _, x := range []struct {
			op saga.Op
			b  saga.Branch
		}{{saga.OpAction, st.Action}, {saga.OpCompensate, st.Compensate}} {
			out = append(out, rowOf(m.plan.steps[i].name, string(x.op), i, x.b))
		}
	}
	return out
}

func (m *sagaMachine) operate(op saga.Operation, branch string) ([]store.Event, error) {
	op.Step = branchIndex(func(i int) string { return m.plan.steps[i].name }, len(m.plan.steps), branch)
	var evs []saga.Event
	var err error
	m.state, evs, err = saga.Operate(m.spec, m.state, op)
	return sagaEvents(evs), err
}
