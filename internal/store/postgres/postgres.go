// Package postgres is the PostgreSQL backend of the coordinator's store (pgx v5).
//
// Every write that must be atomic is one statement (data-modifying CTEs) or one pipelined batch
// (pgx sends a batch with a single Sync, so it runs as one implicit transaction and costs one
// round trip and one commit).
package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/treatyhq/treaty/internal/migrate"
	"github.com/treatyhq/treaty/internal/store"
	"github.com/treatyhq/treaty/migrations"
)

// VersionTable records which coordinator migrations ran.
const VersionTable = "treaty_schema_migrations"

// Migrator returns the coordinator's schema migrator.
func Migrator() (*migrate.Migrator, error) {
	return migrate.New(migrations.FS, VersionTable, nil)
}

// Migrate applies every pending coordinator migration.
func Migrate(ctx context.Context, pool *pgxpool.Pool) (migrate.Result, error) {
	m, err := Migrator()
	if err != nil {
		return migrate.Result{}, err
	}
	return m.Up(ctx, pool)
}

// Store implements store.Store on PostgreSQL.
type Store struct {
	pool *pgxpool.Pool
}

var _ store.Store = (*Store)(nil)

// New wraps a pool. The caller keeps ownership of the pool only if it does not call Close.
func New(pool *pgxpool.Pool) *Store { return &Store{pool: pool} }

// Open connects to url with a pool sized for the coordinator.
func Open(ctx context.Context, url string, maxConns int32) (*Store, error) {
	cfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, fmt.Errorf("parse database url: %w", err)
	}
	if maxConns > 0 {
		cfg.MaxConns = maxConns
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("connect database: %w", err)
	}
	return New(pool), nil
}

// Pool exposes the underlying pool (for migrations and tests).
func (s *Store) Pool() *pgxpool.Pool { return s.pool }

// Close closes the pool.
func (s *Store) Close() { s.pool.Close() }

// The creation statement writes a transaction with its first events and, when there are any,
// its first branch rows (createBranchesCTE, whose parameters come last so that the statement
// without it takes a prefix of the arguments). A saga is created without branch rows, and a
// statement without the branch insert is cheaper to run.
const createHeadSQL = `
WITH t AS (
    INSERT INTO treaty_transactions
        (gid, mode, status, spec, spec_hash, workflow_name, workflow_version, deadline,
         next_attempt_at, lease_owner, lease_expires_at, epoch)
    VALUES ($1, $2, $3, $4, $5, nullif($6, ''), nullif($7, 0), now() + $8::interval,
            CASE WHEN $9 = '' THEN now() + $8::interval ELSE now() + $10::interval END,
            nullif($9, ''),
            CASE WHEN $9 = '' THEN NULL ELSE now() + $10::interval END, 1)
    ON CONFLICT (gid) DO NOTHING
    RETURNING gid, created_at, updated_at, deadline, next_attempt_at, lease_expires_at
), e AS (
    INSERT INTO treaty_events (gid, at, kind, branch, op, detail)
    SELECT t.gid, coalesce(x.at, now()), x.kind, x.branch, x.op, x.detail
    FROM t, unnest($11::text[], $12::text[], $13::text[], $14::text[], $15::timestamptz[]) WITH ORDINALITY AS x(kind, branch, op, detail, at, n)
    ORDER BY x.n
)`

const createTailSQL = `
SELECT created_at, updated_at, deadline, next_attempt_at, lease_expires_at FROM t`

const createBranchesCTE = `, b AS (
    INSERT INTO treaty_branches (gid, branch, op, position, status, attempts, last_error, next_attempt_at, uncertain, spec)
    SELECT t.gid, x.branch, x.op, x.position, x.status, x.attempts, x.last_error, x.next_at, x.uncertain, x.spec
    FROM t, unnest($16::text[], $17::text[], $18::int[], $19::text[], $20::int[], $21::text[], $22::timestamptz[], $23::bool[], $24::bytea[])
        AS x(branch, op, position, status, attempts, last_error, next_at, uncertain, spec)
)`

const (
	createWithBranchesSQL = createHeadSQL + createBranchesCTE + createTailSQL
	createBareSQL         = createHeadSQL + createTailSQL
)

// CreateTransaction implements store.Store.
func (s *Store) CreateTransaction(ctx context.Context, p store.CreateParams) (store.CreateResult, error) {
	res, _, err := s.Commit(ctx, []store.CreateParams{p}, nil)
	if err != nil {
		return store.CreateResult{}, err
	}
	return res[0], nil
}

