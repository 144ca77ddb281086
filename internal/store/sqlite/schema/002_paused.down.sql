ALTER TABLE treaty_transactions DROP COLUMN paused;
