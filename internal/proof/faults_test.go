package proof

import (
	"context"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/sdk/participant"
)

// fault is one way a participant call goes wrong.
type fault int

const (
	faultNone fault = iota
	// faultDelay: the request arrives only after the caller's deadline passed. The caller sees
	// DEADLINE_EXCEEDED; the participant handles the request late, when the coordinator may
	// already have turned the transaction back.
	faultDelay
	// faultDrop: the request is never sent; the caller sees UNAVAILABLE.
	faultDrop
	// faultLose: the participant handles the request, the response is lost; UNAVAILABLE.
	faultLose
	// faultDuplicate: the request arrives twice, at the same time; the caller gets one answer.
	faultDuplicate
	// faultUnavailable: the request reaches the participant, which answers UNAVAILABLE without
	// handling it (a participant restarting).
	faultUnavailable
	numFaults
)

func (f fault) String() string {
	return [...]string{"none", "delay", "drop", "lose", "duplicate", "unavailable"}[f]
}

// faultHeader asks a bank to answer UNAVAILABLE without handling the call (faultUnavailable).
const faultHeader = "x-proof-fault"

// faultRates are the probabilities of each fault per call; the rest of the calls go through.
type faultRates struct {
	Delay, Drop, Lose, Duplicate, Unavailable float64
}

func (r faultRates) of(f fault) float64 {
	switch f {
	case faultDelay:
		return r.Delay
	case faultDrop:
		return r.Drop
	case faultLose:
		return r.Lose
	case faultDuplicate:
		return r.Duplicate
	case faultUnavailable:
		return r.Unavailable
	}
	return 0
}

// injector decides, from a seeded generator, which fault each call suffers, and applies it:
// as a gRPC client interceptor (client), or around a server handler (serve) where the caller
// offers no hook. Calls it sends late run in goroutines that Wait collects.
type injector struct {
	name  string
	rates faultRates
	// lateTimeout bounds a late request: long enough to be handled, short enough for Wait.
	lateTimeout time.Duration
	// hold, when set, keeps late requests back until it is closed, so a test can look at what
	// happened before they arrive however slowly the machine runs.
	hold chan struct{}

	mu  sync.Mutex
	rng *rand.Rand

	counts [numFaults]atomic.Int64
	late   sync.WaitGroup
	// lateConns carry late requests, one per address: a request held up in the network arrives
	// even when its sender has died and closed its own connection meanwhile.
	lateConns map[string]*grpc.ClientConn
}

func newInjector(name string, seed uint64, rates faultRates) *injector {
	return &injector{
		name: name, rates: rates, lateTimeout: 3 * time.Second, lateConns: map[string]*grpc.ClientConn{},
		// A second word derived from the name, so injectors sharing a seed draw different streams.
		rng: rand.New(rand.NewPCG(seed, nameHash(name))),
	}
}

func nameHash(s string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(s))
	return h.Sum64()
}

// pick draws the fault for one call.
func (in *injector) pick() fault {
	in.mu.Lock()
	x := in.rng.Float64()
	in.mu.Unlock()
	for f := faultDelay; f < numFaults; f++ {
		if x < in.rates.of(f) {
			in.counts[f].Add(1)
			return f
		}
		x -= in.rates.of(f)
	}
	in.counts[faultNone].Add(1)
	return faultNone
}

// Wait waits for every late request to be sent and answered.
func (in *injector) Wait() { in.late.Wait() }

// Close waits for the late requests and closes their connections.
func (in *injector) Close() {
	in.late.Wait()
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, c := range in.lateConns {
		_ = c.Close()
	}
	in.lateConns = map[string]*grpc.ClientConn{}
}

// lateConn returns the injector's own connection to the address cc dials (its first one, for
// the coordinator's "treaty-invoke:///host:port,..." targets).
func (in *injector) lateConn(cc *grpc.ClientConn) (*grpc.ClientConn, error) {
	addr := cc.Target()
	if _, rest, ok := strings.Cut(addr, ":///"); ok {
		addr = rest
	}
	addr, _, _ = strings.Cut(addr, ",")
	in.mu.Lock()
	defer in.mu.Unlock()
	if c, ok := in.lateConns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	in.lateConns[addr] = c
	return c, nil
}

