// Command outbox-relay publishes committed outbox rows to Kafka. See `outbox-relay help`.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/treatyhq/treaty/internal/relaycli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := relaycli.Main(ctx, os.Args[1:], os.Getenv, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
