package outbox_test

import (
	"context"
	"database/sql"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/stretchr/testify/require"
	"go.opentelemetry.io/otel/trace"

	"github.com/treatyhq/treaty/pkg/outbox"
)

func TestEnqueueCommitAndRollback(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})

	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, outbox.Enqueue(ctx, tx, outbox.Message{Topic: "t", Key: []byte("k"), Value: []byte("gone")}))
	require.NoError(t, tx.Rollback(ctx))
	require.Zero(t, count(t, pool, "SELECT count(*) FROM treaty_outbox"), "a rolled-back transaction leaves no message")

	id := outbox.NewID()
	enqueue(t, pool,
		outbox.Message{ID: id, Topic: "t", Key: []byte("k"), Value: []byte("v"), Headers: []outbox.Header{{Key: "h", Value: []byte("1")}, {Key: "nil"}}},
		outbox.Message{Topic: "t", Value: []byte("no key")},
	)
	var gotID uuid.UUID
	var topic string
	var key, value []byte
	var slot int
	require.NoError(t, pool.QueryRow(ctx, "SELECT msg_id, topic, key, value, slot FROM treaty_outbox ORDER BY id LIMIT 1").Scan(&gotID, &topic, &key, &value, &slot))
	require.Equal(t, id, gotID)
	require.Equal(t, "t", topic)
	require.Equal(t, []byte("k"), key)
	require.Equal(t, []byte("v"), value)
	require.True(t, slot >= 0 && slot < outbox.DefaultSlots)
	require.Equal(t, 1, count(t, pool, "SELECT count(*) FROM treaty_outbox WHERE key IS NULL AND msg_id <> $1", id), "a message without a key gets an id")
	require.Equal(t, 2, count(t, pool, "SELECT count(DISTINCT xid) + 1 FROM treaty_outbox"), "one transaction, one xid")
}

func TestEnqueueValidates(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		return outbox.Enqueue(ctx, tx, outbox.Message{Key: []byte("k")})
	})
	require.ErrorContains(t, err, "topic is empty")
	_, err = outbox.New(outbox.Options{Table: "Bad-Name"})
	require.ErrorContains(t, err, "must match")
}

func TestEnqueueSQL(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()

	tx, err := db.BeginTx(ctx, nil)
	require.NoError(t, err)
	msgs := make([]outbox.Message, 1500) // more than one INSERT statement's worth
	for i := range msgs {
		msgs[i] = outbox.Message{Topic: "t", Key: []byte("k"), Value: []byte{byte(i)}}
	}
	require.NoError(t, outbox.EnqueueSQL(ctx, tx, msgs...))
	require.NoError(t, tx.Commit())
	require.Equal(t, 1500, count(t, pool, "SELECT count(*) FROM treaty_outbox"))

	tx, err = db.BeginTx(ctx, &sql.TxOptions{})
	require.NoError(t, err)
	require.NoError(t, outbox.EnqueueSQL(ctx, tx, outbox.Message{Topic: "t", Value: []byte("x")}))
	require.NoError(t, tx.Rollback())
	require.Equal(t, 1500, count(t, pool, "SELECT count(*) FROM treaty_outbox"))
}

func TestTraceContextCopiedIntoHeaders(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	kc := newKafka(t, 3, nil, "traced")
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs()})
	rd := newReader(t, kc.ListenAddrs(), "traced")

	traceID, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	spanID, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	otelCtx := trace.ContextWithSpanContext(ctx, trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: traceID, SpanID: spanID, TraceFlags: trace.FlagsSampled}))
	explicit := outbox.WithTraceContext(ctx, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "congo=t61rcWkgMzE")

	for _, c := range []struct {
		ctx context.Context
		key string
	}{{otelCtx, "otel"}, {explicit, "explicit"}, {ctx, "none"}} {
		require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			return outbox.Enqueue(c.ctx, tx, outbox.Message{Topic: "traced", Key: []byte(c.key), Value: []byte("v")})
		}))
	}
	recs := rd.waitDistinct(3, 20*time.Second)
	byKey := map[string]record{}
	for _, r := range recs {
		byKey[r.key] = r
	}
	require.Equal(t, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", byKey["otel"].headers[outbox.HeaderTraceparent])
	require.Equal(t, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", byKey["explicit"].headers[outbox.HeaderTraceparent])
	require.Equal(t, "congo=t61rcWkgMzE", byKey["explicit"].headers[outbox.HeaderTracestate])
	require.NotContains(t, byKey["none"].headers, outbox.HeaderTraceparent)
	for _, r := range recs {
		require.Equal(t, "treaty_outbox", r.headers[outbox.HeaderSource])
		_, err := uuid.Parse(r.id)
		require.NoError(t, err)
	}
}

func TestMigrateSchemaQualifiedAndIdempotent(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	opts := outbox.MigrateOptions{Table: "app.events", Slots: 16}
	pool := newPool(t, opts)
	require.NoError(t, outbox.Migrate(ctx, pool, opts), "a second run is a no-op")
	require.Equal(t, 16, count(t, pool, "SELECT count(*) FROM app.events_slot"))

	ob, err := outbox.New(outbox.Options{Table: "app.events"})
	require.NoError(t, err)
	require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		return ob.Enqueue(ctx, tx, outbox.Message{Topic: "ev", Key: []byte("a"), Value: []byte("1")})
	}))
	require.Equal(t, 1, count(t, pool, "SELECT count(*) FROM app.events WHERE slot < 16"))

	kc := newKafka(t, 2, nil, "ev")
	rd := newReader(t, kc.ListenAddrs(), "ev")
	relay := startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), Table: "app.events"})
	recs := rd.waitDistinct(1, 20*time.Second)
	require.Equal(t, "app.events", recs[0].headers[outbox.HeaderSource])
	require.NoError(t, relay.Stop(ctx))

	set, err := outbox.MigrationSet(opts)
	require.NoError(t, err)
	require.NotEmpty(t, set)
	require.Contains(t, set[0].Up, `"app"."events"`)

	// Down to zero drops everything; up again recreates it.
	require.NoError(t, outbox.MigrateDown(ctx, pool, opts, 0))
	require.Zero(t, count(t, pool, "SELECT count(*) FROM pg_tables WHERE schemaname = 'app' AND tablename LIKE 'events%' AND tablename <> 'events_migrations'"))
}
