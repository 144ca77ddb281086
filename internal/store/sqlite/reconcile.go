package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

func queryGIDs(ctx context.Context, q querier, query string, args ...any) ([]string, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var g string
		if err := rows.Scan(&g); err != nil {
			return nil, err
		}
		out = append(out, g)
	}
	return out, rows.Err()
}

// Reconcile implements store.Store.
func (s *Store) Reconcile(ctx context.Context, p store.ReconcileParams) (store.ReconcileReport, error) {
	var r store.ReconcileReport
	err := s.write(ctx, "reconcile", func(tx *sql.Tx, at time.Time) error {
		stuckBefore, graceBefore := micros(at.Add(-p.StuckAfter)), micros(at.Add(-p.Grace))
		stuck := `t.next_attempt_at IS NOT NULL AND t.paused = 0 AND t.updated_at < ?1
    AND NOT (t.status IN ('trying', 'prepared') AND t.deadline > ?3)
    AND NOT EXISTS (SELECT 1 FROM treaty_branches b WHERE b.gid = t.gid AND b.next_attempt_at > ?3)`
		if err := tx.QueryRowContext(ctx, `SELECT
    coalesce(sum(`+stuck+`), 0),
    coalesce(sum(mode = 'tcc' AND status = 'trying' AND deadline < ?2), 0),
    coalesce(sum(mode = '2pc' AND status = 'preparing' AND deadline < ?2), 0)
FROM treaty_transactions t WHERE next_attempt_at IS NOT NULL`, stuckBefore, graceBefore, micros(at)).Scan(&r.StuckCount, &r.ExpiredCount, &r.InDoubtCount); err != nil {
			return fmt.Errorf("reconcile: count: %w", err)
		}
		var err error
		r.Stuck, err = queryGIDs(ctx, tx, `UPDATE treaty_transactions SET next_attempt_at = ?3,
    lease_expires_at = CASE WHEN lease_expires_at IS NULL THEN NULL ELSE min(lease_expires_at, ?5) END,
    epoch = epoch + 1, updated_at = ?3
WHERE gid IN (SELECT t.gid FROM treaty_transactions t WHERE `+stuck+`
    ORDER BY t.updated_at LIMIT ?4)
RETURNING gid`, stuckBefore, nil, micros(at), p.Limit, micros(at.Add(p.HandOver)))
		if err != nil {
			return fmt.Errorf("reconcile: re-drive stuck: %w", err)
		}
		for _, g := range r.Stuck {
			if err := insertEvents(ctx, tx, g, at, []store.Event{{Kind: "reconcile_stuck",
				Detail: "no progress for " + p.StuckAfter.String() + "; re-driven by the reconciliation job"}}); err != nil {
				return err
			}
		}
		find := `SELECT gid FROM treaty_transactions WHERE mode = ?1 AND status = ?2 AND next_attempt_at IS NOT NULL
    AND deadline < ?3 ORDER BY deadline LIMIT ?4`
		if r.ExpiredTCC, err = queryGIDs(ctx, tx, find, "tcc", "trying", graceBefore, p.Limit); err != nil {
			return fmt.Errorf("reconcile: expired TCC: %w", err)
		}
		if r.InDoubt2PC, err = queryGIDs(ctx, tx, find, "2pc", "preparing", graceBefore, p.Limit); err != nil {
			return fmt.Errorf("reconcile: 2PC in doubt: %w", err)
		}
		return nil
	})
	return r, err
}

// DeleteFinished implements store.Store.
func (s *Store) DeleteFinished(ctx context.Context, olderThan time.Duration, batch int) (int, error) {
	statuses, err := jsonList(store.FinishedStatuses)
	if err != nil {
		return 0, err
	}
	n := 0
	err = s.write(ctx, "delete finished", func(tx *sql.Tx, at time.Time) error {
		res, err := tx.ExecContext(ctx, `DELETE FROM treaty_transactions WHERE gid IN (
    SELECT gid FROM treaty_transactions
    WHERE next_attempt_at IS NULL AND paused = 0 AND status IN (SELECT value FROM json_each(?1)) AND updated_at < ?2
    LIMIT ?3)`, statuses, micros(at.Add(-olderThan)), batch)
		if err != nil {
			return fmt.Errorf("delete finished transactions: %w", err)
		}
		m, err := res.RowsAffected()
		n = int(m)
		return err
	})
	return n, err
}
