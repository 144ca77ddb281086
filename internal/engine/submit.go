package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/protobuf/types/known/timestamppb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/pkg/msg"
	"github.com/treatyhq/treaty/pkg/saga"
	"github.com/treatyhq/treaty/pkg/tcc"
	"github.com/treatyhq/treaty/pkg/twopc"
)

// SubmitResult is what SubmitSaga did.
type SubmitResult struct {
	GID      string
	Existing bool // the gid existed with the same spec; nothing new was started
}

// SubmitSaga validates and stores a saga, then drives it in this process at once. The
// transaction is durable before the first participant call.
func (e *Engine) SubmitSaga(ctx context.Context, gid string, spec *treatyv1.SagaSpec) (SubmitResult, error) {
	return e.submitSaga(ctx, gid, spec, "", 0)
}

func (e *Engine) submitSaga(ctx context.Context, gid string, spec *treatyv1.SagaSpec, workflow string, version int) (SubmitResult, error) {
	gid, err := e.gidOrNew(gid)
	if err != nil {
		return SubmitResult{}, err
	}
	plan, err := planSaga(spec, e.cfg.Limits, e.cfg.Retry)
	if err != nil {
		return SubmitResult{}, err
	}
	if err := e.admit(); err != nil {
		return SubmitResult{}, err
	}
	if err := e.admitBytes(int(payloadBytes(&sagaMachine{plan: plan}))); err != nil {
		return SubmitResult{}, err
	}
	raw, hash, err := encodeSpec(spec)
	if err != nil {
		return SubmitResult{}, err
	}
	sent := time.Now()
	res, err := e.create(ctx, store.CreateParams{
		GID: gid, Mode: "saga", Status: string(saga.PhaseRunning), Spec: raw, SpecHash: hash,
		WorkflowName: workflow, WorkflowVersion: version,
		Timeout: plan.timeout, Owner: e.cfg.Owner, Lease: e.cfg.Lease,
		// No branch rows: a step's rows are written once it is touched (see storedSagaRow).
		Events: []store.Event{{Kind: "submitted", Detail: fmt.Sprintf("saga with %d steps", len(plan.steps))}},
	})
	if err != nil {
		return SubmitResult{}, err
	}
	if !res.Created {
		if !bytes.Equal(res.Transaction.SpecHash, hash) || res.Transaction.Mode != "saga" {
			return SubmitResult{}, fmt.Errorf("gid %q: %w with a different spec", gid, ErrAlreadyExists)
		}
		return SubmitResult{GID: gid, Existing: true}, nil
	}
	e.cfg.Observer.TransactionStarted("saga")
	e.cfg.CrashPoint(CrashAfterCreate)
	m := newSagaMachine(plan, res.Transaction.Deadline, e.cfg.OperatorThreshold, saga.New(saga.Spec{Steps: plan.policy}))
	d := e.newDriver(gid, "saga", 1, m, sent.Add(e.cfg.Lease))
	d.row = res.Transaction
	d.parent = trace.SpanContextFromContext(ctx)
	if !e.start(d) {
		// Stopping: the lease expires (or recovery elsewhere claims it); nothing is lost.
		_ = e.cfg.Store.ReleaseLeases(context.WithoutCancel(ctx), e.cfg.Owner, []store.Release{{GID: gid, Epoch: 1}})
	}
	return SubmitResult{GID: gid}, nil
}

func newGID() (string, error) {
	id, err := uuid.NewV7()
	if err != nil {
		return "", fmt.Errorf("generate gid: %w", err)
	}
	return id.String(), nil
}

// Get returns a transaction with its branches and events.
func (e *Engine) Get(ctx context.Context, gid string) (*treatyv1.Transaction, error) {
	t, bs, evs, err := e.view(ctx, gid)
	if err != nil {
		return nil, err
	}
	return toProto(t, bs, evs), nil
}

// view reads a transaction as stored, with the branch rows the store leaves out put back (see
// completeSagaRows), so every reader sees every branch.
func (e *Engine) view(ctx context.Context, gid string) (store.Transaction, []store.Branch, []store.Event, error) {
	t, bs, evs, err := e.cfg.Store.GetView(ctx, gid)
	if errors.Is(err, store.ErrNotFound) {
		return t, nil, nil, fmt.Errorf("gid %q: %w", gid, ErrNotFound)
	}
	if err != nil {
		return t, nil, nil, err
	}
	if t.Mode == "saga" {
		names, err := sagaStepNames(t)
		if err != nil {
			return t, nil, nil, fmt.Errorf("gid %q: %w", gid, err)
		}
		bs = completeSagaRows(t, names, bs)
	}
	return t, bs, evs, nil
}

// Wait blocks until the transaction is terminal or timeout passes, then returns it.
func (e *Engine) Wait(ctx context.Context, gid string, timeout time.Duration) (*treatyv1.Transaction, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	done, unwatch := e.watch(gid)
	defer unwatch()
	e.mu.Lock()
	_, local := e.active[gid]
	e.mu.Unlock()
	if local {
		// Driven here: its driver says when it is done; read the database once, then.
		select {
		case <-done:
			done = nil
		case <-ctx.Done():
		}
	}
	return e.waitRead(ctx, gid, done)
}

// WaitOutcome is Wait for a caller that needs the outcome, not the history: when this replica
// drives the transaction, the answer comes from the driver's final state with no database read,
// and without events (GetTransaction has them).
func (e *Engine) WaitOutcome(ctx context.Context, gid string, timeout time.Duration) (*treatyv1.Transaction, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	done, unwatch := e.watch(gid)
	defer unwatch()
	e.mu.Lock()
	_, local := e.active[gid]
	e.mu.Unlock()
	if local {
		select {
		case final, ok := <-done:
			if ok && final != nil {
				return final, true, nil
			}
			done = nil
		case <-ctx.Done():
		}
	}
	return e.waitRead(ctx, gid, done)
}

