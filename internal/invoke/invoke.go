// Package invoke calls participants' gRPC methods without their generated code.
//
// The coordinator knows a step only as a target URI and an opaque payload (the serialized
// request protobuf). An Invoker sends that payload as is with a raw bytes codec named "proto",
// so any existing unary gRPC method can be a step, and hands back the raw response bytes.
//
// # Endpoints
//
// A target names one or more addresses and a method. Calls to targets with the same address set
// (in any order, for any method) share one endpoint: one lazily created *grpc.ClientConn that
// balances round-robin over the addresses, one circuit breaker and one concurrency limit. One
// sick participant therefore fails fast and cannot take every slot of the coordinator.
//
// # Outcomes
//
// Call never returns a Go error. Every answer is a Result whose Outcome is OK (codes.OK),
// Aborted (codes.Aborted: the participant's business "no", not retried) or Transient (anything
// else, including local failures such as an open breaker, no concurrency slot before the
// deadline, an invalid target or a closed Invoker: the call may or may not have taken effect and
// is retried by the engine).
//
// # A participant that comes back
//
// A restarted participant is reached within about a second of its return: the reconnect backoff
// is capped at 1s, and a call that finds its connection failing (TRANSIENT_FAILURE) resets that
// backoff, so a new connection is attempted at once, and waits up to a second (within its own
// timeout) for it instead of failing with the last connection error. An open breaker
// refuses calls without sending them (they are not attempts) and says when it will let a trial
// call through (Result.RetryAfter); that trial call follows the same rule.
package invoke

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"
)

// Outcome classifies a participant's answer; the values mean what pkg/saga's do.
type Outcome int

const (
	// OK: the call took effect.
	OK Outcome = iota + 1
	// Aborted: the participant refused for a business reason; do not retry.
	Aborted
	// Transient: anything else; the call may or may not have taken effect and is retried.
	Transient
)

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

// Metadata keys sent on every call, so participants (and their barrier) know which transaction,
// branch and operation a call belongs to.
const (
	MetadataGID    = "x-treaty-gid"
	MetadataBranch = "x-treaty-branch"
	MetadataOp     = "x-treaty-op"
	MetadataMode   = "x-treaty-mode"
)

// Metadata is what a call carries besides its payload.
type Metadata struct {
	GID, Branch, Op, Mode string
}

// Request is one call to make.
type Request struct {
	Target   string        // URI as accepted by ParseTarget (parsed and cached by the Invoker)
	Payload  []byte        // the serialized request protobuf, sent as is
	Timeout  time.Duration // per-call timeout; 0 = Config.DefaultTimeout
	Metadata Metadata
}

// Result is the answer to one call.
type Result struct {
	Outcome Outcome
	Code    codes.Code
	// Err is nil when OK. Otherwise it is the participant's status error (message preserved), or
	// for local failures an error that wraps one of this package's sentinels (ErrBreakerOpen,
	// ErrNoSlot, ErrClosed, ErrInvalidTarget, ErrInvalidRequest, ErrTransport) and whose
	// status.Code is Code.
	Err      error
	Response []byte        // raw response bytes when OK (nil when the response was empty)
	Duration time.Duration // from entering Call to its return, slot wait included
	// RetryAfter, for a call refused by an open breaker, is how long until the breaker lets a
	// trial call through; 0 otherwise.
	RetryAfter time.Duration
}

// Errors wrapped by local failures, for errors.Is.
var (
	ErrBreakerOpen    = errors.New("circuit breaker open")
	ErrNoSlot         = errors.New("no concurrency slot")
	ErrClosed         = errors.New("invoker closed")
	ErrInvalidRequest = errors.New("invalid request")
	ErrTransport      = errors.New("transport setup failed")
)

