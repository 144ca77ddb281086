package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

const faultColumns = `id, rule, max_count, fired, reason, created_by, created_at, expires_at,
	coalesce(deleted_by, ''), deleted_at`

func scanFault(row scanner) (store.Fault, error) {
	var f store.Fault
	var rule string
	var created, expires int64
	var deleted sql.NullInt64
	if err := row.Scan(&f.ID, &rule, &f.MaxCount, &f.Fired, &f.Reason, &f.CreatedBy, &created, &expires,
		&f.DeletedBy, &deleted); err != nil {
		return store.Fault{}, err
	}
	f.Rule, f.CreatedAt, f.ExpiresAt, f.DeletedAt = []byte(rule), fromMicros(created), fromMicros(expires), fromNullMicros(deleted)
	return f, nil
}

// CreateFault implements store.FaultStore.
func (s *Store) CreateFault(ctx context.Context, p store.CreateFaultParams) (store.Fault, error) {
	var f store.Fault
	err := s.write(ctx, "create fault rule", func(tx *sql.Tx, at time.Time) error {
		var err error
		f, err = scanFault(tx.QueryRowContext(ctx, `INSERT INTO treaty_faults (rule, max_count, reason, created_by, created_at, expires_at)
			VALUES (?, ?, ?, ?, ?, ?) RETURNING `+faultColumns,
			string(p.Rule), p.MaxCount, p.Reason, p.CreatedBy, micros(at), micros(at.Add(p.ExpiresIn))))
		if err != nil {
			return fmt.Errorf("create fault rule: %w", err)
		}
		return nil
	})
	return f, err
}

// ListFaults implements store.FaultStore.
func (s *Store) ListFaults(ctx context.Context, all bool, limit int) ([]store.Fault, error) {
	if limit <= 0 {
		limit = 100
	}
	q := `SELECT ` + faultColumns + ` FROM treaty_faults WHERE deleted_at IS NULL AND expires_at > ? ORDER BY id LIMIT ?`
	args := []any{micros(now()), limit}
	if all {
		q = `SELECT ` + faultColumns + ` FROM treaty_faults ORDER BY id DESC LIMIT ?`
		args = args[1:]
	}
	rows, err := s.db.QueryContext(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("list fault rules: %w", err)
	}
	defer rows.Close()
	var out []store.Fault
	for rows.Next() {
		f, err := scanFault(rows)
		if err != nil {
			return nil, fmt.Errorf("list fault rules: %w", err)
		}
		out = append(out, f)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list fault rules: %w", err)
	}
	return out, nil
}

// DeleteFault implements store.FaultStore.
func (s *Store) DeleteFault(ctx context.Context, id int64, actor string) (store.Fault, error) {
	var f store.Fault
	err := s.write(ctx, fmt.Sprintf("delete fault rule %d", id), func(tx *sql.Tx, at time.Time) error {
		var err error
		f, err = scanFault(tx.QueryRowContext(ctx, `UPDATE treaty_faults SET deleted_at = ?, deleted_by = ?
			WHERE id = ? AND deleted_at IS NULL RETURNING `+faultColumns, micros(at), actor, id))
		if errors.Is(err, sql.ErrNoRows) {
			return fmt.Errorf("%w: no live fault rule %d", store.ErrNotFound, id)
		}
		if err != nil {
			return fmt.Errorf("delete fault rule %d: %w", id, err)
		}
		return nil
	})
	return f, err
}

// FireFault implements store.FaultStore; the write lock serialises concurrent firings.
func (s *Store) FireFault(ctx context.Context, id int64) (bool, error) {
	fired := false
	err := s.write(ctx, fmt.Sprintf("fire fault rule %d", id), func(tx *sql.Tx, at time.Time) error {
		res, err := tx.ExecContext(ctx, `UPDATE treaty_faults SET fired = fired + 1
			WHERE id = ? AND deleted_at IS NULL AND expires_at > ? AND (max_count = 0 OR fired < max_count)`, id, micros(at))
		if err != nil {
			return fmt.Errorf("fire fault rule %d: %w", id, err)
		}
		n, err := res.RowsAffected()
		fired = n == 1
		return err
	})
	return fired, err
}
