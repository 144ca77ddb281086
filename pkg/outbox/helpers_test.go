package outbox_test

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.uber.org/goleak"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/pkg/outbox"
)

func TestMain(m *testing.M) {
	code := pgtest.WrapTestMain(m)
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// newPool returns a pool on a fresh database with the outbox tables migrated.
func newPool(t *testing.T, opts outbox.MigrateOptions) *pgxpool.Pool {
	t.Helper()
	ctx := context.Background()
	cfg, err := pgxpool.ParseConfig(pgtest.NewDatabase(t))
	require.NoError(t, err)
	cfg.MaxConns = 8
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	require.NoError(t, outbox.Migrate(ctx, pool, opts))
	return pool
}

// newKafka starts an in-process Kafka-protocol broker with the topics seeded.
func newKafka(t *testing.T, partitions int32, opts []kfake.Opt, topics ...string) *kfake.Cluster {
	t.Helper()
	c, err := kfake.NewCluster(append([]kfake.Opt{kfake.NumBrokers(1), kfake.SeedTopics(partitions, topics...)}, opts...)...)
	require.NoError(t, err)
	t.Cleanup(c.Close)
	return c
}

func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Helper()
	w.t.Log(string(p))
	return len(p), nil
}

// startRelay starts a relay with test-friendly timings; it is stopped at the end of the test.
func startRelay(t *testing.T, cfg outbox.RelayConfig) *outbox.Relay {
	t.Helper()
	if cfg.PollInterval == 0 {
		cfg.PollInterval = 200 * time.Millisecond
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = 2 * time.Second
	}
	if cfg.StatsInterval == 0 {
		cfg.StatsInterval = 200 * time.Millisecond
	}
	if cfg.BrokerBackoff == 0 {
		cfg.BrokerBackoff = 20 * time.Millisecond
		cfg.MaxBrokerBackoff = 200 * time.Millisecond
	}
	if cfg.WriteTimeout == 0 {
		cfg.WriteTimeout = 3 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	r, err := outbox.NewRelay(cfg)
	require.NoError(t, err)
	require.NoError(t, r.Start(context.Background()))
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		require.NoError(t, r.Stop(ctx))
	})
	return r
}

// record is a message read back from the broker by an independent client (franz-go).
type record struct {
	topic     string
	partition int32
	offset    int64
	key       string
	value     string
	headers   map[string]string
	id        string
}

// reader consumes topics from the start with franz-go, independently of the relay's kafka-go.
type reader struct {
	t   *testing.T
	cl  *kgo.Client
	mu  sync.Mutex
	got []record
}

func newReader(t *testing.T, addrs []string, topics ...string) *reader {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(100*time.Millisecond))
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	return &reader{t: t, cl: cl}
}

// poll reads what arrives within d.
func (r *reader) poll(d time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	fs := r.cl.PollFetches(ctx)
	fs.EachRecord(func(rec *kgo.Record) {
		hs := map[string]string{}
		for _, h := range rec.Headers {
			hs[h.Key] = string(h.Value)
		}
		r.mu.Lock()
		r.got = append(r.got, record{topic: rec.Topic, partition: rec.Partition, offset: rec.Offset, key: string(rec.Key),
			value: string(rec.Value), headers: hs, id: hs[outbox.HeaderMessageID]})
		r.mu.Unlock()
	})
}

// waitDistinct polls until n distinct message ids arrived, or fails after timeout.
func (r *reader) waitDistinct(n int, timeout time.Duration) []record {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		recs := r.records()
		if distinct(recs) >= n {
			return recs
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("timed out after %s: %d distinct messages arrived, want %d", timeout, distinct(recs), n)
		}
		r.poll(200 * time.Millisecond)
	}
}

func (r *reader) records() []record {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]record(nil), r.got...)
}

func distinct(recs []record) int {
	seen := map[string]bool{}
	for _, r := range recs {
		seen[r.id] = true
	}
	return len(seen)
}

// dedup keeps the first occurrence of each message id, as an inbox would.
func dedup(recs []record) []record {
	seen := map[string]bool{}
	var out []record
	for _, r := range recs {
		if !seen[r.id] {
			seen[r.id] = true
			out = append(out, r)
		}
	}
	return out
}

// waitFor polls cond until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-deadline.C:
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		case <-tick.C:
		}
	}
}

func enqueue(t *testing.T, pool *pgxpool.Pool, msgs ...outbox.Message) {
	t.Helper()
	err := pgx.BeginFunc(context.Background(), pool, func(tx pgx.Tx) error {
		return outbox.Enqueue(context.Background(), tx, msgs...)
	})
	require.NoError(t, err)
}

func count(t *testing.T, pool *pgxpool.Pool, query string, args ...any) int {
	t.Helper()
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), query, args...).Scan(&n))
	return n
}

// seqMsg is message number seq of key, with the sequence in the value for order checks.
func seqMsg(topic, key string, seq int) outbox.Message {
	return outbox.Message{ID: uuid.Must(uuid.NewV7()), Topic: topic, Key: []byte(key), Value: []byte(fmt.Sprintf("%s:%d", key, seq))}
}

// requireKeyOrder checks that, per key, values arrive with increasing sequence numbers.
func requireKeyOrder(t *testing.T, recs []record) {
	t.Helper()
	last := map[string]int{}
	for _, r := range recs {
		var key string
		var seq int
		_, err := fmt.Sscanf(replaceColon(r.value), "%s %d", &key, &seq)
		require.NoError(t, err, "value %q", r.value)
		if prev, ok := last[r.topic+"/"+key]; ok {
			require.Greater(t, seq, prev, "key %s: %d arrived after %d", key, seq, prev)
		}
		last[r.topic+"/"+key] = seq
	}
}

func replaceColon(s string) string {
	b := []byte(s)
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == ':' {
			b[i] = ' '
			break
		}
	}
	return string(b)
}
