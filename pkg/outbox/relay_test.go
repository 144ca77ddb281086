package outbox_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/segmentio/kafka-go"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/treatyhq/treaty/pkg/outbox"
)

// Kafka's own vectors (UtilsTest.testMurmur2) with toPositive applied: the Java client puts a
// key on partition positive(murmur2(key)) % partitions.
func TestPartitioningMatchesJavaClient(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		key      []byte
		positive uint32
	}{
		{[]byte("21"), 1173551340},
		{[]byte("foobar"), 1357151166},
		{[]byte{12, 42, 56, 24, 109, 111}, 274204207},
		{[]byte("a-little-bit-long-string"), 1161502112},
		{[]byte("a-little-bit-longer-string"), 661178819},
		{[]byte("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"), 2088585677},
		{[]byte("abc"), 479470107},
	} {
		for _, n := range []int{1, 3, 7, 12, 100} {
			require.Equal(t, int(c.positive%uint32(n)), outbox.PartitionFor(c.key, n), "key %q, %d partitions", c.key, n)
		}
	}
	// An independent implementation: franz-go's Kafka-compatible hasher.
	p := kgo.StickyKeyPartitioner(nil).ForTopic("t")
	for i := range 2000 {
		key := []byte(fmt.Sprintf("key-%d-%x", i, rand.Uint64()))
		n := 1 + i%50
		require.Equal(t, p.Partition(&kgo.Record{Key: key}, n), outbox.PartitionFor(key, n))
	}
}

func TestRelayDeliversInKeyOrderOnJavaPartitions(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	kc := newKafka(t, 6, nil, "orders", "payments")
	rd := newReader(t, kc.ListenAddrs(), "orders", "payments")
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), BatchSize: 100})

	const keys, perKey = 40, 25
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for seq := range perKey {
				var msgs []outbox.Message
				for k := w; k < keys; k += 4 {
					topic := "orders"
					if k%3 == 0 {
						topic = "payments"
					}
					msgs = append(msgs, seqMsg(topic, fmt.Sprintf("key-%d", k), seq))
				}
				require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return outbox.Enqueue(ctx, tx, msgs...) }))
			}
		}()
	}
	wg.Wait()
	recs := rd.waitDistinct(keys*perKey, 30*time.Second)
	requireKeyOrder(t, dedup(recs))
	for _, r := range recs {
		require.Equal(t, int32(outbox.PartitionFor([]byte(r.key), 6)), r.partition, "key %s", r.key)
	}
	waitFor(t, 10*time.Second, "outbox emptied", func() bool { return count(t, pool, "SELECT count(*) FROM treaty_outbox") == 0 })
}

// A transaction that enqueues first and commits last must neither be skipped nor overtaken by
// a later transaction's message of the same key.
func TestLongOpenTransactionIsNotSkipped(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	kc := newKafka(t, 3, nil, "acct")
	rd := newReader(t, kc.ListenAddrs(), "acct")
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), PollInterval: 50 * time.Millisecond})

	enqueue(t, pool, seqMsg("acct", "warmup", 0))
	rd.waitDistinct(1, 20*time.Second) // the relay is running

	long, err := pool.Begin(ctx)
	require.NoError(t, err)
	defer func() { _ = long.Rollback(ctx) }()
	require.NoError(t, outbox.Enqueue(ctx, long, seqMsg("acct", "k", 1)))

	enqueue(t, pool, seqMsg("acct", "k", 2)) // starts later, commits first
	enqueue(t, pool, seqMsg("acct", "other", 1))

	// While the long transaction is open, nothing written after it may leave: a relay that read
	// by a serial column alone would publish k:2 now and skip k:1 (or send it out of order).
	rd.poll(1500 * time.Millisecond)
	require.Equal(t, 1, distinct(rd.records()), "messages written after the open transaction left early")

	require.NoError(t, long.Commit(ctx))
	recs := dedup(rd.waitDistinct(4, 20*time.Second))
	var order []string
	for _, r := range recs {
		if r.key == "k" {
			order = append(order, r.value)
		}
	}
	require.Equal(t, []string{"k:1", "k:2"}, order)
}

