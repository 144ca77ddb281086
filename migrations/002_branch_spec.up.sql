-- Branches registered while a transaction runs (TCC) carry their own endpoints and policy,
-- instead of the transaction's spec.
ALTER TABLE treaty_branches ADD COLUMN spec bytea;
