package grpcauth

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
	"google.golang.org/protobuf/types/known/durationpb"
)

// DefaultMaxClients is the number of client identities whose rate-limit buckets are kept when
// Config.MaxClients is 0. A bucket is a few hundred bytes.
const DefaultMaxClients = 10000

// openPrefixes are the services every caller may use without a token or a rate limit: load
// balancers probe health, and grpcurl needs reflection to find anything.
var openPrefixes = [...]string{
	"/grpc.health.v1.Health/",
	"/grpc.reflection.v1.ServerReflection/",
	"/grpc.reflection.v1alpha.ServerReflection/",
}

// Config configures a Guard. The zero value serves plaintext, without tokens or rate limits.
type Config struct {
	// TLS is the server's transport security (see ServerTLS); nil serves plaintext.
	TLS *tls.Config
	// Tokens, when not empty, must be presented as "authorization: Bearer TOKEN" on every call
	// but health checks and reflection; other calls fail UNAUTHENTICATED.
	Tokens []Token
	// RateLimit is the sustained number of calls per second allowed to one client identity;
	// 0 means no rate limit.
	RateLimit float64
	// RateBurst is how many calls an identity may make at once before the sustained rate
	// applies; 0 means RateLimit rounded up (at least 1).
	RateBurst int
	// MaxClients bounds the identities whose buckets are kept; 0 means DefaultMaxClients.
	MaxClients int
	// Logger receives refused calls (never a secret); nil discards.
	Logger *slog.Logger
	// Registerer, when set, receives the guard's metrics.
	Registerer prometheus.Registerer
	// Now is the rate limiter's clock; nil means time.Now.
	Now func() time.Time
}

// Guard authenticates and rate-limits the calls of one gRPC server.
type Guard struct {
	tls     *tls.Config
	tokens  []Token
	limiter *limiter // nil: no rate limit
	log     *slog.Logger
	now     func() time.Time
	refused *prometheus.CounterVec // nil without a Registerer
}

// New checks cfg and returns a Guard.
func New(cfg Config) (*Guard, error) {
	if cfg.RateLimit < 0 || math.IsNaN(cfg.RateLimit) || math.IsInf(cfg.RateLimit, 0) {
		return nil, fmt.Errorf("rate limit %v calls/s: want a finite number >= 0 (0 = off)", cfg.RateLimit)
	}
	if cfg.RateBurst < 0 {
		return nil, fmt.Errorf("rate burst %d: want >= 0 (0 = the rate limit, rounded up)", cfg.RateBurst)
	}
	if cfg.MaxClients < 0 {
		return nil, fmt.Errorf("max clients %d: want >= 0 (0 = %d)", cfg.MaxClients, DefaultMaxClients)
	}
	if _, err := MergeTokens(cfg.Tokens); err != nil {
		return nil, err
	}
	g := &Guard{tls: cfg.TLS, tokens: cfg.Tokens, log: cfg.Logger, now: cfg.Now}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	if g.now == nil {
		g.now = time.Now
	}
	if cfg.RateLimit > 0 {
		burst := cfg.RateBurst
		if burst == 0 {
			burst = max(1, int(math.Ceil(cfg.RateLimit)))
		}
		maxClients := cfg.MaxClients
		if maxClients == 0 {
			maxClients = DefaultMaxClients
		}
		g.limiter = newLimiter(cfg.RateLimit, burst, maxClients)
	}
	if cfg.Registerer != nil {
		if err := g.register(cfg.Registerer); err != nil {
			return nil, err
		}
	}
	return g, nil
}

