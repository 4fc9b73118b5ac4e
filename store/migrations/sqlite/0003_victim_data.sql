-- Victim data as its own class (issue 12, findings 3 and 4). Times are microseconds since the epoch.
--
-- 1. Devices get a class: an offender's tag (default) or a protected person's device. Devices
--    that existing dynamic (victim-protection) zones follow become victim devices.
ALTER TABLE devices ADD COLUMN class TEXT NOT NULL DEFAULT 'offender_tag'
    CHECK (class IN ('offender_tag', 'victim'));
UPDATE devices SET class = 'victim'
 WHERE device_id IN (SELECT json_extract(geometry, '$.device_id') FROM zones
                      WHERE json_extract(geometry, '$.type') = 'dynamic');

-- 2. A victim device's records live here, never in positions / latest_state (so no trail, map,
--    report or export can show them). Idempotent on (device_id, device_time, seq) like positions.
CREATE TABLE victim_positions (
    device_id       TEXT NOT NULL,
    device_time     INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    received_time   INTEGER NOT NULL,
    protocol        TEXT NOT NULL,
    lat             REAL,
    lon             REAL,
    accuracy_m      REAL,
    speed_kmh       REAL,
    valid           INTEGER,
    battery_pct     INTEGER,
    charging        INTEGER,
    beacon_in_range INTEGER,
    extra           TEXT NOT NULL,
    PRIMARY KEY (device_id, device_time, seq)
) WITHOUT ROWID;
CREATE INDEX victim_positions_time ON victim_positions (device_time);

-- Records of those devices stored before this migration move over. A victim device is never
-- assigned, so latest_state holds none of them.
INSERT OR IGNORE INTO victim_positions (device_id, device_time, seq, received_time, protocol, lat, lon,
                                        accuracy_m, speed_kmh, valid, battery_pct, charging,
                                        beacon_in_range, extra)
SELECT p.device_id, p.device_time, p.seq, p.received_time, p.protocol, p.lat, p.lon, p.accuracy_m,
       p.speed_kmh, p.valid, p.battery_pct, p.charging, p.beacon_in_range, p.extra
  FROM positions p JOIN devices d ON d.device_id = p.device_id AND d.class = 'victim';
DELETE FROM positions WHERE device_id IN (SELECT device_id FROM devices WHERE class = 'victim');

-- 3. Alert evidence and pending outbox messages written before: the victim's coordinates leave
--    the peer evidence (distance and bearing only from now on).
UPDATE alerts SET evidence = json_set(evidence, '$.fixes', (
        SELECT json_group_array(json(CASE WHEN json_extract(f.value, '$.source') = 'peer_position'
                                     THEN json_remove(f.value, '$.lat', '$.lon', '$.accuracy_m')
                                     ELSE f.value END))
          FROM json_each(evidence, '$.fixes') f))
 WHERE json_type(evidence, '$.fixes') = 'array'
   AND EXISTS (SELECT 1 FROM json_each(evidence, '$.fixes') f
                WHERE json_extract(f.value, '$.source') = 'peer_position');
UPDATE outbox SET payload = json_set(payload, '$.alert.evidence.fixes', (
        SELECT json_group_array(json(CASE WHEN json_extract(f.value, '$.source') = 'peer_position'
                                     THEN json_remove(f.value, '$.lat', '$.lon', '$.accuracy_m')
                                     ELSE f.value END))
          FROM json_each(payload, '$.alert.evidence.fixes') f))
 WHERE json_type(payload, '$.alert.evidence.fixes') = 'array'
   AND EXISTS (SELECT 1 FROM json_each(payload, '$.alert.evidence.fixes') f
                WHERE json_extract(f.value, '$.source') = 'peer_position');

-- 4. The victim liaison role: SQLite cannot change a CHECK constraint, so the table is rebuilt
--    (nothing references users by foreign key; ids are kept).
CREATE TABLE users_new (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('officer', 'supervisor', 'admin', 'victim_liaison')),
    password_hash TEXT NOT NULL,
    active        INTEGER NOT NULL
);
INSERT INTO users_new (id, username, display_name, role, password_hash, active)
SELECT id, username, display_name, role, password_hash, active FROM users;
DROP TABLE users;
ALTER TABLE users_new RENAME TO users;
