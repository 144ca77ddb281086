// Package saga is the saga state machine: a pure function of (spec, state, event, time) to the
// next state and the participant calls to make. It does no I/O and reads no clock; the engine
// feeds it time, outcomes and randomness, persists what it returns and makes the calls.
//
// # Semantics
//
// Steps run in the order given, or, when any step names dependencies, as soon as every step it
// depends on has succeeded. An OK outcome completes a step. ABORTED is the participant's business
// refusal: forward progress stops and the saga compensates. Any other outcome is transient and the
// call is retried with exponential backoff and jitter; a forward step that exhausts its attempts
// or its retry window, or a saga that passes its deadline, compensates too.
//
// Compensation undoes every step that ran or may have run (including one whose outcome is
// unknown), in reverse dependency order: a step is compensated only after every step that depends
// on it has been. Compensations never give up; after OperatorThreshold failed attempts of one
// compensation the saga stops and waits for an operator (PhaseNeedsOperator).
package saga

import (
	"fmt"
	"time"
)

// Op names the endpoint of a step that a call targets.
type Op string

// The ops of a saga step.
const (
	OpAction     Op = "action"
	OpCompensate Op = "compensate"
)

// Outcome classifies a participant's answer.
type Outcome int

const (
	// OK: the call took effect.
	OK Outcome = iota + 1
	// Aborted: the participant refused for a business reason; do not retry.
	Aborted
	// Transient: anything else (timeout, unavailable, internal); the call may or may not have
	// taken effect and is retried.
	Transient
)

// String names the outcome for logs and events.
func (o Outcome) String() string {
	switch o {
	case OK:
		return "ok"
	case Aborted:
		return "aborted"
	case Transient:
		return "transient"
	}
	return fmt.Sprintf("outcome(%d)", int(o))
}

// Phase is where a saga is in its life.
type Phase string

// A saga's phases.
const (
	PhaseRunning       Phase = "running"
	PhaseCompensating  Phase = "compensating"
	PhaseSucceeded     Phase = "succeeded"
	PhaseCompensated   Phase = "compensated"
	PhaseNeedsOperator Phase = "needs_operator"
)

// Terminal reports whether nothing more happens in this phase without an operator.
func (p Phase) Terminal() bool {
	return p == PhaseSucceeded || p == PhaseCompensated || p == PhaseNeedsOperator
}

// Status is the durable status of one branch (one op of one step).
type Status string

const (
	StatusPending   Status = "pending"   // not called yet
	StatusUnknown   Status = "unknown"   // called; the outcome is not known (in flight or transient failure)
	StatusSucceeded Status = "succeeded" // took effect
	StatusFailed    Status = "failed"    // refused (ABORTED) or gave up after its attempts
	StatusSkipped   Status = "skipped"   // not needed: a compensation of an action that never ran
)

// Step is the policy of one step; the targets and payloads stay with the engine.
type Step struct {
	Name           string
	DependsOn      []string
	MaxAttempts    int           // forward attempts before giving up; 0 = no limit (RetryWindow decides)
	InitialBackoff time.Duration // > 0
	MaxBackoff     time.Duration // >= InitialBackoff
	// RetryWindow is how long transient failures of the forward action are retried, from its
	// first transient failure; never past the saga's deadline. 0 = no window (MaxAttempts
	// decides). At least one of MaxAttempts and RetryWindow is set.
	RetryWindow time.Duration
}

// Spec is what the state machine needs to know about a saga.
type Spec struct {
	Steps    []Step
	Deadline time.Time // forward progress must finish before this instant
	// OperatorThreshold is the number of failed attempts of one compensation after which the
	// saga waits for an operator. >= 1.
	OperatorThreshold int
}

