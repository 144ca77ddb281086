// Package sdk is Treaty's Go client: it submits sagas, runs TCC transactions, two-phase commits
// and transactional messages through a Treaty coordinator, and waits for their outcome.
//
// A client talks to the coordinator only through its gRPC API (treaty.v1). Participants use the
// helpers in sdk/participant (barrier, metadata interceptor, prepared transactions).
//
//	c, err := sdk.Dial(ctx, sdk.Options{Address: "localhost:7600"})
//	tx, err := c.Saga(ctx, sdk.Saga{Steps: []sdk.Step{{
//		Name:       "flight",
//		Action:     sdk.MustCall("flights:9001", flightv1.Flights_Reserve_FullMethodName, &flightv1.ReserveRequest{Trip: "t1"}),
//		Compensate: sdk.MustCall("flights:9001", flightv1.Flights_Cancel_FullMethodName, &flightv1.CancelRequest{Trip: "t1"}),
//	}}})
package sdk

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/resolver/manual"
	"google.golang.org/grpc/status"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// Options configure a Client. Zero values mean the documented defaults.
type Options struct {
	// Address of the coordinator: host:port; several replicas as host:port,host:port; or a gRPC
	// target such as dns:///coordinators.internal:7600 (every address the name resolves to).
	// Required unless Addresses is set. With several replicas, calls are spread round-robin, and
	// a call that fails with UNAVAILABLE (a replica stopped or unreachable) is retried (see
	// Retries) on another: safe, since every call the SDK makes is idempotent on its gid.
	Address string
	// Addresses are more replicas, host:port each, added to Address.
	Addresses []string
	// TLS enables transport security with this configuration; nil means plaintext.
	TLS *tls.Config
	// Token, when set, is sent as "authorization: Bearer <token>" on every call.
	Token string
	// CallTimeout bounds one RPC to the coordinator (not the transaction); default 10s.
	CallTimeout time.Duration
	// Retries is how often an RPC is retried that failed with UNAVAILABLE (a coordinator
	// restarting or unreachable; with backoff) or with RESOURCE_EXHAUSTED carrying a retry delay
	// (rate limited, replica full; after that delay); default 4. Every RPC the SDK makes is
	// idempotent: it always sends a gid. Negative: never retry.
	Retries int
	// DialOptions are appended to the SDK's own (credentials, codecs).
	DialOptions []grpc.DialOption
	// Logger receives retry notices; nil discards them.
	Logger *slog.Logger
}

// Client is a connection to a coordinator. It is safe for concurrent use; Close it when done.
type Client struct {
	opts Options
	conn *grpc.ClientConn
	api  treatyv1.CoordinatorClient
	log  *slog.Logger

	// Participant connections for calls the client makes itself (TCC tries).
	pmu   sync.Mutex
	pconn map[string]*grpc.ClientConn
}

// Dial connects to a coordinator. The connection is lazy: Dial fails only on bad options.
func Dial(ctx context.Context, opts Options) (*Client, error) {
	target, resolverOpt, err := dialTarget(opts)
	if err != nil {
		return nil, err
	}
	if opts.CallTimeout <= 0 {
		opts.CallTimeout = 10 * time.Second
	}
	switch {
	case opts.Retries == 0:
		opts.Retries = 4
	case opts.Retries < 0:
		opts.Retries = 0 // never retry
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	creds := insecure.NewCredentials()
	if opts.TLS != nil {
		creds = credentials.NewTLS(opts.TLS)
	}
	// Round-robin over every address the target has; a replica that is down drops out of the
	// rotation until it answers again.
	dopts := []grpc.DialOption{grpc.WithTransportCredentials(creds), grpc.WithDefaultServiceConfig(roundRobin)}
	if resolverOpt != nil {
		dopts = append(dopts, resolverOpt)
	}
	dopts = append(dopts, opts.DialOptions...)
	if opts.Token != "" {
		dopts = append(dopts, grpc.WithPerRPCCredentials(bearer{token: opts.Token, secure: opts.TLS != nil}))
	}
	conn, err := grpc.NewClient(target, dopts...)
	if err != nil {
		return nil, fmt.Errorf("sdk: dial %s: %w", target, err)
	}
	return &Client{opts: opts, conn: conn, api: treatyv1.NewCoordinatorClient(conn), log: opts.Logger, pconn: map[string]*grpc.ClientConn{}}, nil
}

// Close closes the coordinator connection and any participant connections.
func (c *Client) Close() error {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	for _, pc := range c.pconn {
		_ = pc.Close()
	}
	c.pconn = map[string]*grpc.ClientConn{}
	return c.conn.Close()
}

// API returns the raw gRPC client, for what the SDK does not wrap.
func (c *Client) API() treatyv1.CoordinatorClient { return c.api }

type bearer struct {
	token  string
	secure bool
}

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + b.token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.secure }

