// Package engine is Treaty's one durable loop: it accepts transactions, drives them through the
// state machines (pkg/saga), calls participants through the invoker, records every decision in
// the store before acting on it, and recovers work that other replicas left behind.
//
// Crash safety: a transaction is in the store before its first participant call; a decision to
// turn back is in the store before its first compensation; each result is in the store before a
// step that depends on it starts; the final outcome is in the store before a caller is told. A
// replica drives a transaction only while it holds its lease, and every write is fenced by the
// epoch it claimed, so a replica that lost its lease can change nothing.
package engine

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
)

// Invoker calls participants. *invoke.Invoker implements it.
type Invoker interface {
	Call(ctx context.Context, req invoke.Request) invoke.Result
}

// Config configures an Engine. Zero values mean the documented defaults.
type Config struct {
	Store   store.Store // required
	Invoker Invoker     // required
	Logger  *slog.Logger

	// Owner identifies this replica in leases; default host-pid-random.
	Owner string
	// Lease is how long a replica owns a transaction without renewing; default 10s.
	Lease time.Duration
	// RecoveryInterval is how often due work is claimed; default 1s.
	RecoveryInterval time.Duration
	// ClaimBatch is how many transactions one claim takes at most; default 64.
	ClaimBatch int
	// MaxActive bounds the transactions this replica drives at once; default 10000.
	MaxActive int
	// MaxActiveBytes bounds the payload bytes held by the transactions this replica drives;
	// new work past it is refused (ErrOverloaded) before anything is written. Default
	// DefaultMaxActiveBytes.
	MaxActiveBytes int64
	// OperatorThreshold is the number of failed attempts of one compensation after which a
	// transaction waits for an operator; default 10.
	OperatorThreshold int
	// CommitBatch bounds how many records one group commit carries; default 256.
	CommitBatch int
	// CommitWorkers is how many group commits may be in flight at once; default 4. A further
	// commit starts only when the next batch is full (see commitLoop).
	CommitWorkers int
	// LazyProgress is how long a saga's forward results may stay unrecorded while its next
	// steps are called: a saga whose steps answer within it is written twice (created,
	// finished) instead of once per step. Only forward progress waits, never a decision to
	// turn back or a final outcome (../DESIGN.md); a crash in the window repeats the calls
	// whose results were not yet written, which participants must tolerate anyway. 0 =
	// DefaultLazyProgress; negative = record every result before the next call.
	LazyProgress time.Duration
	// Limits bound requests.
	Limits Limits
	// Retry is the default retry policy of saga steps (see RetryDefaults).
	Retry RetryDefaults

	// Observer receives metrics events; nil = none.
	Observer Observer
	// Jobs tunes the reconciliation jobs.
	Jobs JobsConfig
	// Tracer makes a span per driven transaction and per participant call; nil = none.
	Tracer trace.Tracer

	// Faults, when set, may perturb participant calls (game days, --allow-fault-injection);
	// nil = never, the default.
	Faults FaultInjector

	// CrashPoint is called at named points of the loop (fault injection for tests); nil = none.
	CrashPoint func(name string)
	// Now is the clock; default time.Now.
	Now func() time.Time
	// Rand returns uniform numbers in [0,1) for jitter; default math/rand/v2.
	Rand func() float64
}

// Observer is told what the engine does, for metrics. Implementations must be fast and safe for
// concurrent use; internal/metrics implements it with Prometheus.
type Observer interface {
	TransactionStarted(mode string)
	// TransactionFinished: outcome is "succeeded", "compensated" or "needs_operator".
	TransactionFinished(mode, outcome string)
	// BranchCall: outcome is "ok", "aborted", "transient" or "not_sent".
	BranchCall(target, op, outcome string, d time.Duration)
	LeasesClaimed(n int)
	LeaseLost()
	GroupCommit(records int)
	// JobRan: a reconciliation job's findings (see JobStatus) and whether it failed.
	JobRan(job string, findings int, failed bool)
}

type noObserver struct{}

func (noObserver) TransactionStarted(string)                        {}
func (noObserver) TransactionFinished(string, string)               {}
func (noObserver) BranchCall(string, string, string, time.Duration) {}
func (noObserver) LeasesClaimed(int)                                {}
func (noObserver) LeaseLost()                                       {}
func (noObserver) GroupCommit(int)                                  {}