func (g *Guard) register(r prometheus.Registerer) error {
	g.refused = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "treaty_grpc_refused_total",
		Help: "gRPC API calls refused before reaching a handler, by reason (unauthenticated, rate_limited).",
	}, []string{"reason"})
	// Both reasons exist from the start, so that rate() and alerts see a zero, not a gap.
	g.refused.WithLabelValues("unauthenticated")
	g.refused.WithLabelValues("rate_limited")
	if err := r.Register(g.refused); err != nil {
		return fmt.Errorf("register gRPC guard metrics: %w", err)
	}
	if g.limiter != nil {
		clients := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "treaty_grpc_rate_limit_clients",
			Help: "Client identities whose rate-limit buckets are kept (bounded; idle ones are forgotten).",
		}, func() float64 { return float64(g.limiter.size()) })
		if err := r.Register(clients); err != nil {
			return fmt.Errorf("register gRPC guard metrics: %w", err)
		}
	}
	return nil
}

// ServerOptions returns the transport credentials (when TLS is set) and the interceptors.
func (g *Guard) ServerOptions() []grpc.ServerOption {
	var opts []grpc.ServerOption
	if g.tls != nil {
		opts = append(opts, grpc.Creds(credentials.NewTLS(g.tls)))
	}
	// The tap handle refuses before the request message is read; the interceptors go in too,
	// so that a server built without the tap (or a call the tap did not see) is still guarded
	// and handlers always find the caller's Identity.
	return append(opts, grpc.InTapHandle(g.TapHandle),
		grpc.ChainUnaryInterceptor(g.UnaryInterceptor), grpc.ChainStreamInterceptor(g.StreamInterceptor))
}

// TapHandle authenticates and rate-limits a call from its headers alone, in the transport, before
// a byte of its message is read or buffered: a refused call costs about its headers whatever the
// size of its body, and the refusal (with its RetryInfo) is sent at once while the stream is
// reset. It is installed with grpc.InTapHandle by ServerOptions. It runs on the connection's
// reader goroutine, so it does no I/O beyond a log line.
func (g *Guard) TapHandle(ctx context.Context, info *tap.Info) (context.Context, error) {
	if isOpen(info.FullMethodName) {
		return ctx, nil
	}
	id, err := g.admit(ctx, info.FullMethodName)
	if err != nil {
		return nil, err
	}
	return context.WithValue(ctx, identityKey{}, id), nil
}

// Describe summarizes the guard for a start-up log line; token names only, never secrets.
func (g *Guard) Describe() []any {
	names := make([]string, len(g.tokens))
	for i, t := range g.tokens {
		names[i] = t.name
	}
	attrs := []any{"tls", g.tls != nil, "mtls", g.tls != nil && g.tls.ClientAuth == tls.RequireAndVerifyClientCert,
		"tokens", strings.Join(names, ",")}
	if g.limiter != nil {
		attrs = append(attrs, "rate_limit", float64(g.limiter.limit), "rate_burst", g.limiter.burst, "rate_clients_max", g.limiter.max)
	} else {
		attrs = append(attrs, "rate_limit", "off")
	}
	return attrs
}

// Open reports whether the guard lets every caller in: no TLS, no tokens. The CLI warns then.
func (g *Guard) Open() bool { return g.tls == nil && len(g.tokens) == 0 }

// UnaryInterceptor authenticates and rate-limits one unary call.
func (g *Guard) UnaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if isOpen(info.FullMethod) || Identity(ctx) != "" {
		// Open, or admitted by TapHandle already: a call is counted once.
		return handler(ctx, req)
	}
	id, err := g.admit(ctx, info.FullMethod)
	if err != nil {
		return nil, err
	}
	return handler(context.WithValue(ctx, identityKey{}, id), req)
}

// StreamInterceptor does for a stream what UnaryInterceptor does for a call; the stream's start
// counts as one call.
func (g *Guard) StreamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if isOpen(info.FullMethod) || Identity(ss.Context()) != "" {
		return handler(srv, ss)
	}
	id, err := g.admit(ss.Context(), info.FullMethod)
	if err != nil {
		return err
	}
	return handler(srv, &identityStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), identityKey{}, id)})
}

type identityStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *identityStream) Context() context.Context { return s.ctx }

type identityKey struct{}

