-- Fault-injection rules for game days (admin API /admin/v1/faults; applied only by coordinators
-- started with --allow-fault-injection). Rows are never deleted by the API: a deleted rule keeps
-- its row as the audit record of what was injected, by whom, why and how often.
CREATE TABLE treaty_faults (
    id         bigserial   PRIMARY KEY,
    rule       jsonb       NOT NULL,
    max_count  integer     NOT NULL DEFAULT 0 CHECK (max_count >= 0),
    fired      bigint      NOT NULL DEFAULT 0,
    reason     text        NOT NULL,
    created_by text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    deleted_by text,
    deleted_at timestamptz
);

-- Every replica reads the live rules every second or so.
CREATE INDEX treaty_faults_live ON treaty_faults (expires_at) WHERE deleted_at IS NULL;
