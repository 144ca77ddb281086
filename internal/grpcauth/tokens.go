package grpcauth

import (
	"crypto/sha256"
	"crypto/subtle"
	"fmt"
	"log/slog"
	"os"
	"strings"
)

// MinTokenLength is the shortest secret accepted: a guessable token would be no protection.
const MinTokenLength = 16

// MaxTokenNameLength bounds a token's name, which becomes a rate-limit identity and appears in
// logs and metrics.
const MaxTokenNameLength = 64

// Token is one bearer token of the gRPC API. It keeps the name and a SHA-256 digest of the
// secret, never the secret itself, so no formatting of a Token can leak it.
type Token struct {
	name string
	sum  [sha256.Size]byte
}

// NewToken makes a token. The name identifies the client in logs and rate limits; it must be
// non-empty, printable and without ':' or ','.
func NewToken(name, secret string) (Token, error) {
	switch {
	case name == "":
		return Token{}, fmt.Errorf("name is empty; want name:secret")
	case len(name) > MaxTokenNameLength:
		return Token{}, fmt.Errorf("name is %d characters, limit %d", len(name), MaxTokenNameLength)
	case strings.ContainsAny(name, ":, \t\r\n"):
		return Token{}, fmt.Errorf("name %q contains ':', ',' or white space", name)
	case len(secret) < MinTokenLength:
		return Token{}, fmt.Errorf("token %q: secret is %d characters, at least %d required", name, len(secret), MinTokenLength)
	case strings.ContainsAny(secret, " \t\r\n,"):
		return Token{}, fmt.Errorf("token %q: secret contains white space or a comma, which token lists use as separators", name)
	}
	return Token{name: name, sum: sha256.Sum256([]byte(secret))}, nil
}

// Name identifies the token's holder.
func (t Token) Name() string { return t.name }

// String shows the name only.
func (t Token) String() string { return "gRPC token " + t.name }

// GoString is String, so that %#v leaks nothing either.
func (t Token) GoString() string { return t.String() }

// LogValue keeps the digest out of structured logs as well.
func (t Token) LogValue() slog.Value { return slog.StringValue(t.name) }

// ParseTokens reads "name:secret" entries separated by commas or new lines; empty entries and
// lines starting with # are skipped. Errors name an entry by its position or its name, never by
// its secret.
func ParseTokens(s string) ([]Token, error) {
	var out []Token
	n := 0
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		for _, entry := range strings.Split(line, ",") {
			entry = strings.TrimSpace(entry)
			if entry == "" {
				continue
			}
			n++
			name, secret, ok := strings.Cut(entry, ":")
			if !ok {
				return nil, fmt.Errorf("gRPC token %d: want name:secret", n)
			}
			t, err := NewToken(strings.TrimSpace(name), strings.TrimSpace(secret))
			if err != nil {
				return nil, fmt.Errorf("gRPC token %d: %w", n, err)
			}
			out = append(out, t)
		}
	}
	return MergeTokens(out)
}

// ReadTokensFile reads tokens in ParseTokens' format from a file. A file that every user can
// read is accepted (containers often mount secrets so) but reported through warn, if set.
func ReadTokensFile(path string, warn func(msg string, args ...any)) ([]Token, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("gRPC tokens file: %w", err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o004 != 0 && warn != nil {
		warn("gRPC tokens file is readable by every user on this machine; chmod o-r it", "path", path, "mode", fi.Mode().Perm().String())
	}
	ts, err := ParseTokens(string(b))
	if err != nil {
		return nil, fmt.Errorf("gRPC tokens file %s: %w", path, err)
	}
	return ts, nil
}

// MergeTokens joins token lists (a file and the environment) and checks that names and secrets
// are distinct: a name stands for one client, and a shared secret would make the caller's
// identity ambiguous.
func MergeTokens(lists ...[]Token) ([]Token, error) {
	var out []Token
	for _, l := range lists {
		out = append(out, l...)
	}
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[i].name == out[j].name {
				return nil, fmt.Errorf("gRPC token name %q appears twice; give each client its own name", out[i].name)
			}
			if out[i].sum == out[j].sum {
				return nil, fmt.Errorf("gRPC tokens %q and %q have the same secret; give each client its own", out[i].name, out[j].name)
			}
		}
	}
	return out, nil
}

// match returns the token whose secret is presented, comparing every configured token in
// constant time so that the answer's timing says nothing about which bytes matched.
func match(tokens []Token, presented string) (Token, bool) {
	sum := sha256.Sum256([]byte(presented))
	found := -1
	for i := range tokens {
		if subtle.ConstantTimeCompare(sum[:], tokens[i].sum[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return Token{}, false
	}
	return tokens[found], true
}
