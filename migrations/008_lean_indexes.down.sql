ALTER TABLE treaty_branches RESET (fillfactor);
DROP INDEX treaty_transactions_workflow;
CREATE INDEX treaty_transactions_workflow ON treaty_transactions (workflow_name, workflow_version);
DROP INDEX treaty_transactions_finished;
CREATE INDEX treaty_transactions_status ON treaty_transactions (status, updated_at);
