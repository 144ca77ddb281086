package grpcauth_test

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/grpcauth"
	"github.com/treatyhq/treaty/internal/grpcauth/grpcauthtest"
	"github.com/treatyhq/treaty/internal/invoke"
)

// participantPKI is a participant CA with a TLS participant that requires client certificates
// from the coordinators' CA.
type participantPKI struct {
	partCA, coordCA *grpcauthtest.CA
	coordPair       grpcauthtest.Pair
	part            *grpcauthtest.Participant
}

func newParticipantPKI(t *testing.T) *participantPKI {
	t.Helper()
	p := &participantPKI{partCA: grpcauthtest.NewCA(t, "participants CA"), coordCA: grpcauthtest.NewCA(t, "coordinators CA")}
	srv := p.partCA.Server(t, "participant", "payments.internal")
	tlsCfg, err := grpcauth.ServerTLS(srv.CertFile, srv.KeyFile, p.coordCA.CertFile, nil)
	require.NoError(t, err)
	p.part = grpcauthtest.StartParticipant(t, tlsCfg)
	p.coordPair = p.coordCA.Client(t, "coordinator-1")
	return p
}

func call(t *testing.T, inv *invoke.Invoker, target string) invoke.Result {
	t.Helper()
	return inv.Call(t.Context(), invoke.Request{Target: target, Payload: []byte("x"), Timeout: 3 * time.Second,
		Metadata: invoke.Metadata{GID: "g1", Branch: "b", Op: "action", Mode: "saga"}})
}

func newInvoker(t *testing.T, cfg grpcauth.ParticipantTLSConfig) *invoke.Invoker {
	t.Helper()
	pt, err := grpcauth.NewParticipantTLS(cfg, nil)
	require.NoError(t, err)
	inv := invoke.New(invoke.Config{TransportFor: pt.TransportFor, Breaker: invoke.BreakerConfig{FailureThreshold: 100}})
	t.Cleanup(func() { _ = inv.Close() })
	return inv
}

func TestParticipantMutualTLS(t *testing.T) {
	t.Parallel()
	p := newParticipantPKI(t)
	target := p.part.Target("pay.Ledger/Debit")

	// Trusting the participant's CA and presenting the coordinator's certificate: served.
	inv := newInvoker(t, grpcauth.ParticipantTLSConfig{Default: &grpcauth.TargetTLS{
		CA: p.partCA.CertFile, Cert: p.coordPair.CertFile, Key: p.coordPair.KeyFile,
	}})
	res := call(t, inv, target)
	require.Equal(t, invoke.OK, res.Outcome, "%v", res.Err)
	calls := p.part.Calls()
	require.Len(t, calls, 1)
	require.Equal(t, "CN=coordinator-1,O=treaty tests", calls[0].ClientSubject)
	require.Equal(t, "/pay.Ledger/Debit", calls[0].Method)

	for name, cfg := range map[string]grpcauth.ParticipantTLSConfig{
		"plaintext":             {},
		"no client certificate": {Default: &grpcauth.TargetTLS{CA: p.partCA.CertFile}},
		"system roots":          {Default: &grpcauth.TargetTLS{Cert: p.coordPair.CertFile, Key: p.coordPair.KeyFile}},
		"wrong server name": {Default: &grpcauth.TargetTLS{CA: p.partCA.CertFile, Cert: p.coordPair.CertFile, Key: p.coordPair.KeyFile,
			ServerName: "someone.else"}},
		"a plaintext rule wins over the default": {
			Default: &grpcauth.TargetTLS{CA: p.partCA.CertFile, Cert: p.coordPair.CertFile, Key: p.coordPair.KeyFile},
			Targets: []grpcauth.TargetTLS{{Match: "127.0.0.1", Plaintext: true}},
		},
	} {
		res := call(t, newInvoker(t, cfg), target)
		require.Equal(t, invoke.Transient, res.Outcome, "%s: %v", name, res.Err)
	}
	require.Len(t, p.part.Calls(), 1, "nothing got through without the right transport")

	// A rule with a server name the certificate carries, matched by address pattern.
	inv = newInvoker(t, grpcauth.ParticipantTLSConfig{Targets: []grpcauth.TargetTLS{
		{Match: "10.*", Plaintext: true},
		{Match: "127.0.0.*", CA: p.partCA.CertFile, Cert: p.coordPair.CertFile, Key: p.coordPair.KeyFile, ServerName: "payments.internal"},
	}})
	res = call(t, inv, target)
	require.Equal(t, invoke.OK, res.Outcome, "%v", res.Err)
}

