// Command coordinator is Treaty's coordinator service. See `coordinator --help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/treatyhq/treaty/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	code := cli.Main(ctx, os.Args[1:], cli.Env{})
	stop()
	os.Exit(code)
}
