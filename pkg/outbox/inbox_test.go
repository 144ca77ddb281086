package outbox_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"github.com/segmentio/kafka-go"
	"github.com/stretchr/testify/require"

	"github.com/treatyhq/treaty/pkg/outbox"
)

func TestInboxAppliesEachMessageOnce(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	require.NoError(t, outbox.MigrateInbox(ctx, pool, "consumer.inbox"))
	require.NoError(t, outbox.MigrateInbox(ctx, pool, "consumer.inbox"))
	_, err := pool.Exec(ctx, "CREATE TABLE consumer.totals (k text PRIMARY KEY, n int NOT NULL)")
	require.NoError(t, err)
	in, err := outbox.NewInbox("consumer.inbox")
	require.NoError(t, err)

	apply := func(id string) (bool, error) {
		var ran bool
		err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			var err error
			ran, err = in.Process(ctx, tx, id, func(ctx context.Context) error {
				_, err := tx.Exec(ctx, "INSERT INTO consumer.totals VALUES ('a', 1) ON CONFLICT (k) DO UPDATE SET n = totals.n + 1")
				return err
			})
			return err
		})
		return ran, err
	}
	ran, err := apply("m1")
	require.NoError(t, err)
	require.True(t, ran)
	ran, err = apply("m1")
	require.NoError(t, err)
	require.False(t, ran, "a duplicate is skipped")

	// Concurrent duplicates: one applies, the others wait for it and skip.
	var wg sync.WaitGroup
	var applied atomic.Int64
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ran, err := apply("m2")
			if err != nil {
				t.Errorf("apply: %v", err)
			}
			if ran {
				applied.Add(1)
			}
		}()
	}
	wg.Wait()
	require.Equal(t, int64(1), applied.Load())
	require.Equal(t, 2, count(t, pool, "SELECT n FROM consumer.totals WHERE k = 'a'"))

	// A failed apply rolls back with its record, so a redelivery applies it.
	boom := errors.New("boom")
	err = pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		_, err := in.Process(ctx, tx, "m3", func(context.Context) error { return boom })
		return err
	})
	require.ErrorIs(t, err, boom)
	ran, err = apply("m3")
	require.NoError(t, err)
	require.True(t, ran)

	// database/sql
	db := stdlib.OpenDBFromPool(pool)
	defer db.Close()
	for i, want := range []bool{true, false} {
		tx, err := db.BeginTx(ctx, nil)
		require.NoError(t, err)
		ran, err := in.ProcessSQL(ctx, tx, "m4", func(context.Context) error { return nil })
		require.NoError(t, err)
		require.Equal(t, want, ran, "round %d", i)
		require.NoError(t, tx.Commit())
	}
	_, err = in.Process(ctx, nil, "", nil)
	require.ErrorIs(t, err, outbox.ErrNoMessageID)

	n, err := in.Prune(ctx, pool, -time.Hour)
	require.NoError(t, err)
	require.Equal(t, int64(4), n)

	id, ok := outbox.MessageID(kafka.Message{Headers: []kafka.Header{{Key: outbox.HeaderMessageID, Value: []byte("x")}}})
	require.True(t, ok)
	require.Equal(t, "x", id)
}
