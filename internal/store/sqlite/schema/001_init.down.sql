DROP TABLE treaty_workflows;
DROP TABLE treaty_events;
DROP TABLE treaty_branches;
DROP TABLE treaty_transactions;
