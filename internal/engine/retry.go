package engine

import (
	"fmt"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/saga"
)

// RetryDefaults is the retry policy a saga step gets for every field its request leaves empty.
// Zero values mean the defaults below.
//
// The default forward policy rides out a participant's restart or rolling deploy: a transient
// failure (anything but ABORTED) is retried with capped exponential backoff and jitter until
// Window has passed since the step's first transient failure, never past the transaction's
// deadline, and only then does the saga turn back. A request that sets max_attempts gets that
// many attempts instead (and no window unless it sets one too). Compensations never give up.
type RetryDefaults struct {
	// MaxAttempts limits forward attempts of a step whose request sets none. 0 = no attempt
	// limit: the window decides. Default 0.
	MaxAttempts int
	// InitialBackoff is the delay before the second attempt; it doubles with each attempt.
	// Default 100ms.
	InitialBackoff time.Duration
	// MaxBackoff caps the delay between attempts. Default 1s: a participant that is back is
	// called again within about a second (the invoker's reconnect backoff is capped alike).
	MaxBackoff time.Duration
	// Window is how long transient failures of a forward step are retried, from its first
	// transient failure, when the request sets neither max_attempts nor a window. Default 5m.
	Window time.Duration
}

// Defaults of RetryDefaults, for documentation and flags.
const (
	DefaultForwardMaxAttempts  = 0
	DefaultRetryInitialBackoff = 100 * time.Millisecond
	DefaultRetryMaxBackoff     = time.Second
	DefaultForwardRetryWindow  = 5 * time.Minute
	// MaxRetryWindow bounds a window; a transaction's deadline bounds it further.
	MaxRetryWindow = 7 * 24 * time.Hour
)

func (r RetryDefaults) withDefaults() RetryDefaults {
	if r.InitialBackoff <= 0 {
		r.InitialBackoff = DefaultRetryInitialBackoff
	}
	if r.MaxBackoff <= 0 {
		r.MaxBackoff = max(DefaultRetryMaxBackoff, r.InitialBackoff)
	}
	if r.Window <= 0 {
		r.Window = DefaultForwardRetryWindow
	}
	return r
}

// Validate reports a setting out of range, naming it.
func (r RetryDefaults) Validate() error {
	switch {
	case r.MaxAttempts < 0 || r.MaxAttempts > MaxAttemptsLimit:
		return fmt.Errorf("forward max attempts %d: must be within 0..%d (0 = no limit, the window decides)", r.MaxAttempts, MaxAttemptsLimit)
	case r.InitialBackoff < 0 || r.InitialBackoff > time.Hour:
		return fmt.Errorf("retry initial backoff %s: must be within 0..1h (0 = default %s)", r.InitialBackoff, DefaultRetryInitialBackoff)
	case r.MaxBackoff < 0 || r.MaxBackoff > 24*time.Hour:
		return fmt.Errorf("retry max backoff %s: must be within 0..24h (0 = default %s)", r.MaxBackoff, DefaultRetryMaxBackoff)
	case r.MaxBackoff > 0 && r.InitialBackoff > r.MaxBackoff:
		return fmt.Errorf("retry max backoff %s is below the initial backoff %s", r.MaxBackoff, r.InitialBackoff)
	case r.Window < 0 || r.Window > MaxRetryWindow:
		return fmt.Errorf("forward retry window %s: must be within 0..%s (0 = default %s)", r.Window, MaxRetryWindow, DefaultForwardRetryWindow)
	}
	return nil
}

// stepPolicy is a saga step's retry policy: the request's fields over the defaults.
func stepPolicy(field string, s *treatyv1.SagaStep, rd RetryDefaults) (saga.Step, error) {
	pol := saga.Step{Name: s.Name, DependsOn: s.DependsOn, MaxAttempts: rd.MaxAttempts,
		InitialBackoff: rd.InitialBackoff, MaxBackoff: rd.MaxBackoff, RetryWindow: rd.Window}
	r := s.Retry
	if r == nil {
		return pol, nil
	}
	var err error
	if r.MaxAttempts < 0 || r.MaxAttempts > MaxAttemptsLimit {
		return pol, invalid(field+".retry.max_attempts", "is %d, must be within 0..%d (0 = the coordinator's default)", r.MaxAttempts, MaxAttemptsLimit)
	}
	if r.MaxAttempts > 0 {
		// An explicit attempt count wins over the default window.
		pol.MaxAttempts, pol.RetryWindow = int(r.MaxAttempts), 0
	}
	if r.RetryWindow != nil {
		w, err := durationField(field+".retry.retry_window", r.RetryWindow, false, rd.Window, MaxRetryWindow)
		if err != nil {
			return pol, err
		}
		pol.RetryWindow = w
	}
	if pol.InitialBackoff, err = durationField(field+".retry.initial_backoff", r.InitialBackoff, r.InitialBackoff == nil, rd.InitialBackoff, time.Hour); err != nil {
		return pol, err
	}
	// An initial backoff above the default cap raises the cap rather than being refused.
	if pol.MaxBackoff, err = durationField(field+".retry.max_backoff", r.MaxBackoff, r.MaxBackoff == nil, max(rd.MaxBackoff, pol.InitialBackoff), 24*time.Hour); err != nil {
		return pol, err
	}
	if pol.MaxBackoff < pol.InitialBackoff {
		return pol, invalid(field+".retry.max_backoff", "%s is below initial_backoff %s", pol.MaxBackoff, pol.InitialBackoff)
	}
	return pol, nil
}

// waitingBranch fills in, for a branch waiting to be called again, when and why.
func waitingBranch(out *treatyv1.Branch, b store.Branch) {
	if b.NextAttemptAt.IsZero() || (b.Status != string(saga.StatusPending) && b.Status != string(saga.StatusUnknown)) {
		return
	}
	out.NextAttemptAt = timestamppb.New(b.NextAttemptAt)
	if b.LastError != "" {
		out.WaitingReason = fmt.Sprintf("retry after attempt %d failed: %s", b.Attempts, b.LastError)
		return
	}
	out.WaitingReason = "held back without being sent: the participant's circuit breaker is open or its call slots are busy"
}
