package relaycli_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/stretchr/testify/require"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/treatyhq/treaty/pkg/outbox"
)

// relayBinary builds cmd/outbox-relay into the test's temporary directory.
func relayBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "outbox-relay")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/treatyhq/treaty/cmd/outbox-relay").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return bin
}

// child is an outbox-relay process.
type child struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
	err  error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startChild(t *testing.T, bin string, env []string, args ...string) *child {
	t.Helper()
	c := &child{cmd: exec.Command(bin, args...), out: &syncBuffer{}, done: make(chan struct{})}
	c.cmd.Env = append(os.Environ(), env...)
	c.cmd.Stdout, c.cmd.Stderr = c.out, c.out
	require.NoError(t, c.cmd.Start())
	go func() { c.err = c.cmd.Wait(); close(c.done) }()
	t.Cleanup(func() {
		c.kill()
		if t.Failed() {
			t.Logf("relay pid %d output:\n%s", c.cmd.Process.Pid, tail(c.out.String(), 4000))
		}
	})
	return c
}

func (c *child) kill() {
	_ = c.cmd.Process.Signal(syscall.SIGKILL)
	<-c.done
}

func (c *child) stop(t *testing.T) {
	t.Helper()
	require.NoError(t, c.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-c.done:
		require.NoError(t, c.err, "graceful stop")
	case <-time.After(30 * time.Second):
		t.Fatal("relay did not stop within 30s of SIGTERM")
	}
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// rec is a record read back by an independent client (franz-go).
type rec struct {
	key, value, id string
}

// consumer reads topics from the start with franz-go.
type consumer struct {
	cl   *kgo.Client
	got  []rec
	next map[int32]int64 // per partition, the offset after the last record read
}

func newConsumer(t *testing.T, addrs []string, topics ...string) *consumer {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(addrs...), kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(100*time.Millisecond))
	require.NoError(t, err)
	t.Cleanup(cl.Close)
	return &consumer{cl: cl, next: map[int32]int64{}}
}

func (c *consumer) poll(d time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	c.cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
		x := rec{key: string(r.Key), value: string(r.Value)}
		for _, h := range r.Headers {
			if h.Key == outbox.HeaderMessageID {
				x.id = string(h.Value)
			}
		}
		c.got = append(c.got, x)
		c.next[r.Partition] = max(c.next[r.Partition], r.Offset+1)
	})
}

// drain reads topic up to the end offsets it has now, so everything already acknowledged by
// the broker has been read, however slowly the machine runs.
func (c *consumer) drain(t *testing.T, topic string, timeout time.Duration) {
	t.Helper()
	ends := endOffsets(t, c.cl, topic)
	deadline := time.Now().Add(timeout)
	for {
		behind := false
		for p, end := range ends {
			if c.next[p] < end {
				behind = true
			}
		}
		if !behind {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s reading %s up to %v; read up to %v", timeout, topic, ends, c.next)
		}
		c.poll(200 * time.Millisecond)
	}
}

// endOffsets asks the brokers for each partition's end (the next offset to be written).
func endOffsets(t *testing.T, cl *kgo.Client, topic string) map[int32]int64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	meta := kmsg.NewPtrMetadataRequest()
	mt := kmsg.NewMetadataRequestTopic()
	mt.Topic = kmsg.StringPtr(topic)
	meta.Topics = append(meta.Topics, mt)
	mres, err := meta.RequestWith(ctx, cl)
	require.NoError(t, err)
	require.Len(t, mres.Topics, 1)
	require.NoError(t, kerr.ErrorForCode(mres.Topics[0].ErrorCode))
	lt := kmsg.NewListOffsetsRequestTopic()
	lt.Topic = topic
	for _, p := range mres.Topics[0].Partitions {
		lp := kmsg.NewListOffsetsRequestTopicPartition()
		lp.Partition = p.Partition
		lp.Timestamp = -1 // the end
		lt.Partitions = append(lt.Partitions, lp)
	}
	req := kmsg.NewPtrListOffsetsRequest()
	req.Topics = append(req.Topics, lt)
	res, err := req.RequestWith(ctx, cl)
	require.NoError(t, err)
	ends := map[int32]int64{}
	for _, rt := range res.Topics {
		for _, rp := range rt.Partitions {
			require.NoError(t, kerr.ErrorForCode(rp.ErrorCode), "partition %d", rp.Partition)
			ends[rp.Partition] = rp.Offset
		}
	}
	require.Len(t, ends, len(mres.Topics[0].Partitions))
	return ends
}

func (c *consumer) distinct() int {
	seen := map[string]bool{}
	for _, r := range c.got {
		seen[r.id] = true
	}
	return len(seen)
}

// waitDistinct polls until n distinct ids arrived; while waiting it calls tick, if any.
func (c *consumer) waitDistinct(t *testing.T, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for c.distinct() < n {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s: %d distinct messages arrived, want %d", timeout, c.distinct(), n)
		}
		c.poll(200 * time.Millisecond)
	}
}

// checkOrder dedups by message id (first occurrence wins, as an inbox does) and counts per-key
// sequence inversions; values are "key:seq".
func checkOrder(t *testing.T, recs []rec) (distinct, inversions int) {
	t.Helper()
	seen := map[string]bool{}
	last := map[string]int{}
	for _, r := range recs {
		if seen[r.id] {
			continue
		}
		seen[r.id] = true
		i := strings.LastIndexByte(r.value, ':')
		require.Positive(t, i, "value %q", r.value)
		var seq int
		_, err := fmt.Sscan(r.value[i+1:], &seq)
		require.NoError(t, err)
		key := r.value[:i]
		if prev, ok := last[key]; ok && seq <= prev {
			inversions++
		}
		last[key] = seq
	}
	return len(seen), inversions
}

func newPool(t *testing.T, url string, maxConns int32) *pgxpool.Pool {
	t.Helper()
	cfg, err := pgxpool.ParseConfig(url)
	require.NoError(t, err)
	cfg.MaxConns = maxConns
	pool, err := pgxpool.NewWithConfig(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(pool.Close)
	return pool
}

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

func count(t *testing.T, pool *pgxpool.Pool, q string) int {
	t.Helper()
	var n int
	require.NoError(t, pool.QueryRow(context.Background(), q).Scan(&n))
	return n
}
