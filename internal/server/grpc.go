// Package server exposes the engine over gRPC (package treaty.v1). Domain errors become gRPC
// status codes in one table (toStatus), not in each handler.
package server

import (
	"context"
	"errors"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/engine"
)

// Limits on waiting.
const (
	DefaultWaitTimeout = 30 * time.Second
	MaxWaitTimeout     = 10 * time.Minute
)

// Coordinator implements treatyv1.CoordinatorServer.
type Coordinator struct {
	treatyv1.UnimplementedCoordinatorServer
	Engine *engine.Engine
}

// SubmitSaga implements treatyv1.CoordinatorServer.
func (c *Coordinator) SubmitSaga(ctx context.Context, req *treatyv1.SubmitSagaRequest) (*treatyv1.SubmitSagaResponse, error) {
	var wait time.Duration
	if req.Wait != nil {
		wait = req.Wait.AsDuration()
		if wait < 0 || wait > MaxWaitTimeout {
			return nil, toStatus(&engine.InvalidArgumentError{Field: "wait", Reason: "must be within 0.." + MaxWaitTimeout.String()})
		}
	}
	res, err := c.Engine.SubmitSaga(ctx, req.Gid, req.Saga)
	if err != nil {
		return nil, toStatus(err)
	}
	tx, err := c.transaction(ctx, res.GID, wait)
	if err != nil {
		return nil, err
	}
	return &treatyv1.SubmitSagaResponse{Transaction: tx, Existing: res.Existing}, nil
}

// GetTransaction implements treatyv1.CoordinatorServer.
func (c *Coordinator) GetTransaction(ctx context.Context, req *treatyv1.GetTransactionRequest) (*treatyv1.GetTransactionResponse, error) {
	if req.Gid == "" {
		return nil, toStatus(&engine.InvalidArgumentError{Field: "gid", Reason: "is required"})
	}
	tx, err := c.Engine.Get(ctx, req.Gid)
	if err != nil {
		return nil, toStatus(err)
	}
	return &treatyv1.GetTransactionResponse{Transaction: tx}, nil
}

// WaitTransaction implements treatyv1.CoordinatorServer.
func (c *Coordinator) WaitTransaction(ctx context.Context, req *treatyv1.WaitTransactionRequest) (*treatyv1.WaitTransactionResponse, error) {
	if req.Gid == "" {
		return nil, toStatus(&engine.InvalidArgumentError{Field: "gid", Reason: "is required"})
	}
	timeout := DefaultWaitTimeout
	if req.Timeout != nil {
		timeout = req.Timeout.AsDuration()
		if timeout <= 0 || timeout > MaxWaitTimeout {
			return nil, toStatus(&engine.InvalidArgumentError{Field: "timeout", Reason: "must be within (0, " + MaxWaitTimeout.String() + "]"})
		}
	}
	tx, terminal, err := c.Engine.Wait(ctx, req.Gid, timeout)
	if err != nil {
		return nil, toStatus(err)
	}
	return &treatyv1.WaitTransactionResponse{Transaction: tx, Terminal: terminal}, nil
}

func optionalDuration(field string, d interface{ AsDuration() time.Duration }, isNil bool, max time.Duration) (time.Duration, error) {
	if isNil {
		return 0, nil
	}
	v := d.AsDuration()
	if v < 0 || v > max {
		return 0, &engine.InvalidArgumentError{Field: field, Reason: "must be within 0.." + max.String()}
	}
	return v, nil
}

// BeginTCC implements treatyv1.CoordinatorServer.
func (c *Coordinator) BeginTCC(ctx context.Context, req *treatyv1.BeginTCCRequest) (*treatyv1.BeginTCCResponse, error) {
	var timeout time.Duration
	if req.Timeout != nil {
		timeout = req.Timeout.AsDuration()
	}
	res, err := c.Engine.BeginTCC(ctx, req.Gid, timeout)
	if err != nil {
		return nil, toStatus(err)
	}
	tx, err := c.Engine.Get(ctx, res.GID)
	if err != nil {
		return nil, toStatus(err)
	}
	return &treatyv1.BeginTCCResponse{Transaction: tx, Existing: res.Existing}, nil
}

