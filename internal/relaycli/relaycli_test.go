package relaycli_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/treatyhq/treaty/internal/pgtest"
	"github.com/treatyhq/treaty/internal/relaycli"
	"github.com/treatyhq/treaty/pkg/outbox"
)

func env(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

func TestCommandsInProcess(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	url := pgtest.NewDatabase(t)
	var out, errb bytes.Buffer

	require.Equal(t, 0, relaycli.Main(ctx, []string{"help"}, env(nil), &out, &errb))
	require.Contains(t, out.String(), "outbox-relay migrate")
	require.Equal(t, 0, relaycli.Main(ctx, []string{"--help"}, env(nil), &out, &errb))
	require.Contains(t, errb.String(), "TREATY_BROKERS")
	require.Equal(t, 2, relaycli.Main(ctx, []string{"frobnicate"}, env(nil), &out, &errb))
	errb.Reset()
	require.Equal(t, 1, relaycli.Main(ctx, []string{"--brokers", "x:1"}, env(nil), &out, &errb))
	require.Contains(t, errb.String(), "--db is required")
	errb.Reset()
	require.Equal(t, 1, relaycli.Main(ctx, []string{"run"}, env(map[string]string{"TREATY_POLL_INTERVAL": "soon"}), &out, &errb))
	require.Contains(t, errb.String(), `TREATY_POLL_INTERVAL="soon"`)

	// The environment stands in for flags.
	out.Reset()
	e := env(map[string]string{"TREATY_DB": url, "TREATY_OUTBOX_TABLE": "app.ob"})
	require.Equal(t, 0, relaycli.Main(ctx, []string{"migrate", "--inbox-table", "app.inbox"}, e, &out, &errb), errb.String())
	require.Contains(t, out.String(), "outbox table app.ob is up to date")
	require.Contains(t, out.String(), "inbox table app.inbox is up to date")
	require.Equal(t, 0, relaycli.Main(ctx, []string{"migrate"}, e, &out, &errb), "idempotent")

	out.Reset()
	require.Equal(t, 0, relaycli.Main(ctx, []string{"dead-letters", "list"}, e, &out, &errb), errb.String())
	require.Contains(t, out.String(), "0 dead letters")
	errb.Reset()
	require.Equal(t, 1, relaycli.Main(ctx, []string{"dead-letters", "requeue", outbox.NewID().String()}, e, &out, &errb))
	require.Contains(t, errb.String(), "no dead letter with id")
}

var metricsRE = regexp.MustCompile(`msg="metrics listening" addr=(\S+)`)

func TestRunServesMetricsAndStopsOnCancel(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	url := pgtest.NewDatabase(t)
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(2, "ev"))
	require.NoError(t, err)
	defer kc.Close()
	var out bytes.Buffer
	logs := &syncBuffer{}
	require.Equal(t, 0, relaycli.Main(ctx, []string{"migrate", "--db", url}, env(nil), &out, logs))

	done := make(chan int, 1)
	go func() {
		done <- relaycli.Main(ctx, []string{"--db", url, "--brokers", strings.Join(kc.ListenAddrs(), ","),
			"--metrics-addr", "127.0.0.1:0", "--poll-interval", "100ms"}, env(nil), io.Discard, logs)
	}()
	var addr string
	waitFor(t, 20*time.Second, "metrics address", func() bool {
		m := metricsRE.FindStringSubmatch(logs.String())
		if m != nil {
			addr = m[1]
		}
		return m != nil
	})
	pool := newPool(t, url, 2)
	require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		return outbox.Enqueue(ctx, tx, outbox.Message{Topic: "ev", Key: []byte("k"), Value: []byte("k:1")})
	}))
	scrape := func() string {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err != nil {
			return ""
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	waitFor(t, 20*time.Second, "published metric", func() bool {
		return strings.Contains(scrape(), `treaty_outbox_published_total{topic="ev"} 1`)
	})
	m := scrape()
	for _, name := range []string{"treaty_outbox_backlog_messages", "treaty_outbox_oldest_unsent_age_seconds",
		"treaty_outbox_slots_owned 256", "treaty_outbox_batch_size_bucket", "treaty_outbox_live_relays 1",
		"treaty_outbox_enqueue_to_ack_seconds_bucket", "go_goroutines"} {
		require.Contains(t, m, name)
	}
	cancel()
	select {
	case code := <-done:
		require.Equal(t, 0, code, logs.String())
	case <-time.After(30 * time.Second):
		t.Fatal("relay did not stop after cancel")
	}
	require.Zero(t, count(t, pool, "SELECT count(*) FROM treaty_outbox_slot WHERE owner IS NOT NULL"), "slots released on stop")
}

// A relay killed with SIGKILL after the broker acknowledged a batch and before marking it:
// after a restart nothing is lost, the only duplicates are that batch's, and an inbox applies
// each message once.
func TestCrashBetweenPublishAndMark(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	bin := relayBinary(t)
	url := pgtest.NewDatabase(t)
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(4, "ev"))
	require.NoError(t, err)
	defer kc.Close()
	brokers := strings.Join(kc.ListenAddrs(), ",")
	require.Equal(t, 0, relaycli.Main(ctx, []string{"migrate", "--db", url, "--inbox-table", "inbox"}, env(nil), io.Discard, io.Discard))
	pool := newPool(t, url, 4)

	const keys, perKey, batch = 20, 25, 100
	for seq := range perKey {
		var msgs []outbox.Message
		for k := range keys {
			msgs = append(msgs, outbox.Message{Topic: "ev", Key: []byte(fmt.Sprintf("k%d", k)), Value: []byte(fmt.Sprintf("k%d:%d", k, seq))})
		}
		require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return outbox.Enqueue(ctx, tx, msgs...) }))
	}
	args := []string{"--db", url, "--brokers", brokers, "--metrics-addr", "", "--batch-size", fmt.Sprint(batch), "--lease-ttl", "1s"}
	crashing := startChild(t, bin, []string{relaycli.EnvCrashAt + "=after-publish", relaycli.EnvCrashAfterBatches + "=2"}, args...)
	select {
	case <-crashing.done:
	case <-time.After(60 * time.Second):
		t.Fatal("relay did not reach its crash point")
	}
	ws, ok := crashing.cmd.ProcessState.Sys().(syscall.WaitStatus)
	require.True(t, ok)
	require.True(t, ws.Signaled() && ws.Signal() == syscall.SIGKILL, "exit: %v\n%s", crashing.err, crashing.out.String())
	// The batches before the crash point were marked; the interrupted one is in the topic and
	// still in the outbox. (How many rows a batch holds depends on what was committed below
	// the server's xmin when it read, so count rather than assume.)
	remaining := count(t, pool, "SELECT count(*) FROM treaty_outbox")
	require.Less(t, remaining, keys*perKey, "batches before the crash point were marked")
	c := newConsumer(t, kc.ListenAddrs(), "ev")
	c.waitDistinct(t, keys*perKey-remaining+1, 20*time.Second)
	c.drain(t, "ev", 60*time.Second) // everything the dead relay published was acknowledged before it died
	var ids []string
	for _, r := range c.got {
		ids = append(ids, r.id)
	}
	var interrupted int
	require.NoError(t, pool.QueryRow(ctx, "SELECT count(*) FROM treaty_outbox WHERE msg_id::text = ANY($1)", ids).Scan(&interrupted))
	require.Positive(t, interrupted, "the interrupted batch was published but not marked")
	require.LessOrEqual(t, interrupted, batch)

	restarted := startChild(t, bin, nil, args...)
	c.waitDistinct(t, keys*perKey, 60*time.Second)
	waitFor(t, 20*time.Second, "outbox emptied", func() bool { return count(t, pool, "SELECT count(*) FROM treaty_outbox") == 0 })
	restarted.stop(t)
	c.drain(t, "ev", 60*time.Second)

	distinct, inversions := checkOrder(t, c.got)
	require.Equal(t, keys*perKey, distinct, "nothing lost")
	require.Zero(t, inversions)
	require.Equal(t, interrupted, len(c.got)-distinct, "duplicates only from the interrupted batch")

	// An idempotent consumer: every delivery goes through the inbox; each id applies once.
	_, err = pool.Exec(ctx, "CREATE TABLE applied (value text PRIMARY KEY)")
	require.NoError(t, err)
	in, err := outbox.NewInbox("inbox")
	require.NoError(t, err)
	var applied int
	for _, r := range c.got {
		require.NoError(t, pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
			ran, err := in.Process(ctx, tx, r.id, func(ctx context.Context) error {
				_, err := tx.Exec(ctx, "INSERT INTO applied VALUES ($1)", r.value)
				return err
			})
			if ran {
				applied++
			}
			return err
		}))
	}
	require.Equal(t, keys*perKey, applied)
	require.Equal(t, keys*perKey, count(t, pool, "SELECT count(*) FROM applied"))
}

