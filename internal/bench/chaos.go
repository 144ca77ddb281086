package bench

import (
	"bytes"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/netfault"
	"github.com/treatyhq/treaty/pkg/fault"
	"github.com/treatyhq/treaty/sdk"
)

// ChaosConfig configures a chaos campaign. Zero values mean the defaults.
type ChaosConfig struct {
	// DB is a PostgreSQL URL whose role may create databases; the campaign makes two of its own
	// (the coordinators' and the ledger's) and drops them at the end. Required.
	DB string
	// Duration of the faulty phase; default 60s.
	Duration time.Duration
	// Replicas is the number of coordinator processes; default 3.
	Replicas int
	// Concurrency is the number of clients starting transfers; default 8.
	Concurrency int
	// Accounts in the ledger, each starting with 1000; default 20.
	Accounts int
	// Lease of the coordinators; default 3s.
	Lease time.Duration
	// ProcessFaultEvery is the mean time between process faults (SIGKILL or SIGSTOP of a
	// replica); default 4s.
	ProcessFaultEvery time.Duration
	// FaultRate is the probability of the injected call faults; default 0.1.
	FaultRate float64
	// NoNetworkFaults turns off the PostgreSQL link faults (blackholes past the lease, resets).
	NoNetworkFaults bool
	// SettleTimeout bounds the wait for every transaction to end; default 5m.
	SettleTimeout time.Duration
	// CoordinatorCmd runs the coordinator CLI (its arguments follow); default: this executable
	// with the argument "coordinator" (treaty-bench embeds the coordinator for this).
	CoordinatorCmd []string
	// Keep keeps the databases.
	Keep bool
	// Logger receives progress; CoordinatorLog receives the replicas' output (nil: discarded).
	Logger         *slog.Logger
	CoordinatorLog io.Writer
}

// ChaosResult is the campaign's outcome, printed as the last line of `treaty-bench chaos`.
type ChaosResult struct {
	Bench                string   `json:"bench"`
	Replicas             int      `json:"replicas"`
	Seconds              float64  `json:"seconds"`
	Transactions         int      `json:"transactions"`
	Sagas                int      `json:"sagas"`
	TCC                  int      `json:"tcc"`
	Succeeded            int      `json:"succeeded"`
	TurnedBack           int      `json:"turned_back"`
	NeverStarted         int      `json:"never_started"`
	Kills                int      `json:"kills"`
	Stops                int      `json:"stops"`
	Partitions           int      `json:"partitions"`
	Resets               int      `json:"resets"`
	ParticipantLink      int      `json:"participant_link_faults"`
	FaultsInjected       int64    `json:"faults_injected"`
	FaultsCoordinator    int64    `json:"faults_coordinator"`
	FaultsParticipant    int64    `json:"faults_participant"`
	Violations           int      `json:"violations"`
	ViolationSamples     []string `json:"violation_samples,omitempty"`
	SecondsToAllTerminal float64  `json:"seconds_to_all_terminal"`
}

const (
	chaosBalance   = 1000
	chaosGIDPrefix = "chaos-"
)

func (c *ChaosConfig) setDefaults() error {
	if c.DB == "" {
		return errors.New("--db (or TREATY_DB) is required")
	}
	if c.Duration <= 0 {
		c.Duration = time.Minute
	}
	if c.Replicas <= 0 {
		c.Replicas = 3
	}
	if c.Concurrency <= 0 {
		c.Concurrency = 8
	}
	if c.Accounts < 2 {
		c.Accounts = 20
	}
	if c.Lease <= 0 {
		c.Lease = 3 * time.Second
	}
	if c.ProcessFaultEvery <= 0 {
		c.ProcessFaultEvery = 4 * time.Second
	}
	if c.FaultRate <= 0 {
		c.FaultRate = 0.1
	}
	if c.FaultRate > 0.5 {
		return fmt.Errorf("--fault-rate %v is above 0.5: transfers would mostly fail", c.FaultRate)
	}
	if c.SettleTimeout <= 0 {
		c.SettleTimeout = 5 * time.Minute
	}
	if len(c.CoordinatorCmd) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find this executable to run coordinators: %w", err)
		}
		c.CoordinatorCmd = []string{exe, "coordinator"}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.CoordinatorLog == nil {
		c.CoordinatorLog = io.Discard
	}
	return nil
}

