package participant

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DefaultBarrierTable is the barrier table used when BarrierOptions.Table is empty.
const DefaultBarrierTable = "treaty_barrier"

// DefaultCleanupBatch is the number of rows Cleanup deletes per statement when batch is 0.
const DefaultCleanupBatch = 1000

// RecommendedRetention is a safe default age for Cleanup: comfortably longer than any
// transaction timeout plus the time its retries may take.
const RecommendedRetention = 7 * 24 * time.Hour

// PgxDB is what the helpers that run their own transactions or statements need:
// *pgxpool.Pool or *pgx.Conn. A pgx.Tx also satisfies it but is refused where a transaction
// of its own is required (TwoPhase.Prepare).
type PgxDB interface {
	Begin(ctx context.Context) (pgx.Tx, error)
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// BarrierOptions configures a Barrier. The zero value is valid.
type BarrierOptions struct {
	// Table is the barrier table's name, optionally schema-qualified ("billing.treaty_barrier").
	// Lower-case letters, digits and '_', starting with a letter or '_'; at most 48 bytes
	// (63 for the schema), so derived index names stay within PostgreSQL's limit.
	// Empty means DefaultBarrierTable.
	Table string
	// Dialect is the database's SQL dialect; the zero value is DialectPostgres.
	Dialect Dialect
}

// Barrier makes participant calls safe to repeat and to receive out of order. It records each
// call as a row of a table in the participant's own database, inserted in the same local
// transaction as the business work, unique on (mode, gid, branch, op). See the package
// documentation for the rules. A Barrier is immutable and safe for concurrent use.
type Barrier struct {
	table   string
	dialect Dialect
	q       barrierSQL
}

type barrierSQL struct {
	schema, insertOne, insertPair, insertMarker, reason, cleanup string
}

// NewBarrier returns a Barrier on the configured table. It does not touch the database; create
// the table with EnsureTable, EnsureTableSQL or your migration tool and Schema.
func NewBarrier(opts BarrierOptions) (*Barrier, error) {
	q, err := buildBarrierSQLFor(opts.Dialect, opts.Table)
	if err != nil {
		return nil, err
	}
	table := opts.Table
	if table == "" {
		table = DefaultBarrierTable
	}
	return &Barrier{table: table, dialect: opts.Dialect, q: q}, nil
}

// Table is the configured table name.
func (b *Barrier) Table() string { return b.table }

// Schema is the DDL that creates the barrier table and its index, idempotently (IF NOT
// EXISTS), for migration tools.
func (b *Barrier) Schema() string { return b.q.schema }

// BarrierSchema returns the DDL for a barrier table of the given name ("" for
// DefaultBarrierTable), for pasting into a migration. It panics if the name is invalid, like
// regexp.MustCompile, because it is meant for a constant; NewBarrier reports the same problem
// as an error.
func BarrierSchema(table string) string {
	q, err := buildBarrierSQL(table)
	if err != nil {
		panic(err)
	}
	return q.schema
}

// ensureLockClass is the first key of the advisory lock that serializes EnsureTable runs
// ("TRBT"); the second is the table name's hash. Concurrent CREATE ... IF NOT EXISTS can
// otherwise fail on the system catalogs' unique indexes.
const ensureLockClass = 0x54524254

// EnsureTable creates the barrier table and its index if they do not exist.
func (b *Barrier) EnsureTable(ctx context.Context, db PgxDB) error {
	if b.dialect != DialectPostgres {
		return errNotPgx(b, "EnsureTable")
	}
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1, hashtext($2))", int32(ensureLockClass), b.table); err != nil {
			return err
		}
		// No arguments: pgx sends this with the simple protocol, which allows several statements.
		_, err := tx.Exec(ctx, b.q.schema)
		return err
	})
	if err != nil {
		return fmt.Errorf("participant: create barrier table %s: %w", b.table, err)
	}
	return nil
}

