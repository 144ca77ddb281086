// Package migrate applies numbered SQL migrations to PostgreSQL, one transaction each, under an
// advisory lock so that two processes migrating at once do not collide.
//
// Files are named NNN_name.up.sql and NNN_name.down.sql. Applied versions are recorded in a
// table of the caller's choosing, so several independent sets (the coordinator's, the outbox's)
// can live in one database.
package migrate

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"io/fs"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Migration is one numbered step.
type Migration struct {
	Version int
	Name    string
	Up      string
	Down    string
}

// Migrator applies a set of migrations, recording them in Table.
type Migrator struct {
	migrations []Migration
	table      string // quoted identifier, possibly schema-qualified
	lockKey    int64
}

var fileRE = regexp.MustCompile(`^(\d+)_([a-z0-9_]+)\.(up|down)\.sql$`)

// New reads the migrations in fsys (top-level files only). table is the (possibly
// schema-qualified) name of the table that records applied versions; Replace, when non-nil, is
// applied to every SQL text first (for configurable schema or table names).
func New(fsys fs.FS, table string, replace func(string) string) (*Migrator, error) {
	entries, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return nil, fmt.Errorf("read migrations: %w", err)
	}
	byVersion := map[int]*Migration{}
	for _, e := range entries {
		m := fileRE.FindStringSubmatch(e.Name())
		if m == nil {
			if strings.HasSuffix(e.Name(), ".sql") {
				// A typo'd name would otherwise be skipped and its migration never run.
				return nil, fmt.Errorf("migration file %q: want NNN_name.up.sql or NNN_name.down.sql (name in [a-z0-9_])", e.Name())
			}
			continue
		}
		v, _ := strconv.Atoi(m[1])
		b, err := fs.ReadFile(fsys, e.Name())
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", e.Name(), err)
		}
		sql := string(b)
		if replace != nil {
			sql = replace(sql)
		}
		mg := byVersion[v]
		if mg != nil && ((m[3] == "up" && mg.Up != "") || (m[3] == "down" && mg.Down != "")) {
			return nil, fmt.Errorf("migration %d has two %s files (%s and another spelling)", v, m[3], e.Name())
		}
		if mg == nil {
			mg = &Migration{Version: v, Name: m[2]}
			byVersion[v] = mg
		} else if mg.Name != m[2] {
			return nil, fmt.Errorf("migration %d has two names: %q and %q", v, mg.Name, m[2])
		}
		if m[3] == "up" {
			mg.Up = sql
		} else {
			mg.Down = sql
		}
	}
	var list []Migration
	for _, m := range byVersion {
		if m.Up == "" {
			return nil, fmt.Errorf("migration %03d_%s has no .up.sql", m.Version, m.Name)
		}
		list = append(list, *m)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Version < list[j].Version })
	for i, m := range list {
		if m.Version != i+1 {
			return nil, fmt.Errorf("migrations must be numbered 1, 2, 3, ...: found %d at position %d", m.Version, i+1)
		}
	}
	h := fnv.New64a()
	_, _ = h.Write([]byte("treaty-migrate:" + table))
	return &Migrator{migrations: list, table: table, lockKey: int64(h.Sum64())}, nil
}

// Migrations lists the known migrations in order.
func (m *Migrator) Migrations() []Migration { return append([]Migration(nil), m.migrations...) }

// Latest is the highest known version.
func (m *Migrator) Latest() int { return len(m.migrations) }

// Result says what a call changed.
type Result struct {
	From, To int
	Applied  []int
}

// Up applies every migration not yet applied. Running it again is a no-op.
func (m *Migrator) Up(ctx context.Context, pool *pgxpool.Pool) (Result, error) {
	return m.To(ctx, pool, m.Latest())
}

// To migrates up or down to version target.
func (m *Migrator) To(ctx context.Context, pool *pgxpool.Pool, target int) (Result, error) {
	if target < 0 || target > m.Latest() {
		return Result{}, fmt.Errorf("target version %d out of range 0..%d", target, m.Latest())
	}
	conn, err := pool.Acquire(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("acquire connection: %w", err)
	}
	defer conn.Release()
	// A session-level advisory lock serialises concurrent migrators for this set.
	if _, err := conn.Exec(ctx, "SELECT pg_advisory_lock($1)", m.lockKey); err != nil {
		return Result{}, fmt.Errorf("advisory lock: %w", err)
	}
	defer func() {
		_, _ = conn.Exec(context.WithoutCancel(ctx), "SELECT pg_advisory_unlock($1)", m.lockKey)
	}()
	if _, err := conn.Exec(ctx, "CREATE TABLE IF NOT EXISTS "+m.table+
		" (version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"); err != nil {
		return Result{}, fmt.Errorf("create %s: %w", m.table, err)
	}
	cur, err := m.current(ctx, conn.Conn())
	if err != nil {
		return Result{}, err
	}
	res := Result{From: cur, To: cur}
	for cur < target {
		mg := m.migrations[cur]
		if err := m.apply(ctx, conn.Conn(), mg.Up, "INSERT INTO "+m.table+" (version, name) VALUES ($1, $2)", mg.Version, mg.Name); err != nil {
			return res, fmt.Errorf("migration %03d_%s up: %w", mg.Version, mg.Name, err)
		}
		cur++
		res.To = cur
		res.Applied = append(res.Applied, mg.Version)
	}
	for cur > target {
		mg := m.migrations[cur-1]
		if mg.Down == "" {
			return res, fmt.Errorf("migration %03d_%s has no .down.sql", mg.Version, mg.Name)
		}
		if err := m.apply(ctx, conn.Conn(), mg.Down, "DELETE FROM "+m.table+" WHERE version = $1 AND name = $2", mg.Version, mg.Name); err != nil {
			return res, fmt.Errorf("migration %03d_%s down: %w", mg.Version, mg.Name, err)
		}
		cur--
		res.To = cur
		res.Applied = append(res.Applied, -mg.Version)
	}
	return res, nil
}

func (m *Migrator) apply(ctx context.Context, conn *pgx.Conn, body, record string, version int, name string) error {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	if _, err := tx.Exec(ctx, body); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, record, version, name); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

func (m *Migrator) current(ctx context.Context, conn *pgx.Conn) (int, error) {
	var v int
	err := conn.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM "+m.table).Scan(&v)
	if err != nil {
		return 0, fmt.Errorf("read %s: %w", m.table, err)
	}
	if v > m.Latest() {
		return v, fmt.Errorf("database is at version %d, newer than this binary knows (%d): upgrade the binary", v, m.Latest())
	}
	return v, nil
}

// Current returns the applied version (0 when nothing or no version table exists).
func (m *Migrator) Current(ctx context.Context, pool *pgxpool.Pool) (int, error) {
	var v int
	err := pool.QueryRow(ctx, "SELECT coalesce(max(version), 0) FROM "+m.table).Scan(&v)
	if err != nil {
		var pgErr interface{ SQLState() string }
		if errors.As(err, &pgErr) && pgErr.SQLState() == "42P01" { // undefined_table
			return 0, nil
		}
		return 0, fmt.Errorf("read %s: %w", m.table, err)
	}
	return v, nil
}

// QuoteIdent quotes a possibly schema-qualified identifier ("a.b" -> "a"."b").
func QuoteIdent(name string) string {
	parts := strings.Split(name, ".")
	for i, p := range parts {
		parts[i] = `"` + strings.ReplaceAll(p, `"`, `""`) + `"`
	}
	return strings.Join(parts, ".")
}
