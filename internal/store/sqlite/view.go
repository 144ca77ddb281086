package sqlite

import (
	"context"
	"database/sql"

	"github.com/treatyhq/treaty/internal/store"
)

// GetView implements store.Store, in one read transaction.
func (s *Store) GetView(ctx context.Context, gid string) (store.Transaction, []store.Branch, []store.Event, error) {
	var t store.Transaction
	var bs []store.Branch
	var evs []store.Event
	err := s.read(ctx, "read transaction", func(tx *sql.Tx) error {
		var err error
		if t, err = getTx(ctx, tx, gid); err != nil {
			return err
		}
		if bs, err = branches(ctx, tx, gid); err != nil {
			return err
		}
		evs, err = s.events(ctx, tx, gid)
		return err
	})
	return t, bs, evs, err
}
