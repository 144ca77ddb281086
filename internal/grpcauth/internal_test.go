package grpcauth

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/grpcauth/grpcauthtest"
)

func TestLimiterForgetsIdleAndBoundsClients(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_700_000_000, 0)
	l := newLimiter(10, 5, 3) // refills completely in 500ms
	require.Equal(t, 500*time.Millisecond, l.idle)

	for i := range 5 {
		ok, _ := l.take("a", now)
		require.True(t, ok, "call %d", i)
	}
	ok, wait := l.take("a", now)
	require.False(t, ok)
	require.Equal(t, 100*time.Millisecond, wait)

	// A flood of identities never holds more than max buckets.
	for i := range 100 {
		ok, _ := l.take(fmt.Sprint("ip:10.0.0.", i), now)
		require.True(t, ok)
		require.LessOrEqual(t, l.size(), 3)
	}
	// The least recently used ("a") was forgotten: it starts again with a full bucket.
	ok, _ = l.take("a", now)
	require.True(t, ok)

	// Buckets idle long enough to be full again are dropped on the next call.
	later := now.Add(l.idle)
	ok, _ = l.take("b", later)
	require.True(t, ok)
	require.Equal(t, 1, l.size())
}

func TestLimiterRetryAfterIsExact(t *testing.T) {
	t.Parallel()
	now := time.Unix(1_700_000_000, 0)
	l := newLimiter(0.5, 1, 10) // one call every 2s
	ok, _ := l.take("a", now)
	require.True(t, ok)
	ok, wait := l.take("a", now.Add(500*time.Millisecond))
	require.False(t, ok)
	require.Equal(t, 1500*time.Millisecond, wait)
	ok, _ = l.take("a", now.Add(500*time.Millisecond+wait))
	require.True(t, ok)
}

func TestKeyPairReloadsChangedFiles(t *testing.T) {
	t.Parallel()
	ca := grpcauthtest.NewCA(t, "reload CA")
	first, second, third := ca.Server(t, "first"), ca.Server(t, "second"), ca.Server(t, "third")
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	now := time.Unix(1_700_000_000, 0)
	// put copies src's file over dst and stamps it, as a rotation by some agent would.
	put := func(src, dst string, stamp time.Time) {
		b, err := os.ReadFile(src)
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(dst, b, 0o600))
		require.NoError(t, os.Chtimes(dst, stamp, stamp))
	}
	put(first.CertFile, certFile, now)
	put(first.KeyFile, keyFile, now)

	var logs bytes.Buffer
	kp, err := loadKeyPair(certFile, keyFile, slog.New(slog.NewTextHandler(&logs, nil)), func() time.Time { return now })
	require.NoError(t, err)
	require.Equal(t, first.TLS.Certificate[0], kp.get().Certificate[0])

	put(second.CertFile, certFile, now.Add(time.Hour))
	put(second.KeyFile, keyFile, now.Add(time.Hour))
	require.Equal(t, first.TLS.Certificate[0], kp.get().Certificate[0], "files are looked at once a second at most")
	now = now.Add(time.Second)
	require.Equal(t, second.TLS.Certificate[0], kp.get().Certificate[0], "rotated")
	require.Contains(t, logs.String(), "TLS key pair reloaded")

	// A rotation caught half-way (new certificate, old key) keeps the previous pair.
	put(third.CertFile, certFile, now.Add(2*time.Hour))
	now = now.Add(time.Second)
	require.Equal(t, second.TLS.Certificate[0], kp.get().Certificate[0])
	require.Contains(t, logs.String(), "keeping the previous one")

	// Once the key follows, the new pair is served.
	put(third.KeyFile, keyFile, now.Add(3*time.Hour))
	now = now.Add(time.Second)
	require.Equal(t, third.TLS.Certificate[0], kp.get().Certificate[0])
}

func TestGlob(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		pattern, s string
		want       bool
	}{
		{"*", "anything:1", true},
		{"*", "", true},
		{"*.svc", "pay.svc", true},
		{"*.svc", "pay.svc.evil", false},
		{"*.payments.svc:443", "a.b.payments.svc:443", true},
		{"*.payments.svc:443", "a.payments.svc:444", false},
		{"10.1.2.*", "10.1.2.33", true},
		{"10.1.2.*", "10.1.20.3", false},
		{"a*b*c", "aXXbYYc", true},
		{"a*b*c", "aXXbYY", false},
		{"[fd00::*]:443", "[fd00::1]:443", true},
		{"exact:80", "exact:80", true},
		{"exact:80", "exact:8080", false},
	} {
		require.Equal(t, tc.want, glob(tc.pattern, tc.s), "%q ~ %q", tc.pattern, tc.s)
	}
}