// BreakerConfig tunes the circuit breaker each endpoint has. Zero values mean the defaults.
type BreakerConfig struct {
	// FailureThreshold is the number of consecutive transient failures that opens the breaker.
	// 0 = DefaultBreakerFailures (5).
	FailureThreshold uint32
	// OpenTimeout is how long an open breaker fails calls fast before it lets trial calls
	// through (half-open). 0 = DefaultBreakerOpenTimeout (1s): a participant that is back is
	// reached within about that.
	OpenTimeout time.Duration
	// HalfOpenCalls is the number of trial calls let through while half-open; that many
	// successes close the breaker, one failure opens it again. 0 = 1.
	HalfOpenCalls uint32
}

// Config configures an Invoker. Zero values mean the documented defaults.
type Config struct {
	// Logger receives connection and breaker events. nil = discard.
	Logger *slog.Logger
	// DefaultTimeout applies to requests whose Timeout is 0. 0 = 5s.
	DefaultTimeout time.Duration
	// MaxConcurrentPerTarget caps calls in flight per endpoint (address set). Calls beyond it
	// wait for a slot until their deadline, then fail Transient with ErrNoSlot. <= 0 = 64.
	MaxConcurrentPerTarget int
	// Breaker tunes the per-endpoint circuit breaker.
	Breaker BreakerConfig
	// DialOptions are added to every connection after the defaults (insecure credentials,
	// round-robin balancing, a reconnect backoff capped at 1s), so they can override them.
	DialOptions []grpc.DialOption
	// TransportFor, if set, returns extra dial options (credentials, for per-target TLS) for an
	// endpoint's address list; they come after DialOptions. It is called once per endpoint,
	// when its connection is created. An error fails the call Transient with ErrTransport and
	// the next call tries again.
	TransportFor func(addrs []string) ([]grpc.DialOption, error)
	// MaxEndpoints bounds the endpoints (address sets, each with a connection and a breaker)
	// kept at once: clients choose targets, so the state kept for them must have a ceiling.
	// A new endpoint past it takes the place of the one unused longest, if that one has been
	// idle for EndpointIdle; otherwise the call fails Transient with ErrTooManyEndpoints and is
	// retried like any other. <= 0 = DefaultMaxEndpoints.
	MaxEndpoints int
	// EndpointIdle is how long an endpoint must have gone without calls before it may be
	// closed to make room. <= 0 = DefaultEndpointIdle.
	EndpointIdle time.Duration
}

// Endpoint cache defaults, for documentation and flags.
const (
	DefaultMaxEndpoints = 1024
	DefaultEndpointIdle = time.Minute
	// maxCachedTargets bounds the parsed-URI cache (a target differs from another by its
	// method too, which clients choose freely); past it the cache starts over.
	maxCachedTargets = 16384
)

// ErrTooManyEndpoints: MaxEndpoints endpoints are in use and none has been idle long enough to
// make room.
var ErrTooManyEndpoints = errors.New("invoke: too many participant endpoints in use")

const (
	defaultTimeout       = 5 * time.Second
	defaultMaxConcurrent = 64
	defaultFailures      = DefaultBreakerFailures
	defaultOpenTimeout   = DefaultBreakerOpenTimeout

	// The manual resolver's scheme. It lives only in each connection's own resolver list
	// (grpc.WithResolvers), never in the global registry.
	resolverScheme = "treaty-invoke"
	// round_robin spreads calls over all addresses of a target instead of pinning the first.
	serviceConfig = `{"loadBalancingConfig":[{"round_robin":{}}]}`
	// gRPC's default reconnect backoff grows to 120s, which would keep failing calls long after
	// a participant came back. Capped at 1s, a participant that is back is reached within about
	// a second; a failed dial to a loopback or LAN address costs little, and the breaker sheds
	// the calls themselves while it is down.
	maxReconnectBackoff = time.Second
)

// Breaker defaults, for documentation and flags.
const (
	DefaultBreakerFailures    = 5
	DefaultBreakerOpenTimeout = time.Second
)