// Branch is the durable state of one op of one step, plus what is known only in memory.
type Branch struct {
	Status    Status
	Attempts  int
	LastError string
	NextAt    time.Time // earliest next attempt after a transient failure
	// RetryUntil is when a forward action's retry window ends (zero: no window, or no transient
	// failure yet). Kept in memory only: a state recovered after a crash starts its window again
	// at its next failure, which the deadline still bounds.
	RetryUntil time.Time

	// InFlight is true between dispatch and result; never persisted (a call in flight when
	// the process dies is as good as a transient failure).
	InFlight bool
	// Uncertain is true when an earlier call of this branch may have taken effect without its
	// outcome being known: a transient failure, or a dispatch lost in a crash (see Recover).
	// It must be persisted with the branch: Status and Attempts alone cannot tell a single
	// transient attempt that exhausted MaxAttempts 1 from a clean ABORTED.
	Uncertain bool
}

// StepState is one step's two branches.
type StepState struct {
	Action     Branch
	Compensate Branch
}

// State is a saga's state.
type State struct {
	Phase  Phase
	Steps  []StepState
	Reason string // why it turned back or needs an operator
}

// Call is one participant call the engine must make now.
type Call struct {
	Step    int
	Op      Op
	Attempt int // 1-based
}

// Event is something that happened, for the transaction's history.
type Event struct {
	Kind   string // e.g. "branch_succeeded", "compensating"
	Step   string // empty for transaction-level events
	Op     Op
	Detail string
}

// Result is a participant call's outcome as fed back by the engine.
type Result struct {
	Step    int
	Op      Op
	Outcome Outcome
	Err     string    // the participant's error message, if any
	At      time.Time // when the outcome was observed
	Jitter  float64   // uniform random in [0,1), supplied by the engine
	// NotSent says the call never left the coordinator (the target's circuit breaker was open,
	// or no concurrency slot was free): it is not an attempt, it cannot have taken effect, and
	// it is tried again after a backoff without counting toward any limit.
	NotSent bool
	// RetryAfter, for a call not sent, is how long until it can be sent (an open breaker's
	// remaining time); 0 = unknown, back off as usual.
	RetryAfter time.Duration
}

// Validate checks a spec's structure: unique names, known and acyclic dependencies, policies.
func Validate(spec Spec) error {
	if len(spec.Steps) == 0 {
		return fmt.Errorf("steps: at least one step is required")
	}
	idx := make(map[string]int, len(spec.Steps))
	for i, s := range spec.Steps {
		if s.Name == "" {
			return fmt.Errorf("steps[%d].name: must not be empty", i)
		}
		if j, dup := idx[s.Name]; dup {
			return fmt.Errorf("steps[%d].name: %q duplicates steps[%d]", i, s.Name, j)
		}
		idx[s.Name] = i
		if s.MaxAttempts < 0 || s.RetryWindow < 0 || (s.MaxAttempts == 0 && s.RetryWindow == 0) {
			return fmt.Errorf("steps[%d] %q: needs max_attempts >= 1 or a retry window > 0", i, s.Name)
		}
		if s.InitialBackoff <= 0 || s.MaxBackoff < s.InitialBackoff {
			return fmt.Errorf("steps[%d] %q: backoff must satisfy 0 < initial <= max", i, s.Name)
		}
	}
	for i, s := range spec.Steps {
		for _, d := range s.DependsOn {
			if _, ok := idx[d]; !ok {
				return fmt.Errorf("steps[%d].depends_on: %q is not a step of this saga", i, d)
			}
			if d == s.Name {
				return fmt.Errorf("steps[%d].depends_on: step %q depends on itself", i, s.Name)
			}
		}
	}
	if cyc := findCycle(spec.Steps, idx); cyc != "" {
		return fmt.Errorf("steps.depends_on: dependency cycle %s", cyc)
	}
	if spec.OperatorThreshold < 1 {
		return fmt.Errorf("operator threshold must be >= 1")
	}
	return nil
}

func findCycle(steps []Step, idx map[string]int) string {
	const (
		white = iota
		grey
		black
	)
	color := make([]int, len(steps))
	var path []string
	var visit func(i int) string
	visit = func(i int) string {
		color[i] = grey
		path = append(path, steps[i].Name)
		for _, d := range steps[i].DependsOn {
			j := idx[d]
			switch color[j] {
			case grey:
				cyc := ""
				for k := len(path) - 1; k >= 0; k-- {
					cyc = path[k] + cyc
					if path[k] == d {
						break
					}
					cyc = " -> " + cyc
				}
				return cyc + " -> " + d // close the loop where it started
			case white:
				if c := visit(j); c != "" {
					return c
				}
			}
		}
		path = path[:len(path)-1]
		color[i] = black
		return ""
	}
	for i := range steps {
		if color[i] == white {
			if c := visit(i); c != "" {
				return c
			}
		}
	}
	return ""
}

