ALTER TABLE treaty_events ADD PRIMARY KEY (id);
DELETE FROM treaty_events e WHERE NOT EXISTS (SELECT 1 FROM treaty_transactions t WHERE t.gid = e.gid);
DELETE FROM treaty_branches b WHERE NOT EXISTS (SELECT 1 FROM treaty_transactions t WHERE t.gid = b.gid);
ALTER TABLE treaty_events ADD CONSTRAINT treaty_events_gid_fkey FOREIGN KEY (gid) REFERENCES treaty_transactions (gid) ON DELETE CASCADE;
ALTER TABLE treaty_branches ADD CONSTRAINT treaty_branches_gid_fkey FOREIGN KEY (gid) REFERENCES treaty_transactions (gid) ON DELETE CASCADE;