// DefaultLazyProgress is Config.LazyProgress when unset: longer than a fast saga takes (so
// that it is written created and finished, nothing between), short enough that a crash repeats
// at most a fraction of a second of calls.
const DefaultLazyProgress = 200 * time.Millisecond

// Crash points passed to Config.CrashPoint.
const (
	CrashAfterCreate     = "after-create"      // the transaction row is written; no call made yet
	CrashAfterCall       = "after-call"        // a participant call returned; its result is not recorded
	CrashAfterRecord     = "after-record"      // a result is recorded; the next step is not started
	CrashAfterCompCall   = "after-compensate"  // a compensation returned; its result is not recorded
	CrashAfterCompRecord = "after-comp-record" // a compensation result is recorded
)

func (c *Config) setDefaults() error {
	if c.Store == nil {
		return errors.New("engine: Config.Store is required")
	}
	if c.Invoker == nil {
		return errors.New("engine: Config.Invoker is required")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Owner == "" {
		host, _ := os.Hostname()
		c.Owner = fmt.Sprintf("%s-%d-%s", host, os.Getpid(), uuid.NewString()[:8])
	}
	if c.Lease <= 0 {
		c.Lease = 10 * time.Second
	}
	if c.RecoveryInterval <= 0 {
		c.RecoveryInterval = time.Second
	}
	if c.ClaimBatch <= 0 {
		c.ClaimBatch = 64
	}
	if c.MaxActive <= 0 {
		c.MaxActive = 10000
	}
	if c.MaxActiveBytes <= 0 {
		c.MaxActiveBytes = DefaultMaxActiveBytes
	}
	if c.OperatorThreshold <= 0 {
		c.OperatorThreshold = 10
	}
	if c.CommitBatch <= 0 {
		c.CommitBatch = 256
	}
	if c.LazyProgress == 0 {
		c.LazyProgress = DefaultLazyProgress
	}
	if c.CommitWorkers <= 0 {
		c.CommitWorkers = 4
	}
	c.Limits = c.Limits.withDefaults()
	c.Limits.parsed = newTargetCache()
	if err := c.Retry.Validate(); err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	c.Retry = c.Retry.withDefaults()
	c.Jobs.setDefaults()
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Rand == nil {
		c.Rand = rand.Float64
	}
	if c.Tracer == nil {
		c.Tracer = noop.NewTracerProvider().Tracer("treaty")
	}
	if c.Observer == nil {
		c.Observer = noObserver{}
	}
	if c.CrashPoint == nil {
		c.CrashPoint = func(string) {}
	}
	return nil
}

// Engine drives transactions. Create it with New, then Start; Stop hands work back.
type Engine struct {
	cfg Config
	log *slog.Logger

	commits chan *recordReq
	// calls runs participant calls on kept goroutines (see workers).
	calls *workers

	mu       sync.Mutex
	active   map[string]*driver
	waiters  map[string][]chan *treatyv1.Transaction // told the final state when a local driver finishes
	started  bool
	stopping bool
	stopCh   chan struct{} // closed when Stop begins: drivers stop dispatching

	// activeBytes (guarded by mu) is the sum of the active drivers' payloadBytes: the memory
	// budget's count.
	activeBytes int64

	drivers      sync.WaitGroup
	loops        sync.WaitGroup
	cancel       context.CancelFunc // stops background loops
	hard         context.CancelFunc // cancels drivers (lease lost for all / hard stop)
	baseCtx      context.Context
	commitCtx    context.Context
	commitCancel context.CancelFunc
	commitWG     sync.WaitGroup
	jobs         jobs
	// clockOffset is the database clock minus this replica's clock, in nanoseconds (clock.go).
	clockOffset atomic.Int64
}

// New validates the configuration.
func New(cfg Config) (*Engine, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	return &Engine{
		cfg:     cfg,
		log:     cfg.Logger.With("owner", cfg.Owner),
		commits: make(chan *recordReq, 4096),
		calls:   newWorkers(10 * time.Second),
		active:  make(map[string]*driver),
		waiters: make(map[string][]chan *treatyv1.Transaction),
		stopCh:  make(chan struct{}),
	}, nil
}

// Owner returns this replica's lease owner id.
func (e *Engine) Owner() string { return e.cfg.Owner }

// Start launches the group committer, the lease renewer and the recovery loop.
func (e *Engine) Start(ctx context.Context) error {
	// Before anything is driven: every persisted time is on the database clock.
	mctx, mcancel := context.WithTimeout(ctx, 10*time.Second)
	if err := e.measureClock(mctx); err != nil {
		e.log.Warn("could not read the database clock at start; assuming no offset until the next measurement", "err", err)
	}
	mcancel()
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.started {
		return errors.New("engine: already started")
	}
	e.started = true
	e.baseCtx, e.hard = context.WithCancel(context.WithoutCancel(ctx))
	e.commitCtx, e.commitCancel = context.WithCancel(context.WithoutCancel(ctx))
	e.commitWG.Add(1)
	go func() { defer e.commitWG.Done(); e.commitLoop(e.commitCtx) }()
	loopCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	e.cancel = cancel
	e.loops.Add(4)
	go func() { defer e.loops.Done(); e.clockLoop(loopCtx) }()
	go func() { defer e.loops.Done(); e.recoveryLoop(loopCtx) }()
	go func() { defer e.loops.Done(); e.jobsLoop(loopCtx) }()
	go func() { defer e.loops.Done(); e.renewLoop(loopCtx) }()
	return nil
}

// Stop stops accepting work, lets drivers finish the calls they have in flight and record them,
// and hands every unfinished transaction back (lease released, due now) so another replica
// continues at once. When ctx ends first, drivers are cancelled and their leases simply expire.
// Stop is idempotent.
func (e *Engine) Stop(ctx context.Context) error {
	e.mu.Lock()
	if !e.started || e.stopping {
		e.mu.Unlock()
		return nil
	}
	e.stopping = true
	close(e.stopCh)
	e.mu.Unlock()

	e.cancel()
	e.loops.Wait()

	done := make(chan struct{})
	go func() { e.drivers.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		e.hard()
		<-done
		err = fmt.Errorf("engine stop: %w", ctx.Err())
	}
	e.hard()
	e.commitCancel()
	e.commitWG.Wait()
	e.calls.stop()
	return err
}

// admit refuses new work while stopping or at capacity, before anything is written.
func (e *Engine) admit() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopping {
		return ErrStopping
	}
	if len(e.active) >= e.cfg.MaxActive {
		return fmt.Errorf("%w: driving %d transactions (--max-active)", ErrOverloaded, len(e.active))
	}
	return nil
}

