//! SQLite backend: the embedded default. WAL journal, `synchronous=FULL` (a committed
//! transaction survives power loss), a busy timeout, and write transactions opened with
//! `BEGIN IMMEDIATE` so concurrent writers queue instead of failing on lock upgrade.
//!
//! Most of the [`Store`] implementation is the shared body (`body.rs`), stamped here with
//! the SQLite dialect (`dialect/sqlite.rs`: timestamps as INTEGER microseconds since the
//! Unix epoch (UTC), JSON as TEXT, lists as `IN (…)`). This file holds what only SQLite does:
//! opening the file, the batched record insert with its `latest_state` upsert, waking this
//! process's change-log readers after a commit, leases as rows with an expiry, and retention.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use em_model::*;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::Sqlite;

use crate::body::store_body;
use crate::common::*;
use crate::dialect::sqlite;
use crate::rows;
use crate::*;

/// Embedded migrations of the SQLite schema (`store/migrations/sqlite`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The SQLite implementation of [`Store`].
#[derive(Clone, Debug)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// Ticks after every commit of this process that wrote to the change log.
    wakeups: tokio::sync::watch::Sender<u64>,
}

impl SqliteStore {
    /// Opens (creating with `?mode=rwc`) and migrates the database at `url`
    /// (`sqlite://path?mode=rwc`, `sqlite:path`, `sqlite::memory:`).
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = SqliteConnectOptions::from_str(url)?;
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let opts = opts
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let (opts, pool_opts) = if memory {
            // An in-memory database lives as long as its one connection: never recycle it.
            (
                opts,
                SqlitePoolOptions::new()
                    .min_connections(1)
                    .max_connections(1)
                    .idle_timeout(None)
                    .max_lifetime(None),
            )
        } else {
            (
                opts.journal_mode(SqliteJournalMode::Wal),
                SqlitePoolOptions::new().max_connections(8),
            )
        };
        let pool = pool_opts.connect_with(opts).await?;
        MIGRATOR.run(&pool).await?;
        // SQLite has no SHA-256 in SQL, so plaintext secrets are hashed here on every open.
        Self::hash_plaintext_secrets(&pool).await?;
        let (wakeups, _) = tokio::sync::watch::channel(0u64);
        Ok(SqliteStore { pool, wakeups })
    }

    /// The underlying pool (for tools and tests).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Appends `change` to the log inside the caller's (write) transaction. SQLite has one
    /// writer at a time, so ids commit in order.
    async fn append_change(conn: &mut sqlx::SqliteConnection, change: &Change) -> Result<ChangeId> {
        Ok(sqlx::query_scalar(
            "INSERT INTO changes (at, topic, subject_id, payload) VALUES ($1, $2, $3, $4)
             RETURNING id",
        )
        .bind(sqlite::ts(Utc::now()))
        .bind(change.topic())
        .bind(change.subject_id())
        .bind(sqlite::json("change", change)?)
        .fetch_one(&mut *conn)
        .await?)
    }

    /// Commits a transaction that wrote to the change log and wakes this process's readers.
    async fn commit_changes(&self, tx: sqlx::Transaction<'static, Sqlite>) -> Result<()> {
        tx.commit().await?;
        self.wakeups.send_modify(|c| *c = c.wrapping_add(1));
        Ok(())
    }

    fn positions_record(r: &SqliteRow) -> Result<Record> {
        rows::record(r)
    }

    fn latest_state(r: &SqliteRow) -> Result<LatestState> {
        rows::latest_state(r)
    }
}