// chaosReplica is one coordinator process and its link to PostgreSQL.
type chaosReplica struct {
	i     int
	proxy *netfault.Proxy

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	up      bool // running and not stopped
	faulted bool // killed or stopped, or its link cut, and not yet back
	addr    string
	http    string
	conn    *grpc.ClientConn
	raw     treatyv1.CoordinatorClient
	sdk     *sdk.Client
}

type chaosRun struct {
	cfg      ChaosConfig
	log      *slog.Logger
	dbURL    string
	token    string
	replicas []*chaosReplica
	ledger   *ledgerServer
	// partLink is the proxy every call to the ledger goes through.
	partLink *netfault.Proxy
	accounts []string

	mu  sync.Mutex
	txs []chaosTx
	res ChaosResult
}

type chaosTx struct {
	gid, mode, from, to string
	amount              int64
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = crand.Read(b)
	return hex.EncodeToString(b)
}

func freeLocalAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// RunChaos runs a campaign: a money-transfer workload (sagas and TCC) over the ledger
// participant, while replicas are killed and stopped, their database links cut and reset, and
// fault rules perturb participant calls on both sides; then it waits for every transaction to
// end and checks the invariants.
func RunChaos(ctx context.Context, cfg ChaosConfig) (ChaosResult, error) {
	if err := cfg.setDefaults(); err != nil {
		return ChaosResult{}, err
	}
	r := &chaosRun{cfg: cfg, log: cfg.Logger, token: randomHex(16)}
	r.res.Bench, r.res.Replicas = "chaos", cfg.Replicas
	coordDB, err := CreateTempDatabase(ctx, cfg.DB, "treaty_chaos_")
	if err != nil {
		return r.res, err
	}
	ledgerDB, err := CreateTempDatabase(ctx, cfg.DB, "treaty_chaos_ledger_")
	if err != nil {
		_ = coordDB.Drop(context.WithoutCancel(ctx))
		return r.res, err
	}
	defer func() {
		if cfg.Keep {
			r.log.Info("keeping the databases", "coordinator", coordDB.Name, "ledger", ledgerDB.Name)
			return
		}
		_ = coordDB.Drop(context.WithoutCancel(ctx))
		_ = ledgerDB.Drop(context.WithoutCancel(ctx))
	}()
	r.dbURL = coordDB.URL
	for i := range cfg.Accounts {
		r.accounts = append(r.accounts, fmt.Sprintf("acct-%02d", i))
	}
	until := time.Now().Add(cfg.Duration)
	rules, err := fault.NewSet(time.Now(),
		fault.Rule{ID: "p-action-unavailable", GIDPrefix: chaosGIDPrefix, Op: "action", Effect: fault.EffectStatus, Code: "UNAVAILABLE", Probability: cfg.FaultRate / 2, Reason: "chaos campaign", ExpiresAt: until},
		fault.Rule{ID: "p-cancel-lost", GIDPrefix: chaosGIDPrefix, Op: "cancel", Effect: fault.EffectLostResponse, Probability: cfg.FaultRate / 2, Reason: "chaos campaign", ExpiresAt: until},
		fault.Rule{ID: "p-compensate-lost", GIDPrefix: chaosGIDPrefix, Op: "compensate", Effect: fault.EffectLostResponse, Probability: cfg.FaultRate / 2, Reason: "chaos campaign", ExpiresAt: until},
	)
	if err != nil {
		return r.res, err
	}
	if r.ledger, err = startLedger(ctx, ledgerDB.URL, r.accounts, chaosBalance, rules); err != nil {
		return r.res, err
	}
	defer r.ledger.stop()
	if r.partLink, err = netfault.Start(r.ledger.addr); err != nil {
		return r.res, err
	}
	defer r.partLink.Close()
	r.ledger.via = r.partLink.Addr()

	if err := r.migrate(ctx); err != nil {
		return r.res, err
	}
	u, err := url.Parse(coordDB.URL)
	if err != nil {
		return r.res, err
	}
	for i := range cfg.Replicas {
		p, err := netfault.Start(u.Host)
		if err != nil {
			return r.res, err
		}
		defer p.Close()
		rep := &chaosReplica{i: i, proxy: p}
		r.replicas = append(r.replicas, rep)
	}
	defer r.stopAll()
	for _, rep := range r.replicas {
		if err := r.start(ctx, rep); err != nil {
			return r.res, err
		}
	}
	if err := r.createCoordinatorRules(ctx, cfg.Duration); err != nil {
		return r.res, err
	}
	r.log.Info("chaos campaign running", "duration", cfg.Duration, "replicas", cfg.Replicas, "fault_rate", cfg.FaultRate)
	start := time.Now()

	// The faulty phase: workload, process faults, network faults.
	phase, stopPhase := context.WithDeadline(ctx, until)
	var wg sync.WaitGroup
	var seq atomic.Int64
	for w := range cfg.Concurrency {
		wg.Add(1)
		go func() { defer wg.Done(); r.worker(phase, w, &seq) }()
	}
	wg.Add(1)
	go func() { defer wg.Done(); r.processFaults(phase) }()
	if !cfg.NoNetworkFaults {
		wg.Add(1)
		go func() { defer wg.Done(); r.networkFaults(phase) }()
	}
	wg.Wait()
	stopPhase()
	r.res.Seconds = time.Since(start).Seconds()
	if ctx.Err() != nil {
		return r.res, ctx.Err()
	}

	// Heal everything, then let the cluster finish.
	settle := time.Now()
	if err := r.healAll(ctx); err != nil {
		return r.res, err
	}
	r.log.Info("faults over; waiting for every transaction to end", "transactions", len(r.txs))
	views, err := r.waitTerminal(ctx)
	if err != nil {
		return r.res, err
	}
	r.res.SecondsToAllTerminal = time.Since(settle).Seconds()
	r.res.FaultsCoordinator = r.coordinatorFaults(ctx)
	r.res.FaultsParticipant = r.ledger.faults.Load()
	r.res.FaultsInjected = r.res.FaultsCoordinator + r.res.FaultsParticipant
	if err := r.check(ctx, views); err != nil {
		return r.res, err
	}
	return r.res, nil
}

