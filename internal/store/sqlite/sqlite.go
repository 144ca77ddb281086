// Package sqlite is the embedded backend of the coordinator's store, on SQLite through
// modernc.org/sqlite (pure Go, no cgo): the store of `coordinator dev`, which needs nothing
// installed.
//
// # Single node
//
// This store is for one coordinator process on one machine (dev mode, demos, tests). Its
// "database clock" is the clock of the process, in UTC: leases and deadlines are computed from
// time.Now when a write runs. Several processes may open the same file (SQLite locks it), but
// only on one machine, whose clock they then share; production replicas use store/postgres.
//
// # Atomicity
//
// Every store call that writes runs in one SQLite transaction opened with BEGIN IMMEDIATE, which
// takes the database's single write lock before reading anything. A claim, a fenced Record, a
// registration and a Transition therefore read and write with no other writer in between, which
// is what FOR UPDATE SKIP LOCKED and FOR SHARE give the PostgreSQL store. The database clock is
// read once per call, after the lock is taken, so times follow commit order as PostgreSQL's
// now() does within one transaction.
//
// The store keeps one connection: SQLite has one writer anyway, and a private ":memory:"
// database exists only on the connection that created it. database/sql queues callers for it,
// honouring their contexts.
//
// # Storage
//
// Timestamps are INTEGER unix microseconds in UTC: PostgreSQL keeps microseconds, so both
// backends hand the engine the same times for the same inputs. A file database runs in WAL mode
// with synchronous=FULL (a commit survives a power cut, as "write the decision first, then act"
// requires), foreign keys on and a busy timeout for other processes on the same file.
//
// The schema is embedded (schema/NNN_name.up.sql and .down.sql, the file naming of
// internal/migrate) and versioned in [VersionTable]; [Store.Migrate] applies it and
// [Store.Ping] reports a database whose schema this binary does not match.
package sqlite

import (
	"bytes"
	"context"
	"database/sql"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	_ "modernc.org/sqlite" // registers the "sqlite" database/sql driver

	"github.com/treatyhq/treaty/internal/migrate"
	"github.com/treatyhq/treaty/internal/store"
)

// VersionTable records which schema migrations ran, as in the PostgreSQL store.
const VersionTable = "treaty_schema_migrations"

// BusyTimeout is how long a write waits for another process that holds the file's write lock
// before it fails with SQLITE_BUSY. Writes here are short; a wait this long means something is
// stuck, and failing says so.
const BusyTimeout = 5 * time.Second

//go:embed schema/*.sql
var schemaFS embed.FS

// Memory is the dsn of a private in-memory database: it lives as long as the Store.
const Memory = ":memory:"

// Store implements store.Store on SQLite.
type Store struct {
	db         *sql.DB
	migrations *migrate.Migrator // the embedded schema
}

var _ store.Store = (*Store)(nil)

// Migrations returns the embedded schema migrations, parsed and checked the way
// internal/migrate checks the PostgreSQL ones (names, numbering, an up file for each).
func Migrations() (*migrate.Migrator, error) {
	sub, err := fs.Sub(schemaFS, "schema")
	if err != nil {
		return nil, fmt.Errorf("read embedded sqlite schema: %w", err)
	}
	return migrate.New(sub, VersionTable, nil)
}

// Open opens the database at dsn, creating the file if needed. dsn is a file path, a SQLite
// "file:" URI, or [Memory] for a private in-memory database. Open does not migrate: call
// [Store.Migrate] (Ping reports a schema that is behind).
func Open(ctx context.Context, dsn string) (*Store, error) {
	migrations, err := Migrations()
	if err != nil {
		return nil, err
	}
	if strings.TrimSpace(dsn) == "" {
		return nil, errors.New(`sqlite dsn is empty: want a file path, a "file:" URI or ":memory:"`)
	}
	memory := dsn == Memory || strings.Contains(dsn, "mode=memory")
	// Every connection database/sql opens is set up by these, so a replaced connection is
	// configured like the first. _txlock makes every read-write transaction BEGIN IMMEDIATE:
	// it takes the write lock up front, so a claim never reads a row that another writer changes
	// before this one writes it, and two writers never deadlock upgrading a read lock.
	params := []string{
		fmt.Sprintf("_pragma=busy_timeout(%d)", BusyTimeout.Milliseconds()),
		"_pragma=foreign_keys(1)",
		"_pragma=synchronous(FULL)",
		"_txlock=immediate",
	}
	if !memory {
		params = append(params, "_pragma=journal_mode(WAL)")
	}
	sep := "?"
	if strings.Contains(dsn, "?") {
		sep = "&"
	}
	db, err := sql.Open("sqlite", dsn+sep+strings.Join(params, "&"))
	if err != nil {
		return nil, fmt.Errorf("open sqlite database %q: %w", dsn, err)
	}
	// One connection (see the package doc). It is never closed for being idle or old: for
	// ":memory:" that would drop the database.
	db.SetMaxOpenConns(1)
	db.SetMaxIdleConns(1)
	db.SetConnMaxLifetime(0)
	db.SetConnMaxIdleTime(0)
	if err := db.PingContext(ctx); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("open sqlite database %q: %w", dsn, err)
	}
	return &Store{db: db, migrations: migrations}, nil
}

