package saga_test

import (
	"math"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"pgregory.net/rapid"

	"github.com/treatyhq/treaty/pkg/saga"
)

// expDelay is the delay before jitter, computed without the doubling that could overflow:
// initial * 2^(attempts-1), capped at max.
func expDelay(initial, max time.Duration, attempts int) time.Duration {
	d := initial
	for i := 1; i < attempts; i++ {
		if d > max/2 {
			return max
		}
		d *= 2
	}
	return min(d, max)
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name         string
		initial, max time.Duration
		attempts     int
		jitter       float64
		want         time.Duration
	}{
		{"first_no_jitter", time.Second, time.Minute, 1, 0, 500 * time.Millisecond},
		{"first_full_jitter", time.Second, time.Minute, 1, 0.999999, 999999500 * time.Nanosecond},
		{"zero_attempts_is_first", time.Second, time.Minute, 0, 0, 500 * time.Millisecond},
		{"doubles", time.Second, time.Minute, 3, 0, 2 * time.Second},
		{"doubles_half_jitter", time.Second, time.Minute, 4, 0.5, 6 * time.Second},
		{"capped", time.Second, 5 * time.Second, 10, 0, 2500 * time.Millisecond},
		{"capped_when_initial_is_max", 3 * time.Second, 3 * time.Second, 7, 0.5, 2250 * time.Millisecond},
		{"many_attempts_stay_capped", time.Millisecond, time.Hour, 1000, 0, 30 * time.Minute},
		{"huge_max_does_not_overflow", time.Second, time.Duration(math.MaxInt64), 80, 0, time.Duration(math.MaxInt64) / 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			require.Equal(t, tc.want, saga.Backoff(tc.initial, tc.max, tc.attempts, tc.jitter))
		})
	}
}

func TestBackoffBounds(t *testing.T) {
	t.Parallel()
	rapid.Check(t, func(t *rapid.T) {
		initial := time.Duration(rapid.Int64Range(1, int64(time.Hour)).Draw(t, "initial"))
		max := initial + time.Duration(rapid.OneOf(
			rapid.Int64Range(0, int64(time.Hour)),
			rapid.Int64Range(0, math.MaxInt64-int64(initial)),
		).Draw(t, "max_minus_initial"))
		attempts := rapid.IntRange(0, 100).Draw(t, "attempts")
		jitter := rapid.Float64Range(0, 1).Draw(t, "jitter")
		if jitter == 1 {
			jitter = math.Nextafter(1, 0) // the engine's jitter is in [0,1)
		}

		got := saga.Backoff(initial, max, attempts, jitter)
		d := expDelay(initial, max, attempts)
		require.GreaterOrEqual(t, got, d/2, "d=%s", d)
		require.LessOrEqual(t, got, d, "d=%s", d)
		require.LessOrEqual(t, got, max)

		// More attempts never wait less, for the same jitter.
		require.LessOrEqual(t, got, saga.Backoff(initial, max, attempts+1, jitter))
	})
}
