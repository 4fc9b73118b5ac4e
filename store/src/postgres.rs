//! PostgreSQL backend.
//!
//! The common schema comes from versioned migrations (`store/migrations/postgres`). The
//! positions table is laid out at start-up, once, by [`choose_positions_layout`]:
//!
//! * **TimescaleDB** (extension available): hypertable on `device_time` (1-day chunks),
//!   compression after 7 days (segmented by device), a retention policy, and the continuous
//!   aggregate `positions_hourly` (records, last position per subject and hour).
//! * **Native partitions** (otherwise): `PARTITION BY RANGE (device_time)` with monthly
//!   partitions created ahead by `em_ensure_position_partitions` (called at connect and when a
//!   batch touches a month not yet prepared) and a DEFAULT partition, so nothing is rejected.
//!
//! Batches are written with one `INSERT … SELECT FROM UNNEST(arrays)` per batch plus one
//! `latest_state` upsert, in one transaction; a plain insert that falls back to
//! `ON CONFLICT DO NOTHING` on (device_id, device_time, seq) when a batch holds an already stored
//! record makes re-sent records harmless (see [`fixes`] for the details and why).
//!
//! The rest of the [`Store`] implementation is the shared body (`body.rs`), stamped here
//! with the PostgreSQL dialect (`dialect/postgres.rs`: `timestamptz`, `jsonb`,
//! `= ANY($n)` lists, `FOR UPDATE` row locks, the server's `now()`). This file holds what only
//! PostgreSQL does: the positions layout and its writes, the change log's advisory lock and
//! `NOTIFY` (`PgStore::append_change`, `listen_for_changes`), advisory-lock leases and the
//! retention of partitions and chunks.

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use em_model::*;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, Row};

use crate::body::store_body;
use crate::common::*;
use crate::dialect::postgres;
use crate::rows;
use crate::*;

mod baseline;
pub mod fixes;

/// Embedded migrations of the PostgreSQL schema (`store/migrations/postgres`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

const POSITIONS_NATIVE_SQL: &str = include_str!("../sql/positions_native.sql");

/// Days of positions the TimescaleDB retention policy keeps (the explicit
/// [`Store::apply_retention`] run by the operator may cut earlier).
pub const TIMESCALE_RETENTION_DAYS: u32 = 400;

/// What to say when TimescaleDB is installed on the server but not preloaded.
pub const TIMESCALE_PRELOAD_HINT: &str = "add timescaledb to shared_preload_libraries in \
     postgresql.conf (shared_preload_libraries = 'timescaledb') and restart PostgreSQL";

/// Key (with [`ADVISORY_CLASS`]) of the database-wide lock around `CREATE EXTENSION`: the
/// extension is per database, while stores (tests, tenants) start per schema concurrently.
const EXTENSION_LOCK: i32 = 1;
/// First key of the two-key advisory locks this store takes database-wide ("em" in ASCII).
const ADVISORY_CLASS: i32 = 0x656d;

/// Columns and key of the positions table, shared by both layouts.
const POSITIONS_COLUMNS: &str = include_str!("../sql/positions_columns.sql");

/// The positions table: a plain table (made a hypertable next) or range-partitioned by
/// device time (native layout).
fn positions_table(partitioned: bool) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS positions (\n{POSITIONS_COLUMNS}){}",
        if partitioned {
            " PARTITION BY RANGE (device_time)"
        } else {
            ""
        }
    )
}

/// TimescaleDB layout of a schema whose extension is already created, one statement per step
/// (a continuous aggregate cannot be created inside a multi-statement implicit transaction).
/// Every step is idempotent; `compress` is false when compression is already configured (it
/// is set once: 2.28 only notes that existing compressed chunks keep the old settings, older
/// releases refuse the change once chunks are compressed).
fn timescale_steps(compress: bool) -> Vec<String> {
    let mut steps = vec![
        positions_table(false),
        "SELECT create_hypertable('positions', by_range('device_time', INTERVAL '1 day'),
            if_not_exists => TRUE)"
            .into(),
        "CREATE INDEX IF NOT EXISTS positions_subject_time ON positions (subject_id, device_time)"
            .into(),
    ];
    if compress {
        steps.push(
            "ALTER TABLE positions SET (timescaledb.compress,
                timescaledb.compress_segmentby = 'device_id',
                timescaledb.compress_orderby = 'device_time DESC, seq DESC')"
                .into(),
        );
    }
    // Policies start one period from now, not at once: a store that has just been laid out
    // (a restart, a test) is not compressed or trimmed under its first writes.
    steps.extend([
        "SELECT add_compression_policy('positions', compress_after => INTERVAL '7 days',
            initial_start => now() + INTERVAL '12 hours', if_not_exists => TRUE)"
            .into(),
        format!(
            "SELECT add_retention_policy('positions', drop_after => INTERVAL '{TIMESCALE_RETENTION_DAYS} days',
                initial_start => now() + INTERVAL '1 day', if_not_exists => TRUE)"
        ),
        "CREATE MATERIALIZED VIEW IF NOT EXISTS positions_hourly
            WITH (timescaledb.continuous, timescaledb.materialized_only = true) AS
            SELECT subject_id,
                   time_bucket(INTERVAL '1 hour', device_time) AS bucket,
                   count(*) AS records,
                   max(device_time) AS last_time,
                   last(lat, device_time) AS last_lat,
                   last(lon, device_time) AS last_lon
            FROM positions
            GROUP BY subject_id, bucket
            WITH NO DATA"
            .into(),
        "SELECT add_continuous_aggregate_policy('positions_hourly',
            start_offset => INTERVAL '3 days', end_offset => INTERVAL '1 hour',
            schedule_interval => INTERVAL '30 minutes',
            initial_start => now() + INTERVAL '30 minutes', if_not_exists => TRUE)"
            .into(),
    ]);
    steps
}

