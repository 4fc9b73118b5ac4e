//! SQLite side of the shared store body: statements that differ from PostgreSQL's, and how
//! time and JSON are bound and read (INTEGER microseconds since the Unix epoch, UTC; JSON as
//! TEXT). Write transactions start with `BEGIN IMMEDIATE` (`SqliteStore::begin_write`), so
//! there is no row locking here: one writer at a time.

use chrono::{DateTime, Utc};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Encode, QueryBuilder, Row, Sqlite, Type};

use crate::rows::{Col, DbRow};
use crate::{Result, StoreError};

pub(crate) type Db = Sqlite;
pub(crate) type Conn = sqlx::SqliteConnection;

pub(crate) const CURRENT_ASSIGNMENT: &str =
    "SELECT * FROM assignments WHERE device_id = $1 AND valid_to IS NULL";

pub(crate) const LOCK_DEVICE_ASSIGNMENTS: Option<&str> = None;

pub(crate) const OUTBOX_STATUS_FOR_UPDATE: &str = "SELECT status FROM outbox WHERE id = $1";

/// The store's clock is this process's: `$5` is bound by [`bind_now`].
pub(crate) const INSERT_OUTBOX: &str =
    "INSERT INTO outbox (channel, ordering_key, idempotency_key, payload, status, attempts,
         next_attempt_at, created_at)
     VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5)
     ON CONFLICT (channel, idempotency_key) DO NOTHING";

pub(crate) const WRITE_CURSOR: &str =
    "INSERT INTO change_cursors (consumer, change_id, updated_at) VALUES ($1, $2, $3)
     ON CONFLICT (consumer) DO UPDATE SET change_id = excluded.change_id,
       updated_at = excluded.updated_at";

/// Rows per multi-row `INSERT`: bound parameters stay well below SQLite's limit (32766).
pub(crate) const MAX_ROWS_PER_INSERT: usize = 2000;
/// JSON is TEXT: nothing follows a bound JSON text.
pub(crate) const JSON_TEXT_CAST: &str = "";

pub(crate) fn ts(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn opt_ts(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(ts)
}

pub(crate) fn from_us(v: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| StoreError::Invalid(format!("stored timestamp {v} out of range")))
}

pub(crate) fn json<T: serde::Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("cannot encode {what}: {e}")))
}

/// Binds the store's clock (the next parameter) to a statement that stamps it.
pub(crate) fn bind_now(
    q: Query<'_, Sqlite, SqliteArguments>,
    now: DateTime<Utc>,
) -> Query<'_, Sqlite, SqliteArguments> {
    q.bind(ts(now))
}

/// ` AND column IN ($a, $b, …)`: SQLite has no arrays (the caller handles an empty list).
pub(crate) fn push_in<T>(qb: &mut QueryBuilder<Sqlite>, column: &str, values: Vec<T>)
where
    T: for<'t> Encode<'t, Sqlite> + Type<Sqlite>,
{
    qb.push(format_args!(" AND {column} IN ("));
    let mut sep = qb.separated(", ");
    for v in values {
        sep.push_bind(v);
    }
    qb.push(")");
}

fn parse_json(name: &str, s: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|e| StoreError::Invalid(format!("stored {name}: {e}")))
}

impl DbRow for SqliteRow {
    fn col<T: Col>(&self, name: &str) -> Result<T> {
        Ok(self.try_get(name)?)
    }

    fn ts(&self, name: &str) -> Result<DateTime<Utc>> {
        from_us(self.try_get(name)?)
    }

    fn opt_ts(&self, name: &str) -> Result<Option<DateTime<Utc>>> {
        self.try_get::<Option<i64>, _>(name)?
            .map(from_us)
            .transpose()
    }

    fn json(&self, name: &str) -> Result<serde_json::Value> {
        parse_json(name, self.try_get(name)?)
    }

    fn opt_json(&self, name: &str) -> Result<Option<serde_json::Value>> {
        self.try_get::<Option<&str>, _>(name)?
            .map(|s| parse_json(name, s))
            .transpose()
    }
}
