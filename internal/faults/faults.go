// Package faults is the coordinator's side of fault injection for game days: rules (the format
// of pkg/fault) stored in the database through the admin API, read by every replica, and applied
// to the participant calls the engine makes.
//
// It is off unless the coordinator was started with --allow-fault-injection: a stolen operator
// token alone cannot sabotage a production cluster. Off, an Injector still lists the stored rules
// (the dashboard shows them) but refuses to create any and perturbs nothing; the engine is then
// not even given it.
//
// Every replica reloads the live rules every Config.Refresh. A matching rule that fires takes one
// firing from the store first (store.FaultStore.FireFault), so a rule's max_count holds across
// replicas, and a rule deleted or expired on one replica stops everywhere at the next firing.
// When the database cannot be reached, nothing is injected.
package faults

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"strconv"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/fault"
)

// ErrDisabled is returned when rules are created on a coordinator without --allow-fault-injection.
var ErrDisabled = errors.New("fault injection is disabled on this coordinator: start it with --allow-fault-injection (TREATY_ALLOW_FAULT_INJECTION=true) to allow fault rules")

// MaxLiveRules bounds the live rules: each participant call is matched against all of them.
const MaxLiveRules = 100

// ErrTooManyRules is returned when MaxLiveRules live rules exist already.
var ErrTooManyRules = fmt.Errorf("there are %d live fault rules already (the limit): delete one first", MaxLiveRules)

// DefaultRefresh is how often a replica reloads the live rules.
const DefaultRefresh = time.Second

// Config configures an Injector.
type Config struct {
	// Store keeps the rules; required.
	Store store.FaultStore
	// Enabled allows rules to be created and applied (--allow-fault-injection).
	Enabled bool
	// Refresh is how often the live rules are reloaded; default DefaultRefresh.
	Refresh time.Duration
	// Registerer receives the fault metrics; nil = none.
	Registerer prometheus.Registerer
	Logger     *slog.Logger
	// Rand returns uniform numbers in [0,1) for the rules' probability; default math/rand/v2.
	Rand func() float64
	// Now is the clock rules' expiry times are compared with: the database clock (the engine's
	// corrected clock), since the store writes them with it; default time.Now.
	Now func() time.Time
}

// Stored is a rule with what the store knows of it.
type Stored struct {
	Rule      fault.Rule
	Fired     int64
	CreatedBy string
	CreatedAt time.Time
	DeletedBy string
	DeletedAt time.Time
}

// Injector applies stored rules to participant calls (engine.FaultInjector) and manages them for
// the admin API.
type Injector struct {
	cfg      Config
	log      *slog.Logger
	injected *prometheus.CounterVec
	active   prometheus.GaugeFunc

	mu        sync.Mutex
	rules     []fault.Rule
	ids       []int64
	exhausted map[int64]bool // rules whose last firing the store refused (used up)

	stopOnce sync.Once
	started  bool // Start ran (under mu)
	stop     chan struct{}
	done     chan struct{}
}

// New builds an Injector; Start begins reloading rules.
func New(cfg Config) (*Injector, error) {
	if cfg.Store == nil {
		return nil, errors.New("faults: Config.Store is required")
	}
	if cfg.Refresh <= 0 {
		cfg.Refresh = DefaultRefresh
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	i := &Injector{cfg: cfg, log: cfg.Logger, exhausted: map[int64]bool{}, stop: make(chan struct{}), done: make(chan struct{})}
	i.injected = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "treaty_faults_injected_total",
		Help: "Participant calls perturbed by a fault rule on this replica, by effect (delay, status, lost_response, drop) and op.",
	}, []string{"effect", "op"})
	i.active = prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "treaty_fault_rules_active",
		Help: "Live fault rules this replica applies (0 when fault injection is disabled). Alert on it outside game days.",
	}, func() float64 {
		if !cfg.Enabled {
			return 0
		}
		i.mu.Lock()
		defer i.mu.Unlock()
		return float64(len(i.rules))
	})
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(i.injected); err != nil {
			return nil, fmt.Errorf("faults: register metrics: %w", err)
		}
		if err := cfg.Registerer.Register(i.active); err != nil {
			return nil, fmt.Errorf("faults: register metrics: %w", err)
		}
	}
	return i, nil
}

// Enabled says whether this coordinator applies fault rules.
func (i *Injector) Enabled() bool { return i.cfg.Enabled }

