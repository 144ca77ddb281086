package outbox

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/segmentio/kafka-go"
)

// Inbox makes a consumer idempotent: it records each applied message id in the consumer's own
// transaction, so a redelivered message is skipped. Create its table with MigrateInbox.
type Inbox struct {
	names inboxNames
}

// NewInbox returns an Inbox over table (optionally schema-qualified; "" means DefaultInboxTable).
func NewInbox(table string) (*Inbox, error) {
	n, err := parseInboxName(table)
	if err != nil {
		return nil, err
	}
	return &Inbox{names: n}, nil
}

// ErrNoMessageID is returned for an empty message id.
var ErrNoMessageID = errors.New("inbox: empty message id")

// Process runs fn in tx unless messageID was already applied, and records it. It reports
// whether fn ran. When fn fails, roll tx back: the record goes with it, so a redelivery runs fn
// again. A concurrent duplicate waits for the first transaction and is then skipped.
func (i *Inbox) Process(ctx context.Context, tx pgx.Tx, messageID string, fn func(ctx context.Context) error) (bool, error) {
	if messageID == "" {
		return false, ErrNoMessageID
	}
	tag, err := tx.Exec(ctx, i.insertSQL(), messageID)
	if err != nil {
		return false, fmt.Errorf("inbox %s: record %s: %w", i.names.table, messageID, err)
	}
	if tag.RowsAffected() == 0 {
		return false, nil
	}
	return true, fn(ctx)
}

// ProcessSQL is Process for a database/sql transaction.
func (i *Inbox) ProcessSQL(ctx context.Context, tx *sql.Tx, messageID string, fn func(ctx context.Context) error) (bool, error) {
	if messageID == "" {
		return false, ErrNoMessageID
	}
	res, err := tx.ExecContext(ctx, i.insertSQL(), messageID)
	if err != nil {
		return false, fmt.Errorf("inbox %s: record %s: %w", i.names.table, messageID, err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("inbox %s: %w", i.names.table, err)
	}
	if n == 0 {
		return false, nil
	}
	return true, fn(ctx)
}

func (i *Inbox) insertSQL() string {
	return "INSERT INTO " + i.names.table + " (message_id) VALUES ($1) ON CONFLICT (message_id) DO NOTHING"
}

// DB is what Prune needs; *pgxpool.Pool, *pgx.Conn and pgx.Tx satisfy it.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// Prune deletes ids applied longer ago than olderThan. Keep them for longer than any message
// can be redelivered (the topic's retention), or a late duplicate would be applied again.
func (i *Inbox) Prune(ctx context.Context, db DB, olderThan time.Duration) (int64, error) {
	tag, err := db.Exec(ctx, "DELETE FROM "+i.names.table+" WHERE processed_at < now() - $1::interval", olderThan)
	if err != nil {
		return 0, fmt.Errorf("inbox %s: prune: %w", i.names.table, err)
	}
	return tag.RowsAffected(), nil
}

// MessageID returns the outbox message id carried by a Kafka message's headers.
func MessageID(m kafka.Message) (string, bool) {
	for _, h := range m.Headers {
		if h.Key == HeaderMessageID {
			return string(h.Value), len(h.Value) > 0
		}
	}
	return "", false
}