func TestRolledBackTransactionNeverPublished(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	kc := newKafka(t, 2, nil, "rb")
	rd := newReader(t, kc.ListenAddrs(), "rb")
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs()})

	tx, err := pool.Begin(ctx)
	require.NoError(t, err)
	require.NoError(t, outbox.Enqueue(ctx, tx, seqMsg("rb", "k", 1), seqMsg("rb", "k", 2)))
	require.NoError(t, tx.Rollback(ctx))
	enqueue(t, pool, seqMsg("rb", "k", 3))

	recs := rd.waitDistinct(1, 20*time.Second)
	rd.poll(500 * time.Millisecond)
	recs = rd.records()
	require.Len(t, dedup(recs), 1)
	require.Equal(t, "k:3", recs[0].value)
}

type countingObserver struct {
	outbox.NopObserver
	published, tempFailed, failed, dead atomic.Int64
	backlog                             atomic.Int64
}

func (o *countingObserver) BatchPublished(b outbox.PublishedBatch) {
	o.published.Add(int64(len(b.Messages)))
}

func (o *countingObserver) PublishFailed(_ string, n int, temporary bool, _ error) {
	if temporary {
		o.tempFailed.Add(int64(n))
	} else {
		o.failed.Add(int64(n))
	}
}
func (o *countingObserver) DeadLettered(string, uuid.UUID, string) { o.dead.Add(1) }
func (o *countingObserver) Backlog(n int64, _ time.Duration)       { o.backlog.Store(n) }

func TestPoisonMessageIsDeadLetteredAndOtherKeysFlow(t *testing.T) {
	t.Parallel()
	for _, policy := range []outbox.DeadLetterPolicy{outbox.BlockKey, outbox.SkipAhead} {
		t.Run(policy.String(), func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			pool := newPool(t, outbox.MigrateOptions{})
			// The broker refuses record batches over 4 KB; the relay's own limit is higher, so
			// the poison is sent and refused by the broker, together with its neighbours.
			kc := newKafka(t, 2, []kfake.Opt{kfake.BrokerConfigs(map[string]string{"message.max.bytes": "4096"})}, "ev", "dlq")
			rd := newReader(t, kc.ListenAddrs(), "ev", "dlq")
			obs := &countingObserver{}
			startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), MaxAttempts: 3,
				RetryBackoff: 20 * time.Millisecond, DeadLetterPolicy: policy, DeadLetterTopic: "dlq", Observer: obs})

			var batch []outbox.Message
			for k := range 10 {
				batch = append(batch, seqMsg("ev", fmt.Sprintf("k%d", k), 1))
			}
			poison := outbox.Message{ID: outbox.NewID(), Topic: "ev", Key: []byte("poison"), Value: make([]byte, 8000)}
			batch = append(batch[:5], append([]outbox.Message{poison}, batch[5:]...)...)
			// A message to a topic that does not exist fails the same way and goes to the topic.
			lost := outbox.Message{ID: outbox.NewID(), Topic: "no-such-topic", Key: []byte("lost"), Value: []byte("x")}
			batch = append(batch, lost)
			enqueue(t, pool, batch...)
			enqueue(t, pool, seqMsg("ev", "poison", 2), seqMsg("ev", "k0", 2))

			waitFor(t, 20*time.Second, "two dead letters", func() bool { return obs.dead.Load() == 2 })
			dl, err := outbox.NewDeadLetters(pool, "")
			require.NoError(t, err)
			list, err := dl.List(ctx, 10)
			require.NoError(t, err)
			require.Len(t, list, 2)
			byID := map[uuid.UUID]outbox.DeadLetter{}
			for _, d := range list {
				byID[d.ID] = d
				require.Equal(t, 3, d.Attempts)
				require.Equal(t, policy == outbox.BlockKey, d.Blocking)
			}
			require.Contains(t, byID[poison.ID].Error, "too large")
			require.Contains(t, byID[lost.ID].Error, "no-such-topic")

			// Every other key arrived; the dead-letter topic has the missing-topic message (the
			// poison is too large for it too, which the dead-letter row records).
			want := 11 // k0..k9 at 1, k0 at 2
			if policy == outbox.SkipAhead {
				want++ // poison:2 goes ahead
			}
			recs := rd.waitDistinct(want+1, 20*time.Second)
			var dlq []record
			for _, r := range dedup(recs) {
				if r.topic == "dlq" {
					dlq = append(dlq, r)
				}
			}
			require.Len(t, dlq, 1)
			require.Equal(t, lost.ID.String(), dlq[0].id)
			require.Equal(t, "no-such-topic", dlq[0].headers[outbox.HeaderDeadLetterTopic])
			require.Contains(t, byID[poison.ID].Error, "dead-letter topic")
			var ev []record
			for _, r := range dedup(recs) {
				if r.topic == "ev" {
					ev = append(ev, r)
				}
			}
			requireKeyOrder(t, ev)

			if policy == outbox.BlockKey {
				rd.poll(500 * time.Millisecond)
				for _, r := range rd.records() {
					require.NotEqual(t, "poison:2", r.value, "a blocked key went ahead")
				}
				require.Equal(t, 1, count(t, pool, "SELECT count(*) FROM treaty_outbox WHERE key = 'poison'"))
				// The operator discards the poison: the key flows again.
				ok, err := dl.Discard(ctx, poison.ID)
				require.NoError(t, err)
				require.True(t, ok)
				recs = rd.waitDistinct(want+2, 20*time.Second)
			}
			var poisonVals []string
			for _, r := range dedup(recs) {
				if r.key == "poison" {
					poisonVals = append(poisonVals, r.value)
				}
			}
			require.Equal(t, []string{"poison:2"}, poisonVals)
		})
	}
}

