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
	var tx *treatyv1.Transaction
	if wait > 0 {
		tx, _, err = c.Engine.Wait(ctx, res.GID, wait)
	} else {
		tx, err = c.Engine.Get(ctx, res.GID)
	}
	if err != nil {
		return nil, toStatus(err)
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
	case errors.Is(err, engine.ErrNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, engine.ErrStopping):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}
