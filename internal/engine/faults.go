package engine

import (
	"context"

	"github.com/treatyhq/treaty/internal/invoke"
	"github.com/treatyhq/treaty/internal/store"
)

// FaultInjector may perturb participant calls: the game-day fault injection that operators
// switch on with --allow-fault-injection (internal/faults implements it). Call either makes the
// call through next, perhaps late, or answers in its place; note is non-empty when it perturbed
// the call, and says how (it goes into the transaction's history). It must never let a call
// outlive req.Timeout, which the driver bounds by the lease.
type FaultInjector interface {
	Call(ctx context.Context, workflow string, req invoke.Request,
		next func(context.Context, invoke.Request) invoke.Result) (res invoke.Result, note string)
}

// EventFaultInjected is the history entry of a perturbed call.
const EventFaultInjected = "fault_injected"

// invokeWithFaults makes one participant call, through the fault injector when one is set.
func (d *driver) invokeWithFaults(ctx context.Context, req invoke.Request) (invoke.Result, string) {
	if d.e.cfg.Faults == nil {
		return d.e.cfg.Invoker.Call(ctx, req), ""
	}
	return d.e.cfg.Faults.Call(ctx, d.row.WorkflowName, req, d.e.cfg.Invoker.Call)
}

// faultEvent is the history entry of a call the injector perturbed.
func faultEvent(c dispatch, note string) store.Event {
	return store.Event{Kind: EventFaultInjected, Branch: c.branch, Op: c.op, Detail: "fault injected: " + note}
}
