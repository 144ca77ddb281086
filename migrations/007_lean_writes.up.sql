-- Every saga writes about a dozen branch and event rows, and each foreign-key check of those
-- rows was an index probe and a row lock of the transaction row the same statement had just
-- written (issue 13: 11 of the 15 index scans per saga). Every statement that adds these rows
-- selects them from the transaction row it wrote or locked, so none can be orphaned; the
-- retention sweep deletes a transaction's branches and events itself.
ALTER TABLE treaty_branches DROP CONSTRAINT treaty_branches_gid_fkey;
ALTER TABLE treaty_events DROP CONSTRAINT treaty_events_gid_fkey;
-- Events are only ever read by transaction, in id order (treaty_events_gid); the identity
-- keeps ids unique without an index of its own to insert into.
ALTER TABLE treaty_events DROP CONSTRAINT treaty_events_pkey;
