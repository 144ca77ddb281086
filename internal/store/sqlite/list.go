package sqlite

import (
	"context"
	"fmt"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

const listSQL = `SELECT ` + txColumns + ` FROM treaty_transactions
WHERE (?1 = '[]' OR status IN (SELECT value FROM json_each(?1)))
  AND (?2 = '[]' OR mode IN (SELECT value FROM json_each(?2)))
  AND (?3 = '' OR workflow_name = ?3)
  AND (?4 = '' OR substr(gid, 1, length(?4)) = ?4)
  AND (?5 IS NULL OR created_at >= ?5)
  AND (?6 IS NULL OR created_at < ?6)
  AND (?7 IS NULL OR updated_at >= ?7)
  AND (?8 IS NULL OR updated_at < ?8)
  AND (?9 IS NULL OR created_at < ?9 OR (created_at = ?9 AND gid < ?10))
ORDER BY created_at DESC, gid DESC
LIMIT ?11`

func optMicros(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return micros(t)
}

// ListTransactions implements store.Store.
func (s *Store) ListTransactions(ctx context.Context, f store.ListFilter) ([]store.Transaction, error) {
	statuses, err := jsonList(f.Statuses)
	if err != nil {
		return nil, err
	}
	modes, err := jsonList(f.Modes)
	if err != nil {
		return nil, err
	}
	rows, err := s.db.QueryContext(ctx, listSQL, statuses, modes, f.Workflow, f.GIDPrefix,
		optMicros(f.CreatedAfter), optMicros(f.CreatedBefore), optMicros(f.UpdatedAfter), optMicros(f.UpdatedBefore),
		optMicros(f.AfterCreated), f.AfterGID, f.Limit)
	if err != nil {
		return nil, fmt.Errorf("list transactions: %w", err)
	}
	defer rows.Close()
	var out []store.Transaction
	for rows.Next() {
		t, err := scanTx(rows)
		if err != nil {
			return nil, fmt.Errorf("list transactions: %w", err)
		}
		out = append(out, t)
	}
	return out, rows.Err()
}