// DB exposes the underlying handle (for tests and tools). It has one connection: do not hold
// it (an open *sql.Rows or *sql.Tx) while calling the Store.
func (s *Store) DB() *sql.DB { return s.db }

// Close closes the database.
func (s *Store) Close() { _ = s.db.Close() }

// now is the store's clock: the process clock in UTC, at the precision stored.
func now() time.Time { return time.Now().UTC().Truncate(time.Microsecond) }

// micros is how a time is stored: unix microseconds, truncated as pgx truncates for PostgreSQL.
func micros(t time.Time) int64 { return t.UnixMicro() }

// nullMicros stores a zero time as NULL.
func nullMicros(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UnixMicro()
}

func fromMicros(v int64) time.Time { return time.UnixMicro(v).UTC() }

func fromNullMicros(v sql.NullInt64) time.Time {
	if !v.Valid {
		return time.Time{}
	}
	return fromMicros(v.Int64)
}

// nullBytes stores a nil slice as NULL and any other (even empty) as a blob.
func nullBytes(b []byte) any {
	if b == nil {
		return nil
	}
	return b
}

// notNullBytes stores a nil slice as an empty blob, for NOT NULL columns.
func notNullBytes(b []byte) []byte {
	if b == nil {
		return []byte{}
	}
	return b
}

func boolInt(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// jsonList encodes a list for `IN (SELECT value FROM json_each(?))`, which keeps the SQL text
// fixed whatever the list's length.
func jsonList(xs []string) (string, error) {
	if xs == nil {
		xs = []string{}
	}
	b, err := json.Marshal(xs)
	return string(b), err
}

// write runs fn in one read-write transaction (BEGIN IMMEDIATE) and commits it. at is the
// database clock for the whole call, read once the write lock is held.
func (s *Store) write(ctx context.Context, what string, fn func(tx *sql.Tx, at time.Time) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("%s: begin: %w", what, err)
	}
	defer func() { _ = tx.Rollback() }()
	if err := fn(tx, now()); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("%s: commit: %w", what, err)
	}
	return nil
}

// read runs fn in one read-only transaction, so that what it reads is one snapshot.
func (s *Store) read(ctx context.Context, what string, fn func(tx *sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: true})
	if err != nil {
		return fmt.Errorf("%s: begin: %w", what, err)
	}
	defer func() { _ = tx.Rollback() }()
	return fn(tx)
}

// querier is what both *sql.Tx and *sql.DB offer.
type querier interface {
	ExecContext(ctx context.Context, query string, args ...any) (sql.Result, error)
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
}

const txColumns = `gid, mode, status, spec, spec_hash, workflow_name, workflow_version, reason,
    created_at, updated_at, deadline, next_attempt_at, coalesce(lease_owner, ''), lease_expires_at, epoch, paused`

type scanner interface{ Scan(dest ...any) error }

func scanTx(row scanner) (store.Transaction, error) {
	var t store.Transaction
	var created, updated, deadline int64
	var next, lease sql.NullInt64
	var paused int64
	err := row.Scan(&t.GID, &t.Mode, &t.Status, &t.Spec, &t.SpecHash, &t.WorkflowName, &t.WorkflowVersion,
		&t.Reason, &created, &updated, &deadline, &next, &t.LeaseOwner, &lease, &t.Epoch, &paused)
	if err != nil {
		return store.Transaction{}, err
	}
	t.CreatedAt, t.UpdatedAt, t.Deadline = fromMicros(created), fromMicros(updated), fromMicros(deadline)
	t.NextAttemptAt, t.LeaseExpiresAt = fromNullMicros(next), fromNullMicros(lease)
	t.Paused = paused != 0
	return t, nil
}

// getTx reads one transaction row, or store.ErrNotFound naming the gid.
func getTx(ctx context.Context, q querier, gid string) (store.Transaction, error) {
	t, err := scanTx(q.QueryRowContext(ctx, "SELECT "+txColumns+" FROM treaty_transactions WHERE gid = ?", gid))
	if errors.Is(err, sql.ErrNoRows) {
		return store.Transaction{}, fmt.Errorf("%w: %q", store.ErrNotFound, gid)
	}
	if err != nil {
		return store.Transaction{}, fmt.Errorf("read transaction %q: %w", gid, err)
	}
	return t, nil
}

const branchesSQL = `SELECT branch, op, position, status, attempts, last_error, next_attempt_at, uncertain, spec, updated_at
    FROM treaty_branches WHERE gid = ? ORDER BY position, op`

