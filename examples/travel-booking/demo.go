package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"time"

	"github.com/segmentio/kafka-go"
	"github.com/twmb/franz-go/pkg/kfake"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	carv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/car/v1"
	flightv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/flight/v1"
	hotelv1 "github.com/treatyhq/treaty/examples/travel-booking/gen/travel/hotel/v1"
	"github.com/treatyhq/treaty/internal/app"
	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store/sqlite"
	"github.com/treatyhq/treaty/sdk"
)

// WorkflowName is the registered saga that books a trip.
const WorkflowName = "book-trip"

// Outcomes of a trip.
const (
	outcomeBooked     = "booked"
	outcomeRolledBack = "rolled back"
	outcomeEither     = "booked or rolled back" // an expectation only: --trips races for seats
)

// demo is one run: the broker, the three services, the coordinator, the consumer and the
// client that books trips.
type demo struct {
	cfg     config
	out     io.Writer
	log     *slog.Logger
	run     string
	rng     *rand.Rand
	started time.Time

	be       *backend
	tmpDir   string // removed at the end (default state directory)
	broker   *kfake.Cluster
	services []*service // flight, hotel, car
	coord    *app.App
	client   *sdk.Client
	notif    *notifier
	version  int

	trips []*trip
}

// run runs the demo and reports whether every outcome was as expected. An error means the demo
// could not run at all.
func run(ctx context.Context, cfg config, out, stderr io.Writer) (bool, error) {
	d := &demo{cfg: cfg, out: out, log: cfg.logger(stderr), run: fmt.Sprintf("%06x", rand.Uint32()&0xffffff), started: time.Now()}
	if d.cfg.seed == 0 {
		d.cfg.seed = rand.Uint64()
	}
	d.rng = rand.New(rand.NewPCG(d.cfg.seed, d.cfg.seed^0x5eed))
	defer d.shutdown()
	if err := d.setup(ctx); err != nil {
		return false, err
	}
	var err error
	if cfg.trips > 0 {
		err = d.bookMany(ctx)
	} else {
		err = d.story(ctx)
	}
	if err != nil {
		return false, err
	}
	s, err := d.finish(ctx)
	if err != nil {
		return false, err
	}
	d.printSummary(s)
	return s.OK, nil
}

// say prints a line of the story unless --quiet.
func (d *demo) say(format string, args ...any) {
	if !d.cfg.quiet {
		fmt.Fprintf(d.out, format+"\n", args...)
	}
}

func (d *demo) setup(ctx context.Context) error {
	d.be = &backend{pgURL: d.cfg.db, log: d.log}
	if d.be.postgres() {
		if err := d.be.resetPostgres(ctx); err != nil {
			return err
		}
	} else if err := d.stateDir(); err != nil {
		return err
	}
	if err := d.startBroker(ctx); err != nil {
		return err
	}
	for _, s := range []struct{ name, title, unit string }{{"flight", "Flight", "seat"}, {"hotel", "Hotel", "room"}, {"car", "Car", "car"}} {
		f := &faults{refuse: d.cfg.fail == s.name, chaos: d.cfg.chaos}
		svc := newService(s.name, s.title, s.unit, d.run, d.be, f)
		if err := svc.start(ctx); err != nil {
			return err
		}
		d.services = append(d.services, svc)
		if err := seed(ctx, svc.store.current().db, d.inventoryFor(s.name)); err != nil {
			return err
		}
	}
	if err := d.startCoordinator(ctx); err != nil {
		return err
	}
	var err error
	if d.notif, err = startNotifier(ctx, d.be, d.run, d.log); err != nil {
		return err
	}
	if d.client, err = sdk.Dial(ctx, sdk.Options{Address: d.coord.Addr, Logger: d.log}); err != nil {
		return err
	}
	d.printSetup()
	return d.registerWorkflow(ctx)
}

