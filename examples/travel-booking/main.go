// Command travel-booking is Treaty's demo: three services (flight, hotel, car) book trips as a
// registered saga and as TCC, through a coordinator, with every participant call behind a
// barrier, domain events leaving through transactional outboxes, and a notifications consumer
// applying each event exactly once. With no flags everything runs in this one process on
// embedded SQLite files and an embedded Kafka-protocol broker: nothing to install.
//
// It tells the story in plain words and exits 0 when every outcome is what it should be, so it
// doubles as a smoke test. See README.md.
//
// The example lives in Treaty's module and imports internal/ packages (internal/app and
// internal/store/sqlite, as `coordinator dev` does) to run the coordinator in process; an
// application outside the module would run `coordinator dev` or `coordinator serve` instead
// and use only sdk/, sdk/participant and pkg/outbox.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

// config is the command line.
type config struct {
	db, brokers, stateDir, fail string
	restart                     string
	restartAfter                time.Duration
	chaos                       float64
	trips, concurrency          int
	seed                        uint64
	quiet, verbose              bool
}

func main() {
	var cfg config
	fs := flag.NewFlagSet("travel-booking", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `travel-booking: Treaty's demo. Three services (flight, hotel, car) book trips as a registered
saga and as TCC, through a coordinator, with barriers, transactional outboxes and an exactly-once
notifications consumer. With no flags it needs nothing installed: SQLite files in a temporary
directory and an embedded Kafka-protocol broker, all in this process.

Usage:
  go run ./examples/travel-booking [flags]

Flags:
`)
		fs.PrintDefaults()
		fmt.Fprint(fs.Output(), `
It exits 0 when every outcome is as expected, 1 otherwise. The last line it prints is
"SUMMARY {json}" for scripts and tests.
`)
	}
	fs.StringVar(&cfg.db, "db", os.Getenv("TRAVEL_DB"), "PostgreSQL URL: coordinator, services (schemas travel_*, reset at start) and consumer use it instead of SQLite (TRAVEL_DB)")
	fs.StringVar(&cfg.brokers, "brokers", os.Getenv("TRAVEL_BROKERS"), "Kafka bootstrap addresses, comma-separated, instead of the embedded broker (TRAVEL_BROKERS)")
	fs.StringVar(&cfg.stateDir, "state-dir", "", "directory for the SQLite files (new or empty; kept after the run); default a temporary directory, removed at exit")
	fs.StringVar(&cfg.fail, "fail", "", "flight, hotel or car: that service refuses every booking, so every trip is rolled back")
	fs.StringVar(&cfg.restart, "restart", "", "flight, hotel or car: after the story, that service is stopped as a trip is booked and started again --restart-after later; the trip still books")
	fs.DurationVar(&cfg.restartAfter, "restart-after", 5*time.Second, "how long the --restart service stays down (up to 4m: the coordinator retries a step for 5m by default)")
	fs.Float64Var(&cfg.chaos, "chaos", 0, "fraction (0 to 1) of participant calls that fail transiently; outcomes must not change")
	fs.IntVar(&cfg.trips, "trips", 0, "instead of the story, book this many random trips concurrently (a third as TCC) and print a summary")
	fs.IntVar(&cfg.concurrency, "concurrency", 32, "trips in flight at once with --trips")
	fs.Uint64Var(&cfg.seed, "seed", 0, "random seed of the trips --trips makes up (0: a new one, printed)")
	fs.BoolVar(&cfg.quiet, "quiet", false, "print only the summary")
	fs.BoolVar(&cfg.verbose, "verbose", false, "print the components' logs (coordinator, relays, consumer) to stderr")
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		os.Exit(2)
	}
	if err := cfg.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "travel-booking:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	ok, err := run(ctx, cfg, os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "travel-booking:", err)
		os.Exit(1)
	}
	if !ok {
		os.Exit(1)
	}
}

func (c *config) validate() error {
	switch c.fail {
	case "", "flight", "hotel", "car":
	default:
		return fmt.Errorf("--fail %q: want flight, hotel or car", c.fail)
	}
	switch c.restart {
	case "", "flight", "hotel", "car":
	default:
		return fmt.Errorf("--restart %q: want flight, hotel or car", c.restart)
	}
	if c.restart != "" && c.trips > 0 {
		return fmt.Errorf("--restart tells a story of one trip; it does not combine with --trips")
	}
	if c.restartAfter <= 0 || c.restartAfter > 4*time.Minute {
		return fmt.Errorf("--restart-after %s: want more than 0 and at most 4m (the coordinator's default retry window is 5m)", c.restartAfter)
	}
	if c.chaos < 0 || c.chaos >= 1 {
		return fmt.Errorf("--chaos %g: want a fraction in [0, 1)", c.chaos)
	}
	if c.trips < 0 || c.trips > 100000 {
		return fmt.Errorf("--trips %d: want 0 (the story) to 100000", c.trips)
	}
	if c.concurrency < 1 || c.concurrency > 1000 {
		return fmt.Errorf("--concurrency %d: want 1 to 1000", c.concurrency)
	}
	if c.db != "" && !strings.HasPrefix(c.db, "postgres://") && !strings.HasPrefix(c.db, "postgresql://") {
		return fmt.Errorf("--db %q: want a postgres:// URL", c.db)
	}
	return nil
}

// logger returns the components' logger: discarded unless --verbose.
func (c *config) logger(stderr io.Writer) *slog.Logger {
	if !c.verbose {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
}
