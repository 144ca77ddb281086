package participant

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// Transactional messages: the application's local transaction records a barrier row with
// MsgMetadata(gid) (through CallPgx or CallSQL, inside the same transaction as its business
// writes); the coordinator's query-prepared call is answered by QueryPrepared.
const (
	// OpMsg is the op of the application's local transaction.
	OpMsg = "msg"
	// OpQueryPrepared is the coordinator asking whether the local transaction committed.
	OpQueryPrepared = "query_prepared"
	// MsgBranch is the branch name of the local transaction's barrier row.
	MsgBranch = "local"
)

// MsgMetadata is the barrier identity of message gid's local transaction.
func MsgMetadata(gid string) Metadata {
	return Metadata{GID: gid, Branch: MsgBranch, Op: OpMsg, Mode: ModeMsg}
}

// QueryPrepared answers the coordinator's query-prepared call for message gid: nil when the local
// transaction committed (deliver), an error wrapping ErrAborted when it did not. In that case it
// also leaves a marker, so a local transaction still running (or retried later) fails at its
// barrier insert instead of committing a message nobody will deliver. A local transaction still
// open makes this call wait for its outcome.
func (b *Barrier) QueryPrepared(ctx context.Context, db PgxDB, gid string) error {
	md := Metadata{GID: gid, Branch: MsgBranch, Op: OpQueryPrepared, Mode: ModeMsg}
	if err := md.Validate(); err != nil {
		return err
	}
	var reason string
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, b.q.insertMarker, ModeMsg, gid, MsgBranch, OpMsg, OpQueryPrepared); err != nil {
			return err
		}
		return tx.QueryRow(ctx, b.q.reason, ModeMsg, gid, MsgBranch, OpMsg).Scan(&reason)
	})
	if err != nil {
		return fmt.Errorf("participant: query prepared message %q in %s: %w", gid, b.table, err)
	}
	if reason == OpMsg {
		return nil
	}
	return fmt.Errorf("%w: message %q: its local transaction did not commit", ErrAborted, gid)
}
