// Package app wires a coordinator together: store, invoker, engine, gRPC server with health
// checking and reflection. The CLI, the tests and the benchmark all start coordinators through it.
package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"slices"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/admin"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/faults"
	"github.com/treatyhq/treaty/internal/grpcauth"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/metrics"
	"github.com/treatyhq/treaty/internal/server"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/internal/store/postgres"
	"github.com/treatyhq/treaty/internal/targetpolicy"
	"github.com/treatyhq/treaty/internal/tracing"
)

// Config configures a coordinator.
type Config struct {
	// DB is the PostgreSQL URL (ignored when Store is set).
	DB string
	// Store, when set, is used instead of connecting to DB (the embedded store of dev mode).
	// It must be migrated already; App.Stop closes it.
	Store store.Store
	// DBMaxConns sizes the pool; default 16.
	DBMaxConns int
	// Listen is the gRPC address; "127.0.0.1:0" picks a free port.
	Listen string
	// HTTPListen is the address of /metrics, /healthz and /readyz; empty: no HTTP server.
	HTTPListen string
	// Migrate applies schema migrations at start.
	Migrate bool
	Logger  *slog.Logger
	// Engine holds the engine's settings; Store, Invoker and Logger are filled in here.
	Engine engine.Config
	// Invoke holds the invoker's settings; Logger is filled in here.
	Invoke invoke.Config
	// AdminTokens may call the admin API (/admin/v1) and use the dashboard (/ui), served on
	// HTTPListen. With none and AdminOpen false, the admin API refuses every request.
	AdminTokens []admin.Token
	// AdminOpen serves the admin API without tokens, everyone an operator: dev mode only.
	AdminOpen bool
	// GRPC secures the gRPC API: TLS (mutual with a client CA), bearer tokens and per-client
	// rate limits. The zero value serves plaintext to anyone. Logger and Registerer are filled
	// in here when nil.
	GRPC grpcauth.Config
	// ParticipantTLS, when set, chooses the transport of each participant endpoint; it becomes
	// Invoke.TransportFor, which must then be nil.
	ParticipantTLS *grpcauth.ParticipantTLS
	// MaxRequestBytes bounds one encoded gRPC request, enforced by gRPC's receive limit before a
	// handler runs (RESOURCE_EXHAUSTED naming both sizes); 0 means DefaultMaxRequestBytes, and
	// more than MaxRequestBytesCeiling is refused at start.
	MaxRequestBytes int
	// AllowFaultInjection lets operators inject faults into participant calls through the admin
	// API (/admin/v1/faults), for game days; off by default, and never for production.
	AllowFaultInjection bool
	// FaultRefresh is how often the fault rules are reloaded; default faults.DefaultRefresh.
	FaultRefresh time.Duration
	// AllowTargets are the participant address patterns clients may name (see
	// internal/targetpolicy); empty allows every address but link-local ones and this
	// coordinator's own listen addresses, which are refused whatever the list says (link-local
	// ones unless an IP or CIDR pattern names them).
	AllowTargets []string
	// Tracing exports OpenTelemetry spans (a span per driven transaction and per participant
	// call) over OTLP; off by default. Engine.Tracer, when set, wins (tests record spans).
	Tracing tracing.Config
}

// streamWorkers is how many goroutines the gRPC server keeps for requests (see NewServer).
const streamWorkers = 256

// Request size limits. The default carries a saga of a few steps with payloads of up to the
// default per-payload limit (1 MiB); the ceiling keeps one request well below the default memory
// budget of a replica, whatever an operator sets.
const (
	DefaultMaxRequestBytes = 4 << 20
	MaxRequestBytesCeiling = 256 << 20
)

// App is a running coordinator.
type App struct {
	Engine *engine.Engine
	Store  store.Store
	Addr   string
	// HTTPAddr is where /metrics, /healthz and /readyz answer (empty when disabled).
	HTTPAddr string
	// Registry holds the coordinator's metrics.
	Registry *prometheus.Registry
	// Faults holds the fault-injection rules (applied only with AllowFaultInjection).
	Faults *faults.Injector

	log     *slog.Logger
	inv     *invoke.Invoker
	grpc    *grpc.Server
	health  *health.Server
	http    *http.Server
	admin   *admin.Handler
	served  chan error
	stopped bool
	// stopTracing flushes and stops the tracer provider this app made (nil when it made none).
	stopTracing func(context.Context) error
}

