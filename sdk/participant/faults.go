package participant

import (
	"context"
	"math/rand/v2"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/pkg/fault"
)

// FaultOptions tunes FaultInterceptor. The zero value is ready to use.
type FaultOptions struct {
	// OnFault is told of every call a rule perturbed, before the effect runs (log it, count
	// it); nil = nothing.
	OnFault func(ctx context.Context, method string, md Metadata, r fault.Rule)
	// Rand returns uniform numbers in [0,1) for the rules' probability; default math/rand/v2.
	Rand func() float64
	// Now is the clock rules expire by; default time.Now.
	Now func() time.Time
}

// FaultInterceptor applies fault rules (the format of pkg/fault, the same the coordinator's
// /admin/v1/faults takes) to the calls this service receives, so a team can rehearse its own
// service failing: slow, refusing, answering after its work is done but losing the answer, or
// silent. Target patterns are matched against the full method ("/package.Service/Method"), Op and
// GIDPrefix against the coordinator's metadata; Workflow never matches here (a participant does
// not know it). Effects:
//
//   - delay: wait, then run the handler;
//   - status: answer the status without running the handler;
//   - lost_response: run the handler (its work commits), then answer UNAVAILABLE;
//   - drop: never run the handler; hold the call until the caller gives up.
//
// Put it first in the chain (grpc.ChainUnaryInterceptor(participant.FaultInterceptor(set, nil),
// participant.UnaryServerInterceptor())) so that a refused call costs the handler nothing. Build
// rules with fault.NewSet; every rule needs a reason and an expiry, so a forgotten rehearsal ends
// by itself.
func FaultInterceptor(rules *fault.Set, opts *FaultOptions) grpc.UnaryServerInterceptor {
	var o FaultOptions
	if opts != nil {
		o = *opts
	}
	if o.Rand == nil {
		o.Rand = rand.Float64
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		md := incomingTreaty(ctx)
		r, ok := rules.Pick(fault.Call{Target: info.FullMethod, Op: md.Op, GID: md.GID}, o.Now(), o.Rand())
		if !ok {
			return handler(ctx, req)
		}
		if o.OnFault != nil {
			o.OnFault(ctx, info.FullMethod, md, r)
		}
		switch r.Effect {
		case fault.EffectDelay:
			t := time.NewTimer(time.Duration(r.Delay))
			defer t.Stop()
			select {
			case <-t.C:
			case <-ctx.Done():
				return nil, status.FromContextError(ctx.Err()).Err()
			}
			return handler(ctx, req)
		case fault.EffectStatus:
			return nil, status.Error(r.StatusCode(), r.StatusMessage())
		case fault.EffectLostResponse:
			if _, err := handler(ctx, req); err != nil {
				return nil, err
			}
			return nil, status.Error(codes.Unavailable, "fault injected: the call took effect; its response was lost")
		case fault.EffectDrop:
			<-ctx.Done()
			return nil, status.FromContextError(ctx.Err()).Err()
		}
		return handler(ctx, req)
	}
}

// incomingTreaty reads the coordinator's metadata of a call, without validating it (the fault
// rules only match on it).
func incomingTreaty(ctx context.Context) Metadata {
	in, _ := metadata.FromIncomingContext(ctx)
	first := func(key string) string {
		if v := in.Get(key); len(v) > 0 {
			return v[0]
		}
		return ""
	}
	return Metadata{GID: first(MetadataGID), Branch: first(MetadataBranch), Op: first(MetadataOp), Mode: first(MetadataMode)}
}
