package outbox_test

import (
	"context"
	"database/sql"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/stretchr/testify/require"
	_ "modernc.org/sqlite" // the "sqlite" database/sql driver

	"github.com/treatyhq/treaty/pkg/outbox"
)

// openSQLite opens a fresh SQLite file with the settings the package documentation recommends
// (busy timeout, WAL, BEGIN IMMEDIATE).
func openSQLite(t *testing.T) *sql.DB {
	t.Helper()
	path := filepath.Join(t.TempDir(), "service.db")
	db, err := sql.Open("sqlite", "file:"+path+"?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_txlock=immediate")
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	// The first connection turns the new file to WAL, which takes an exclusive lock that the
	// busy timeout does not cover: connections opening at that instant fail SQLITE_BUSY. One
	// connection first, as a service opens its database before starting its workers.
	require.NoError(t, db.Ping())
	return db
}

func newSQLiteOutbox(t *testing.T, db *sql.DB, table string) *outbox.SQLiteOutbox {
	t.Helper()
	o, err := outbox.NewSQLite(outbox.Options{Table: table})
	require.NoError(t, err)
	require.NoError(t, o.Migrate(context.Background(), db))
	return o
}

func enqueueSQLite(t *testing.T, db *sql.DB, o *outbox.SQLiteOutbox, commit bool, msgs ...outbox.Message) {
	t.Helper()
	ctx := context.Background()
	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	defer func() { _ = tx.Rollback() }()
	require.NoError(t, o.EnqueueSQL(ctx, tx, msgs...))
	if commit {
		require.NoError(t, tx.Commit())
	}
}

func startSQLiteRelay(t *testing.T, cfg outbox.SQLiteRelayConfig) *outbox.SQLiteRelay {
	t.Helper()
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 20 * time.Millisecond
	}
	if cfg.Backoff == 0 {
		cfg.Backoff, cfg.MaxBackoff = 10*time.Millisecond, 50*time.Millisecond
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 3 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	r, err := outbox.NewSQLiteRelay(cfg)
	require.NoError(t, err)
	require.NoError(t, r.Start(context.Background()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		require.NoError(t, r.Stop(ctx))
	})
	return r
}

func sqliteCount(t *testing.T, db *sql.DB, query string, args ...any) int {
	t.Helper()
	var n int
	require.NoError(t, db.QueryRowContext(context.Background(), query, args...).Scan(&n))
	return n
}

// Committed messages leave in order per key, partitioned as the Java client would, with the
// relay's headers after the caller's; a rolled-back transaction leaves nothing.
func TestSQLiteRelayPublishesCommittedMessagesInKeyOrder(t *testing.T) {
	t.Parallel()
	db := openSQLite(t)
	o := newSQLiteOutbox(t, db, "")
	kc := newKafka(t, 4, nil, "trips")
	rd := newReader(t, kc.ListenAddrs(), "trips")

	rolledBack := outbox.Message{ID: uuid.Must(uuid.NewV7()), Topic: "trips", Key: []byte("k0"), Value: []byte("k0:999")}
	enqueueSQLite(t, db, o, false, rolledBack)
	const keys, perKey = 5, 20
	for seq := range perKey {
		var msgs []outbox.Message
		for k := range keys {
			m := seqMsg("trips", fmt.Sprintf("k%d", k), seq)
			m.Headers = []outbox.Header{{Key: "app", Value: []byte("demo")}}
			msgs = append(msgs, m)
		}
		enqueueSQLite(t, db, o, true, msgs...)
	}
	r := startSQLiteRelay(t, outbox.SQLiteRelayConfig{DB: db, Brokers: kc.ListenAddrs(), BatchSize: 7})
	r.Wake()

	recs := rd.waitDistinct(keys*perKey, 20*time.Second)
	require.Len(t, dedup(recs), keys*perKey)
	requireKeyOrder(t, dedup(recs))
	for _, rec := range recs {
		require.NotEqual(t, rolledBack.ID.String(), rec.id, "a rolled-back message never leaves")
		require.Equal(t, "demo", rec.headers["app"])
		require.Equal(t, outbox.DefaultTable, rec.headers[outbox.HeaderSource])
		require.EqualValues(t, outbox.PartitionFor([]byte(rec.key), 4), rec.partition, "key %s", rec.key)
	}
	waitFor(t, 10*time.Second, "sent rows deleted (no retention)", func() bool {
		return sqliteCount(t, db, "SELECT count(*) FROM treaty_outbox") == 0
	})
}

// With a retention the rows stay, marked sent; messages written while the relay runs leave
// too.
func TestSQLiteRelayRetentionAndLiveTraffic(t *testing.T) {
	t.Parallel()
	db := openSQLite(t)
	o := newSQLiteOutbox(t, db, "events_outbox")
	kc := newKafka(t, 2, nil, "events")
	rd := newReader(t, kc.ListenAddrs(), "events")
	r := startSQLiteRelay(t, outbox.SQLiteRelayConfig{DB: db, Brokers: kc.ListenAddrs(), Table: "events_outbox", Retention: time.Hour})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := range 25 {
				enqueueSQLite(t, db, o, true, seqMsg("events", fmt.Sprintf("w%d", w), seq))
				r.Wake()
			}
		}()
	}
	wg.Wait()
	recs := rd.waitDistinct(100, 20*time.Second)
	requireKeyOrder(t, dedup(recs))
	for _, rec := range recs {
		require.Equal(t, "events_outbox", rec.headers[outbox.HeaderSource])
	}
	waitFor(t, 10*time.Second, "every row marked sent", func() bool {
		return sqliteCount(t, db, "SELECT count(*) FROM events_outbox WHERE sent_at IS NOT NULL") == 100
	})
}

