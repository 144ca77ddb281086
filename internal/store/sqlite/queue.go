package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

// QueueOperation implements store.Store.
func (s *Store) QueueOperation(ctx context.Context, q store.QueuedOperation) (store.QueuedOperation, error) {
	err := s.write(ctx, fmt.Sprintf("queue operator action on %q", q.GID), func(tx *sql.Tx, at time.Time) error {
		if _, err := getTx(ctx, tx, q.GID); err != nil {
			return err // ErrNotFound for an unknown gid
		}
		q.QueuedAt = at
		return tx.QueryRowContext(ctx, `INSERT INTO treaty_operator_queue (gid, action, branch, op, actor, reason, queued_at)
VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id`, q.GID, q.Action, q.Branch, q.Op, q.Actor, q.Reason, micros(at)).Scan(&q.ID)
	})
	return q, err
}

// QueuedOperations implements store.Store.
func (s *Store) QueuedOperations(ctx context.Context, owner string, limit int) ([]store.QueuedOperation, error) {
	var out []store.QueuedOperation
	err := s.read(ctx, "read queued operator actions", func(tx *sql.Tx) error {
		rows, err := tx.QueryContext(ctx, `SELECT q.id, q.gid, q.action, q.branch, q.op, q.actor, q.reason, q.queued_at
FROM treaty_operator_queue q JOIN treaty_transactions t ON t.gid = q.gid
WHERE t.lease_owner IS NULL OR t.lease_owner = ?2 OR t.lease_expires_at <= ?3
ORDER BY q.id LIMIT ?1`, limit, owner, micros(now()))
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var q store.QueuedOperation
			var at int64
			if err := rows.Scan(&q.ID, &q.GID, &q.Action, &q.Branch, &q.Op, &q.Actor, &q.Reason, &at); err != nil {
				return err
			}
			q.QueuedAt = fromMicros(at)
			out = append(out, q)
		}
		return rows.Err()
	})
	return out, err
}

// DeleteQueuedOperation implements store.Store.
func (s *Store) DeleteQueuedOperation(ctx context.Context, id int64) error {
	return s.write(ctx, fmt.Sprintf("delete queued operator action %d", id), func(tx *sql.Tx, _ time.Time) error {
		_, err := tx.ExecContext(ctx, `DELETE FROM treaty_operator_queue WHERE id = ?`, id)
		return err
	})
}