func TestParticipantTLSRules(t *testing.T) {
	t.Parallel()
	ca := grpcauthtest.NewCA(t, "rules CA")
	pt, err := grpcauth.NewParticipantTLS(grpcauth.ParticipantTLSConfig{
		Default: &grpcauth.TargetTLS{CA: ca.CertFile},
		Targets: []grpcauth.TargetTLS{
			{Match: "*.mesh.local", Plaintext: true},
			{Match: "*:8443", CA: ca.CertFile},
		},
	}, nil)
	require.NoError(t, err)
	require.Equal(t, "rule *.mesh.local: plaintext", pt.Describe("a.mesh.local:9000"))
	require.Contains(t, pt.Describe("pay.svc:8443"), "rule *:8443: TLS, CA")
	require.Contains(t, pt.Describe("pay.svc:9000"), "default: TLS, CA")

	opts, err := pt.TransportFor([]string{"a.mesh.local:1", "b.MESH.local:2"})
	require.NoError(t, err)
	require.Len(t, opts, 1)
	_, err = pt.TransportFor([]string{"a.mesh.local:1", "pay.svc:8443"})
	require.ErrorContains(t, err, "different participant TLS rules")

	none, err := grpcauth.NewParticipantTLS(grpcauth.ParticipantTLSConfig{}, nil)
	require.NoError(t, err)
	opts, err = none.TransportFor([]string{"x:1"})
	require.NoError(t, err)
	require.Empty(t, opts, "no rule, no default: the invoker's plaintext stays")

	for _, tc := range []struct {
		cfg  grpcauth.ParticipantTLSConfig
		want string
	}{
		{grpcauth.ParticipantTLSConfig{Targets: []grpcauth.TargetTLS{{CA: ca.CertFile}}}, "target 1: match is empty"},
		{grpcauth.ParticipantTLSConfig{Targets: []grpcauth.TargetTLS{{Match: "*", Plaintext: true, CA: ca.CertFile}}}, "plaintext excludes"},
		{grpcauth.ParticipantTLSConfig{Default: &grpcauth.TargetTLS{Cert: ca.CertFile}}, "cert and key go together"},
		{grpcauth.ParticipantTLSConfig{Default: &grpcauth.TargetTLS{CA: "/nonexistent/ca.pem"}}, "ca:"},
	} {
		_, err := grpcauth.NewParticipantTLS(tc.cfg, nil)
		require.ErrorContains(t, err, tc.want)
	}
}

func TestReadParticipantTLSFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "participants.json")
	require.NoError(t, os.WriteFile(path, []byte(`{
  "default": {"ca": "ca.pem", "cert": "/abs/coord.pem", "key": "coord-key.pem"},
  "targets": [{"match": "*.payments.svc:443", "server_name": "payments.internal"}]
}`), 0o600))
	cfg, err := grpcauth.ReadParticipantTLSFile(path)
	require.NoError(t, err)
	require.Equal(t, filepath.Join(dir, "ca.pem"), cfg.Default.CA, "relative to the file")
	require.Equal(t, "/abs/coord.pem", cfg.Default.Cert)
	require.Equal(t, filepath.Join(dir, "coord-key.pem"), cfg.Default.Key)
	require.Equal(t, "payments.internal", cfg.Targets[0].ServerName)
	require.False(t, cfg.Empty())

	require.NoError(t, os.WriteFile(path, []byte(`{"targets": [{"match": "*", "servername": "x"}]}`), 0o600))
	_, err = grpcauth.ReadParticipantTLSFile(path)
	require.ErrorContains(t, err, `unknown field "servername"`)
}
