package cli_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	treatyv1 "github.com/treatyhq/treaty/api/treaty/v1"
	"github.com/treatyhq/treaty/internal/cli"
	"github.com/treatyhq/treaty/internal/grpcauth/grpcauthtest"
	"github.com/treatyhq/treaty/internal/pgtest"
)

const (
	fileSecret  = "file-token-secret-0123456789"
	envSecret   = "env-token-secret-0123456789"
	wrongSecret = "wrong-token-secret-0123456789"
)

// securedServe is a `coordinator serve` running in process until the test ends or stop is called.
type securedServe struct {
	addr string
	logs *syncBuffer
	stop func() int
}

func startServe(t *testing.T, args []string, env map[string]string) *securedServe {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	var out syncBuffer
	s := &securedServe{logs: &syncBuffer{}}
	addrs := make(chan string, 1)
	done := make(chan int, 1)
	go func() {
		done <- cli.Main(ctx, append([]string{"serve", "--listen", "127.0.0.1:0", "--http-listen", "", "--migrate"}, args...), cli.Env{
			Stdout: &out, Stderr: s.logs,
			Getenv: func(k string) string { return env[k] },
			Ready:  func(addr string) { addrs <- addr },
		})
	}()
	select {
	case s.addr = <-addrs:
	case code := <-done:
		cancel()
		t.Fatalf("serve exited with %d before it was ready; stderr:\n%s", code, s.logs.String())
	case <-time.After(30 * time.Second):
		cancel()
		t.Fatalf("serve not ready after 30s; stderr:\n%s", s.logs.String())
	}
	stopped := false
	code := 0
	s.stop = func() int {
		if !stopped {
			stopped = true
			cancel()
			select {
			case code = <-done:
			case <-time.After(30 * time.Second):
				t.Fatalf("serve did not stop within 30s")
			}
		}
		return code
	}
	t.Cleanup(func() { s.stop() })
	return s
}

