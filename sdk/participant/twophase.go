package participant

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// PreparedIDPrefix starts the id of every prepared transaction TwoPhase creates, so InDoubt can
// tell Treaty's prepared transactions from others on the same server.
const PreparedIDPrefix = "tr/"

// DefaultLockTimeout is TwoPhaseOptions.LockTimeout's default.
const DefaultLockTimeout = time.Second

// PreparedID returns the PostgreSQL prepared-transaction id of a 2PC branch: PreparedIDPrefix,
// the gid, '/', the branch. Neither may contain '/', so ParsePreparedID can split it again, and
// the longest (3 + 128 + 1 + 64 = 196 bytes) fits PostgreSQL's limit of 199. Prepared
// transactions are named per server, not per database; a gid and branch name a branch
// uniquely, so participants sharing a server do not collide.
func PreparedID(gid, branch string) (string, error) {
	if err := validateField("gid", MetadataGID, gid, MaxGIDLen); err != nil {
		return "", err
	}
	if err := validateField("branch", MetadataBranch, branch, MaxBranchLen); err != nil {
		return "", err
	}
	return PreparedIDPrefix + gid + "/" + branch, nil
}

// ParsePreparedID reverses PreparedID. ok is false for an id PreparedID cannot have made.
func ParsePreparedID(id string) (gid, branch string, ok bool) {
	rest, ok := strings.CutPrefix(id, PreparedIDPrefix)
	if !ok {
		return "", "", false
	}
	gid, branch, ok = strings.Cut(rest, "/")
	if !ok || validateField("gid", MetadataGID, gid, MaxGIDLen) != nil ||
		validateField("branch", MetadataBranch, branch, MaxBranchLen) != nil {
		return "", "", false
	}
	return gid, branch, true
}

// TwoPhaseOptions configures a TwoPhase. The zero value is valid.
type TwoPhaseOptions struct {
	// Table is the barrier table (see BarrierOptions.Table); "" means DefaultBarrierTable.
	Table string
	// LockTimeout bounds each wait of a barrier insert for another call on the same branch
	// (a duplicate prepare still running, or a rollback racing a prepare). When it expires
	// the call looks at pg_prepared_xacts again and retries, until ctx ends. A prepared
	// transaction holds its barrier row until phase two, so without this bound such a call
	// would wait for phase two instead of answering. 0 means DefaultLockTimeout.
	LockTimeout time.Duration
	// Logger receives Resolve's decisions and the retries above; nil discards.
	Logger *slog.Logger
}

// TwoPhase is the participant side of 2PC for a PostgreSQL-backed participant, using real
// prepared transactions: Prepare does the business work in a transaction that it ends with
// PREPARE TRANSACTION, so the work survives a crash of the participant without being visible;
// Commit and Rollback finish it with COMMIT PREPARED and ROLLBACK PREPARED. All three are
// idempotent and safe in any order, through barrier rows in the barrier table (which must
// exist: Barrier().EnsureTable). The server needs max_prepared_transactions > 0: call
// CheckServer at start. A TwoPhase is safe for concurrent use.
type TwoPhase struct {
	b           *Barrier
	lockTimeout string
	log         *slog.Logger
}