store_body! {
    store: SqliteStore, dialect: sqlite;

    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn insert_records(&self, records: &[StoredRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let rows = RecordRow::all(records)?;
        let deltas = fold_latest(records);
        let mut tx = self.begin_write().await?;
        Self::insert_record_rows(&mut tx, false, &rows).await?;
        for d in &deltas {
            let pos_extra = d
                .position
                .map(|p| {
                    sqlite::json(
                        "position extras",
                        &RecordExtra {
                            course_deg: p.course_deg,
                            altitude_m: p.altitude_m,
                            satellites: p.satellites,
                            source: Some(p.source),
                            ..RecordExtra::default()
                        },
                    )
                })
                .transpose()?;
            sqlx::query(LATEST_UPSERT)
                .bind(d.subject_id)
                .bind(&d.device_id)
                .bind(sqlite::ts(d.last_contact))
                .bind(d.position.map(|p| p.lat))
                .bind(d.position.map(|p| p.lon))
                .bind(d.position.and_then(|p| p.accuracy_m))
                .bind(d.position.and_then(|p| p.speed_kmh))
                .bind(d.position.map(|p| p.valid))
                .bind(pos_extra)
                .bind(sqlite::opt_ts(d.position_time))
                .bind(sqlite::opt_ts(d.status_time))
                .bind(d.battery_pct.map(i64::from))
                .bind(d.charging)
                .bind(d.beacon_in_range)
                .bind(d.strap_ok)
                .bind(d.case_ok)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    fn change_wakeups(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wakeups.subscribe()
    }

    fn change_poll_interval(&self) -> Duration {
        // Commits of this process wake readers at once; the poll sees other processes'
        // (tools writing to the same file).
        Duration::from_millis(250)
    }

    async fn acquire_lease(&self, name: &str, holder: &str) -> Result<Option<Lease>> {
        let now = Utc::now();
        let n = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE leases.expires_at < $4 OR leases.holder = excluded.holder",
        )
        .bind(name)
        .bind(holder)
        .bind(sqlite::ts(now + SQLITE_LEASE_TTL))
        .bind(sqlite::ts(now))
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Ok(None);
        }
        Ok(Some(Lease::new(
            name,
            Box::new(SqliteLease {
                pool: self.pool.clone(),
                name: name.to_string(),
                holder: holder.to_string(),
            }),
        )))
    }

    async fn apply_retention(
        &self,
        positions_before: DateTime<Utc>,
        alerts_before: Option<DateTime<Utc>>,
        audit_before: Option<DateTime<Utc>>,
    ) -> Result<RetentionReport> {
        let mut tx = self.begin_write().await?;
        let positions = sqlx::query("DELETE FROM positions WHERE device_time < $1")
            .bind(sqlite::ts(positions_before))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let mut report =
            Self::delete_expired(&mut tx, positions_before, alerts_before, audit_before).await?;
        report.positions_deleted += positions;
        tx.commit().await?;
        Ok(report)
    }
}

/// How long a SQLite lease lasts without renewal (the holder renews it every second).
const SQLITE_LEASE_TTL: chrono::Duration = chrono::Duration::seconds(10);

/// A lease held as a row with an expiry.
struct SqliteLease {
    pool: SqlitePool,
    name: String,
    holder: String,
}

#[async_trait::async_trait]
impl LeaseHold for SqliteLease {
    async fn still_held(&mut self) -> bool {
        let now = Utc::now();
        sqlx::query(
            "UPDATE leases SET expires_at = $1 WHERE name = $2 AND holder = $3 AND expires_at >= $4",
        )
        .bind(sqlite::ts(now + SQLITE_LEASE_TTL))
        .bind(&self.name)
        .bind(&self.holder)
        .bind(sqlite::ts(now))
        .execute(&self.pool)
        .await
        .is_ok_and(|r| r.rows_affected() == 1)
    }

    async fn release(self: Box<Self>) {
        let _ = sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(&self.name)
            .bind(&self.holder)
            .execute(&self.pool)
            .await;
    }
}

/// Upsert of one subject's latest state; each field only moves forward in device time.
const LATEST_UPSERT: &str = "
INSERT INTO latest_state (subject_id, device_id, last_contact, lat, lon, accuracy_m, speed_kmh, valid,
    position_extra, position_time, status_time, battery_pct, charging, beacon_in_range, strap_ok, case_ok)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (subject_id) DO UPDATE SET
    device_id = CASE WHEN excluded.last_contact >= latest_state.last_contact
                     THEN excluded.device_id ELSE latest_state.device_id END,
    last_contact = max(latest_state.last_contact, excluded.last_contact),
    lat = CASE WHEN excluded.position_time IS NOT NULL AND (latest_state.position_time IS NULL
               OR excluded.position_time >= latest_state.position_time) THEN excluded.lat ELSE latest_state.lat END,
    lon = CASE WHEN excluded.position_time IS NOT NULL AND (latest_state.position_time IS NULL
               OR excluded.position_time >= latest_state.position_time) THEN excluded.lon ELSE latest_state.lon END,
    accuracy_m = CASE WHEN excluded.position_time IS NOT NULL AND (latest_state.position_time IS NULL
               OR excluded.position_time >= latest_state.position_time) THEN excluded.accuracy_m ELSE latest_state.accuracy_m END,
    speed_kmh = CASE WHEN excluded.position_time IS NOT NULL AND (latest_state.position_time IS NULL
               OR excluded.position_time >= latest_state.position_time) THEN excluded.speed_kmh ELSE latest_state.speed_kmh END,
    valid = CASE WHEN excluded.position_time IS NOT NULL AND (latest_state.position_time IS NULL
               OR excluded.position_time >= latest_state.position_time) THEN excluded.valid ELSE latest_state.valid END,
    position_extra = CASE WHEN excluded.position_time IS NOT NULL AND (latest_state.position_time IS NULL
               OR excluded.position_time >= latest_state.position_time) THEN excluded.position_extra ELSE latest_state.position_extra END,
    position_time = CASE WHEN excluded.position_time IS NOT NULL AND (latest_state.position_time IS NULL
               OR excluded.position_time >= latest_state.position_time) THEN excluded.position_time ELSE latest_state.position_time END,
    battery_pct = CASE WHEN excluded.battery_pct IS NOT NULL AND (latest_state.status_time IS NULL
               OR excluded.status_time >= latest_state.status_time) THEN excluded.battery_pct ELSE latest_state.battery_pct END,
    charging = CASE WHEN excluded.charging IS NOT NULL AND (latest_state.status_time IS NULL
               OR excluded.status_time >= latest_state.status_time) THEN excluded.charging ELSE latest_state.charging END,
    beacon_in_range = CASE WHEN excluded.beacon_in_range IS NOT NULL AND (latest_state.status_time IS NULL
               OR excluded.status_time >= latest_state.status_time) THEN excluded.beacon_in_range ELSE latest_state.beacon_in_range END,
    strap_ok = CASE WHEN excluded.strap_ok IS NOT NULL AND (latest_state.status_time IS NULL
               OR excluded.status_time >= latest_state.status_time) THEN excluded.strap_ok ELSE latest_state.strap_ok END,
    case_ok = CASE WHEN excluded.case_ok IS NOT NULL AND (latest_state.status_time IS NULL
               OR excluded.status_time >= latest_state.status_time) THEN excluded.case_ok ELSE latest_state.case_ok END,
    status_time = CASE WHEN excluded.status_time IS NOT NULL AND (latest_state.status_time IS NULL
               OR excluded.status_time >= latest_state.status_time) THEN excluded.status_time ELSE latest_state.status_time END
";