// Invoker makes dynamic gRPC calls. It is safe for concurrent use; create one per process and
// Close it on shutdown.
type Invoker struct {
	logger         *slog.Logger
	defaultTimeout time.Duration
	maxConcurrent  int
	breaker        BreakerConfig
	dialOptions    []grpc.DialOption
	transportFor   func([]string) ([]grpc.DialOption, error)
	maxEndpoints   int
	endpointIdle   time.Duration

	mu        sync.RWMutex
	closed    bool
	targets   map[string]route     // by target URI, so a URI is parsed once
	endpoints map[string]*endpoint // by Target.Endpoint()
}

// route is a parsed target bound to its endpoint.
type route struct {
	method   string
	endpoint *endpoint
}

// endpoint is everything shared by the calls to one address set.
type endpoint struct {
	key     string
	conn    *grpc.ClientConn
	breaker *gobreaker.TwoStepCircuitBreaker[struct{}]
	slots   chan struct{} // a buffered channel as a counting semaphore
	// openUntil is when the breaker, if open, lets a trial call through (unix nanoseconds).
	openUntil atomic.Int64
	// lastUsed is when a call last took this endpoint (unix nanoseconds), for eviction.
	lastUsed atomic.Int64
}

// New returns an Invoker. It dials nothing: connections are made on first use.
func New(cfg Config) *Invoker {
	i := &Invoker{
		logger:         cfg.Logger,
		defaultTimeout: cfg.DefaultTimeout,
		maxConcurrent:  cfg.MaxConcurrentPerTarget,
		breaker:        cfg.Breaker,
		dialOptions:    cfg.DialOptions,
		transportFor:   cfg.TransportFor,
		maxEndpoints:   cfg.MaxEndpoints,
		endpointIdle:   cfg.EndpointIdle,
		targets:        make(map[string]route),
		endpoints:      make(map[string]*endpoint),
	}
	if i.logger == nil {
		i.logger = slog.New(slog.DiscardHandler)
	}
	if i.defaultTimeout <= 0 {
		i.defaultTimeout = defaultTimeout
	}
	if i.maxConcurrent <= 0 {
		i.maxConcurrent = defaultMaxConcurrent
	}
	if i.breaker.FailureThreshold == 0 {
		i.breaker.FailureThreshold = defaultFailures
	}
	if i.breaker.OpenTimeout <= 0 {
		i.breaker.OpenTimeout = defaultOpenTimeout
	}
	if i.breaker.HalfOpenCalls == 0 {
		i.breaker.HalfOpenCalls = 1
	}
	if i.maxEndpoints <= 0 {
		i.maxEndpoints = DefaultMaxEndpoints
	}
	if i.endpointIdle <= 0 {
		i.endpointIdle = DefaultEndpointIdle
	}
	return i
}