// recordSQL is one fenced write: the transaction row is updated only at the caller's epoch, and
// branches and events are written only if that update matched. A write already applied (same
// write id, read in the statement's snapshot, before this update) is owned and changes nothing.
const recordSQL = `
WITH t AS (
    UPDATE treaty_transactions SET
        status = $3,
        reason = $4,
        updated_at = now(),
        -- Never shorten a lease: a driver may hold a longer one for a long call.
        next_attempt_at = CASE WHEN $5 THEN NULL ELSE greatest(lease_expires_at, now() + $6::interval) END,
        lease_expires_at = CASE WHEN $5 THEN NULL ELSE greatest(lease_expires_at, now() + $6::interval) END,
        lease_owner = CASE WHEN $5 THEN NULL ELSE lease_owner END,
        paused = $19,
        last_write = $20::bigint
    WHERE gid = $1 AND epoch = $2 AND ($20::bigint = 0 OR last_write <> $20::bigint)
    RETURNING gid, lease_expires_at
), b AS (
    INSERT INTO treaty_branches (gid, branch, op, position, status, attempts, last_error, next_attempt_at, uncertain, updated_at)
    SELECT t.gid, x.branch, x.op, x.position, x.status, x.attempts, x.last_error, x.next_at, x.uncertain, now()
    FROM t, unnest($7::text[], $8::text[], $9::int[], $10::text[], $11::int[], $12::text[], $13::timestamptz[], $18::bool[])
        AS x(branch, op, position, status, attempts, last_error, next_at, uncertain)
    ON CONFLICT (gid, branch, op) DO UPDATE SET
        status = excluded.status, attempts = excluded.attempts, last_error = excluded.last_error,
        next_attempt_at = excluded.next_attempt_at, uncertain = excluded.uncertain, updated_at = excluded.updated_at
), e AS (
    INSERT INTO treaty_events (gid, at, kind, branch, op, detail)
    SELECT t.gid, coalesce(x.at, now()), x.kind, x.branch, x.op, x.detail
    FROM t, unnest($14::text[], $15::text[], $16::text[], $17::text[], $21::timestamptz[]) WITH ORDINALITY AS x(kind, branch, op, detail, at, n)
    ORDER BY x.n
)
SELECT CASE WHEN count(*) = 1 THEN 1
            -- Only when the update matched nothing: a second index probe per record otherwise
            -- (the subquery is an InitPlan, run on first use).
            ELSE (SELECT count(*) FROM treaty_transactions WHERE $20::bigint <> 0 AND gid = $1 AND epoch = $2 AND last_write = $20::bigint) END,
       max(lease_expires_at) FROM t`

// Record implements store.Store: all writes in one pipelined batch, one commit.
func (s *Store) Record(ctx context.Context, ps []store.RecordParams) ([]store.RecordResult, error) {
	_, res, err := s.Commit(ctx, nil, ps)
	return res, err
}

// Commit implements store.Store: creations and fenced writes in one pipelined batch (pgx sends
// it with a single Sync: one implicit transaction, one round trip, one commit).
func (s *Store) Commit(ctx context.Context, cs []store.CreateParams, ps []store.RecordParams) ([]store.CreateResult, []store.RecordResult, error) {
	if len(cs)+len(ps) == 0 {
		return nil, nil, nil
	}
	// Write in gid order (bytewise, as COLLATE "C"), the order RenewLeases locks rows in: a
	// group commit and a lease renewal that touch the same transactions then never wait for
	// each other in a cycle (a deadlock costs deadlock_timeout, 1s by default, and fails both).
	// Creations are ordered with the rest: two batches creating the same gids (a client
	// retrying) then wait for each other in one order.
	type item struct {
		gid    string
		create bool
		i      int
	}
	items := make([]item, 0, len(cs)+len(ps))
	for i := range cs {
		items = append(items, item{cs[i].GID, true, i})
	}
	for i := range ps {
		items = append(items, item{ps[i].GID, false, i})
	}
	slices.SortStableFunc(items, func(a, b item) int { return strings.Compare(a.gid, b.gid) })
	batch := &pgx.Batch{}
	for _, it := range items {
		if it.create {
			p := cs[it.i]
			ek, eb, eo, ed := eventArrays(p.Events)
			args := []any{p.GID, p.Mode, p.Status, p.Spec, p.SpecHash, p.WorkflowName, p.WorkflowVersion,
				p.Timeout, p.Owner, p.Lease, ek, eb, eo, ed, eventTimes(p.Events)}
			if len(p.Branches) == 0 {
				batch.Queue(createBareSQL, args...)
				continue
			}
			bn, bo, bp, bs := branchArrays(p.Branches)
			ba, be, bt, bu := branchStateArrays(p.Branches)
			batch.Queue(createWithBranchesSQL, append(args, bn, bo, bp, bs, ba, be, bt, bu, branchSpecs(p.Branches))...)
			continue
		}
		p := ps[it.i]
		bn, bo, bpos, bs := branchArrays(p.Branches)
		ba, be, bt, bu := branchStateArrays(p.Branches)
		ek, eb, eo, ed := eventArrays(p.Events)
		batch.Queue(recordSQL, p.GID, p.Epoch, p.Status, p.Reason, p.Terminal, p.Lease,
			bn, bo, bpos, bs, ba, be, bt, ek, eb, eo, ed, bu, p.Paused, p.WriteID, eventTimes(p.Events))
	}
	br := s.pool.SendBatch(ctx, batch)
	created := make([]store.CreateResult, len(cs))
	recorded := make([]store.RecordResult, len(ps))
	var taken []int // creations whose gid existed: nothing written, the stored row is reported
	for _, it := range items {
		if it.create {
			p := cs[it.i]
			t := store.Transaction{
				GID: p.GID, Mode: p.Mode, Status: p.Status, Spec: p.Spec, SpecHash: p.SpecHash,
				WorkflowName: p.WorkflowName, WorkflowVersion: p.WorkflowVersion,
				LeaseOwner: p.Owner, Epoch: 1,
			}
			var leaseExp *time.Time
			err := br.QueryRow().Scan(&t.CreatedAt, &t.UpdatedAt, &t.Deadline, &t.NextAttemptAt, &leaseExp)
			if errors.Is(err, pgx.ErrNoRows) {
				taken = append(taken, it.i)
				continue
			}
			if err != nil {
				_ = br.Close()
				return nil, nil, fmt.Errorf("create transaction %q: %w", p.GID, err)
			}
			if leaseExp != nil {
				t.LeaseExpiresAt = *leaseExp
			}
			created[it.i] = store.CreateResult{Created: true, Transaction: t}
			continue
		}
		var n int64
		var exp *time.Time
		if err := br.QueryRow().Scan(&n, &exp); err != nil {
			_ = br.Close()
			return nil, nil, fmt.Errorf("record %q: %w", ps[it.i].GID, err)
		}
		recorded[it.i].Owned = n == 1
		if exp != nil {
			recorded[it.i].LeaseExpiresAt = *exp
		}
	}
	if err := br.Close(); err != nil {
		return nil, nil, fmt.Errorf("group commit: %w", err)
	}
	for _, i := range taken {
		existing, _, err := s.GetTransaction(ctx, cs[i].GID)
		if err != nil {
			return nil, nil, err
		}
		created[i] = store.CreateResult{Created: false, Transaction: existing}
	}
	return created, recorded, nil
}