// NewTwoPhase returns a TwoPhase; it does not touch the database.
func NewTwoPhase(opts TwoPhaseOptions) (*TwoPhase, error) {
	b, err := NewBarrier(BarrierOptions{Table: opts.Table})
	if err != nil {
		return nil, err
	}
	if opts.LockTimeout < 0 {
		return nil, fmt.Errorf("participant: TwoPhaseOptions.LockTimeout is %s, must not be negative", opts.LockTimeout)
	}
	if opts.LockTimeout == 0 {
		opts.LockTimeout = DefaultLockTimeout
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ms := max(opts.LockTimeout.Milliseconds(), 1)
	return &TwoPhase{b: b, lockTimeout: strconv.FormatInt(ms, 10) + "ms", log: log}, nil
}

// Barrier is the barrier TwoPhase records its rows in, for EnsureTable and Cleanup.
func (tp *TwoPhase) Barrier() *Barrier { return tp.b }

// CheckServer fails, with instructions, when the server cannot prepare transactions
// (max_prepared_transactions = 0). Call it when the participant starts.
func (tp *TwoPhase) CheckServer(ctx context.Context, db PgxDB) error {
	var v string
	if err := db.QueryRow(ctx, "SHOW max_prepared_transactions").Scan(&v); err != nil {
		return fmt.Errorf("participant: read max_prepared_transactions: %w", err)
	}
	return checkMaxPrepared(v)
}

func checkMaxPrepared(v string) error {
	n, err := strconv.Atoi(v)
	if err != nil {
		return fmt.Errorf("participant: max_prepared_transactions is %q, expected a number: %w", v, err)
	}
	if n > 0 {
		return nil
	}
	return fmt.Errorf("%w: max_prepared_transactions is %d, so PREPARE TRANSACTION fails and this "+
		"database cannot be a 2PC participant. Set it above 0 (at least the number of branches that may "+
		"be prepared at once) as a superuser: ALTER SYSTEM SET max_prepared_transactions = 100; then "+
		"restart PostgreSQL (a reload is not enough), or start it with -c max_prepared_transactions=100; "+
		"check with SHOW max_prepared_transactions", ErrPreparedTransactionsDisabled, n)
}

// branch checks md for op and fills in the mode and op, so that tools may pass only GID and
// Branch.
func (tp *TwoPhase) branch(md Metadata, op string) (Metadata, string, error) {
	if md.Mode != "" && md.Mode != Mode2PC {
		return md, "", fmt.Errorf("%w: mode is %q, TwoPhase handles %q", ErrInvalidMetadata, md.Mode, Mode2PC)
	}
	if md.Op != "" && md.Op != op {
		return md, "", fmt.Errorf("%w: op is %q, but this is TwoPhase's %s", ErrInvalidMetadata, md.Op, op)
	}
	md.Mode, md.Op = Mode2PC, op
	if err := md.Validate(); err != nil {
		return md, "", err
	}
	id, err := PreparedID(md.GID, md.Branch)
	return md, id, err
}

// Prepare runs fn in a new transaction on db together with the branch's barrier row, and ends
// it with PREPARE TRANSACTION under PreparedID(gid, branch). db must be a pool or a connection,
// not a transaction. fn must do its work through tx and must not commit it.
//
//   - fn fails: the transaction is rolled back, nothing is prepared, fn's error is returned
//     unchanged.
//   - The branch is already prepared, or was prepared and committed: nil, fn does not run.
//   - Its rollback arrived first: an error wrapping ErrAborted, fn does not run.
func (tp *TwoPhase) Prepare(ctx context.Context, db PgxDB, md Metadata, fn func(ctx context.Context, tx pgx.Tx) error) error {
	md, id, err := tp.branch(md, OpPrepare)
	if err != nil {
		return err
	}
	if _, ok := db.(pgx.Tx); ok {
		return fmt.Errorf("participant: prepare %s: db is a pgx.Tx; PREPARE TRANSACTION needs a "+
			"transaction of its own: pass the pool or connection", md)
	}
	for {
		prepared, err := tp.isPrepared(ctx, db, id)
		if err != nil {
			return fmt.Errorf("participant: prepare %s: %w", md, err)
		}
		if prepared {
			return nil
		}
		done, err := tp.tryPrepare(ctx, db, md, id, fn)
		if done {
			return err
		}
		tp.log.DebugContext(ctx, "treaty 2pc prepare waits for another call on the same branch", "gid", md.GID, "branch", md.Branch)
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("participant: prepare %s: waiting for another call on the same branch: %w", md, err)
		}
	}
}

// tryPrepare makes one attempt. done is false when the barrier insert timed out waiting for
// another call on the same branch; the caller then looks at pg_prepared_xacts again.
func (tp *TwoPhase) tryPrepare(ctx context.Context, db PgxDB, md Metadata, id string,
	fn func(ctx context.Context, tx pgx.Tx) error) (done bool, err error) {
	tx, err := db.Begin(ctx)
	if err != nil {
		return true, fmt.Errorf("participant: prepare %s: begin: %w", md, err)
	}
	// After PREPARE TRANSACTION the session has no transaction: this rollback is then a no-op
	// (the server warns) that tells pgx the transaction is over and returns a pooled connection.
	defer func() { _ = tx.Rollback(ctx) }()

	batch := &pgx.Batch{}
	var orig string
	batch.Queue("SELECT current_setting('lock_timeout')").QueryRow(func(row pgx.Row) error { return row.Scan(&orig) })
	batch.Queue("SELECT set_config('lock_timeout', $1, true)", tp.lockTimeout)
	var inserted []string
	batch.Queue(tp.b.q.insertOne, md.Mode, md.GID, md.Branch, md.Op).Query(func(rows pgx.Rows) error {
		var err error
		inserted, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	})
	if err := tx.SendBatch(ctx, batch).Close(); err != nil {
		if isCode(err, "55P03") { // lock_not_available: lock_timeout expired
			return false, nil
		}
		return true, fmt.Errorf("participant: prepare %s: barrier insert into %s: %w", md, tp.b.table, err)
	}
	if len(inserted) == 0 {
		reason, found, err := pgxRunner{tx}.reason(ctx, tp.b.q.reason, md.Mode, md.GID, md.Branch, md.Op)
		switch {
		case err != nil:
			return true, fmt.Errorf("participant: prepare %s: read barrier row: %w", md, err)
		case !found:
			return true, fmt.Errorf("participant: prepare %s: barrier row vanished between insert and "+
				"read (deleted by Cleanup?); retry", md)
		case reason == OpPrepare:
			// The row is visible, so the prepared transaction that wrote it was committed.
			return true, nil
		default:
			return true, fmt.Errorf("%w: %s refused: its %s arrived first and left a marker", ErrAborted, md, reason)
		}
	}
	// fn runs under the session's own lock_timeout, not ours.
	if _, err := tx.Exec(ctx, "SELECT set_config('lock_timeout', $1, true)", orig); err != nil {
		return true, fmt.Errorf("participant: prepare %s: restore lock_timeout: %w", md, err)
	}
	if err := fn(ctx, tx); err != nil {
		return true, err
	}
	tag, err := tx.Exec(ctx, "PREPARE TRANSACTION "+quoteLiteral(id))
	if err != nil {
		return true, fmt.Errorf("participant: prepare %s: PREPARE TRANSACTION %s: %w", md, id, err)
	}
	if tag.String() != "PREPARE TRANSACTION" {
		// PostgreSQL answers ROLLBACK when the transaction had already failed.
		return true, fmt.Errorf("participant: prepare %s: the transaction had failed (a statement "+
			"in fn returned an error that fn did not return), so PostgreSQL rolled it back instead of preparing it", md)
	}
	return true, nil
}