// Call makes one unary call. It never panics and never returns a Go error: every failure is a
// Result with Outcome Transient (or Aborted for codes.Aborted). Both ctx's deadline and the
// request's timeout apply; the earlier one travels to the participant as grpc-timeout.
func (i *Invoker) Call(ctx context.Context, req Request) (res Result) {
	start := time.Now()
	defer func() {
		// A panic here would take down every transaction the coordinator drives; turn it into
		// a transient failure the engine retries, and leave the evidence in the log.
		if p := recover(); p != nil {
			i.logger.Error("invoke: panic in Call", "target", req.Target, "panic", p,
				"stack", string(debug.Stack()))
			res = failure(codes.Internal, fmt.Errorf("invoke: internal error calling %q: panic: %v", req.Target, p))
		}
		res.Duration = time.Since(start)
	}()

	if req.Timeout < 0 {
		return failure(codes.InvalidArgument, fmt.Errorf("%w: timeout %v for target %q, want >= 0 (0 = default %v)",
			ErrInvalidRequest, req.Timeout, req.Target, i.defaultTimeout))
	}
	rt, err := i.route(req.Target)
	if err != nil {
		return failure(errorCode(err), err)
	}
	ep := rt.endpoint
	ep.lastUsed.Store(time.Now().UnixNano())

	timeout := req.Timeout
	if timeout == 0 {
		timeout = i.defaultTimeout
	}
	callCtx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	done, err := ep.breaker.Allow()
	if err != nil {
		// Open, or half-open with all its trial calls already in flight. Not sent: the engine
		// comes back when a trial call may go through.
		res := failure(codes.Unavailable, fmt.Errorf("%w: the breaker for target %s is %s, failing fast",
			ErrBreakerOpen, ep.key, ep.breaker.State()))
		if errors.Is(err, gobreaker.ErrOpenState) {
			res.RetryAfter = max(0, time.Until(time.Unix(0, ep.openUntil.Load())))
		}
		return res
	}
	// Every Allow must be answered, or a half-open breaker would wait forever for its trial
	// call; the verdict stays "excluded" on any path that says nothing about the participant.
	verdict := errExcluded
	defer func() { done(verdict) }()

	select {
	case ep.slots <- struct{}{}:
	default:
		select {
		case ep.slots <- struct{}{}:
		case <-callCtx.Done():
			// Our own queue, not the participant, ran out of time: slow participants trip the
			// breaker through the calls that did run.
			return failure(codes.ResourceExhausted, fmt.Errorf(
				"%w: target %s: all %d concurrent call slots stayed busy until the deadline (resource exhausted): %w",
				ErrNoSlot, ep.key, i.maxConcurrent, context.Cause(callCtx)))
		}
	}
	defer func() { <-ep.slots }()

	callCtx = metadata.AppendToOutgoingContext(callCtx,
		MetadataGID, req.Metadata.GID,
		MetadataBranch, req.Metadata.Branch,
		MetadataOp, req.Metadata.Op,
		MetadataMode, req.Metadata.Mode,
	)
	ep.redialIfFailing(callCtx)
	var resp []byte
	err = ep.conn.Invoke(callCtx, rt.method, req.Payload, &resp, grpc.ForceCodecV2(RawCodec{}))
	if err == nil {
		verdict = nil
		return Result{Outcome: OK, Code: codes.OK, Response: resp}
	}
	st := status.Convert(err)
	switch {
	case st.Code() == codes.Aborted:
		// A business "no" is a healthy answer: it must not trip the breaker.
		verdict = nil
		return Result{Outcome: Aborted, Code: codes.Aborted, Err: err}
	case i.isClosed():
		err = &localError{code: st.Code(), err: fmt.Errorf("%w: call to %s%s interrupted: %w",
			ErrClosed, ep.key, rt.method, err)}
	case st.Code() == codes.Canceled && ctx.Err() != nil:
		// The caller gave up; that says nothing about the participant's health.
	default:
		verdict = errTransient
	}
	return Result{Outcome: Transient, Code: st.Code(), Err: err}
}

// Close closes every cached connection. Calls in flight fail Transient; later calls fail
// Transient with ErrClosed. It is idempotent.
func (i *Invoker) Close() error {
	i.mu.Lock()
	if i.closed {
		i.mu.Unlock()
		return nil
	}
	i.closed = true
	endpoints := i.endpoints
	i.endpoints = nil
	i.targets = nil
	i.mu.Unlock()

	var errs []error
	for _, ep := range endpoints {
		if err := ep.conn.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close connection to %s: %w", ep.key, err))
		}
	}
	return errors.Join(errs...)
}

// BreakerStates reports each endpoint's breaker state ("closed", "open" or "half-open"), keyed
// by Target.Endpoint(), for metrics.
func (i *Invoker) BreakerStates() map[string]string {
	i.mu.RLock()
	defer i.mu.RUnlock()
	states := make(map[string]string, len(i.endpoints))
	for key, ep := range i.endpoints {
		states[key] = ep.breaker.State().String()
	}
	return states
}

func (i *Invoker) isClosed() bool {
	i.mu.RLock()
	defer i.mu.RUnlock()
	return i.closed
}