// summary renders the counts, for the test log.
func (in *injector) summary() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s:", in.name)
	for f := faultNone; f < numFaults; f++ {
		fmt.Fprintf(&b, " %s=%d", f, in.counts[f].Load())
	}
	return b.String()
}

func (in *injector) count(f fault) int64 { return in.counts[f].Load() }

// client is the interceptor for a connection whose calls should suffer faults.
func (in *injector) client() grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		switch in.pick() {
		case faultDrop:
			return status.Errorf(codes.Unavailable, "proof: %s dropped before it was sent", method)
		case faultUnavailable:
			return invoker(metadata.AppendToOutgoingContext(ctx, faultHeader, "unavailable"), method, req, reply, cc, opts...)
		case faultLose:
			err := invoker(ctx, method, req, reply, cc, opts...)
			return status.Errorf(codes.Unavailable, "proof: the response of %s was lost (it was %s)", method, status.Code(err))
		case faultDuplicate:
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				_ = invoker(ctx, method, req, freshReply(reply), cc, opts...)
			}()
			err := invoker(ctx, method, req, reply, cc, opts...)
			wg.Wait()
			return err
		case faultDelay:
			deadline, ok := ctx.Deadline()
			if !ok {
				// Nothing to be late for: a slow network, then the call.
				deadline = time.Now().Add(200 * time.Millisecond)
			}
			in.late.Add(1)
			go func() {
				defer in.late.Done()
				t := time.NewTimer(time.Until(deadline) + 20*time.Millisecond)
				defer t.Stop()
				<-t.C
				if in.hold != nil {
					<-in.hold
				}
				// The metadata (gid, branch, op) travels on; the caller's deadline does not.
				lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), in.lateTimeout)
				defer cancel()
				conn, err := in.lateConn(cc)
				if err != nil {
					return
				}
				_ = invoker(lctx, method, req, freshReply(reply), conn, opts...)
			}()
			if !ok {
				return status.Errorf(codes.Unavailable, "proof: %s delayed; the caller had no deadline", method)
			}
			<-ctx.Done()
			return status.FromContextError(ctx.Err()).Err()
		}
		return invoker(ctx, method, req, reply, cc, opts...)
	}
}

// freshReply returns a new value of reply's type, so a duplicate or late call never writes
// into the caller's reply.
func freshReply(reply any) any {
	return reflect.New(reflect.TypeOf(reply).Elem()).Interface()
}

// serve runs one server-side call under a fault, for callers that offer no client hook (the
// SDK's TCC tries). handle must not touch the stream: it may run after the call ended.
func (in *injector) serve(ctx context.Context, handle func(ctx context.Context) error) error {
	switch in.pick() {
	case faultDrop, faultUnavailable:
		return status.Error(codes.Unavailable, "proof: request dropped")
	case faultLose:
		err := handle(ctx)
		return status.Errorf(codes.Unavailable, "proof: the response was lost (it was %s)", status.Code(err))
	case faultDuplicate:
		var wg sync.WaitGroup
		wg.Add(1)
		go func() { defer wg.Done(); _ = handle(ctx) }()
		err := handle(ctx)
		wg.Wait()
		return err
	case faultDelay:
		if _, ok := ctx.Deadline(); !ok {
			return handle(ctx)
		}
		<-ctx.Done()
		in.late.Add(1)
		go func() {
			defer in.late.Done()
			if in.hold != nil {
				<-in.hold
			}
			lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), in.lateTimeout)
			defer cancel()
			_ = handle(lctx)
		}()
		return status.FromContextError(ctx.Err()).Err()
	}
	return handle(ctx)
}

// defaultSeed makes every run draw the same faults and workload unless TREATY_PROOF_SEED says
// otherwise. (Goroutine scheduling still varies which call meets which fault.)
const defaultSeed = 20260404