// Start loads the live rules and keeps reloading them until Stop (only when enabled: a disabled
// injector applies nothing, so it need not know the rules).
func (i *Injector) Start(ctx context.Context) {
	i.mu.Lock()
	if i.started {
		i.mu.Unlock()
		return
	}
	i.started = true
	i.mu.Unlock()
	if !i.cfg.Enabled {
		close(i.done)
		return
	}
	i.log.Warn("fault injection is ALLOWED on this coordinator (--allow-fault-injection): operators can make participant calls fail; never in production")
	if err := i.Refresh(ctx); err != nil {
		i.log.Warn("could not load fault rules; retrying", "err", err)
	}
	go func() {
		defer close(i.done)
		t := time.NewTicker(i.cfg.Refresh)
		defer t.Stop()
		for {
			select {
			case <-i.stop:
				return
			case <-ctx.Done():
				return
			case <-t.C:
				rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
				if err := i.Refresh(rctx); err != nil {
					i.log.Warn("could not reload fault rules; keeping the last ones", "err", err)
				}
				cancel()
			}
		}
	}()
}

// Stop ends the reloading; it is idempotent, and a no-op when Start never ran.
func (i *Injector) Stop() {
	i.mu.Lock()
	started := i.started
	i.mu.Unlock()
	i.stopOnce.Do(func() { close(i.stop) })
	if started {
		<-i.done
	}
}