// stateDir picks the directory of the SQLite files: --state-dir (new or empty, kept) or a
// temporary one (removed at the end).
func (d *demo) stateDir() error {
	if d.cfg.stateDir == "" {
		dir, err := os.MkdirTemp("", "travel-booking-")
		if err != nil {
			return err
		}
		d.be.dir, d.tmpDir = dir, dir
		return nil
	}
	if err := os.MkdirAll(d.cfg.stateDir, 0o755); err != nil {
		return fmt.Errorf("--state-dir: %w", err)
	}
	entries, err := os.ReadDir(d.cfg.stateDir)
	if err != nil {
		return fmt.Errorf("--state-dir: %w", err)
	}
	if len(entries) > 0 {
		return fmt.Errorf("--state-dir %s holds %d entries; give a new or empty directory so the run starts from the seeded inventories", d.cfg.stateDir, len(entries))
	}
	d.be.dir = d.cfg.stateDir
	return nil
}

func (d *demo) startBroker(ctx context.Context) error {
	if d.cfg.brokers == "" {
		c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, EventsTopic))
		if err != nil {
			return fmt.Errorf("start the embedded Kafka broker: %w", err)
		}
		d.broker = c
		d.be.brokers = c.ListenAddrs()
		return nil
	}
	d.be.brokers = strings.Split(d.cfg.brokers, ",")
	// Create the topic unless it exists; the relays do not create topics.
	cl := &kafka.Client{Addr: kafka.TCP(d.be.brokers...), Timeout: 10 * time.Second}
	res, err := cl.CreateTopics(ctx, &kafka.CreateTopicsRequest{Topics: []kafka.TopicConfig{{Topic: EventsTopic, NumPartitions: 3, ReplicationFactor: 1}}})
	if err != nil {
		return fmt.Errorf("--brokers %s: create topic %s: %w", d.cfg.brokers, EventsTopic, err)
	}
	if err := res.Errors[EventsTopic]; err != nil && !errors.Is(err, kafka.TopicAlreadyExists) {
		return fmt.Errorf("--brokers %s: create topic %s: %w", d.cfg.brokers, EventsTopic, err)
	}
	return nil
}

// startCoordinator runs the coordinator in this process, as `coordinator dev` does: on the
// embedded SQLite store, or on PostgreSQL with --db. Retries and reconnections are tuned for
// a demo that should take seconds.
func (d *demo) startCoordinator(ctx context.Context) error {
	cfg := app.Config{
		Listen: "127.0.0.1:0",
		Logger: d.log,
		Engine: engine.Config{Lease: 5 * time.Second, RecoveryInterval: 100 * time.Millisecond},
		Invoke: invoke.Config{
			Breaker: invoke.BreakerConfig{FailureThreshold: 10, OpenTimeout: 200 * time.Millisecond},
			// A restarted participant is found again within half a second.
			DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 500 * time.Millisecond},
				MinConnectTimeout: 2 * time.Second,
			})},
		},
	}
	if d.be.postgres() {
		cfg.DB, cfg.Migrate = d.cfg.db, true
	} else {
		st, err := sqlite.Open(ctx, d.be.sqlitePath("coordinator"))
		if err != nil {
			return err
		}
		if _, err := st.Migrate(ctx); err != nil {
			st.Close()
			return err
		}
		cfg.Store = st
	}
	a, err := app.Start(ctx, cfg)
	if err != nil {
		return fmt.Errorf("start the coordinator: %w", err)
	}
	d.coord = a
	return nil
}

