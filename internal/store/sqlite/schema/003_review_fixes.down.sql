DROP TABLE IF EXISTS treaty_operator_queue;
DROP INDEX IF EXISTS treaty_transactions_unfinished;
DROP INDEX IF EXISTS treaty_transactions_created;
DROP INDEX IF EXISTS treaty_branches_position;
ALTER TABLE treaty_transactions DROP COLUMN last_write;