func (tp *TwoPhase) isPrepared(ctx context.Context, db PgxDB, id string) (bool, error) {
	var prepared bool
	err := db.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE gid = $1 AND database = current_database())", id).Scan(&prepared)
	if err != nil {
		return false, fmt.Errorf("read pg_prepared_xacts: %w", err)
	}
	return prepared, nil
}

// Commit commits the branch's prepared transaction (COMMIT PREPARED). It is idempotent: when
// nothing is prepared under the id but the branch's barrier row is visible, the branch was
// committed before and Commit returns nil. A branch that was rolled back gives an error wrapping
// ErrRolledBack; one with no trace at all, ErrNotPrepared.
func (tp *TwoPhase) Commit(ctx context.Context, db PgxDB, md Metadata) error {
	md, id, err := tp.branch(md, OpCommit)
	if err != nil {
		return err
	}
	_, err = db.Exec(ctx, "COMMIT PREPARED "+quoteLiteral(id))
	if err == nil {
		return nil
	}
	if !isCode(err, "42704") { // undefined_object: no prepared transaction with this id
		return fmt.Errorf("participant: commit %s: COMMIT PREPARED %s: %w", md, id, err)
	}
	var reason string
	err = db.QueryRow(ctx, tp.b.q.reason, md.Mode, md.GID, md.Branch, OpPrepare).Scan(&reason)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		return fmt.Errorf("%w: commit %s: no prepared transaction %s and no barrier row: prepare never "+
			"succeeded here, the transaction was rolled back outside Treaty, or the row was cleaned up", ErrNotPrepared, md, id)
	case err != nil:
		return fmt.Errorf("participant: commit %s: read barrier row: %w", md, err)
	case reason == OpPrepare:
		return nil
	default:
		return fmt.Errorf("%w: commit %s: its %s arrived first; cannot commit", ErrRolledBack, md, reason)
	}
}

// Rollback rolls the branch's prepared transaction back (ROLLBACK PREPARED) and records a
// marker, so that a prepare arriving later is refused. It is idempotent, and succeeds for a
// branch that was never prepared. A branch that was committed gives an error wrapping
// ErrCommitted. A rollback racing a prepare of the same branch waits for it (LockTimeout at a
// time) and then rolls the result back.
func (tp *TwoPhase) Rollback(ctx context.Context, db PgxDB, md Metadata) error {
	md, id, err := tp.branch(md, OpRollback)
	if err != nil {
		return err
	}
	for {
		// Rolled back first, because the prepared transaction holds the barrier row the marker
		// needs.
		if _, err := db.Exec(ctx, "ROLLBACK PREPARED "+quoteLiteral(id)); err != nil && !isCode(err, "42704") {
			return fmt.Errorf("participant: rollback %s: ROLLBACK PREPARED %s: %w", md, id, err)
		}
		done, err := tp.mark(ctx, db, md)
		if done {
			return err
		}
		// A prepare of this branch is running: once it is prepared, roll it back.
		tp.log.DebugContext(ctx, "treaty 2pc rollback waits for a prepare of the same branch", "gid", md.GID, "branch", md.Branch)
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("participant: rollback %s: waiting for a prepare of the same branch: %w", md, err)
		}
	}
}