func (r *chaosRun) violation(format string, args ...any) {
	r.res.Violations++
	if len(r.res.ViolationSamples) < 20 {
		r.res.ViolationSamples = append(r.res.ViolationSamples, fmt.Sprintf(format, args...))
	}
}

func (r *chaosRun) coordinatorCmd(ctx context.Context, args ...string) *exec.Cmd {
	argv := append(append([]string(nil), r.cfg.CoordinatorCmd...), args...)
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = append(os.Environ(), "TREATY_ADMIN_TOKENS=operator:"+r.token)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	return cmd
}

func (r *chaosRun) migrate(ctx context.Context) error {
	out, err := r.coordinatorCmd(ctx, "migrate", "--db", r.dbURL).CombinedOutput()
	if err != nil {
		return fmt.Errorf("coordinator migrate: %w: %s", err, out)
	}
	return nil
}

// start runs a replica's process and waits until it is ready.
func (r *chaosRun) start(ctx context.Context, rep *chaosReplica) error {
	addr, err := freeLocalAddr()
	if err != nil {
		return err
	}
	httpAddr, err := freeLocalAddr()
	if err != nil {
		return err
	}
	u, _ := url.Parse(r.dbURL)
	u.Host = rep.proxy.Addr()
	// Not CommandContext: a replica must outlive a cancelled phase until stopAll ends it.
	cmd := r.coordinatorCmd(context.WithoutCancel(ctx), "serve", "--db", u.String(), "--listen", addr, "--http-listen", httpAddr,
		"--owner", fmt.Sprintf("chaos-r%d", rep.i), "--lease", r.cfg.Lease.String(), "--recovery-interval", "200ms",
		"--allow-fault-injection", "--log-level", "warn", "--reconcile-interval", "5s", "--stuck-after", "30s")
	cmd.Stdout, cmd.Stderr = r.cfg.CoordinatorLog, r.cfg.CoordinatorLog
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start replica %d: %w", rep.i, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		_ = cmd.Process.Kill()
		return err
	}
	cl, err := sdk.Dial(ctx, sdk.Options{Address: addr, CallTimeout: 5 * time.Second})
	if err != nil {
		_ = conn.Close()
		_ = cmd.Process.Kill()
		return err
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		res, err := http.Get("http://" + httpAddr + "/readyz")
		if err == nil {
			_ = res.Body.Close()
			if res.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case <-done:
			_ = conn.Close()
			_ = cl.Close()
			return fmt.Errorf("replica %d exited while starting", rep.i)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			_ = conn.Close()
			_ = cl.Close()
			return fmt.Errorf("replica %d not ready within a minute", rep.i)
		}
	}
	rep.mu.Lock()
	defer rep.mu.Unlock()
	if rep.conn != nil {
		_ = rep.conn.Close()
		_ = rep.sdk.Close()
	}
	rep.cmd, rep.done, rep.addr, rep.http, rep.conn, rep.raw, rep.sdk = cmd, done, addr, httpAddr, conn, treatyv1.NewCoordinatorClient(conn), cl
	rep.up, rep.faulted = true, false
	return nil
}