func (d *demo) printSetup() {
	where := func(name string) string {
		if d.be.postgres() {
			return "PostgreSQL schema " + schema(name)
		}
		return "SQLite " + d.be.sqlitePath(name)
	}
	coordStore := "embedded SQLite store " + d.be.sqlitePath("coordinator")
	if d.be.postgres() {
		coordStore = "PostgreSQL store (--db)"
	}
	broker := "embedded Kafka-protocol broker (kfake)"
	if d.broker == nil {
		broker = "Kafka (--brokers)"
	}
	d.say("Treaty travel-booking demo, run %s: one process, everything on loopback.", d.run)
	d.say("  coordinator    %-16s %s", d.coord.Addr, coordStore)
	for _, s := range d.services {
		d.say("  %-14s %-16s %s: inventory, barrier, outbox (+ relay)", s.inv.name+" service", s.Addr(), where(s.inv.name))
	}
	d.say("  notifications  %-16s %s: inbox; consumer group travel-notifications-%s", "(consumer)", where("notifications"), d.run)
	d.say("  Kafka          %-16s %s, topic %s", strings.Join(d.be.brokers, ","), broker, EventsTopic)
	if d.cfg.fail != "" {
		d.say("  --fail %s: the %s service refuses every booking, so every trip must be rolled back.", d.cfg.fail, d.cfg.fail)
	}
	if d.cfg.restart != "" {
		d.say("  --restart %s: the %s service is stopped during the last booking and back %s later.", d.cfg.restart, d.cfg.restart, d.cfg.restartAfter)
	}
	if d.cfg.chaos > 0 {
		d.say("  --chaos %g: that fraction of participant calls fails transiently (half of them after committing).", d.cfg.chaos)
	}
	d.say("")
}

func (d *demo) service(name string) *service {
	for _, s := range d.services {
		if s.inv.name == name {
			return s
		}
	}
	panic("no service " + name)
}

// registerWorkflow registers book-trip: reserve car, hotel, flight, each compensated by its
// cancellation. The definition's requests are empty; each run passes the trip's as inputs.
func (d *demo) registerWorkflow(ctx context.Context) error {
	// No attempt limit: the coordinator's default window (5m) rides out a service restart.
	retry := &sdk.Retry{InitialBackoff: 20 * time.Millisecond, MaxBackoff: 300 * time.Millisecond}
	car, hotel, flight := d.service("car").Addr(), d.service("hotel").Addr(), d.service("flight").Addr()
	v, err := d.client.RegisterWorkflow(ctx, sdk.Workflow{Name: WorkflowName, Timeout: 5 * time.Minute, Steps: []sdk.Step{
		{Name: "car", Retry: retry,
			Action:     sdk.MustCall(car, carv1.CarService_Reserve_FullMethodName, &carv1.ReserveRequest{}),
			Compensate: sdk.MustCall(car, carv1.CarService_CancelReservation_FullMethodName, &carv1.CancelReservationRequest{})},
		{Name: "hotel", Retry: retry,
			Action:     sdk.MustCall(hotel, hotelv1.HotelService_Reserve_FullMethodName, &hotelv1.ReserveRequest{}),
			Compensate: sdk.MustCall(hotel, hotelv1.HotelService_CancelReservation_FullMethodName, &hotelv1.CancelReservationRequest{})},
		{Name: "flight", Retry: retry,
			Action:     sdk.MustCall(flight, flightv1.FlightService_Reserve_FullMethodName, &flightv1.ReserveRequest{}),
			Compensate: sdk.MustCall(flight, flightv1.FlightService_CancelReservation_FullMethodName, &flightv1.CancelReservationRequest{})},
	}})
	if err != nil {
		return fmt.Errorf("register workflow %s: %w", WorkflowName, err)
	}
	d.version = v.Version
	d.say("Registered workflow %q version %d: reserve car, hotel, flight; each compensated by its cancellation.", WorkflowName, v.Version)
	d.say("")
	return nil
}

// shutdown stops everything that started, in reverse order.
func (d *demo) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if d.client != nil {
		_ = d.client.Close()
	}
	if d.notif != nil {
		if err := d.notif.stop(); err != nil {
			d.log.Warn("notifications consumer", "err", err)
		}
	}
	if d.coord != nil {
		if err := d.coord.Stop(ctx); err != nil {
			d.log.Warn("coordinator stop", "err", err)
		}
	}
	for _, s := range d.services {
		if err := s.stop(ctx); err != nil {
			d.log.Warn("service stop", "service", s.inv.name, "err", err)
		}
	}
	if d.broker != nil {
		d.broker.Close()
	}
	if d.tmpDir != "" {
		_ = os.RemoveAll(d.tmpDir)
	}
}
