package outbox

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"time"

	"github.com/treatyhq/treaty/internal/migrate"
)

// The SQLite variant of the outbox is for single-node development and demos (the embedded run
// of `coordinator dev` and examples/travel-booking): EnqueueSQL into a SQLite outbox table in
// the caller's *sql.Tx, a SQLiteRelay that polls it, and an Inbox table for SQLite consumers.
// It has no slot leases, no LISTEN/NOTIFY and no dead-letter table: run one relay per database
// file. Production services use the PostgreSQL outbox.

//go:embed migrations/sqlite_outbox/*.sql migrations/sqlite_inbox/*.sql
var sqliteMigrationFS embed.FS

// SQLiteOutbox writes messages into an outbox table of a SQLite database (any database/sql
// driver for SQLite, e.g. modernc.org/sqlite). Create the table with Migrate; move the
// messages to Kafka with a SQLiteRelay.
type SQLiteOutbox struct {
	o *Outbox
}

// NewSQLite returns a SQLiteOutbox for opts.Table (default DefaultTable). The name must not be
// schema-qualified: SQLite has no schemas.
func NewSQLite(opts Options) (*SQLiteOutbox, error) {
	n, err := parseSQLiteName("outbox", opts.Table, DefaultTable)
	if err != nil {
		return nil, err
	}
	return &SQLiteOutbox{o: &Outbox{names: n}}, nil
}

// Table is the outbox table's name.
func (s *SQLiteOutbox) Table() string { return s.o.names.source }

// EnqueueSQL writes msgs in tx, a transaction on the SQLite database that holds the outbox
// table. They are published if and only if tx commits. As with Outbox.Enqueue, messages
// without an ID get a new UUIDv7 and W3C trace context from ctx is added to their headers.
func (s *SQLiteOutbox) EnqueueSQL(ctx context.Context, tx *sql.Tx, msgs ...Message) error {
	// The insert statement (columns, $N placeholders) is the PostgreSQL one: SQLite accepts it.
	return s.o.EnqueueSQL(ctx, tx, msgs...)
}

// parseSQLiteName checks a SQLite table name: the PostgreSQL rules, without a schema.
func parseSQLiteName(what, name, def string) (names, error) {
	if name == "" {
		name = def
	}
	if strings.Contains(name, ".") {
		return names{}, fmt.Errorf("%s table %q: a SQLite table name cannot be schema-qualified", what, name)
	}
	if !identRE.MatchString(name) {
		return names{}, fmt.Errorf("%s table %q: name must match %s", what, name, identRE)
	}
	return parseTableName(name)
}

// Migrate creates or upgrades the outbox table in db. Each step runs in its own
// BEGIN IMMEDIATE transaction, so processes migrating one file at once apply each step once.
func (s *SQLiteOutbox) Migrate(ctx context.Context, db *sql.DB) error {
	n := s.o.names
	r := strings.NewReplacer("{{table}}", n.table, "{{base}}", n.base).Replace
	if err := migrateSQLite(ctx, db, "migrations/sqlite_outbox", migrate.QuoteIdent(n.base+"_migrations"), r); err != nil {
		return fmt.Errorf("outbox %s: sqlite migrations: %w", n.source, err)
	}
	return nil
}

// MigrateInboxSQLite creates or upgrades an inbox table ("" means DefaultInboxTable) in a SQLite
// database. Inbox.ProcessSQL then works on it exactly as on PostgreSQL.
func MigrateInboxSQLite(ctx context.Context, db *sql.DB, table string) error {
	n, err := parseSQLiteName("inbox", table, DefaultInboxTable)
	if err != nil {
		return err
	}
	r := strings.NewReplacer("{{table}}", n.table, "{{base}}", n.base).Replace
	if err := migrateSQLite(ctx, db, "migrations/sqlite_inbox", migrate.QuoteIdent(n.base+"_migrations"), r); err != nil {
		return fmt.Errorf("inbox %s: sqlite migrations: %w", n.source, err)
	}
	return nil
}

// PruneSQLite is Prune for an inbox table in a SQLite database.
func (i *Inbox) PruneSQLite(ctx context.Context, db *sql.DB, olderThan time.Duration) (int64, error) {
	if olderThan <= 0 {
		return 0, fmt.Errorf("inbox %s: prune: olderThan is %s, must be positive", i.names.table, olderThan)
	}
	res, err := db.ExecContext(ctx, "DELETE FROM "+i.names.table+
		" WHERE processed_at < CAST(unixepoch('subsec') * 1000000 AS INTEGER) - $1", olderThan.Microseconds())
	if err != nil {
		return 0, fmt.Errorf("inbox %s: prune: %w", i.names.table, err)
	}
	return res.RowsAffected()
}

// migrateSQLite applies the embedded migrations under dir that db has not run yet, recording
// them in versions.
func migrateSQLite(ctx context.Context, db *sql.DB, dir, versions string, replace func(string) string) error {
	sub, err := fs.Sub(sqliteMigrationFS, dir)
	if err != nil {
		return err
	}
	m, err := migrate.New(sub, versions, replace)
	if err != nil {
		return err
	}
	for _, mg := range m.Migrations() {
		if err := applySQLite(ctx, db, versions, mg); err != nil {
			return err
		}
	}
	return nil
}

// applySQLite runs one migration unless it ran already. BEGIN IMMEDIATE takes the write lock
// before the version is read, whatever the caller's DSN says about transactions.
func applySQLite(ctx context.Context, db *sql.DB, versions string, mg migrate.Migration) (err error) {
	conn, err := db.Conn(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, "BEGIN IMMEDIATE"); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			// The connection goes back to the pool; it must not stay inside the transaction.
			_, rerr := conn.ExecContext(context.WithoutCancel(ctx), "ROLLBACK")
			err = errors.Join(err, rerr)
		}
	}()
	if _, err := conn.ExecContext(ctx, "CREATE TABLE IF NOT EXISTS "+versions+
		" (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"); err != nil {
		return fmt.Errorf("create %s: %w", versions, err)
	}
	var done int
	if err := conn.QueryRowContext(ctx, "SELECT count(*) FROM "+versions+" WHERE version = $1", mg.Version).Scan(&done); err != nil {
		return fmt.Errorf("read %s: %w", versions, err)
	}
	if done == 0 {
		if _, err := conn.ExecContext(ctx, mg.Up); err != nil {
			return fmt.Errorf("migration %03d_%s: %w", mg.Version, mg.Name, err)
		}
		if _, err := conn.ExecContext(ctx, "INSERT INTO "+versions+" (version, name, applied_at) VALUES ($1, $2, $3)",
			mg.Version, mg.Name, time.Now().UnixMicro()); err != nil {
			return fmt.Errorf("record migration %03d_%s: %w", mg.Version, mg.Name, err)
		}
	}
	_, err = conn.ExecContext(ctx, "COMMIT")
	return err
}
