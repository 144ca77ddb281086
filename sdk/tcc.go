package sdk

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/pkg/rawcodec"
)

// TCCOptions configure a TCC transaction.
type TCCOptions struct {
	// GID is the idempotency key; generated when empty.
	GID string
	// Timeout is how long the function may take before the coordinator cancels (default 1m).
	Timeout time.Duration
	// Wait is how long to wait for confirm/cancel to finish after the decision (default 30s);
	// negative: return once the decision is recorded.
	Wait time.Duration
}

// TCCBranch is one participant of a TCC transaction.
type TCCBranch struct {
	Name                 string
	Try, Confirm, Cancel Call
	Retry                *Retry
	CallTimeout          time.Duration
}

// TCCScope is what the function passed to TCC uses to try branches.
type TCCScope struct {
	c   *Client
	gid string
}

// GID is the transaction's gid.
func (t *TCCScope) GID() string { return t.gid }

type gidKey struct{}

// GIDFromContext returns the gid of the TCC transaction whose function runs with ctx.
func GIDFromContext(ctx context.Context) (string, bool) {
	g, ok := ctx.Value(gidKey{}).(string)
	return g, ok
}

// TCC runs a try-confirm-cancel transaction: it begins it at the coordinator, runs fn, and
// commits when fn returns nil (every branch confirmed) or rolls back when fn returns an error or
// panics (every registered branch cancelled, including ones whose try failed or never finished;
// the panic is re-raised after the rollback is recorded). fn's context carries the gid.
//
// The error is nil when the transaction was confirmed; otherwise it wraps fn's error (or the
// coordinator's refusal, e.g. ErrFailedPrecondition when the timeout passed before the commit),
// and ErrAborted once the cancellation is recorded.
func (c *Client) TCC(ctx context.Context, opts TCCOptions, fn func(ctx context.Context, t *TCCScope) error) (tx *Transaction, err error) {
	gid := opts.GID
	if gid == "" {
		gid = NewGID()
	}
	if _, err := rpc(ctx, c, "BeginTCC", 0, func(ctx context.Context) (*treatyv1.BeginTCCResponse, error) {
		return c.api.BeginTCC(ctx, &treatyv1.BeginTCCRequest{Gid: gid, Timeout: durationOrNil(opts.Timeout)})
	}); err != nil {
		return nil, err
	}
	wait := waitOrDefault(opts.Wait)
	scope := &TCCScope{c: c, gid: gid}
	defer func() {
		if r := recover(); r != nil {
			_, _ = c.rollbackTCC(context.WithoutCancel(ctx), gid, fmt.Sprintf("the initiator panicked: %v", r), 0)
			panic(r)
		}
	}()
	fnErr := fn(context.WithValue(ctx, gidKey{}, gid), scope)
	if fnErr != nil {
		tx, err := c.rollbackTCC(context.WithoutCancel(ctx), gid, fnErr.Error(), wait)
		if err != nil {
			return tx, errors.Join(fnErr, err)
		}
		return tx, fmt.Errorf("%w (transaction %q rolled back: %w)", fnErr, gid, ErrAborted)
	}
	res, err := rpc(ctx, c, "CommitTCC", wait, func(ctx context.Context) (*treatyv1.CommitTCCResponse, error) {
		return c.api.CommitTCC(ctx, &treatyv1.CommitTCCRequest{Gid: gid, Wait: durationOrNil(wait)})
	})
	if err != nil {
		return nil, err
	}
	return outcome(newTransaction(res.Transaction), wait)
}

func (c *Client) rollbackTCC(ctx context.Context, gid, reason string, wait time.Duration) (*Transaction, error) {
	if len(reason) > 1024 {
		reason = reason[:1021] + "..."
	}
	res, err := rpc(ctx, c, "RollbackTCC", wait, func(ctx context.Context) (*treatyv1.RollbackTCCResponse, error) {
		return c.api.RollbackTCC(ctx, &treatyv1.RollbackTCCRequest{Gid: gid, Reason: reason, Wait: durationOrNil(wait)})
	})
	if err != nil {
		return nil, err
	}
	return newTransaction(res.Transaction), nil
}

// Try registers the branch with the coordinator (durably, before anything else) and then calls
// its try endpoint, with the transaction's metadata so the participant's barrier sees it. It
// returns the try's raw response. A participant's refusal (ABORTED) is returned wrapping
// ErrAborted; return it from the TCC function to roll back.
func (t *TCCScope) Try(ctx context.Context, b TCCBranch) ([]byte, error) {
	c := t.c
	_, err := rpc(ctx, c, "RegisterTCCBranch", 0, func(ctx context.Context) (*treatyv1.RegisterTCCBranchResponse, error) {
		return c.api.RegisterTCCBranch(ctx, &treatyv1.RegisterTCCBranchRequest{Gid: t.gid, Branch: &treatyv1.TCCBranch{
			Name: b.Name, Confirm: b.Confirm.proto(), Cancel: b.Cancel.proto(), Retry: b.Retry.proto(), CallTimeout: durationOrNil(b.CallTimeout),
		}})
	})
	if err != nil {
		return nil, err
	}
	addr, method, err := splitTarget(b.Try.Target)
	if err != nil {
		return nil, fmt.Errorf("branch %q try: %w", b.Name, err)
	}
	conn, err := c.participant(addr)
	if err != nil {
		return nil, err
	}
	timeout := b.CallTimeout
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	cctx, cancel := context.WithTimeout(withTreatyMetadata(ctx, t.gid, b.Name, "try", "tcc"), timeout)
	defer cancel()
	var resp []byte
	err = conn.Invoke(cctx, method, b.Try.Payload, &resp, grpc.ForceCodecV2(rawcodec.Codec{}))
	if err != nil {
		if status.Code(err) == codes.Aborted {
			return nil, fmt.Errorf("branch %q refused its try: %s: %w", b.Name, status.Convert(err).Message(), ErrAborted)
		}
		return nil, fmt.Errorf("branch %q try: %w", b.Name, err)
	}
	return resp, nil
}

// splitTarget splits grpc://host:port/pkg.Service/Method into host:port and /pkg.Service/Method.
func splitTarget(target string) (addr, method string, err error) {
	rest, ok := strings.CutPrefix(target, "grpc://")
	if !ok {
		return "", "", fmt.Errorf("target %q: want grpc://host:port/package.Service/Method: %w", target, ErrInvalidArgument)
	}
	i := strings.IndexByte(rest, '/')
	if i <= 0 {
		return "", "", fmt.Errorf("target %q: no method: %w", target, ErrInvalidArgument)
	}
	addr, method = rest[:i], rest[i:]
	if j := strings.IndexByte(addr, ','); j >= 0 {
		addr = addr[:j] // the initiator uses the first address; the coordinator balances
	}
	return addr, method, nil
}