const txColumns = `gid, mode, status, spec, spec_hash, coalesce(workflow_name, ''), coalesce(workflow_version, 0),
    reason, created_at, updated_at, deadline, next_attempt_at, coalesce(lease_owner, ''), lease_expires_at, epoch, paused`

// scanTxAnd scans a transaction row followed by extra columns.
func scanTxAnd(row pgx.Row, extra ...any) (store.Transaction, error) {
	var t store.Transaction
	var next, lease *time.Time
	dest := append([]any{&t.GID, &t.Mode, &t.Status, &t.Spec, &t.SpecHash, &t.WorkflowName, &t.WorkflowVersion,
		&t.Reason, &t.CreatedAt, &t.UpdatedAt, &t.Deadline, &next, &t.LeaseOwner, &lease, &t.Epoch, &t.Paused}, extra...)
	err := row.Scan(dest...)
	if next != nil {
		t.NextAttemptAt = *next
	}
	if lease != nil {
		t.LeaseExpiresAt = *lease
	}
	return t, err
}

func scanTx(row pgx.Row) (store.Transaction, error) { return scanTxAnd(row) }

const branchesSQL = `SELECT gid, branch, op, position, status, attempts, last_error, next_attempt_at, uncertain, spec, updated_at
    FROM treaty_branches WHERE gid = ANY($1) ORDER BY gid, position, op`

func (s *Store) branches(ctx context.Context, gids []string) (map[string][]store.Branch, error) {
	// Planned afresh each time (unnamed statement): a generic plan cached while the table was
	// small is a sequential scan, and it stays one until autovacuum analyzes the table, a minute or
	// more on a fresh database under load.
	rows, err := s.pool.Query(ctx, branchesSQL, pgx.QueryExecModeCacheDescribe, gids)
	if err != nil {
		return nil, fmt.Errorf("read branches: %w", err)
	}
	defer rows.Close()
	out := make(map[string][]store.Branch, len(gids))
	for rows.Next() {
		var gid string
		var b store.Branch
		var next *time.Time
		if err := rows.Scan(&gid, &b.Branch, &b.Op, &b.Position, &b.Status, &b.Attempts, &b.LastError, &next, &b.Uncertain, &b.Spec, &b.UpdatedAt); err != nil {
			return nil, fmt.Errorf("read branches: %w", err)
		}
		if next != nil {
			b.NextAttemptAt = *next
		}
		out[gid] = append(out[gid], b)
	}
	return out, rows.Err()
}

// GetTransaction implements store.Store.
func (s *Store) GetTransaction(ctx context.Context, gid string) (store.Transaction, []store.Branch, error) {
	t, err := scanTx(s.pool.QueryRow(ctx, "SELECT "+txColumns+" FROM treaty_transactions WHERE gid = $1", gid))
	if errors.Is(err, pgx.ErrNoRows) {
		return store.Transaction{}, nil, fmt.Errorf("%w: %q", store.ErrNotFound, gid)
	}
	if err != nil {
		return store.Transaction{}, nil, fmt.Errorf("read transaction %q: %w", gid, err)
	}
	bs, err := s.branches(ctx, []string{gid})
	if err != nil {
		return store.Transaction{}, nil, err
	}
	return t, bs[gid], nil
}

