-- Message ids a consumer has applied, written in the consumer's own transaction (SQLite).
CREATE TABLE {{table}} (
    message_id   TEXT    PRIMARY KEY,
    -- Unix microseconds.
    processed_at INTEGER NOT NULL DEFAULT (CAST(unixepoch('subsec') * 1000000 AS INTEGER))
);
CREATE INDEX {{base}}_processed_at ON {{table}} (processed_at);
