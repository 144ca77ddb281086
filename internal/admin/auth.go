package admin

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"strings"
)

// Role is what a token may do.
type Role string

// Roles, from least to most.
const (
	// RoleViewer reads: list, get, statistics, workflows.
	RoleViewer Role = "viewer"
	// RoleOperator reads and acts: retry, rollback, resume, resolve, pause, unpause.
	RoleOperator Role = "operator"
)

func (r Role) allows(need Role) bool {
	return r == RoleOperator || need == RoleViewer && r == RoleViewer
}

// MinTokenLength is the shortest secret accepted: a guessable token would be no protection.
const MinTokenLength = 16

// Token is one admin bearer token. Its secret never leaves through String, GoString, LogValue
// or JSON, so a token that ends up in a log line by mistake shows only its role and name.
type Token struct {
	role   Role
	name   string
	secret string
	sum    [sha256.Size]byte
}

// NewToken makes a token. name, when given, is who the history records as acting; otherwise
// the role and a short fingerprint of the secret stand in for it.
func NewToken(role Role, secret, name string) (Token, error) {
	if role != RoleViewer && role != RoleOperator {
		return Token{}, fmt.Errorf("role %q is not viewer or operator", role)
	}
	if len(secret) < MinTokenLength {
		return Token{}, fmt.Errorf("secret is %d characters, at least %d required", len(secret), MinTokenLength)
	}
	if strings.ContainsAny(secret, " \t\r\n,") {
		return Token{}, fmt.Errorf("secret contains white space or a comma, which the token lists use as separators")
	}
	return Token{role: role, name: name, secret: secret, sum: sha256.Sum256([]byte(secret))}, nil
}

// Role is what the token may do.
func (t Token) Role() Role { return t.role }

// Actor is who the history records when this token acts: its name, or its role and the first
// bytes of the secret's SHA-256 (enough to tell tokens apart, useless to guess the secret).
func (t Token) Actor() string {
	if t.name != "" {
		return t.name
	}
	return string(t.role) + " token sha256:" + hex.EncodeToString(t.sum[:4])
}

// String shows the role and actor, never the secret.
func (t Token) String() string { return "admin token " + t.Actor() + " (" + string(t.role) + ")" }

// GoString is String, so that %#v leaks nothing either.
func (t Token) GoString() string { return t.String() }

// LogValue keeps the secret out of structured logs.
func (t Token) LogValue() slog.Value {
	return slog.GroupValue(slog.String("role", string(t.role)), slog.String("actor", t.Actor()))
}

// MarshalText keeps the secret out of JSON and text encodings.
func (t Token) MarshalText() ([]byte, error) { return []byte(t.String()), nil }

// ParseTokens reads a list of tokens separated by commas or new lines, each "role:secret" or
// "role:secret:name"; empty entries and lines starting with # are skipped. Errors name the entry
// by its position, never by its text, which holds a secret.
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
			parts := strings.SplitN(entry, ":", 3)
			if len(parts) < 2 {
				return nil, fmt.Errorf("admin token %d: want role:secret or role:secret:name", n)
			}
			name := ""
			if len(parts) == 3 {
				name = strings.TrimSpace(parts[2])
			}
			t, err := NewToken(Role(strings.TrimSpace(parts[0])), strings.TrimSpace(parts[1]), name)
			if err != nil {
				return nil, fmt.Errorf("admin token %d: %w", n, err)
			}
			out = append(out, t)
		}
	}
	return out, checkDistinct(out)
}

// ReadTokensFile reads tokens from a file in ParseTokens' format, one per line. A file others
// can read is accepted (containers often mount secrets so) but reported through warn.
func ReadTokensFile(path string, warn func(msg string, args ...any)) ([]Token, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("admin tokens file: %w", err)
	}
	if fi, err := os.Stat(path); err == nil && fi.Mode().Perm()&0o004 != 0 && warn != nil {
		warn("admin tokens file is readable by every user on this machine; chmod o-r it", "path", path, "mode", fi.Mode().Perm().String())
	}
	ts, err := ParseTokens(string(b))
	if err != nil {
		return nil, fmt.Errorf("admin tokens file %s: %w", path, err)
	}
	return ts, nil
}

// MergeTokens joins token lists (from a file and the environment) and checks that no secret
// appears twice, which would make its role ambiguous.
func MergeTokens(lists ...[]Token) ([]Token, error) {
	var out []Token
	for _, l := range lists {
		out = append(out, l...)
	}
	return out, checkDistinct(out)
}

func checkDistinct(ts []Token) error {
	for i := range ts {
		for j := i + 1; j < len(ts); j++ {
			if ts[i].sum == ts[j].sum {
				return fmt.Errorf("admin tokens %d and %d have the same secret; give each role its own", i+1, j+1)
			}
		}
	}
	return nil
}

// caller is who made a request, once authenticated.
type caller struct {
	role  Role
	actor string
}

// authenticate finds the caller of r. Every configured token is compared, in constant time, so
// the answer's timing says nothing about which bytes matched.
func (h *Handler) authenticate(r *http.Request) (caller, *apiError) {
	if h.open {
		return caller{role: RoleOperator, actor: "anonymous (admin API open, dev mode)"}, nil
	}
	if len(h.tokens) == 0 {
		return caller{}, &apiError{status: http.StatusUnauthorized, Code: "unauthenticated", Field: "Authorization",
			Message: "this coordinator has no admin tokens configured (--admin-tokens-file or TREATY_ADMIN_TOKENS), so the admin API refuses every request"}
	}
	auth := r.Header.Get("Authorization")
	if auth == "" {
		return caller{}, &apiError{status: http.StatusUnauthorized, Code: "unauthenticated",
			Message: "an admin bearer token is required: send Authorization: Bearer TOKEN", Field: "Authorization"}
	}
	scheme, secret, ok := strings.Cut(auth, " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || strings.TrimSpace(secret) == "" {
		return caller{}, &apiError{status: http.StatusUnauthorized, Code: "unauthenticated",
			Message: "the Authorization header must be Bearer TOKEN", Field: "Authorization"}
	}
	sum := sha256.Sum256([]byte(strings.TrimSpace(secret)))
	found := -1
	for i := range h.tokens {
		if subtle.ConstantTimeCompare(sum[:], h.tokens[i].sum[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		return caller{}, &apiError{status: http.StatusUnauthorized, Code: "unauthenticated",
			Message: "the bearer token is not one of this coordinator's admin tokens", Field: "Authorization"}
	}
	t := h.tokens[found]
	return caller{role: t.role, actor: t.Actor()}, nil
}
