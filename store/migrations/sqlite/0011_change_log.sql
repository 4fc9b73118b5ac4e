-- The change log (see the PostgreSQL migration of the same number). SQLite has one writer at a
-- time, so ids commit in order; AUTOINCREMENT never reuses an id after retention.
CREATE TABLE changes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    subject_id  INTEGER,
    payload     TEXT NOT NULL
);
CREATE INDEX changes_at ON changes (at);

CREATE TABLE change_cursors (
    consumer    TEXT PRIMARY KEY,
    change_id   INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

-- Leases of single-runner jobs (PostgreSQL uses advisory locks instead).
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);