func TestRequeuedDeadLetterKeepsItsPlace(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	kc := newKafka(t, 1, nil, "ev")
	rd := newReader(t, kc.ListenAddrs(), "ev")
	obs := &countingObserver{}
	// The topic is refused until the fault is removed: a permanent error, counted.
	fault := kc.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: "ev", Err: kerr.InvalidRecord, Count: -1})
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), MaxAttempts: 2, RetryBackoff: 10 * time.Millisecond, Observer: obs})
	enqueue(t, pool, seqMsg("ev", "k", 1))
	enqueue(t, pool, seqMsg("ev", "k", 2), seqMsg("ev", "k", 3))
	waitFor(t, 20*time.Second, "dead letter", func() bool { return obs.dead.Load() >= 1 })
	fault.Remove()
	dl, err := outbox.NewDeadLetters(pool, "")
	require.NoError(t, err)
	list, err := dl.List(ctx, 10)
	require.NoError(t, err)
	require.Len(t, list, 1)
	require.Equal(t, "k:1", string(list[0].Value))
	ok, err := dl.Requeue(ctx, list[0].ID)
	require.NoError(t, err)
	require.True(t, ok)
	recs := dedup(rd.waitDistinct(3, 20*time.Second))
	require.Equal(t, []string{"k:1", "k:2", "k:3"}, []string{recs[0].value, recs[1].value, recs[2].value})
}

func TestBrokerFaultsLoseNothing(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{})
	kc := newKafka(t, 4, nil, "ev")
	rd := newReader(t, kc.ListenAddrs(), "ev")
	obs := &countingObserver{}
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), Observer: obs, BatchSize: 50})

	// Produce requests fail with a retriable error until removed.
	fault := kc.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Err: kerr.NotEnoughReplicas, Count: -1})
	for seq := range 20 {
		var msgs []outbox.Message
		for k := range 10 {
			msgs = append(msgs, seqMsg("ev", fmt.Sprintf("k%d", k), seq))
		}
		enqueue(t, pool, msgs...)
	}
	waitFor(t, 20*time.Second, "temporary failures", func() bool { return obs.tempFailed.Load() > 0 })
	waitFor(t, 20*time.Second, "backlog reported", func() bool { return obs.backlog.Load() == 200 })
	require.Zero(t, obs.failed.Load(), "temporary failures must not count towards dead-lettering")
	fault.Remove()
	recs := rd.waitDistinct(200, 30*time.Second)
	requireKeyOrder(t, dedup(recs))
	waitFor(t, 10*time.Second, "backlog drained", func() bool { return obs.backlog.Load() == 0 })
	require.Zero(t, obs.dead.Load())
	_ = ctx
}

