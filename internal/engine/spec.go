package engine

import (
	"crypto/sha256"
	"fmt"
	"regexp"
	"sync"
	"time"

	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/pkg/saga"
)

// Limits bound what one request may ask for. Zero values mean the defaults below.
type Limits struct {
	MaxSteps        int           // default 64
	MaxPayloadBytes int           // per action or compensation payload; default 1 MiB
	MaxTimeout      time.Duration // longest saga timeout accepted; default 7 days
	// Targets, when set, decides each participant address of a submitted target (see
	// internal/targetpolicy); a refusal is INVALID_ARGUMENT naming the call and the rule.
	Targets interface{ Check(addr string) error }

	// parsed remembers the targets of accepted calls (set by New; nil: parse every time).
	parsed *targetCache
}

// targetCache remembers what planCall needs of a target that parsed: a coordinator sees the same
// few targets over and over, and parsing one (and naming its endpoint) was 2.5 % of its CPU at
// 2,000 sagas/s (issue 13). It is bounded: when full it starts over, so a client that invents
// targets costs a parse each, as without the cache, and at most maxParsedTargets entries.
type targetCache struct {
	mu sync.RWMutex
	m  map[string]parsedTarget
}

type parsedTarget struct {
	addrs []string // shared: read only
	label string   // endpoint and method, the metric label of the call
}

const maxParsedTargets = 4096

func newTargetCache() *targetCache { return &targetCache{m: make(map[string]parsedTarget)} }

func (c *targetCache) parse(uri string) (parsedTarget, error) {
	if c != nil {
		c.mu.RLock()
		p, ok := c.m[uri]
		c.mu.RUnlock()
		if ok {
			return p, nil
		}
	}
	t, err := invoke.ParseTarget(uri)
	if err != nil {
		return parsedTarget{}, err
	}
	p := parsedTarget{addrs: t.Addrs, label: t.Endpoint() + t.Method}
	if c != nil {
		c.mu.Lock()
		if len(c.m) >= maxParsedTargets {
			c.m = make(map[string]parsedTarget)
		}
		c.m[uri] = p
		c.mu.Unlock()
	}
	return p, nil
}

// Fixed limits, part of the API contract.
const (
	MaxGIDBytes      = 128
	MaxStepNameBytes = 64
	MaxAttemptsLimit = 1000
)

// Defaults applied to fields a request leaves empty.
const (
	DefaultMaxSteps        = 64
	DefaultMaxPayloadBytes = 1 << 20
	DefaultMaxTimeout      = 7 * 24 * time.Hour
	DefaultSagaTimeout     = time.Hour
	DefaultInitialBackoff  = 100 * time.Millisecond // TCC, 2PC and messages; sagas take RetryDefaults
	DefaultMaxBackoff      = 10 * time.Second
	DefaultCallTimeout     = 5 * time.Second
	MaxCallTimeout         = 5 * time.Minute
)

func (l Limits) withDefaults() Limits {
	if l.MaxSteps <= 0 {
		l.MaxSteps = DefaultMaxSteps
	}
	if l.MaxPayloadBytes <= 0 {
		l.MaxPayloadBytes = DefaultMaxPayloadBytes
	}
	if l.MaxTimeout <= 0 {
		l.MaxTimeout = DefaultMaxTimeout
	}
	return l
}

var nameRE = regexp.MustCompile(`^[A-Za-z0-9._:-]+$`)

// ValidateGID checks a caller-chosen gid.
func ValidateGID(gid string) error {
	if len(gid) > MaxGIDBytes {
		return invalid("gid", "is %d bytes, limit %d", len(gid), MaxGIDBytes)
	}
	if !nameRE.MatchString(gid) {
		return invalid("gid", "%q has characters outside [A-Za-z0-9._:-]", gid)
	}
	return nil
}

// step is a validated saga step with its defaults applied.
type step struct {
	name        string
	action      call
	compensate  call
	callTimeout time.Duration
}

type call struct {
	target  string
	payload []byte
	// label is the endpoint and method, parsed once here: metrics and spans name calls by it
	// (bounded cardinality, no payloads) on every attempt.
	label string
}

// sagaPlan is a validated saga: what the state machine needs plus what the engine calls.
type sagaPlan struct {
	steps   []step
	policy  []saga.Step
	timeout time.Duration
}

