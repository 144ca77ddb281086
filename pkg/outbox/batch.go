package outbox

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/segmentio/kafka-go"
)

// linger is the pause after a small batch.
const linger = 3 * time.Millisecond

// errTemporary marks a batch that hit a temporary failure: the relay backs off.
var errTemporary = errors.New("temporary publish failure")

// batchLoop reads, publishes and marks batches until ctx ends. An idle relay announces it in
// its relay row, so that writers' commits notify it, and waits for a notification or the poll.
func (r *Relay) batchLoop(ctx context.Context) {
	var backoff, quick time.Duration
	idle := false
	setIdle := func(v bool) {
		if _, err := r.cfg.Pool.Exec(ctx, "UPDATE "+r.n.relays+" SET idle = $2 WHERE relay_id = $1", r.cfg.ID, v); err != nil {
			if ctx.Err() == nil {
				r.log.Warn("relay: record idle state", "err", err)
			}
			return
		}
		idle = v
	}
	defer func() {
		if err := r.waitMark(); err != nil {
			r.log.Warn("relay: " + err.Error() + "; another relay publishes them again")
		}
		if idle {
			setIdle(false)
		}
	}()
	for ctx.Err() == nil {
		if r.releasePending() {
			// A released slot's rows must be marked while the slot is still ours.
			if err := r.waitMark(); err != nil {
				r.log.Warn("relay: " + err.Error())
			}
			r.applyReleases(ctx)
		}
		slots, epochs := r.readable()
		if len(slots) == 0 {
			if !r.sleep(ctx, r.cfg.PollInterval, true) {
				return
			}
			continue
		}
		n, err := r.batch(ctx, slots, epochs)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			backoff = min(max(2*backoff, r.cfg.BrokerBackoff), r.cfg.MaxBrokerBackoff)
			r.log.Warn("relay: batch failed; backing off", "err", err, "retry_in", backoff)
			if !r.sleep(ctx, backoff, false) {
				return
			}
			continue
		}
		backoff = 0
		if n > 0 {
			quick = 0
			if idle {
				setIdle(false)
			}
			if n < r.cfg.BatchSize/4 {
				// A small batch: let a few milliseconds of messages gather rather than pay a
				// read, a produce and a write for a handful each time.
				if !r.sleep(ctx, linger, false) {
					return
				}
			}
			continue
		}
		if r.pending != nil {
			// Nothing new, but the last batch's mark may still be in flight: wait for it, so
			// that rows it failed to mark are read again rather than excluded.
			if err := r.waitMark(); err != nil {
				r.log.Warn("relay: " + err.Error())
			}
			continue
		}
		if !idle {
			// Read once more after announcing idleness: a commit that checked the flag just
			// before it was set is then found by this read rather than waiting for the poll.
			setIdle(true)
			continue
		}
		wait := r.cfg.PollInterval
		if r.pendingAboveWatermark(ctx) {
			// Committed rows wait for an older transaction to end; look again soon.
			quick = min(max(2*quick, 2*time.Millisecond), r.cfg.PollInterval)
			wait = quick
		} else {
			quick = 0
		}
		if !r.sleep(ctx, wait, true) {
			return
		}
	}
}

func (r *Relay) pendingAboveWatermark(ctx context.Context) bool {
	var pending bool
	err := r.cfg.Pool.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+r.n.table+
		" WHERE sent_at IS NULL AND xid >= pg_snapshot_xmin(pg_current_snapshot()))").Scan(&pending)
	return err == nil && pending
}

type outRow struct {
	id        int64
	msgID     uuid.UUID
	topic     string
	key       []byte
	value     []byte
	headers   []byte
	slot      int32
	attempts  int
	lastError *string
	createdAt time.Time

	msg     kafka.Message
	sent    bool  // given to the broker in this batch
	err     error // outcome when sent, or why it was not sendable
	counted bool  // a failure that counts towards MaxAttempts
}

func (o *outRow) keyID() string {
	if o.key == nil {
		return "" // no key, no order to keep
	}
	return o.topic + "\x00" + string(o.key)
}