// The broker goes away entirely (process stopped) and comes back on the same port with its data.
func TestBrokerRestartLosesNothing(t *testing.T) {
	t.Parallel()
	pool := newPool(t, outbox.MigrateOptions{})
	dir := t.TempDir()
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(3, "ev"), kfake.DataDir(dir))
	require.NoError(t, err)
	addrs := kc.ListenAddrs()
	var port int
	_, err = fmt.Sscanf(addrs[0][len("127.0.0.1:"):], "%d", &port)
	require.NoError(t, err)
	obs := &countingObserver{}
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: addrs, Observer: obs, WriteTimeout: time.Second})

	for seq := range 10 {
		enqueue(t, pool, seqMsg("ev", "a", seq), seqMsg("ev", "b", seq))
	}
	waitFor(t, 20*time.Second, "first messages published", func() bool { return obs.published.Load() == 20 })
	kc.Close()
	for seq := 10; seq < 30; seq++ {
		enqueue(t, pool, seqMsg("ev", "a", seq), seqMsg("ev", "b", seq))
	}
	waitFor(t, 20*time.Second, "failures while the broker is down", func() bool { return obs.tempFailed.Load() > 0 })
	require.Equal(t, 40, count(t, pool, "SELECT count(*) FROM treaty_outbox"), "the backlog waits in the table")

	kc2, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.Ports(port), kfake.DataDir(dir))
	require.NoError(t, err)
	t.Cleanup(kc2.Close)
	rd := newReader(t, kc2.ListenAddrs(), "ev")
	recs := rd.waitDistinct(60, 40*time.Second)
	requireKeyOrder(t, dedup(recs))
	waitFor(t, 10*time.Second, "outbox emptied", func() bool { return count(t, pool, "SELECT count(*) FROM treaty_outbox") == 0 })
}

func TestSlotsRebalanceAcrossRelays(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{Slots: 32})
	kc := newKafka(t, 3, nil, "ev")
	rd := newReader(t, kc.ListenAddrs(), "ev")
	cfg := outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), LeaseTTL: time.Second}
	a := startRelay(t, cfg)
	require.Equal(t, 32, a.HeldSlots(), "a relay alone takes every slot")
	b := startRelay(t, cfg)
	waitFor(t, 10*time.Second, "an even split", func() bool { return a.HeldSlots() == 16 && b.HeldSlots() == 16 })
	require.Equal(t, 32, count(t, pool, "SELECT count(DISTINCT slot) FROM treaty_outbox_slot WHERE owner IS NOT NULL AND expires_at > now()"))

	for seq := range 20 {
		var msgs []outbox.Message
		for k := range 20 {
			msgs = append(msgs, seqMsg("ev", fmt.Sprintf("k%d", k), seq))
		}
		enqueue(t, pool, msgs...)
	}
	rd.waitDistinct(400, 20*time.Second)

	// A graceful stop hands the slots over at once.
	require.NoError(t, a.Stop(ctx))
	require.Zero(t, count(t, pool, "SELECT count(*) FROM treaty_outbox_slot WHERE owner = $1", a.ID()))
	waitFor(t, 10*time.Second, "b takes every slot", func() bool { return b.HeldSlots() == 32 })
	enqueue(t, pool, seqMsg("ev", "k0", 100))
	recs := rd.waitDistinct(401, 20*time.Second)
	requireKeyOrder(t, dedup(recs))
}

// A relay whose slots were taken over after publishing must not mark the rows: the new owner
// publishes them again (duplicates, dropped by id), and nothing is lost.
func TestFencedMarkAfterLeaseLoss(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool := newPool(t, outbox.MigrateOptions{Slots: 8})
	kc := newKafka(t, 2, nil, "ev")
	rd := newReader(t, kc.ListenAddrs(), "ev")
	var stolen atomic.Bool
	steal := func() {
		if stolen.CompareAndSwap(false, true) {
			// Another owner takes every slot between publish and mark.
			if _, err := pool.Exec(ctx, "UPDATE treaty_outbox_slot SET owner = 'intruder', epoch = epoch + 1, expires_at = now() + interval '1 second'"); err != nil {
				t.Errorf("steal slots: %v", err) // not require: this runs on the relay's goroutine
			}
		}
	}
	enqueue(t, pool, seqMsg("ev", "k", 1), seqMsg("ev", "k", 2))
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), LeaseTTL: time.Second, AfterPublish: steal})
	rd.waitDistinct(2, 20*time.Second)
	waitFor(t, 10*time.Second, "slots stolen after publishing", stolen.Load)
	// The rows stay until the relay takes the slots back after the intruder's lease expires.
	waitFor(t, 20*time.Second, "republished", func() bool { rd.poll(100 * time.Millisecond); return len(rd.records()) >= 4 })
	recs := rd.records()
	require.Equal(t, []string{"k:1", "k:2"}, []string{dedup(recs)[0].value, dedup(recs)[1].value})
	waitFor(t, 10*time.Second, "outbox emptied", func() bool { return count(t, pool, "SELECT count(*) FROM treaty_outbox") == 0 })
}

