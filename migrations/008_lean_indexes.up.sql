-- Issue 13: every index a write touches costs PostgreSQL CPU on each saga. A transaction row is
-- written twice (created, finished) and the finish is never a HOT update (status and
-- next_attempt_at are indexed), so each of its indexes takes two entries per saga.
--
-- The retention sweep is the only reader of (status, updated_at), and it reads finished rows
-- only (next_attempt_at IS NULL): index those alone, by age.
DROP INDEX treaty_transactions_status;
CREATE INDEX treaty_transactions_finished ON treaty_transactions (updated_at)
    WHERE next_attempt_at IS NULL;
-- Most transactions name no workflow; only those that do are looked up by it.
DROP INDEX treaty_transactions_workflow;
CREATE INDEX treaty_transactions_workflow ON treaty_transactions (workflow_name, workflow_version)
    WHERE workflow_name IS NOT NULL;
-- A branch row is inserted and then updated a few milliseconds later (its outcome); with full
-- pages the new version lands on another page and both branch indexes take new entries. Room
-- left on each page keeps those updates HOT (heap-only: no index entries).
ALTER TABLE treaty_branches SET (fillfactor = 60);
-- (Not in SQL: from this version on, a saga's compensation row is written only once that
-- compensation is touched; a missing row reads as pending, or skipped once the saga succeeded.
-- See storedSagaRow in internal/engine.)