// batch reads up to BatchSize committed unsent rows of the given slots, in (xid, id) order,
// publishes them and records the outcome, fenced by the slots' epochs. The batch in flight
// finishes even when ctx ends.
func (r *Relay) batch(ctx context.Context, slots []int32, epochs []int64) (int, error) {
	var markErr error
	if r.pending != nil {
		select {
		case <-r.pending.finished:
			markErr = r.waitMark() // done: its rows are no longer excluded from the read
		default:
		}
	}
	rows, err := r.read(ctx, slots)
	if err != nil || len(rows) == 0 {
		return 0, errors.Join(err, markErr)
	}
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*r.cfg.WriteTimeout+10*time.Second)
	defer cancel()

	start := time.Now()
	r.publish(fctx, rows)
	acked := time.Now()

	var ok, failed []*outRow
	var tempErr error
	for _, o := range rows {
		switch {
		case !o.sent && o.err == nil:
			// deferred to a later batch to keep its key's order
		case o.err == nil:
			ok = append(ok, o)
		case temporary(o.err) && !o.counted:
			tempErr = o.err
		default:
			failed = append(failed, o)
		}
	}
	if len(ok) > 0 {
		// One mark in flight at a time: the previous batch's must be done before this one's
		// starts. It runs while the next batch is read and published.
		markErr = errors.Join(markErr, r.waitMark())
	}
	if len(ok) > 0 && r.cfg.AfterPublish != nil {
		r.cfg.AfterPublish()
	}
	if len(ok) > 0 {
		r.startMark(ctx, ok, slots, epochs)
		b := PublishedBatch{Messages: make([]PublishedMessage, len(ok)), Duration: acked.Sub(start), AckedAt: acked}
		for i, o := range ok {
			b.Messages[i] = PublishedMessage{ID: o.msgID, Topic: o.topic, CreatedAt: o.createdAt}
		}
		r.obs.BatchPublished(b)
	}
	if len(failed) > 0 {
		if err := r.recordFailures(fctx, failed, slots, epochs); err != nil {
			return len(rows), fmt.Errorf("record %d failed messages: %w", len(failed), err)
		}
	}
	if tempErr != nil {
		n := 0
		for _, o := range rows {
			if o.err != nil && temporary(o.err) && !o.counted {
				n++
			}
		}
		r.obs.PublishFailed("", n, true, tempErr)
		return len(rows), fmt.Errorf("%w: %d messages: %w", errTemporary, n, tempErr)
	}
	return len(rows), markErr
}

// markJob is a batch's mark-sent write, in flight while the next batch is read and published.
// Only the batch loop touches Relay.pending.
type markJob struct {
	ids      map[int64]bool
	done     chan error
	finished chan struct{} // closed with done's value sent
}

func (r *Relay) startMark(ctx context.Context, ok []*outRow, slots []int32, epochs []int64) {
	job := &markJob{ids: make(map[int64]bool, len(ok)), done: make(chan error, 1), finished: make(chan struct{})}
	for _, o := range ok {
		job.ids[o.id] = true
	}
	mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.cfg.WriteTimeout+10*time.Second)
	go func() {
		defer cancel()
		job.done <- r.markSent(mctx, ok, slots, epochs)
		close(job.finished)
	}()
	r.pending = job
}

// waitMark waits for the mark in flight, if any. A failed mark leaves the rows unsent: they
// are published again (duplicates, dropped by id) after the relay backs off.
func (r *Relay) waitMark() error {
	if r.pending == nil {
		return nil
	}
	err := <-r.pending.done
	n := len(r.pending.ids)
	r.pending = nil
	if err != nil {
		return fmt.Errorf("mark %d messages sent: %w", n, err)
	}
	return nil
}

func (r *Relay) pendingCount() int {
	if r.pending == nil {
		return 0
	}
	return len(r.pending.ids)
}