/// How the positions table is laid out in this database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionsLayout {
    /// TimescaleDB hypertable with compression, retention and a continuous aggregate.
    Timescale,
    /// Native `PARTITION BY RANGE (device_time)`, monthly partitions plus a default partition.
    NativePartitions,
}

/// Which layout a new positions table should get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayoutRequest {
    /// A hypertable when TimescaleDB is usable, native partitions otherwise (production).
    #[default]
    Auto,
    /// Native partitions even when TimescaleDB is usable.
    Native,
    /// A hypertable, or an error saying why TimescaleDB cannot be used.
    Timescale,
}

/// What a schema already has under the name `positions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExistingPositions {
    Missing,
    Hypertable,
    Partitioned,
    /// A plain table neither partitioned nor a hypertable (not created by this store).
    Plain,
}

/// Whether TimescaleDB can be used by this server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimescaleStatus {
    /// The server has no `timescaledb` extension.
    NotInstalled,
    /// The extension is installed but its library is not in `shared_preload_libraries`:
    /// `CREATE EXTENSION` would be FATAL and drop the connection.
    NotPreloaded,
    /// Installed and preloaded.
    Usable,
}

/// Reads the status from what the server reports: whether `pg_available_extensions` lists
/// `timescaledb`, and the `shared_preload_libraries` setting (a comma-separated list whose
/// entries may be quoted or carry a path, e.g. `'$libdir/timescaledb-2.28.3'`).
pub fn timescale_status(available: bool, shared_preload_libraries: &str) -> TimescaleStatus {
    if !available {
        return TimescaleStatus::NotInstalled;
    }
    let preloaded = shared_preload_libraries.split(',').any(|entry| {
        let lib = entry.trim().trim_matches('"').trim();
        let file = lib.rsplit('/').next().unwrap_or(lib);
        file == "timescaledb" || file.starts_with("timescaledb-")
    });
    if preloaded {
        TimescaleStatus::Usable
    } else {
        TimescaleStatus::NotPreloaded
    }
}

/// The layout decision: an existing table keeps its layout (data is never converted behind
/// the operator's back); a new one follows the request, `Auto` being a hypertable exactly when
/// TimescaleDB is usable. A hypertable needs a usable TimescaleDB.
pub fn choose_positions_layout(
    existing: ExistingPositions,
    timescale: TimescaleStatus,
    request: LayoutRequest,
) -> Result<PositionsLayout> {
    let unusable = |why: &str| {
        StoreError::Invalid(match timescale {
            TimescaleStatus::NotPreloaded => {
                format!("{why}, but TimescaleDB is not preloaded: {TIMESCALE_PRELOAD_HINT}")
            }
            _ => format!("{why}, but the server has no timescaledb extension"),
        })
    };
    match (existing, request) {
        (ExistingPositions::Plain, _) => Err(StoreError::Invalid(
            "table positions exists but is neither partitioned nor a TimescaleDB hypertable; \
             migrate it manually"
                .into(),
        )),
        (ExistingPositions::Hypertable, LayoutRequest::Native) => Err(StoreError::Invalid(
            "native partitions were asked for, but positions is already a TimescaleDB hypertable"
                .into(),
        )),
        (ExistingPositions::Partitioned, LayoutRequest::Timescale) => Err(StoreError::Invalid(
            "a TimescaleDB hypertable was asked for, but positions is already natively partitioned"
                .into(),
        )),
        (ExistingPositions::Partitioned, _) => Ok(PositionsLayout::NativePartitions),
        (ExistingPositions::Hypertable, _) if timescale != TimescaleStatus::Usable => {
            Err(unusable("positions is a TimescaleDB hypertable"))
        }
        (ExistingPositions::Hypertable, _) => Ok(PositionsLayout::Timescale),
        (ExistingPositions::Missing, LayoutRequest::Native) => {
            Ok(PositionsLayout::NativePartitions)
        }
        (ExistingPositions::Missing, LayoutRequest::Timescale)
            if timescale != TimescaleStatus::Usable =>
        {
            Err(unusable("a TimescaleDB hypertable was asked for"))
        }
        (ExistingPositions::Missing, LayoutRequest::Timescale) => Ok(PositionsLayout::Timescale),
        (ExistingPositions::Missing, LayoutRequest::Auto) => Ok(match timescale {
            TimescaleStatus::Usable => PositionsLayout::Timescale,
            _ => PositionsLayout::NativePartitions,
        }),
    }
}

