package grpcauthtest

import (
	"crypto/tls"
	"net"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/treatyhq/treaty/internal/invoke"
)

// Participant is a real gRPC participant on loopback that serves TLS only and answers OK to
// any method, recording who called (the subject of the caller's verified client certificate).
type Participant struct {
	Addr string

	mu    sync.Mutex
	calls []ParticipantCall
}

// ParticipantCall is one call a Participant answered.
type ParticipantCall struct {
	Method, GID, Op string
	// ClientSubject is the verified client certificate's subject; empty without mutual TLS.
	ClientSubject string
}

// StartParticipant serves with cfg (ServerTLS-like: certificate, and ClientCAs with
// RequireAndVerifyClientCert for mutual TLS) until the test ends.
func StartParticipant(t testing.TB, cfg *tls.Config) *Participant {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &Participant{Addr: lis.Addr().String()}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)), grpc.UnknownServiceHandler(p.handle), grpc.ForceServerCodecV2(invoke.RawCodec{}))
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return p
}

// Target returns the target URI of method ("pkg.Svc/Method") on this participant.
func (p *Participant) Target(method string) string { return "grpc://" + p.Addr + "/" + method }

// Calls returns the calls answered so far.
func (p *Participant) Calls() []ParticipantCall {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]ParticipantCall(nil), p.calls...)
}

func (p *Participant) handle(_ any, stream grpc.ServerStream) error {
	method, _ := grpc.MethodFromServerStream(stream)
	var payload []byte
	if err := stream.RecvMsg(&payload); err != nil {
		return err
	}
	c := ParticipantCall{Method: method}
	if md, ok := metadata.FromIncomingContext(stream.Context()); ok {
		if v := md.Get(invoke.MetadataGID); len(v) > 0 {
			c.GID = v[0]
		}
		if v := md.Get(invoke.MetadataOp); len(v) > 0 {
			c.Op = v[0]
		}
	}
	if pr, ok := peer.FromContext(stream.Context()); ok {
		if ti, ok := pr.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
			c.ClientSubject = ti.State.VerifiedChains[0][0].Subject.String()
		}
	}
	p.mu.Lock()
	p.calls = append(p.calls, c)
	p.mu.Unlock()
	return stream.SendMsg([]byte{})
}