// ListEvents implements store.Store.
func (s *Store) ListEvents(ctx context.Context, gid string) ([]store.Event, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, at, kind, branch, op, detail FROM treaty_events WHERE gid = $1 ORDER BY id`, gid)
	if err != nil {
		return nil, fmt.Errorf("read events of %q: %w", gid, err)
	}
	defer rows.Close()
	var out []store.Event
	for rows.Next() {
		var e store.Event
		if err := rows.Scan(&e.ID, &e.At, &e.Kind, &e.Branch, &e.Op, &e.Detail); err != nil {
			return nil, fmt.Errorf("read events of %q: %w", gid, err)
		}
		out = append(out, e)
	}
	return out, rows.Err()
}

const claimSQL = `
UPDATE treaty_transactions t SET
    lease_owner = $1,
    lease_expires_at = now() + $2::interval,
    next_attempt_at = now() + $2::interval,
    epoch = t.epoch + 1,
    updated_at = now()
WHERE t.gid IN (
    SELECT gid FROM treaty_transactions
    WHERE next_attempt_at IS NOT NULL AND next_attempt_at <= now()
      AND (lease_expires_at IS NULL OR lease_expires_at <= now())
    ORDER BY next_attempt_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING ` + txColumns

// ClaimDue implements store.Store.
func (s *Store) ClaimDue(ctx context.Context, p store.ClaimParams) ([]store.Claimed, error) {
	if p.Limit <= 0 {
		return nil, nil
	}
	rows, err := s.pool.Query(ctx, claimSQL, p.Owner, p.Lease, p.Limit)
	if err != nil {
		return nil, fmt.Errorf("claim due transactions: %w", err)
	}
	var txs []store.Transaction
	for rows.Next() {
		t, err := scanTx(rows)
		if err != nil {
			rows.Close()
			return nil, fmt.Errorf("claim due transactions: %w", err)
		}
		txs = append(txs, t)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("claim due transactions: %w", err)
	}
	if len(txs) == 0 {
		return nil, nil
	}
	gids := make([]string, len(txs))
	for i, t := range txs {
		gids[i] = t.GID
	}
	// Read after the claim committed: we own these rows now, so nobody else changes them.
	bs, err := s.branches(ctx, gids)
	if err != nil {
		return nil, err
	}
	out := make([]store.Claimed, len(txs))
	for i, t := range txs {
		out[i] = store.Claimed{Transaction: t, Branches: bs[t.GID]}
	}
	return out, nil
}

// renewSQL locks the rows in gid order (bytewise) before updating them, the order Record writes
// in, so a renewal and a group commit cannot deadlock. An UPDATE ... FROM would lock rows in
// whatever order the join produced them.
const renewSQL = `
WITH locked AS MATERIALIZED (
    SELECT t.gid
    FROM treaty_transactions t
    JOIN unnest($3::text[], $4::bigint[]) AS x(gid, epoch) ON t.gid = x.gid AND t.epoch = x.epoch
    WHERE t.lease_owner = $1 AND t.next_attempt_at IS NOT NULL
    ORDER BY t.gid COLLATE "C"
    FOR UPDATE OF t
)
UPDATE treaty_transactions t SET
    lease_expires_at = greatest(t.lease_expires_at, now() + $2::interval),
    next_attempt_at = greatest(t.lease_expires_at, now() + $2::interval)
FROM locked
WHERE t.gid = locked.gid
RETURNING t.gid, t.lease_expires_at`

// RenewLeases implements store.Store.
func (s *Store) RenewLeases(ctx context.Context, p store.RenewParams) (store.RenewResult, error) {
	res := store.RenewResult{Renewed: make(map[string]bool, len(p.Refs))}
	if len(p.Refs) == 0 {
		return res, nil
	}
	gids := make([]string, len(p.Refs))
	epochs := make([]int64, len(p.Refs))
	for i, r := range p.Refs {
		gids[i], epochs[i] = r.GID, r.Epoch
	}
	rows, err := s.pool.Query(ctx, renewSQL, p.Owner, p.Lease, gids, epochs)
	if err != nil {
		return res, fmt.Errorf("renew leases: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var gid string
		var exp time.Time
		if err := rows.Scan(&gid, &exp); err != nil {
			return res, fmt.Errorf("renew leases: %w", err)
		}
		res.Renewed[gid] = true
		res.LeaseExpiresAt = exp
	}
	return res, rows.Err()
}

const releaseSQL = `
UPDATE treaty_transactions t SET
    lease_owner = NULL,
    lease_expires_at = NULL,
    -- A transaction waiting for its initiator (TCC trying, message prepared) must stay free
    -- for it until its deadline; anything else is due at its next retry.
    next_attempt_at = CASE WHEN t.status IN ('trying', 'prepared') THEN greatest(now(), t.deadline)
                           ELSE greatest(now(), coalesce(x.next_at, now())) END,
    updated_at = now()
FROM unnest($2::text[], $3::bigint[], $4::timestamptz[]) AS x(gid, epoch, next_at)
WHERE t.gid = x.gid AND t.epoch = x.epoch AND t.lease_owner = $1 AND t.next_attempt_at IS NOT NULL`

// ReleaseLeases implements store.Store.
func (s *Store) ReleaseLeases(ctx context.Context, owner string, rs []store.Release) error {
	if len(rs) == 0 {
		return nil
	}
	gids := make([]string, len(rs))
	epochs := make([]int64, len(rs))
	next := make([]*time.Time, len(rs))
	for i, r := range rs {
		gids[i], epochs[i] = r.GID, r.Epoch
		if !r.NextAttemptAt.IsZero() {
			t := r.NextAttemptAt
			next[i] = &t
		}
	}
	if _, err := s.pool.Exec(ctx, releaseSQL, owner, gids, epochs, next); err != nil {
		return fmt.Errorf("release leases: %w", err)
	}
	return nil
}

// registerWorkflowSQL adds a version only when the newest one differs. Locking the newest row
// serialises concurrent registrations of one name; the very first ones race on the primary key
// instead, and the loser retries.
const registerWorkflowSQL = `
WITH latest AS (
    SELECT version, spec_hash FROM treaty_workflows WHERE name = $1
    ORDER BY version DESC LIMIT 1 FOR UPDATE
)
INSERT INTO treaty_workflows (name, version, spec, spec_hash)
SELECT $1, coalesce((SELECT version FROM latest), 0) + 1, $2, $3
WHERE NOT EXISTS (SELECT 1 FROM latest WHERE spec_hash = $3)
ON CONFLICT (name, version) DO NOTHING
RETURNING name, version, spec, spec_hash, created_at`

// RegisterWorkflow implements store.Store.
func (s *Store) RegisterWorkflow(ctx context.Context, name string, spec, hash []byte) (store.Workflow, bool, error) {
	for range 5 {
		var w store.Workflow
		err := s.pool.QueryRow(ctx, registerWorkflowSQL, name, spec, hash).Scan(&w.Name, &w.Version, &w.Spec, &w.SpecHash, &w.CreatedAt)
		if err == nil {
			return w, true, nil
		}
		if !errors.Is(err, pgx.ErrNoRows) {
			return store.Workflow{}, false, fmt.Errorf("register workflow %q: %w", name, err)
		}
		latest, err := s.GetWorkflow(ctx, name, 0)
		if err == nil && string(latest.SpecHash) == string(hash) {
			return latest, false, nil
		}
		// Lost a race for the next version number: try again.
	}
	return store.Workflow{}, false, fmt.Errorf("register workflow %q: too much contention", name)
}

// GetWorkflow implements store.Store.
func (s *Store) GetWorkflow(ctx context.Context, name string, version int) (store.Workflow, error) {
	var w store.Workflow
	err := s.pool.QueryRow(ctx, `SELECT name, version, spec, spec_hash, created_at FROM treaty_workflows
		WHERE name = $1 AND ($2 = 0 OR version = $2) ORDER BY version DESC LIMIT 1`, name, version).
		Scan(&w.Name, &w.Version, &w.Spec, &w.SpecHash, &w.CreatedAt)
	if errors.Is(err, pgx.ErrNoRows) {
		if version == 0 {
			return w, fmt.Errorf("%w: workflow %q", store.ErrNotFound, name)
		}
		return w, fmt.Errorf("%w: workflow %q version %d", store.ErrNotFound, name, version)
	}
	if err != nil {
		return w, fmt.Errorf("read workflow %q: %w", name, err)
	}
	return w, nil
}

// ListWorkflows implements store.Store.
func (s *Store) ListWorkflows(ctx context.Context, name string) ([]store.Workflow, error) {
	rows, err := s.pool.Query(ctx, `SELECT name, version, spec, spec_hash, created_at FROM treaty_workflows
		WHERE $1 = '' OR name = $1 ORDER BY name, version`, name)
	if err != nil {
		return nil, fmt.Errorf("list workflows: %w", err)
	}
	defer rows.Close()
	var out []store.Workflow
	for rows.Next() {
		var w store.Workflow
		if err := rows.Scan(&w.Name, &w.Version, &w.Spec, &w.SpecHash, &w.CreatedAt); err != nil {
			return nil, fmt.Errorf("list workflows: %w", err)
		}
		out = append(out, w)
	}
	return out, rows.Err()
}

const listSQL = `SELECT ` + txColumns + ` FROM treaty_transactions
WHERE (cardinality($1::text[]) = 0 OR status = ANY($1))
  AND (cardinality($2::text[]) = 0 OR mode = ANY($2))
  AND ($3 = '' OR workflow_name = $3)
  AND ($4 = '' OR starts_with(gid, $4))
  AND ($5::timestamptz IS NULL OR created_at >= $5)
  AND ($6::timestamptz IS NULL OR created_at < $6)
  AND ($7::timestamptz IS NULL OR updated_at >= $7)
  AND ($8::timestamptz IS NULL OR updated_at < $8)
  AND ($9::timestamptz IS NULL OR (created_at, gid) < ($9, $10))
ORDER BY created_at DESC, gid DESC
LIMIT $11`

func optTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	return &t
}

// ListTransactions implements store.Store.
func (s *Store) ListTransactions(ctx context.Context, f store.ListFilter) ([]store.Transaction, error) {
	if f.Statuses == nil {
		f.Statuses = []string{}
	}
	if f.Modes == nil {
		f.Modes = []string{}
	}
	rows, err := s.pool.Query(ctx, listSQL, f.Statuses, f.Modes, f.Workflow, f.GIDPrefix,
		optTime(f.CreatedAfter), optTime(f.CreatedBefore), optTime(f.UpdatedAfter), optTime(f.UpdatedBefore),
		optTime(f.AfterCreated), f.AfterGID, f.Limit)
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

// finishedSQLList is store.FinishedStatuses as SQL. The partial index of unfinished
// transactions (migration 005) has the same list: the planner uses the index only when the query
// repeats its predicate word for word.
const finishedSQLList = `'succeeded', 'compensated', 'confirmed', 'cancelled', 'committed', 'rolled_back', 'aborted'`

const statsUnfinishedSQL = `SELECT mode, status, count(*) FROM treaty_transactions
WHERE status NOT IN (` + finishedSQLList + `) GROUP BY mode, status ORDER BY mode, status`

// statsBacklogSQL reads the partial index of live transactions (next_attempt_at not NULL).
const statsBacklogSQL = `
SELECT count(*) FILTER (WHERE next_attempt_at <= now()),
       count(*) FILTER (WHERE next_attempt_at <= now() - $1::interval),
       coalesce(extract(epoch FROM now() - min(next_attempt_at) FILTER (WHERE next_attempt_at <= now())), 0),
       min(created_at)
FROM treaty_transactions WHERE next_attempt_at IS NOT NULL`

// statsRowsSQL is the planner's estimate of the table's rows (-1 before the first analyze).
const statsRowsSQL = `SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = 'treaty_transactions'::regclass`

// Stats implements store.Store: one round trip, and no statement reads the whole table. The
// unfinished transactions are counted from their partial index, the backlog from the index of
// live ones, and the finished total is the table's estimated size less the unfinished.
func (s *Store) Stats(ctx context.Context) (store.Stats, error) {
	var st store.Stats
	b := &pgx.Batch{}
	b.Queue(statsUnfinishedSQL)
	b.Queue(statsBacklogSQL, store.OverdueAfter)
	b.Queue(statsRowsSQL)
	br := s.pool.SendBatch(ctx, b)
	defer br.Close()
	rows, err := br.Query()
	if err != nil {
		return st, fmt.Errorf("transaction statistics: %w", err)
	}
	unfinished := 0
	for rows.Next() {
		var c store.StatusCount
		if err := rows.Scan(&c.Mode, &c.Status, &c.Count); err != nil {
			rows.Close()
			return st, fmt.Errorf("transaction statistics: %w", err)
		}
		if c.Status == "needs_operator" {
			st.NeedsOperator += c.Count
		}
		unfinished += c.Count
		st.ByStatus = append(st.ByStatus, c)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return st, fmt.Errorf("transaction statistics: %w", err)
	}
	var oldestDue float64
	var oldestRunning *time.Time
	if err := br.QueryRow().Scan(&st.Due, &st.Overdue, &oldestDue, &oldestRunning); err != nil {
		return st, fmt.Errorf("recovery backlog: %w", err)
	}
	st.OldestDue = time.Duration(oldestDue * float64(time.Second))
	if oldestRunning != nil {
		st.OldestRunning = *oldestRunning
	}
	var total int64
	if err := br.QueryRow().Scan(&total); err != nil {
		return st, fmt.Errorf("transaction statistics: table size: %w", err)
	}
	st.Finished = max(0, int(total)-unfinished)
	return st, nil
}

const claimOperatorSQL = `
UPDATE treaty_transactions SET
    lease_owner = $2, lease_expires_at = now() + $3::interval, next_attempt_at = now() + $3::interval,
    epoch = epoch + 1, updated_at = now()
WHERE gid = $1 AND (lease_expires_at IS NULL OR lease_expires_at <= now())
RETURNING ` + txColumns

// ClaimForOperator implements store.Store.
func (s *Store) ClaimForOperator(ctx context.Context, gid, owner string, lease time.Duration) (store.Claimed, error) {
	t, err := scanTx(s.pool.QueryRow(ctx, claimOperatorSQL, gid, owner, lease))
	if errors.Is(err, pgx.ErrNoRows) {
		cur, _, err := s.GetTransaction(ctx, gid)
		if err != nil {
			return store.Claimed{}, err
		}
		return store.Claimed{}, fmt.Errorf("%w: %q is driven by %s until %s", store.ErrLeased, gid, cur.LeaseOwner, cur.LeaseExpiresAt.UTC().Format(time.RFC3339))
	}
	if err != nil {
		return store.Claimed{}, fmt.Errorf("claim %q for an operator: %w", gid, err)
	}
	bs, err := s.branches(ctx, []string{gid})
	if err != nil {
		return store.Claimed{}, err
	}
	return store.Claimed{Transaction: t, Branches: bs[gid]}, nil
}

// Now implements store.Store.
func (s *Store) Now(ctx context.Context) (time.Time, error) {
	var t time.Time
	if err := s.pool.QueryRow(ctx, "SELECT now()").Scan(&t); err != nil {
		return time.Time{}, fmt.Errorf("read database clock: %w", err)
	}
	return t, nil
}

// Ping implements store.Store: the database answers and every migration this binary knows ran.
func (s *Store) Ping(ctx context.Context) error {
	m, err := Migrator()
	if err != nil {
		return err
	}
	v, err := m.Current(ctx, s.pool)
	if err != nil {
		return fmt.Errorf("database unreachable: %w", err)
	}
	if v > m.Latest() {
		// Migrating cannot help here: a newer binary moved the schema on, and this one is stale.
		return fmt.Errorf("schema at version %d is newer than this binary knows (%d): upgrade the binary", v, m.Latest())
	}
	if v < m.Latest() {
		return fmt.Errorf("schema at version %d, this binary needs %d: run `coordinator migrate`", v, m.Latest())
	}
	return nil
}

func branchSpecs(bs []store.Branch) [][]byte {
	out := make([][]byte, len(bs))
	for i, b := range bs {
		out[i] = b.Spec
	}
	return out
}

// registerLockSQL runs first, in the same implicit transaction as registerSQL: it locks the
// transaction row so that a concurrent registration, Transition or claim waits for this one to
// commit. registerSQL is a separate statement so that its snapshot is taken after the lock is
// held: it then sees the branches the previous registration added, and numbers the new ones
// after them. (Within one statement, a lock wait does not refresh the snapshot the position
// subquery reads, and two registrations could take the same position.)
const registerLockSQL = `SELECT 1 FROM treaty_transactions WHERE gid = $1 FOR UPDATE`

// registerSQL adds branches only while the transaction is open: in an allowed status, unleased,
// before its deadline.
const registerSQL = `
WITH t AS (
    SELECT ` + txColumns + ` FROM treaty_transactions
    WHERE gid = $1 AND status = ANY($2) AND lease_owner IS NULL AND deadline > now()
), f AS (
    SELECT $12::int > 0 AND (SELECT count(*) FROM treaty_branches WHERE gid = $1) + cardinality($3::text[]) > $12 AS is_full
), b AS (
    INSERT INTO treaty_branches (gid, branch, op, position, status, spec)
    SELECT t.gid, x.branch, x.op,
           (SELECT coalesce(max(position) + 1, 0) FROM treaty_branches WHERE gid = $1) + x.rel,
           x.status, x.spec
    FROM t, unnest($3::text[], $4::text[], $5::text[], $6::bytea[], $11::int[]) AS x(branch, op, status, spec, rel)
    WHERE NOT (SELECT is_full FROM f)
    ON CONFLICT (gid, branch, op) DO NOTHING
    RETURNING branch
), e AS (
    INSERT INTO treaty_events (gid, kind, branch, op, detail)
    SELECT t.gid, x.kind, x.branch, x.op, x.detail
    FROM t, unnest($7::text[], $8::text[], $9::text[], $10::text[]) WITH ORDINALITY AS x(kind, branch, op, detail, n)
    WHERE x.branch = '' OR x.branch IN (SELECT branch FROM b)
    ORDER BY x.n
)
SELECT t.*, coalesce((SELECT array_agg(DISTINCT branch) FROM b), '{}'), (SELECT is_full FROM f) FROM t`

// RegisterBranches implements store.Store.
func (s *Store) RegisterBranches(ctx context.Context, p store.RegisterParams) (store.RegisterResult, error) {
	names := make([]string, len(p.Branches))
	ops := make([]string, len(p.Branches))
	status := make([]string, len(p.Branches))
	rel := make([]int32, len(p.Branches)) // Position relative to the branches already there
	for i, b := range p.Branches {
		names[i], ops[i], status[i], rel[i] = b.Branch, b.Op, b.Status, int32(b.Position)
	}
	ek, eb, eo, ed := eventArrays(p.Events)
	var inserted []string
	var full bool
	batch := &pgx.Batch{}
	batch.Queue(registerLockSQL, p.GID)
	batch.Queue(registerSQL, p.GID, p.Statuses, names, ops, status, branchSpecs(p.Branches), ek, eb, eo, ed, rel, p.MaxRows)
	br := s.pool.SendBatch(ctx, batch)
	_, err := br.Exec()
	var t store.Transaction
	if err == nil {
		t, err = scanTxAnd(br.QueryRow(), &inserted, &full)
	}
	if cerr := br.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if errors.Is(err, pgx.ErrNoRows) {
		// Not open: say why with the stored row (or ErrNotFound).
		cur, _, err := s.GetTransaction(ctx, p.GID)
		if err != nil {
			return store.RegisterResult{}, err
		}
		return store.RegisterResult{Transaction: cur, Existing: map[string][]byte{}}, nil
	}
	if err != nil {
		return store.RegisterResult{}, fmt.Errorf("register branches of %q: %w", p.GID, err)
	}
	res := store.RegisterResult{Open: true, Transaction: t, Existing: map[string][]byte{}, Full: full}
	// Rows that were there before keep their spec; report it so the caller can compare. Only
	// a repeated registration pays for this read.
	isNew := map[string]bool{}
	for _, n := range inserted {
		isNew[n] = true
	}
	var old []string
	for _, b := range p.Branches {
		if !isNew[b.Branch] {
			old = append(old, b.Branch)
		}
	}
	if len(old) == 0 {
		return res, nil
	}
	rows, err := s.pool.Query(ctx, `SELECT DISTINCT ON (branch) branch, spec FROM treaty_branches WHERE gid = $1 AND branch = ANY($2) ORDER BY branch, op`, p.GID, old)
	if err != nil {
		return store.RegisterResult{}, fmt.Errorf("register branches of %q: read existing: %w", p.GID, err)
	}
	defer rows.Close()
	for rows.Next() {
		var name string
		var spec []byte
		if err := rows.Scan(&name, &spec); err != nil {
			return store.RegisterResult{}, fmt.Errorf("register branches of %q: read existing: %w", p.GID, err)
		}
		res.Existing[name] = spec
	}
	return res, rows.Err()
}

const transitionSQL = `
WITH t AS (
    UPDATE treaty_transactions SET
        status = $3, reason = CASE WHEN $4 = '' THEN reason ELSE $4 END,
        lease_owner = $5, lease_expires_at = now() + $6::interval,
        next_attempt_at = now() + $6::interval, epoch = epoch + 1, updated_at = now()
    WHERE gid = $1 AND status = ANY($2) AND NOT paused AND (lease_expires_at IS NULL OR lease_expires_at <= now())
      AND (NOT $11 OR deadline > now())
    RETURNING ` + txColumns + `
), e AS (
    INSERT INTO treaty_events (gid, kind, branch, op, detail)
    SELECT t.gid, x.kind, x.branch, x.op, x.detail
    FROM t, unnest($7::text[], $8::text[], $9::text[], $10::text[]) WITH ORDINALITY AS x(kind, branch, op, detail, n)
    ORDER BY x.n
)
SELECT * FROM t`

// Transition implements store.Store.
func (s *Store) Transition(ctx context.Context, p store.TransitionParams) (store.TransitionResult, error) {
	ek, eb, eo, ed := eventArrays(p.Events)
	t, err := scanTx(s.pool.QueryRow(ctx, transitionSQL, p.GID, p.From, p.To, p.Reason, p.Owner, p.Lease, ek, eb, eo, ed, p.BeforeDeadline))
	if errors.Is(err, pgx.ErrNoRows) {
		cur, _, err := s.GetTransaction(ctx, p.GID)
		if err != nil {
			return store.TransitionResult{}, err
		}
		return store.TransitionResult{Current: cur}, nil
	}
	if err != nil {
		return store.TransitionResult{}, fmt.Errorf("transition %q to %s: %w", p.GID, p.To, err)
	}
	bs, err := s.branches(ctx, []string{p.GID})
	if err != nil {
		return store.TransitionResult{}, err
	}
	return store.TransitionResult{Done: true, Claimed: store.Claimed{Transaction: t, Branches: bs[p.GID]}}, nil
}

func branchArrays(bs []store.Branch) (names, ops []string, pos []int32, status []string) {
	names, ops, status = make([]string, len(bs)), make([]string, len(bs)), make([]string, len(bs))
	pos = make([]int32, len(bs))
	for i, b := range bs {
		names[i], ops[i], pos[i], status[i] = b.Branch, b.Op, int32(b.Position), b.Status
	}
	return
}

// branchStateArrays holds the retry state of branches; a zero NextAttemptAt is stored as NULL.
func branchStateArrays(bs []store.Branch) (attempts []int32, lastErrors []string, next []*time.Time, uncertain []bool) {
	attempts, lastErrors = make([]int32, len(bs)), make([]string, len(bs))
	next, uncertain = make([]*time.Time, len(bs)), make([]bool, len(bs))
	for i, b := range bs {
		attempts[i], lastErrors[i], uncertain[i] = int32(b.Attempts), b.LastError, b.Uncertain
		if !b.NextAttemptAt.IsZero() {
			t := b.NextAttemptAt
			next[i] = &t
		}
	}
	return
}

// eventTimes is each event's At, NULL (the time of the write) where it is zero.
func eventTimes(es []store.Event) []*time.Time {
	out := make([]*time.Time, len(es))
	for i := range es {
		if !es[i].At.IsZero() {
			out[i] = &es[i].At
		}
	}
	return out
}

func eventArrays(es []store.Event) (kinds, branches, ops, details []string) {
	kinds, branches, ops, details = make([]string, len(es)), make([]string, len(es)), make([]string, len(es)), make([]string, len(es))
	for i, e := range es {
		kinds[i], branches[i], ops[i], details[i] = e.Kind, e.Branch, e.Op, e.Detail
	}
	return
}
