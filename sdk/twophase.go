package sdk

import (
	"context"
	"time"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// TwoPhaseBranch is one participant of a two-phase commit.
type TwoPhaseBranch struct {
	Name                      string
	Prepare, Commit, Rollback Call
	Retry                     *Retry
	CallTimeout               time.Duration
}

// TwoPhase is a coordinator-driven two-phase commit.
type TwoPhase struct {
	GID      string
	Branches []TwoPhaseBranch
	// Timeout bounds the prepare phase (coordinator default 1m).
	Timeout time.Duration
	// Wait is how long to wait for the outcome (default 30s); negative: do not wait.
	Wait time.Duration
}

// TwoPhase submits a two-phase commit and waits for its outcome: nil when committed,
// ErrAborted when rolled back.
func (c *Client) TwoPhase(ctx context.Context, t TwoPhase) (*Transaction, error) {
	if t.GID == "" {
		t.GID = NewGID()
	}
	req := &treatyv1.Submit2PCRequest{Gid: t.GID, Timeout: durationOrNil(t.Timeout)}
	for _, b := range t.Branches {
		req.Branches = append(req.Branches, &treatyv1.TwoPhaseBranch{
			Name: b.Name, Prepare: b.Prepare.proto(), Commit: b.Commit.proto(), Rollback: b.Rollback.proto(),
			Retry: b.Retry.proto(), CallTimeout: durationOrNil(b.CallTimeout),
		})
	}
	wait := waitOrDefault(t.Wait)
	req.Wait = durationOrNil(wait)
	res, err := rpc(ctx, c, "Submit2PC", wait, func(ctx context.Context) (*treatyv1.Submit2PCResponse, error) {
		return c.api.Submit2PC(ctx, req)
	})
	if err != nil {
		return nil, err
	}
	return outcome(newTransaction(res.Transaction), wait)
}