// Refresh reloads the live rules from the store.
func (i *Injector) Refresh(ctx context.Context) error {
	rows, err := i.cfg.Store.ListFaults(ctx, false, MaxLiveRules)
	if err != nil {
		return err
	}
	rules := make([]fault.Rule, 0, len(rows))
	ids := make([]int64, 0, len(rows))
	for _, row := range rows {
		s, err := decode(row)
		if err != nil {
			i.log.Warn("skipping a fault rule that does not decode", "id", row.ID, "err", err)
			continue
		}
		rules, ids = append(rules, s.Rule), append(ids, row.ID)
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	i.rules, i.ids = rules, ids
	live := map[int64]bool{}
	for _, id := range ids {
		live[id] = true
	}
	for id := range i.exhausted {
		if !live[id] {
			delete(i.exhausted, id)
		}
	}
	return nil
}

// Rules returns the rules this replica applies now.
func (i *Injector) Rules() []fault.Rule {
	i.mu.Lock()
	defer i.mu.Unlock()
	return append([]fault.Rule(nil), i.rules...)
}

// Call implements engine.FaultInjector.
func (i *Injector) Call(ctx context.Context, workflow string, req invoke.Request,
	next func(context.Context, invoke.Request) invoke.Result) (invoke.Result, string) {
	// Taking a firing is a database round trip: it counts against the call's timeout, which
	// the engine bounded by the lease, so no call made after it outlives the lease.
	start := time.Now()
	pickCtx := ctx
	if req.Timeout > 0 {
		var cancel context.CancelFunc
		pickCtx, cancel = context.WithTimeout(ctx, req.Timeout)
		defer cancel()
	}
	r, ok := i.pick(pickCtx, fault.Call{Target: req.Target, Op: req.Metadata.Op, GID: req.Metadata.GID, Workflow: workflow})
	if req.Timeout > 0 {
		if req.Timeout -= time.Since(start); req.Timeout <= 0 {
			return invoke.Result{Outcome: invoke.Transient, Code: codes.DeadlineExceeded,
				Err: status.Error(codes.DeadlineExceeded, "fault rules could not be read within the call's timeout; not sent")}, ""
		}
	}
	if !ok {
		return next(ctx, req), ""
	}
	i.injected.WithLabelValues(string(r.Effect), req.Metadata.Op).Inc()
	i.log.Info("fault injected", "gid", req.Metadata.GID, "branch", req.Metadata.Branch, "op", req.Metadata.Op, "rule", r.ID, "effect", r.Effect)
	res := Apply(ctx, r, req, next)
	res.Duration = time.Since(start) // from the call's start, the firing's round trip included
	return res, r.Describe()
}

// pick finds the first live rule that matches c and fires, and takes a firing from the store.
func (i *Injector) pick(ctx context.Context, c fault.Call) (fault.Rule, bool) {
	if !i.cfg.Enabled {
		return fault.Rule{}, false
	}
	i.mu.Lock()
	var cands []int
	for k, r := range i.rules {
		if !i.exhausted[i.ids[k]] && r.Matches(c) && i.cfg.Now().Before(r.ExpiresAt) {
			cands = append(cands, k)
		}
	}
	rules, ids := i.rules, i.ids
	i.mu.Unlock()
	for _, k := range cands {
		if !rules[k].Fires(i.cfg.Rand()) {
			continue
		}
		ok, err := i.cfg.Store.FireFault(ctx, ids[k])
		if err != nil {
			i.log.Warn("could not take a firing of a fault rule; not injecting", "rule", ids[k], "err", err)
			continue
		}
		if !ok {
			i.mu.Lock()
			i.exhausted[ids[k]] = true
			i.mu.Unlock()
			continue
		}
		return rules[k], true
	}
	return fault.Rule{}, false
}

// Apply performs rule r's effect on one call: next makes the real call. The result never comes
// later than req.Timeout after the call (a delay counts against the timeout).
func Apply(ctx context.Context, r fault.Rule, req invoke.Request,
	next func(context.Context, invoke.Request) invoke.Result) invoke.Result {
	start := time.Now()
	failed := func(c codes.Code, msg string) invoke.Result {
		out := invoke.Outcome(invoke.Transient)
		if c == codes.Aborted {
			out = invoke.Aborted
		}
		return invoke.Result{Outcome: out, Code: c, Err: status.Error(c, msg), Duration: time.Since(start)}
	}
	switch r.Effect {
	case fault.EffectDelay:
		d := time.Duration(r.Delay)
		if req.Timeout > 0 && d >= req.Timeout {
			wait(ctx, req.Timeout)
			return failed(codes.DeadlineExceeded, "fault injected: delay "+d.String()+" is longer than the call's timeout "+req.Timeout.String()+"; not sent")
		}
		if !wait(ctx, d) {
			return failed(codes.Canceled, "fault injected: cancelled during delay; not sent")
		}
		if req.Timeout > 0 {
			req.Timeout -= d
		}
		res := next(ctx, req)
		res.Duration = time.Since(start)
		return res
	case fault.EffectStatus:
		return failed(r.StatusCode(), r.StatusMessage())
	case fault.EffectLostResponse:
		_ = next(ctx, req)
		return failed(codes.Unavailable, "fault injected: the call was made; its response was lost")
	case fault.EffectDrop:
		if req.Timeout > 0 {
			wait(ctx, req.Timeout)
		} else {
			<-ctx.Done()
		}
		return failed(codes.DeadlineExceeded, "fault injected: call dropped; not sent")
	}
	return next(ctx, req)
}

// wait sleeps d unless ctx ends first; false when it did.
func wait(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Create validates and stores a rule that expires expiresIn from now (database clock).
func (i *Injector) Create(ctx context.Context, r fault.Rule, expiresIn time.Duration, actor string) (Stored, error) {
	if !i.cfg.Enabled {
		return Stored{}, ErrDisabled
	}
	r.ID = ""
	r.ExpiresAt = i.cfg.Now().Add(expiresIn)
	if err := r.Validate(i.cfg.Now()); err != nil {
		return Stored{}, err
	}
	live, err := i.cfg.Store.ListFaults(ctx, false, MaxLiveRules)
	if err != nil {
		return Stored{}, err
	}
	if len(live) >= MaxLiveRules {
		return Stored{}, ErrTooManyRules
	}
	body := r
	body.ExpiresAt, body.Reason = time.Time{}, ""
	b, err := json.Marshal(body)
	if err != nil {
		return Stored{}, err
	}
	row, err := i.cfg.Store.CreateFault(ctx, store.CreateFaultParams{
		Rule: b, MaxCount: r.MaxCount, Reason: r.Reason, CreatedBy: actor, ExpiresIn: expiresIn,
	})
	if err != nil {
		return Stored{}, err
	}
	if err := i.Refresh(ctx); err != nil {
		i.log.Warn("could not reload fault rules after creating one; the next reload picks it up", "err", err)
	}
	return decode(row)
}

// List returns the live rules, or with all also deleted and expired ones (newest first).
func (i *Injector) List(ctx context.Context, all bool, limit int) ([]Stored, error) {
	rows, err := i.cfg.Store.ListFaults(ctx, all, limit)
	if err != nil {
		return nil, err
	}
	out := make([]Stored, 0, len(rows))
	for _, row := range rows {
		s, err := decode(row)
		if err != nil {
			return nil, err
		}
		out = append(out, s)
	}
	return out, nil
}

// Delete ends a rule at once on this replica, and on the others at their next firing or reload.
// Deleting is allowed also when injection is disabled: stopping a fault is always safe.
func (i *Injector) Delete(ctx context.Context, id int64, actor string) (Stored, error) {
	row, err := i.cfg.Store.DeleteFault(ctx, id, actor)
	if err != nil {
		return Stored{}, err
	}
	if err := i.Refresh(ctx); err != nil {
		i.log.Warn("could not reload fault rules after deleting one", "err", err)
	}
	return decode(row)
}

func decode(row store.Fault) (Stored, error) {
	var r fault.Rule
	if err := json.Unmarshal(row.Rule, &r); err != nil {
		return Stored{}, fmt.Errorf("fault rule %d: %w", row.ID, err)
	}
	r.ID = strconv.FormatInt(row.ID, 10)
	r.Reason, r.ExpiresAt, r.MaxCount = row.Reason, row.ExpiresAt, row.MaxCount
	return Stored{Rule: r, Fired: row.Fired, CreatedBy: row.CreatedBy, CreatedAt: row.CreatedAt,
		DeletedBy: row.DeletedBy, DeletedAt: row.DeletedAt}, nil
}