// mark records the rollback: a marker for the prepare and a row for the rollback.
func (tp *TwoPhase) mark(ctx context.Context, db PgxDB, md Metadata) (done bool, err error) {
	tx, err := db.Begin(ctx)
	if err != nil {
		return true, fmt.Errorf("participant: rollback %s: begin: %w", md, err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	batch := &pgx.Batch{}
	batch.Queue("SELECT set_config('lock_timeout', $1, true)", tp.lockTimeout)
	var inserted []string
	batch.Queue(tp.b.q.insertPair, md.Mode, md.GID, md.Branch, OpPrepare, md.Op).Query(func(rows pgx.Rows) error {
		var err error
		inserted, err = pgx.CollectRows(rows, pgx.RowTo[string])
		return err
	})
	if err := tx.SendBatch(ctx, batch).Close(); err != nil {
		if isCode(err, "55P03") {
			return false, nil
		}
		return true, fmt.Errorf("participant: rollback %s: barrier insert into %s: %w", md, tp.b.table, err)
	}
	if !slices.Contains(inserted, OpPrepare) {
		reason, found, err := pgxRunner{tx}.reason(ctx, tp.b.q.reason, md.Mode, md.GID, md.Branch, OpPrepare)
		if err != nil {
			return true, fmt.Errorf("participant: rollback %s: read barrier row: %w", md, err)
		}
		if found && reason == OpPrepare {
			return true, fmt.Errorf("%w: rollback %s: the branch was prepared and committed; cannot roll back", ErrCommitted, md)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return true, fmt.Errorf("participant: rollback %s: commit marker: %w", md, err)
	}
	return true, nil
}

// InDoubtBranch is a Treaty prepared transaction waiting for phase two.
type InDoubtBranch struct {
	GID, Branch string
	ID          string    // the prepared transaction's id (PreparedID)
	PreparedAt  time.Time // when PREPARE TRANSACTION ran
}

// InDoubt lists the Treaty prepared transactions of db's current database, oldest first.
// Entries with the prefix that PreparedID cannot have made are skipped.
func (tp *TwoPhase) InDoubt(ctx context.Context, db PgxDB) ([]InDoubtBranch, error) {
	rows, _ := db.Query(ctx, `SELECT gid, prepared FROM pg_prepared_xacts
		WHERE database = current_database() AND starts_with(gid, $1) ORDER BY prepared, gid`, PreparedIDPrefix)
	var out []InDoubtBranch
	var id string
	var at time.Time
	_, err := pgx.ForEachRow(rows, []any{&id, &at}, func() error {
		gid, branch, ok := ParsePreparedID(id)
		if !ok {
			tp.log.WarnContext(ctx, "treaty 2pc: skipping a prepared transaction with Treaty's prefix that is not a Treaty id", "id", id)
			return nil
		}
		out = append(out, InDoubtBranch{GID: gid, Branch: branch, ID: id, PreparedAt: at})
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("participant: list prepared transactions: %w", err)
	}
	return out, nil
}

// Resolve finishes every in-doubt branch of db's current database (see InDoubt): decide says
// whether the coordinator's recorded decision for the branch is commit (true) or rollback
// (false), and Resolve commits or rolls back accordingly. It goes through all branches and
// returns the errors joined; a branch whose decide fails is left prepared.
//
// decide carries the 2PC rule that a transaction without a recorded commit decision is rolled
// back: answer false when the coordinator has no commit decision for gid. Take care with
// transactions still in phase one, whose decision is not made yet: a participant should
// resolve at start, before serving, or only for gids the coordinator reports as finished or
// unknown; rolling back a branch the coordinator then decides to commit makes Commit fail with
// ErrRolledBack.
func (tp *TwoPhase) Resolve(ctx context.Context, db PgxDB, decide func(ctx context.Context, gid, branch string) (commit bool, err error)) error {
	entries, err := tp.InDoubt(ctx, db)
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		commit, err := decide(ctx, e.GID, e.Branch)
		if err != nil {
			errs = append(errs, fmt.Errorf("participant: resolve gid %q branch %q: decide: %w", e.GID, e.Branch, err))
			continue
		}
		md := Metadata{GID: e.GID, Branch: e.Branch, Mode: Mode2PC}
		if commit {
			err = tp.Commit(ctx, db, md)
		} else {
			err = tp.Rollback(ctx, db, md)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("participant: resolve: %w", err))
			continue
		}
		tp.log.InfoContext(ctx, "treaty 2pc: resolved in-doubt branch", "gid", e.GID, "branch", e.Branch,
			"commit", commit, "prepared_at", e.PreparedAt)
	}
	return errors.Join(errs...)
}

func isCode(err error, code string) bool {
	var pgErr *pgconn.PgError
	return errors.As(err, &pgErr) && pgErr.Code == code
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