func (e *Engine) isStopping() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stopping
}

// Active returns how many transactions this replica drives now.
func (e *Engine) Active() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.active)
}

// register adds a driver unless the engine is stopping or the gid is already driven here.
func (e *Engine) register(d *driver) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.stopping || !e.started {
		return false
	}
	if _, ok := e.active[d.gid]; ok {
		return false
	}
	e.active[d.gid] = d
	// The driver works from its plan, which holds the payloads; the encoded spec of its row
	// would be a second copy of every payload for the driver's life.
	d.row.Spec = nil
	d.payloadBytes = payloadBytes(d.m)
	e.activeBytes += d.payloadBytes
	e.drivers.Add(1)
	return true
}

func (e *Engine) unregister(d *driver, final *treatyv1.Transaction) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.active[d.gid] == d {
		delete(e.active, d.gid)
		e.activeBytes -= d.payloadBytes
	}
	// Wake every waiter: with the final state when finished, empty-handed when the driver
	// stopped for another reason (they then read the database).
	for _, ch := range e.waiters[d.gid] {
		if final != nil {
			ch <- final // buffered: never blocks
		}
		close(ch)
	}
	delete(e.waiters, d.gid)
	e.drivers.Done()
}

// watch returns a channel closed when this replica sees gid become terminal, and a func to
// stop watching.
func (e *Engine) watch(gid string) (<-chan *treatyv1.Transaction, func()) {
	ch := make(chan *treatyv1.Transaction, 1)
	e.mu.Lock()
	e.waiters[gid] = append(e.waiters[gid], ch)
	e.mu.Unlock()
	return ch, func() {
		e.mu.Lock()
		defer e.mu.Unlock()
		ws := e.waiters[gid]
		for i, w := range ws {
			if w == ch {
				e.waiters[gid] = append(ws[:i], ws[i+1:]...)
				break
			}
		}
		if len(e.waiters[gid]) == 0 {
			delete(e.waiters, gid)
		}
	}
}

func (noObserver) JobRan(string, int, bool) {}