// Start connects, checks the schema, and serves. Stop releases everything.
func Start(ctx context.Context, cfg Config) (*App, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.DBMaxConns <= 0 {
		cfg.DBMaxConns = 16
	}
	st := cfg.Store
	if st == nil {
		if cfg.DB == "" {
			return nil, errors.New("database URL is required")
		}
		pg, err := postgres.Open(ctx, cfg.DB, int32(cfg.DBMaxConns))
		if err != nil {
			return nil, err
		}
		if cfg.Migrate {
			if _, err := postgres.Migrate(ctx, pg.Pool()); err != nil {
				pg.Close()
				return nil, err
			}
		}
		st = pg
	}
	var err error
	a := &App{Store: st, log: cfg.Logger, served: make(chan error, 1)}
	fail := func(err error) (*App, error) {
		if a.Faults != nil {
			a.Faults.Stop()
		}
		if a.inv != nil {
			_ = a.inv.Close()
		}
		st.Close()
		return nil, err
	}
	if err := st.Ping(ctx); err != nil {
		return fail(err)
	}
	cfg.Invoke.Logger = cfg.Logger
	if cfg.ParticipantTLS != nil {
		if cfg.Invoke.TransportFor != nil {
			return fail(errors.New("set ParticipantTLS or Invoke.TransportFor, not both"))
		}
		cfg.Invoke.TransportFor = cfg.ParticipantTLS.TransportFor
	}
	policy, err := targetpolicy.New(cfg.AllowTargets)
	if err != nil {
		return fail(err)
	}
	// Checked on connect too, against what a target's name resolves to.
	cfg.Invoke.DialOptions = append(slices.Clone(cfg.Invoke.DialOptions), grpc.WithContextDialer(policy.DialContext))
	a.inv = invoke.New(cfg.Invoke)
	a.Registry = prometheus.NewRegistry()
	a.Registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	gc := cfg.GRPC
	if gc.Logger == nil {
		gc.Logger = cfg.Logger
	}
	if gc.Registerer == nil {
		gc.Registerer = a.Registry
	}
	maxRequest, err := requestLimit(cfg.MaxRequestBytes)
	if err != nil {
		return fail(err)
	}
	guard, err := grpcauth.New(gc)
	if err != nil {
		return fail(fmt.Errorf("gRPC security: %w", err))
	}
	ec := cfg.Engine
	ec.Store, ec.Invoker, ec.Logger = st, a.inv, cfg.Logger
	// Rules expire on the database clock, which the engine (created below) keeps.
	var eng atomic.Pointer[engine.Engine]
	dbNow := func() time.Time {
		if e := eng.Load(); e != nil {
			return e.Now()
		}
		return time.Now()
	}
	if a.Faults, err = faults.New(faults.Config{Store: st, Enabled: cfg.AllowFaultInjection, Refresh: cfg.FaultRefresh,
		Registerer: a.Registry, Logger: cfg.Logger, Now: dbNow}); err != nil {
		return fail(err)
	}
	if a.Faults.Enabled() {
		ec.Faults = a.Faults
	}
	a.Faults.Start(context.WithoutCancel(ctx))
	if ec.Limits.Targets == nil {
		ec.Limits.Targets = policy
	}
	if ec.Tracer == nil {
		tp, shutdown, err := tracing.New(ctx, cfg.Tracing)
		if err != nil {
			return fail(err)
		}
		a.stopTracing = shutdown
		ec.Tracer = tp.Tracer("github.com/treatyhq/treaty/coordinator")
	}
	if ec.Observer == nil {
		ec.Observer = metrics.New(a.Registry, st, a.inv.BreakerStates, cfg.Logger)
	}
	if a.Engine, err = engine.New(ec); err != nil {
		return fail(err)
	}
	eng.Store(a.Engine)
	a.Registry.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Name: "treaty_active_payload_bytes",
		Help: "Payload bytes held by the transactions this replica drives (bounded by --max-active-bytes).",
	}, func() float64 { return float64(a.Engine.ActiveBytes()) }))
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fail(fmt.Errorf("listen %s: %w", cfg.Listen, err))
	}
	a.Addr = lis.Addr().String()
	if err := policy.AddOwn(a.Addr); err != nil {
		_ = lis.Close()
		return fail(err)
	}
	// Larger requests fail RESOURCE_EXHAUSTED in gRPC's transport, before a handler runs; the
	// per-payload limit is checked besides, by the engine.
	// Every request then passes the checks all share (server.ValidateUnary), after the guard.
	// Stream workers: a request runs on a goroutine kept from earlier requests, whose stack has
	// grown already; a new goroutine per request grows its stack again on every request (7% of
	// the process's CPU in issue 13's profile). Past the workers, requests get a goroutine of
	// their own as before, so a burst of waiting submits never queues behind them.
	a.grpc = grpc.NewServer(append(append([]grpc.ServerOption{grpc.MaxRecvMsgSize(maxRequest),
		grpc.NumStreamWorkers(streamWorkers),
		grpc.ForceServerCodecV2(server.NewCodec()),
		grpc.ChainUnaryInterceptor(tracing.UnaryServerInterceptor)}, guard.ServerOptions()...),
		grpc.ChainUnaryInterceptor(server.ValidateUnary))...)
	treatyv1.RegisterCoordinatorServer(a.grpc, &server.Coordinator{Engine: a.Engine})
	a.health = health.NewServer()
	healthpb.RegisterHealthServer(a.grpc, a.health)
	if err := registerReflection(a.grpc); err != nil {
		_ = lis.Close()
		return fail(err)
	}
	if err := a.Engine.Start(ctx); err != nil {
		_ = lis.Close()
		return fail(err)
	}
	if cfg.HTTPListen != "" {
		a.admin, err = admin.New(admin.Config{Engine: a.Engine, Tokens: cfg.AdminTokens, Open: cfg.AdminOpen, Logger: cfg.Logger, Faults: a.Faults})
		if err != nil {
			_ = lis.Close()
			_ = a.Engine.Stop(context.Background())
			return fail(err)
		}
		hl, err := net.Listen("tcp", cfg.HTTPListen)
		if err != nil {
			_ = lis.Close()
			_ = a.Engine.Stop(context.Background())
			return fail(fmt.Errorf("listen %s: %w", cfg.HTTPListen, err))
		}
		a.HTTPAddr = hl.Addr().String()
		if err := policy.AddOwn(a.HTTPAddr); err != nil {
			_ = lis.Close()
			_ = hl.Close()
			_ = a.Engine.Stop(context.Background())
			return fail(err)
		}
		a.http = &http.Server{Handler: a.httpHandler(), ReadHeaderTimeout: 10 * time.Second}
		go func() { _ = a.http.Serve(hl) }()
	}
	go func() { a.served <- a.grpc.Serve(lis) }()
	a.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	a.health.SetServingStatus(treatyv1.Coordinator_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	a.log.Info("coordinator serving", "grpc", a.Addr, "http", a.HTTPAddr, "owner", a.Engine.Owner())
	a.log.Info("gRPC API security", guard.Describe()...)
	a.log.Info("participant target policy", policy.Describe()...)
	return a, nil
}