// Deps returns, for each step, the indexes of the steps it depends on. When no step names a
// dependency, the steps form a chain in the order given.
func Deps(spec Spec) [][]int {
	deps := make([][]int, len(spec.Steps))
	any := false
	for _, s := range spec.Steps {
		if len(s.DependsOn) > 0 {
			any = true
			break
		}
	}
	if !any {
		for i := 1; i < len(spec.Steps); i++ {
			deps[i] = []int{i - 1}
		}
		return deps
	}
	idx := make(map[string]int, len(spec.Steps))
	for i, s := range spec.Steps {
		idx[s.Name] = i
	}
	for i, s := range spec.Steps {
		for _, d := range s.DependsOn {
			deps[i] = append(deps[i], idx[d])
		}
	}
	return deps
}

// New returns the initial state of a saga.
func New(spec Spec) State {
	s := State{Phase: PhaseRunning, Steps: make([]StepState, len(spec.Steps))}
	for i := range s.Steps {
		s.Steps[i] = StepState{
			Action:     Branch{Status: StatusPending},
			Compensate: Branch{Status: StatusPending},
		}
	}
	return s
}

// Clone returns a deep copy.
func (s State) Clone() State {
	c := s
	c.Steps = append([]StepState(nil), s.Steps...)
	return c
}

// Recover prepares a state loaded from storage after its previous driver died. Calls that were
// in flight then are unknown now: a forward step that was ready to run may have been called
// without that being recorded, so it is marked uncertain and will be compensated if the saga turns
// back. InFlight flags are cleared; Uncertain flags are kept.
func Recover(spec Spec, s State) State {
	s = s.Clone()
	deps := Deps(spec)
	for i := range s.Steps {
		st := &s.Steps[i]
		// Only InFlight is lost with the process. Uncertain is a fact about the past (a call
		// may have taken effect) that a crash does not undo: clearing it made a step whose one
		// attempt failed transiently look like a clean ABORTED, and skipped its compensation.
		st.Action.InFlight, st.Compensate.InFlight = false, false
		if st.Action.Status == StatusUnknown {
			st.Action.Uncertain = true
		}
		if st.Action.Status == StatusPending && s.Phase == PhaseRunning && depsSucceeded(s, deps[i]) {
			st.Action.Uncertain = true
		}
	}
	return s
}

func depsSucceeded(s State, deps []int) bool {
	for _, d := range deps {
		if s.Steps[d].Action.Status != StatusSucceeded {
			return false
		}
	}
	return true
}

// NeedsCompensation reports whether step i's action ran or may have run.
func NeedsCompensation(st StepState) bool {
	a := st.Action
	switch a.Status {
	case StatusSucceeded, StatusUnknown:
		return true
	case StatusFailed:
		return a.Uncertain || a.Attempts > 1
	case StatusPending:
		return a.Uncertain || a.InFlight
	}
	return false
}

// Backoff returns the delay before attempt n+1 after n attempts, with "equal jitter": half
// the exponential delay fixed, half random, so retries of many sagas do not synchronise.
func Backoff(initial, max time.Duration, attempts int, jitter float64) time.Duration {
	d := initial
	for i := 1; i < attempts && d < max; i++ {
		if d > max/2 {
			d = max // doubling would pass max, and could overflow when max is near MaxInt64
			break
		}
		d *= 2
	}
	if d > max {
		d = max
	}
	half := d / 2
	return half + time.Duration(float64(d-half)*jitter)
}

