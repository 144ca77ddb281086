package participant

import (
	"fmt"
	"strings"
)

// Dialect is the SQL dialect of the database that holds a barrier table.
type Dialect int

const (
	// DialectPostgres is PostgreSQL (through pgx, or database/sql with a PostgreSQL driver). The
	// default.
	DialectPostgres Dialect = iota
	// DialectSQLite is SQLite through database/sql, for example modernc.org/sqlite (pure Go,
	// driver name "sqlite"). Use CallSQL, CallSQLDB, EnsureTableSQL and CleanupSQL; the pgx
	// methods refuse it. The table name must not be schema-qualified.
	//
	// SQLite has one writer per database file, which gives the barrier its guarantees: the
	// barrier insert takes the write lock, so a racing call for the same branch waits for this
	// transaction to end (up to the connection's busy_timeout) and then sees its row. Open the
	// database with a busy timeout and, preferably, BEGIN IMMEDIATE transactions, e.g.
	// "file.db?_pragma=busy_timeout(5000)&_pragma=journal_mode(WAL)&_txlock=immediate". A
	// deferred transaction that read before another committed may instead fail with
	// SQLITE_BUSY; that error leaves nothing behind and the coordinator retries the call.
	DialectSQLite
)

// String names the dialect.
func (d Dialect) String() string {
	switch d {
	case DialectPostgres:
		return "postgres"
	case DialectSQLite:
		return "sqlite"
	}
	return fmt.Sprintf("Dialect(%d)", int(d))
}

// BarrierSchemaFor is BarrierSchema for a dialect: the DDL of a barrier table of that name ("" for
// DefaultBarrierTable). It panics if the name or the dialect is invalid.
func BarrierSchemaFor(d Dialect, table string) string {
	q, err := buildBarrierSQLFor(d, table)
	if err != nil {
		panic(err)
	}
	return q.schema
}

// buildBarrierSQLFor returns the statements of the barrier for dialect d.
func buildBarrierSQLFor(d Dialect, table string) (barrierSQL, error) {
	switch d {
	case DialectPostgres:
		return buildBarrierSQL(table)
	case DialectSQLite:
		return buildSQLiteBarrierSQL(table)
	}
	return barrierSQL{}, fmt.Errorf("participant: barrier dialect %d: want DialectPostgres or DialectSQLite", int(d))
}

// errNotPgx is returned by the pgx methods of a barrier on another dialect: pgx speaks only
// to PostgreSQL, so such a call is a wiring mistake.
func errNotPgx(b *Barrier, method string) error {
	return fmt.Errorf("participant: barrier %s is for %s; %s needs DialectPostgres (use the database/sql method)",
		b.table, b.dialect, method)
}

// buildSQLiteBarrierSQL is buildBarrierSQL for SQLite. The statements keep PostgreSQL's $N
// placeholders, which SQLite accepts as numbered parameters, so the shared call logic passes
// the same arguments to both.
func buildSQLiteBarrierSQL(name string) (barrierSQL, error) {
	if name == "" {
		name = DefaultBarrierTable
	}
	if strings.Contains(name, ".") {
		return barrierSQL{}, fmt.Errorf("participant: barrier table %q: a SQLite barrier table cannot be "+
			"schema-qualified (SQLite has no schemas; put the table in the service's own database file)", name)
	}
	if err := checkIdent(name, "table name", name, maxTableLen); err != nil {
		return barrierSQL{}, err
	}
	table := quoteIdent(name)
	// created_at is unix microseconds: SQLite has no timestamp type, and an integer compares
	// and indexes cheaply for Cleanup.
	const nowMicros = `CAST(unixepoch('subsec') * 1000000 AS INTEGER)`
	var q barrierSQL
	q.schema = `CREATE TABLE IF NOT EXISTS ` + table + ` (
    mode       TEXT    NOT NULL,
    gid        TEXT    NOT NULL,
    branch     TEXT    NOT NULL,
    op         TEXT    NOT NULL,
    -- The operation whose call wrote the row: op itself when that call ran, or the cancel,
    -- compensate or rollback that arrived first and left this row as a marker.
    reason     TEXT    NOT NULL,
    -- Unix microseconds.
    created_at INTEGER NOT NULL DEFAULT (` + nowMicros + `),
    PRIMARY KEY (mode, gid, branch, op)
);
-- Cleanup deletes by age.
CREATE INDEX IF NOT EXISTS ` + quoteIdent(name+"_created_idx") + ` ON ` + table + ` (created_at);
`
	// RETURNING reports only the rows the insert wrote, as in PostgreSQL.
	const onConflict = ` ON CONFLICT (mode, gid, branch, op) DO NOTHING RETURNING op`
	q.insertOne = `INSERT INTO ` + table + ` (mode, gid, branch, op, reason) VALUES ($1, $2, $3, $4, $4)` + onConflict
	q.insertPair = `INSERT INTO ` + table + ` (mode, gid, branch, op, reason) VALUES ($1, $2, $3, $4, $5), ($1, $2, $3, $5, $5)` + onConflict
	q.insertMarker = `INSERT INTO ` + table + ` (mode, gid, branch, op, reason) VALUES ($1, $2, $3, $4, $5)` + onConflict
	q.reason = `SELECT reason FROM ` + table + ` WHERE mode = $1 AND gid = $2 AND branch = $3 AND op = $4`
	q.cleanup = `DELETE FROM ` + table + ` WHERE rowid IN (SELECT rowid FROM ` + table +
		` WHERE created_at < ` + nowMicros + ` - $1 LIMIT $2)`
	return q, nil
}
