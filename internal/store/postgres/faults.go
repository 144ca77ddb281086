package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/treatyhq/treaty/internal/store"
)

const faultColumns = `id, rule, max_count, fired, reason, created_by, created_at, expires_at,
	coalesce(deleted_by, ''), deleted_at`

func scanFault(row pgx.Row) (store.Fault, error) {
	var f store.Fault
	var deletedAt *time.Time
	if err := row.Scan(&f.ID, &f.Rule, &f.MaxCount, &f.Fired, &f.Reason, &f.CreatedBy, &f.CreatedAt, &f.ExpiresAt,
		&f.DeletedBy, &deletedAt); err != nil {
		return store.Fault{}, err
	}
	if deletedAt != nil {
		f.DeletedAt = *deletedAt
	}
	return f, nil
}

// CreateFault implements store.FaultStore. The expiry comes from the database clock.
func (s *Store) CreateFault(ctx context.Context, p store.CreateFaultParams) (store.Fault, error) {
	f, err := scanFault(s.pool.QueryRow(ctx, `INSERT INTO treaty_faults (rule, max_count, reason, created_by, expires_at)
		VALUES ($1, $2, $3, $4, now() + $5::bigint * interval '1 microsecond') RETURNING `+faultColumns,
		string(p.Rule), p.MaxCount, p.Reason, p.CreatedBy, p.ExpiresIn.Microseconds()))
	if err != nil {
		return store.Fault{}, fmt.Errorf("create fault rule: %w", err)
	}
	return f, nil
}

// ListFaults implements store.FaultStore.
func (s *Store) ListFaults(ctx context.Context, all bool, limit int) ([]store.Fault, error) {
	if limit <= 0 {
		limit = 100
	}
	q := `SELECT ` + faultColumns + ` FROM treaty_faults WHERE deleted_at IS NULL AND expires_at > now() ORDER BY id LIMIT $1`
	if all {
		q = `SELECT ` + faultColumns + ` FROM treaty_faults ORDER BY id DESC LIMIT $1`
	}
	rows, err := s.pool.Query(ctx, q, limit)
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
	f, err := scanFault(s.pool.QueryRow(ctx, `UPDATE treaty_faults SET deleted_at = now(), deleted_by = $2
		WHERE id = $1 AND deleted_at IS NULL RETURNING `+faultColumns, id, actor))
	if errors.Is(err, pgx.ErrNoRows) {
		return store.Fault{}, fmt.Errorf("%w: no live fault rule %d", store.ErrNotFound, id)
	}
	if err != nil {
		return store.Fault{}, fmt.Errorf("delete fault rule %d: %w", id, err)
	}
	return f, nil
}

// FireFault implements store.FaultStore: one conditional update, so concurrent replicas
// serialise on the row and never exceed max_count.
func (s *Store) FireFault(ctx context.Context, id int64) (bool, error) {
	tag, err := s.pool.Exec(ctx, `UPDATE treaty_faults SET fired = fired + 1
		WHERE id = $1 AND deleted_at IS NULL AND expires_at > now() AND (max_count = 0 OR fired < max_count)`, id)
	if err != nil {
		return false, fmt.Errorf("fire fault rule %d: %w", id, err)
	}
	return tag.RowsAffected() == 1, nil
}
