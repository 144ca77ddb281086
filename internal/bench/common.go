// Package bench holds Treaty's benchmarks behind `treaty-bench`: each one starts the real parts
// it measures (coordinator, participants, PostgreSQL databases of its own) and prints its figures
// as one JSON object on the last line of its output, so scripts and docs/BENCHMARKS.md can quote
// them.
//
// This file holds what several benchmarks need: a throwaway database on the server the user
// named (so a benchmark never touches real data), the database's commit counter, the raw
// commit-rate ceiling of that server, and latency percentiles.
package bench

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// TempDB is a database created for one benchmark run.
type TempDB struct {
	// Name is the database name, e.g. treaty_bench_3f9c0a12b4d5.
	Name string
	// URL connects to it (the base URL with its database name replaced).
	URL string

	base string
}

// CreateTempDatabase creates an empty database named prefix + 12 random hex digits on the server
// that baseURL points to. The role in baseURL needs CREATEDB. Drop it with Drop.
func CreateTempDatabase(ctx context.Context, baseURL, prefix string) (*TempDB, error) {
	b := make([]byte, 6)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("random database name: %w", err)
	}
	name := prefix + hex.EncodeToString(b)
	u, err := withDatabase(baseURL, name)
	if err != nil {
		return nil, err
	}
	conn, err := pgx.Connect(ctx, baseURL)
	if err != nil {
		return nil, fmt.Errorf("connect to create database %s: %w", name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	// The name is ours (prefix + hex), never user input, so it can be spliced in.
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+pgx.Identifier{name}.Sanitize()); err != nil {
		return nil, fmt.Errorf("create database %s (the role in --db needs CREATEDB): %w", name, err)
	}
	return &TempDB{Name: name, URL: u, base: baseURL}, nil
}

// Drop drops the database, closing any connection still open to it (PostgreSQL 13+).
func (d *TempDB) Drop(ctx context.Context) error {
	conn, err := pgx.Connect(ctx, d.base)
	if err != nil {
		return fmt.Errorf("connect to drop database %s: %w", d.Name, err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "DROP DATABASE IF EXISTS "+pgx.Identifier{d.Name}.Sanitize()+" WITH (FORCE)"); err != nil {
		return fmt.Errorf("drop database %s: %w", d.Name, err)
	}
	return nil
}

// withDatabase returns u with its database name replaced. Only URLs are accepted: the
// keyword/value form would need its own parser and nobody passes it to a benchmark.
func withDatabase(u, name string) (string, error) {
	p, err := url.Parse(u)
	if err != nil || (p.Scheme != "postgres" && p.Scheme != "postgresql") {
		return "", errors.New("--db must be a postgres:// URL")
	}
	p.Path = "/" + name
	return p.String(), nil
}

// DatabaseName returns the database a postgres:// URL names ("" when it names none).
func DatabaseName(u string) string {
	p, err := url.Parse(u)
	if err != nil {
		return ""
	}
	if len(p.Path) > 1 {
		return p.Path[1:]
	}
	return ""
}

// XactCommits returns pg_stat_database.xact_commit of database datname as published so far. Every
// transaction counts, read-only ones included. The reading connection's own counters are flushed
// first (pg_stat_force_next_flush, PostgreSQL 15+) and the statistics snapshot is cleared, so the
// value is fresh; other backends publish theirs at most once a second, and a busy server may hold
// an idle backend's counters back for 10s more (a flush that finds its lock taken is retried after
// PGSTAT_IDLE_INTERVAL). A backend that disconnects publishes everything first, so closing the
// pools that did the work before reading is the exact way.
func XactCommits(ctx context.Context, pool *pgxpool.Pool, datname string) (int64, error) {
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return 0, fmt.Errorf("read xact_commit: %w", err)
	}
	defer conn.Release()
	var v int
	if err := conn.QueryRow(ctx, "SELECT current_setting('server_version_num')::int").Scan(&v); err != nil {
		return 0, fmt.Errorf("read server version: %w", err)
	}
	if v >= 150000 {
		if _, err := conn.Exec(ctx, "SELECT pg_stat_force_next_flush()"); err != nil {
			return 0, fmt.Errorf("flush statistics: %w", err)
		}
	}
	var n int64
	err = conn.QueryRow(ctx, `SELECT pg_stat_clear_snapshot(), xact_commit FROM pg_stat_database WHERE datname = $1`, datname).
		Scan(nil, &n)
	if err != nil {
		return 0, fmt.Errorf("read xact_commit of database %q: %w", datname, err)
	}
	return n, nil
}