func (r *Relay) read(ctx context.Context, slots []int32) ([]*outRow, error) {
	rows, err := r.cfg.Pool.Query(ctx, `SELECT o.id, o.msg_id, o.topic, o.key, o.value, o.headers, o.slot, o.attempts, o.last_error, o.created_at
FROM `+r.n.table+` o
WHERE o.sent_at IS NULL
  AND o.xid < pg_snapshot_xmin(pg_current_snapshot())
  AND o.slot = ANY($1)
  AND (o.available_at IS NULL OR o.available_at <= now())
  AND NOT EXISTS (SELECT 1 FROM `+r.n.holds+` h
                  WHERE h.slot = o.slot AND h.topic = o.topic AND h.key = o.key AND (h.until IS NULL OR h.until > now()))
ORDER BY o.xid, o.id
LIMIT $2`, slots, r.cfg.BatchSize+r.pendingCount())
	if err != nil {
		return nil, fmt.Errorf("read outbox: %w", err)
	}
	defer rows.Close()
	var out []*outRow
	for rows.Next() {
		o := &outRow{}
		if err := rows.Scan(&o.id, &o.msgID, &o.topic, &o.key, &o.value, &o.headers, &o.slot, &o.attempts, &o.lastError, &o.createdAt); err != nil {
			return nil, fmt.Errorf("read outbox: %w", err)
		}
		if r.pending != nil && r.pending.ids[o.id] {
			continue // sent by the previous batch, whose mark is in flight
		}
		if len(out) < r.cfg.BatchSize {
			out = append(out, o)
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("read outbox: %w", err)
	}
	return out, nil
}

// heldSlots is an array of the slots still held with the epochs this batch read them under,
// computed once per statement (an InitPlan), not per row. Marking sent needs no lock on them: a
// row is only marked after its message was acknowledged, so even a write that races a takeover
// records the truth; the failure path, which changes what a new owner would do, locks them
// (see recordFailures).
func (r *Relay) heldSlots() string {
	return "ARRAY(SELECT s.slot FROM " + r.n.slots + " s JOIN unnest($2::int[], $3::bigint[]) AS h(slot, epoch)" +
		" ON h.slot = s.slot AND h.epoch = s.epoch WHERE s.owner = $4)"
}

func (r *Relay) markSent(ctx context.Context, ok []*outRow, slots []int32, epochs []int64) error {
	ids := make([]int64, len(ok))
	var suspects []uuid.UUID
	for i, o := range ok {
		ids[i] = o.id
		if o.lastError != nil {
			suspects = append(suspects, o.msgID)
		}
	}
	q := "DELETE FROM " + r.n.table + " WHERE id = ANY($1) AND slot = ANY(" + r.heldSlots() + ")"
	if r.cfg.Retention > 0 {
		q = "UPDATE " + r.n.table + " SET sent_at = now() WHERE id = ANY($1) AND slot = ANY(" + r.heldSlots() + ")"
	}
	tag, err := r.cfg.Pool.Exec(ctx, q, ids, slots, epochs, r.cfg.ID)
	if err != nil {
		return err
	}
	if n := tag.RowsAffected(); n < int64(len(ids)) {
		// Another relay took some of the slots: it publishes those messages again, and
		// consumers drop the duplicates by message id.
		r.log.Warn("relay: lease lost during batch; some sent messages were not marked", "marked", n, "sent", len(ids))
	}
	if len(suspects) > 0 {
		if _, err := r.cfg.Pool.Exec(ctx, "DELETE FROM "+r.n.holds+" WHERE msg_id = ANY($1)", suspects); err != nil {
			return err
		}
	}
	return nil
}

// recordFailures counts attempts, holds the failed messages' keys back until their retry, and
// moves messages out of attempts to the dead-letter table (and topic).
func (r *Relay) recordFailures(ctx context.Context, failed []*outRow, slots []int32, epochs []int64) error {
	type outcome struct {
		o        *outRow
		attempts int
		dead     bool
	}
	var outs []outcome
	var dead []*outRow
	for _, o := range failed {
		a := o.attempts
		if o.counted {
			a++
		}
		oc := outcome{o: o, attempts: min(a, r.cfg.MaxAttempts), dead: a >= r.cfg.MaxAttempts}
		outs = append(outs, oc)
		if oc.dead {
			dead = append(dead, o)
		}
		r.obs.PublishFailed(o.topic, 1, false, o.err)
	}
	dltFailed := map[*outRow]error{}
	if len(dead) > 0 && r.cfg.DeadLetterTopic != "" {
		dltFailed = r.publishDeadLetters(ctx, dead)
	}

	tx, err := r.cfg.Pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer func() { _ = tx.Rollback(context.WithoutCancel(ctx)) }()
	// FOR SHARE keeps a claim by another relay from slipping in before these changes commit.
	// Rows are locked in slot order, as everywhere (see lockOwned).
	valid := map[int32]bool{}
	rows, err := tx.Query(ctx, "SELECT s.slot FROM "+r.n.slots+" s JOIN unnest($1::int[], $2::bigint[]) AS h(slot, epoch)"+
		" ON h.slot = s.slot AND h.epoch = s.epoch WHERE s.owner = $3 ORDER BY s.slot FOR SHARE OF s", slots, epochs, r.cfg.ID)
	if err != nil {
		return err
	}
	for rows.Next() {
		var s int32
		if err := rows.Scan(&s); err != nil {
			rows.Close()
			return err
		}
		valid[s] = true
	}
	if err := rows.Err(); err != nil {
		return err
	}
	var deadLettered []outcome
	for _, oc := range outs {
		o := oc.o
		if !valid[o.slot] {
			continue // fenced: the slot's new owner retries it
		}
		msg := o.err.Error()
		if dErr, ok := dltFailed[o]; ok {
			msg = fmt.Sprintf("%s; dead-letter topic %q: %v", msg, r.cfg.DeadLetterTopic, dErr)
			if temporary(dErr) {
				oc.dead = false // dead-lettered on a later attempt, once the topic takes it
			}
		}
		if oc.dead {
			blocking := o.key != nil && r.cfg.DeadLetterPolicy == BlockKey
			if _, err := tx.Exec(ctx, "INSERT INTO "+r.n.dead+" (id, xid, msg_id, topic, key, value, headers, created_at, attempts, error, blocking)"+
				" SELECT id, xid, msg_id, topic, key, value, headers, created_at, $2, $3, $4 FROM "+r.n.table+" WHERE id = $1", o.id, oc.attempts, msg, blocking); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, "DELETE FROM "+r.n.table+" WHERE id = $1", o.id); err != nil {
				return err
			}
			if o.key != nil {
				if blocking {
					if err := r.hold(ctx, tx, o, nil, "dead-lettered: "+msg); err != nil {
						return err
					}
				} else if _, err := tx.Exec(ctx, "DELETE FROM "+r.n.holds+" WHERE msg_id = $1", o.msgID); err != nil {
					return err
				}
			}
			deadLettered = append(deadLettered, oc)
			continue
		}
		delay := time.Duration(0)
		if o.counted {
			delay = r.cfg.RetryBackoff << min(oc.attempts-1, 20)
			delay = min(delay, r.cfg.MaxRetryBackoff)
		}
		var until time.Time
		if err := tx.QueryRow(ctx, "UPDATE "+r.n.table+" SET attempts = $2, last_error = $3, available_at = now() + $4::interval WHERE id = $1 RETURNING available_at",
			o.id, oc.attempts, msg, delay).Scan(&until); err != nil {
			if errors.Is(err, pgx.ErrNoRows) {
				continue
			}
			return err
		}
		if o.key != nil && delay > 0 {
			if err := r.hold(ctx, tx, o, &until, msg); err != nil {
				return err
			}
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return err
	}
	for _, oc := range deadLettered {
		r.log.Warn("relay: message moved to dead-letter table", "msg_id", oc.o.msgID, "topic", oc.o.topic,
			"attempts", oc.attempts, "err", oc.o.err, "policy", r.cfg.DeadLetterPolicy)
		r.obs.DeadLettered(oc.o.topic, oc.o.msgID, oc.o.err.Error())
	}
	return nil
}

func (r *Relay) hold(ctx context.Context, tx pgx.Tx, o *outRow, until *time.Time, reason string) error {
	_, err := tx.Exec(ctx, "INSERT INTO "+r.n.holds+" (slot, topic, key, msg_id, until, reason) VALUES ($1, $2, $3, $4, $5, $6)"+
		" ON CONFLICT (slot, topic, key) DO UPDATE SET msg_id = EXCLUDED.msg_id, until = EXCLUDED.until, reason = EXCLUDED.reason",
		o.slot, o.topic, o.key, o.msgID, until, reason)
	return err
}
