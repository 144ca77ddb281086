package engine

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
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

// A saga's branch row is written only once the branch is touched: no row is written at
// creation (every step pending, never tried), and a saga that succeeded does not mark its
// compensations skipped (never needed). A succeeded three-step saga stores its three actions'
// rows and nothing more, each written once (issue 13: six inserts, three updates and their
// index entries less per saga than rows for everything at creation). A missing row therefore
// means one of those two states, which the transaction's own status tells apart; readers get it
// back from completeSagaRows, and recovery from saga.New (a fresh branch is pending).

// untouched reports a branch row that no call, retry or error has changed: what a missing row
// stands for.
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

// completeSagaRows puts back the rows a saga's store leaves out (see storedSagaRow), one action
// and one compensation per step of names, in step order: an action is pending; a compensation
// is pending while the saga is not over and skipped once it succeeded. A pending, untouched
// compensation of a saga that succeeded (written at creation by versions before this rule)
// reads as skipped too, as it would have been written. Stored rows of no step in names (none are
// written) are kept, at the end, so that a reader never loses one.
func completeSagaRows(t store.Transaction, names []string, rows []store.Branch) []store.Branch {
	idle := string(saga.StatusPending)
	if t.Status == string(saga.PhaseSucceeded) {
		idle = string(saga.StatusSkipped)
	}
	type key struct {
		pos int
		op  string
	}
	stored := make(map[key]store.Branch, len(rows))
	for _, r := range rows {
		stored[key{r.Position, r.Op}] = r
	}
	out := make([]store.Branch, 0, 2*len(names)+len(rows))
	for i, name := range names {
		a, ok := stored[key{i, string(saga.OpAction)}]
		if ok && a.Branch == name {
			delete(stored, key{i, string(saga.OpAction)})
		} else {
			a = store.Branch{Branch: name, Op: string(saga.OpAction), Position: i,
				Status: string(saga.StatusPending), UpdatedAt: t.CreatedAt}
		}
		c, ok := stored[key{i, string(saga.OpCompensate)}]
		if ok && c.Branch == name {
			delete(stored, key{i, string(saga.OpCompensate)})
			if c.Status == string(saga.StatusPending) && untouched(c) {
				c.Status = idle
			}
		} else {
			c = store.Branch{Branch: name, Op: string(saga.OpCompensate), Position: i, Status: idle, UpdatedAt: a.UpdatedAt}
		}
		out = append(out, a, c)
	}
	for _, r := range rows {
		if _, left := stored[key{r.Position, r.Op}]; left {
			out = append(out, r)
		}
	}
	return out
}

// storedSagaSpec decodes a saga's spec as stored with its transaction.
func storedSagaSpec(t store.Transaction) (*treatyv1.SagaSpec, error) {
	var spec treatyv1.SagaSpec
	if err := proto.Unmarshal(t.Spec, &spec); err != nil {
		return nil, fmt.Errorf("decode stored spec: %w", err)
	}
	return &spec, nil
}

// sagaStepNames reads a saga's step names, in order, from its stored spec.
func sagaStepNames(t store.Transaction) ([]string, error) {
	spec, err := storedSagaSpec(t)
	if err != nil {
		return nil, err
	}
	names := make([]string, len(spec.Steps))
	for i, st := range spec.Steps {
		names[i] = st.Name
	}
	return names, nil
}
