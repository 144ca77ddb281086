package invoke

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
)

// MaxTargetLen is the longest target URI accepted, in bytes. Targets are stored in every
// transaction's spec and shown in the admin UI; anything longer is a mistake, not an endpoint.
const MaxTargetLen = 512

// Scheme is the only target scheme understood.
const Scheme = "grpc"

// ErrInvalidTarget is wrapped by every ParseTarget error, so callers can tell a target that will
// never work from a participant that is down.
var ErrInvalidTarget = errors.New("invalid target")

const targetForm = "grpc://host:port[,host:port...]/package.Service/Method"

// Target is a parsed participant endpoint: grpc://host:port[,host:port...]/package.Service/Method.
type Target struct {
	Addrs  []string // host:port, at least one
	Method string   // full method, "/package.Service/Method"
}

// Endpoint returns the key that identifies the target's address set: its addresses sorted and
// joined by commas. Targets that differ only in method, or in the order of their addresses, share
// one endpoint, hence one connection, one circuit breaker and one concurrency limit.
func (t Target) Endpoint() string {
	addrs := slices.Clone(t.Addrs)
	slices.Sort(addrs)
	return strings.Join(addrs, ",")
}

// String returns the target in URI form.
func (t Target) String() string {
	return Scheme + "://" + strings.Join(t.Addrs, ",") + t.Method
}

// ParseTarget validates and parses a target URI of the form
// grpc://host:port[,host:port...]/package.Service/Method. Every error wraps ErrInvalidTarget and
// says what is wrong and what was expected.
func ParseTarget(uri string) (Target, error) {
	if len(uri) > MaxTargetLen {
		return Target{}, fmt.Errorf("%w: target %q...: length %d bytes, limit %d",
			ErrInvalidTarget, uri[:32], len(uri), MaxTargetLen)
	}
	fail := func(format string, args ...any) (Target, error) {
		return Target{}, fmt.Errorf("%w: target %q: %s", ErrInvalidTarget, uri, fmt.Sprintf(format, args...))
	}
	scheme, rest, ok := strings.Cut(uri, "://")
	if !ok {
		return fail("missing scheme, want %s", targetForm)
	}
	if scheme != Scheme {
		return fail("scheme %q not supported, want %s", scheme, targetForm)
	}
	if i := strings.IndexAny(rest, "?#"); i >= 0 {
		return fail("query and fragment not supported, want %s", targetForm)
	}
	authority, path, hasPath := strings.Cut(rest, "/")
	if authority == "" {
		return fail("no address, want %s", targetForm)
	}
	var addrs []string
	for a := range strings.SplitSeq(authority, ",") {
		addr, err := parseAddr(a)
		if err != nil {
			return fail("address %q: %v", a, err)
		}
		if slices.Contains(addrs, addr) {
			return fail("address %q listed twice", a)
		}
		addrs = append(addrs, addr)
	}
	if !hasPath || path == "" {
		return fail("no method, want %s", targetForm)
	}
	service, method, ok := strings.Cut(path, "/")
	if !ok || strings.Contains(method, "/") || !validMethod(method) || !validService(service) {
		return fail("method must be package.Service/Method, got %q", path)
	}
	return Target{Addrs: addrs, Method: "/" + path}, nil
}

// parseAddr checks one host:port and returns it in canonical form.
func parseAddr(a string) (string, error) {
	if a == "" {
		return "", errors.New("empty, want host:port")
	}
	host, port, err := net.SplitHostPort(a)
	if err != nil {
		return "", fmt.Errorf("want host:port: %w", err)
	}
	if host == "" {
		return "", errors.New("no host, want host:port")
	}
	for _, r := range host {
		// Letters, digits and the punctuation of DNS names and IP literals (':' and '%' for
		// IPv6 and its zone); anything else (userinfo, spaces) means a mangled URI.
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' ||
			r == '.' || r == '-' || r == '_' || r == ':' || r == '%') {
			return "", fmt.Errorf("host %q has character %q, want a DNS name or IP address", host, r)
		}
	}
	if port == "" {
		return "", errors.New("no port, want host:port with a port 1..65535")
	}
	for _, r := range port {
		if r < '0' || r > '9' {
			return "", fmt.Errorf("port %q is not a number 1..65535", port)
		}
	}
	n, err := strconv.Atoi(port)
	if err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("port %s out of range 1..65535", port)
	}
	return net.JoinHostPort(host, strconv.Itoa(n)), nil
}

// validService accepts a protobuf service full name: dot-separated identifiers. A service
// declared without a package ("Greeter") is legal protobuf, so the package part is optional.
func validService(s string) bool {
	if s == "" {
		return false
	}
	for part := range strings.SplitSeq(s, ".") {
		if !validIdent(part) {
			return false
		}
	}
	return true
}

func validMethod(m string) bool { return validIdent(m) }

func validIdent(s string) bool {
	if s == "" {
		return false
	}
	for i, r := range s {
		letter := r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r == '_'
		if !letter && (i == 0 || r < '0' || r > '9') {
			return false
		}
	}
	return true
}
