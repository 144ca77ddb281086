// Command treaty-bench runs Treaty's benchmarks. Each command starts the real parts it measures
// and prints its figures as one JSON object on its last line; see `treaty-bench COMMAND --help`
// and docs/BENCHMARKS.md.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"

	"github.com/treatyhq/treaty/internal/bench"
	"github.com/treatyhq/treaty/internal/cli"
)

// command runs one benchmark with its arguments (the command name removed) and returns the exit
// code.
type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int
}

// commands lists the benchmarks; a new one is one more entry. A function, not a package
// variable, so nothing can change the table at run time.
func commands() map[string]command {
	return map[string]command{
		"saga":        {"saga coordinator throughput and latency against the PostgreSQL commit ceiling", bench.SagaMain},
		"outbox":      {"outbox relay throughput and commit-to-ack latency against the PostgreSQL commit rate", bench.OutboxMain},
		"tcc":         {"TCC transactions through the SDK (tries made by the client) against the PostgreSQL commit ceiling", bench.TCCMain},
		"2pc":         {"two-phase commits through the SDK against the PostgreSQL commit ceiling", bench.TwoPhaseMain},
		"memory":      {"the coordinator's resident memory per active transaction, by payload size (Linux)", bench.MemoryMain},
		"chaos":       {"a fault campaign: replicas killed, stopped and cut off, call faults; checks money is conserved", bench.ChaosMain},
		"participant": {"no-op gRPC participants in their own process, for side-by-side runs", bench.ParticipantMain},
	}
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "treaty-bench: Treaty's benchmarks.\n\nUsage:\n  treaty-bench COMMAND [flags]\n\nCommands:")
	cmds := commands()
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, cmds[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'treaty-bench COMMAND --help' for the flags of a command.")
}

func main() {
	bench.MaybeRunMemoryChild() // the memory command's measured coordinator is this binary
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	code := run(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string) int {
	if len(args) == 0 {
		usage(os.Stderr)
		return 2
	}
	switch args[0] {
	case "-h", "--help", "help":
		usage(os.Stdout)
		return 0
	}
	if args[0] == "coordinator" {
		// Not listed: the chaos campaign runs its coordinator processes through this, so that
		// one binary is all a user needs.
		return cli.Main(ctx, args[1:], cli.Env{})
	}
	c, ok := commands()[args[0]]
	if !ok {
		fmt.Fprintf(os.Stderr, "treaty-bench: unknown command %q\n\n", args[0])
		usage(os.Stderr)
		return 2
	}
	return c.run(ctx, args[1:], os.Stdout, os.Stderr, os.Getenv)
}
