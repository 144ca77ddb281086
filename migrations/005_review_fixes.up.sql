-- The last fenced write applied to a transaction, by the id its writer gave it. The group
-- committer may send a write again when the reply to a commit was lost although the commit
-- happened; a write whose id is already here is not applied twice (no duplicate history).
ALTER TABLE treaty_transactions ADD COLUMN last_write bigint NOT NULL DEFAULT 0;

-- One position per branch of a transaction. Concurrent registrations could once give two TCC
-- branches the same position: renumber those (order kept, by position then name) first.
UPDATE treaty_branches b SET position = r.pos
FROM (
    SELECT gid, branch, (dense_rank() OVER (PARTITION BY gid ORDER BY position, branch) - 1)::integer AS pos
    FROM treaty_branches
    WHERE gid IN (SELECT gid FROM treaty_branches GROUP BY gid, position, op HAVING count(*) > 1)
) r
WHERE b.gid = r.gid AND b.branch = r.branch AND b.position <> r.pos;
CREATE UNIQUE INDEX treaty_branches_position ON treaty_branches (gid, position, op);

-- The admin list pages newest first by (created_at, gid).
CREATE INDEX treaty_transactions_created ON treaty_transactions (created_at, gid);

-- /metrics and the admin statistics count the unfinished transactions on every scrape: from
-- this small partial index, not from the whole table (finished rows stay for the retention).
CREATE INDEX treaty_transactions_unfinished ON treaty_transactions (mode, status)
    WHERE status NOT IN ('succeeded', 'compensated', 'confirmed', 'cancelled', 'committed', 'rolled_back', 'aborted');

-- Operator actions asked of a replica that does not drive the transaction: queued here, applied
-- by whichever replica drives it (or claims it idle), then deleted.
CREATE TABLE treaty_operator_queue (
    id        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    gid       text        NOT NULL REFERENCES treaty_transactions (gid) ON DELETE CASCADE,
    action    text        NOT NULL,
    branch    text        NOT NULL DEFAULT '',
    op        text        NOT NULL DEFAULT '',
    actor     text        NOT NULL,
    reason    text        NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX treaty_operator_queue_gid ON treaty_operator_queue (gid);
