package app_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/engine"
	"github.com/treatyhq/treaty/internal/grpcauth"
	"github.com/treatyhq/treaty/sdk"
)

// A rate-limited client is told when to retry (RetryInfo); the SDK waits that long and retries
// instead of failing the caller.
func TestSDKRetriesRateLimitedCalls(t *testing.T) {
	t.Parallel()
	a := startSecured(t, grpcauth.Config{RateLimit: 4, RateBurst: 1}, nil, engine.Limits{})
	c, err := sdk.Dial(context.Background(), sdk.Options{Address: a.Addr, Retries: 5})
	require.NoError(t, err)
	defer c.Close()
	start := time.Now()
	for range 4 {
		_, err := c.Get(context.Background(), "no-such-gid")
		require.ErrorIs(t, err, sdk.ErrNotFound, "each call gets through after waiting its turn")
	}
	require.GreaterOrEqual(t, time.Since(start), 500*time.Millisecond, "4 calls at 4/s with a burst of 1 take their time")

	// Without retries the caller sees the refusal, with the code that says why.
	c0, err := sdk.Dial(context.Background(), sdk.Options{Address: a.Addr, Retries: -1})
	require.NoError(t, err)
	defer c0.Close()
	var refused error
	for range 5 {
		if _, err := c0.Get(context.Background(), "no-such-gid"); !isNotFound(err) {
			refused = err
			break
		}
	}
	require.ErrorIs(t, refused, sdk.ErrResourceExhausted)
	require.Contains(t, refused.Error(), "retry in")
}

func isNotFound(err error) bool { return errors.Is(err, sdk.ErrNotFound) }
