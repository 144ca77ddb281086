-- Fault-injection rules for game days, as migrations/006_faults.up.sql in PostgreSQL. The rule
-- is JSON text; times are unix microseconds.
CREATE TABLE treaty_faults (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    rule       TEXT    NOT NULL,
    max_count  INTEGER NOT NULL DEFAULT 0 CHECK (max_count >= 0),
    fired      INTEGER NOT NULL DEFAULT 0,
    reason     TEXT    NOT NULL,
    created_by TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    deleted_by TEXT,
    deleted_at INTEGER
) STRICT;

CREATE INDEX treaty_faults_live ON treaty_faults (expires_at) WHERE deleted_at IS NULL;