// Three relay processes share 100,000 messages over 1,000 keys while they are killed with
// SIGKILL and restarted: nothing is lost and no key's order is inverted after deduplication.
func TestThreeRelaysKilledAndRestarted(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	bin := relayBinary(t)
	url := pgtest.NewDatabase(t)
	kc, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.SeedTopics(12, "ev"))
	require.NoError(t, err)
	defer kc.Close()
	brokers := strings.Join(kc.ListenAddrs(), ",")
	require.Equal(t, 0, relaycli.Main(ctx, []string{"migrate", "--db", url}, env(nil), io.Discard, io.Discard))
	pool := newPool(t, url, 8)
	c := newConsumer(t, kc.ListenAddrs(), "ev")

	const total, keys, perTx, writers = 100_000, 1000, 100, 4
	args := []string{"--db", url, "--brokers", brokers, "--metrics-addr", "", "--lease-ttl", "1s",
		"--poll-interval", "200ms", "--db-max-conns", "4", "--log-level", "warn"}
	var mu sync.Mutex
	relays := make([]*child, 3)
	for i := range relays {
		relays[i] = startChild(t, bin, nil, append(args, "--relay-id", fmt.Sprintf("r%d", i))...)
	}

	// Writers: each transaction carries perTx messages of random keys; a key's sequence number
	// is taken under a per-writer partition of the keys so that sequence order is enqueue order.
	start := time.Now()
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			seq := map[int]int{}
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			for range total / writers / perTx {
				msgs := make([]outbox.Message, perTx)
				for i := range msgs {
					k := w + writers*rng.IntN(keys/writers) // writer w owns keys ≡ w (mod writers)
					seq[k]++
					msgs[i] = outbox.Message{Topic: "ev", Key: []byte(fmt.Sprintf("key-%d", k)), Value: []byte(fmt.Sprintf("key-%d:%d", k, seq[k]))}
				}
				if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return outbox.Enqueue(ctx, tx, msgs...) }); err != nil {
					t.Errorf("enqueue: %v", err)
					return
				}
			}
		}()
	}

	// The killer: every 500 ms a random relay dies by SIGKILL and a new one takes its place.
	// Half of the replacements also carry the crash point, so that some deaths fall exactly
	// between a batch's publish and its mark; those are restarted when found dead.
	stopKiller := make(chan struct{})
	killerDone := make(chan struct{})
	kills := 0
	go func() {
		defer close(killerDone)
		tick := time.NewTicker(500 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-stopKiller:
				return
			case <-tick.C:
			}
			mu.Lock()
			i := rand.IntN(len(relays))
			relays[i].kill()
			for j, r := range relays {
				select {
				case <-r.done:
				default:
					continue
				}
				var crashEnv []string
				if rand.IntN(2) == 0 {
					crashEnv = []string{relaycli.EnvCrashAt + "=after-publish", fmt.Sprintf("%s=%d", relaycli.EnvCrashAfterBatches, 3+rand.IntN(20))}
				}
				relays[j] = startChild(t, bin, crashEnv, append(args, "--relay-id", fmt.Sprintf("r%d-%d", j, kills))...)
				kills++
			}
			mu.Unlock()
		}
	}()
	wg.Wait()
	// Keep killing until most messages are through, so kills land mid-stream, then let it drain.
	deadline := time.Now().Add(80 * time.Second)
	for c.distinct() < total*9/10 && time.Now().Before(deadline) {
		c.poll(200 * time.Millisecond)
	}
	close(stopKiller)
	<-killerDone
	// A relay without a crash point, so that the drain never depends on one that will die.
	mu.Lock()
	relays = append(relays, startChild(t, bin, nil, append(args, "--relay-id", "r-final")...))
	mu.Unlock()
	c.waitDistinct(t, total, time.Until(deadline)+5*time.Second)
	elapsed := time.Since(start)

	distinct, inversions := checkOrder(t, c.got)
	t.Logf("100k messages, 3 relays, %d SIGKILLs and restarts: %d records, %d distinct, %d duplicates, %d inversions, %s",
		kills, len(c.got), distinct, len(c.got)-distinct, inversions, elapsed.Round(time.Millisecond))
	require.Equal(t, total, distinct, "messages lost")
	require.Zero(t, inversions, "per-key order inverted")
	require.Positive(t, kills)
	mu.Lock()
	defer mu.Unlock()
	for i, r := range relays {
		select {
		case <-r.done: // died at its crash point after the killer stopped
			relays[i] = nil
		default:
			r.stop(t)
		}
	}
}
