// Package testparticipant runs a real gRPC participant on loopback for tests and benchmarks:
// any method name is accepted (the coordinator needs no generated code, and neither does this),
// every call is recorded with its metadata, and a script decides each answer.
package testparticipant

import (
	"context"
	"net"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/treatyhq/treaty/internal/invoke"
)

// Call is one request the participant received.
type Call struct {
	Method  string // full method, e.g. /bank.Ledger/Debit
	GID     string
	Branch  string
	Op      string
	Mode    string
	Payload []byte
	At      time.Time
	// Deadline is what the caller allowed (zero when none was sent).
	Deadline time.Time
	// Traceparent is the W3C trace context the call carried, if any.
	Traceparent string
}

// Script decides the answer to a call: return nil for OK, or a status error
// (status.Error(codes.Aborted, ...) for a business refusal).
type Script func(ctx context.Context, c Call) error

// Participant is a running gRPC server.
type Participant struct {
	Addr string

	srv    *grpc.Server
	mu     sync.Mutex
	calls  []Call
	script Script
	record bool
}

// Options configure Start.
type Options struct {
	// Script answers calls; nil answers OK to everything.
	Script Script
	// NoRecord skips recording calls (benchmarks).
	NoRecord bool
	// Listen address; default 127.0.0.1:0.
	Listen string
}

// Start serves on loopback until Stop.
func Start(opts Options) (*Participant, error) {
	if opts.Listen == "" {
		opts.Listen = "127.0.0.1:0"
	}
	lis, err := net.Listen("tcp", opts.Listen)
	if err != nil {
		return nil, err
	}
	p := &Participant{Addr: lis.Addr().String(), script: opts.Script, record: !opts.NoRecord}
	// Kept request goroutines (NumStreamWorkers) instead of one per call: a fresh goroutine
	// grows its stack by copying on every call, which made this no-op participant cost more
	// than it should in the benchmarks (issue 13).
	p.srv = grpc.NewServer(grpc.UnknownServiceHandler(p.handle), grpc.ForceServerCodecV2(invoke.RawCodec{}),
		grpc.NumStreamWorkers(64))
	go func() { _ = p.srv.Serve(lis) }()
	return p, nil
}

// SetScript replaces the script.
func (p *Participant) SetScript(s Script) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.script = s
}

// Target returns the target URI of a method on this participant, e.g. Target("bank.Ledger/Debit").
func (p *Participant) Target(method string) string {
	return "grpc://" + p.Addr + "/" + strings.TrimPrefix(method, "/")
}

func first(md metadata.MD, k string) string {
	if v := md.Get(k); len(v) > 0 {
		return v[0]
	}
	return ""
}

func (p *Participant) handle(_ any, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	var payload []byte
	if err := stream.RecvMsg(&payload); err != nil {
		return err
	}
	md, _ := metadata.FromIncomingContext(stream.Context())
	c := Call{
		Method: method, Payload: payload, At: time.Now(),
		GID: first(md, invoke.MetadataGID), Branch: first(md, invoke.MetadataBranch),
		Op: first(md, invoke.MetadataOp), Mode: first(md, invoke.MetadataMode),
		Traceparent: first(md, "traceparent"),
	}
	if dl, ok := stream.Context().Deadline(); ok {
		c.Deadline = dl
	}
	p.mu.Lock()
	if p.record {
		p.calls = append(p.calls, c)
	}
	script := p.script
	p.mu.Unlock()
	if script != nil {
		if err := script(stream.Context(), c); err != nil {
			if _, ok := status.FromError(err); !ok {
				err = status.Error(codes.Internal, err.Error())
			}
			return err
		}
	}
	return stream.SendMsg([]byte{})
}

// Calls returns a copy of the calls received so far.
func (p *Participant) Calls() []Call {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Call(nil), p.calls...)
}

// CallsFor returns the calls received for one gid.
func (p *Participant) CallsFor(gid string) []Call {
	var out []Call
	for _, c := range p.Calls() {
		if c.GID == gid {
			out = append(out, c)
		}
	}
	return out
}

// Stop stops the server at once.
func (p *Participant) Stop() { p.srv.Stop() }
