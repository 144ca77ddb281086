-- The SQLite outbox: one row per message written by EnqueueSQL in the caller's transaction.
-- SQLite has one writer per file, so AUTOINCREMENT ids are handed out in commit order and the
-- relay can read unsent rows by id without skipping a row whose transaction commits late.
-- Times are unix microseconds.
CREATE TABLE {{table}} (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id     TEXT    NOT NULL,
    topic      TEXT    NOT NULL,
    key        BLOB,
    value      BLOB,
    headers    BLOB,
    created_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER)),
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    -- Set when the message failed MaxAttempts times; the relay skips it from then on.
    dead_at    INTEGER,
    sent_at    INTEGER
);
CREATE INDEX {{base}}_pending ON {{table}} (id) WHERE sent_at IS NULL AND dead_at IS NULL;
CREATE INDEX {{base}}_sent ON {{table}} (sent_at) WHERE sent_at IS NOT NULL;
