package netfault_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/netfault"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// echo serves lines back until the test ends.
func echo(t *testing.T) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	t.Cleanup(func() { _ = lis.Close(); <-done })
	return lis.Addr().String()
}

func roundTrip(t *testing.T, c net.Conn, r *bufio.Reader, line string) (string, error) {
	t.Helper()
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		return "", err
	}
	s, err := r.ReadString('\n')
	return s, err
}

func TestProxyLatencyBlackholeReset(t *testing.T) {
	t.Parallel()
	p, err := netfault.Start(echo(t))
	require.NoError(t, err)
	defer p.Close()
	c, err := net.Dial("tcp", p.Addr())
	require.NoError(t, err)
	defer c.Close()
	r := bufio.NewReader(c)
	got, err := roundTrip(t, c, r, "one")
	require.NoError(t, err)
	require.Equal(t, "one\n", got)

	p.SetLatency(100 * time.Millisecond)
	start := time.Now()
	_, err = roundTrip(t, c, r, "two")
	require.NoError(t, err)
	require.GreaterOrEqual(t, time.Since(start), 200*time.Millisecond, "latency each way is a lower bound")
	p.SetLatency(0)

	// A blackhole holds the answer (nothing arrives while it lasts), and heal delivers it.
	p.Blackhole()
	_, err = c.Write([]byte("three\n"))
	require.NoError(t, err)
	require.NoError(t, c.SetReadDeadline(time.Now().Add(300*time.Millisecond)))
	_, err = r.ReadString('\n')
	var ne net.Error
	require.True(t, errors.As(err, &ne) && ne.Timeout(), "nothing crosses a blackhole: %v", err)
	require.NoError(t, c.SetReadDeadline(time.Time{}))
	p.Heal()
	got, err = r.ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "three\n", got)

	require.Equal(t, 2, p.Reset(), "the client's connection and the upstream one")
	_, err = roundTrip(t, c, r, "four")
	require.Error(t, err)
	require.True(t, errors.Is(err, syscall.ECONNRESET) || errors.Is(err, io.EOF), "%v", err)

	// New connections work after a reset.
	c2, err := net.Dial("tcp", p.Addr())
	require.NoError(t, err)
	defer c2.Close()
	got, err = roundTrip(t, c2, bufio.NewReader(c2), "five")
	require.NoError(t, err)
	require.Equal(t, "five\n", got)
	require.EqualValues(t, 2, p.Accepted())
}
