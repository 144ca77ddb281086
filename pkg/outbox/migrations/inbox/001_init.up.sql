{{create_schema}}

-- Message ids a consumer has applied, written in the consumer's own transaction.
CREATE TABLE {{table}} (
    message_id   text PRIMARY KEY,
    processed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX {{base}}_processed_at ON {{table}} (processed_at);