// pick returns a random replica that is up, or nil.
func (r *chaosRun) pick() *chaosReplica {
	var ups []*chaosReplica
	for _, rep := range r.replicas {
		rep.mu.Lock()
		if rep.up {
			ups = append(ups, rep)
		}
		rep.mu.Unlock()
	}
	if len(ups) == 0 {
		return nil
	}
	return ups[rand.IntN(len(ups))]
}

// healthy counts replicas without a fault in progress.
func (r *chaosRun) healthy() int {
	n := 0
	for _, rep := range r.replicas {
		rep.mu.Lock()
		if rep.up && !rep.faulted {
			n++
		}
		rep.mu.Unlock()
	}
	return n
}

// victim picks a healthy replica to fault, keeping at least one healthy; nil when none may go.
func (r *chaosRun) victim() *chaosReplica {
	if r.healthy() < 2 {
		return nil
	}
	var cands []*chaosReplica
	for _, rep := range r.replicas {
		rep.mu.Lock()
		if rep.up && !rep.faulted {
			cands = append(cands, rep)
		}
		rep.mu.Unlock()
	}
	if len(cands) == 0 {
		return nil
	}
	rep := cands[rand.IntN(len(cands))]
	rep.mu.Lock()
	rep.faulted = true
	rep.mu.Unlock()
	return rep
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// jitter returns a duration uniform in [d/2, 3d/2).
func jitter(d time.Duration) time.Duration { return d/2 + time.Duration(rand.Int64N(int64(d))) }

// processFaults SIGKILLs (then restarts) or SIGSTOPs (past the lease, then SIGCONTs) replicas.
func (r *chaosRun) processFaults(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for sleepCtx(ctx, jitter(r.cfg.ProcessFaultEvery)) {
		rep := r.victim()
		if rep == nil {
			continue
		}
		rep.mu.Lock()
		proc := rep.cmd.Process
		rep.mu.Unlock()
		if rand.IntN(10) < 6 {
			_ = proc.Signal(syscall.SIGKILL)
			r.mu.Lock()
			r.res.Kills++
			r.mu.Unlock()
			rep.mu.Lock()
			rep.up = false
			done := rep.done
			rep.mu.Unlock()
			r.log.Info("SIGKILL", "replica", rep.i)
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-done
				sleepCtx(context.WithoutCancel(ctx), jitter(time.Second))
				if err := r.start(context.WithoutCancel(ctx), rep); err != nil {
					r.log.Warn("restart failed; trying again at the end", "replica", rep.i, "err", err)
				}
			}()
			continue
		}
		_ = proc.Signal(syscall.SIGSTOP)
		r.mu.Lock()
		r.res.Stops++
		r.mu.Unlock()
		rep.mu.Lock()
		rep.up = false
		rep.mu.Unlock()
		r.log.Info("SIGSTOP past the lease", "replica", rep.i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			sleepCtx(ctx, r.cfg.Lease*3/2)
			_ = proc.Signal(syscall.SIGCONT)
			rep.mu.Lock()
			rep.up, rep.faulted = true, false
			rep.mu.Unlock()
		}()
	}
}

