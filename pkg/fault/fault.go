// Package fault is the rule format of Treaty's fault injection for game days: which participant
// calls a rule touches and what happens to them. The coordinator applies rules that operators
// store through its admin API (/admin/v1/faults) to the calls it makes, when it was started with
// --allow-fault-injection; sdk/participant applies the same rules, from code, to the calls a
// service receives, so a team can rehearse its own service failing.
//
// # Matching
//
// A rule matches a call when every field it sets matches: Target is a pattern in which '*'
// stands for any run of characters (also '/'), matched against the whole target
// ("grpc://host:port/package.Service/Method" on the coordinator, "/package.Service/Method" in a
// participant, so a pattern such as "*/ledger.v1.Ledger/*" works on both sides); Op is one
// operation; GIDPrefix is a prefix of the transaction's gid; Workflow is the name of the
// workflow the transaction was started from (coordinator only). A matching rule fires with its
// Probability, at most MaxCount times, and not after ExpiresAt.
//
// # Effects
//
//   - delay: wait Delay, then make the call. The wait counts against the call's timeout, so a
//     delayed call never outlives the deadline (or the lease) it was given.
//   - status: do not send the call; answer with the gRPC status Code and Message.
//   - lost_response: make the call, let it take effect, then replace its answer with
//     UNAVAILABLE, as a network that drops the response would.
//   - drop: do not send the call; the caller hears nothing until its timeout (DEADLINE_EXCEEDED).
package fault

import (
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
)

// Effect is what a firing rule does to a call.
type Effect string

// The effects.
const (
	EffectDelay        Effect = "delay"
	EffectStatus       Effect = "status"
	EffectLostResponse Effect = "lost_response"
	EffectDrop         Effect = "drop"
)

// Effects lists every effect, in the order the docs present them.
func Effects() []Effect { return []Effect{EffectDelay, EffectStatus, EffectLostResponse, EffectDrop} }

// Ops lists the operations a rule may name: every operation the coordinator sends.
func Ops() []string {
	return []string{"action", "compensate", "try", "confirm", "cancel", "prepare", "commit", "rollback"}
}

// Limits on a rule's fields. A rule is an operator's tool, not a data store: every field is
// small, and a rule cannot outlive a working day.
const (
	MaxTargetLen    = 512
	MaxGIDPrefixLen = 128
	MaxWorkflowLen  = 128
	MaxReasonLen    = 1000
	MaxMessageLen   = 256
	MaxDelay        = 5 * time.Minute
	MaxLifetime     = 24 * time.Hour
	MaxCountLimit   = 1_000_000_000
)

// ErrInvalid is wrapped by every validation error; the error names the field and the limit.
var ErrInvalid = errors.New("invalid fault rule")

// Duration is a time.Duration written in JSON as a string such as "1.5s" (a number is read as
// nanoseconds).
type Duration time.Duration

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		var n int64
		if err2 := json.Unmarshal(b, &n); err2 != nil {
			return fmt.Errorf("want a duration such as \"500ms\" or \"2s\": %w", err)
		}
		*d = Duration(n)
		return nil
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("want a duration such as \"500ms\" or \"2s\": %w", err)
	}
	*d = Duration(v)
	return nil
}

// Rule says which calls to perturb and how.
type Rule struct {
	// ID names a stored rule (assigned by the coordinator); free-form in a participant.
	ID string `json:"id,omitempty"`
	// Target is a pattern of the call's target ('*' = any run of characters); "" matches all.
	Target string `json:"target,omitempty"`
	// Op is one of Ops; "" matches every operation.
	Op string `json:"op,omitempty"`
	// GIDPrefix, when set, limits the rule to transactions whose gid starts with it.
	GIDPrefix string `json:"gid_prefix,omitempty"`
	// Workflow, when set, limits the rule to transactions of that workflow.
	Workflow string `json:"workflow,omitempty"`
	// Effect is what happens to a matching call when the rule fires.
	Effect Effect `json:"effect"`
	// Delay is the wait of EffectDelay (1ms .. MaxDelay).
	Delay Duration `json:"delay,omitempty"`
	// Code is the gRPC status of EffectStatus, by name (e.g. "UNAVAILABLE", "ABORTED"); not OK.
	Code string `json:"code,omitempty"`
	// Message is the status message of EffectStatus (default "fault injected").
	Message string `json:"message,omitempty"`
	// Probability that a matching call is perturbed, in (0, 1]; 0 means 1.
	Probability float64 `json:"probability,omitempty"`
	// MaxCount bounds how many calls the rule perturbs in all; 0 = no bound (until it expires).
	MaxCount int `json:"max_count,omitempty"`
	// Reason says why the rule exists (a game day, a ticket); required.
	Reason string `json:"reason"`
	// ExpiresAt is when the rule stops; required, at most MaxLifetime after it is made.
	ExpiresAt time.Time `json:"expires_at"`
}