// requestLimit applies the default and the ceiling to a configured request size limit.
func requestLimit(n int) (int, error) {
	switch {
	case n == 0:
		return DefaultMaxRequestBytes, nil
	case n < 0 || n > MaxRequestBytesCeiling:
		return 0, fmt.Errorf("max request bytes %d: want 1..%d (%d MiB; 0 = default %d MiB)", n, MaxRequestBytesCeiling, MaxRequestBytesCeiling>>20, DefaultMaxRequestBytes>>20)
	}
	return n, nil
}

// Served is closed-over error channel: it yields when the gRPC server stops by itself.
func (a *App) Served() <-chan error { return a.served }

// Stop stops accepting requests, lets the engine finish in-flight calls and hand unfinished work
// back, then closes connections. When ctx ends first, work is abandoned to lease expiry.
// Stop is idempotent.
func (a *App) Stop(ctx context.Context) error {
	if a.stopped {
		return nil
	}
	a.stopped = true
	a.health.Shutdown()
	graceful := make(chan struct{})
	go func() { a.grpc.GracefulStop(); close(graceful) }()
	err := a.Engine.Stop(ctx)
	select {
	case <-graceful:
	case <-ctx.Done():
		a.grpc.Stop()
		<-graceful
	}
	if a.http != nil {
		_ = a.http.Shutdown(ctx)
	}
	if a.stopTracing != nil {
		_ = a.stopTracing(ctx)
	}
	a.Faults.Stop()
	_ = a.inv.Close()
	a.Store.Close()
	return err
}

// httpHandler serves the operational endpoints. /healthz says the process is alive; /readyz says
// it can do its job (database reachable, schema current) and turns 503 otherwise, so a load
// balancer stops sending it requests. These three need no token (probes and scrapers have none);
// the admin API and dashboard under /admin/v1/ and /ui/ check their own.
func (a *App) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", promhttp.HandlerFor(a.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		defer cancel()
		if err := a.Store.Ping(ctx); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ready\n"))
	})
	a.admin.Register(mux)
	mux.Handle("GET /{$}", http.RedirectHandler(admin.UIPrefix, http.StatusFound))
	return mux
}