/// Month index (year*12 + month0) of a time; the unit of native partitions.
fn month_index(t: DateTime<Utc>) -> i32 {
    t.year() * 12 + t.month0() as i32
}

fn month_start(index: i32) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(index.div_euclid(12), index.rem_euclid(12) as u32 + 1, 1)
}

/// Parses `positions_pYYYYMM` into the exclusive end of that month.
fn partition_end(name: &str) -> Option<DateTime<Utc>> {
    let digits = name.strip_prefix("positions_p")?;
    if digits.len() != 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = digits.get(..4)?.parse().ok()?;
    let month: u32 = digits.get(4..)?.parse().ok()?;
    let start = NaiveDate::from_ymd_opt(year, month, 1)?;
    let end = start.checked_add_months(Months::new(1))?;
    Some(end.and_hms_opt(0, 0, 0)?.and_utc())
}

fn validate_schema_name(schema: &str) -> Result<()> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "schema name {schema:?} must be a lowercase identifier ([a-z_][a-z0-9_]*, ≤ 63 bytes)"
        )))
    }
}

/// The PostgreSQL implementation of [`Store`].
#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    layout: PositionsLayout,
    /// Months whose native partition is known to exist (avoids a round trip per batch).
    ensured_months: Mutex<HashSet<i32>>,
    /// When a batch last met an already stored record (selects the insert form).
    duplicates: fixes::DuplicateWindow,
    /// Ticks on every `NOTIFY` of the change log (any instance), from [`listen_for_changes`].
    wakeups: tokio::sync::watch::Receiver<u64>,
}

