package cli_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	"github.com/treatyhq/treaty/internal/cli"
	"github.com/treatyhq/treaty/internal/pgtest"
)

func TestMain(m *testing.M) {
	code := pgtest.WrapTestMain(m)
	if code == 0 {
		// pgxpool's health check goroutine ends shortly after Close, not during it.
		if err := goleak.Find(goleak.IgnoreTopFunction("github.com/jackc/pgx/v5/pgxpool.(*Pool).backgroundHealthCheck")); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

// syncBuffer is written by the coordinator's goroutines (logs) while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type result struct {
	code           int
	stdout, stderr string
}

// run calls cli.Main in process with only the given environment variables set.
func run(t *testing.T, env map[string]string, args ...string) result {
	t.Helper()
	var out, errb syncBuffer
	code := cli.Main(t.Context(), args, cli.Env{
		Stdout: &out, Stderr: &errb,
		Getenv: func(k string) string { return env[k] },
	})
	return result{code: code, stdout: out.String(), stderr: errb.String()}
}

type flagDoc struct {
	name, env, def string // def "" when the default is empty or false
}

// helpFlags parses the flag list of a command's --help: "  --name  [TREATY_NAME] (default x)".
var helpLine = regexp.MustCompile(`(?m)^  --([a-z0-9-]+)  \[([A-Z0-9_]+)\](?: \(default (.+)\))?$`)

func requireFlagsDocumented(t *testing.T, help string, want []flagDoc) {
	t.Helper()
	listed := map[string]flagDoc{}
	for _, m := range helpLine.FindAllStringSubmatch(help, -1) {
		listed[m[1]] = flagDoc{name: m[1], env: m[2], def: m[3]}
	}
	require.NotEmpty(t, listed, "no flags found in help:\n%s", help)
	for name, doc := range listed {
		// Every flag, including ones added later, has its environment variable.
		require.Equal(t, "TREATY_"+strings.ToUpper(strings.ReplaceAll(name, "-", "_")), doc.env, "--%s", name)
	}
	for _, w := range want {
		got, ok := listed[w.name]
		require.True(t, ok, "--%s is not listed in help:\n%s", w.name, help)
		require.Equal(t, w, got, "--%s", w.name)
	}
}

var serveFlags = []flagDoc{
	{"db", "TREATY_DB", ""},
	{"listen", "TREATY_LISTEN", ":7600"},
	{"owner", "TREATY_OWNER", ""},
	{"lease", "TREATY_LEASE", "10s"},
	{"lazy-progress", "TREATY_LAZY_PROGRESS", "200ms"},
	{"recovery-interval", "TREATY_RECOVERY_INTERVAL", "1s"},
	{"claim-batch", "TREATY_CLAIM_BATCH", "64"},
	{"max-active", "TREATY_MAX_ACTIVE", "10000"},
	{"operator-threshold", "TREATY_OPERATOR_THRESHOLD", "10"},
	{"max-payload-bytes", "TREATY_MAX_PAYLOAD_BYTES", ""}, // default checked below: it is engine's
	{"max-steps", "TREATY_MAX_STEPS", ""},
	{"max-request-bytes", "TREATY_MAX_REQUEST_BYTES", "4194304"},
	{"allow-targets", "TREATY_ALLOW_TARGETS", ""},
	{"max-active-bytes", "TREATY_MAX_ACTIVE_BYTES", "268435456"},
	{"max-participant-endpoints", "TREATY_MAX_PARTICIPANT_ENDPOINTS", "1024"},
	{"db-max-conns", "TREATY_DB_MAX_CONNS", "16"},
	{"gc-percent", "TREATY_GC_PERCENT", "400"},
	{"memory-limit", "TREATY_MEMORY_LIMIT", ""},
	{"shutdown-timeout", "TREATY_SHUTDOWN_TIMEOUT", "30s"},
	{"log-format", "TREATY_LOG_FORMAT", "text"},
	{"log-level", "TREATY_LOG_LEVEL", "info"},
	{"migrate", "TREATY_MIGRATE", ""},
	{"allow-fault-injection", "TREATY_ALLOW_FAULT_INJECTION", ""},
}

func TestTopLevelHelp(t *testing.T) {
	t.Parallel()
	for _, arg := range []string{"--help", "-h", "help"} {
		r := run(t, nil, arg)
		require.Equal(t, 0, r.code, "coordinator %s", arg)
		for _, s := range []string{"coordinator serve", "coordinator migrate", "--db", "TREATY_DB", "--help"} {
			require.Contains(t, r.stdout, s, "coordinator %s", arg)
		}
	}
	// No command at all is a usage error, with the usage to fix it.
	r := run(t, nil)
	require.Equal(t, 2, r.code)
	require.Contains(t, r.stdout, "coordinator serve")
}

func TestServeHelp(t *testing.T) {
	t.Parallel()
	r := run(t, nil, "serve", "--help")
	require.Equal(t, 0, r.code)
	help := r.stdout + r.stderr
	require.Contains(t, help, "coordinator serve")
	want := append([]flagDoc(nil), serveFlags...)
	for i := range want {
		if want[i].name == "max-payload-bytes" || want[i].name == "max-steps" {
			want[i].def = helpDefault(t, help, want[i].name)
			require.NotEmpty(t, want[i].def, "--%s shows its default", want[i].name)
		}
	}
	requireFlagsDocumented(t, help, want)
}

func helpDefault(t *testing.T, help, name string) string {
	t.Helper()
	for _, m := range helpLine.FindAllStringSubmatch(help, -1) {
		if m[1] == name {
			return m[3]
		}
	}
	return ""
}

func TestMigrateHelp(t *testing.T) {
	t.Parallel()
	r := run(t, nil, "migrate", "--help")
	require.Equal(t, 0, r.code)
	help := r.stdout + r.stderr
	require.Contains(t, help, "coordinator migrate")
	requireFlagsDocumented(t, help, []flagDoc{
		{"db", "TREATY_DB", ""},
		{"to", "TREATY_TO", "-1"},
	})
}

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		env  map[string]string
		args []string
		code int
		want []string
	}{
		{"unknown command", nil, []string{"frobnicate"}, 2, []string{`unknown command "frobnicate"`, "coordinator serve"}},
		{"migrate without db", nil, []string{"migrate"}, 1, []string{"--db", "TREATY_DB", "required"}},
		{"serve without db", nil, []string{"serve"}, 1, []string{"--db", "TREATY_DB", "required"}},
		{"bad duration in env", map[string]string{"TREATY_LEASE": "abc"}, []string{"serve", "--db", "postgres://unused"}, 1, []string{"TREATY_LEASE", `"abc"`}},
		{"bad int in env", map[string]string{"TREATY_TO": "latest"}, []string{"migrate", "--db", "postgres://unused"}, 1, []string{"TREATY_TO", `"latest"`}},
		{"bad bool in env", map[string]string{"TREATY_MIGRATE": "maybe"}, []string{"serve", "--db", "postgres://unused"}, 1, []string{"TREATY_MIGRATE", `"maybe"`}},
		{"bad log format", nil, []string{"serve", "--db", "postgres://unused", "--log-format", "xml"}, 1, []string{"--log-format", `"xml"`, "text or json"}},
		{"bad log level", map[string]string{"TREATY_LOG_LEVEL": "loud"}, []string{"serve", "--db", "postgres://unused"}, 1, []string{"--log-level", `"loud"`}},
		{"stray argument", nil, []string{"migrate", "--db", "postgres://unused", "now"}, 1, []string{`unexpected argument "now"`}},
		{"unknown flag", nil, []string{"serve", "--bogus"}, 1, []string{"bogus"}},
		{"bad database url", nil, []string{"migrate", "--db", "postgres://%zz"}, 1, []string{"coordinator migrate:"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := run(t, tc.env, tc.args...)
			require.Equal(t, tc.code, r.code, "stderr: %s", r.stderr)
			for _, w := range tc.want {
				require.Contains(t, r.stdout+r.stderr, w)
			}
		})
	}
}

