//! PostgreSQL side of the shared store body: statements that differ from SQLite's, and how
//! time and JSON are bound and read (`timestamptz` as `DateTime<Utc>`, `jsonb` as
//! `serde_json::Value`).

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::Query;
use sqlx::{Encode, Postgres, QueryBuilder, Row, Type};

use crate::rows::{Col, DbRow};
use crate::Result;

pub(crate) type Db = Postgres;
pub(crate) type Conn = sqlx::PgConnection;

/// The current assignment of a device, locked until the transaction ends.
pub(crate) const CURRENT_ASSIGNMENT: &str =
    "SELECT * FROM assignments WHERE device_id = $1 AND valid_to IS NULL FOR UPDATE";

/// Serialises assignment changes of one device (`$1`); SQLite's writers are serial anyway.
pub(crate) const LOCK_DEVICE_ASSIGNMENTS: Option<&str> =
    Some("SELECT pg_advisory_xact_lock(hashtext('em_assign:' || $1))");

/// The status of an outbox message, locked until the transaction ends.
pub(crate) const OUTBOX_STATUS_FOR_UPDATE: &str =
    "SELECT status FROM outbox WHERE id = $1 FOR UPDATE";

/// Times of the store's clock are the server's `now()` (see [`bind_now`]).
pub(crate) const INSERT_OUTBOX: &str =
    "INSERT INTO outbox (channel, ordering_key, idempotency_key, payload, next_attempt_at, created_at)
     VALUES ($1, $2, $3, $4, now(), now())
     ON CONFLICT (channel, idempotency_key) DO NOTHING";

pub(crate) const WRITE_CURSOR: &str =
    "INSERT INTO change_cursors (consumer, change_id, updated_at) VALUES ($1, $2, now())
     ON CONFLICT (consumer) DO UPDATE SET change_id = excluded.change_id, updated_at = now()";

/// Rows per multi-row `INSERT` (15 parameters a row, below the protocol's 65535).
pub(crate) const MAX_ROWS_PER_INSERT: usize = 1000;
/// What follows a bound JSON text in a multi-row insert (`extra` is `jsonb`).
pub(crate) const JSON_TEXT_CAST: &str = "::jsonb";

pub(crate) fn ts(t: DateTime<Utc>) -> DateTime<Utc> {
    t
}

pub(crate) fn opt_ts(t: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    t
}

pub(crate) fn json<T: serde::Serialize>(what: &str, v: &T) -> Result<serde_json::Value> {
    crate::common::to_json(what, v)
}

/// The statements that stamp the store's clock call `now()` in SQL: nothing to bind.
pub(crate) fn bind_now(
    q: Query<'_, Postgres, PgArguments>,
    _now: DateTime<Utc>,
) -> Query<'_, Postgres, PgArguments> {
    q
}

/// ` AND column = ANY($n)`: one array parameter.
pub(crate) fn push_in<T>(qb: &mut QueryBuilder<Postgres>, column: &str, values: Vec<T>)
where
    Vec<T>: for<'t> Encode<'t, Postgres> + Type<Postgres>,
{
    qb.push(format_args!(" AND {column} = ANY("))
        .push_bind(values)
        .push(")");
}

impl DbRow for PgRow {
    fn col<T: Col>(&self, name: &str) -> Result<T> {
        Ok(self.try_get(name)?)
    }

    fn ts(&self, name: &str) -> Result<DateTime<Utc>> {
        Ok(self.try_get(name)?)
    }

    fn opt_ts(&self, name: &str) -> Result<Option<DateTime<Utc>>> {
        Ok(self.try_get(name)?)
    }

    fn json(&self, name: &str) -> Result<serde_json::Value> {
        Ok(self.try_get(name)?)
    }

    fn opt_json(&self, name: &str) -> Result<Option<serde_json::Value>> {
        Ok(self.try_get(name)?)
    }
}
