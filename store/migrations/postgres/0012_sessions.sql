-- Dashboard sessions, shared by every instance (a login on one is valid on all; a password
-- change or deactivation ends the user's sessions everywhere). Keyed by the SHA-256 of the
-- token: the table never holds a usable token.
CREATE TABLE sessions (
    token_hash  TEXT PRIMARY KEY,
    user_id     BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL,
    -- Idle expiry, moved forward by each use, never past ends_at.
    expires_at  TIMESTAMPTZ NOT NULL,
    -- Absolute end.
    ends_at     TIMESTAMPTZ NOT NULL
);
CREATE INDEX sessions_user ON sessions (user_id);
CREATE INDEX sessions_expires ON sessions (expires_at);
