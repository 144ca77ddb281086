package cli

import (
	"fmt"
	"time"

	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/invoke"
)

// retryFlags are the default retry policy of saga steps and the participant circuit breaker.
type retryFlags struct {
	window              time.Duration
	maxAttempts         int
	initial, maxBackoff time.Duration
	breakerFailures     int
	breakerOpen         time.Duration
}

func addRetryFlags(f *flags) *retryFlags {
	r := &retryFlags{}
	f.Duration(&r.window, "forward-retry-window", engine.DefaultForwardRetryWindow,
		"how long a saga step's action is retried after its first transient failure (any answer but OK and\n"+
			"      ABORTED) before the saga compensates; never past the saga's timeout. Rides out a participant's\n"+
			"      restart or rolling deploy. A request's own retry.max_attempts replaces it")
	f.Int(&r.maxAttempts, "forward-max-attempts", engine.DefaultForwardMaxAttempts,
		"attempts of a saga step's action before the saga compensates, for steps that set none\n"+
			"      (0 = no attempt limit: --forward-retry-window decides; with both, whichever ends first)")
	f.Duration(&r.initial, "retry-initial-backoff", engine.DefaultRetryInitialBackoff,
		"delay before a step's second attempt; it doubles with each attempt, half of it random")
	f.Duration(&r.maxBackoff, "retry-max-backoff", engine.DefaultRetryMaxBackoff,
		"longest delay between two attempts of a saga step (so a participant that is back is called again within it)")
	f.Int(&r.breakerFailures, "breaker-failures", invoke.DefaultBreakerFailures,
		"consecutive transient failures of calls to one participant address set that open its circuit breaker;\n"+
			"      while open, calls are not sent and do not count as attempts")
	f.Duration(&r.breakerOpen, "breaker-open-timeout", invoke.DefaultBreakerOpenTimeout,
		"how long an open breaker holds calls back before one trial call may go (half-open)")
	return r
}

func (r *retryFlags) build() (engine.RetryDefaults, invoke.BreakerConfig, error) {
	rd := engine.RetryDefaults{MaxAttempts: r.maxAttempts, InitialBackoff: r.initial, MaxBackoff: r.maxBackoff, Window: r.window}
	if r.window <= 0 {
		return rd, invoke.BreakerConfig{}, fmt.Errorf("--forward-retry-window %s: must be positive", r.window)
	}
	if r.initial <= 0 || r.maxBackoff <= 0 {
		return rd, invoke.BreakerConfig{}, fmt.Errorf("--retry-initial-backoff %s and --retry-max-backoff %s: must be positive", r.initial, r.maxBackoff)
	}
	if err := rd.Validate(); err != nil {
		return rd, invoke.BreakerConfig{}, fmt.Errorf("retry flags: %w", err)
	}
	if r.breakerFailures < 1 || r.breakerFailures > 1_000_000 {
		return rd, invoke.BreakerConfig{}, fmt.Errorf("--breaker-failures %d: must be within 1..1000000", r.breakerFailures)
	}
	if r.breakerOpen <= 0 || r.breakerOpen > time.Hour {
		return rd, invoke.BreakerConfig{}, fmt.Errorf("--breaker-open-timeout %s: must be within 0s..1h, exclusive of 0", r.breakerOpen)
	}
	return rd, invoke.BreakerConfig{FailureThreshold: uint32(r.breakerFailures), OpenTimeout: r.breakerOpen}, nil
}