// branches reads a transaction's branches, ordered by position and op.
func branches(ctx context.Context, q querier, gid string) ([]store.Branch, error) {
	rows, err := q.QueryContext(ctx, branchesSQL, gid)
	if err != nil {
		return nil, fmt.Errorf("read branches of %q: %w", gid, err)
	}
	defer rows.Close()
	var out []store.Branch
	for rows.Next() {
		var b store.Branch
		var next sql.NullInt64
		var uncertain, updated int64
		if err := rows.Scan(&b.Branch, &b.Op, &b.Position, &b.Status, &b.Attempts, &b.LastError, &next, &uncertain, &b.Spec, &updated); err != nil {
			return nil, fmt.Errorf("read branches of %q: %w", gid, err)
		}
		b.NextAttemptAt, b.Uncertain, b.UpdatedAt = fromNullMicros(next), uncertain == 1, fromMicros(updated)
		out = append(out, b)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read branches of %q: %w", gid, err)
	}
	return out, nil
}

const insertEventSQL = `INSERT INTO treaty_events (gid, at, kind, branch, op, detail) VALUES (?, ?, ?, ?, ?, ?)`

func insertEvents(ctx context.Context, tx *sql.Tx, gid string, at time.Time, es []store.Event) error {
	for _, e := range es {
		when := at
		if !e.At.IsZero() {
			when = e.At
		}
		if _, err := tx.ExecContext(ctx, insertEventSQL, gid, micros(when), e.Kind, e.Branch, e.Op, e.Detail); err != nil {
			return fmt.Errorf("write event %q of %q: %w", e.Kind, gid, err)
		}
	}
	return nil
}

const createSQL = `INSERT INTO treaty_transactions
    (gid, mode, status, spec, spec_hash, workflow_name, workflow_version, created_at, updated_at, deadline,
     next_attempt_at, lease_owner, lease_expires_at, epoch)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
ON CONFLICT (gid) DO NOTHING`

const createBranchSQL = `INSERT INTO treaty_branches
    (gid, branch, op, position, status, attempts, last_error, next_attempt_at, uncertain, spec, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`

// CreateTransaction implements store.Store.
func (s *Store) CreateTransaction(ctx context.Context, p store.CreateParams) (store.CreateResult, error) {
	var res store.CreateResult
	err := s.write(ctx, fmt.Sprintf("create transaction %q", p.GID), func(tx *sql.Tx, at time.Time) error {
		var err error
		res, err = createIn(ctx, tx, at, p)
		return err
	})
	if err != nil {
		return store.CreateResult{}, err
	}
	return res, nil
}

// createIn creates one transaction inside tx.
func createIn(ctx context.Context, tx *sql.Tx, at time.Time, p store.CreateParams) (store.CreateResult, error) {
	deadline := at.Add(p.Timeout)
	// Unleased: nobody drives it until its deadline, when recovery picks it up.
	next, owner, lease := deadline, any(nil), any(nil)
	if p.Owner != "" {
		next, owner, lease = at.Add(p.Lease), p.Owner, micros(at.Add(p.Lease))
	}
	r, err := tx.ExecContext(ctx, createSQL,
		p.GID, p.Mode, p.Status, notNullBytes(p.Spec), notNullBytes(p.SpecHash), p.WorkflowName, p.WorkflowVersion,
		micros(at), micros(at), micros(deadline), micros(next), owner, lease)
	if err != nil {
		return store.CreateResult{}, fmt.Errorf("create transaction %q: %w", p.GID, err)
	}
	if n, err := r.RowsAffected(); err != nil || n == 0 {
		if err != nil {
			return store.CreateResult{}, fmt.Errorf("create transaction %q: %w", p.GID, err)
		}
		// The gid is taken: report the stored row, write nothing.
		t, err := getTx(ctx, tx, p.GID)
		return store.CreateResult{Created: false, Transaction: t}, err
	}
	for _, b := range p.Branches {
		if _, err := tx.ExecContext(ctx, createBranchSQL, p.GID, b.Branch, b.Op, b.Position, b.Status, b.Attempts,
			b.LastError, nullMicros(b.NextAttemptAt), boolInt(b.Uncertain), nullBytes(b.Spec), micros(at)); err != nil {
			return store.CreateResult{}, fmt.Errorf("create transaction %q: branch %s/%s: %w", p.GID, b.Branch, b.Op, err)
		}
	}
	if err := insertEvents(ctx, tx, p.GID, at, p.Events); err != nil {
		return store.CreateResult{}, err
	}
	t, err := getTx(ctx, tx, p.GID)
	return store.CreateResult{Created: true, Transaction: t}, err
}

