-- The embedded (single-node, dev mode) schema. It mirrors the PostgreSQL one in migrations/,
-- with SQLite's types: every timestamp is an INTEGER of unix microseconds in UTC (the precision
-- PostgreSQL keeps, so both backends round the same way), and NULL where PostgreSQL has NULL.
-- STRICT makes SQLite refuse a value of the wrong type instead of storing it anyway.

-- One row per global transaction; the unit of ownership (lease, epoch fencing).
CREATE TABLE treaty_transactions (
    gid              TEXT    PRIMARY KEY,
    mode             TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    spec             BLOB    NOT NULL,
    spec_hash        BLOB    NOT NULL,
    workflow_name    TEXT    NOT NULL DEFAULT '',
    workflow_version INTEGER NOT NULL DEFAULT 0,
    reason           TEXT    NOT NULL DEFAULT '',
    created_at       INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL,
    deadline         INTEGER NOT NULL,
    -- The lease expiry while driven, the next retry otherwise, NULL once terminal.
    next_attempt_at  INTEGER,
    lease_owner      TEXT,
    lease_expires_at INTEGER,
    epoch            INTEGER NOT NULL DEFAULT 1
) STRICT;

-- Recovery scans only live transactions that are due.
CREATE INDEX treaty_transactions_due ON treaty_transactions (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX treaty_transactions_status ON treaty_transactions (status, updated_at);

-- One row per (transaction, branch, op).
CREATE TABLE treaty_branches (
    gid             TEXT    NOT NULL REFERENCES treaty_transactions (gid) ON DELETE CASCADE,
    branch          TEXT    NOT NULL,
    op              TEXT    NOT NULL,
    position        INTEGER NOT NULL,
    status          TEXT    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT    NOT NULL DEFAULT '',
    next_attempt_at INTEGER,
    uncertain       INTEGER NOT NULL DEFAULT 0 CHECK (uncertain IN (0, 1)),
    -- The branch's own endpoints and policy when registered separately (TCC); NULL otherwise.
    spec            BLOB,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (gid, branch, op)
) STRICT, WITHOUT ROWID;

-- Append-only history. AUTOINCREMENT so that an id is never reused, even after deletes: the
-- admin timeline orders by id.
CREATE TABLE treaty_events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    gid    TEXT    NOT NULL REFERENCES treaty_transactions (gid) ON DELETE CASCADE,
    at     INTEGER NOT NULL,
    kind   TEXT    NOT NULL,
    branch TEXT    NOT NULL DEFAULT '',
    op     TEXT    NOT NULL DEFAULT '',
    detail TEXT    NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX treaty_events_gid ON treaty_events (gid, id);

-- Registered workflow definitions, versioned: registering a changed definition adds a version;
-- transactions keep the spec they started with (copied into treaty_transactions.spec).
CREATE TABLE treaty_workflows (
    name       TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    spec       BLOB    NOT NULL,
    spec_hash  BLOB    NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (name, version)
) STRICT;
CREATE INDEX treaty_transactions_workflow ON treaty_transactions (workflow_name, workflow_version)
    WHERE workflow_name <> '';
