package main

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jackc/pgx/v5/stdlib"
	_ "modernc.org/sqlite" // the "sqlite" database/sql driver

	"github.com/treatyhq/treaty/pkg/outbox"
	"github.com/treatyhq/treaty/sdk/participant"
)

// backend says where the services, the consumer and the coordinator keep their state: SQLite
// files in a directory (the embedded run) or schemas of one PostgreSQL database (--db).
type backend struct {
	dir     string // SQLite: the state directory
	pgURL   string // PostgreSQL: the database URL
	brokers []string
	log     *slog.Logger
}

func (b *backend) postgres() bool { return b.pgURL != "" }

// schema is the PostgreSQL schema of a service or of the consumer.
func schema(name string) string { return "travel_" + name }

// sqlitePath is the SQLite file of a service, of the consumer or of the coordinator.
func (b *backend) sqlitePath(name string) string { return filepath.Join(b.dir, name+".db") }

// sqliteDSN opens a SQLite file for one process with many goroutines: WAL, a busy timeout,
// BEGIN IMMEDIATE transactions (the barrier's recommendation), synchronous=NORMAL (WAL keeps
// commits atomic; a power cut may lose the last ones, which is fine for a demo).
func sqliteDSN(path string) string {
	return "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=synchronous(NORMAL)&_txlock=immediate"
}

// openSQL opens the database/sql handle of name (and, for PostgreSQL, the pgx pool under it,
// with search_path set to name's schema so that the business SQL needs no schema names).
func (b *backend) openSQL(ctx context.Context, name string) (*sql.DB, *pgxpool.Pool, error) {
	if !b.postgres() {
		db, err := sql.Open("sqlite", sqliteDSN(b.sqlitePath(name)))
		if err != nil {
			return nil, nil, err
		}
		// One connection: SQLite has one writer anyway, and database/sql hands the connection
		// over without the busy-timeout polling that several writers would cause.
		db.SetMaxOpenConns(1)
		if err := db.PingContext(ctx); err != nil {
			_ = db.Close()
			return nil, nil, fmt.Errorf("open %s: %w", b.sqlitePath(name), err)
		}
		return db, nil, nil
	}
	cfg, err := pgxpool.ParseConfig(b.pgURL)
	if err != nil {
		return nil, nil, fmt.Errorf("--db: %w", err)
	}
	cfg.ConnConfig.RuntimeParams["search_path"] = schema(name)
	cfg.MaxConns = 8
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, nil, err
	}
	if _, err := pool.Exec(ctx, "CREATE SCHEMA IF NOT EXISTS "+schema(name)); err != nil {
		pool.Close()
		return nil, nil, fmt.Errorf("create schema %s: %w", schema(name), err)
	}
	return stdlib.OpenDBFromPool(pool), pool, nil
}

// resetPostgres drops the demo's schemas so that a run starts from the seeded inventories.
// Only the demo's own schemas (travel_*) are touched; the coordinator's tables stay.
func (b *backend) resetPostgres(ctx context.Context) error {
	pool, err := pgxpool.New(ctx, b.pgURL)
	if err != nil {
		return fmt.Errorf("--db: %w", err)
	}
	defer pool.Close()
	for _, name := range []string{"flight", "hotel", "car", "notifications"} {
		if _, err := pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+schema(name)+" CASCADE"); err != nil {
			return fmt.Errorf("reset schema %s: %w", schema(name), err)
		}
	}
	return nil
}

// relay is what both outbox relays offer.
type relay interface {
	Start(ctx context.Context) error
	Stop(ctx context.Context) error
}

// serviceState is one lifetime of a service's storage, from start to crash or stop: its
// database, barrier, outbox and the relay that empties the outbox.
type serviceState struct {
	db          *sql.DB
	pool        *pgxpool.Pool // PostgreSQL only
	barrier     *participant.Barrier
	outbox      enqueuer
	outboxTable string
	relay       relay
	wake        func()
}

// serviceStore holds a service's current storage; nil while the service is down.
type serviceStore struct {
	name string
	be   *backend
	mu   sync.RWMutex
	st   *serviceState
}

func (s *serviceStore) current() *serviceState {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.st
}

