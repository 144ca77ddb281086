-- An operator can pause a transaction: nobody drives it (next_attempt_at is NULL) until unpaused.
ALTER TABLE treaty_transactions ADD COLUMN paused INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1));