// networkFaults cuts a replica's link to PostgreSQL past its lease, or resets its connections,
// or resets the connections to the participant and slows that link for a while.
func (r *chaosRun) networkFaults(ctx context.Context) {
	for sleepCtx(ctx, jitter(2*r.cfg.ProcessFaultEvery)) {
		if rand.IntN(3) == 0 {
			n := r.partLink.Reset()
			r.partLink.SetLatency(50 * time.Millisecond)
			r.log.Info("participant link: connections reset, 50ms latency for a while", "connections", n)
			r.mu.Lock()
			r.res.ParticipantLink++
			r.mu.Unlock()
			sleepCtx(ctx, r.cfg.Lease)
			r.partLink.SetLatency(0)
			continue
		}
		rep := r.victim()
		if rep == nil {
			continue
		}
		if rand.IntN(2) == 0 {
			r.log.Info("blackhole to PostgreSQL past the lease", "replica", rep.i)
			rep.proxy.Blackhole()
			r.mu.Lock()
			r.res.Partitions++
			r.mu.Unlock()
			sleepCtx(ctx, r.cfg.Lease+time.Second)
			rep.proxy.Heal()
		} else {
			n := rep.proxy.Reset()
			r.log.Info("reset PostgreSQL connections", "replica", rep.i, "connections", n)
			r.mu.Lock()
			r.res.Resets++
			r.mu.Unlock()
		}
		rep.mu.Lock()
		rep.faulted = false
		rep.mu.Unlock()
	}
}

// healAll ends every fault and restarts every replica that is down.
func (r *chaosRun) healAll(ctx context.Context) error {
	r.partLink.SetLatency(0)
	for _, rep := range r.replicas {
		rep.proxy.Heal()
		rep.mu.Lock()
		proc, done := rep.cmd.Process, rep.done
		rep.mu.Unlock()
		_ = proc.Signal(syscall.SIGCONT)
		select {
		case <-done:
			if err := r.start(ctx, rep); err != nil {
				return err
			}
		default:
			rep.mu.Lock()
			rep.up, rep.faulted = true, false
			rep.mu.Unlock()
		}
	}
	return nil
}

func (r *chaosRun) stopAll() {
	for _, rep := range r.replicas {
		rep.mu.Lock()
		cmd, done := rep.cmd, rep.done
		if rep.conn != nil {
			_ = rep.conn.Close()
			_ = rep.sdk.Close()
		}
		rep.mu.Unlock()
		if cmd == nil {
			continue
		}
		_ = cmd.Process.Signal(syscall.SIGCONT)
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}
}