func durationField(field string, d interface{ AsDuration() time.Duration }, isNil bool, def, max time.Duration) (time.Duration, error) {
	if isNil {
		return def, nil
	}
	v := d.AsDuration()
	if v < 0 {
		return 0, invalid(field, "must not be negative, got %s", v)
	}
	if v == 0 {
		return def, nil
	}
	if max > 0 && v > max {
		return 0, invalid(field, "is %s, limit %s", v, max)
	}
	return v, nil
}

// planSaga validates a submitted saga spec against the limits and applies defaults.
func planSaga(spec *treatyv1.SagaSpec, lim Limits, rd RetryDefaults) (*sagaPlan, error) {
	if spec == nil || len(spec.Steps) == 0 {
		return nil, invalid("saga.steps", "at least one step is required")
	}
	if len(spec.Steps) > lim.MaxSteps {
		return nil, invalid("saga.steps", "has %d steps, limit %d", len(spec.Steps), lim.MaxSteps)
	}
	p := &sagaPlan{}
	var err error
	if p.timeout, err = durationField("saga.timeout", spec.Timeout, spec.Timeout == nil, DefaultSagaTimeout, lim.MaxTimeout); err != nil {
		return nil, err
	}
	seen := make(map[string]int, len(spec.Steps))
	for i, s := range spec.Steps {
		f := fmt.Sprintf("saga.steps[%d]", i)
		if s.Name == "" {
			return nil, invalid(f+".name", "must not be empty")
		}
		if len(s.Name) > MaxStepNameBytes {
			return nil, invalid(f+".name", "is %d bytes, limit %d", len(s.Name), MaxStepNameBytes)
		}
		if !nameRE.MatchString(s.Name) {
			return nil, invalid(f+".name", "%q has characters outside [A-Za-z0-9._:-]", s.Name)
		}
		if j, dup := seen[s.Name]; dup {
			return nil, invalid(f+".name", "%q duplicates saga.steps[%d]", s.Name, j)
		}
		seen[s.Name] = i
		st := step{name: s.Name}
		if st.action, err = planCall(f+".action", s.Action, lim); err != nil {
			return nil, err
		}
		if st.compensate, err = planCall(f+".compensate", s.Compensate, lim); err != nil {
			return nil, err
		}
		if st.callTimeout, err = durationField(f+".call_timeout", s.CallTimeout, s.CallTimeout == nil, DefaultCallTimeout, MaxCallTimeout); err != nil {
			return nil, err
		}
		pol, err := stepPolicy(f, s, rd)
		if err != nil {
			return nil, err
		}
		p.steps = append(p.steps, st)
		p.policy = append(p.policy, pol)
	}
	for i, s := range spec.Steps {
		for _, d := range s.DependsOn {
			if _, ok := seen[d]; !ok {
				return nil, invalid(fmt.Sprintf("saga.steps[%d].depends_on", i), "%q is not a step of this saga", d)
			}
		}
	}
	if err := saga.Validate(saga.Spec{Steps: p.policy, OperatorThreshold: 1}); err != nil {
		return nil, invalid("saga.steps.depends_on", "%v", err)
	}
	return p, nil
}

func planCall(field string, c *treatyv1.Call, lim Limits) (call, error) {
	if c == nil {
		return call{}, invalid(field, "is required")
	}
	t, err := lim.parsed.parse(c.Target)
	if err != nil {
		return call{}, invalid(field+".target", "%v", err)
	}
	if lim.Targets != nil {
		for _, a := range t.addrs {
			if err := lim.Targets.Check(a); err != nil {
				return call{}, invalid(field+".target", "%v", err)
			}
		}
	}
	if len(c.Payload) > lim.MaxPayloadBytes {
		return call{}, invalid(field+".payload", "is %s, limit %s", byteSize(len(c.Payload)), byteSize(lim.MaxPayloadBytes))
	}
	return call{target: c.Target, payload: c.Payload, label: t.label}, nil
}

func byteSize(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d bytes", n)
}

// encodeSpec returns the stored form of a spec and its hash. Deterministic marshaling makes the
// same request produce the same bytes, which is what idempotent submit compares.
func encodeSpec(m proto.Message) ([]byte, []byte, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, nil, fmt.Errorf("encode spec: %w", err)
	}
	h := sha256.Sum256(b)
	return b, h[:], nil
}
