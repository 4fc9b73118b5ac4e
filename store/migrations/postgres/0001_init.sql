-- EM platform schema, PostgreSQL backend (everything except the positions table, whose layout —
-- TimescaleDB hypertable or native range partitions — is chosen at start-up; see src/postgres.rs).

CREATE TABLE users (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('officer', 'supervisor', 'admin')),
    password_hash TEXT NOT NULL,
    active        BOOLEAN NOT NULL
);

CREATE TABLE subjects (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    reference    TEXT NOT NULL,
    display_name TEXT NOT NULL,
    officer_id   BIGINT,
    timezone     TEXT NOT NULL,
    order_start  TIMESTAMPTZ,
    order_end    TIMESTAMPTZ,
    rules        JSONB NOT NULL
);
CREATE INDEX subjects_officer ON subjects (officer_id);

CREATE TABLE subject_zone_groups (
    subject_id BIGINT NOT NULL,
    group_name TEXT NOT NULL,
    PRIMARY KEY (subject_id, group_name)
);
CREATE INDEX subject_zone_groups_group ON subject_zone_groups (group_name);

CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    protocol  TEXT NOT NULL,
    secret    TEXT,
    active    BOOLEAN NOT NULL
);

CREATE TABLE assignments (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id  TEXT NOT NULL,
    subject_id BIGINT NOT NULL,
    valid_from TIMESTAMPTZ NOT NULL,
    valid_to   TIMESTAMPTZ,
    CHECK (valid_to IS NULL OR valid_to >= valid_from)
);
CREATE INDEX assignments_device ON assignments (device_id, valid_from);
CREATE UNIQUE INDEX assignments_one_current ON assignments (device_id) WHERE valid_to IS NULL;

CREATE TABLE zones (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject_id     BIGINT,
    group_name     TEXT,
    name           TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('inclusion', 'exclusion')),
    geometry       JSONB NOT NULL,
    schedule       JSONB,
    is_curfew_home BOOLEAN NOT NULL
);
CREATE INDEX zones_subject ON zones (subject_id);
CREATE INDEX zones_group ON zones (group_name);

-- Latest state per subject, upserted in the same transaction as the positions batch.
CREATE TABLE latest_state (
    subject_id      BIGINT PRIMARY KEY,
    device_id       TEXT NOT NULL,
    last_contact    TIMESTAMPTZ NOT NULL,
    lat             DOUBLE PRECISION,
    lon             DOUBLE PRECISION,
    accuracy_m      REAL,
    speed_kmh       REAL,
    valid           BOOLEAN,
    position_extra  JSONB,
    position_time   TIMESTAMPTZ,
    status_time     TIMESTAMPTZ,
    battery_pct     SMALLINT,
    charging        BOOLEAN,
    beacon_in_range BOOLEAN,
    strap_ok        BOOLEAN,
    case_ok         BOOLEAN
);

CREATE TABLE alerts (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subject_id      BIGINT NOT NULL,
    device_id       TEXT,
    kind            TEXT NOT NULL,
    severity        SMALLINT NOT NULL CHECK (severity BETWEEN 0 AND 3),
    state           TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    zone_id         BIGINT,
    zone_key        BIGINT NOT NULL,
    message         TEXT NOT NULL,
    started_at      TIMESTAMPTZ NOT NULL,
    last_seen_at    TIMESTAMPTZ NOT NULL,
    ended_at        TIMESTAMPTZ,
    escalated       BOOLEAN NOT NULL DEFAULT false,
    acknowledged_by BIGINT,
    acknowledged_at TIMESTAMPTZ,
    resolved_by     BIGINT,
    resolved_at     TIMESTAMPTZ,
    resolution_code TEXT,
    resolution_note TEXT,
    evidence        JSONB NOT NULL,
    occurrences     BIGINT NOT NULL DEFAULT 1,
    version         BIGINT NOT NULL DEFAULT 1
);
-- At most one ongoing alert per subject/kind/zone: repeats fold into it (ON CONFLICT target).
CREATE UNIQUE INDEX alerts_ongoing ON alerts (subject_id, kind, zone_key) WHERE state <> 'resolved';
CREATE INDEX alerts_started ON alerts (started_at DESC);
CREATE INDEX alerts_subject ON alerts (subject_id, started_at DESC);
CREATE INDEX alerts_open ON alerts (started_at) WHERE state = 'open' AND NOT escalated;

CREATE TABLE outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    channel         TEXT NOT NULL,
    ordering_key    TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    payload         JSONB NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead_letter')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at TIMESTAMPTZ NOT NULL,
    last_error      TEXT,
    created_at      TIMESTAMPTZ NOT NULL,
    delivered_at    TIMESTAMPTZ,
    UNIQUE (channel, idempotency_key)
);
CREATE INDEX outbox_pending ON outbox (channel, ordering_key, id) WHERE status = 'pending';

CREATE TABLE audit (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL,
    actor_id    BIGINT,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT,
    subject_id  BIGINT,
    details     JSONB NOT NULL
);
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_actor ON audit (actor_id, at);
CREATE INDEX audit_subject ON audit (subject_id, at);

-- Append-only audit. UPDATE and TRUNCATE are always rejected; DELETE only inside the retention
-- transaction, which inserts a row into audit_retention_gate and removes it again before commit
-- (so no other session ever sees the gate open). This guards against application bugs and
-- ad-hoc edits; a deployment that must resist a malicious DBA additionally runs the service as
-- a role that owns neither table (GRANT SELECT, INSERT only).
CREATE TABLE audit_retention_gate (open BOOLEAN NOT NULL);

CREATE FUNCTION audit_append_only() RETURNS trigger
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF TG_OP = 'DELETE' AND EXISTS (SELECT 1 FROM audit_retention_gate) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'audit log is append-only: % rejected', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_append_only_rows BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_append_only_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