// admin calls a replica's admin API with the campaign's operator token.
func (r *chaosRun) admin(ctx context.Context, method, path string, body any, out any) error {
	rep := r.pick()
	if rep == nil {
		return errors.New("no replica up")
	}
	rep.mu.Lock()
	base := "http://" + rep.http
	rep.mu.Unlock()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+r.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	if res.StatusCode >= 300 {
		return fmt.Errorf("%s %s: %s: %s", method, path, res.Status, b)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

// createCoordinatorRules stores the coordinator-side fault rules through the admin API.
func (r *chaosRun) createCoordinatorRules(ctx context.Context, d time.Duration) error {
	p := r.cfg.FaultRate
	expires := (d + time.Second).Round(time.Second).String()
	for _, rule := range []map[string]any{
		{"op": "action", "effect": "delay", "delay": "300ms", "probability": p},
		{"op": "action", "effect": "lost_response", "probability": p / 2},
		{"op": "compensate", "effect": "status", "code": "UNAVAILABLE", "probability": p},
		{"op": "confirm", "effect": "lost_response", "probability": p},
		{"op": "cancel", "effect": "drop", "probability": p / 4},
	} {
		rule["gid_prefix"], rule["reason"], rule["expires_in"] = chaosGIDPrefix, "treaty-bench chaos campaign", expires
		if err := r.admin(ctx, "POST", "/admin/v1/faults", rule, nil); err != nil {
			return fmt.Errorf("create fault rule: %w", err)
		}
	}
	return nil
}

// coordinatorFaults sums the firings of every rule the campaign made.
func (r *chaosRun) coordinatorFaults(ctx context.Context) int64 {
	var list struct {
		Faults []struct {
			Fired int64 `json:"fired"`
		} `json:"faults"`
	}
	if err := r.admin(ctx, "GET", "/admin/v1/faults?all=true", nil, &list); err != nil {
		r.log.Warn("could not read the fault rules' counts", "err", err)
		return 0
	}
	var n int64
	for _, f := range list.Faults {
		n += f.Fired
	}
	return n
}

var retryPolicy = &treatyv1.RetryPolicy{MaxAttempts: 20, InitialBackoff: durationpb.New(20 * time.Millisecond), MaxBackoff: durationpb.New(500 * time.Millisecond)}

// worker starts transfers until ctx ends: sagas (credit the payee, then debit the payer) and TCC
// (freeze at the payer, announce at the payee). Errors are expected: what happened to each
// transfer is read back at the end.
func (r *chaosRun) worker(ctx context.Context, w int, seq *atomic.Int64) {
	for ctx.Err() == nil {
		rep := r.pick()
		if rep == nil {
			sleepCtx(ctx, 100*time.Millisecond)
			continue
		}
		rep.mu.Lock()
		raw, cl := rep.raw, rep.sdk
		rep.mu.Unlock()
		i, j := rand.IntN(len(r.accounts)), rand.IntN(len(r.accounts)-1)
		if j >= i {
			j++
		}
		tx := chaosTx{from: r.accounts[i], to: r.accounts[j], amount: 1 + rand.Int64N(200)}
		tx.mode = "saga"
		if rand.IntN(10) < 3 {
			tx.mode = "tcc"
		}
		tx.gid = fmt.Sprintf("%s%s-%d-%06d", chaosGIDPrefix, tx.mode, w, seq.Add(1))
		r.mu.Lock()
		r.txs = append(r.txs, tx)
		r.mu.Unlock()
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
		if tx.mode == "saga" {
			_, _ = raw.SubmitSaga(cctx, &treatyv1.SubmitSagaRequest{Gid: tx.gid, Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{
				{Name: "credit", Action: &treatyv1.Call{Target: r.ledger.target(opCredit), Payload: ledgerPayload(tx.to, tx.amount)},
					Compensate: &treatyv1.Call{Target: r.ledger.target(opUncredit), Payload: ledgerPayload(tx.to, tx.amount)},
					Retry:      retryPolicy, CallTimeout: durationpb.New(2 * time.Second)},
				{Name: "debit", DependsOn: []string{"credit"}, Action: &treatyv1.Call{Target: r.ledger.target(opDebit), Payload: ledgerPayload(tx.from, tx.amount)},
					Compensate: &treatyv1.Call{Target: r.ledger.target(opRefund), Payload: ledgerPayload(tx.from, tx.amount)},
					Retry:      retryPolicy, CallTimeout: durationpb.New(2 * time.Second)},
			}}})
		} else {
			branch := func(name, try, confirm, cancel, account string) sdk.TCCBranch {
				p := ledgerPayload(account, tx.amount)
				return sdk.TCCBranch{Name: name, Try: sdk.Call{Target: r.ledger.target(try), Payload: p},
					Confirm: sdk.Call{Target: r.ledger.target(confirm), Payload: p}, Cancel: sdk.Call{Target: r.ledger.target(cancel), Payload: p},
					Retry: &sdk.Retry{MaxAttempts: 20, InitialBackoff: 20 * time.Millisecond, MaxBackoff: 500 * time.Millisecond}, CallTimeout: 2 * time.Second}
			}
			_, _ = cl.TCC(cctx, sdk.TCCOptions{GID: tx.gid, Timeout: 5 * time.Second, Wait: -1}, func(ctx context.Context, s *sdk.TCCScope) error {
				if _, err := s.Try(ctx, branch("payer", opFreeze, opSpendFrozen, opUnfreeze, tx.from)); err != nil {
					return err
				}
				_, err := s.Try(ctx, branch("payee", opExpect, opReceive, opUnexpect, tx.to))
				return err
			})
		}
		cancel()
	}
}

// waitTerminal polls every transaction until it has ended (or never existed).
func (r *chaosRun) waitTerminal(ctx context.Context) (map[string]*treatyv1.Transaction, error) {
	views := map[string]*treatyv1.Transaction{}
	missing := map[string]bool{}
	start := time.Now()
	deadline := start.Add(r.cfg.SettleTimeout)
	for {
		pending := 0
		for _, tx := range r.txs {
			if v := views[tx.gid]; v != nil {
				continue
			}
			delete(missing, tx.gid) // asked again: a write held by a healed link may land late
			rep := r.pick()
			if rep == nil {
				return nil, errors.New("no replica up to read transactions")
			}
			rep.mu.Lock()
			raw := rep.raw
			rep.mu.Unlock()
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			res, err := raw.GetTransaction(cctx, &treatyv1.GetTransactionRequest{Gid: tx.gid})
			cancel()
			switch {
			case status.Code(err) == codes.NotFound:
				missing[tx.gid] = true // the submission has not reached the database (yet)
			case err != nil:
				pending++
			case res.Transaction.Status == treatyv1.Status_STATUS_SUCCEEDED || res.Transaction.Status == treatyv1.Status_STATUS_COMPENSATED:
				views[tx.gid] = res.Transaction
			default:
				pending++
			}
		}
		// A submission that never reached the database stays missing; one that a blackholed link
		// held reaches it once healed. Two leases after the heal, every held write has landed.
		if pending == 0 && time.Since(start) > 2*r.cfg.Lease {
			for gid := range missing {
				views[gid] = nil
			}
			return views, nil
		}
		if time.Now().After(deadline) {
			for _, tx := range r.txs {
				if _, ok := views[tx.gid]; !ok && !missing[tx.gid] {
					r.violation("transaction %s not terminal %s after the faults ended", tx.gid, r.cfg.SettleTimeout)
				}
			}
			for gid := range missing {
				views[gid] = nil
			}
			return views, nil
		}
		if !sleepCtx(ctx, 200*time.Millisecond) {
			return nil, ctx.Err()
		}
	}
}

// check compares the coordinator's outcome of every transfer with the ledger's records.
func (r *chaosRun) check(ctx context.Context, views map[string]*treatyv1.Transaction) error {
	rows, err := r.ledger.rows(ctx)
	if err != nil {
		return err
	}
	known := map[string]bool{}
	for _, tx := range r.txs {
		known[tx.gid] = true
		r.res.Transactions++
		if tx.mode == "saga" {
			r.res.Sagas++
		} else {
			r.res.TCC++
		}
		v, seen := views[tx.gid]
		if !seen {
			continue // reported as not terminal
		}
		want := map[string]ledgerDelta{}
		switch {
		case v == nil:
			r.res.NeverStarted++
		case v.Status == treatyv1.Status_STATUS_SUCCEEDED:
			r.res.Succeeded++
			want[tx.from] = ledgerDelta{balance: -tx.amount}
			want[tx.to] = ledgerDelta{balance: tx.amount}
		default:
			r.res.TurnedBack++
		}
		got := map[string]ledgerDelta{}
		applied := map[string]int{}
		for _, row := range rows[tx.gid] {
			d := got[row.account]
			d.balance, d.frozen, d.pending = d.balance+row.d.balance, d.frozen+row.d.frozen, d.pending+row.d.pending
			got[row.account] = d
			applied[row.branch+"/"+row.op]++
			if applied[row.branch+"/"+row.op] == 2 {
				r.violation("%s: %s %s applied twice", tx.gid, row.branch, row.op)
			}
			if v == nil {
				r.violation("%s: the ledger changed for a transaction the coordinator never had", tx.gid)
				continue
			}
			// A forward call whose outcome the coordinator never learned (its answer lost, then
			// the transfer turned back) is consistent when the coordinator undid it.
			undone := row.op == "action" && branchSucceeded(v, row.branch, "compensate")
			if row.op != "try" && !undone && !branchSucceeded(v, row.branch, row.op) {
				r.violation("%s: the ledger applied %s %s, the coordinator's history does not say it succeeded", tx.gid, row.branch, row.op)
			}
		}
		for _, acct := range []string{tx.from, tx.to} {
			if got[acct] != want[acct] {
				r.violation("%s (%s, %v): account %s moved %+v, want %+v (transfer half applied)", tx.gid, tx.mode, statusOf(v), acct, got[acct], want[acct])
			}
		}
		for acct := range got {
			if acct != tx.from && acct != tx.to {
				r.violation("%s: touched account %s outside the transfer", tx.gid, acct)
			}
		}
	}
	for gid := range rows {
		if !known[gid] {
			r.violation("ledger rows for unknown gid %s", gid)
		}
	}
	totals, err := r.ledger.totals(ctx)
	if err != nil {
		return err
	}
	if want := int64(len(r.accounts)) * chaosBalance; totals.balance != want || totals.frozen != 0 || totals.pending != 0 {
		r.violation("money not conserved: balances %d (want %d), frozen %d, pending %d (want 0)", totals.balance, want, totals.frozen, totals.pending)
	}
	return nil
}

func statusOf(v *treatyv1.Transaction) string {
	if v == nil {
		return "never started"
	}
	return v.Status.String()
}

func branchSucceeded(v *treatyv1.Transaction, branch, op string) bool {
	for _, b := range v.Branches {
		if b.Name == branch && b.Op == op {
			return b.Status == treatyv1.BranchStatus_BRANCH_STATUS_SUCCEEDED
		}
	}
	return false
}

const chaosUsage = `treaty-bench chaos: a fault campaign against your own PostgreSQL.

It starts --replicas coordinator processes (this executable, command "coordinator") on a database
of its own, each reaching PostgreSQL through a TCP proxy, and a ledger participant of its own
(accounts in another database, behind the SDK's barrier). For --duration, clients move money
between accounts with sagas and TCC transactions while the campaign:
  - SIGKILLs replicas (restarting them) and SIGSTOPs them for longer than the lease;
  - cuts a replica's link to PostgreSQL for longer than the lease, or resets its connections,
    and resets and slows the link to the participant;
  - injects call faults through fault rules on the coordinators (/admin/v1/faults: delays,
    lost responses, UNAVAILABLE, dropped calls) and in the participant (sdk/participant).
Then it heals everything, waits for every transaction to end, and checks that money is
conserved, no transfer is half applied, nothing was applied twice, every transaction ended, and
the coordinators' histories agree with the ledger. The last line is JSON; the exit code is 1 on
any violation.

Flags:`

// ChaosMain is `treaty-bench chaos`.
func ChaosMain(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	var cfg ChaosConfig
	var verbose bool
	fs := flag.NewFlagSet("chaos", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, chaosUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&cfg.DB, "db", getenv("TREATY_DB"), "PostgreSQL URL (or TREATY_DB); the role needs CREATEDB")
	fs.DurationVar(&cfg.Duration, "duration", time.Minute, "how long faults are injected")
	fs.IntVar(&cfg.Replicas, "replicas", 3, "coordinator processes")
	fs.IntVar(&cfg.Concurrency, "concurrency", 8, "clients starting transfers at once")
	fs.IntVar(&cfg.Accounts, "accounts", 20, "ledger accounts, 1000 each")
	fs.DurationVar(&cfg.Lease, "lease", 3*time.Second, "the coordinators' --lease")
	fs.DurationVar(&cfg.ProcessFaultEvery, "process-fault-every", 4*time.Second, "mean time between SIGKILL/SIGSTOP of a replica")
	fs.Float64Var(&cfg.FaultRate, "fault-rate", 0.1, "probability of the injected call faults (0 < rate <= 0.5)")
	fs.BoolVar(&cfg.NoNetworkFaults, "no-network-faults", false, "do not cut or reset the replicas' links to PostgreSQL")
	fs.DurationVar(&cfg.SettleTimeout, "settle-timeout", 5*time.Minute, "how long every transaction may take to end once the faults stop")
	fs.BoolVar(&cfg.Keep, "keep", false, "keep the treaty_chaos_* databases")
	fs.BoolVar(&verbose, "v", false, "show the coordinators' warnings")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "treaty-bench chaos: unexpected argument %q (flags start with --)\n", fs.Arg(0))
		return 2
	}
	if cfg.Replicas < 2 {
		fmt.Fprintf(stderr, "treaty-bench chaos: --replicas is %d, must be at least 2 (one must survive each fault)\n", cfg.Replicas)
		return 2
	}
	if cfg.FaultRate <= 0 || cfg.FaultRate > 0.5 {
		fmt.Fprintf(stderr, "treaty-bench chaos: --fault-rate is %v, must be within (0, 0.5]\n", cfg.FaultRate)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	if verbose {
		cfg.CoordinatorLog = stderr
	}
	res, err := RunChaos(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "treaty-bench chaos: %v\n", err)
		return 1
	}
	for _, v := range res.ViolationSamples {
		fmt.Fprintln(stderr, "VIOLATION:", v)
	}
	line, err := json.Marshal(res)
	if err != nil {
		fmt.Fprintf(stderr, "treaty-bench chaos: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, strings.TrimSpace(string(line)))
	if res.Violations > 0 {
		return 1
	}
	return 0
}
