-- EM platform schema, SQLite backend. Timestamps are INTEGER microseconds since the Unix epoch (UTC).

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE,
    display_name  TEXT NOT NULL,
    role          TEXT NOT NULL CHECK (role IN ('officer', 'supervisor', 'admin')),
    password_hash TEXT NOT NULL,
    active        INTEGER NOT NULL
);

CREATE TABLE subjects (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    reference    TEXT NOT NULL,
    display_name TEXT NOT NULL,
    officer_id   INTEGER,
    timezone     TEXT NOT NULL,
    order_start  INTEGER,
    order_end    INTEGER,
    rules        TEXT NOT NULL
);
CREATE INDEX subjects_officer ON subjects (officer_id);

CREATE TABLE subject_zone_groups (
    subject_id INTEGER NOT NULL,
    group_name TEXT NOT NULL,
    PRIMARY KEY (subject_id, group_name)
);
CREATE INDEX subject_zone_groups_group ON subject_zone_groups (group_name);

CREATE TABLE devices (
    device_id TEXT PRIMARY KEY,
    protocol  TEXT NOT NULL,
    secret    TEXT,
    active    INTEGER NOT NULL
);

CREATE TABLE assignments (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id  TEXT NOT NULL,
    subject_id INTEGER NOT NULL,
    valid_from INTEGER NOT NULL,
    valid_to   INTEGER,
    CHECK (valid_to IS NULL OR valid_to >= valid_from)
);
CREATE INDEX assignments_device ON assignments (device_id, valid_from);
CREATE UNIQUE INDEX assignments_one_current ON assignments (device_id) WHERE valid_to IS NULL;

CREATE TABLE zones (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_id     INTEGER,
    group_name     TEXT,
    name           TEXT NOT NULL,
    kind           TEXT NOT NULL CHECK (kind IN ('inclusion', 'exclusion')),
    geometry       TEXT NOT NULL,
    schedule       TEXT,
    is_curfew_home INTEGER NOT NULL
);
CREATE INDEX zones_subject ON zones (subject_id);
CREATE INDEX zones_group ON zones (group_name);

CREATE TABLE positions (
    device_id       TEXT NOT NULL,
    device_time     INTEGER NOT NULL,
    seq             INTEGER NOT NULL,
    received_time   INTEGER NOT NULL,
    subject_id      INTEGER,
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
CREATE INDEX positions_subject_time ON positions (subject_id, device_time);
CREATE INDEX positions_time ON positions (device_time);

CREATE TABLE latest_state (
    subject_id      INTEGER PRIMARY KEY,
    device_id       TEXT NOT NULL,
    last_contact    INTEGER NOT NULL,
    lat             REAL,
    lon             REAL,
    accuracy_m      REAL,
    speed_kmh       REAL,
    valid           INTEGER,
    position_extra  TEXT,
    position_time   INTEGER,
    status_time     INTEGER,
    battery_pct     INTEGER,
    charging        INTEGER,
    beacon_in_range INTEGER,
    strap_ok        INTEGER,
    case_ok         INTEGER
);

CREATE TABLE alerts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    subject_id      INTEGER NOT NULL,
    device_id       TEXT,
    kind            TEXT NOT NULL,
    severity        INTEGER NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    zone_id         INTEGER,
    zone_key        INTEGER NOT NULL,
    message         TEXT NOT NULL,
    started_at      INTEGER NOT NULL,
    last_seen_at    INTEGER NOT NULL,
    ended_at        INTEGER,
    escalated       INTEGER NOT NULL DEFAULT 0,
    acknowledged_by INTEGER,
    acknowledged_at INTEGER,
    resolved_by     INTEGER,
    resolved_at     INTEGER,
    resolution_code TEXT,
    resolution_note TEXT,
    evidence        TEXT NOT NULL,
    occurrences     INTEGER NOT NULL DEFAULT 1,
    version         INTEGER NOT NULL DEFAULT 1
);
-- At most one ongoing alert per subject/kind/zone: repeats fold into it.
CREATE UNIQUE INDEX alerts_ongoing ON alerts (subject_id, kind, zone_key) WHERE state <> 'resolved';
CREATE INDEX alerts_started ON alerts (started_at);
CREATE INDEX alerts_subject ON alerts (subject_id, started_at);

CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    channel         TEXT NOT NULL,
    ordering_key    TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead_letter')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    UNIQUE (channel, idempotency_key)
);
CREATE INDEX outbox_pending ON outbox (channel, ordering_key, id) WHERE status = 'pending';

CREATE TABLE audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    actor_id    INTEGER,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT,
    subject_id  INTEGER,
    details     TEXT NOT NULL
);
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_actor ON audit (actor_id, at);
CREATE INDEX audit_subject ON audit (subject_id, at);

-- Append-only audit: UPDATE is always rejected; DELETE only while the retention run holds the
-- gate (a row inserted and removed again inside the retention transaction).
CREATE TABLE audit_retention_gate (open INTEGER NOT NULL);

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: UPDATE rejected');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
WHEN NOT EXISTS (SELECT 1 FROM audit_retention_gate)
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only: DELETE rejected (only retention may delete)');
END;
