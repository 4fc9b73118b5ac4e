-- The columns and key of the positions table: one definition for both PostgreSQL layouts
-- (TimescaleDB hypertable and native range partitions), which PgStore wraps in its
-- CREATE TABLE. The partition key (device_time) is part of the key, as both layouts require.
    device_id       TEXT NOT NULL,
    device_time     TIMESTAMPTZ NOT NULL,
    seq             BIGINT NOT NULL,
    received_time   TIMESTAMPTZ NOT NULL,
    subject_id      BIGINT,
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
    course_deg      REAL,
    altitude_m      REAL,
    satellites      SMALLINT,
    fix_source      TEXT,
    gsm_signal      SMALLINT,
    CONSTRAINT positions_key PRIMARY KEY (device_id, device_time, seq)