// start opens the database, creates the tables (idempotently: a restart finds them) and starts
// the relay.
func (s *serviceStore) start(ctx context.Context) error {
	st, err := s.be.openService(ctx, s.name)
	if err != nil {
		return fmt.Errorf("%s service storage: %w", s.name, err)
	}
	s.mu.Lock()
	s.st = st
	s.mu.Unlock()
	return nil
}

// stop stops the relay and closes the database, as a crash of the service's process would
// (minus the relay's in-flight batch, which a real crash would leave to be published again).
func (s *serviceStore) stop(ctx context.Context) error {
	s.mu.Lock()
	st := s.st
	s.st = nil
	s.mu.Unlock()
	if st == nil {
		return nil
	}
	err := st.relay.Stop(ctx)
	err = errors.Join(err, st.db.Close())
	if st.pool != nil {
		st.pool.Close()
	}
	return err
}

func (b *backend) openService(ctx context.Context, name string) (*serviceState, error) {
	db, pool, err := b.openSQL(ctx, name)
	if err != nil {
		return nil, err
	}
	st := &serviceState{db: db, pool: pool}
	fail := func(err error) (*serviceState, error) {
		_ = db.Close()
		if pool != nil {
			pool.Close()
		}
		return nil, err
	}
	dialect := participant.DialectSQLite
	if b.postgres() {
		dialect = participant.DialectPostgres
	}
	if st.barrier, err = participant.NewBarrier(participant.BarrierOptions{Dialect: dialect}); err != nil {
		return fail(err)
	}
	if err := st.barrier.EnsureTableSQL(ctx, db); err != nil {
		return fail(err)
	}
	for _, stmt := range strings.Split(inventorySchema, ";") {
		if _, err := db.ExecContext(ctx, stmt); err != nil {
			return fail(fmt.Errorf("create inventory tables: %w", err))
		}
	}
	// Sent rows are kept for a day (marked sent) so that the demo, and its test, can compare
	// what left each outbox with what the consumer applied.
	const retention = 24 * time.Hour
	logger := b.log.With("service", name)
	if !b.postgres() {
		ob, err := outbox.NewSQLite(outbox.Options{})
		if err != nil {
			return fail(err)
		}
		if err := ob.Migrate(ctx, db); err != nil {
			return fail(err)
		}
		r, err := outbox.NewSQLiteRelay(outbox.SQLiteRelayConfig{DB: db, Brokers: b.brokers, PollInterval: 100 * time.Millisecond,
			Backoff: 50 * time.Millisecond, MaxBackoff: time.Second, Retention: retention, Logger: logger})
		if err != nil {
			return fail(err)
		}
		st.outbox, st.outboxTable, st.relay, st.wake = ob, ob.Table(), r, r.Wake
	} else {
		table := schema(name) + "." + outbox.DefaultTable
		ob, err := outbox.New(outbox.Options{Table: table})
		if err != nil {
			return fail(err)
		}
		if err := outbox.Migrate(ctx, pool, outbox.MigrateOptions{Table: table, Slots: 16}); err != nil {
			return fail(err)
		}
		r, err := outbox.NewRelay(outbox.RelayConfig{Pool: pool, Brokers: b.brokers, Table: table, PollInterval: 200 * time.Millisecond,
			LeaseTTL: 3 * time.Second, StatsInterval: time.Second, Retention: retention, Logger: logger})
		if err != nil {
			return fail(err)
		}
		// The PostgreSQL relay wakes on LISTEN/NOTIFY by itself.
		st.outbox, st.outboxTable, st.relay, st.wake = ob, table, r, func() {}
	}
	if err := st.relay.Start(ctx); err != nil {
		return fail(fmt.Errorf("start the %s outbox relay: %w", name, err))
	}
	return st, nil
}

// seed fills a service's inventory on first start; a restart keeps what is there.
func seed(ctx context.Context, db *sql.DB, items []item) error {
	for _, it := range items {
		if _, err := db.ExecContext(ctx, `INSERT INTO inventory (item, description, capacity, available) VALUES ($1, $2, $3, $3)
			ON CONFLICT (item) DO NOTHING`, it.ID, it.Description, it.Capacity); err != nil {
			return fmt.Errorf("seed %s: %w", it.ID, err)
		}
	}
	return nil
}

// item is one line of a service's inventory.
type item struct {
	ID          string `json:"id"`
	Description string `json:"description"`
	Capacity    int    `json:"capacity"`
}