// CommitRate is the result of MeasureCommitRate.
type CommitRate struct {
	Commits int64
	Elapsed time.Duration
	PerSec  float64
}

// MeasureCommitRate measures the server's ceiling for small durable transactions: concurrency
// connections each run a one-row autocommit INSERT in a loop for d (after a short warm-up that is
// not counted). It creates the table bench_commit_ceiling in the database dbURL names; give it a
// throwaway database.
func MeasureCommitRate(ctx context.Context, dbURL string, concurrency int, d time.Duration) (CommitRate, error) {
	if concurrency < 1 {
		return CommitRate{}, fmt.Errorf("commit rate: concurrency is %d, must be at least 1", concurrency)
	}
	cfg, err := pgxpool.ParseConfig(dbURL)
	if err != nil {
		return CommitRate{}, fmt.Errorf("commit rate: parse database url: %w", err)
	}
	cfg.MaxConns = int32(concurrency)
	cfg.MinConns = int32(concurrency)
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return CommitRate{}, fmt.Errorf("commit rate: connect: %w", err)
	}
	defer pool.Close()
	if _, err := pool.Exec(ctx, `CREATE TABLE IF NOT EXISTS bench_commit_ceiling (
        id     bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        worker int    NOT NULL,
        n      bigint NOT NULL,
        at     timestamptz NOT NULL DEFAULT now())`); err != nil {
		return CommitRate{}, fmt.Errorf("commit rate: create table: %w", err)
	}
	const insert = `INSERT INTO bench_commit_ceiling (worker, n) VALUES ($1, $2)`
	// Warm-up: open every connection and prepare the statement on it, uncounted. Then count the
	// inserts that complete from countFrom on, until the last one started before stopAt ends.
	warm := min(d/4, 500*time.Millisecond)
	countFrom := time.Now().Add(warm)
	stopAt := countFrom.Add(d)
	var total atomic.Int64
	var wg sync.WaitGroup
	errs := make(chan error, concurrency)
	for w := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for n := int64(0); time.Now().Before(stopAt); n++ {
				if _, err := pool.Exec(ctx, insert, w, n); err != nil {
					errs <- fmt.Errorf("commit rate: insert: %w", err)
					return
				}
				if !time.Now().Before(countFrom) {
					total.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(countFrom)
	close(errs)
	if err := <-errs; err != nil {
		return CommitRate{}, err
	}
	n := total.Load()
	return CommitRate{Commits: n, Elapsed: elapsed, PerSec: float64(n) / elapsed.Seconds()}, nil
}

// Latencies summarizes a set of durations.
type Latencies struct {
	N                              int
	Mean, P50, P90, P99, P999, Max time.Duration
}

// Summarize sorts ds in place and returns its percentiles (nearest rank).
func Summarize(ds []time.Duration) Latencies {
	if len(ds) == 0 {
		return Latencies{}
	}
	slices.Sort(ds)
	var sum time.Duration
	for _, d := range ds {
		sum += d
	}
	at := func(q float64) time.Duration {
		i := int(math.Ceil(q*float64(len(ds)))) - 1
		return ds[max(0, min(i, len(ds)-1))]
	}
	return Latencies{
		N: len(ds), Mean: sum / time.Duration(len(ds)),
		P50: at(0.50), P90: at(0.90), P99: at(0.99), P999: at(0.999), Max: ds[len(ds)-1],
	}
}

// Millis converts a duration to milliseconds with microsecond precision, for JSON output.
func Millis(d time.Duration) float64 {
	return math.Round(float64(d)/float64(time.Microsecond)) / 1000
}

// Round3 rounds to three decimals, for JSON output.
func Round3(f float64) float64 { return math.Round(f*1000) / 1000 }

// checkDBPrefix accepts a throwaway database's name prefix: it must leave room for the 12 random
// hex digits within PostgreSQL's 63-byte identifiers and need no quoting in operators' scripts.
func checkDBPrefix(p string) error {
	const limit = 63 - 12
	if p == "" || len(p) > limit {
		return fmt.Errorf("--db-prefix %q is %d bytes, must be 1..%d (12 random hex digits follow, within PostgreSQL's 63)", p, len(p), limit)
	}
	for i, c := range p {
		if c == '_' || (c >= 'a' && c <= 'z') || (i > 0 && c >= '0' && c <= '9') {
			continue
		}
		return fmt.Errorf("--db-prefix %q: byte %d is %q; use lower-case letters, digits (not first) and _", p, i, c)
	}
	return nil
}