// proofSeed is TREATY_PROOF_SEED when set (a number, or "random" to explore), otherwise
// defaultSeed. Either way it is logged.
func proofSeed(t *testing.T) uint64 {
	t.Helper()
	seed := uint64(defaultSeed)
	switch s := os.Getenv("TREATY_PROOF_SEED"); s {
	case "":
	case "random":
		seed = rand.Uint64()
	default:
		v, err := strconv.ParseUint(s, 10, 64)
		require.NoError(t, err, "TREATY_PROOF_SEED=%q: want an unsigned integer or random", s)
		seed = v
	}
	t.Logf("fault seed %d (replay with TREATY_PROOF_SEED=%d)", seed, seed)
	return seed
}

func TestInjectorIsSeeded(t *testing.T) {
	t.Parallel()
	rates := faultRates{Delay: 0.1, Drop: 0.1, Lose: 0.1, Duplicate: 0.1, Unavailable: 0.1}
	draw := func(seed uint64, name string) []fault {
		in := newInjector(name, seed, rates)
		out := make([]fault, 200)
		for i := range out {
			out[i] = in.pick()
		}
		return out
	}
	require.Equal(t, draw(7, "coord"), draw(7, "coord"), "same seed, same faults")
	require.NotEqual(t, draw(7, "coord"), draw(8, "coord"))
	require.NotEqual(t, draw(7, "coord"), draw(7, "tries"), "injectors sharing a seed draw different streams")
	seen := map[fault]bool{}
	for _, f := range draw(7, "coord") {
		seen[f] = true
	}
	require.Len(t, seen, int(numFaults), "200 draws at these rates hit every fault")
}

// TestInjectorFaults checks that each fault does to a real call what it claims, against a
// bank whose handler counts its runs.
func TestInjectorFaults(t *testing.T) {
	t.Parallel()
	bk := newBank(t, bankOptions{Name: "faults", Accounts: map[string]int64{"acc": 1_000_000}})
	cases := []struct {
		f        fault
		code     codes.Code
		runs     int64 // handler runs once everything settled
		runsSync int64 // handler runs when the call returns
	}{
		{faultNone, codes.OK, 1, 1},
		{faultDrop, codes.Unavailable, 0, 0},
		{faultUnavailable, codes.Unavailable, 0, 0},
		{faultLose, codes.Unavailable, 1, 1},
		{faultDuplicate, codes.OK, 1, 1}, // the barrier turns the duplicate into a no-op
		{faultDelay, codes.DeadlineExceeded, 1, 0},
	}
	for _, tc := range cases {
		t.Run(tc.f.String(), func(t *testing.T) {
			t.Parallel()
			var rates faultRates
			switch tc.f {
			case faultDelay:
				rates.Delay = 1
			case faultDrop:
				rates.Drop = 1
			case faultLose:
				rates.Lose = 1
			case faultDuplicate:
				rates.Duplicate = 1
			case faultUnavailable:
				rates.Unavailable = 1
			}
			in := newInjector("test-"+tc.f.String(), 1, rates)
			// The late request waits for the check below, and has all the time it needs.
			in.hold, in.lateTimeout = make(chan struct{}), time.Minute
			released := false
			release := func() {
				if !released {
					released = true
					close(in.hold)
				}
			}
			t.Cleanup(in.Close)
			t.Cleanup(release)
			conn := dialBank(t, bk, in)
			gid := "inj-" + tc.f.String()
			// Only the delayed call is meant to miss its deadline; every other call must be
			// answered, however loaded the machine, so it gets a deadline it cannot miss.
			callTimeout := time.Minute
			if tc.f == faultDelay {
				callTimeout = 300 * time.Millisecond
			}
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			md := participant.Metadata{GID: gid, Branch: "debit", Op: participant.OpAction, Mode: participant.ModeSaga}
			err := callBank(ctx, conn, methodDebit, md, order{Account: "acc", Amount: 1})
			require.Equal(t, tc.code, status.Code(err), "%v", err)
			require.Equal(t, tc.runsSync, bk.applied(gid), "business changes when the call returned")
			release()
			in.Wait()
			require.Equal(t, tc.runs, bk.applied(gid), "business changes once late calls arrived")
			handled := bk.handled(gid)
			switch tc.f {
			case faultDuplicate:
				require.EqualValues(t, 2, handled, "both copies reached the bank")
			case faultDrop, faultUnavailable:
				require.Zero(t, handled)
			default:
				require.EqualValues(t, 1, handled)
			}
		})
	}
}
