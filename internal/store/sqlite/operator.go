package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/treatyhq/treaty/internal/store"
)

const claimOperatorSQL = `UPDATE treaty_transactions SET
    lease_owner = ?2, lease_expires_at = ?3, next_attempt_at = ?3, epoch = epoch + 1, updated_at = ?4
WHERE gid = ?1 AND (lease_expires_at IS NULL OR lease_expires_at <= ?4)
RETURNING ` + txColumns

// ClaimForOperator implements store.Store.
func (s *Store) ClaimForOperator(ctx context.Context, gid, owner string, lease time.Duration) (store.Claimed, error) {
	var c store.Claimed
	err := s.write(ctx, "claim for operator", func(tx *sql.Tx, at time.Time) error {
		t, err := scanTx(tx.QueryRowContext(ctx, claimOperatorSQL, gid, owner, micros(at.Add(lease)), micros(at)))
		if errors.Is(err, sql.ErrNoRows) {
			cur, err := getTx(ctx, tx, gid)
			if err != nil {
				return err
			}
			return fmt.Errorf("%w: %q is driven by %s until %s", store.ErrLeased, gid, cur.LeaseOwner, cur.LeaseExpiresAt.Format(time.RFC3339))
		}
		if err != nil {
			return fmt.Errorf("claim %q for an operator: %w", gid, err)
		}
		bs, err := branches(ctx, tx, gid)
		if err != nil {
			return err
		}
		c = store.Claimed{Transaction: t, Branches: bs}
		return nil
	})
	return c, err
}
