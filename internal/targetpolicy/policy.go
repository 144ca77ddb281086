// Package targetpolicy decides which participant addresses a coordinator may call. Targets come
// from clients, so without a policy any client could make the coordinator call its cloud
// metadata service, its own admin port or itself, and read what answered in last_error.
//
// Two rules always apply: link-local addresses (169.254.0.0/16, fe80::/10, where cloud metadata
// services live) are refused unless an IP or CIDR pattern of the allow list names them, and the
// coordinator's own listen addresses are refused. With an allow list (--allow-targets), every
// address must also match one of its patterns:
//
//   - any address
//     payments.svc:7000     a host name and port
//     *.payments.svc        any name under payments.svc, any port
//     *:7000                any host, port 7000
//     10.0.0.0/8            any address in a CIDR range, any port ("10.0.0.0/8:443": port 443)
//     10.1.2.3, [fd00::1]:9  one IP, any port or one port
//
// Checks happen twice: on submit, against the address as written (a refused target is
// INVALID_ARGUMENT naming the step and the rule, nothing stored), and when connecting, against
// every IP a name resolves to (so a name that points at a refused address is refused as well).
package targetpolicy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path"
	"strconv"
	"strings"
	"sync"
)

// ErrRefused is wrapped by every refusal.
var ErrRefused = errors.New("refused by the target policy")

// Rule names, as errors and documents cite them.
const (
	RuleLinkLocal = "link-local"
	RuleOwn       = "own-address"
	RuleAllow     = "allow-targets"
)

// pattern is one allow-list entry.
type pattern struct {
	text   string
	prefix netip.Prefix // valid for IP and CIDR patterns
	host   string       // lower-case host glob for name patterns ("" for IP patterns)
	port   int          // 0: any
}

// Policy is safe for concurrent use.
type Policy struct {
	allow []pattern

	mu       sync.RWMutex
	own      []netip.AddrPort // bound addresses; an unspecified IP stands for every local one
	ownNames map[string]bool  // host names that are this machine
	localIPs []netip.Addr
}

// ParsePatterns splits a comma- or white-space-separated list of patterns.
func ParsePatterns(s string) []string {
	return strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' })
}

// New checks the allow-list patterns (none: every address but the refused ones).
func New(allow []string) (*Policy, error) {
	p := &Policy{ownNames: map[string]bool{"localhost": true}}
	for _, s := range allow {
		pt, err := parsePattern(s)
		if err != nil {
			return nil, fmt.Errorf("--allow-targets %q: %w", s, err)
		}
		p.allow = append(p.allow, pt)
	}
	if h, err := os.Hostname(); err == nil && h != "" {
		p.ownNames[strings.ToLower(h)] = true
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(n.IP); ok {
					p.localIPs = append(p.localIPs, ip.Unmap())
				}
			}
		}
	}
	return p, nil
}

func parsePattern(s string) (pattern, error) {
	pt := pattern{text: s}
	host := s
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return pt, errors.New("missing ]")
		}
		host = s[1:end]
		rest := s[end+1:]
		if rest != "" {
			if !strings.HasPrefix(rest, ":") {
				return pt, errors.New("want [IPv6] or [IPv6]:port")
			}
			if err := pt.setPort(rest[1:]); err != nil {
				return pt, err
			}
		}
	} else if strings.Count(s, ":") == 1 {
		h, port, _ := strings.Cut(s, ":")
		host = h
		if err := pt.setPort(port); err != nil {
			return pt, err
		}
	}
	switch {
	case host == "":
		return pt, errors.New("empty host; use * for any")
	case strings.Contains(host, "/"):
		pr, err := netip.ParsePrefix(host)
		if err != nil {
			return pt, fmt.Errorf("not a CIDR range: %w", err)
		}
		pt.prefix = pr.Masked()
	default:
		if ip, err := netip.ParseAddr(host); err == nil {
			pt.prefix = netip.PrefixFrom(ip.Unmap(), ip.Unmap().BitLen())
		} else {
			if _, err := path.Match(host, ""); err != nil {
				return pt, fmt.Errorf("bad host pattern: %w", err)
			}
			pt.host = strings.ToLower(host)
		}
	}
	return pt, nil
}

func (pt *pattern) setPort(s string) error {
	if s == "*" {
		return nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q: want 1..65535 or *", s)
	}
	pt.port = n
	return nil
}

