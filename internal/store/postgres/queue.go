package postgres

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/treatyhq/treaty/internal/store"
)

// QueueOperation implements store.Store.
func (s *Store) QueueOperation(ctx context.Context, q store.QueuedOperation) (store.QueuedOperation, error) {
	err := s.pool.QueryRow(ctx, `INSERT INTO treaty_operator_queue (gid, action, branch, op, actor, reason)
VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, queued_at`, q.GID, q.Action, q.Branch, q.Op, q.Actor, q.Reason).Scan(&q.ID, &q.QueuedAt)
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "23503" { // foreign key: no such transaction
		return q, fmt.Errorf("%w: %q", store.ErrNotFound, q.GID)
	}
	if err != nil {
		return q, fmt.Errorf("queue operator action on %q: %w", q.GID, err)
	}
	return q, nil
}

// QueuedOperations implements store.Store.
func (s *Store) QueuedOperations(ctx context.Context, owner string, limit int) ([]store.QueuedOperation, error) {
	rows, err := s.pool.Query(ctx, `SELECT q.id, q.gid, q.action, q.branch, q.op, q.actor, q.reason, q.queued_at
FROM treaty_operator_queue q JOIN treaty_transactions t ON t.gid = q.gid
WHERE t.lease_owner IS NULL OR t.lease_owner = $2 OR t.lease_expires_at <= now()
ORDER BY q.id LIMIT $1`, limit, owner)
	if err != nil {
		return nil, fmt.Errorf("read queued operator actions: %w", err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (store.QueuedOperation, error) {
		var q store.QueuedOperation
		err := r.Scan(&q.ID, &q.GID, &q.Action, &q.Branch, &q.Op, &q.Actor, &q.Reason, &q.QueuedAt)
		return q, err
	})
	if err != nil {
		return nil, fmt.Errorf("read queued operator actions: %w", err)
	}
	return out, nil
}

// DeleteQueuedOperation implements store.Store.
func (s *Store) DeleteQueuedOperation(ctx context.Context, id int64) error {
	if _, err := s.pool.Exec(ctx, `DELETE FROM treaty_operator_queue WHERE id = $1`, id); err != nil {
		return fmt.Errorf("delete queued operator action %d: %w", id, err)
	}
	return nil
}