// Call describes one participant call for matching.
type Call struct {
	Target, Op, GID, Workflow string
}

// Validate checks every field against its limit; now is the clock ExpiresAt is judged by. The
// error wraps ErrInvalid and names the field (as in JSON).
func (r Rule) Validate(now time.Time) error {
	bad := func(field, format string, args ...any) error {
		return fmt.Errorf("%w: %s %s", ErrInvalid, field, fmt.Sprintf(format, args...))
	}
	for _, f := range []struct {
		name, v string
		limit   int
	}{
		{"target", r.Target, MaxTargetLen}, {"gid_prefix", r.GIDPrefix, MaxGIDPrefixLen},
		{"workflow", r.Workflow, MaxWorkflowLen}, {"reason", r.Reason, MaxReasonLen},
		{"message", r.Message, MaxMessageLen}, {"id", r.ID, 64},
	} {
		if len(f.v) > f.limit {
			return bad(f.name, "is %d bytes; the limit is %d", len(f.v), f.limit)
		}
		if !utf8.ValidString(f.v) || strings.ContainsRune(f.v, 0) {
			return bad(f.name, "is not valid UTF-8 text")
		}
	}
	if strings.TrimSpace(r.Reason) == "" {
		return bad("reason", "is required: say why this fault exists (a game day, a ticket)")
	}
	if r.Op != "" && !contains(Ops(), r.Op) {
		return bad("op", "%q is not one of %s", r.Op, strings.Join(Ops(), ", "))
	}
	switch r.Effect {
	case EffectDelay:
		if r.Delay < Duration(time.Millisecond) || r.Delay > Duration(MaxDelay) {
			return bad("delay", "%s is outside 1ms..%s", time.Duration(r.Delay), MaxDelay)
		}
	case EffectStatus:
		c, ok := CodeByName(r.Code)
		if !ok {
			return bad("code", "%q is not a gRPC status code name such as UNAVAILABLE or ABORTED", r.Code)
		}
		if c == codes.OK {
			return bad("code", "OK is not a fault; use a failing code such as UNAVAILABLE")
		}
	case EffectLostResponse, EffectDrop:
	default:
		names := make([]string, 0, 4)
		for _, e := range Effects() {
			names = append(names, string(e))
		}
		return bad("effect", "%q is not one of %s", r.Effect, strings.Join(names, ", "))
	}
	if r.Effect != EffectDelay && r.Delay != 0 {
		return bad("delay", "is only for effect delay")
	}
	if r.Effect != EffectStatus && (r.Code != "" || r.Message != "") {
		return bad("code", "and message are only for effect status")
	}
	if r.Probability < 0 || r.Probability > 1 || r.Probability != r.Probability {
		return bad("probability", "%v is outside 0..1 (0 means 1)", r.Probability)
	}
	if r.MaxCount < 0 || r.MaxCount > MaxCountLimit {
		return bad("max_count", "%d is outside 0..%d (0 = no bound)", r.MaxCount, MaxCountLimit)
	}
	if r.ExpiresAt.IsZero() {
		return bad("expires_at", "is required: a fault rule must end by itself (at most %s ahead)", MaxLifetime)
	}
	if !r.ExpiresAt.After(now) {
		return bad("expires_at", "%s is not in the future", r.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if r.ExpiresAt.Sub(now) > MaxLifetime {
		return bad("expires_at", "is %s ahead; the limit is %s", r.ExpiresAt.Sub(now).Round(time.Second), MaxLifetime)
	}
	return nil
}

// Matches says whether the rule applies to c (expiry, probability and count aside).
func (r Rule) Matches(c Call) bool {
	return (r.Op == "" || r.Op == c.Op) &&
		strings.HasPrefix(c.GID, r.GIDPrefix) &&
		(r.Workflow == "" || r.Workflow == c.Workflow) &&
		Glob(r.Target, c.Target)
}

// Fires says whether a matching call is perturbed, given u uniform in [0,1).
func (r Rule) Fires(u float64) bool {
	p := r.Probability
	if p == 0 {
		p = 1
	}
	return u < p
}

// StatusCode is the code EffectStatus answers with (codes.Unavailable when Code is empty).
func (r Rule) StatusCode() codes.Code {
	if c, ok := CodeByName(r.Code); ok {
		return c
	}
	return codes.Unavailable
}

// StatusMessage is the message EffectStatus answers with.
func (r Rule) StatusMessage() string {
	if r.Message != "" {
		return r.Message
	}
	return "fault injected"
}

// Describe is the one-line account of a firing, for histories and logs:
// "rule 7: status UNAVAILABLE before sending (reason: game day 12)".
func (r Rule) Describe() string {
	var what string
	switch r.Effect {
	case EffectDelay:
		what = "delayed " + time.Duration(r.Delay).String()
	case EffectStatus:
		what = "status " + r.StatusCode().String() + " before sending"
	case EffectLostResponse:
		what = "call made, response lost (answered UNAVAILABLE)"
	case EffectDrop:
		what = "call dropped (not sent; the caller waits for its timeout)"
	default:
		what = string(r.Effect)
	}
	id := r.ID
	if id == "" {
		id = "-"
	}
	return "rule " + id + ": " + what + " (reason: " + r.Reason + ")"
}

// CodeByName parses a gRPC status code name such as "UNAVAILABLE" (any case) or its number.
func CodeByName(name string) (codes.Code, bool) {
	if name == "" {
		return 0, false
	}
	if n, err := strconv.Atoi(name); err == nil {
		if n >= 0 && n <= 16 {
			return codes.Code(n), true
		}
		return 0, false
	}
	var c codes.Code
	if err := c.UnmarshalJSON([]byte(strconv.Quote(strings.ToUpper(name)))); err != nil {
		return 0, false
	}
	return c, true
}

// Glob matches s against pattern, where '*' stands for any run of characters (also none, also
// '/'); every other character stands for itself. An empty pattern matches everything.
func Glob(pattern, s string) bool {
	if pattern == "" {
		return true
	}
	// Iterative matching with backtracking to the last star: linear in practice, never
	// exponential however many stars a pattern has.
	p, i := 0, 0
	star, mark := -1, 0
	for i < len(s) {
		switch {
		case p < len(pattern) && pattern[p] == '*':
			star, mark = p, i
			p++
		case p < len(pattern) && pattern[p] == s[i]:
			p++
			i++
		case star >= 0:
			p = star + 1
			mark++
			i = mark
		default:
			return false
		}
	}
	for p < len(pattern) && pattern[p] == '*' {
		p++
	}
	return p == len(pattern)
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// Set is an in-memory set of rules with their firing counts: what a participant's interceptor
// applies. It is safe for concurrent use.
type Set struct {
	mu    sync.Mutex
	rules []Rule
	fired []int
}

// NewSet validates the rules (against now) and returns a set of them.
func NewSet(now time.Time, rules ...Rule) (*Set, error) {
	for i, r := range rules {
		if err := r.Validate(now); err != nil {
			return nil, fmt.Errorf("rule %d: %w", i, err)
		}
	}
	return &Set{rules: append([]Rule(nil), rules...), fired: make([]int, len(rules))}, nil
}

// Pick returns the first rule that matches c, is not expired at now, has firings left and
// fires for u; its count is taken. ok is false when no rule fires.
func (s *Set) Pick(c Call, now time.Time, u float64) (Rule, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, r := range s.rules {
		if !now.Before(r.ExpiresAt) || (r.MaxCount > 0 && s.fired[i] >= r.MaxCount) || !r.Matches(c) || !r.Fires(u) {
			continue
		}
		s.fired[i]++
		return r, true
	}
	return Rule{}, false
}

// Fired returns how many times each rule fired, in the order given to NewSet.
func (s *Set) Fired() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.fired...)
}
