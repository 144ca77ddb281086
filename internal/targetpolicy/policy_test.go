package targetpolicy_test

import (
	"context"
	"errors"
	"net"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/targetpolicy"
)

func TestDefaultRefusesLinkLocalAndOwnAddresses(t *testing.T) {
	t.Parallel()
	p, err := targetpolicy.New(nil)
	require.NoError(t, err)
	require.NoError(t, p.AddOwn("127.0.0.1:7600"))
	require.NoError(t, p.AddOwn("[::]:7601"))

	for addr, rule := range map[string]string{
		"169.254.169.254:80": targetpolicy.RuleLinkLocal,
		"169.254.1.2:443":    targetpolicy.RuleLinkLocal,
		"[fe80::1]:80":       targetpolicy.RuleLinkLocal,
		"127.0.0.1:7600":     targetpolicy.RuleOwn,
		"localhost:7600":     targetpolicy.RuleOwn,
		"LOCALHOST.:7600":    targetpolicy.RuleOwn,
		"127.0.0.1:7601":     targetpolicy.RuleOwn, // the HTTP port listens on every address
		"[::1]:7601":         targetpolicy.RuleOwn,
		"0.0.0.0:7601":       targetpolicy.RuleOwn,
	} {
		err := p.Check(addr)
		require.ErrorIs(t, err, targetpolicy.ErrRefused, addr)
		require.ErrorContains(t, err, "rule "+rule, addr)
	}
	for _, addr := range []string{"127.0.0.1:7602", "10.0.0.1:7600", "payments.svc:7600", "[fd00::1]:443", "localhost:9000"} {
		require.NoError(t, p.Check(addr), addr)
	}
}

func TestAllowList(t *testing.T) {
	t.Parallel()
	p, err := targetpolicy.New(targetpolicy.ParsePatterns("*.payments.svc, hotel.svc:7000,10.0.0.0/8:443 [fd00::1]:9 *:8443 169.254.10.0/24"))
	require.NoError(t, err)
	require.NoError(t, p.AddOwn("0.0.0.0:8443"))
	for _, addr := range []string{"a.payments.svc:1", "B.Payments.SVC:7000", "hotel.svc:7000", "10.1.2.3:443", "[fd00::1]:9", "any.where:8443", "169.254.10.7:80"} {
		require.NoError(t, p.Check(addr), addr)
	}
	for addr, rule := range map[string]string{
		"payments.svc:1":     targetpolicy.RuleAllow, // *.payments.svc wants a subdomain
		"hotel.svc:7001":     targetpolicy.RuleAllow,
		"10.1.2.3:80":        targetpolicy.RuleAllow,
		"11.0.0.1:443":       targetpolicy.RuleAllow,
		"169.254.169.254:80": targetpolicy.RuleLinkLocal, // only 169.254.10.0/24 is named
		"127.0.0.1:8443":     targetpolicy.RuleOwn,       // *:8443 does not open the coordinator itself
	} {
		err := p.Check(addr)
		require.ErrorContains(t, err, "rule "+rule, addr)
	}
	for _, bad := range []string{"host:0", "host:x", "10.0.0.0/33", "[fd00::1", ":80", "a[:1"} {
		_, err := targetpolicy.New([]string{bad})
		require.Error(t, err, bad)
		require.ErrorContains(t, err, bad)
	}
}

// A name is checked again by what it resolves to, when connecting.
func TestDialChecksResolvedAddresses(t *testing.T) {
	t.Parallel()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { _ = lis.Close() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			_ = c.Close()
		}
	}()
	p, err := targetpolicy.New(nil)
	require.NoError(t, err)
	conn, err := p.DialContext(context.Background(), lis.Addr().String())
	require.NoError(t, err, "not refused: connects")
	_ = conn.Close()

	require.NoError(t, p.AddOwn(lis.Addr().String()))
	_, port, _ := net.SplitHostPort(lis.Addr().String())
	_, err = p.DialContext(context.Background(), "localhost:"+port)
	require.True(t, errors.Is(err, targetpolicy.ErrRefused), "%v", err)
}
