package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

// stuckWhere selects live, unpaused transactions that made no progress for $1 although nothing
// legitimate makes them wait: no branch has a retry scheduled, and they are not waiting for
// their initiator (TCC trying, message prepared) before the deadline. A driver that hangs while
// its lease keeps being renewed looks exactly like this.
const stuckWhere = `t.next_attempt_at IS NOT NULL AND NOT t.paused AND t.updated_at < now() - $1::interval
  AND NOT (t.status IN ('trying', 'prepared') AND t.deadline > now())
  AND NOT EXISTS (SELECT 1 FROM treaty_branches b WHERE b.gid = t.gid AND b.next_attempt_at > now())`

// redriveSQL takes stuck transactions away from whoever holds them: a new epoch fences the old
// owner out (its next write or renewal fails), and recovery claims them as soon as the old lease
// has run out, so the two never call participants at the same time. It records why.
const redriveSQL = `
WITH s AS (
    UPDATE treaty_transactions SET next_attempt_at = now(), epoch = epoch + 1, updated_at = now(),
        lease_expires_at = least(lease_expires_at, now() + $4::interval)
    WHERE gid IN (
        SELECT t.gid FROM treaty_transactions t WHERE ` + stuckWhere + `
        ORDER BY t.updated_at LIMIT $2
        FOR UPDATE SKIP LOCKED)
    RETURNING gid
), e AS (
    INSERT INTO treaty_events (gid, kind, detail)
    SELECT gid, 'reconcile_stuck', 'no progress for ' || $3 || '; re-driven by the reconciliation job' FROM s
)
SELECT gid FROM s`

const findSQL = `SELECT gid FROM treaty_transactions
WHERE mode = $1 AND status = $2 AND next_attempt_at IS NOT NULL AND deadline < now() - $3::interval
ORDER BY deadline LIMIT $4`

const countSQL = `SELECT
    count(*) FILTER (WHERE ` + stuckWhere + `),
    count(*) FILTER (WHERE mode = 'tcc' AND status = 'trying' AND deadline < now() - $2::interval),
    count(*) FILTER (WHERE mode = '2pc' AND status = 'preparing' AND deadline < now() - $2::interval)
FROM treaty_transactions t WHERE next_attempt_at IS NOT NULL`

func (s *Store) gids(ctx context.Context, q string, args ...any) ([]string, error) {
	rows, err := s.pool.Query(ctx, q, args...)
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
	if err := s.pool.QueryRow(ctx, countSQL, p.StuckAfter, p.Grace).Scan(&r.StuckCount, &r.ExpiredCount, &r.InDoubtCount); err != nil {
		return r, fmt.Errorf("reconcile: count: %w", err)
	}
	var err error
	if r.Stuck, err = s.gids(ctx, redriveSQL, p.StuckAfter, p.Limit, p.StuckAfter.String(), p.HandOver); err != nil {
		return r, fmt.Errorf("reconcile: re-drive stuck: %w", err)
	}
	if r.ExpiredTCC, err = s.gids(ctx, findSQL, "tcc", "trying", p.Grace, p.Limit); err != nil {
		return r, fmt.Errorf("reconcile: expired TCC: %w", err)
	}
	if r.InDoubt2PC, err = s.gids(ctx, findSQL, "2pc", "preparing", p.Grace, p.Limit); err != nil {
		return r, fmt.Errorf("reconcile: 2PC in doubt: %w", err)
	}
	return r, nil
}

// deleteFinishedSQL deletes one small batch, with the transactions' branches and events (no
// foreign key cascades: see migration 007); SKIP LOCKED keeps it from waiting on anything.
const deleteFinishedSQL = `
WITH d AS (
    DELETE FROM treaty_transactions WHERE gid IN (
        SELECT gid FROM treaty_transactions
        WHERE next_attempt_at IS NULL AND NOT paused AND status = ANY($1) AND updated_at < now() - $2::interval
        LIMIT $3 FOR UPDATE SKIP LOCKED)
    RETURNING gid
), b AS (
    DELETE FROM treaty_branches WHERE gid IN (SELECT gid FROM d)
), e AS (
    DELETE FROM treaty_events WHERE gid IN (SELECT gid FROM d)
)
SELECT count(*) FROM d`

// DeleteFinished implements store.Store.
func (s *Store) DeleteFinished(ctx context.Context, olderThan time.Duration, batch int) (int, error) {
	var n int
	if err := s.pool.QueryRow(ctx, deleteFinishedSQL, store.FinishedStatuses, olderThan, batch).Scan(&n); err != nil {
		return 0, fmt.Errorf("delete finished transactions: %w", err)
	}
	return n, nil
}