// Advance moves the saga forward at time now: it turns back when the deadline has passed, finishes
// when nothing is left to do, and returns the calls to dispatch now (marking them in flight) and
// the earliest future instant at which something becomes due (zero when none).
func Advance(spec Spec, s State, now time.Time) (State, []Call, []Event, time.Time) {
	s = s.Clone()
	var events []Event
	if s.Phase == PhaseRunning && !spec.Deadline.IsZero() && !now.Before(spec.Deadline) {
		events = append(events, s.turnBack(fmt.Sprintf("deadline %s passed", spec.Deadline.UTC().Format(time.RFC3339)))...)
	}
	if s.Phase.Terminal() {
		return s, nil, events, time.Time{}
	}
	deps := Deps(spec)
	var calls []Call
	var wake time.Time
	due := func(b Branch) bool {
		if b.NextAt.After(now) {
			if wake.IsZero() || b.NextAt.Before(wake) {
				wake = b.NextAt
			}
			return false
		}
		return true
	}
	inFlight := 0
	for i := range s.Steps {
		if s.Steps[i].Action.InFlight || s.Steps[i].Compensate.InFlight {
			inFlight++
		}
	}
	switch s.Phase {
	case PhaseRunning:
		done := 0
		for i := range s.Steps {
			a := &s.Steps[i].Action
			switch {
			case a.Status == StatusSucceeded:
				done++
			case a.InFlight, a.Status == StatusFailed, a.Status == StatusSkipped:
			case depsSucceeded(s, deps[i]) && due(*a):
				a.InFlight = true
				a.Attempts++
				a.Status = StatusUnknown
				calls = append(calls, Call{Step: i, Op: OpAction, Attempt: a.Attempts})
			}
		}
		if done == len(s.Steps) {
			s.Phase = PhaseSucceeded
			for i := range s.Steps {
				s.Steps[i].Compensate.Status = StatusSkipped
			}
			events = append(events, Event{Kind: "succeeded"})
			return s, nil, events, time.Time{}
		}
		if !spec.Deadline.IsZero() && (wake.IsZero() || spec.Deadline.Before(wake)) {
			wake = spec.Deadline // turn back on time even while waiting
		}
	case PhaseCompensating:
		dependents := make([][]int, len(s.Steps))
		for i, ds := range deps {
			for _, d := range ds {
				dependents[d] = append(dependents[d], i)
			}
		}
		stuck := false
		for i := range s.Steps {
			c := s.Steps[i].Compensate
			if c.Status != StatusSucceeded && c.Status != StatusSkipped && !c.InFlight && c.Attempts >= spec.OperatorThreshold {
				stuck = true
			}
		}
		// Skip the compensations that are not needed before deciding which are ready: a step's
		// readiness looks at its dependents, which may come later in the list, and a skip
		// discovered after the check would leave the step waiting for an Advance that nothing
		// triggers (no call in flight, no wake).
		for i := range s.Steps {
			st := &s.Steps[i]
			c := &st.Compensate
			if c.Status == StatusSucceeded || c.Status == StatusSkipped || st.Action.InFlight || c.InFlight {
				continue
			}
			if !NeedsCompensation(*st) {
				c.Status = StatusSkipped
				detail := "action never ran; nothing to undo"
				if st.Action.Status == StatusFailed {
					// Refused for certain (an uncertain or repeated attempt needs compensating).
					detail = "action was refused; nothing to undo"
				}
				events = append(events, Event{Kind: "branch_skipped", Step: spec.Steps[i].Name, Op: OpCompensate, Detail: detail})
			}
		}
		settled := 0
		for i := range s.Steps {
			st := &s.Steps[i]
			c := &st.Compensate
			if c.Status == StatusSucceeded || c.Status == StatusSkipped {
				settled++
				continue
			}
			if st.Action.InFlight || c.InFlight {
				continue
			}
			if stuck {
				continue // no new calls once an operator is needed; let in-flight ones land
			}
			ready := true
			for _, d := range dependents[i] {
				dc := s.Steps[d].Compensate.Status
				if s.Steps[d].Action.InFlight || (dc != StatusSucceeded && dc != StatusSkipped) {
					ready = false
					break
				}
			}
			if ready && due(*c) {
				c.InFlight = true
				c.Attempts++
				c.Status = StatusUnknown
				calls = append(calls, Call{Step: i, Op: OpCompensate, Attempt: c.Attempts})
			}
		}
		if settled == len(s.Steps) {
			s.Phase = PhaseCompensated
			events = append(events, Event{Kind: "compensated"})
			return s, nil, events, time.Time{}
		}
		if stuck && inFlight == 0 {
			s.Phase = PhaseNeedsOperator
			s.Reason = fmt.Sprintf("a compensation failed %d times: %s", spec.OperatorThreshold, s.Reason)
			events = append(events, Event{Kind: "needs_operator", Detail: s.Reason})
			return s, nil, events, time.Time{}
		}
	}
	return s, calls, events, wake
}

