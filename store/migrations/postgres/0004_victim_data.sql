-- Victim data as its own class (issue 12, findings 3 and 4).
--
-- 1. Devices get a class: an offender's tag (default) or a protected person's device. Devices
--    that existing dynamic (victim-protection) zones follow become victim devices.
ALTER TABLE devices ADD COLUMN class TEXT NOT NULL DEFAULT 'offender_tag'
    CHECK (class IN ('offender_tag', 'victim'));
UPDATE devices SET class = 'victim'
 WHERE device_id IN (SELECT geometry->>'device_id' FROM zones WHERE geometry->>'type' = 'dynamic');

-- 2. A victim device's records live here, never in positions / latest_state (so no trail, map,
--    report or export can show them). Idempotent on (device_id, device_time, seq) like positions.
CREATE TABLE victim_positions (
    device_id       TEXT NOT NULL,
    device_time     TIMESTAMPTZ NOT NULL,
    seq             BIGINT NOT NULL,
    received_time   TIMESTAMPTZ NOT NULL,
    protocol        TEXT NOT NULL,
    lat             DOUBLE PRECISION,
    lon             DOUBLE PRECISION,
    accuracy_m      REAL,
    speed_kmh       REAL,
    valid           BOOLEAN,
    battery_pct     SMALLINT,
    charging        BOOLEAN,
    beacon_in_range BOOLEAN,
    extra           JSONB NOT NULL,
    PRIMARY KEY (device_id, device_time, seq)
);
CREATE INDEX victim_positions_time ON victim_positions (device_time);

-- Records of those devices stored before this migration move over (the positions table is laid
-- out at start-up, after the migrations: on a fresh database it does not exist yet). A victim
-- device is never assigned, so latest_state holds none of them.
DO $$
BEGIN
    IF to_regclass('positions') IS NOT NULL THEN
        INSERT INTO victim_positions (device_id, device_time, seq, received_time, protocol, lat, lon,
                                      accuracy_m, speed_kmh, valid, battery_pct, charging,
                                      beacon_in_range, extra)
        SELECT p.device_id, p.device_time, p.seq, p.received_time, p.protocol, p.lat, p.lon,
               p.accuracy_m, p.speed_kmh, p.valid, p.battery_pct, p.charging, p.beacon_in_range,
               p.extra
          FROM positions p JOIN devices d ON d.device_id = p.device_id AND d.class = 'victim'
        ON CONFLICT DO NOTHING;
        DELETE FROM positions WHERE device_id IN (SELECT device_id FROM devices WHERE class = 'victim');
    END IF;
END
$$;

-- 3. Alert evidence and pending outbox messages written before: the victim's coordinates leave
--    the peer evidence (distance and bearing only from now on).
UPDATE alerts SET evidence = jsonb_set(evidence, '{fixes}', (
        SELECT coalesce(jsonb_agg(CASE WHEN f->>'source' = 'peer_position'
                                       THEN f - 'lat' - 'lon' - 'accuracy_m' ELSE f END), '[]'::jsonb)
          FROM jsonb_array_elements(evidence->'fixes') f))
 WHERE jsonb_typeof(evidence->'fixes') = 'array'
   AND evidence->'fixes' @> '[{"source": "peer_position"}]';
UPDATE outbox SET payload = jsonb_set(payload, '{alert,evidence,fixes}', (
        SELECT coalesce(jsonb_agg(CASE WHEN f->>'source' = 'peer_position'
                                       THEN f - 'lat' - 'lon' - 'accuracy_m' ELSE f END), '[]'::jsonb)
          FROM jsonb_array_elements(payload->'alert'->'evidence'->'fixes') f))
 WHERE jsonb_typeof(payload->'alert'->'evidence'->'fixes') = 'array'
   AND payload->'alert'->'evidence'->'fixes' @> '[{"source": "peer_position"}]';

-- 4. The victim liaison role.
ALTER TABLE users DROP CONSTRAINT IF EXISTS users_role_check;
ALTER TABLE users ADD CONSTRAINT users_role_check
    CHECK (role IN ('officer', 'supervisor', 'admin', 'victim_liaison'));