// RegisterTCCBranch implements treatyv1.CoordinatorServer.
func (c *Coordinator) RegisterTCCBranch(ctx context.Context, req *treatyv1.RegisterTCCBranchRequest) (*treatyv1.RegisterTCCBranchResponse, error) {
	existing, err := c.Engine.RegisterTCCBranch(ctx, req.Gid, req.Branch)
	if err != nil {
		return nil, toStatus(err)
	}
	return &treatyv1.RegisterTCCBranchResponse{Existing: existing}, nil
}

// CommitTCC implements treatyv1.CoordinatorServer.
func (c *Coordinator) CommitTCC(ctx context.Context, req *treatyv1.CommitTCCRequest) (*treatyv1.CommitTCCResponse, error) {
	tx, err := c.decideTCC(ctx, req.Gid, true, "", req.Wait, req.Wait == nil)
	if err != nil {
		return nil, err
	}
	return &treatyv1.CommitTCCResponse{Transaction: tx}, nil
}

// RollbackTCC implements treatyv1.CoordinatorServer.
func (c *Coordinator) RollbackTCC(ctx context.Context, req *treatyv1.RollbackTCCRequest) (*treatyv1.RollbackTCCResponse, error) {
	tx, err := c.decideTCC(ctx, req.Gid, false, req.Reason, req.Wait, req.Wait == nil)
	if err != nil {
		return nil, err
	}
	return &treatyv1.RollbackTCCResponse{Transaction: tx}, nil
}

func (c *Coordinator) decideTCC(ctx context.Context, gid string, commit bool, reason string, w interface{ AsDuration() time.Duration }, noWait bool) (*treatyv1.Transaction, error) {
	wait, err := optionalDuration("wait", w, noWait, MaxWaitTimeout)
	if err != nil {
		return nil, toStatus(err)
	}
	if len(reason) > 1024 {
		return nil, toStatus(&engine.InvalidArgumentError{Field: "reason", Reason: "is longer than 1024 bytes"})
	}
	if err := c.Engine.DecideTCC(ctx, gid, commit, reason); err != nil {
		return nil, toStatus(err)
	}
	tx, err := c.transaction(ctx, gid, wait)
	if err != nil {
		return nil, err
	}
	return tx, nil
}

// Submit2PC implements treatyv1.CoordinatorServer.
func (c *Coordinator) Submit2PC(ctx context.Context, req *treatyv1.Submit2PCRequest) (*treatyv1.Submit2PCResponse, error) {
	wait, err := optionalDuration("wait", req.Wait, req.Wait == nil, MaxWaitTimeout)
	if err != nil {
		return nil, toStatus(err)
	}
	res, err := c.Engine.SubmitTwoPhase(ctx, req)
	if err != nil {
		return nil, toStatus(err)
	}
	tx, err := c.transaction(ctx, res.GID, wait)
	if err != nil {
		return nil, err
	}
	return &treatyv1.Submit2PCResponse{Transaction: tx, Existing: res.Existing}, nil
}

// PrepareMsg implements treatyv1.CoordinatorServer.
func (c *Coordinator) PrepareMsg(ctx context.Context, req *treatyv1.PrepareMsgRequest) (*treatyv1.PrepareMsgResponse, error) {
	res, err := c.Engine.PrepareMsg(ctx, req)
	if err != nil {
		return nil, toStatus(err)
	}
	tx, err := c.Engine.Get(ctx, res.GID)
	if err != nil {
		return nil, toStatus(err)
	}
	return &treatyv1.PrepareMsgResponse{Transaction: tx, Existing: res.Existing}, nil
}