// waitRead polls the database until gid is terminal or ctx ends; done (when not nil) wakes it
// early when a local driver finishes.
func (e *Engine) waitRead(ctx context.Context, gid string, done <-chan *treatyv1.Transaction) (*treatyv1.Transaction, bool, error) {
	poll := 20 * time.Millisecond
	for {
		tx, err := e.Get(context.WithoutCancel(ctx), gid)
		if err != nil {
			return nil, false, err
		}
		if terminal(tx.Status) {
			return tx, true, nil
		}
		// Driven here: the driver says when. Driven elsewhere: poll, backing off.
		select {
		case <-done:
			done = nil
		case <-time.After(poll):
			poll = min(poll*2, 500*time.Millisecond)
		case <-ctx.Done():
			return tx, false, nil
		}
	}
}

func terminal(s treatyv1.Status) bool {
	return s == treatyv1.Status_STATUS_SUCCEEDED || s == treatyv1.Status_STATUS_COMPENSATED || s == treatyv1.Status_STATUS_NEEDS_OPERATOR
}

// statusToProto maps each mode's phases onto the API's common statuses; Transaction.phase keeps
// the mode's own word.
var statusToProto = map[string]treatyv1.Status{
	string(tcc.PhaseTrying):         treatyv1.Status_STATUS_RUNNING,
	string(tcc.PhaseConfirming):     treatyv1.Status_STATUS_COMMITTING,
	string(tcc.PhaseCancelling):     treatyv1.Status_STATUS_COMPENSATING,
	string(tcc.PhaseConfirmed):      treatyv1.Status_STATUS_SUCCEEDED,
	string(tcc.PhaseCancelled):      treatyv1.Status_STATUS_COMPENSATED,
	string(twopc.PhasePreparing):    treatyv1.Status_STATUS_RUNNING,
	string(twopc.PhaseCommitting):   treatyv1.Status_STATUS_COMMITTING,
	string(twopc.PhaseRollingBack):  treatyv1.Status_STATUS_COMPENSATING,
	string(twopc.PhaseCommitted):    treatyv1.Status_STATUS_SUCCEEDED,
	string(twopc.PhaseRolledBack):   treatyv1.Status_STATUS_COMPENSATED,
	string(msg.PhasePrepared):       treatyv1.Status_STATUS_RUNNING,
	string(msg.PhaseDelivering):     treatyv1.Status_STATUS_COMMITTING,
	string(msg.PhaseAborted):        treatyv1.Status_STATUS_COMPENSATED,
	string(saga.PhaseRunning):       treatyv1.Status_STATUS_RUNNING,
	string(saga.PhaseCompensating):  treatyv1.Status_STATUS_COMPENSATING,
	string(saga.PhaseSucceeded):     treatyv1.Status_STATUS_SUCCEEDED,
	string(saga.PhaseCompensated):   treatyv1.Status_STATUS_COMPENSATED,
	string(saga.PhaseNeedsOperator): treatyv1.Status_STATUS_NEEDS_OPERATOR,
}

var branchStatusToProto = map[string]treatyv1.BranchStatus{
	string(saga.StatusPending):   treatyv1.BranchStatus_BRANCH_STATUS_PENDING,
	string(saga.StatusUnknown):   treatyv1.BranchStatus_BRANCH_STATUS_UNKNOWN,
	string(saga.StatusSucceeded): treatyv1.BranchStatus_BRANCH_STATUS_SUCCEEDED,
	string(saga.StatusFailed):    treatyv1.BranchStatus_BRANCH_STATUS_FAILED,
	string(saga.StatusSkipped):   treatyv1.BranchStatus_BRANCH_STATUS_SKIPPED,
}

var modeToProto = map[string]treatyv1.Mode{
	"saga": treatyv1.Mode_MODE_SAGA,
	"tcc":  treatyv1.Mode_MODE_TCC,
	"2pc":  treatyv1.Mode_MODE_TWO_PHASE,
	"msg":  treatyv1.Mode_MODE_MESSAGE,
}

func ts(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

func toProto(t store.Transaction, bs []store.Branch, evs []store.Event) *treatyv1.Transaction {
	out := &treatyv1.Transaction{
		Gid: t.GID, Mode: modeToProto[t.Mode], Status: statusToProto[t.Status],
		CreatedAt: ts(t.CreatedAt), UpdatedAt: ts(t.UpdatedAt), Deadline: ts(t.Deadline),
		Reason: t.Reason, Phase: t.Status,
		WorkflowName: t.WorkflowName, WorkflowVersion: int32(t.WorkflowVersion),
		Paused: t.Paused, LeaseOwner: t.LeaseOwner, LeaseExpiresAt: ts(t.LeaseExpiresAt), NextAttemptAt: ts(t.NextAttemptAt),
	}
	for _, b := range bs {
		out.Branches = append(out.Branches, &treatyv1.Branch{
			Name: b.Branch, Op: b.Op, Status: branchStatusToProto[b.Status],
			Attempts: int32(b.Attempts), LastError: b.LastError, UpdatedAt: ts(b.UpdatedAt),
		})
		waitingBranch(out.Branches[len(out.Branches)-1], b)
	}
	for _, ev := range evs {
		out.Events = append(out.Events, &treatyv1.Event{
			Id: ev.ID, At: ts(ev.At), Kind: ev.Kind, Branch: ev.Branch, Op: ev.Op, Detail: ev.Detail,
		})
	}
	return out
}
