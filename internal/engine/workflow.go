package engine

import (
	"context"
	"errors"
	"fmt"
	"sort"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/store"
)

// RegisterWorkflow validates a saga definition and stores it under name, as a new version when it
// differs from the newest one.
func (e *Engine) RegisterWorkflow(ctx context.Context, name string, spec *treatyv1.SagaSpec) (*treatyv1.Workflow, bool, error) {
	if err := validateWorkflowName(name); err != nil {
		return nil, false, err
	}
	if _, err := planSaga(spec, e.cfg.Limits, e.cfg.Retry); err != nil {
		return nil, false, err
	}
	raw, hash, err := encodeSpec(spec)
	if err != nil {
		return nil, false, err
	}
	w, created, err := e.cfg.Store.RegisterWorkflow(ctx, name, raw, hash)
	if err != nil {
		return nil, false, err
	}
	pw, err := workflowProto(w)
	return pw, created, err
}

func validateWorkflowName(name string) error {
	if name == "" {
		return invalid("name", "is required")
	}
	if len(name) > MaxStepNameBytes {
		return invalid("name", "is %d bytes, limit %d", len(name), MaxStepNameBytes)
	}
	if !nameRE.MatchString(name) {
		return invalid("name", "%q has characters outside [A-Za-z0-9._:-]", name)
	}
	return nil
}

func workflowProto(w store.Workflow) (*treatyv1.Workflow, error) {
	var spec treatyv1.SagaSpec
	if err := proto.Unmarshal(w.Spec, &spec); err != nil {
		return nil, fmt.Errorf("decode workflow %q v%d: %w", w.Name, w.Version, err)
	}
	return &treatyv1.Workflow{Name: w.Name, Version: int32(w.Version), Saga: &spec, CreatedAt: timestamppb.New(w.CreatedAt)}, nil
}

// ListWorkflows lists definitions (every version), optionally of one name.
func (e *Engine) ListWorkflows(ctx context.Context, name string) ([]*treatyv1.Workflow, error) {
	ws, err := e.cfg.Store.ListWorkflows(ctx, name)
	if err != nil {
		return nil, err
	}
	out := make([]*treatyv1.Workflow, 0, len(ws))
	for _, w := range ws {
		pw, err := workflowProto(w)
		if err != nil {
			return nil, err
		}
		out = append(out, pw)
	}
	return out, nil
}

// StartWorkflow starts a registered workflow with its inputs. It returns the version started.
func (e *Engine) StartWorkflow(ctx context.Context, req *treatyv1.StartWorkflowRequest) (SubmitResult, int, error) {
	if err := validateWorkflowName(req.Name); err != nil {
		return SubmitResult{}, 0, err
	}
	if req.Version < 0 {
		return SubmitResult{}, 0, invalid("version", "must be >= 0 (0 = newest), got %d", req.Version)
	}
	w, err := e.cfg.Store.GetWorkflow(ctx, req.Name, int(req.Version))
	if errors.Is(err, store.ErrNotFound) {
		return SubmitResult{}, 0, fmt.Errorf("%w: %w", ErrNotFound, err)
	}
	if err != nil {
		return SubmitResult{}, 0, err
	}
	var spec treatyv1.SagaSpec
	if err := proto.Unmarshal(w.Spec, &spec); err != nil {
		return SubmitResult{}, 0, fmt.Errorf("decode workflow %q v%d: %w", w.Name, w.Version, err)
	}
	steps := map[string]*treatyv1.SagaStep{}
	for _, s := range spec.Steps {
		steps[s.Name] = s
	}
	names := make([]string, 0, len(req.Inputs))
	for n := range req.Inputs {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		in := req.Inputs[n]
		st, ok := steps[n]
		if !ok {
			return SubmitResult{}, 0, invalid("inputs", "step %q is not a step of workflow %q v%d", n, w.Name, w.Version)
		}
		if in.GetActionPayload() != nil {
			st.Action.Payload = in.ActionPayload
		}
		if in.GetCompensatePayload() != nil {
			st.Compensate.Payload = in.CompensatePayload
		}
	}
	res, err := e.submitSaga(ctx, req.Gid, &spec, w.Name, w.Version)
	return res, w.Version, err
}