// Identity returns the caller's identity as the guard saw it ("token:NAME", "cert:SUBJECT" or
// "ip:ADDR"), or "" outside a guarded call.
func Identity(ctx context.Context) string {
	id, _ := ctx.Value(identityKey{}).(string)
	return id
}

func isOpen(method string) bool {
	for _, p := range openPrefixes {
		if strings.HasPrefix(method, p) {
			return true
		}
	}
	return false
}

// admit returns the caller's identity, or the status error that refuses the call. A failed
// authentication still spends a token of the caller's IP address, so guessing is rate limited.
func (g *Guard) admit(ctx context.Context, method string) (string, error) {
	id, authErr := g.identify(ctx)
	if g.limiter != nil {
		if ok, wait := g.limiter.take(id, g.now()); !ok {
			g.count("rate_limited")
			g.log.Debug("gRPC call refused: rate limit", "method", method, "client", id, "retry_after", wait)
			return "", rateLimited(id, float64(g.limiter.limit), g.limiter.burst, wait)
		}
	}
	if authErr != nil {
		g.count("unauthenticated")
		g.log.Warn("gRPC call refused: unauthenticated", "method", method, "client", id, "reason", authErr.Error())
		return "", status.Error(codes.Unauthenticated, authErr.Error())
	}
	return id, nil
}

func (g *Guard) count(reason string) {
	if g.refused != nil {
		g.refused.WithLabelValues(reason).Inc()
	}
}

// Reasons for refusing a token. They are sent to the caller and logged, so they never quote
// what the caller sent.
var (
	errNoToken    = errors.New(`a bearer token is required: send metadata "authorization: Bearer TOKEN"`)
	errBadScheme  = errors.New(`the authorization metadata must be "Bearer TOKEN"`)
	errWrongToken = errors.New("the bearer token is not one of this coordinator's gRPC tokens")
)

// identify returns who is calling. With tokens configured, a caller without a valid one gets
// its IP identity and an error.
func (g *Guard) identify(ctx context.Context) (string, error) {
	p, _ := peer.FromContext(ctx)
	if len(g.tokens) > 0 {
		t, err := g.token(ctx)
		if err != nil {
			return ipIdentity(p), err
		}
		return "token:" + t.name, nil
	}
	if p != nil {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 && len(ti.State.VerifiedChains[0]) > 0 {
			return "cert:" + ti.State.VerifiedChains[0][0].Subject.String(), nil
		}
	}
	return ipIdentity(p), nil
}

func (g *Guard) token(ctx context.Context) (Token, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	vals := md.Get("authorization")
	if len(vals) == 0 || strings.TrimSpace(vals[0]) == "" {
		return Token{}, errNoToken
	}
	scheme, secret, ok := strings.Cut(strings.TrimSpace(vals[0]), " ")
	secret = strings.TrimSpace(secret)
	if !ok || !strings.EqualFold(scheme, "Bearer") || secret == "" {
		return Token{}, errBadScheme
	}
	t, ok := match(g.tokens, secret)
	if !ok {
		return Token{}, errWrongToken
	}
	return t, nil
}

func ipIdentity(p *peer.Peer) string {
	if p == nil || p.Addr == nil {
		return "ip:unknown"
	}
	if tcp, ok := p.Addr.(*net.TCPAddr); ok {
		return "ip:" + tcp.IP.String()
	}
	host, _, err := net.SplitHostPort(p.Addr.String())
	if err != nil {
		return "ip:" + p.Addr.String()
	}
	return "ip:" + host
}

// rateLimited is RESOURCE_EXHAUSTED with a google.rpc.RetryInfo, so that clients that honour it
// come back when a token is there instead of hammering.
func rateLimited(id string, limit float64, burst int, wait time.Duration) error {
	st := status.New(codes.ResourceExhausted, fmt.Sprintf("rate limit exceeded for %s: %g calls/s, burst %d; retry in %s",
		id, limit, burst, wait.Round(time.Millisecond)))
	if d, err := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(wait)}); err == nil {
		st = d
	}
	return st.Err()
}