// route returns the parsed target and its endpoint, creating both on first use. Creation happens
// under the write lock so that concurrent first calls share one connection instead of racing to
// dial; grpc.NewClient does no I/O, so holding the lock is cheap.
func (i *Invoker) route(uri string) (route, error) {
	i.mu.RLock()
	rt, ok := i.targets[uri]
	closed := i.closed
	i.mu.RUnlock()
	if closed {
		return route{}, &localError{code: codes.Unavailable, err: fmt.Errorf("%w: cannot call %q", ErrClosed, uri)}
	}
	if ok {
		return rt, nil
	}

	t, err := ParseTarget(uri)
	if err != nil {
		return route{}, &localError{code: codes.InvalidArgument, err: err}
	}
	key := t.Endpoint()

	i.mu.Lock()
	defer i.mu.Unlock()
	if i.closed {
		return route{}, &localError{code: codes.Unavailable, err: fmt.Errorf("%w: cannot call %q", ErrClosed, uri)}
	}
	if rt, ok := i.targets[uri]; ok {
		return rt, nil
	}
	ep, ok := i.endpoints[key]
	if !ok {
		if len(i.endpoints) >= i.maxEndpoints && !i.evictIdleLocked() {
			return route{}, &localError{code: codes.ResourceExhausted, err: fmt.Errorf(
				"%w: %d endpoints, none idle for %v; target %s waits its turn", ErrTooManyEndpoints, len(i.endpoints), i.endpointIdle, key)}
		}
		ep, err = i.newEndpoint(key, t.Addrs)
		if err != nil {
			return route{}, &localError{code: codes.Unavailable, err: err}
		}
		ep.lastUsed.Store(time.Now().UnixNano())
		i.endpoints[key] = ep
	}
	rt = route{method: t.Method, endpoint: ep}
	if len(i.targets) >= maxCachedTargets {
		i.targets = make(map[string]route)
	}
	i.targets[uri] = rt
	return rt, nil
}

// evictIdleLocked closes the endpoint unused longest, if it has had no call for endpointIdle
// and none is in flight, and forgets the routes to it. i.mu must be held for writing.
func (i *Invoker) evictIdleLocked() bool {
	var victim *endpoint
	for _, ep := range i.endpoints {
		if len(ep.slots) == 0 && (victim == nil || ep.lastUsed.Load() < victim.lastUsed.Load()) {
			victim = ep
		}
	}
	if victim == nil || time.Since(time.Unix(0, victim.lastUsed.Load())) < i.endpointIdle {
		return false
	}
	delete(i.endpoints, victim.key)
	for uri, rt := range i.targets {
		if rt.endpoint == victim {
			delete(i.targets, uri)
		}
	}
	i.logger.Info("invoke: closing an idle endpoint to make room", "endpoint", victim.key, "max_endpoints", i.maxEndpoints)
	// A call that took this endpoint just before it was chosen fails Transient and is retried.
	if err := victim.conn.Close(); err != nil {
		i.logger.Warn("invoke: closing an idle endpoint", "endpoint", victim.key, "err", err)
	}
	return true
}