func tableExists(t *testing.T, db, name string) bool {
	t.Helper()
	conn, err := pgx.Connect(t.Context(), db)
	require.NoError(t, err)
	defer conn.Close(context.WithoutCancel(t.Context()))
	var ok bool
	require.NoError(t, conn.QueryRow(t.Context(), "SELECT to_regclass($1) IS NOT NULL", name).Scan(&ok))
	return ok
}

func TestMigrate(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)

	r := run(t, nil, "migrate", "--db", db)
	require.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	require.Regexp(t, `^schema migrated from version 0 to \d+\n$`, r.stdout)
	require.True(t, tableExists(t, db, "treaty_transactions"))

	r = run(t, nil, "migrate", "--db", db)
	require.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	require.Regexp(t, `^schema is at version \d+; nothing to do\n$`, r.stdout)

	// Down to nothing and back up, through the same command.
	r = run(t, nil, "migrate", "--db", db, "--to", "0")
	require.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	require.Regexp(t, `^schema migrated from version \d+ to 0\n$`, r.stdout)
	require.False(t, tableExists(t, db, "treaty_transactions"))

	r = run(t, nil, "migrate", "--db", db, "--to", "99")
	require.Equal(t, 1, r.code)
	require.Contains(t, r.stderr, "target version 99 out of range")
}

func TestMigrateFromEnvironment(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)

	r := run(t, map[string]string{"TREATY_DB": db}, "migrate")
	require.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	require.Contains(t, r.stdout, "schema migrated from version 0")

	// The command line wins over the environment.
	r = run(t, map[string]string{"TREATY_DB": "postgres://nobody@127.0.0.1:1/none?connect_timeout=1"}, "migrate", "--db", db)
	require.Equal(t, 0, r.code, "stderr: %s", r.stderr)
	require.Contains(t, r.stdout, "nothing to do")
}

func TestServeRefusesUnmigratedDatabase(t *testing.T) {
	t.Parallel()
	db := pgtest.NewDatabase(t)
	ready := false
	var out, errb syncBuffer
	code := cli.Main(t.Context(), []string{"serve", "--db", db, "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"}, cli.Env{
		Stdout: &out, Stderr: &errb,
		Getenv: func(string) string { return "" },
		Ready:  func(string) { ready = true },
	})
	require.Equal(t, 1, code)
	require.False(t, ready, "an unusable coordinator never reports ready")
	require.Contains(t, errb.String(), "coordinator migrate", "the error says what to run")
	require.Contains(t, errb.String(), "schema at version 0")
}

func TestServe(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		migrate bool // run `coordinator migrate` first; otherwise TREATY_MIGRATE=true does it
	}{
		{"after migrate", true},
		{"with --migrate from the environment", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			db := pgtest.NewDatabase(t)
			env := map[string]string{"TREATY_LISTEN": "127.0.0.1:0", "TREATY_RECOVERY_INTERVAL": "50ms"}
			if tc.migrate {
				r := run(t, nil, "migrate", "--db", db)
				require.Equal(t, 0, r.code, "stderr: %s", r.stderr)
			} else {
				env["TREATY_MIGRATE"] = "true"
			}
			serveAndStop(t, db, env)
		})
	}
}

// serveAndStop runs `coordinator serve`, checks it answers over gRPC, then cancels its context
// as a SIGTERM would and expects a clean exit.
func serveAndStop(t *testing.T, db string, env map[string]string) {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	var out, errb syncBuffer
	addrs := make(chan string, 1)
	done := make(chan int, 1)
	go func() {
		done <- cli.Main(ctx, []string{"serve", "--db", db, "--log-format", "json", "--http-listen", "127.0.0.1:0"}, cli.Env{
			Stdout: &out, Stderr: &errb,
			Getenv: func(k string) string { return env[k] },
			Ready:  func(addr string) { addrs <- addr },
		})
	}()

	var addr string
	select {
	case addr = <-addrs:
	case code := <-done:
		t.Fatalf("serve exited with %d before it was ready; stderr:\n%s", code, errb.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("serve not ready after 30s; stderr:\n%s", errb.String())
	}
	require.Regexp(t, `^127\.0\.0\.1:\d+$`, addr, "TREATY_LISTEN was honoured")

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	require.NoError(t, err)
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()

	health := healthpb.NewHealthClient(conn)
	for _, svc := range []string{"", "treaty.v1.Coordinator"} {
		res, err := health.Check(cctx, &healthpb.HealthCheckRequest{Service: svc})
		require.NoError(t, err, "health of %q", svc)
		require.Equal(t, healthpb.HealthCheckResponse_SERVING, res.Status, "health of %q", svc)
	}

	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(cctx)
	require.NoError(t, err)
	require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{ListServices: "*"},
	}))
	resp, err := stream.Recv()
	require.NoError(t, err)
	var services []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		services = append(services, s.GetName())
	}
	require.Contains(t, services, "treaty.v1.Coordinator", "reflection lets grpcurl work without .proto files")
	require.Contains(t, services, "grpc.health.v1.Health")

	// Describing the service works too (what `grpcurl describe` asks).
	require.NoError(t, stream.Send(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "treaty.v1.Coordinator"},
	}))
	desc, err := stream.Recv()
	require.NoError(t, err)
	require.NotEmpty(t, desc.GetFileDescriptorResponse().GetFileDescriptorProto(), "descriptor of treaty.v1.Coordinator")
	require.NoError(t, stream.CloseSend())

	cancel()
	select {
	case code := <-done:
		require.Equal(t, 0, code, "a cancelled serve shuts down cleanly; stderr:\n%s", errb.String())
	case <-time.After(30 * time.Second):
		t.Fatalf("serve did not stop within 30s of cancellation; stderr:\n%s", errb.String())
	}
	logs := errb.String()
	require.Contains(t, logs, `"msg":"coordinator serving"`, "logs are JSON as asked")
	require.Contains(t, logs, `"msg":"coordinator stopped"`)
	require.NotContains(t, logs, `"level":"ERROR"`)
	require.Empty(t, out.String(), "serve logs to stderr; stdout stays clean")
}
