package bench

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"

	"github.com/treatyhq/treaty/internal/testparticipant"
)

const participantUsage = `treaty-bench participant: no-op gRPC participants in a process of their own.

Serves every method name on each --listen address and answers OK with an empty message (which
decodes as any protobuf message's zero value), until interrupted. It is the participant that
treaty-bench saga starts in process; run it alone to give Treaty (treaty-bench saga
--participant-addrs) and other coordinators (DTM, DBOS, ...) the same participant side by side,
and to measure its CPU apart (docs/BENCHMARKS.md, "Side by side").

Example:
  treaty-bench participant --listen 127.0.0.1:7701,127.0.0.1:7702,127.0.0.1:7703

Flags:`

// ParticipantMain is `treaty-bench participant`.
func ParticipantMain(ctx context.Context, args []string, stdout, stderr io.Writer, _ func(string) string) int {
	var listen string
	fs := flag.NewFlagSet("participant", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintln(stderr, participantUsage)
		fs.PrintDefaults()
	}
	fs.StringVar(&listen, "listen", "127.0.0.1:0", "addresses to serve on, comma-separated (port 0: a random one, printed)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "treaty-bench participant: unexpected argument %q (flags start with --)\n", fs.Arg(0))
		return 2
	}
	var parts []*testparticipant.Participant
	defer func() {
		for _, p := range parts {
			p.Stop()
		}
	}()
	for _, addr := range strings.Split(listen, ",") {
		addr = strings.TrimSpace(addr)
		if addr == "" {
			fmt.Fprintln(stderr, "treaty-bench participant: --listen has an empty address")
			return 2
		}
		p, err := testparticipant.Start(testparticipant.Options{NoRecord: true, Listen: addr})
		if err != nil {
			fmt.Fprintf(stderr, "treaty-bench participant: --listen %s: %v\n", addr, err)
			return 1
		}
		parts = append(parts, p)
		fmt.Fprintf(stdout, "participant listening on %s\n", p.Addr)
	}
	<-ctx.Done()
	return 0
}