// rpc runs one idempotent coordinator call with the per-call timeout, retrying UNAVAILABLE.
func rpc[T any](ctx context.Context, c *Client, name string, extra time.Duration, f func(ctx context.Context) (T, error)) (T, error) {
	var zero T
	backoff := 100 * time.Millisecond
	for attempt := 0; ; attempt++ {
		cctx, cancel := context.WithTimeout(ctx, c.opts.CallTimeout+extra)
		res, err := f(cctx)
		cancel()
		if err == nil {
			return res, nil
		}
		wait, retry := retryAfter(err, backoff)
		if !retry || attempt >= c.opts.Retries || ctx.Err() != nil {
			return zero, fromStatus(name, err)
		}
		c.log.Warn("sdk: coordinator busy or unavailable; retrying", "rpc", name, "attempt", attempt+1, "after", wait, "err", err)
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			return zero, fromStatus(name, ctx.Err())
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// retryAfter says whether a failed call is worth repeating, and after how long: UNAVAILABLE (a
// coordinator restarting or out of reach) after the backoff, RESOURCE_EXHAUSTED when the
// coordinator said when to retry (a rate limit, a full replica) after that delay, capped at 10s.
// Other errors, including a request that is too large, are final.
func retryAfter(err error, backoff time.Duration) (time.Duration, bool) {
	st := status.Convert(err)
	switch st.Code() {
	case codes.Unavailable:
		return backoff, true
	case codes.ResourceExhausted:
		for _, d := range st.Details() {
			if ri, ok := d.(*errdetails.RetryInfo); ok && ri.RetryDelay != nil {
				return min(max(ri.RetryDelay.AsDuration(), 10*time.Millisecond), 10*time.Second), true
			}
		}
	}
	return 0, false
}

// NewGID returns a fresh, time-ordered gid (UUIDv7).
func NewGID() string {
	id, err := uuid.NewV7()
	if err != nil {
		return uuid.NewString()
	}
	return id.String()
}

// Get returns a transaction with its branches and history.
func (c *Client) Get(ctx context.Context, gid string) (*Transaction, error) {
	res, err := rpc(ctx, c, "GetTransaction", 0, func(ctx context.Context) (*treatyv1.GetTransactionResponse, error) {
		return c.api.GetTransaction(ctx, &treatyv1.GetTransactionRequest{Gid: gid})
	})
	if err != nil {
		return nil, err
	}
	return newTransaction(res.Transaction), nil
}

// Wait blocks until the transaction is terminal or timeout passes (then ErrTimeout).
func (c *Client) Wait(ctx context.Context, gid string, timeout time.Duration) (*Transaction, error) {
	res, err := rpc(ctx, c, "WaitTransaction", timeout, func(ctx context.Context) (*treatyv1.WaitTransactionResponse, error) {
		return c.api.WaitTransaction(ctx, &treatyv1.WaitTransactionRequest{Gid: gid, Timeout: durationOrNil(timeout)})
	})
	if err != nil {
		return nil, err
	}
	tx := newTransaction(res.Transaction)
	if !res.Terminal {
		return tx, fmt.Errorf("transaction %q still %s after %s: %w", gid, tx.Phase, timeout, ErrTimeout)
	}
	return tx, nil
}

// participant returns a cached connection to a participant address, for calls the client makes
// itself. It uses the same credentials as the coordinator connection.
func (c *Client) participant(addr string) (*grpc.ClientConn, error) {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	if pc, ok := c.pconn[addr]; ok {
		return pc, nil
	}
	creds := insecure.NewCredentials()
	if c.opts.TLS != nil {
		creds = credentials.NewTLS(c.opts.TLS)
	}
	pc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, fmt.Errorf("sdk: dial participant %s: %w", addr, err)
	}
	c.pconn[addr] = pc
	return pc, nil
}

func withTreatyMetadata(ctx context.Context, gid, branch, op, mode string) context.Context {
	return metadata.AppendToOutgoingContext(ctx,
		"x-treaty-gid", gid, "x-treaty-branch", branch, "x-treaty-op", op, "x-treaty-mode", mode)
}

const roundRobin = `{"loadBalancingConfig": [{"round_robin": {}}]}`

// dialTarget turns Address and Addresses into a gRPC target: one address or name as it is,
// several through a resolver of this client's own (nothing registered globally).
func dialTarget(opts Options) (string, grpc.DialOption, error) {
	var addrs []string
	for _, a := range append(strings.Split(opts.Address, ","), opts.Addresses...) {
		if a = strings.TrimSpace(a); a != "" {
			addrs = append(addrs, a)
		}
	}
	switch {
	case len(addrs) == 0:
		return "", nil, fmt.Errorf("sdk: Options.Address is required: %w", ErrInvalidArgument)
	case len(addrs) == 1:
		return addrs[0], nil, nil
	}
	state := resolver.State{}
	for _, a := range addrs {
		if strings.Contains(a, "://") {
			return "", nil, fmt.Errorf("sdk: Options.Address: %q: a gRPC target (scheme:///name) must be the only address: %w", a, ErrInvalidArgument)
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			return "", nil, fmt.Errorf("sdk: Options.Address: %q is not host:port: %w", a, ErrInvalidArgument)
		}
		state.Addresses = append(state.Addresses, resolver.Address{Addr: a})
	}
	r := manual.NewBuilderWithScheme("treaty-replicas")
	r.InitialState(state)
	return r.Scheme() + ":///" + strings.Join(addrs, ","), grpc.WithResolvers(r), nil
}