impl PgStore {
    /// Connects to `url` (default schema `public`), migrates, prepares the positions layout
    /// ([`LayoutRequest::Auto`]).
    pub async fn connect(url: &str) -> Result<Self> {
        let opts = PgConnectOptions::from_str(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        Self::init(pool, LayoutRequest::Auto).await
    }

    /// Connects with `search_path` set to `schema, public` on every connection (creating the
    /// schema when missing) — one database can hold many independent stores (tests, tenants).
    pub async fn connect_in_schema(url: &str, schema: &str) -> Result<Self> {
        Self::connect_in_schema_with(url, schema, LayoutRequest::Auto).await
    }

    /// [`PgStore::connect_in_schema`] asking for a positions layout (tests run both).
    pub async fn connect_in_schema_with(
        url: &str,
        schema: &str,
        layout: LayoutRequest,
    ) -> Result<Self> {
        validate_schema_name(schema)?;
        let base = PgConnectOptions::from_str(url)?;
        {
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(base.clone())
                .await?;
            // `schema` passed validate_schema_name: [a-z_][a-z0-9_]*.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
            )))
            .execute(&admin)
            .await?;
            admin.close().await;
        }
        let opts = base.options([("search_path", format!("{schema},public"))]);
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(opts)
            .await?;
        Self::init(pool, layout).await
    }

    async fn init(pool: PgPool, request: LayoutRequest) -> Result<Self> {
        MIGRATOR.run(&pool).await?;
        Self::hash_plaintext_secrets(&pool).await?;
        let layout = Self::prepare_positions(&pool, request).await?;
        let wakeups = listen_for_changes(&pool).await?;
        let store = PgStore {
            pool,
            layout,
            ensured_months: Mutex::new(HashSet::new()),
            duplicates: fixes::DuplicateWindow::new(),
            wakeups,
        };
        if layout == PositionsLayout::NativePartitions {
            // Last month through two months ahead.
            let created: i32 = sqlx::query_scalar(
                "SELECT em_ensure_position_partitions((now() AT TIME ZONE 'UTC')::date - 31, 3)",
            )
            .fetch_one(&store.pool)
            .await?;
            tracing::debug!(created, "position partitions prepared");
        }
        tracing::info!(layout = ?layout, "PostgreSQL store ready");
        Ok(store)
    }

    async fn prepare_positions(pool: &PgPool, request: LayoutRequest) -> Result<PositionsLayout> {
        let mut conn = pool.acquire().await?;
        // Serialise concurrent start-ups of the same schema.
        sqlx::query(
            "SELECT pg_advisory_lock(hashtext(current_schema() || '.em_positions_layout'))",
        )
        .execute(&mut *conn)
        .await?;
        let res = Self::prepare_positions_locked(&mut conn, request).await;
        sqlx::query(
            "SELECT pg_advisory_unlock(hashtext(current_schema() || '.em_positions_layout'))",
        )
        .execute(&mut *conn)
        .await?;
        res
    }

    /// What TimescaleDB offers this server, read without loading the extension (loading it
    /// when it is not preloaded is FATAL and drops the connection).
    async fn timescale_status(conn: &mut PgConnection) -> Result<TimescaleStatus> {
        let (available, preload): (bool, String) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
                    current_setting('shared_preload_libraries')",
        )
        .fetch_one(&mut *conn)
        .await?;
        Ok(timescale_status(available, &preload))
    }

    async fn prepare_positions_locked(
        conn: &mut PgConnection,
        request: LayoutRequest,
    ) -> Result<PositionsLayout> {
        let timescale = Self::timescale_status(conn).await?;
        let existing = Self::existing_positions(conn).await?;
        let layout = choose_positions_layout(existing, timescale, request)?;
        if existing == ExistingPositions::Missing
            && layout == PositionsLayout::NativePartitions
            && timescale == TimescaleStatus::NotPreloaded
        {
            tracing::warn!(
                "the timescaledb extension is installed but not preloaded, so positions use \
                 native partitions; for a hypertable, {TIMESCALE_PRELOAD_HINT} (an existing \
                 positions table keeps its layout)"
            );
        }
        match layout {
            PositionsLayout::Timescale => {
                Self::create_timescale_extension(conn).await?;
                let compress = existing == ExistingPositions::Missing
                    || !Self::compression_enabled(conn).await?;
                for step in timescale_steps(compress) {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(step.as_str()))
                        .execute(&mut *conn)
                        .await?;
                }
            }
            PositionsLayout::NativePartitions => {
                // Built from constants (positions_columns.sql), not from input.
                sqlx::raw_sql(sqlx::AssertSqlSafe(positions_table(true)))
                    .execute(&mut *conn)
                    .await?;
                sqlx::raw_sql(POSITIONS_NATIVE_SQL)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        fixes::ensure_position_columns(conn).await?;
        Ok(layout)
    }

    /// `CREATE EXTENSION timescaledb` once per database, in `public` (not in this store's
    /// schema: dropping a schema must not drop the extension other schemas use). Stores of
    /// several schemas starting at once take turns on a database-wide advisory lock.
    async fn create_timescale_extension(conn: &mut PgConnection) -> Result<()> {
        let installed = || {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb')",
            )
        };
        if installed().fetch_one(&mut *conn).await? {
            return Ok(());
        }
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(ADVISORY_CLASS)
            .bind(EXTENSION_LOCK)
            .execute(&mut *conn)
            .await?;
        let res = sqlx::raw_sql("CREATE EXTENSION IF NOT EXISTS timescaledb WITH SCHEMA public")
            .execute(&mut *conn)
            .await;
        sqlx::query("SELECT pg_advisory_unlock($1, $2)")
            .bind(ADVISORY_CLASS)
            .bind(EXTENSION_LOCK)
            .execute(&mut *conn)
            .await?;
        res?;
        Ok(())
    }

    async fn compression_enabled(conn: &mut PgConnection) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(bool_or(compression_enabled), false)
               FROM timescaledb_information.hypertables
              WHERE hypertable_schema = current_schema() AND hypertable_name = 'positions'",
        )
        .fetch_one(&mut *conn)
        .await?)
    }

    async fn existing_positions(conn: &mut PgConnection) -> Result<ExistingPositions> {
        let kind: Option<String> = sqlx::query_scalar(
            "SELECT c.relkind::text FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = current_schema() AND c.relname = 'positions'",
        )
        .fetch_optional(&mut *conn)
        .await?;
        Ok(match kind.as_deref() {
            None => ExistingPositions::Missing,
            Some("p") => ExistingPositions::Partitioned,
            Some(_) => {
                // TimescaleDB's catalog, read without calling into the extension (which must
                // not be loaded when it is not preloaded).
                let has_catalog: bool = sqlx::query_scalar(
                    "SELECT to_regclass('_timescaledb_catalog.hypertable') IS NOT NULL",
                )
                .fetch_one(&mut *conn)
                .await?;
                let hyper = has_catalog
                    && sqlx::query_scalar::<_, bool>(
                        "SELECT EXISTS (SELECT 1 FROM _timescaledb_catalog.hypertable
                           WHERE schema_name = current_schema() AND table_name = 'positions')",
                    )
                    .fetch_one(&mut *conn)
                    .await?;
                if hyper {
                    ExistingPositions::Hypertable
                } else {
                    ExistingPositions::Plain
                }
            }
        })
    }

    /// Layout of the positions table chosen for this database.
    pub fn layout(&self) -> PositionsLayout {
        self.layout
    }

    /// The underlying pool (tools, backend-specific tests).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Writes a batch the way the store did before issue #4 (every row through
    /// `ON CONFLICT DO NOTHING`, per-row JSON for the non-column fields). Same guarantees as
    /// [`Store::insert_records`], slower; kept as the comparison baseline of
    /// `examples/insert_bench.rs` and to test that rows of both formats read back alike.
    pub async fn insert_records_baseline(&self, records: &[StoredRecord]) -> Result<()> {
        baseline::insert_records(self, records).await
    }

    /// Creates native partitions for the months of a batch (within two years back and two
    /// months ahead; anything else lands in the default partition). Failures are logged, never
    /// fatal: the default partition accepts every row.
    pub(crate) async fn ensure_partitions_for(&self, device_times: &[DateTime<Utc>]) {
        if self.layout != PositionsLayout::NativePartitions {
            return;
        }
        let now = month_index(Utc::now());
        let mut wanted: Vec<i32> = Vec::new();
        for t in device_times {
            let m = month_index(*t);
            if (now - 24..=now + 2).contains(&m) && !wanted.contains(&m) {
                wanted.push(m);
            }
        }
        let missing: Vec<i32> = match self.ensured_months.lock() {
            Ok(known) => wanted.into_iter().filter(|m| !known.contains(m)).collect(),
            Err(_) => wanted,
        };
        for m in missing {
            let Some(start) = month_start(m) else {
                continue;
            };
            match sqlx::query_scalar::<_, bool>("SELECT em_create_position_partition($1)")
                .bind(start)
                .fetch_one(&self.pool)
                .await
            {
                Ok(_) => {
                    if let Ok(mut known) = self.ensured_months.lock() {
                        known.insert(m);
                    }
                }
                Err(e) => tracing::warn!(month = %start, error = %e,
                    "could not create positions partition; rows go to the default partition"),
            }
        }
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, Postgres>> {
        Ok(self.pool.begin().await?)
    }

    /// Appends `change` to the log inside the caller's transaction. The transaction advisory
    /// lock makes change rows commit in id order (a later id cannot commit before an earlier
    /// one), so readers that go on from the last id they saw miss nothing; `pg_notify` wakes
    /// every instance's readers at commit.
    async fn append_change(conn: &mut PgConnection, change: &Change) -> Result<ChangeId> {
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || '.em_changes', 0))",
        )
        .execute(&mut *conn)
        .await?;
        let payload = to_json("change", change)?;
        let id: i64 = sqlx::query_scalar(
            "WITH ins AS (INSERT INTO changes (topic, subject_id, payload) VALUES ($1, $2, $3) RETURNING id)
             SELECT id FROM ins, LATERAL (SELECT pg_notify('em_changes.' || current_schema(), ins.id::text)) n",
        )
        .bind(change.topic())
        .bind(change.subject_id())
        .bind(payload)
        .fetch_one(&mut *conn)
        .await?;
        Ok(id)
    }

    /// Commits a transaction that appended to the change log (its `NOTIFY` goes out at commit).
    async fn commit_changes(&self, tx: sqlx::Transaction<'static, Postgres>) -> Result<()> {
        tx.commit().await?;
        Ok(())
    }

    /// A `positions` row: the shared columns, then those of the fast write path where set
    /// (NULL in rows of the earlier path, which kept them in `extra`).
    fn positions_record(r: &PgRow) -> Result<Record> {
        let mut record = rows::record(r)?;
        if let Some(g) = r.try_get::<Option<i16>, _>("gsm_signal")? {
            record.gsm_signal = small_u8("GSM signal", Some(i64::from(g)))?;
        }
        if let Some(p) = record.position.as_mut() {
            apply_position_columns(r, p)?;
        }
        Ok(record)
    }

    /// A `latest_state` row, position columns of the fast write path included.
    fn latest_state(r: &PgRow) -> Result<LatestState> {
        let mut state = rows::latest_state(r)?;
        if let Some(p) = state.position.as_mut() {
            apply_position_columns(r, p)?;
        }
        Ok(state)
    }
}