// Commit implements store.Store: the creations and the writes in one transaction.
func (s *Store) Commit(ctx context.Context, cs []store.CreateParams, ps []store.RecordParams) ([]store.CreateResult, []store.RecordResult, error) {
	var created []store.CreateResult
	var recorded []store.RecordResult
	err := s.write(ctx, "group commit", func(tx *sql.Tx, at time.Time) error {
		for _, c := range cs {
			res, err := createIn(ctx, tx, at, c)
			if err != nil {
				return err
			}
			created = append(created, res)
		}
		var err error
		recorded, err = recordIn(ctx, tx, at, ps)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return created, recorded, nil
}

// recordSQL never shortens a lease: a driver may hold a longer one for a long call.
const recordSQL = `UPDATE treaty_transactions SET
    status = ?1, reason = ?2, updated_at = ?3,
    next_attempt_at = CASE WHEN ?4 IS NULL THEN NULL ELSE max(coalesce(lease_expires_at, ?4), ?4) END,
    lease_expires_at = CASE WHEN ?4 IS NULL THEN NULL ELSE max(coalesce(lease_expires_at, ?4), ?4) END,
    lease_owner = CASE WHEN ?5 THEN NULL ELSE lease_owner END, paused = ?6, last_write = ?9
WHERE gid = ?7 AND epoch = ?8 AND (?9 = 0 OR last_write <> ?9)
RETURNING lease_expires_at`

const upsertBranchSQL = `INSERT INTO treaty_branches
    (gid, branch, op, position, status, attempts, last_error, next_attempt_at, uncertain, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (gid, branch, op) DO UPDATE SET
    status = excluded.status, attempts = excluded.attempts, last_error = excluded.last_error,
    next_attempt_at = excluded.next_attempt_at, uncertain = excluded.uncertain, updated_at = excluded.updated_at`

// Record implements store.Store: every write in one transaction, one commit. Each write is
// fenced by its epoch; a stale one changes nothing and the rest still apply.
func (s *Store) Record(ctx context.Context, ps []store.RecordParams) ([]store.RecordResult, error) {
	if len(ps) == 0 {
		return nil, nil
	}
	var out []store.RecordResult
	err := s.write(ctx, "record", func(tx *sql.Tx, at time.Time) error {
		var err error
		out, err = recordIn(ctx, tx, at, ps)
		return err
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// recordIn applies fenced writes inside tx.
func recordIn(ctx context.Context, tx *sql.Tx, at time.Time, ps []store.RecordParams) ([]store.RecordResult, error) {
	out := make([]store.RecordResult, len(ps))
	for i, p := range ps {
		var next any
		if !p.Terminal {
			next = micros(at.Add(p.Lease))
		}
		var exp sql.NullInt64
		err := tx.QueryRowContext(ctx, recordSQL, p.Status, p.Reason, micros(at), next, p.Terminal, boolInt(p.Paused), p.GID, p.Epoch, p.WriteID).Scan(&exp)
		if errors.Is(err, sql.ErrNoRows) {
			if p.WriteID != 0 {
				// Applied already (sent again after an error): owned, and nothing to repeat.
				var n int
				if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM treaty_transactions WHERE gid = ? AND epoch = ? AND last_write = ?`, p.GID, p.Epoch, p.WriteID).Scan(&n); err != nil {
					return nil, fmt.Errorf("record %q: %w", p.GID, err)
				}
				out[i].Owned = n == 1
			}
			continue // ownership lost (or no such gid): nothing of this write is applied
		}
		if err != nil {
			return nil, fmt.Errorf("record %q: %w", p.GID, err)
		}
		out[i].Owned = true
		out[i].LeaseExpiresAt = fromNullMicros(exp)
		for _, b := range p.Branches {
			if _, err := tx.ExecContext(ctx, upsertBranchSQL, p.GID, b.Branch, b.Op, b.Position, b.Status, b.Attempts,
				b.LastError, nullMicros(b.NextAttemptAt), boolInt(b.Uncertain), micros(at)); err != nil {
				return nil, fmt.Errorf("record %q: branch %s/%s: %w", p.GID, b.Branch, b.Op, err)
			}
		}
		if err := insertEvents(ctx, tx, p.GID, at, p.Events); err != nil {
			return nil, fmt.Errorf("record %q: %w", p.GID, err)
		}
	}
	return out, nil
}

// GetTransaction implements store.Store.
func (s *Store) GetTransaction(ctx context.Context, gid string) (store.Transaction, []store.Branch, error) {
	var t store.Transaction
	var bs []store.Branch
	err := s.read(ctx, fmt.Sprintf("read transaction %q", gid), func(tx *sql.Tx) error {
		var err error
		if t, err = getTx(ctx, tx, gid); err != nil {
			return err
		}
		bs, err = branches(ctx, tx, gid)
		return err
	})
	if err != nil {
		return store.Transaction{}, nil, err
	}
	return t, bs, nil
}

// ListEvents implements store.Store.
func (s *Store) ListEvents(ctx context.Context, gid string) ([]store.Event, error) {
	return s.events(ctx, s.db, gid)
}

func (s *Store) events(ctx context.Context, q querier, gid string) ([]store.Event, error) {
	rows, err := q.QueryContext(ctx, `SELECT id, at, kind, branch, op, detail FROM treaty_events WHERE gid = ? ORDER BY id`, gid)
	if err != nil {
		return nil, fmt.Errorf("read events of %q: %w", gid, err)
	}
	defer rows.Close()
	var out []store.Event
	for rows.Next() {
		var e store.Event
		var at int64
		if err := rows.Scan(&e.ID, &at, &e.Kind, &e.Branch, &e.Op, &e.Detail); err != nil {
			return nil, fmt.Errorf("read events of %q: %w", gid, err)
		}
		e.At = fromMicros(at)
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read events of %q: %w", gid, err)
	}
	return out, nil
}

// claimSQL needs no SKIP LOCKED: the write lock is held, so no other claimer runs meanwhile.
const claimSQL = `UPDATE treaty_transactions SET
    lease_owner = ?1, lease_expires_at = ?2, next_attempt_at = ?2, epoch = epoch + 1, updated_at = ?3
WHERE gid IN (
    SELECT gid FROM treaty_transactions
    WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= ?3
      AND (lease_expires_at IS NULL OR lease_expires_at <= ?3)
    ORDER BY next_attempt_at
    LIMIT ?4
)
RETURNING ` + txColumns

// ClaimDue implements store.Store.
func (s *Store) ClaimDue(ctx context.Context, p store.ClaimParams) ([]store.Claimed, error) {
	if p.Limit <= 0 {
		return nil, nil
	}
	var out []store.Claimed
	err := s.write(ctx, "claim due transactions", func(tx *sql.Tx, at time.Time) error {
		rows, err := tx.QueryContext(ctx, claimSQL, p.Owner, micros(at.Add(p.Lease)), micros(at), p.Limit)
		if err != nil {
			return fmt.Errorf("claim due transactions: %w", err)
		}
		var txs []store.Transaction
		for rows.Next() {
			t, err := scanTx(rows)
			if err != nil {
				_ = rows.Close()
				return fmt.Errorf("claim due transactions: %w", err)
			}
			txs = append(txs, t)
		}
		if err := rows.Close(); err != nil {
			return fmt.Errorf("claim due transactions: %w", err)
		}
		if err := rows.Err(); err != nil {
			return fmt.Errorf("claim due transactions: %w", err)
		}
		for _, t := range txs {
			bs, err := branches(ctx, tx, t.GID)
			if err != nil {
				return err
			}
			out = append(out, store.Claimed{Transaction: t, Branches: bs})
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

const renewSQL = `UPDATE treaty_transactions SET lease_expires_at = max(coalesce(lease_expires_at, ?1), ?1),
    next_attempt_at = max(coalesce(lease_expires_at, ?1), ?1)
WHERE gid = ?2 AND epoch = ?3 AND lease_owner = ?4 AND next_attempt_at IS NOT NULL`

// RenewLeases implements store.Store.
func (s *Store) RenewLeases(ctx context.Context, p store.RenewParams) (store.RenewResult, error) {
	res := store.RenewResult{Renewed: make(map[string]bool, len(p.Refs))}
	if len(p.Refs) == 0 {
		return res, nil
	}
	err := s.write(ctx, "renew leases", func(tx *sql.Tx, at time.Time) error {
		exp := at.Add(p.Lease)
		for _, r := range p.Refs {
			sr, err := tx.ExecContext(ctx, renewSQL, micros(exp), r.GID, r.Epoch, p.Owner)
			if err != nil {
				return fmt.Errorf("renew lease of %q: %w", r.GID, err)
			}
			if n, err := sr.RowsAffected(); err != nil {
				return fmt.Errorf("renew lease of %q: %w", r.GID, err)
			} else if n == 1 {
				res.Renewed[r.GID] = true
				res.LeaseExpiresAt = exp
			}
		}
		return nil
	})
	if err != nil {
		return store.RenewResult{Renewed: map[string]bool{}}, err
	}
	return res, nil
}

const releaseSQL = `UPDATE treaty_transactions SET
    lease_owner = NULL, lease_expires_at = NULL,
    next_attempt_at = CASE WHEN status IN ('trying', 'prepared') THEN max(?1, deadline) ELSE max(?1, coalesce(?2, ?1)) END,
    updated_at = ?1
WHERE gid = ?3 AND epoch = ?4 AND lease_owner = ?5 AND next_attempt_at IS NOT NULL`

// ReleaseLeases implements store.Store.
func (s *Store) ReleaseLeases(ctx context.Context, owner string, rs []store.Release) error {
	if len(rs) == 0 {
		return nil
	}
	return s.write(ctx, "release leases", func(tx *sql.Tx, at time.Time) error {
		for _, r := range rs {
			if _, err := tx.ExecContext(ctx, releaseSQL, micros(at), nullMicros(r.NextAttemptAt), r.GID, r.Epoch, owner); err != nil {
				return fmt.Errorf("release lease of %q: %w", r.GID, err)
			}
		}
		return nil
	})
}

// openSQL checks, under the write lock, that a transaction is open for registration.
const openSQL = `SELECT count(*) FROM treaty_transactions
WHERE gid = ? AND status IN (SELECT value FROM json_each(?)) AND lease_owner IS NULL AND deadline > ?`

const registerBranchSQL = `INSERT INTO treaty_branches (gid, branch, op, position, status, spec, updated_at)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (gid, branch, op) DO NOTHING`

// RegisterBranches implements store.Store. The check that the transaction is open and the
// inserts are one transaction under the write lock, so a Transition or a claim (which take the
// same lock) runs wholly before or wholly after it.
func (s *Store) RegisterBranches(ctx context.Context, p store.RegisterParams) (store.RegisterResult, error) {
	statuses, err := jsonList(p.Statuses)
	if err != nil {
		return store.RegisterResult{}, fmt.Errorf("register branches of %q: statuses: %w", p.GID, err)
	}
	var res store.RegisterResult
	err = s.write(ctx, fmt.Sprintf("register branches of %q", p.GID), func(tx *sql.Tx, at time.Time) error {
		var open int
		if err := tx.QueryRowContext(ctx, openSQL, p.GID, statuses, micros(at)).Scan(&open); err != nil {
			return fmt.Errorf("register branches of %q: %w", p.GID, err)
		}
		if open == 0 {
			t, err := getTx(ctx, tx, p.GID) // ErrNotFound for an unknown gid
			res = store.RegisterResult{Open: false, Transaction: t, Existing: map[string][]byte{}}
			return err
		}
		// Positions continue after the branches already there.
		var base int
		if err := tx.QueryRowContext(ctx, `SELECT coalesce(max(position) + 1, 0) FROM treaty_branches WHERE gid = ?`, p.GID).Scan(&base); err != nil {
			return fmt.Errorf("register branches of %q: %w", p.GID, err)
		}
		var rows int
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM treaty_branches WHERE gid = ?`, p.GID).Scan(&rows); err != nil {
			return fmt.Errorf("register branches of %q: %w", p.GID, err)
		}
		full := p.MaxRows > 0 && rows+len(p.Branches) > p.MaxRows
		isNew := map[string]bool{}
		for _, b := range p.Branches {
			if full {
				break
			}
			r, err := tx.ExecContext(ctx, registerBranchSQL, p.GID, b.Branch, b.Op, base+b.Position, b.Status, nullBytes(b.Spec), micros(at))
			if err != nil {
				return fmt.Errorf("register branches of %q: branch %s/%s: %w", p.GID, b.Branch, b.Op, err)
			}
			if n, err := r.RowsAffected(); err != nil {
				return fmt.Errorf("register branches of %q: %w", p.GID, err)
			} else if n == 1 {
				isNew[b.Branch] = true
			}
		}
		// Events about a branch are written only for a branch new in this call: a repeated
		// registration leaves the history as it was.
		var es []store.Event
		for _, e := range p.Events {
			if !full && (e.Branch == "" || isNew[e.Branch]) {
				es = append(es, e)
			}
		}
		if err := insertEvents(ctx, tx, p.GID, at, es); err != nil {
			return err
		}
		t, err := getTx(ctx, tx, p.GID)
		if err != nil {
			return err
		}
		bs, err := branches(ctx, tx, p.GID)
		if err != nil {
			return err
		}
		res = store.RegisterResult{Open: true, Transaction: t, Existing: map[string][]byte{}, Full: full}
		// Rows that were there before keep their spec; report it so the caller can compare.
		for _, b := range bs {
			if isNew[b.Branch] {
				continue
			}
			for _, nb := range p.Branches {
				if b.Branch == nb.Branch && b.Op == nb.Op {
					res.Existing[b.Branch] = b.Spec
				}
			}
		}
		return nil
	})
	if err != nil {
		return store.RegisterResult{}, err
	}
	return res, nil
}

const transitionSQL = `UPDATE treaty_transactions SET
    status = ?1, reason = CASE WHEN ?2 = '' THEN reason ELSE ?2 END,
    lease_owner = ?3, lease_expires_at = ?4, next_attempt_at = ?4, epoch = epoch + 1, updated_at = ?5
WHERE gid = ?6 AND status IN (SELECT value FROM json_each(?7)) AND paused = 0
  AND (lease_expires_at IS NULL OR lease_expires_at <= ?5)
  AND (NOT ?8 OR deadline > ?5)
RETURNING ` + txColumns

// Transition implements store.Store.
func (s *Store) Transition(ctx context.Context, p store.TransitionParams) (store.TransitionResult, error) {
	from, err := jsonList(p.From)
	if err != nil {
		return store.TransitionResult{}, fmt.Errorf("transition %q to %s: from: %w", p.GID, p.To, err)
	}
	var res store.TransitionResult
	err = s.write(ctx, fmt.Sprintf("transition %q to %s", p.GID, p.To), func(tx *sql.Tx, at time.Time) error {
		t, err := scanTx(tx.QueryRowContext(ctx, transitionSQL, p.To, p.Reason, p.Owner, micros(at.Add(p.Lease)), micros(at), p.GID, from, p.BeforeDeadline))
		if errors.Is(err, sql.ErrNoRows) {
			cur, err := getTx(ctx, tx, p.GID) // ErrNotFound for an unknown gid
			res = store.TransitionResult{Current: cur}
			return err
		}
		if err != nil {
			return fmt.Errorf("transition %q to %s: %w", p.GID, p.To, err)
		}
		if err := insertEvents(ctx, tx, p.GID, at, p.Events); err != nil {
			return err
		}
		bs, err := branches(ctx, tx, p.GID)
		if err != nil {
			return err
		}
		res = store.TransitionResult{Done: true, Claimed: store.Claimed{Transaction: t, Branches: bs}}
		return nil
	})
	if err != nil {
		return store.TransitionResult{}, err
	}
	return res, nil
}

const workflowColumns = `name, version, spec, spec_hash, created_at`

func scanWorkflow(row scanner) (store.Workflow, error) {
	var w store.Workflow
	var created int64
	if err := row.Scan(&w.Name, &w.Version, &w.Spec, &w.SpecHash, &created); err != nil {
		return store.Workflow{}, err
	}
	w.CreatedAt = fromMicros(created)
	return w, nil
}

const latestWorkflowSQL = `SELECT ` + workflowColumns + ` FROM treaty_workflows
WHERE name = ?1 AND (?2 = 0 OR version = ?2) ORDER BY version DESC LIMIT 1`

// RegisterWorkflow implements store.Store. Reading the newest version and adding the next one
// happen under the write lock, so concurrent registrations of one name cannot both add a version.
func (s *Store) RegisterWorkflow(ctx context.Context, name string, spec, hash []byte) (store.Workflow, bool, error) {
	var w store.Workflow
	var created bool
	err := s.write(ctx, fmt.Sprintf("register workflow %q", name), func(tx *sql.Tx, at time.Time) error {
		latest, err := scanWorkflow(tx.QueryRowContext(ctx, latestWorkflowSQL, name, 0))
		switch {
		case err == nil && bytes.Equal(latest.SpecHash, hash):
			w = latest
			return nil
		case err != nil && !errors.Is(err, sql.ErrNoRows):
			return fmt.Errorf("register workflow %q: %w", name, err)
		}
		w = store.Workflow{Name: name, Version: latest.Version + 1, Spec: spec, SpecHash: hash, CreatedAt: at}
		if _, err := tx.ExecContext(ctx, `INSERT INTO treaty_workflows (`+workflowColumns+`) VALUES (?, ?, ?, ?, ?)`,
			name, w.Version, notNullBytes(spec), notNullBytes(hash), micros(at)); err != nil {
			return fmt.Errorf("register workflow %q: %w", name, err)
		}
		created = true
		return nil
	})
	if err != nil {
		return store.Workflow{}, false, err
	}
	return w, created, nil
}

// GetWorkflow implements store.Store.
func (s *Store) GetWorkflow(ctx context.Context, name string, version int) (store.Workflow, error) {
	w, err := scanWorkflow(s.db.QueryRowContext(ctx, latestWorkflowSQL, name, version))
	if errors.Is(err, sql.ErrNoRows) {
		if version == 0 {
			return store.Workflow{}, fmt.Errorf("%w: workflow %q", store.ErrNotFound, name)
		}
		return store.Workflow{}, fmt.Errorf("%w: workflow %q version %d", store.ErrNotFound, name, version)
	}
	if err != nil {
		return store.Workflow{}, fmt.Errorf("read workflow %q: %w", name, err)
	}
	return w, nil
}

// ListWorkflows implements store.Store.
func (s *Store) ListWorkflows(ctx context.Context, name string) ([]store.Workflow, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT `+workflowColumns+` FROM treaty_workflows
		WHERE ?1 = '' OR name = ?1 ORDER BY name, version`, name)
	if err != nil {
		return nil, fmt.Errorf("list workflows: %w", err)
	}
	defer rows.Close()
	var out []store.Workflow
	for rows.Next() {
		w, err := scanWorkflow(rows)
		if err != nil {
			return nil, fmt.Errorf("list workflows: %w", err)
		}
		out = append(out, w)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list workflows: %w", err)
	}
	return out, nil
}

// Now implements store.Store: the process clock in UTC (see the package doc). It fails on a
// done context, as a database round trip would.
func (s *Store) Now(ctx context.Context) (time.Time, error) {
	if err := ctx.Err(); err != nil {
		return time.Time{}, fmt.Errorf("read database clock: %w", err)
	}
	return now(), nil
}

// Ping implements store.Store: the database answers and its schema is the one this binary has.
func (s *Store) Ping(ctx context.Context) error {
	m := s.migrations
	v, err := version(ctx, s.db)
	if err != nil {
		return fmt.Errorf("database unreachable: %w", err)
	}
	if v > m.Latest() {
		// Migrating cannot help here: a newer binary moved the schema on, and this one is stale.
		return fmt.Errorf("sqlite schema at version %d is newer than this binary knows (%d): upgrade the binary", v, m.Latest())
	}
	if v < m.Latest() {
		return fmt.Errorf("sqlite schema at version %d, this binary needs %d: migrate it (sqlite.Store.Migrate) before serving", v, m.Latest())
	}
	return nil
}

// version is the applied schema version, 0 when nothing ran yet.
func version(ctx context.Context, q querier) (int, error) {
	var n int
	if err := q.QueryRowContext(ctx, `SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = ?`, VersionTable).Scan(&n); err != nil {
		return 0, fmt.Errorf("read %s: %w", VersionTable, err)
	}
	if n == 0 {
		return 0, nil
	}
	var v int
	if err := q.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM `+VersionTable).Scan(&v); err != nil {
		return 0, fmt.Errorf("read %s: %w", VersionTable, err)
	}
	return v, nil
}

// Migrate applies every schema migration not applied yet. Running it again is a no-op.
func (s *Store) Migrate(ctx context.Context) (migrate.Result, error) {
	return s.MigrateTo(ctx, s.migrations.Latest())
}

// MigrateTo migrates up or down to version target, one transaction per migration. Each step
// takes the write lock (BEGIN IMMEDIATE) and reads the version under it, so several processes
// migrating one file at once apply each migration once.
func (s *Store) MigrateTo(ctx context.Context, target int) (migrate.Result, error) {
	if target < 0 || target > s.migrations.Latest() {
		return migrate.Result{}, fmt.Errorf("target version %d out of range 0..%d", target, s.migrations.Latest())
	}
	res := migrate.Result{From: -1}
	for {
		// step is the version applied by this round: +v up, -v down, 0 when at target.
		cur, step, err := s.migrateStep(ctx, target)
		if res.From < 0 {
			res.From, res.To = cur, cur
		}
		if err != nil {
			return res, err
		}
		if step == 0 {
			return res, nil
		}
		res.Applied = append(res.Applied, step)
		if step > 0 {
			res.To = step
		} else {
			res.To = -step - 1
		}
	}
}

// migrateStep applies the one migration that moves the schema toward target, in its own
// transaction, and returns the version it found.
func (s *Store) migrateStep(ctx context.Context, target int) (cur, step int, err error) {
	ms := s.migrations.Migrations()
	err = s.write(ctx, "migrate sqlite schema", func(tx *sql.Tx, at time.Time) error {
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS `+VersionTable+
			` (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL) STRICT`); err != nil {
			return fmt.Errorf("create %s: %w", VersionTable, err)
		}
		v, err := version(ctx, tx)
		if err != nil {
			return err
		}
		cur = v
		if cur > len(ms) {
			return fmt.Errorf("sqlite schema at version %d is newer than this binary knows (%d): upgrade the binary", cur, len(ms))
		}
		switch {
		case cur < target:
			mg := ms[cur]
			if _, err := tx.ExecContext(ctx, mg.Up); err != nil {
				return fmt.Errorf("migration %03d_%s up: %w", mg.Version, mg.Name, err)
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO `+VersionTable+` (version, name, applied_at) VALUES (?, ?, ?)`,
				mg.Version, mg.Name, micros(at)); err != nil {
				return fmt.Errorf("migration %03d_%s up: %w", mg.Version, mg.Name, err)
			}
			step = mg.Version
		case cur > target:
			mg := ms[cur-1]
			if mg.Down == "" {
				return fmt.Errorf("migration %03d_%s has no .down.sql", mg.Version, mg.Name)
			}
			if _, err := tx.ExecContext(ctx, mg.Down); err != nil {
				return fmt.Errorf("migration %03d_%s down: %w", mg.Version, mg.Name, err)
			}
			if _, err := tx.ExecContext(ctx, `DELETE FROM `+VersionTable+` WHERE version = ?`, mg.Version); err != nil {
				return fmt.Errorf("migration %03d_%s down: %w", mg.Version, mg.Name, err)
			}
			step = -mg.Version
		}
		return nil
	})
	if err != nil {
		return cur, 0, err
	}
	return cur, step, nil
}
