-- Mirrors migrations/005_review_fixes.up.sql.
-- The last fenced write applied to a transaction: a write sent again is not applied twice.
ALTER TABLE treaty_transactions ADD COLUMN last_write INTEGER NOT NULL DEFAULT 0;

-- One position per branch of a transaction. Registrations here always ran under the write
-- lock, so existing positions are unique already.
CREATE UNIQUE INDEX treaty_branches_position ON treaty_branches (gid, position, op);

-- The admin list pages newest first by (created_at, gid).
CREATE INDEX treaty_transactions_created ON treaty_transactions (created_at, gid);

-- Statistics count the unfinished transactions from this partial index.
CREATE INDEX treaty_transactions_unfinished ON treaty_transactions (mode, status)
    WHERE status NOT IN ('succeeded', 'compensated', 'confirmed', 'cancelled', 'committed', 'rolled_back', 'aborted');

-- Operator actions queued for the replica that drives the transaction.
CREATE TABLE treaty_operator_queue (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    gid       TEXT    NOT NULL REFERENCES treaty_transactions (gid) ON DELETE CASCADE,
    action    TEXT    NOT NULL,
    branch    TEXT    NOT NULL DEFAULT '',
    op        TEXT    NOT NULL DEFAULT '',
    actor     TEXT    NOT NULL,
    reason    TEXT    NOT NULL,
    queued_at INTEGER NOT NULL
) STRICT;
CREATE INDEX treaty_operator_queue_gid ON treaty_operator_queue (gid);
