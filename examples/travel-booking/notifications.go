package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/segmentio/kafka-go"

	"github.com/treatyhq/treaty/pkg/outbox"
)

// notificationsSchema is the consumer's own tables: every event it applied, and per trip and
// service the latest state, from which it writes the itinerary e-mail.
const notificationsSchema = `
CREATE TABLE IF NOT EXISTS trip_events (
    message_id TEXT PRIMARY KEY,
    trip_id    TEXT NOT NULL,
    service    TEXT NOT NULL,
    type       TEXT NOT NULL,
    state      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS itineraries (
    trip_id TEXT    NOT NULL,
    service TEXT    NOT NULL,
    state   TEXT    NOT NULL,
    who     TEXT    NOT NULL,
    item    TEXT    NOT NULL,
    detail  TEXT    NOT NULL,
    events  INTEGER NOT NULL,
    PRIMARY KEY (trip_id, service)
)`

// notifier is the notifications service: a kafka-go consumer group reading every service's
// events and applying each exactly once, through the inbox, to its own database.
type notifier struct {
	db      *sql.DB
	pool    *pgxpool.Pool // PostgreSQL only
	inbox   *outbox.Inbox
	reader  *kafka.Reader
	run     string
	log     *slog.Logger
	replays int // every replays-th message is applied a second time, as a redelivery would

	applied, duplicates, foreign atomic.Int64

	cancel context.CancelFunc
	done   chan struct{}
	err    error
}

func startNotifier(ctx context.Context, be *backend, run string, log *slog.Logger) (*notifier, error) {
	db, pool, err := be.openSQL(ctx, "notifications")
	if err != nil {
		return nil, err
	}
	n := &notifier{db: db, pool: pool, run: run, log: log.With("service", "notifications"), replays: 5, done: make(chan struct{})}
	fail := func(err error) (*notifier, error) {
		n.closeDB()
		return nil, fmt.Errorf("notifications service: %w", err)
	}
	inboxTable := "notifications_inbox"
	if be.postgres() {
		inboxTable = schema("notifications") + "." + inboxTable
		err = outbox.MigrateInbox(ctx, pool, inboxTable)
	} else {
		err = outbox.MigrateInboxSQLite(ctx, db, inboxTable)
	}
	if err != nil {
		return fail(err)
	}
	if n.inbox, err = outbox.NewInbox(inboxTable); err != nil {
		return fail(err)
	}
	for _, stmt := range strings.Split(notificationsSchema, ";") {
		if _, err := db.ExecContext(ctx, stmt); err != nil {
			return fail(fmt.Errorf("create tables: %w", err))
		}
	}
	// A group of its own per run: with a shared broker it starts from the topic's beginning and
	// skips the events of earlier runs (Event.Run).
	n.reader = kafka.NewReader(kafka.ReaderConfig{
		Brokers: be.brokers, GroupID: "travel-notifications-" + run, Topic: EventsTopic,
		StartOffset: kafka.FirstOffset, MaxWait: 100 * time.Millisecond,
		HeartbeatInterval: time.Second, SessionTimeout: 10 * time.Second,
	})
	runCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	n.cancel = cancel
	go func() {
		defer close(n.done)
		n.err = n.consume(runCtx)
	}()
	return n, nil
}

func (n *notifier) closeDB() {
	_ = n.db.Close()
	if n.pool != nil {
		n.pool.Close()
	}
}

// stop ends the consumer and closes its database; the error is the consumer's, if it failed.
func (n *notifier) stop() error {
	n.cancel()
	<-n.done
	err := n.reader.Close()
	n.closeDB()
	if n.err != nil && !errors.Is(n.err, context.Canceled) {
		return errors.Join(n.err, err)
	}
	return err
}

func (n *notifier) consume(ctx context.Context) error {
	for seq := 1; ; seq++ {
		m, err := n.reader.FetchMessage(ctx)
		if err != nil {
			return err
		}
		id, ok := outbox.MessageID(m)
		if !ok {
			n.log.Warn("event without a message id header; skipped", "partition", m.Partition, "offset", m.Offset)
		} else {
			times := 1
			if seq%n.replays == 0 {
				times = 2 // the same message again, as after a consumer crash before its commit
			}
			for range times {
				if err := n.applyRetrying(ctx, id, m.Value); err != nil {
					return err
				}
			}
		}
		// The offset is committed after the database commit: at worst a message is fetched
		// again, and the inbox skips it.
		if err := n.reader.CommitMessages(ctx, m); err != nil {
			return err
		}
	}
}

