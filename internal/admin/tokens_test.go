package admin_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/internal/admin"
)

func TestParseTokens(t *testing.T) {
	t.Parallel()
	ts, err := admin.ParseTokens("viewer:aaaaaaaaaaaaaaaa, operator:bbbbbbbbbbbbbbbbbbbb:alice\n# a comment\n\n  operator:cccccccccccccccccccc  \n")
	require.NoError(t, err)
	require.Len(t, ts, 3)
	require.Equal(t, admin.RoleViewer, ts[0].Role())
	require.Regexp(t, `^viewer token sha256:[0-9a-f]{8}$`, ts[0].Actor())
	require.Equal(t, admin.RoleOperator, ts[1].Role())
	require.Equal(t, "alice", ts[1].Actor())
	require.NotEqual(t, ts[0].Actor(), ts[2].Actor())

	empty, err := admin.ParseTokens("")
	require.NoError(t, err)
	require.Empty(t, empty)

	for in, want := range map[string]string{
		"admin:dddddddddddddddddddd":                                 `admin token 1: role "admin" is not viewer or operator`,
		"viewer:aaaaaaaaaaaaaaaa,viewer:short-secret":                "admin token 2: secret is 12 characters, at least 16 required",
		"viewer-eeeeeeeeeeeeeeeeeeee":                                "admin token 1: want role:secret or role:secret:name",
		"viewer:ffffffffffffffffffff\noperator:ffffffffffffffffffff": "admin tokens 1 and 2 have the same secret",
	} {
		_, err := admin.ParseTokens(in)
		require.Error(t, err, in)
		require.Contains(t, err.Error(), want)
		for _, secret := range []string{"dddddddddddddddd", "short-secret", "eeeeeeeeeeeeeeee", "ffffffffffffffff"} {
			require.NotContains(t, err.Error(), secret, "an error names the entry, never its secret")
		}
	}
}

// A token that ends up in a log line or an error by mistake shows no secret, whatever the
// formatting.
func TestTokenNeverPrintsItsSecret(t *testing.T) {
	t.Parallel()
	const secret = "s3cret-s3cret-s3cret"
	tok, err := admin.NewToken(admin.RoleOperator, secret, "")
	require.NoError(t, err)
	var out bytes.Buffer
	fmt.Fprintf(&out, "%v %+v %#v %s %q", tok, tok, tok, tok, tok)
	fmt.Fprintf(&out, "%v %+v %#v", []admin.Token{tok}, []admin.Token{tok}, []admin.Token{tok})
	fmt.Fprintf(&out, "%v %+v", struct{ T admin.Token }{tok}, admin.Config{Tokens: []admin.Token{tok}})
	slog.New(slog.NewJSONHandler(&out, nil)).Info("x", "token", tok, "tokens", []admin.Token{tok})
	slog.New(slog.NewTextHandler(&out, nil)).Info("x", "token", tok, "config", admin.Config{Tokens: []admin.Token{tok}})
	j, err := json.Marshal(map[string]any{"t": tok, "ts": []admin.Token{tok}})
	require.NoError(t, err)
	out.Write(j)
	require.NotContains(t, out.String(), secret)
	require.Contains(t, out.String(), "operator token sha256:")
}

func TestReadTokensFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "tokens")
	require.NoError(t, os.WriteFile(path, []byte("# who may operate\noperator:0123456789abcdef0123:bob\nviewer:fedcba9876543210fedc\n"), 0o600))
	var warnings []string
	warn := func(msg string, _ ...any) { warnings = append(warnings, msg) }
	ts, err := admin.ReadTokensFile(path, warn)
	require.NoError(t, err)
	require.Len(t, ts, 2)
	require.Equal(t, "bob", ts[0].Actor())
	require.Empty(t, warnings)

	require.NoError(t, os.Chmod(path, 0o644))
	_, err = admin.ReadTokensFile(path, warn)
	require.NoError(t, err)
	require.Len(t, warnings, 1, "a file every user can read is reported")

	_, err = admin.ReadTokensFile(filepath.Join(dir, "missing"), warn)
	require.ErrorContains(t, err, "admin tokens file")

	require.NoError(t, os.WriteFile(path, []byte("operator:tooshort\n"), 0o600))
	_, err = admin.ReadTokensFile(path, warn)
	require.ErrorContains(t, err, path+": admin token 1: secret is 8 characters, at least 16 required")
	require.NotContains(t, err.Error(), "tooshort")

	_, err = admin.MergeTokens(ts, ts[:1])
	require.ErrorContains(t, err, "admin tokens 1 and 3 have the same secret")
}
