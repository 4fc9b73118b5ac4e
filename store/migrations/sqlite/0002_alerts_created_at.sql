-- Server time an alert was raised (microseconds since the epoch, like the other times).
-- Escalation counts from here, not from started_at (the device time of the first evidence, which
-- is old when a tag uploads a buffered backlog). Rows written before this migration only have
-- started_at: it is the best available value for them.
ALTER TABLE alerts ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
UPDATE alerts SET created_at = started_at;

-- The escalation scan filters open, not escalated alerts on created_at.
CREATE INDEX alerts_open ON alerts (created_at) WHERE state = 'open' AND escalated = 0;