func (i *Invoker) newEndpoint(key string, addrs []string) (*endpoint, error) {
	// Each connection gets its own manual resolver: registering a resolver globally would be
	// package-level mutable state shared by every Invoker in the process.
	r := manual.NewBuilderWithScheme(resolverScheme)
	state := resolver.State{Addresses: make([]resolver.Address, len(addrs))}
	for n, a := range addrs {
		state.Addresses[n] = resolver.Address{Addr: a}
	}
	r.InitialState(state)

	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithResolvers(r),
		grpc.WithDefaultServiceConfig(serviceConfig),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: maxReconnectBackoff},
			MinConnectTimeout: 5 * time.Second,
		}),
	}
	opts = append(opts, i.dialOptions...)
	if i.transportFor != nil {
		extra, err := i.transportFor(addrs)
		if err != nil {
			return nil, fmt.Errorf("%w: target %s: transport options: %w", ErrTransport, key, err)
		}
		opts = append(opts, extra...)
	}
	// The first address is the :authority (and later the TLS server name unless the transport
	// options say otherwise); the resolver, not this string, decides where calls go.
	conn, err := grpc.NewClient(resolverScheme+":///"+addrs[0], opts...)
	if err != nil {
		return nil, fmt.Errorf("%w: target %s: %w", ErrTransport, key, err)
	}

	logger := i.logger.With("endpoint", key)
	ep := &endpoint{key: key, conn: conn, slots: make(chan struct{}, i.maxConcurrent)}
	openTimeout := i.breaker.OpenTimeout
	threshold := i.breaker.FailureThreshold
	breaker := gobreaker.NewTwoStepCircuitBreaker[struct{}](gobreaker.Settings{
		Name:        key,
		MaxRequests: i.breaker.HalfOpenCalls,
		Timeout:     i.breaker.OpenTimeout,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= threshold },
		IsExcluded:  func(err error) bool { return errors.Is(err, errExcluded) },
		OnStateChange: func(_ string, from, to gobreaker.State) {
			level := slog.LevelInfo
			if to == gobreaker.StateOpen {
				level = slog.LevelWarn
				// Called under the breaker's lock as it opens, so this matches its expiry.
				ep.openUntil.Store(time.Now().Add(openTimeout).UnixNano())
			}
			logger.Log(context.Background(), level, "invoke: circuit breaker state changed",
				"from", from.String(), "to", to.String())
		},
	})
	logger.Debug("invoke: new endpoint", "addrs", addrs)
	ep.breaker = breaker
	return ep, nil
}

// redialWait bounds how long a call waits for a fresh connection when it found the last one
// failed: long enough for a dial to a participant that is back, short enough that a call to one
// that is still down fails in about a second (within the call's own timeout).
const redialWait = time.Second

// redialIfFailing makes a call that finds its connection not ready dial at once and wait up to
// redialWait for it. Without this the call would fail straight away with the last dial error
// until the reconnect backoff ends, although the participant may be back already. The channel's
// state says little about what its dialer is doing: TRANSIENT_FAILURE is sticky until a dial
// succeeds, so a dial that began before the participant came back and fails after it changes
// nothing a watcher could see (CI saw such a call fail with "connection refused" after the
// participant was listening). So the call asks for a connection and, until it is READY, resets
// the backoff every redialPoll: a fresh dial at most that often per call (a reset is a no-op
// while a dial is under way). If the connection is not ready by then, the call goes on and fails
// with the newest error.
func (ep *endpoint) redialIfFailing(ctx context.Context) {
	state := ep.conn.GetState()
	if state == connectivity.Ready || state == connectivity.Shutdown {
		return // the hot path
	}
	ctx, cancel := context.WithTimeout(ctx, redialWait)
	defer cancel()
	ep.conn.Connect() // leaves IDLE; no-op otherwise
	for state != connectivity.Ready && state != connectivity.Shutdown {
		ep.conn.ResetConnectBackoff()
		poll, stop := context.WithTimeout(ctx, redialPoll)
		ep.conn.WaitForStateChange(poll, state)
		stop()
		if ctx.Err() != nil {
			return
		}
		state = ep.conn.GetState()
	}
}

// redialPoll is how often a waiting call asks for a fresh dial (see redialIfFailing).
const redialPoll = 100 * time.Millisecond

// Breaker verdicts: a nil error counts as a success.
var (
	errTransient = errors.New("transient failure")
	errExcluded  = errors.New("not the participant's doing")
)

// localError is a failure decided here rather than by the participant. It carries a gRPC code so
// status.Code(err) agrees with Result.Code, and unwraps to the sentinel for errors.Is.
type localError struct {
	code codes.Code
	err  error
}

func (e *localError) Error() string              { return e.err.Error() }
func (e *localError) Unwrap() error              { return e.err }
func (e *localError) GRPCStatus() *status.Status { return status.New(e.code, e.err.Error()) }

func failure(code codes.Code, err error) Result {
	var le *localError
	if !errors.As(err, &le) {
		err = &localError{code: code, err: err}
	}
	return Result{Outcome: Transient, Code: code, Err: err}
}

func errorCode(err error) codes.Code {
	var le *localError
	if errors.As(err, &le) {
		return le.code
	}
	return codes.Unknown
}
