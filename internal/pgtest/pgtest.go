// Package pgtest gives tests a real, isolated PostgreSQL database.
//
// Where the server comes from, in order:
//
//  1. TREATY_TEST_DATABASE_URL, when set (a superuser or a role that may CREATE DATABASE);
//  2. a throwaway cluster built from local PostgreSQL binaries (initdb and postgres on PATH or
//     under /usr/lib/postgresql/*/bin) in a temporary directory, run as the postgres user when
//     the tests run as root (PostgreSQL refuses to run as root);
//  3. a PostgreSQL container through testcontainers-go when a Docker engine answers;
//  4. otherwise the test fails under CI=true and is skipped with a loud message elsewhere.
//
// Every call to NewDatabase creates a database of its own, dropped when the test ends, so tests
// may run in parallel and may use several connections, LISTEN/NOTIFY and advisory locks.
package pgtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// EnvURL names the environment variable that points tests at an existing server.
const EnvURL = "TREATY_TEST_DATABASE_URL"

// server is the one PostgreSQL server this test binary uses. It is process-wide on purpose:
// starting a cluster costs seconds, and every test in a package binary shares it. It is
// torn down by WrapTestMain.
var server struct {
	once    sync.Once
	baseURL string
	stop    func()
	err     error
}

// WrapTestMain runs the package's tests and then stops a throwaway cluster if one was started.
// Call it from TestMain; it does not check for goroutine leaks (use goleak alongside it).
func WrapTestMain(m *testing.M) int {
	code := m.Run()
	if server.stop != nil {
		server.stop()
	}
	return code
}

// BaseURL returns the URL of the server's maintenance database, starting a server if needed.
func BaseURL(t testing.TB) string {
	t.Helper()
	server.once.Do(func() {
		server.baseURL, server.stop, server.err = start()
	})
	if server.err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatalf("pgtest: no PostgreSQL for tests (CI=true, so this is a failure): %v", server.err)
		}
		t.Skipf("pgtest: SKIPPING, no PostgreSQL for tests: %v\n"+
			"set %s, install PostgreSQL binaries, or run a Docker engine", server.err, EnvURL)
	}
	return server.baseURL
}

func start() (string, func(), error) {
	if u := os.Getenv(EnvURL); u != "" {
		return u, nil, ping(u)
	}
	var errs []error
	u, stop, err := startLocalCluster()
	if err == nil {
		return u, stop, nil
	}
	errs = append(errs, fmt.Errorf("local cluster: %w", err))
	u, stop, err = startContainer()
	if err == nil {
		return u, stop, nil
	}
	errs = append(errs, fmt.Errorf("testcontainers: %w", err))
	return "", nil, errors.Join(errs...)
}

func ping(u string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, u)
	if err != nil {
		return fmt.Errorf("connect %s: %w", redact(u), err)
	}
	return conn.Close(ctx)
}

// NewDatabase creates an empty database for this test and returns its URL. The database is
// dropped (WITH FORCE, so lingering connections do not block it) when the test ends.
func NewDatabase(t testing.TB) string {
	t.Helper()
	base := BaseURL(t)
	name := "treaty_test_" + randomHex(6)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, base)
	if err != nil {
		t.Fatalf("pgtest: connect: %v", err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		t.Fatalf("pgtest: create database %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		conn, err := pgx.Connect(ctx, base)
		if err != nil {
			t.Errorf("pgtest: connect for drop: %v", err)
			return
		}
		defer conn.Close(ctx)
		if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)"); err != nil {
			t.Errorf("pgtest: drop database %s: %v", name, err)
		}
	})
	return WithDatabase(base, name)
}

// WithDatabase returns u with its database name replaced.
func WithDatabase(u, name string) string {
	p, err := url.Parse(u)
	if err != nil || p.Scheme == "" {
		// keyword/value form: appending wins over an earlier dbname.
		return u + " dbname=" + name
	}
	p.Path = "/" + name
	return p.String()
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func redact(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return "(unparseable url)"
	}
	return p.Redacted()
}
