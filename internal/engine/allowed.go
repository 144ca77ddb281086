package engine

import (
	"context"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/store"
)

// offeredActions are the operator actions that need no branch; resolve names a branch and is
// judged per branch by Operate.
var offeredActions = []string{ActionRetry, ActionResume, ActionRollback, ActionPause, ActionUnpause}

// allowedActions asks the transaction's own state machine, on a copy rebuilt from the rows,
// which operator actions it would take now: what a dashboard should offer. Nothing is written.
func (e *Engine) allowedActions(t store.Transaction, bs []store.Branch) []string {
	out := []string{}
	for _, a := range offeredActions {
		m, err := e.machineFromRows(store.Claimed{Transaction: t, Branches: bs})
		if err != nil {
			return out // a mode this version cannot drive: offer nothing
		}
		d := &driver{e: e, m: m, paused: t.Paused}
		if _, err := d.applyOperation(Operation{GID: t.GID, Action: a, Actor: "dry-run", Reason: "dry-run"}); err == nil {
			out = append(out, a)
		}
	}
	return out
}

// View returns a transaction with its history, like Get, and the operator actions its state
// machine allows now (retry, resume, rollback, pause, unpause), from the same snapshot.
func (e *Engine) View(ctx context.Context, gid string) (*treatyv1.Transaction, []string, error) {
	t, bs, evs, err := e.view(ctx, gid)
	if err != nil {
		return nil, nil, err
	}
	return toProto(t, bs, evs), e.allowedActions(t, bs), nil
}
