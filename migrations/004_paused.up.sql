-- An operator can pause a transaction: nobody drives it (next_attempt_at is NULL) until unpaused.
ALTER TABLE treaty_transactions ADD COLUMN paused boolean NOT NULL DEFAULT false;
