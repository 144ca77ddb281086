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

// A saga's compensation row is written only once the compensation is touched: it is not
// written at creation (pending, never tried), nor when a saga that succeeded marks it skipped
// (never needed). Three rows of six for a three-step saga, with their index entries, on every
// saga that succeeds (issue 13). A missing row therefore means exactly one of those two states,
// which the transaction's own status tells apart; readers get it back from completeSagaRows,
// and recovery from saga.New (a fresh compensation is pending).

// untouched reports a branch row that no call, retry or error has changed: what a missing
// compensation row stands for.
func untouched(b store.Branch) bool {
	return b.Attempts == 0 && b.LastError == "" && b.NextAttemptAt.IsZero() && !b.Uncertain
}

// storedSagaRow reports whether a changed branch row of machine m goes into write p.
func storedSagaRow(m machine, p store.RecordParams, b store.Branch) bool {
	if _, ok := m.(*sagaMachine); !ok || b.Op != string(saga.OpCompensate) {
		return true
	}
	succeededNow := p.Terminal && p.Status == string(saga.PhaseSucceeded)
	return !(succeededNow && b.Status == string(saga.StatusSkipped) && untouched(b))
}

// completeSagaRows puts back the compensation rows a saga's store leaves out (see
// storedSagaRow): pending while the saga is not over, skipped once it succeeded. A pending,
// untouched row of a saga that succeeded (written at creation by versions before this rule)
// reads as skipped too, as it would have been written. rows are ordered by position and op.
func completeSagaRows(t store.Transaction, rows []store.Branch) []store.Branch {
	idle := string(saga.StatusPending)
	if t.Status == string(saga.PhaseSucceeded) {
		idle = string(saga.StatusSkipped)
	}
	out := make([]store.Branch, 0, 2*len(rows))
	for i, r := range rows {
		if r.Op == string(saga.OpCompensate) && r.Status == string(saga.StatusPending) && untouched(r) {
			r.Status = idle
		}
		out = append(out, r)
		if r.Op != string(saga.OpAction) {
			continue
		}
		if i+1 < len(rows) && rows[i+1].Branch == r.Branch && rows[i+1].Op == string(saga.OpCompensate) {
			continue
		}
		out = append(out, store.Branch{Branch: r.Branch, Op: string(saga.OpCompensate), Position: r.Position,
			Status: idle, UpdatedAt: r.UpdatedAt})
	}
	return out
}
