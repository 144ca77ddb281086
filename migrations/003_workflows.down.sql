DROP INDEX treaty_transactions_workflow;
DROP TABLE treaty_workflows;