// EnsureTableSQL is EnsureTable for database/sql (a PostgreSQL driver such as pgx's stdlib, or
// SQLite with DialectSQLite).
func (b *Barrier) EnsureTableSQL(ctx context.Context, db *sql.DB) error {
	err := func() error {
		tx, err := db.BeginTx(ctx, nil)
		if err != nil {
			return err
		}
		defer func() { _ = tx.Rollback() }()
		// SQLite's single write lock already serializes the CREATE statements.
		if b.dialect == DialectPostgres {
			if _, err := tx.ExecContext(ctx, "SELECT pg_advisory_xact_lock($1, hashtext($2))", int32(ensureLockClass), b.table); err != nil {
				return err
			}
		}
		for _, stmt := range splitStatements(b.q.schema) {
			if _, err := tx.ExecContext(ctx, stmt); err != nil {
				return err
			}
		}
		return tx.Commit()
	}()
	if err != nil {
		return fmt.Errorf("participant: create barrier table %s: %w", b.table, err)
	}
	return nil
}

// splitStatements splits the generated schema (which has no ';' inside literals) so drivers
// that refuse several statements in one Exec work too.
func splitStatements(s string) []string {
	var out []string
	for _, stmt := range strings.Split(s, ";") {
		if strings.TrimSpace(stripComments(stmt)) != "" {
			out = append(out, stmt)
		}
	}
	return out
}

func stripComments(s string) string {
	var b strings.Builder
	for _, line := range strings.Split(s, "\n") {
		if i := strings.Index(line, "--"); i >= 0 {
			line = line[:i]
		}
		b.WriteString(line)
		b.WriteByte('\n')
	}
	return b.String()
}

// CallPgx runs fn under the barrier inside the caller's transaction tx, which the caller
// commits (or rolls back) afterwards. fn must do its work through tx.
//
//   - First call of an operation: the barrier row is inserted and fn runs. If fn fails, its
//     error is returned unchanged and a savepoint undoes both fn's writes and the barrier row,
//     leaving tx usable.
//   - Repeated call of an operation that succeeded before: fn does not run; nil.
//   - Cancel, compensate or rollback whose try, action or prepare never ran: fn does not run; a
//     marker is recorded; nil (an empty rollback).
//   - Try, action or prepare after such a marker: fn does not run; an error wrapping
//     ErrAborted (no hanging reservation).
//
// A call racing another for the same branch waits, inside the insert, until the other's
// transaction ends, so only the transaction that commits first decides. Use READ COMMITTED
// (PostgreSQL's default); under REPEATABLE READ or SERIALIZABLE a lost race surfaces as a
// serialization failure, which is safe to retry.
func (b *Barrier) CallPgx(ctx context.Context, tx pgx.Tx, md Metadata, fn func(ctx context.Context) error) error {
	if b.dialect != DialectPostgres {
		return errNotPgx(b, "CallPgx")
	}
	return b.call(ctx, pgxRunner{tx}, true, md, fn)
}

// CallSQL is CallPgx for database/sql: a PostgreSQL driver, or SQLite with DialectSQLite.
func (b *Barrier) CallSQL(ctx context.Context, tx *sql.Tx, md Metadata, fn func(ctx context.Context) error) error {
	return b.call(ctx, sqlRunner{tx}, true, md, fn)
}

// CallPgxDB begins a transaction on db, runs fn under the barrier in it (see CallPgx), and
// commits when the barrier and fn succeed; otherwise it rolls back and returns the error (fn's
// unchanged). It also commits the marker of an empty rollback.
func (b *Barrier) CallPgxDB(ctx context.Context, db PgxDB, md Metadata, fn func(ctx context.Context, tx pgx.Tx) error) error {
	if b.dialect != DialectPostgres {
		return errNotPgx(b, "CallPgxDB")
	}
	if err := md.Validate(); err != nil {
		return err
	}
	tx, err := db.Begin(ctx)
	if err != nil {
		return fmt.Errorf("participant: begin for %s: %w", md, err)
	}
	// After a successful Commit this returns ErrTxClosed, which means nothing.
	defer func() { _ = tx.Rollback(ctx) }()
	// No savepoint: the transaction is ours, and rolling all of it back undoes the barrier row.
	if err := b.call(ctx, pgxRunner{tx}, false, md, func(ctx context.Context) error { return fn(ctx, tx) }); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("participant: commit %s: %w", md, err)
	}
	return nil
}

// CallSQLDB is CallPgxDB for database/sql.
func (b *Barrier) CallSQLDB(ctx context.Context, db *sql.DB, md Metadata, fn func(ctx context.Context, tx *sql.Tx) error) error {
	if err := md.Validate(); err != nil {
		return err
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("participant: begin for %s: %w", md, err)
	}
	defer func() { _ = tx.Rollback() }()
	if err := b.call(ctx, sqlRunner{tx}, false, md, func(ctx context.Context) error { return fn(ctx, tx) }); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("participant: commit %s: %w", md, err)
	}
	return nil
}