// AddOwn records an address the coordinator listens on (as bound: "[::]:7600", "127.0.0.1:7601").
func (p *Policy) AddOwn(addr string) error {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return fmt.Errorf("own address %q: %w", addr, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.own = append(p.own, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
	return nil
}

// Describe lists the rules in force for a start-up log line.
func (p *Policy) Describe() []any {
	texts := make([]string, len(p.allow))
	for i, a := range p.allow {
		texts[i] = a.text
	}
	allow := strings.Join(texts, ",")
	if allow == "" {
		allow = "any (no --allow-targets)"
	}
	return []any{"allow", allow, "refused", "link-local, this coordinator's own addresses"}
}

// Check decides one address as a target names it ("host:port").
func (p *Policy) Check(addr string) error {
	host, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%s: %w", addr, err)
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return fmt.Errorf("%s: port %q is not a number", addr, portText)
	}
	ip, ipErr := netip.ParseAddr(host)
	if ipErr == nil {
		ip = ip.Unmap()
		if err := p.checkIP(addr, ip, port); err != nil {
			return err
		}
	} else if p.isOwnName(host, port) {
		return fmt.Errorf("%w: %s is this coordinator's own address (rule %s)", ErrRefused, addr, RuleOwn)
	}
	if len(p.allow) == 0 {
		return nil
	}
	for _, pt := range p.allow {
		if pt.matches(host, ip, ipErr == nil, port) {
			return nil
		}
	}
	return fmt.Errorf("%w: %s matches no --allow-targets pattern (rule %s)", ErrRefused, addr, RuleAllow)
}

// checkIP applies the rules that hold for an IP, whether written or resolved.
func (p *Policy) checkIP(addr string, ip netip.Addr, port int) error {
	if p.isOwnIP(ip, port) {
		return fmt.Errorf("%w: %s is this coordinator's own address (rule %s)", ErrRefused, addr, RuleOwn)
	}
	if ip.IsLinkLocalUnicast() || ip.IsLinkLocalMulticast() {
		for _, pt := range p.allow {
			if pt.host == "" && pt.prefix.IsValid() && pt.prefix.Contains(ip) && (pt.port == 0 || pt.port == port) {
				return nil
			}
		}
		return fmt.Errorf("%w: %s is link-local, 169.254.0.0/16 or fe80::/10, where cloud metadata services answer (rule %s; an IP or CIDR pattern of --allow-targets may allow it)", ErrRefused, addr, RuleLinkLocal)
	}
	return nil
}

func (pt pattern) matches(host string, ip netip.Addr, isIP bool, port int) bool {
	if pt.port != 0 && pt.port != port {
		return false
	}
	if pt.host == "" {
		return isIP && pt.prefix.Contains(ip)
	}
	if pt.host == "*" {
		return true
	}
	ok, _ := path.Match(pt.host, strings.ToLower(host))
	return ok
}

func (p *Policy) isOwnIP(ip netip.Addr, port int) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	for _, o := range p.own {
		if int(o.Port()) != port {
			continue
		}
		if o.Addr() == ip {
			return true
		}
		if o.Addr().IsUnspecified() && (ip.IsLoopback() || ip.IsUnspecified() || p.isLocal(ip)) {
			return true
		}
		if o.Addr().IsLoopback() && (ip.IsLoopback() || ip.IsUnspecified()) {
			return true
		}
	}
	return false
}

func (p *Policy) isLocal(ip netip.Addr) bool {
	for _, l := range p.localIPs {
		if l == ip {
			return true
		}
	}
	return false
}

func (p *Policy) isOwnName(host string, port int) bool {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	if !p.ownNames[host] && !strings.HasSuffix(host, ".localhost") {
		return false
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	for _, o := range p.own {
		if int(o.Port()) == port && (o.Addr().IsUnspecified() || o.Addr().IsLoopback() || p.isLocal(o.Addr())) {
			return true
		}
	}
	return false
}

// DialContext connects to addr after checking every IP its host resolves to; it connects to an
// IP it checked, so a name cannot change its answer between the check and the connection. It
// plugs into invoke.Config.DialOptions as grpc.WithContextDialer.
func (p *Policy) DialContext(ctx context.Context, addr string) (net.Conn, error) {
	host, portText, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	port, err := strconv.Atoi(portText)
	if err != nil {
		return nil, fmt.Errorf("%s: port %q is not a number", addr, portText)
	}
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, err
	}
	last := fmt.Errorf("%s: no address", addr)
	var d net.Dialer
	for _, ip := range ips {
		ip = ip.Unmap()
		if err := p.checkIP(addr+" ("+ip.String()+")", ip, port); err != nil {
			last = err
			continue
		}
		conn, err := d.DialContext(ctx, "tcp", netip.AddrPortFrom(ip, uint16(port)).String())
		if err == nil {
			return conn, nil
		}
		last = err
	}
	return nil, last
}
