package sdk

import (
	"context"
	"fmt"
	"sort"
	"time"

	"google.golang.org/protobuf/proto"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
)

// Workflow is a saga definition registered with the coordinator under a name. Its steps' calls
// carry default payloads; each run may override them with inputs.
type Workflow struct {
	Name    string
	Steps   []Step
	Timeout time.Duration
}

// WorkflowVersion is one stored version of a workflow.
type WorkflowVersion struct {
	Name      string
	Version   int
	CreatedAt time.Time
	// Created is true when RegisterWorkflow added this version (false: it equalled the newest).
	Created bool
}

// RegisterWorkflow stores w. A changed definition becomes a new version; the same definition
// again returns the newest version unchanged. Running transactions keep the version they
// started with.
func (c *Client) RegisterWorkflow(ctx context.Context, w Workflow) (WorkflowVersion, error) {
	spec := Saga{Steps: w.Steps, Timeout: w.Timeout}.proto()
	res, err := rpc(ctx, c, "RegisterWorkflow", 0, func(ctx context.Context) (*treatyv1.RegisterWorkflowResponse, error) {
		return c.api.RegisterWorkflow(ctx, &treatyv1.RegisterWorkflowRequest{Name: w.Name, Saga: spec})
	})
	if err != nil {
		return WorkflowVersion{}, err
	}
	v := workflowVersion(res.Workflow)
	v.Created = res.Created
	return v, nil
}

func workflowVersion(w *treatyv1.Workflow) WorkflowVersion {
	return WorkflowVersion{Name: w.Name, Version: int(w.Version), CreatedAt: w.CreatedAt.AsTime()}
}

// ListWorkflows lists every version of every registered workflow, or of name when given.
func (c *Client) ListWorkflows(ctx context.Context, name string) ([]WorkflowVersion, error) {
	res, err := rpc(ctx, c, "ListWorkflows", 0, func(ctx context.Context) (*treatyv1.ListWorkflowsResponse, error) {
		return c.api.ListWorkflows(ctx, &treatyv1.ListWorkflowsRequest{Name: name})
	})
	if err != nil {
		return nil, err
	}
	out := make([]WorkflowVersion, len(res.Workflows))
	for i, w := range res.Workflows {
		out[i] = workflowVersion(w)
	}
	return out, nil
}

// Input overrides a step's payloads for one run: the request messages of its action and
// compensation (nil keeps the definition's payload).
type Input struct {
	Action, Compensate proto.Message
}

// StartOptions configure one run of a workflow.
type StartOptions struct {
	// GID is the idempotency key; generated when empty.
	GID string
	// Version pins a version; 0 runs the newest.
	Version int
	// Inputs by step name.
	Inputs map[string]Input
	// Wait is how long to wait for the outcome (default 30s); negative: do not wait.
	Wait time.Duration
}

// StartWorkflow runs a registered workflow and, unless opts.Wait is negative, waits for its
// outcome (nil error when it succeeded, ErrAborted when compensated, ...).
func (c *Client) StartWorkflow(ctx context.Context, name string, opts StartOptions) (*Transaction, error) {
	if opts.GID == "" {
		opts.GID = NewGID()
	}
	req := &treatyv1.StartWorkflowRequest{Name: name, Version: int32(opts.Version), Gid: opts.GID, Inputs: map[string]*treatyv1.StepInput{}}
	steps := make([]string, 0, len(opts.Inputs))
	for s := range opts.Inputs {
		steps = append(steps, s)
	}
	sort.Strings(steps)
	for _, s := range steps {
		in := opts.Inputs[s]
		si := &treatyv1.StepInput{}
		var err error
		if in.Action != nil {
			if si.ActionPayload, err = proto.Marshal(in.Action); err != nil {
				return nil, fmt.Errorf("sdk: marshal input of step %q: %w", s, err)
			}
		}
		if in.Compensate != nil {
			if si.CompensatePayload, err = proto.Marshal(in.Compensate); err != nil {
				return nil, fmt.Errorf("sdk: marshal compensation input of step %q: %w", s, err)
			}
		}
		req.Inputs[s] = si
	}
	wait := waitOrDefault(opts.Wait)
	req.Wait = durationOrNil(wait)
	res, err := rpc(ctx, c, "StartWorkflow", wait, func(ctx context.Context) (*treatyv1.StartWorkflowResponse, error) {
		return c.api.StartWorkflow(ctx, req)
	})
	if err != nil {
		return nil, err
	}
	return outcome(newTransaction(res.Transaction), wait)
}
