-- Registered workflow definitions, versioned: registering a changed definition adds a version;
-- transactions keep the spec they started with (copied into treaty_transactions.spec).
CREATE TABLE treaty_workflows (
    name       text        NOT NULL,
    version    integer     NOT NULL,
    spec       bytea       NOT NULL,
    spec_hash  bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);
CREATE INDEX treaty_transactions_workflow ON treaty_transactions (workflow_name, workflow_version)
    WHERE workflow_name IS NOT NULL;
