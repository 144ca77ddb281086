package outbox

import (
	"context"
	"embed"
	"fmt"
	"io/fs"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/treatyhq/treaty/internal/migrate"
)

//go:embed migrations/outbox/*.sql migrations/inbox/*.sql
var migrationFS embed.FS

// MigrateOptions configures Migrate. The zero value means the default table and slot count.
type MigrateOptions struct {
	// Table is the outbox table, optionally schema-qualified ("app.outbox"). Companion tables
	// take it as a prefix (_slot, _relay, _hold, _dead, _migrations). Default DefaultTable.
	Table string
	// Slots is the number of key slots, fixed when the tables are first created: keys hash into
	// slots and each slot is leased to one relay, so it caps how many relays share the work.
	// Default DefaultSlots. Ignored once the tables exist.
	Slots int
}

// MigrationSet returns the outbox migrations with names substituted, for services that apply
// migrations with their own tool: read the SQL from the returned migrations' Up and Down.
func MigrationSet(opts MigrateOptions) ([]migrate.Migration, error) {
	m, _, err := outboxMigrator(opts)
	if err != nil {
		return nil, err
	}
	return m.Migrations(), nil
}

// Migrate creates or upgrades the outbox tables. It is safe to run concurrently from several
// processes (an advisory lock serialises them) and a no-op when everything is applied.
func Migrate(ctx context.Context, pool *pgxpool.Pool, opts MigrateOptions) error {
	m, n, err := outboxMigrator(opts)
	if err != nil {
		return err
	}
	// The version table is created before the first migration runs, so its schema must exist.
	if err := ensureSchema(ctx, pool, n.schema); err != nil {
		return err
	}
	if _, err := m.Up(ctx, pool); err != nil {
		return fmt.Errorf("outbox migrations: %w", err)
	}
	return nil
}

// MigrateDown reverts the outbox migrations to version (0 drops every outbox table).
func MigrateDown(ctx context.Context, pool *pgxpool.Pool, opts MigrateOptions, version int) error {
	m, n, err := outboxMigrator(opts)
	if err != nil {
		return err
	}
	if err := ensureSchema(ctx, pool, n.schema); err != nil {
		return err
	}
	if _, err := m.To(ctx, pool, version); err != nil {
		return fmt.Errorf("outbox migrations: %w", err)
	}
	return nil
}

func outboxMigrator(opts MigrateOptions) (*migrate.Migrator, names, error) {
	n, err := parseTableName(opts.Table)
	if err != nil {
		return nil, names{}, err
	}
	slots := opts.Slots
	if slots == 0 {
		slots = DefaultSlots
	}
	if slots < 1 || slots > 65536 {
		return nil, names{}, fmt.Errorf("outbox slots: %d, want 1..65536", slots)
	}
	sub, err := fs.Sub(migrationFS, "migrations/outbox")
	if err != nil {
		return nil, names{}, fmt.Errorf("outbox migrations: %w", err)
	}
	m, err := migrate.New(sub, n.versions, n.replacer(slots))
	return m, n, err
}

// MigrateInbox creates or upgrades the inbox table in the consumer's database.
func MigrateInbox(ctx context.Context, pool *pgxpool.Pool, table string) error {
	n, err := parseInboxName(table)
	if err != nil {
		return err
	}
	sub, err := fs.Sub(migrationFS, "migrations/inbox")
	if err != nil {
		return fmt.Errorf("inbox migrations: %w", err)
	}
	if err := ensureSchema(ctx, pool, n.schema); err != nil {
		return err
	}
	m, err := migrate.New(sub, n.versions, n.replacer())
	if err != nil {
		return err
	}
	if _, err := m.Up(ctx, pool); err != nil {
		return fmt.Errorf("inbox migrations: %w", err)
	}
	return nil
}

// ensureSchema creates the schema of a schema-qualified table name.
func ensureSchema(ctx context.Context, pool *pgxpool.Pool, schema string) error {
	if schema == "" {
		return nil
	}
	if _, err := pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+migrate.QuoteIdent(schema)); err != nil {
		return fmt.Errorf("create schema %s: %w", schema, err)
	}
	return nil
}