// undoOf maps an undo operation to the forward operation it undoes. Operations not listed
// (confirm, commit, and any other) are forward operations without a marker rule: the barrier
// only makes them idempotent.
func undoOf(op string) (forward string, ok bool) {
	switch op {
	case OpCompensate:
		return OpAction, true
	case OpCancel:
		return OpTry, true
	case OpRollback:
		return OpPrepare, true
	case OpQueryPrepared:
		return OpMsg, true
	}
	return "", false
}

// runner is the part of a transaction the barrier uses, for pgx and database/sql alike.
type runner interface {
	// insert runs the barrier insert (after a savepoint, when asked) and returns the op of
	// every row it wrote.
	insert(ctx context.Context, savepoint bool, query string, args ...any) ([]string, error)
	// reason reads one row's reason; found is false when there is no such row.
	reason(ctx context.Context, query string, args ...any) (reason string, found bool, err error)
	release(ctx context.Context) error
	rollbackTo(ctx context.Context) error
}

const (
	savepointSQL  = "SAVEPOINT treaty_barrier"
	releaseSQL    = "RELEASE SAVEPOINT treaty_barrier"
	rollbackToSQL = "ROLLBACK TO SAVEPOINT treaty_barrier"
)

func (b *Barrier) call(ctx context.Context, r runner, savepoint bool, md Metadata, fn func(ctx context.Context) error) error {
	if err := md.Validate(); err != nil {
		return err
	}
	forward, undo := undoOf(md.Op)
	var inserted []string
	var err error
	if undo {
		// The forward row first, in one statement: a concurrent forward call holding it makes
		// this wait for its outcome, and every caller takes the two rows in the same order.
		inserted, err = r.insert(ctx, savepoint, b.q.insertPair, md.Mode, md.GID, md.Branch, forward, md.Op)
	} else {
		inserted, err = r.insert(ctx, savepoint, b.q.insertOne, md.Mode, md.GID, md.Branch, md.Op)
	}
	if err != nil {
		if savepoint {
			// Best effort: leaves the caller's transaction usable if the savepoint was set.
			_ = r.rollbackTo(ctx)
		}
		return fmt.Errorf("participant: barrier insert into %s for %s: %w", b.table, md, err)
	}
	finish := func() error {
		if !savepoint {
			return nil
		}
		if err := r.release(ctx); err != nil {
			return fmt.Errorf("participant: release barrier savepoint for %s: %w", md, err)
		}
		return nil
	}
	switch {
	case undo && slices.Contains(inserted, forward):
		// The forward operation never committed: there is nothing to undo. The marker row
		// (forward op, reason = this op) makes a late forward call refuse.
		return finish()
	case !slices.Contains(inserted, md.Op):
		if undo {
			return finish() // a repeated undo
		}
		reason, found, err := r.reason(ctx, b.q.reason, md.Mode, md.GID, md.Branch, md.Op)
		if err != nil {
			if savepoint {
				_ = r.rollbackTo(ctx)
			}
			return fmt.Errorf("participant: read barrier row in %s for %s: %w", b.table, md, err)
		}
		if err := finish(); err != nil {
			return err
		}
		switch {
		case !found:
			// Only Cleanup deletes rows; it did so between the insert and this read.
			return fmt.Errorf("participant: barrier row for %s vanished between insert and read "+
				"(deleted by Cleanup? keep rows longer than any transaction may be retried); retry", md)
		case reason == md.Op:
			return nil // a repeated call: the first one succeeded
		default:
			return fmt.Errorf("%w: %s refused: its %s arrived first and left a marker, so running it "+
				"now would leave a reservation that nothing undoes", ErrAborted, md, reason)
		}
	}
	if err := fn(ctx); err != nil {
		if savepoint {
			// If this fails the connection is broken and the caller's commit fails too; fn's
			// error is the one worth reporting.
			_ = r.rollbackTo(ctx)
		}
		return err
	}
	return finish()
}

type pgxRunner struct{ tx pgx.Tx }

