-- The change log: the one bus between instances (issue 16). Every change another consumer must
-- see (alert raised or changed, zone, subject, zone-group binding, device, assignment) is
-- written here in the transaction of the change itself; consumers read it by id. Writers take
-- a transaction advisory lock before inserting, so change rows commit in id order and a reader
-- that goes on from the last id it saw misses nothing.
CREATE TABLE changes (
    id          BIGSERIAL PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    topic       TEXT NOT NULL,
    subject_id  BIGINT,
    payload     JSONB NOT NULL
);
CREATE INDEX changes_at ON changes (at);

-- Where single consumers (running under a lease) left off.
CREATE TABLE change_cursors (
    consumer    TEXT PRIMARY KEY,
    change_id   BIGINT NOT NULL,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