// A message the broker cannot take (unknown topic) is retried, counted, and marked dead after
// MaxAttempts; the messages behind it then go.
func TestSQLiteRelayMarksAMessageDeadAfterMaxAttempts(t *testing.T) {
	t.Parallel()
	db := openSQLite(t)
	o := newSQLiteOutbox(t, db, "")
	kc := newKafka(t, 1, nil, "good")
	rd := newReader(t, kc.ListenAddrs(), "good")
	bad := outbox.Message{ID: uuid.Must(uuid.NewV7()), Topic: "no-such-topic", Key: []byte("x"), Value: []byte("lost")}
	enqueueSQLite(t, db, o, true, bad)
	enqueueSQLite(t, db, o, true, seqMsg("good", "a", 1), seqMsg("good", "a", 2))
	startSQLiteRelay(t, outbox.SQLiteRelayConfig{DB: db, Brokers: kc.ListenAddrs(), MaxAttempts: 3})

	rd.waitDistinct(2, 20*time.Second)
	var attempts int
	var lastError string
	var deadAt sql.NullInt64
	require.NoError(t, db.QueryRow("SELECT attempts, last_error, dead_at FROM treaty_outbox WHERE msg_id = $1", bad.ID.String()).
		Scan(&attempts, &lastError, &deadAt))
	require.Equal(t, 3, attempts)
	require.Contains(t, lastError, "no-such-topic")
	require.True(t, deadAt.Valid, "marked dead")
	waitFor(t, 10*time.Second, "the good rows deleted", func() bool {
		return sqliteCount(t, db, "SELECT count(*) FROM treaty_outbox") == 1
	})
}

func TestSQLiteOutboxMigrateAndNames(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := openSQLite(t)
	o, err := outbox.NewSQLite(outbox.Options{})
	require.NoError(t, err)
	require.Equal(t, outbox.DefaultTable, o.Table())
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		go func() { defer wg.Done(); errs[i] = o.Migrate(ctx, db) }()
	}
	wg.Wait()
	for _, err := range errs {
		require.NoError(t, err, "concurrent migrations apply each step once")
	}
	require.Equal(t, 1, sqliteCount(t, db, "SELECT count(*) FROM treaty_outbox_migrations"))

	_, err = outbox.NewSQLite(outbox.Options{Table: "app.outbox"})
	require.ErrorContains(t, err, "cannot be schema-qualified")
	_, err = outbox.NewSQLite(outbox.Options{Table: "Bad-Name"})
	require.ErrorContains(t, err, "must match")
	require.ErrorContains(t, outbox.MigrateInboxSQLite(ctx, db, "a.b"), "cannot be schema-qualified")

	_, err = outbox.NewSQLiteRelay(outbox.SQLiteRelayConfig{Brokers: []string{"x:1"}})
	require.ErrorContains(t, err, "DB is required")
	r, err := outbox.NewSQLiteRelay(outbox.SQLiteRelayConfig{DB: db, Brokers: []string{"127.0.0.1:1"}, Table: "missing"})
	require.NoError(t, err)
	require.ErrorContains(t, r.Start(ctx), "did SQLiteOutbox.Migrate run?")
	require.NoError(t, r.Stop(ctx))
}

// Inbox.ProcessSQL works on a SQLite inbox table: a message id is applied once.
func TestSQLiteInboxAppliesOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	db := openSQLite(t)
	require.NoError(t, outbox.MigrateInboxSQLite(ctx, db, "notify_inbox"))
	require.NoError(t, outbox.MigrateInboxSQLite(ctx, db, "notify_inbox"), "idempotent")
	_, err := db.Exec("CREATE TABLE applied (id TEXT NOT NULL)")
	require.NoError(t, err)
	in, err := outbox.NewInbox("notify_inbox")
	require.NoError(t, err)

	process := func(id string, fail error) (bool, error) {
		tx, err := db.BeginTx(ctx, nil)
		require.NoError(t, err)
		defer func() { _ = tx.Rollback() }()
		ran, err := in.ProcessSQL(ctx, tx, id, func(ctx context.Context) error {
			if _, err := tx.ExecContext(ctx, "INSERT INTO applied (id) VALUES ($1)", id); err != nil {
				return err
			}
			return fail
		})
		if err != nil {
			return ran, err
		}
		return ran, tx.Commit()
	}
	ran, err := process("m1", fmt.Errorf("consumer crashed"))
	require.True(t, ran)
	require.Error(t, err)
	ran, err = process("m1", nil)
	require.NoError(t, err)
	require.True(t, ran, "a failed apply is rolled back with its inbox row, so the redelivery runs")
	ran, err = process("m1", nil)
	require.NoError(t, err)
	require.False(t, ran, "a duplicate is skipped")
	require.Equal(t, 1, sqliteCount(t, db, "SELECT count(*) FROM applied"))

	n, err := in.PruneSQLite(ctx, db, time.Hour)
	require.NoError(t, err)
	require.Zero(t, n, "recent ids are kept")
	_, err = db.Exec("UPDATE notify_inbox SET processed_at = processed_at - $1", (2 * time.Hour).Microseconds())
	require.NoError(t, err)
	n, err = in.PruneSQLite(ctx, db, time.Hour)
	require.NoError(t, err)
	require.EqualValues(t, 1, n)
}
