package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/treatyhq/treaty/internal/store"
)

const viewBranchesSQL = `SELECT branch, op, position, status, attempts, last_error, next_attempt_at, uncertain, spec, updated_at
    FROM treaty_branches WHERE gid = $1 ORDER BY position, op`

const viewEventsSQL = `SELECT id, at, kind, branch, op, detail FROM treaty_events WHERE gid = $1 ORDER BY id`

// GetView implements store.Store: the three reads go in one pipelined batch, one round trip,
// inside a REPEATABLE READ read-only transaction, so the answer is one consistent snapshot. (A
// batch alone is one implicit transaction, but under READ COMMITTED each of its statements takes
// a new snapshot and could mix a status with later branches or events.) A batch that fails half
// way leaves its connection in a failed transaction, which the pool discards.
func (s *Store) GetView(ctx context.Context, gid string) (store.Transaction, []store.Branch, []store.Event, error) {
	b := &pgx.Batch{}
	b.Queue("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
	b.Queue("SELECT "+txColumns+" FROM treaty_transactions WHERE gid = $1", gid)
	b.Queue(viewBranchesSQL, gid)
	b.Queue(viewEventsSQL, gid)
	b.Queue("COMMIT")
	br := s.pool.SendBatch(ctx, b)
	defer br.Close()
	if _, err := br.Exec(); err != nil {
		return store.Transaction{}, nil, nil, fmt.Errorf("read transaction %q: begin: %w", gid, err)
	}
	t, err := scanTx(br.QueryRow())
	if errors.Is(err, pgx.ErrNoRows) {
		// Finish the batch so that the connection goes back to the pool idle, not mid-transaction.
		for range 3 {
			if _, err := br.Exec(); err != nil {
				return store.Transaction{}, nil, nil, fmt.Errorf("read transaction %q: %w", gid, err)
			}
		}
		return store.Transaction{}, nil, nil, fmt.Errorf("%w: %q", store.ErrNotFound, gid)
	}
	if err != nil {
		return store.Transaction{}, nil, nil, fmt.Errorf("read transaction %q: %w", gid, err)
	}
	rows, err := br.Query()
	if err != nil {
		return store.Transaction{}, nil, nil, fmt.Errorf("read branches of %q: %w", gid, err)
	}
	var bs []store.Branch
	for rows.Next() {
		var x store.Branch
		var next *time.Time
		if err := rows.Scan(&x.Branch, &x.Op, &x.Position, &x.Status, &x.Attempts, &x.LastError, &next, &x.Uncertain, &x.Spec, &x.UpdatedAt); err != nil {
			rows.Close()
			return store.Transaction{}, nil, nil, fmt.Errorf("read branches of %q: %w", gid, err)
		}
		if next != nil {
			x.NextAttemptAt = *next
		}
		bs = append(bs, x)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return store.Transaction{}, nil, nil, fmt.Errorf("read branches of %q: %w", gid, err)
	}
	rows, err = br.Query()
	if err != nil {
		return store.Transaction{}, nil, nil, fmt.Errorf("read events of %q: %w", gid, err)
	}
	var evs []store.Event
	for rows.Next() {
		var e store.Event
		if err := rows.Scan(&e.ID, &e.At, &e.Kind, &e.Branch, &e.Op, &e.Detail); err != nil {
			rows.Close()
			return store.Transaction{}, nil, nil, fmt.Errorf("read events of %q: %w", gid, err)
		}
		evs = append(evs, e)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return store.Transaction{}, nil, nil, fmt.Errorf("read events of %q: %w", gid, err)
	}
	if _, err := br.Exec(); err != nil {
		return store.Transaction{}, nil, nil, fmt.Errorf("read transaction %q: commit: %w", gid, err)
	}
	return t, bs, evs, nil
}