func dialTLS(t *testing.T, addr string, cfg *tls.Config) *grpc.ClientConn {
	t.Helper()
	creds := insecure.NewCredentials()
	if cfg != nil {
		creds = credentials.NewTLS(cfg)
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func getTx(ctx context.Context, conn *grpc.ClientConn, secret string) error {
	if secret != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+secret)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, err := treatyv1.NewCoordinatorClient(conn).ListWorkflows(ctx, &treatyv1.ListWorkflowsRequest{})
	return err
}

// TestServeSecured runs `coordinator serve` with every security flag, as an operator would, and
// checks what callers see and that no token reaches the logs (at debug level, as JSON).
func TestServeSecured(t *testing.T) {
	t.Parallel()
	ca := grpcauthtest.NewCA(t, "coordinator CA")
	srv, client := ca.Server(t, "coordinator"), ca.Client(t, "billing")
	partCA, coordCA := grpcauthtest.NewCA(t, "participants CA"), grpcauthtest.NewCA(t, "coordinators CA")
	partSrv, coordClient := partCA.Server(t, "ledger"), coordCA.Client(t, "treaty")
	partTLS, err := tlsFor(partSrv, coordCA.CertFile)
	require.NoError(t, err)
	part := grpcauthtest.StartParticipant(t, partTLS)

	dir := t.TempDir()
	tokensFile := filepath.Join(dir, "grpc-tokens")
	require.NoError(t, os.WriteFile(tokensFile, []byte("# clients\nbilling:"+fileSecret+"\n"), 0o600))
	rulesFile := filepath.Join(dir, "participants.json")
	require.NoError(t, os.WriteFile(rulesFile, []byte(`{"targets": [{"match": "10.*", "plaintext": true}]}`), 0o600))

	s := startServe(t, []string{
		"--db", pgtest.NewDatabase(t), "--log-format", "json", "--log-level", "debug",
		"--tls-cert", srv.CertFile, "--tls-key", srv.KeyFile, "--tls-client-ca", ca.CertFile,
		"--grpc-tokens-file", tokensFile, "--rate-limit", "2", "--rate-burst", "4",
		"--participant-tls-file", rulesFile,
	}, map[string]string{
		"TREATY_GRPC_TOKENS":          "batch:" + envSecret,
		"TREATY_PARTICIPANT_TLS_CA":   partCA.CertFile,
		"TREATY_PARTICIPANT_TLS_CERT": coordClient.CertFile,
		"TREATY_PARTICIPANT_TLS_KEY":  coordClient.KeyFile,
	})
	ctx := t.Context()

	err = getTx(ctx, dialTLS(t, s.addr, nil), fileSecret)
	require.Equal(t, codes.Unavailable, status.Code(err), "plaintext: %v", err)
	err = getTx(ctx, dialTLS(t, s.addr, ca.ClientTLS(nil)), fileSecret)
	require.Equal(t, codes.Unavailable, status.Code(err), "no client certificate: %v", err)

	conn := dialTLS(t, s.addr, ca.ClientTLS(&client))
	require.Equal(t, codes.Unauthenticated, status.Code(getTx(ctx, conn, "")))
	require.Equal(t, codes.Unauthenticated, status.Code(getTx(ctx, conn, wrongSecret)))
	require.NoError(t, getTx(ctx, conn, fileSecret), "token from --grpc-tokens-file")
	require.NoError(t, getTx(ctx, conn, envSecret), "token from TREATY_GRPC_TOKENS")
	hctx, hcancel := context.WithTimeout(ctx, 5*time.Second)
	defer hcancel()
	_, err = healthpb.NewHealthClient(conn).Check(hctx, &healthpb.HealthCheckRequest{})
	require.NoError(t, err, "health checks need no token")

	// The coordinator calls the participant over mutual TLS, from the --participant-tls-* default.
	sctx, scancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+envSecret), 30*time.Second)
	defer scancel()
	res, err := treatyv1.NewCoordinatorClient(conn).SubmitSaga(sctx, &treatyv1.SubmitSagaRequest{
		Gid: "cli-tls", Wait: durationpb.New(20 * time.Second),
		Saga: &treatyv1.SagaSpec{Steps: []*treatyv1.SagaStep{{
			Name: "s", Action: &treatyv1.Call{Target: part.Target("bank.Ledger/Debit")}, Compensate: &treatyv1.Call{Target: part.Target("bank.Ledger/Credit")},
		}}},
	})
	require.NoError(t, err)
	require.Equal(t, treatyv1.Status_STATUS_SUCCEEDED, res.Transaction.Status)
	require.Equal(t, "CN=treaty,O=treaty tests", part.Calls()[0].ClientSubject)

	// The batch client spent 2 of 4 (rate 2/s): two more pass, then refusals.
	var limited bool
	for range 8 {
		if status.Code(getTx(ctx, conn, envSecret)) == codes.ResourceExhausted {
			limited = true
			break
		}
	}
	require.True(t, limited, "--rate-limit applies")

	require.Equal(t, 0, s.stop())
	logs := s.logs.String()
	require.Contains(t, logs, `"msg":"gRPC API security"`)
	require.Contains(t, logs, `"tokens":"billing,batch"`, "token names are logged")
	require.Contains(t, logs, `"msg":"gRPC call refused: unauthenticated"`)
	require.Contains(t, logs, `"msg":"gRPC call refused: rate limit"`)
	require.NotContains(t, logs, "the gRPC API is open")
	for _, secret := range []string{fileSecret, envSecret, wrongSecret} {
		require.NotContains(t, logs, secret, "a token reached the logs")
		require.NotContains(t, logs, secret[:12], "part of a token reached the logs")
	}
}

func tlsFor(p grpcauthtest.Pair, clientCA string) (*tls.Config, error) {
	pool, err := os.ReadFile(clientCA)
	if err != nil {
		return nil, err
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{p.TLS}, ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS12}
	cfg.ClientCAs = x509.NewCertPool()
	if !cfg.ClientCAs.AppendCertsFromPEM(pool) {
		return nil, fmt.Errorf("no certificate in %s", clientCA)
	}
	return cfg, nil
}