func TestRetentionKeepsSentRows(t *testing.T) {
	t.Parallel()
	pool := newPool(t, outbox.MigrateOptions{})
	kc := newKafka(t, 1, nil, "ev")
	rd := newReader(t, kc.ListenAddrs(), "ev")
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), Retention: time.Hour})
	enqueue(t, pool, seqMsg("ev", "k", 1))
	rd.waitDistinct(1, 20*time.Second)
	waitFor(t, 10*time.Second, "row marked sent", func() bool {
		return count(t, pool, "SELECT count(*) FROM treaty_outbox WHERE sent_at IS NOT NULL") == 1
	})
}

func TestIdleRelayIsWokenByNotify(t *testing.T) {
	t.Parallel()
	pool := newPool(t, outbox.MigrateOptions{})
	kc := newKafka(t, 1, nil, "ev")
	rd := newReader(t, kc.ListenAddrs(), "ev")
	// Polling alone would take a minute: a quick delivery proves the notification woke it.
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), PollInterval: time.Minute})
	waitFor(t, 10*time.Second, "relay idle", func() bool {
		return count(t, pool, "SELECT count(*) FROM treaty_outbox_relay WHERE idle") == 1
	})
	start := time.Now()
	enqueue(t, pool, seqMsg("ev", "k", 1))
	rd.waitDistinct(1, 10*time.Second)
	require.Less(t, time.Since(start), 5*time.Second)
}

func TestRelayConfigValidation(t *testing.T) {
	t.Parallel()
	_, err := outbox.NewRelay(outbox.RelayConfig{Brokers: []string{"x:1"}})
	require.ErrorContains(t, err, "Pool is required")
	_, err = outbox.ParseDeadLetterPolicy("drop")
	require.ErrorContains(t, err, "want block or skip")
	_ = kafka.Message{}
}

// liveObserver records the live relays a relay last reported.
type liveObserver struct {
	outbox.NopObserver
	live atomic.Int64
}

func (o *liveObserver) Slots(_, _, live int) { o.live.Store(int64(live)) }

// live_relays counts relays that beat: one killed a moment ago (its heartbeat row not expired
// yet, but no beat for more than half a lease) no longer counts.
func TestLiveRelaysCountsOnlyBeatingRelays(t *testing.T) {
	t.Parallel()
	pool := newPool(t, outbox.MigrateOptions{Slots: 8})
	kc := newKafka(t, 1, nil, "ev")
	obs := &liveObserver{}
	startRelay(t, outbox.RelayConfig{Pool: pool, Brokers: kc.ListenAddrs(), LeaseTTL: 3 * time.Second, Observer: obs})
	waitFor(t, 20*time.Second, "one live relay", func() bool { return obs.live.Load() == 1 })
	// Two relays that were killed: their rows expire in a minute, their last beat was 2s ago.
	_, err := pool.Exec(context.Background(), `INSERT INTO treaty_outbox_relay (relay_id, heartbeat_at, expires_at)
		VALUES ('killed-1', now() - interval '2 seconds', now() + interval '1 minute'),
		       ('killed-2', now() - interval '2 seconds', now() + interval '1 minute')`)
	require.NoError(t, err)
	// And one that beats: counted.
	_, err = pool.Exec(context.Background(), `INSERT INTO treaty_outbox_relay (relay_id, heartbeat_at, expires_at)
		VALUES ('beating', now() + interval '1 minute', now() + interval '1 minute')`)
	require.NoError(t, err)
	waitFor(t, 20*time.Second, "the relay and the beating one, not the killed ones", func() bool { return obs.live.Load() == 2 })
	require.Never(t, func() bool { return obs.live.Load() != 2 }, 3*time.Second, 100*time.Millisecond)
}