func (r pgxRunner) insert(ctx context.Context, savepoint bool, query string, args ...any) ([]string, error) {
	if !savepoint {
		rows, _ := r.tx.Query(ctx, query, args...)
		return pgx.CollectRows(rows, pgx.RowTo[string])
	}
	// One round trip for the savepoint and the insert.
	batch := &pgx.Batch{}
	batch.Queue(savepointSQL)
	batch.Queue(query, args...)
	br := r.tx.SendBatch(ctx, batch)
	if _, err := br.Exec(); err != nil {
		return nil, errors.Join(err, br.Close())
	}
	rows, _ := br.Query()
	ops, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, errors.Join(err, br.Close())
	}
	return ops, br.Close()
}

func (r pgxRunner) reason(ctx context.Context, query string, args ...any) (string, bool, error) {
	var reason string
	err := r.tx.QueryRow(ctx, query, args...).Scan(&reason)
	if errors.Is(err, pgx.ErrNoRows) {
		return "", false, nil
	}
	return reason, err == nil, err
}

func (r pgxRunner) release(ctx context.Context) error {
	_, err := r.tx.Exec(ctx, releaseSQL)
	return err
}

func (r pgxRunner) rollbackTo(ctx context.Context) error {
	// No arguments, so pgx uses the simple protocol and both statements go in one round trip.
	_, err := r.tx.Exec(ctx, rollbackToSQL+"; "+releaseSQL)
	return err
}

type sqlRunner struct{ tx *sql.Tx }

func (r sqlRunner) insert(ctx context.Context, savepoint bool, query string, args ...any) ([]string, error) {
	if savepoint {
		if _, err := r.tx.ExecContext(ctx, savepointSQL); err != nil {
			return nil, err
		}
	}
	rows, err := r.tx.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ops []string
	for rows.Next() {
		var op string
		if err := rows.Scan(&op); err != nil {
			return nil, err
		}
		ops = append(ops, op)
	}
	return ops, rows.Err()
}

func (r sqlRunner) reason(ctx context.Context, query string, args ...any) (string, bool, error) {
	var reason string
	err := r.tx.QueryRowContext(ctx, query, args...).Scan(&reason)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, nil
	}
	return reason, err == nil, err
}

func (r sqlRunner) release(ctx context.Context) error {
	_, err := r.tx.ExecContext(ctx, releaseSQL)
	return err
}

func (r sqlRunner) rollbackTo(ctx context.Context) error {
	if _, err := r.tx.ExecContext(ctx, rollbackToSQL); err != nil {
		return err
	}
	_, err := r.tx.ExecContext(ctx, releaseSQL)
	return err
}

// Cleanup deletes barrier rows older than olderThan, batch rows per statement (0 means
// DefaultCleanupBatch), each statement its own short transaction, so it never holds many row
// locks or blocks calls for long. It returns how many rows it deleted; on error or when ctx
// ends, the count so far and the error.
//
// Retention: a row must outlive every call that may still arrive for its branch, or a late
// duplicate runs again and a late try after its cancel is no longer refused. Keep rows longer
// than the longest transaction timeout plus all its retries and the time an operator may take
// to resume a flagged transaction: RecommendedRetention (7 days) unless you know better. Run
// Cleanup periodically (hourly, say) from one place.
func (b *Barrier) Cleanup(ctx context.Context, db PgxDB, olderThan time.Duration, batch int) (int, error) {
	if b.dialect != DialectPostgres {
		return 0, errNotPgx(b, "Cleanup")
	}
	return b.cleanup(ctx, olderThan, batch, func(ctx context.Context, args ...any) (int64, error) {
		tag, err := db.Exec(ctx, b.q.cleanup, args...)
		return tag.RowsAffected(), err
	})
}

// CleanupSQL is Cleanup for database/sql.
func (b *Barrier) CleanupSQL(ctx context.Context, db *sql.DB, olderThan time.Duration, batch int) (int, error) {
	return b.cleanup(ctx, olderThan, batch, func(ctx context.Context, args ...any) (int64, error) {
		res, err := db.ExecContext(ctx, b.q.cleanup, args...)
		if err != nil {
			return 0, err
		}
		return res.RowsAffected()
	})
}

