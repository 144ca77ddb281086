package grpcauth_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/grpcauth"
)

const (
	secretA = "alice-secret-0123456789"
	secretB = "bob-secret-0123456789ab"
)

func TestParseTokens(t *testing.T) {
	t.Parallel()
	ts, err := grpcauth.ParseTokens("# clients\nalice:" + secretA + ", bob : " + secretB + "\n\n")
	require.NoError(t, err)
	require.Len(t, ts, 2)
	require.Equal(t, "alice", ts[0].Name())
	require.Equal(t, "bob", ts[1].Name())

	for _, tc := range []struct{ name, in, want string }{
		{"no colon", secretA, "want name:secret"},
		{"empty name", ":" + secretA, "name is empty"},
		{"short secret", "alice:short", "at least 16"},
		{"name with space", "al ice:" + secretA, "white space"},
		{"duplicate name", "alice:" + secretA + ",alice:" + secretB, `name "alice" appears twice`},
		{"duplicate secret", "alice:" + secretA + ",bob:" + secretA, "same secret"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := grpcauth.ParseTokens(tc.in)
			require.ErrorContains(t, err, tc.want)
			// Errors are logged and printed: they must never quote a secret.
			require.NotContains(t, err.Error(), secretA)
			require.NotContains(t, err.Error(), "short")
		})
	}
}

func TestTokenNeverFormatsItsSecret(t *testing.T) {
	t.Parallel()
	ts, err := grpcauth.ParseTokens("alice:" + secretA)
	require.NoError(t, err)
	tok := ts[0]
	var buf bytes.Buffer
	log := slog.New(slog.NewJSONHandler(&buf, nil))
	log.Info("token", "t", tok, "ts", ts)
	for _, s := range []string{fmt.Sprint(tok), fmt.Sprintf("%v %+v %#v %s", tok, tok, tok, tok), fmt.Sprintf("%+v", ts), buf.String()} {
		require.NotContains(t, s, secretA)
		require.Contains(t, s, "alice")
	}
}

func TestReadTokensFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "tokens")
	require.NoError(t, os.WriteFile(path, []byte("alice:"+secretA+"\n"), 0o644))
	var warned []string
	ts, err := grpcauth.ReadTokensFile(path, func(msg string, _ ...any) { warned = append(warned, msg) })
	require.NoError(t, err)
	require.Len(t, ts, 1)
	require.Len(t, warned, 1, "a world-readable tokens file is reported")

	_, err = grpcauth.ReadTokensFile(filepath.Join(dir, "missing"), nil)
	require.ErrorContains(t, err, "gRPC tokens file")

	// Names must be distinct across the file and the environment.
	env, err := grpcauth.ParseTokens("alice:" + secretB)
	require.NoError(t, err)
	_, err = grpcauth.MergeTokens(ts, env)
	require.ErrorContains(t, err, `"alice" appears twice`)
}
