// Command treatyctl looks at and acts on Treaty transactions through a coordinator's admin API:
// tx list|show|watch, tx retry|rollback|resume|pause|unpause|resolve, workflows list|show,
// stats. `treatyctl help` lists them; the logic lives in internal/ctl.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/treatyhq/treaty/internal/ctl"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := ctl.Main(ctx, os.Args[1:], ctl.Env{Stdout: os.Stdout, Stderr: os.Stderr, Getenv: os.Getenv})
	stop()
	os.Exit(code)
}