func (b *Barrier) cleanup(ctx context.Context, olderThan time.Duration, batch int,
	exec func(ctx context.Context, args ...any) (int64, error)) (int, error) {
	if olderThan <= 0 {
		return 0, fmt.Errorf("participant: cleanup of %s: olderThan is %s, must be positive "+
			"(and longer than any transaction may be retried; RecommendedRetention is %s)", b.table, olderThan, RecommendedRetention)
	}
	if batch < 0 {
		return 0, fmt.Errorf("participant: cleanup of %s: batch is %d, must be positive (0 means %d)", b.table, batch, DefaultCleanupBatch)
	}
	if batch == 0 {
		batch = DefaultCleanupBatch
	}
	deleted := 0
	for {
		n, err := exec(ctx, olderThan.Microseconds(), batch)
		deleted += int(n)
		if err != nil {
			return deleted, fmt.Errorf("participant: cleanup of %s after %d rows: %w", b.table, deleted, err)
		}
		if n < int64(batch) {
			return deleted, nil
		}
		if err := ctx.Err(); err != nil {
			return deleted, fmt.Errorf("participant: cleanup of %s after %d rows: %w", b.table, deleted, err)
		}
	}
}

// Name limits: the index name appends "_created_idx" (12 bytes) to the table name and must fit
// PostgreSQL's 63 bytes.
const (
	maxTableLen  = 48
	maxSchemaLen = 63
)

func buildBarrierSQL(name string) (barrierSQL, error) {
	if name == "" {
		name = DefaultBarrierTable
	}
	schema, base, qualified := strings.Cut(name, ".")
	if !qualified {
		schema, base = "", name
	}
	if qualified {
		if err := checkIdent(name, "schema", schema, maxSchemaLen); err != nil {
			return barrierSQL{}, err
		}
	}
	if err := checkIdent(name, "table name", base, maxTableLen); err != nil {
		return barrierSQL{}, err
	}
	table := quoteIdent(base)
	createSchema := ""
	if qualified {
		table = quoteIdent(schema) + "." + table
		createSchema = "CREATE SCHEMA IF NOT EXISTS " + quoteIdent(schema) + ";\n"
	}
	var q barrierSQL
	q.schema = createSchema + `CREATE TABLE IF NOT EXISTS ` + table + ` (
    mode       text        NOT NULL,
    gid        text        NOT NULL,
    branch     text        NOT NULL,
    op         text        NOT NULL,
    -- The operation whose call wrote the row: op itself when that call ran, or the cancel,
    -- compensate or rollback that arrived first and left this row as a marker.
    reason     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (mode, gid, branch, op)
);
-- Cleanup deletes by age.
CREATE INDEX IF NOT EXISTS ` + quoteIdent(base+"_created_idx") + ` ON ` + table + ` (created_at);
`
	const onConflict = ` ON CONFLICT (mode, gid, branch, op) DO NOTHING RETURNING op`
	q.insertOne = `INSERT INTO ` + table + ` (mode, gid, branch, op, reason) VALUES ($1, $2, $3, $4, $4)` + onConflict
	q.insertPair = `INSERT INTO ` + table + ` (mode, gid, branch, op, reason) VALUES ($1, $2, $3, $4, $5), ($1, $2, $3, $5, $5)` + onConflict
	q.insertMarker = `INSERT INTO ` + table + ` (mode, gid, branch, op, reason) VALUES ($1, $2, $3, $4, $5)` + onConflict
	q.reason = `SELECT reason FROM ` + table + ` WHERE mode = $1 AND gid = $2 AND branch = $3 AND op = $4`
	// ctid = ANY(ARRAY(...)) is a TID scan: each statement touches only the rows it deletes.
	q.cleanup = `DELETE FROM ` + table + ` WHERE ctid = ANY (ARRAY(SELECT ctid FROM ` + table +
		` WHERE created_at < now() - $1::bigint * interval '1 microsecond' LIMIT $2))`
	return q, nil
}

func checkIdent(full, what, s string, limit int) error {
	if s == "" || len(s) > limit {
		return fmt.Errorf("participant: barrier table %q: %s %q is %d bytes, must be 1 to %d", full, what, s, len(s), limit)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '_' || c >= 'a' && c <= 'z' || i > 0 && c >= '0' && c <= '9' {
			continue
		}
		return fmt.Errorf("participant: barrier table %q: %s %q has %q at byte %d; "+
			"use lower-case letters, digits and '_', not starting with a digit", full, what, s, c, i)
	}
	return nil
}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }
