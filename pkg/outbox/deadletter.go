package outbox

import (
	"context"
	"fmt"
	"time"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// DeadLetter is a message that failed MaxAttempts times.
type DeadLetter struct {
	ID        uuid.UUID
	Topic     string
	Key       []byte
	Value     []byte
	Headers   []Header
	CreatedAt time.Time
	DeadAt    time.Time
	Attempts  int
	Error     string
	// Blocking says that later messages of the same topic and key wait in the outbox until
	// this one is requeued or discarded (DeadLetterPolicy BlockKey).
	Blocking bool
}

// DeadLetters administers the dead-letter table of one outbox table.
type DeadLetters struct {
	pool *pgxpool.Pool
	n    names
}

// NewDeadLetters returns the administration of table's dead letters ("" means DefaultTable).
func NewDeadLetters(pool *pgxpool.Pool, table string) (*DeadLetters, error) {
	n, err := parseTableName(table)
	if err != nil {
		return nil, err
	}
	return &DeadLetters{pool: pool, n: n}, nil
}

// List returns up to limit dead letters, oldest first.
func (d *DeadLetters) List(ctx context.Context, limit int) ([]DeadLetter, error) {
	rows, err := d.pool.Query(ctx, "SELECT msg_id, topic, key, value, headers, created_at, dead_at, attempts, error, blocking FROM "+
		d.n.dead+" ORDER BY dead_at, id LIMIT $1", limit)
	if err != nil {
		return nil, fmt.Errorf("list dead letters of %s: %w", d.n.source, err)
	}
	defer rows.Close()
	var out []DeadLetter
	for rows.Next() {
		var dl DeadLetter
		var hs []byte
		if err := rows.Scan(&dl.ID, &dl.Topic, &dl.Key, &dl.Value, &hs, &dl.CreatedAt, &dl.DeadAt, &dl.Attempts, &dl.Error, &dl.Blocking); err != nil {
			return nil, fmt.Errorf("list dead letters of %s: %w", d.n.source, err)
		}
		if dl.Headers, err = decodeHeaders(hs); err != nil {
			return nil, fmt.Errorf("dead letter %s: %w", dl.ID, err)
		}
		out = append(out, dl)
	}
	return out, rows.Err()
}

// Requeue moves a dead letter back into the outbox with its original place in its key's
// order, and lifts the hold on its key. It reports whether the message was found.
func (d *DeadLetters) Requeue(ctx context.Context, id uuid.UUID) (bool, error) {
	var found bool
	err := pgx.BeginFunc(ctx, d.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "INSERT INTO "+d.n.table+" (id, xid, msg_id, topic, key, value, headers, created_at)"+
			" SELECT id, xid, msg_id, topic, key, value, headers, created_at FROM "+d.n.dead+" WHERE msg_id = $1", id)
		if err != nil {
			return err
		}
		found = tag.RowsAffected() > 0
		if _, err := tx.Exec(ctx, "DELETE FROM "+d.n.dead+" WHERE msg_id = $1", id); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, "DELETE FROM "+d.n.holds+" WHERE msg_id = $1", id)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("requeue dead letter %s of %s: %w", id, d.n.source, err)
	}
	return found, nil
}

// Discard deletes a dead letter for good and lifts the hold on its key.
func (d *DeadLetters) Discard(ctx context.Context, id uuid.UUID) (bool, error) {
	var found bool
	err := pgx.BeginFunc(ctx, d.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(ctx, "DELETE FROM "+d.n.dead+" WHERE msg_id = $1", id)
		if err != nil {
			return err
		}
		found = tag.RowsAffected() > 0
		_, err = tx.Exec(ctx, "DELETE FROM "+d.n.holds+" WHERE msg_id = $1", id)
		return err
	})
	if err != nil {
		return false, fmt.Errorf("discard dead letter %s of %s: %w", id, d.n.source, err)
	}
	return found, nil
}