func TestServeOpenWarns(t *testing.T) {
	t.Parallel()
	s := startServe(t, []string{"--db", pgtest.NewDatabase(t)}, nil)
	require.NoError(t, getTx(t.Context(), dialTLS(t, s.addr, nil), ""))
	require.Equal(t, 0, s.stop())
	require.Contains(t, s.logs.String(), "the gRPC API is open")
}

func TestServeSecurityFlagErrors(t *testing.T) {
	t.Parallel()
	ca := grpcauthtest.NewCA(t, "coordinator CA")
	srv := ca.Server(t, "coordinator")
	dir := t.TempDir()
	badRules := filepath.Join(dir, "rules.json")
	require.NoError(t, os.WriteFile(badRules, []byte(`{"targets": [{"match": "*", "severname": "x"}]}`), 0o600))
	dflt := filepath.Join(dir, "default.json")
	require.NoError(t, os.WriteFile(dflt, []byte(`{"default": {"ca": "`+ca.CertFile+`"}}`), 0o600))
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		want []string
	}{
		{"client CA without a certificate", nil, []string{"--tls-client-ca", ca.CertFile}, []string{"--tls-client-ca needs --tls-cert"}},
		{"certificate without key", nil, []string{"--tls-cert", srv.CertFile}, []string{"--tls-cert", "key file"}},
		{"short token in env", map[string]string{"TREATY_GRPC_TOKENS": "ci:tooshort"}, nil, []string{"TREATY_GRPC_TOKENS", "at least 16"}},
		{"missing tokens file", nil, []string{"--grpc-tokens-file", filepath.Join(dir, "nope")}, []string{"--grpc-tokens-file"}},
		{"negative rate", map[string]string{"TREATY_RATE_LIMIT": "-1"}, nil, []string{"--rate-limit -1"}},
		{"rate not a number", map[string]string{"TREATY_RATE_LIMIT": "fast"}, nil, []string{"TREATY_RATE_LIMIT", "want a number"}},
		{"unknown field in rules", nil, []string{"--participant-tls-file", badRules}, []string{"--participant-tls-file", `unknown field "severname"`}},
		{"two defaults", nil, []string{"--participant-tls-file", dflt, "--participant-tls"}, []string{"has a default"}},
		{"participant cert without key", nil, []string{"--participant-tls-cert", srv.CertFile}, []string{"cert and key go together"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			// The database is never reached: flags are checked first.
			r := run(t, tc.env, append([]string{"serve", "--db", "postgres://unused@127.0.0.1:1/none?connect_timeout=1"}, tc.args...)...)
			require.Equal(t, 1, r.code, "stderr: %s", r.stderr)
			for _, w := range tc.want {
				require.Contains(t, r.stderr, w)
			}
			require.NotContains(t, r.stderr, "tooshort", "a rejected secret is not echoed")
		})
	}
}

func TestServeHelpListsSecurityFlags(t *testing.T) {
	t.Parallel()
	r := run(t, nil, "serve", "--help")
	require.Equal(t, 0, r.code)
	requireFlagsDocumented(t, r.stdout+r.stderr, []flagDoc{
		{"tls-cert", "TREATY_TLS_CERT", ""},
		{"tls-key", "TREATY_TLS_KEY", ""},
		{"tls-client-ca", "TREATY_TLS_CLIENT_CA", ""},
		{"grpc-tokens-file", "TREATY_GRPC_TOKENS_FILE", ""},
		{"rate-limit", "TREATY_RATE_LIMIT", ""},
		{"rate-burst", "TREATY_RATE_BURST", ""},
		{"rate-limit-clients", "TREATY_RATE_LIMIT_CLIENTS", "10000"},
		{"participant-tls", "TREATY_PARTICIPANT_TLS", ""},
		{"participant-tls-ca", "TREATY_PARTICIPANT_TLS_CA", ""},
		{"participant-tls-cert", "TREATY_PARTICIPANT_TLS_CERT", ""},
		{"participant-tls-key", "TREATY_PARTICIPANT_TLS_KEY", ""},
		{"participant-tls-file", "TREATY_PARTICIPANT_TLS_FILE", ""},
	})
	require.True(t, strings.Contains(r.stdout, "TREATY_GRPC_TOKENS adds more"), "the environment list of tokens is documented")
}
