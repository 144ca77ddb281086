ALTER TABLE treaty_branches DROP COLUMN spec;
