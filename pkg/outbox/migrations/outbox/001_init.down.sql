DROP TABLE IF EXISTS {{table}};
DROP FUNCTION IF EXISTS {{notify_fn}}();
DROP TABLE IF EXISTS {{slot_table}};
DROP TABLE IF EXISTS {{relay_table}};
DROP TABLE IF EXISTS {{hold_table}};
DROP TABLE IF EXISTS {{dead_table}};