/// Overrides a position's course, altitude, satellites and source with the row's columns where
/// they are set (`positions` and `latest_state` share the column names).
fn apply_position_columns(r: &PgRow, p: &mut Position) -> Result<()> {
    if let Some(c) = r.try_get::<Option<f32>, _>("course_deg")? {
        p.course_deg = Some(c);
    }
    if let Some(a) = r.try_get::<Option<f32>, _>("altitude_m")? {
        p.altitude_m = Some(a);
    }
    if let Some(s) = r.try_get::<Option<i16>, _>("satellites")? {
        p.satellites = small_u8("satellites", Some(i64::from(s)))?;
    }
    if let Some(src) = r.try_get::<Option<&str>, _>("fix_source")? {
        p.source = fixes::fix_source_from_str(src)?;
    }
    Ok(())
}

store_body! {
    store: PgStore, dialect: postgres;

    fn backend(&self) -> &'static str {
        match self.layout {
            PositionsLayout::Timescale => "timescaledb",
            PositionsLayout::NativePartitions => "postgres",
        }
    }

    async fn insert_records(&self, records: &[StoredRecord]) -> Result<()> {
        fixes::insert_records(self, records).await
    }

    fn change_wakeups(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wakeups.clone()
    }

    fn change_poll_interval(&self) -> Duration {
        // NOTIFY wakes readers at once; the poll only covers notifications lost while the
        // listening connection was being re-established.
        Duration::from_secs(1)
    }

    async fn acquire_lease(&self, name: &str, holder: &str) -> Result<Option<Lease>> {
        use sqlx::Connection;
        // Standby instances ask every second: look on a pooled connection first, and open the
        // lease's own connection only when the lock is free (the try below decides races).
        let held: bool = sqlx::query_scalar(
            "WITH k AS (SELECT hashtextextended(current_schema() || '.em_lease.' || $1, 0) AS key)
             SELECT EXISTS (SELECT 1 FROM pg_locks l, k WHERE l.locktype = 'advisory'
               AND l.granted AND l.objsubid = 1
               AND l.classid = ((k.key >> 32) & 4294967295)::oid
               AND l.objid = (k.key & 4294967295)::oid)",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await?;
        if held {
            return Ok(None);
        }
        let opts = (*self.pool.connect_options()).clone();
        let mut conn = PgConnection::connect_with(&opts).await?;
        let got: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_lock(hashtextextended(current_schema() || '.em_lease.' || $1, 0))",
        )
        .bind(name)
        .fetch_one(&mut conn)
        .await?;
        if !got {
            let _ = conn.close().await;
            return Ok(None);
        }
        // Name the holder on the server (pg_stat_activity.application_name) for operators.
        // (pid first: the server cuts the name at 63 bytes.)
        let _ = sqlx::query("SELECT set_config('application_name', $1, false)")
            .bind(format!(
                "em lease {name} pid {} ({holder})",
                std::process::id()
            ))
            .execute(&mut conn)
            .await;
        Ok(Some(Lease::new(
            name,
            Box::new(PgLease {
                conn: Some(conn),
                name: name.to_string(),
            }),
        )))
    }

    async fn apply_retention(
        &self,
        positions_before: DateTime<Utc>,
        alerts_before: Option<DateTime<Utc>>,
        audit_before: Option<DateTime<Utc>>,
    ) -> Result<RetentionReport> {
        let mut positions_deleted = 0u64;
        match self.layout {
            PositionsLayout::NativePartitions => {
                // Whole partitions first: dropping a month is cheap and leaves no bloat.
                let parts: Vec<String> = sqlx::query_scalar(
                    "SELECT c.relname::text FROM pg_inherits i
                       JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = 'positions'::regclass",
                )
                .fetch_all(&self.pool)
                .await?;
                for part in parts {
                    let Some(end) = partition_end(&part) else {
                        continue;
                    };
                    if end > positions_before {
                        continue;
                    }
                    let mut tx = self.pool.begin().await?;
                    let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                        "SELECT count(*) FROM \"{part}\""
                    )))
                    .fetch_one(&mut *tx)
                    .await?;
                    // `part` is a partition name read from pg_inherits and parsed by partition_end.
                    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE \"{part}\"")))
                        .execute(&mut *tx)
                        .await?;
                    tx.commit().await?;
                    positions_deleted += u64::try_from(n).unwrap_or(0);
                    if let Some(m) = part
                        .strip_prefix("positions_p")
                        .and_then(|d| d.parse::<i32>().ok())
                    {
                        if let Ok(mut known) = self.ensured_months.lock() {
                            known.remove(&((m / 100) * 12 + (m % 100) - 1));
                        }
                    }
                }
            }
            PositionsLayout::Timescale => {
                let mut tx = self.pool.begin().await?;
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM positions WHERE device_time < $1")
                        .bind(positions_before)
                        .fetch_one(&mut *tx)
                        .await?;
                sqlx::query("SELECT drop_chunks('positions', older_than => $1::timestamptz)")
                    .bind(positions_before)
                    .execute(&mut *tx)
                    .await?;
                // Rows in chunks that straddle the cut-off.
                sqlx::query("DELETE FROM positions WHERE device_time < $1")
                    .bind(positions_before)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                positions_deleted = u64::try_from(n).unwrap_or(0);
            }
        }
        let mut tx = self.pool.begin().await?;
        if self.layout == PositionsLayout::NativePartitions {
            // Rows of the default partition and of months not yet over.
            positions_deleted += sqlx::query("DELETE FROM positions WHERE device_time < $1")
                .bind(positions_before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        let mut report =
            Self::delete_expired(&mut tx, positions_before, alerts_before, audit_before).await?;
        report.positions_deleted += positions_deleted;
        tx.commit().await?;
        Ok(report)
    }
}

