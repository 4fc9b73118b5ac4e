-- Repair of latest_state rows that a record with a device clock far in the future froze (see the
-- PostgreSQL migration of the same name). Times are microseconds since the epoch.
UPDATE latest_state SET position_time = NULL
 WHERE position_time > (CAST(strftime('%s', 'now') AS INTEGER) + 300) * 1000000;
UPDATE latest_state SET status_time = NULL
 WHERE status_time > (CAST(strftime('%s', 'now') AS INTEGER) + 300) * 1000000;
UPDATE latest_state SET last_contact = CAST(strftime('%s', 'now') AS INTEGER) * 1000000
 WHERE last_contact > (CAST(strftime('%s', 'now') AS INTEGER) + 300) * 1000000;