// SubmitMsg implements treatyv1.CoordinatorServer.
func (c *Coordinator) SubmitMsg(ctx context.Context, req *treatyv1.SubmitMsgRequest) (*treatyv1.SubmitMsgResponse, error) {
	wait, err := optionalDuration("wait", req.Wait, req.Wait == nil, MaxWaitTimeout)
	if err != nil {
		return nil, toStatus(err)
	}
	if err := c.Engine.SubmitMsg(ctx, req.Gid); err != nil {
		return nil, toStatus(err)
	}
	tx, err := c.transaction(ctx, req.Gid, wait)
	if err != nil {
		return nil, err
	}
	return &treatyv1.SubmitMsgResponse{Transaction: tx}, nil
}

// RegisterWorkflow implements treatyv1.CoordinatorServer.
func (c *Coordinator) RegisterWorkflow(ctx context.Context, req *treatyv1.RegisterWorkflowRequest) (*treatyv1.RegisterWorkflowResponse, error) {
	w, created, err := c.Engine.RegisterWorkflow(ctx, req.Name, req.Saga)
	if err != nil {
		return nil, toStatus(err)
	}
	return &treatyv1.RegisterWorkflowResponse{Workflow: w, Created: created}, nil
}

// ListWorkflows implements treatyv1.CoordinatorServer.
func (c *Coordinator) ListWorkflows(ctx context.Context, req *treatyv1.ListWorkflowsRequest) (*treatyv1.ListWorkflowsResponse, error) {
	ws, err := c.Engine.ListWorkflows(ctx, req.Name)
	if err != nil {
		return nil, toStatus(err)
	}
	return &treatyv1.ListWorkflowsResponse{Workflows: ws}, nil
}

// StartWorkflow implements treatyv1.CoordinatorServer.
func (c *Coordinator) StartWorkflow(ctx context.Context, req *treatyv1.StartWorkflowRequest) (*treatyv1.StartWorkflowResponse, error) {
	wait, err := optionalDuration("wait", req.Wait, req.Wait == nil, MaxWaitTimeout)
	if err != nil {
		return nil, toStatus(err)
	}
	res, version, err := c.Engine.StartWorkflow(ctx, req)
	if err != nil {
		return nil, toStatus(err)
	}
	tx, err := c.transaction(ctx, res.GID, wait)
	if err != nil {
		return nil, err
	}
	return &treatyv1.StartWorkflowResponse{Transaction: tx, Existing: res.Existing, Version: int32(version)}, nil
}

// transaction returns gid's state: at once, or once it is terminal or wait has passed. A waited-for
// answer from the replica that drove the transaction carries no event history (GetTransaction
// does): it costs no database read.
func (c *Coordinator) transaction(ctx context.Context, gid string, wait time.Duration) (*treatyv1.Transaction, error) {
	var tx *treatyv1.Transaction
	var err error
	if wait > 0 {
		tx, _, err = c.Engine.WaitOutcome(ctx, gid, wait)
	} else {
		tx, err = c.Engine.Get(ctx, gid)
	}
	if err != nil {
		return nil, toStatus(err)
	}
	return tx, nil
}

// toStatus maps domain errors to gRPC status codes: the one place that does.
func toStatus(err error) error {
	var inv *engine.InvalidArgumentError
	switch {
	case errors.As(err, &inv):
		st := status.New(codes.InvalidArgument, inv.Error())
		if d, e := st.WithDetails(&errdetails.BadRequest{FieldViolations: []*errdetails.BadRequest_FieldViolation{
			{Field: inv.Field, Description: inv.Reason},
		}}); e == nil {
			st = d
		}
		return st.Err()
	case errors.Is(err, engine.ErrAlreadyExists):
		return status.Error(codes.AlreadyExists, err.Error())
	case errors.Is(err, engine.ErrFailedPrecondition):
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, engine.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, engine.ErrStopping), errors.Is(err, engine.ErrBusy):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, engine.ErrOverloaded):
		// Nothing was written: the client may come back, and RetryInfo says when.
		st := status.New(codes.ResourceExhausted, err.Error())
		if d, e := st.WithDetails(&errdetails.RetryInfo{RetryDelay: durationpb.New(engine.OverloadRetryAfter)}); e == nil {
			st = d
		}
		return st.Err()
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}