/// A lease held as a session advisory lock on a connection of its own.
struct PgLease {
    conn: Option<PgConnection>,
    name: String,
}

#[async_trait::async_trait]
impl LeaseHold for PgLease {
    async fn still_held(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        // The lock lives as long as this session: the session answering is the lock held.
        let check = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'
               AND pid = pg_backend_pid() AND granted)",
        )
        .fetch_one(&mut *conn);
        match tokio::time::timeout(Duration::from_secs(5), check).await {
            Ok(Ok(true)) => true,
            Ok(Ok(false)) | Ok(Err(_)) | Err(_) => {
                // Give the connection up so that the server drops whatever it still holds.
                self.conn = None;
                false
            }
        }
    }

    async fn release(mut self: Box<Self>) {
        use sqlx::Connection;
        if let Some(mut conn) = self.conn.take() {
            let _ = sqlx::query(
                "SELECT pg_advisory_unlock(hashtextextended(current_schema() || '.em_lease.' || $1, 0))",
            )
            .bind(&self.name)
            .execute(&mut conn)
            .await;
            let _ = conn.close().await;
        }
    }
}

/// Listens for the change log's `NOTIFY` (channel `em_changes.<schema>`) on a connection of
/// its own and ticks the returned watch on each (and after each reconnection, when
/// notifications may have been lost). The task ends when every receiver is gone.
async fn listen_for_changes(pool: &PgPool) -> Result<tokio::sync::watch::Receiver<u64>> {
    let schema: String = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(pool)
        .await?;
    let channel = format!("em_changes.{schema}");
    // A pool of its own: the listener keeps its connection for the store's lifetime, which
    // must not hold up closing the store's pool.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await?;
    let mut listener = sqlx::postgres::PgListener::connect_with(&own).await?;
    listener.listen(&channel).await?;
    let (tx, rx) = tokio::sync::watch::channel(0u64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tx.closed() => break,
                n = listener.try_recv() => match n {
                    Ok(Some(_)) => {
                        tx.send_modify(|c| *c = c.wrapping_add(1));
                    }
                    Ok(None) => {
                        // Connection lost; the next try_recv reconnects. Wake readers: what was
                        // notified meanwhile is lost.
                        tracing::warn!(channel = channel.as_str(), "change-log listener reconnecting");
                        tx.send_modify(|c| *c = c.wrapping_add(1));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "change-log listener failed; retrying");
                        tx.send_modify(|c| *c = c.wrapping_add(1));
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    });
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_decision() {
        use ExistingPositions::*;
        use LayoutRequest::*;
        use TimescaleStatus::*;
        let choose = |e, t, r| choose_positions_layout(e, t, r);
        // A new table: a hypertable exactly when TimescaleDB is usable (Auto).
        assert_eq!(
            choose(Missing, Usable, Auto).expect("ts"),
            PositionsLayout::Timescale
        );
        assert_eq!(
            choose(Missing, NotInstalled, Auto).expect("native"),
            PositionsLayout::NativePartitions
        );
        // Installed but not preloaded: CREATE EXTENSION would be FATAL; native partitions.
        assert_eq!(
            choose(Missing, NotPreloaded, Auto).expect("fallback"),
            PositionsLayout::NativePartitions
        );
        // Asked for explicitly.
        assert_eq!(
            choose(Missing, Usable, Native).expect("native asked"),
            PositionsLayout::NativePartitions
        );
        assert_eq!(
            choose(Missing, Usable, Timescale).expect("ts asked"),
            PositionsLayout::Timescale
        );
        for t in [NotInstalled, NotPreloaded] {
            let Err(StoreError::Invalid(m)) = choose(Missing, t, Timescale) else {
                panic!("a hypertable cannot be made without a usable TimescaleDB ({t:?})");
            };
            assert!(
                m.contains("TimescaleDB") || m.contains("timescaledb"),
                "{m}"
            );
        }
        let Err(StoreError::Invalid(m)) = choose(Missing, NotPreloaded, Timescale) else {
            panic!("not preloaded");
        };
        assert!(m.contains("shared_preload_libraries"), "{m}");
        // An existing table keeps its layout whatever is installed now.
        for t in [Usable, NotInstalled, NotPreloaded] {
            assert_eq!(
                choose(Partitioned, t, Auto).expect("keep native"),
                PositionsLayout::NativePartitions
            );
        }
        assert_eq!(
            choose(Hypertable, Usable, Auto).expect("keep ts"),
            PositionsLayout::Timescale
        );
        // …and an existing hypertable without a usable TimescaleDB is an error, not a crash.
        let Err(StoreError::Invalid(m)) = choose(Hypertable, NotPreloaded, Auto) else {
            panic!("hypertable without preload");
        };
        assert!(m.contains("shared_preload_libraries"), "{m}");
        assert!(choose(Hypertable, NotInstalled, Auto).is_err());
        // A request against the existing layout is an error, never a conversion.
        assert!(choose(Hypertable, Usable, Native).is_err());
        assert!(choose(Partitioned, Usable, Timescale).is_err());
        assert!(matches!(
            choose(Plain, Usable, Auto),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn timescale_preload_is_read_from_the_setting() {
        use TimescaleStatus::*;
        assert_eq!(timescale_status(false, "timescaledb"), NotInstalled);
        assert_eq!(timescale_status(true, ""), NotPreloaded);
        assert_eq!(timescale_status(true, "pg_stat_statements"), NotPreloaded);
        assert_eq!(timescale_status(true, "timescaledb_toolkit"), NotPreloaded);
        assert_eq!(timescale_status(true, "timescaledb"), Usable);
        assert_eq!(
            timescale_status(true, "pg_stat_statements, timescaledb"),
            Usable
        );
        assert_eq!(timescale_status(true, "\"timescaledb\""), Usable);
        assert_eq!(
            timescale_status(true, "$libdir/timescaledb-2.28.3,auto_explain"),
            Usable
        );
    }

    #[test]
    fn timescale_steps_cover_policies() {
        let all = timescale_steps(true).join("\n");
        for needle in [
            "create_hypertable",
            "timescaledb.compress",
            "add_compression_policy",
            "add_retention_policy",
            "timescaledb.continuous",
            "add_continuous_aggregate_policy",
        ] {
            assert!(all.contains(needle), "missing {needle}");
        }
        // The extension is created apart (once per database, in public), never per schema.
        assert!(!all.contains("CREATE EXTENSION"));
        // Compression is configured once, not again at every start.
        assert!(!timescale_steps(false)
            .join("\n")
            .contains("timescaledb.compress,"));
    }

    #[test]
    fn partition_names_and_months() {
        let end = partition_end("positions_p202402").expect("parse");
        assert_eq!(end.to_rfc3339(), "2024-03-01T00:00:00+00:00");
        assert_eq!(
            partition_end("positions_p202412")
                .expect("dec")
                .to_rfc3339(),
            "2025-01-01T00:00:00+00:00"
        );
        assert!(partition_end("positions_default").is_none());
        assert!(partition_end("positions_p2024").is_none());
        assert!(partition_end("positions_p202413").is_none());
        let t = DateTime::parse_from_rfc3339("2024-02-15T10:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        assert_eq!(
            month_start(month_index(t)).expect("start"),
            NaiveDate::from_ymd_opt(2024, 2, 1).expect("date")
        );
        assert_eq!(
            month_start(month_index(t) - 2).expect("start"),
            NaiveDate::from_ymd_opt(2023, 12, 1).expect("date")
        );
    }

    #[test]
    fn schema_names() {
        assert!(validate_schema_name("em_test_1_2_3").is_ok());
        assert!(validate_schema_name("").is_err());
        assert!(validate_schema_name("Bad").is_err());
        assert!(validate_schema_name("x; drop table y").is_err());
        assert!(validate_schema_name("1abc").is_err());
    }
}
