package sqlite

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/treatyhq/treaty/internal/store"
)

// finishedSQLList is store.FinishedStatuses as SQL, as in the partial index of schema 003.
const finishedSQLList = `'succeeded', 'compensated', 'confirmed', 'cancelled', 'committed', 'rolled_back', 'aborted'`

// Stats implements store.Store, from one snapshot.
func (s *Store) Stats(ctx context.Context) (store.Stats, error) {
	var st store.Stats
	at := now()
	err := s.read(ctx, "transaction statistics", func(tx *sql.Tx) error {
		// Unfinished ones by status, from their partial index; the finished total is exact here
		// (an embedded, single-node store is small).
		if err := tx.QueryRowContext(ctx, `SELECT count(*) FROM treaty_transactions WHERE status IN (`+finishedSQLList+`)`).Scan(&st.Finished); err != nil {
			return fmt.Errorf("transaction statistics: %w", err)
		}
		rows, err := tx.QueryContext(ctx, `SELECT mode, status, count(*) FROM treaty_transactions
WHERE status NOT IN (`+finishedSQLList+`) GROUP BY mode, status ORDER BY mode, status`)
		if err != nil {
			return fmt.Errorf("transaction statistics: %w", err)
		}
		defer rows.Close()
		for rows.Next() {
			var c store.StatusCount
			if err := rows.Scan(&c.Mode, &c.Status, &c.Count); err != nil {
				return fmt.Errorf("transaction statistics: %w", err)
			}
			if c.Status == "needs_operator" {
				st.NeedsOperator += c.Count
			}
			st.ByStatus = append(st.ByStatus, c)
		}
		if err := rows.Err(); err != nil {
			return fmt.Errorf("transaction statistics: %w", err)
		}
		if err := rows.Close(); err != nil {
			return fmt.Errorf("transaction statistics: %w", err)
		}
		var oldestDue, oldestLive sql.NullInt64
		if err := tx.QueryRowContext(ctx, `
SELECT count(*) FILTER (WHERE next_attempt_at <= ?1),
       count(*) FILTER (WHERE next_attempt_at <= ?2),
       min(next_attempt_at) FILTER (WHERE next_attempt_at <= ?1),
       min(created_at)
FROM treaty_transactions WHERE next_attempt_at IS NOT NULL`, micros(at), micros(at.Add(-store.OverdueAfter))).
			Scan(&st.Due, &st.Overdue, &oldestDue, &oldestLive); err != nil {
			return fmt.Errorf("recovery backlog: %w", err)
		}
		if oldestDue.Valid {
			st.OldestDue = at.Sub(fromMicros(oldestDue.Int64))
		}
		st.OldestRunning = fromNullMicros(oldestLive)
		return nil
	})
	if err != nil {
		return store.Stats{}, err
	}
	return st, nil
}