func (s *State) branch(step int, op Op) *Branch {
	if op == OpCompensate {
		return &s.Steps[step].Compensate
	}
	return &s.Steps[step].Action
}

func (s *State) turnBack(reason string) []Event {
	s.Phase = PhaseCompensating
	s.Reason = reason
	return []Event{{Kind: "compensating", Detail: reason}}
}

// Apply records a call's result. It never dispatches: call Advance afterwards.
func Apply(spec Spec, s State, r Result) (State, []Event) {
	s = s.Clone()
	if r.Step < 0 || r.Step >= len(s.Steps) || (r.Op != OpAction && r.Op != OpCompensate) {
		// Not a call this saga made. An unknown op must not fall through to the action branch:
		// that cleared its InFlight flag and recorded nothing.
		return s, nil
	}
	name := spec.Steps[r.Step].Name
	step := spec.Steps[r.Step]
	b := s.branch(r.Step, r.Op)
	if !b.InFlight {
		// A result nobody waits for (duplicate delivery): ignore it.
		return s, nil
	}
	b.InFlight = false
	if r.NotSent {
		b.Attempts--
		if b.Attempts == 0 && !b.Uncertain {
			b.Status = StatusPending
		}
		delay := Backoff(step.InitialBackoff, step.MaxBackoff, b.Attempts+1, r.Jitter)
		if r.RetryAfter > 0 {
			// Come back when the call can be sent; a little jitter spreads the sagas waiting
			// for the same breaker.
			delay = r.RetryAfter + time.Duration(float64(step.InitialBackoff)*r.Jitter)
		}
		b.NextAt = r.At.Add(delay)
		if r.Op != OpAction || s.Phase != PhaseRunning || step.RetryWindow <= 0 {
			return s, nil
		}
		// Held back is as good as failed for the window: a saga whose calls are all held back
		// by an open breaker turns back when its window ends, as one whose calls fail does.
		startWindow(spec, step, b, r.At)
		if r.At.Before(b.RetryUntil) {
			b.NextAt = minTime(b.NextAt, b.RetryUntil)
			return s, nil
		}
		b.Status = StatusFailed
		why := fmt.Sprintf("retry window %s ended %s, calls held back without being sent", step.RetryWindow, clock(b.RetryUntil))
		last := r.Err
		if b.Attempts > 0 && b.LastError != "" {
			// The participant's own last answer says more than the breaker that stopped asking.
			why = fmt.Sprintf("failed %d times, retry window %s ended %s, the last calls held back", b.Attempts, step.RetryWindow, clock(b.RetryUntil))
			last = b.LastError
		}
		b.LastError = last
		events := []Event{{Kind: "branch_exhausted", Step: name, Op: r.Op, Detail: why + ": " + last}}
		return s, append(events, s.turnBack(fmt.Sprintf("step %q %s: %s", name, why, last))...)
	}
	var events []Event
	ev := func(kind, detail string) {
		events = append(events, Event{Kind: kind, Step: name, Op: r.Op, Detail: detail})
	}
	switch r.Op {
	case OpAction:
		switch r.Outcome {
		case OK:
			b.Status, b.LastError, b.NextAt = StatusSucceeded, "", time.Time{}
			ev("branch_succeeded", fmt.Sprintf("attempt %d", b.Attempts))
		case Aborted:
			b.Status, b.LastError, b.NextAt = StatusFailed, r.Err, time.Time{}
			ev("branch_aborted", r.Err)
			if s.Phase == PhaseRunning {
				events = append(events, s.turnBack(fmt.Sprintf("step %q aborted: %s", name, r.Err))...)
			}
		default:
			b.LastError = r.Err
			b.Uncertain = true
			if s.Phase != PhaseRunning {
				// Turning back already: the action may have run; compensation will tell.
				b.Status = StatusUnknown
				ev("branch_failed", r.Err)
				break
			}
			startWindow(spec, step, b, r.At)
			if why := exhausted(step, *b, r.At); why != "" {
				b.Status = StatusFailed
				ev("branch_exhausted", fmt.Sprintf("%s: %s", why, r.Err))
				events = append(events, s.turnBack(fmt.Sprintf("step %q failed %s: %s", name, why, r.Err))...)
				break
			}
			b.Status = StatusUnknown
			b.NextAt = r.At.Add(Backoff(step.InitialBackoff, step.MaxBackoff, b.Attempts, r.Jitter))
			if !b.RetryUntil.IsZero() && b.NextAt.After(b.RetryUntil) {
				b.NextAt = b.RetryUntil // one last attempt as the window closes
			}
			ev("branch_retry", fmt.Sprintf("attempt %d: %s; %s", b.Attempts, r.Err, retryPlan(step, *b)))
		}
	case OpCompensate:
		switch r.Outcome {
		case OK:
			b.Status, b.LastError, b.NextAt = StatusSucceeded, "", time.Time{}
			ev("branch_succeeded", fmt.Sprintf("attempt %d", b.Attempts))
		default:
			msg := r.Err
			if r.Outcome == Aborted {
				msg = "participant refused to compensate (ABORTED): " + r.Err
			}
			b.Status, b.LastError = StatusUnknown, msg
			b.NextAt = r.At.Add(Backoff(step.InitialBackoff, step.MaxBackoff, b.Attempts, r.Jitter))
			ev("branch_retry", fmt.Sprintf("attempt %d: %s", b.Attempts, msg))
		}
	}
	return s, events
}

