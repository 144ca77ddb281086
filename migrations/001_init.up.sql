-- One row per global transaction. The row is the unit of ownership: a replica drives a
-- transaction while it holds the lease, and every write it makes is fenced by epoch.
CREATE TABLE treaty_transactions (
    gid              text        PRIMARY KEY,
    mode             text        NOT NULL,
    status           text        NOT NULL,
    spec             bytea       NOT NULL,  -- protobuf of the spec, as submitted
    spec_hash        bytea       NOT NULL,  -- sha256 of spec: same gid + same hash = same request
    workflow_name    text,
    workflow_version integer,
    reason           text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    deadline         timestamptz NOT NULL,
    -- When someone should next look at this transaction if its owner does not: the lease expiry
    -- while it is driven, the next retry otherwise. NULL once terminal.
    next_attempt_at  timestamptz,
    lease_owner      text,
    lease_expires_at timestamptz,
    epoch            bigint      NOT NULL DEFAULT 1
);

-- Recovery scans only live transactions that are due.
CREATE INDEX treaty_transactions_due ON treaty_transactions (next_attempt_at)
    WHERE next_attempt_at IS NOT NULL;
CREATE INDEX treaty_transactions_status ON treaty_transactions (status, updated_at);

-- One row per (transaction, branch, op): the durable state of each participant endpoint.
CREATE TABLE treaty_branches (
    gid             text        NOT NULL REFERENCES treaty_transactions (gid) ON DELETE CASCADE,
    branch          text        NOT NULL,
    op              text        NOT NULL,
    position        integer     NOT NULL,
    status          text        NOT NULL,
    attempts        integer     NOT NULL DEFAULT 0,
    last_error      text        NOT NULL DEFAULT '',
    next_attempt_at timestamptz,
    -- An earlier call may have taken effect without its outcome being known: compensate it
    -- even if a later attempt was refused.
    uncertain       boolean     NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (gid, branch, op)
);

-- Append-only history; the admin timeline shows it.
CREATE TABLE treaty_events (
    id     bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gid    text        NOT NULL REFERENCES treaty_transactions (gid) ON DELETE CASCADE,
    at     timestamptz NOT NULL DEFAULT now(),
    kind   text        NOT NULL,
    branch text        NOT NULL DEFAULT '',
    op     text        NOT NULL DEFAULT '',
    detail text        NOT NULL DEFAULT ''
);
CREATE INDEX treaty_events_gid ON treaty_events (gid, id);
