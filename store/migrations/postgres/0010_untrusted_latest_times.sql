-- Repair of latest_state rows that a record with a device clock far in the future froze (before
-- the time policy, one fix dated 2099 became the subject's position_time/status_time and no
-- later, real record could move them). Such times are cleared so the next trusted record moves
-- the row again; last_contact is server time and is clamped to the migration time.
UPDATE latest_state SET position_time = NULL WHERE position_time > now() + interval '5 minutes';
UPDATE latest_state SET status_time = NULL WHERE status_time > now() + interval '5 minutes';
UPDATE latest_state SET last_contact = now() WHERE last_contact > now() + interval '5 minutes';