// startWindow starts a forward action's retry window at its first failure, if it has one.
func startWindow(spec Spec, step Step, b *Branch, at time.Time) {
	if step.RetryWindow <= 0 || !b.RetryUntil.IsZero() {
		return
	}
	b.RetryUntil = at.Add(step.RetryWindow)
	if !spec.Deadline.IsZero() && spec.Deadline.Before(b.RetryUntil) {
		b.RetryUntil = spec.Deadline
	}
}

func minTime(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}

// exhausted says why a forward action that just failed transiently gives up, or "" to retry.
func exhausted(step Step, b Branch, at time.Time) string {
	if step.MaxAttempts > 0 && b.Attempts >= step.MaxAttempts {
		return fmt.Sprintf("%d times (max_attempts %d)", b.Attempts, step.MaxAttempts)
	}
	if !b.RetryUntil.IsZero() && !at.Before(b.RetryUntil) {
		return fmt.Sprintf("%d times, retry window %s ended %s", b.Attempts, step.RetryWindow, clock(b.RetryUntil))
	}
	return ""
}

// retryPlan tells, for the history, until when and how often a forward action is retried.
func retryPlan(step Step, b Branch) string {
	next := "next attempt " + clock(b.NextAt)
	switch {
	case !b.RetryUntil.IsZero() && step.MaxAttempts > 0:
		return fmt.Sprintf("retrying until %s or attempt %d, %s", clock(b.RetryUntil), step.MaxAttempts, next)
	case !b.RetryUntil.IsZero():
		return fmt.Sprintf("retrying until %s, %s", clock(b.RetryUntil), next)
	}
	return fmt.Sprintf("retrying up to attempt %d, %s", step.MaxAttempts, next)
}

// clock renders an instant for the history: UTC, to the millisecond.
func clock(t time.Time) string { return t.UTC().Format("15:04:05.000Z") }

// InFlight reports whether any call is outstanding.
func (s State) InFlight() bool {
	for _, st := range s.Steps {
		if st.Action.InFlight || st.Compensate.InFlight {
			return true
		}
	}
	return false
}