// applyRetrying applies one message, retrying database errors until ctx ends: a message is
// never dropped.
func (n *notifier) applyRetrying(ctx context.Context, id string, value []byte) error {
	var ev Event
	if err := json.Unmarshal(value, &ev); err != nil {
		n.log.Warn("undecodable event; skipped", "message_id", id, "err", err)
		return nil
	}
	if ev.Run != n.run {
		n.foreign.Add(1)
		return nil
	}
	for backoff := 20 * time.Millisecond; ; backoff = min(2*backoff, time.Second) {
		ran, err := n.apply(ctx, id, ev)
		if err == nil {
			if ran {
				n.applied.Add(1)
			} else {
				n.duplicates.Add(1)
			}
			return nil
		}
		n.log.Warn("apply event; retrying", "message_id", id, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
	}
}

// apply records the event and updates the trip's itinerary in one transaction with the inbox
// row, so a duplicate is skipped and a failure leaves nothing.
func (n *notifier) apply(ctx context.Context, id string, ev Event) (bool, error) {
	tx, err := n.db.BeginTx(ctx, nil)
	if err != nil {
		return false, err
	}
	defer func() { _ = tx.Rollback() }()
	ran, err := n.inbox.ProcessSQL(ctx, tx, id, func(ctx context.Context) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO trip_events (message_id, trip_id, service, type, state) VALUES ($1, $2, $3, $4, $5)`,
			id, ev.TripID, ev.Service, ev.Type, ev.State); err != nil {
			return err
		}
		_, err := tx.ExecContext(ctx, `INSERT INTO itineraries (trip_id, service, state, who, item, detail, events)
			VALUES ($1, $2, $3, $4, $5, $6, 1)
			ON CONFLICT (trip_id, service) DO UPDATE SET state = excluded.state, events = itineraries.events + 1`,
			ev.TripID, ev.Service, ev.State, ev.Who, ev.Item, ev.Detail)
		return err
	})
	if err != nil {
		return false, err
	}
	return ran, tx.Commit()
}

// appliedInDB counts the events applied, from the consumer's own table.
func (n *notifier) appliedInDB(ctx context.Context) (int, error) {
	var c int
	err := n.db.QueryRowContext(ctx, "SELECT count(*) FROM trip_events").Scan(&c)
	return c, err
}

// itineraryLine is one service's part of a trip as the consumer knows it.
type itineraryLine struct {
	Service, State, Who, Item, Detail string
	Events                            int
}

func (n *notifier) itinerary(ctx context.Context, tripID string) (map[string]itineraryLine, error) {
	rows, err := n.db.QueryContext(ctx, `SELECT service, state, who, item, detail, events FROM itineraries WHERE trip_id = $1`, tripID)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := map[string]itineraryLine{}
	for rows.Next() {
		var l itineraryLine
		if err := rows.Scan(&l.Service, &l.State, &l.Who, &l.Item, &l.Detail, &l.Events); err != nil {
			return nil, err
		}
		out[l.Service] = l
	}
	return out, rows.Err()
}

// email renders the itinerary e-mail the notifications service would send for t.
func (n *notifier) email(ctx context.Context, t *trip) (string, error) {
	lines, err := n.itinerary(ctx, t.ID)
	if err != nil {
		return "", err
	}
	booked := 0
	for _, l := range lines {
		if l.State == stateBooked {
			booked++
		}
	}
	subject := "We could not book your trip; nothing is charged"
	if booked == len(t.Parts) {
		subject = "Your trip is booked"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "      To: %s\n      Subject: %s (trip %s)\n", t.Traveler, subject, t.ID)
	for _, p := range t.Parts {
		l, ok := lines[p.Service]
		what := "not available"
		if ok {
			what = map[string]string{
				stateBooked:    "booked",
				stateHeld:      "held (waiting for confirmation)",
				stateCancelled: "was reserved, then cancelled",
				stateReleased:  "was held, then released",
			}[l.State]
		}
		fmt.Fprintf(&b, "        %-7s %-40s %s\n", p.Label, p.Item+", "+p.Detail, what)
	}
	return b.String(), nil
}
