-- Placeholder so that this branch's migrations stay numbered 1, 2, 3, ...: this number is
-- reserved for another branch. Delete this file (and its .down.sql) when that branch merges.
SELECT 1;
