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

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};
use em_model::*;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Postgres, QueryBuilder, Row};

use crate::common::*;
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

/// The positions table of the TimescaleDB layout (same columns and key as the native one).
const TIMESCALE_TABLE: &str = "CREATE TABLE IF NOT EXISTS positions (
    device_id       TEXT NOT NULL,
    device_time     TIMESTAMPTZ NOT NULL,
    seq             BIGINT NOT NULL,
    received_time   TIMESTAMPTZ NOT NULL,
    subject_id      BIGINT,
    protocol        TEXT NOT NULL,
    lat             DOUBLE PRECISION,
    lon             DOUBLE PRECISION,
    accuracy_m      REAL,
    speed_kmh       REAL,
    valid           BOOLEAN,
    battery_pct     SMALLINT,
    charging        BOOLEAN,
    beacon_in_range BOOLEAN,
    extra           JSONB NOT NULL,
    course_deg      REAL,
    altitude_m      REAL,
    satellites      SMALLINT,
    fix_source      TEXT,
    gsm_signal      SMALLINT,
    CONSTRAINT positions_key PRIMARY KEY (device_id, device_time, seq))";

/// TimescaleDB layout of a schema whose extension is already created, one statement per step
/// (a continuous aggregate cannot be created inside a multi-statement implicit transaction).
/// Every step is idempotent; `compress` is false when compression is already configured (it
/// is set once: 2.28 only notes that existing compressed chunks keep the old settings, older
/// releases refuse the change once chunks are compressed).
fn timescale_steps(compress: bool) -> Vec<String> {
    let mut steps = vec![
        TIMESCALE_TABLE.to_string(),
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
        hash_plaintext_secrets(&pool).await?;
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

    async fn alert_row(
        conn: &mut PgConnection,
        id: AlertId,
        lock: bool,
    ) -> Result<Option<(Alert, i64)>> {
        let sql = if lock {
            "SELECT * FROM alerts WHERE id = $1 FOR UPDATE"
        } else {
            "SELECT * FROM alerts WHERE id = $1"
        };
        let row = sqlx::query(sql).bind(id).fetch_optional(&mut *conn).await?;
        row.map(|r| alert_from_row(&r)).transpose()
    }

    async fn insert_audit(conn: &mut PgConnection, e: &NewAudit) -> Result<i64> {
        let at = e.at.unwrap_or_else(Utc::now);
        Ok(sqlx::query_scalar(
            "INSERT INTO audit (at, actor_id, actor, action, target_type, target_id, subject_id, details)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(at)
        .bind(e.actor_id)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.target_type)
        .bind(&e.target_id)
        .bind(e.subject_id)
        .bind(&e.details)
        .fetch_one(&mut *conn)
        .await?)
    }

    async fn insert_outbox(conn: &mut PgConnection, messages: &[NewOutbox]) -> Result<()> {
        for m in messages {
            sqlx::query(
                "INSERT INTO outbox (channel, ordering_key, idempotency_key, payload, next_attempt_at, created_at)
                 VALUES ($1, $2, $3, $4, now(), now())
                 ON CONFLICT (channel, idempotency_key) DO NOTHING",
            )
            .bind(&m.channel)
            .bind(&m.ordering_key)
            .bind(&m.idempotency_key)
            .bind(&m.payload)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
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

    async fn outbox_status_locked(conn: &mut PgConnection, id: i64) -> Result<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT status FROM outbox WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?,
        )
    }
}

/// Replaces every device secret still stored as plaintext (rows written before secrets were
/// hashed, or by an older instance during a rolling upgrade) by its stored form
/// ([`device_secret`]), on every open. The same Rust code as SQLite's (one definition of the
/// stored form); idempotent, and safe with several instances starting at once (a row is only
/// replaced while it still holds the value read).
async fn hash_plaintext_secrets(pool: &PgPool) -> Result<()> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT device_id, secret FROM devices
         WHERE secret IS NOT NULL AND (length(secret) <> 71 OR secret NOT LIKE 'sha256$%')",
    )
    .fetch_all(pool)
    .await?;
    let mut converted = 0u64;
    for (device_id, secret) in rows {
        if device_secret::is_hashed(&secret) {
            continue;
        }
        converted +=
            sqlx::query("UPDATE devices SET secret = $1 WHERE device_id = $2 AND secret = $3")
                .bind(device_secret::hash(&secret))
                .bind(&device_id)
                .bind(&secret)
                .execute(pool)
                .await?
                .rows_affected();
    }
    if converted > 0 {
        tracing::info!(
            devices = converted,
            "plaintext device secrets replaced by their hashes"
        );
    }
    Ok(())
}

fn device_from_row(r: &PgRow) -> Result<Device> {
    Ok(Device {
        device_id: r.try_get("device_id")?,
        protocol: parse_col("protocol", r.try_get::<&str, _>("protocol")?)?,
        secret: r.try_get("secret")?,
        active: r.try_get("active")?,
        class: parse_col("device class", r.try_get::<&str, _>("class")?)?,
    })
}

fn assignment_from_row(r: &PgRow) -> Result<Assignment> {
    Ok(Assignment {
        device_id: r.try_get("device_id")?,
        subject_id: r.try_get("subject_id")?,
        from: r.try_get("valid_from")?,
        to: r.try_get("valid_to")?,
    })
}

fn subject_from_row(r: &PgRow) -> Result<Subject> {
    Ok(Subject {
        id: r.try_get("id")?,
        reference: r.try_get("reference")?,
        display_name: r.try_get("display_name")?,
        officer_id: r.try_get("officer_id")?,
        timezone: r.try_get("timezone")?,
        order_start: r.try_get("order_start")?,
        order_end: r.try_get("order_end")?,
        rules: from_json("breach rules", r.try_get("rules")?)?,
    })
}

fn zone_from_row(r: &PgRow) -> Result<ZoneSpec> {
    let kind: String = r.try_get("kind")?;
    let schedule: Option<serde_json::Value> = r.try_get("schedule")?;
    Ok(ZoneSpec {
        id: r.try_get("id")?,
        subject_id: r.try_get("subject_id")?,
        group: r.try_get("group_name")?,
        name: r.try_get("name")?,
        kind: from_json("zone kind", serde_json::Value::String(kind))?,
        geometry: from_json("zone geometry", r.try_get("geometry")?)?,
        schedule: schedule
            .map(|v| from_json("zone schedule", v))
            .transpose()?,
        is_curfew_home: r.try_get("is_curfew_home")?,
    })
}

fn user_from_row(r: &PgRow) -> Result<User> {
    Ok(User {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        display_name: r.try_get("display_name")?,
        role: parse_col("role", r.try_get::<&str, _>("role")?)?,
        password_hash: r.try_get("password_hash")?,
        active: r.try_get("active")?,
    })
}

fn alert_from_row(r: &PgRow) -> Result<(Alert, i64)> {
    let alert = Alert {
        id: r.try_get("id")?,
        subject_id: r.try_get("subject_id")?,
        device_id: r.try_get("device_id")?,
        kind: parse_col("alert kind", r.try_get::<&str, _>("kind")?)?,
        severity: severity_from_db(r.try_get::<i16, _>("severity")?.into())?,
        state: parse_col("alert state", r.try_get::<&str, _>("state")?)?,
        zone_id: r.try_get("zone_id")?,
        message: r.try_get("message")?,
        started_at: r.try_get("started_at")?,
        created_at: r.try_get("created_at")?,
        last_seen_at: r.try_get("last_seen_at")?,
        ended_at: r.try_get("ended_at")?,
        escalated: r.try_get("escalated")?,
        acknowledged_by: r.try_get("acknowledged_by")?,
        acknowledged_at: r.try_get("acknowledged_at")?,
        resolved_by: r.try_get("resolved_by")?,
        resolved_at: r.try_get("resolved_at")?,
        resolution_code: r.try_get("resolution_code")?,
        resolution_note: r.try_get("resolution_note")?,
        evidence: r.try_get("evidence")?,
        occurrences: r.try_get("occurrences")?,
    };
    Ok((alert, r.try_get("version")?))
}

fn outbox_from_row(r: &PgRow) -> Result<OutboxMessage> {
    Ok(OutboxMessage {
        id: r.try_get("id")?,
        channel: r.try_get("channel")?,
        ordering_key: r.try_get("ordering_key")?,
        idempotency_key: r.try_get("idempotency_key")?,
        payload: r.try_get("payload")?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
    })
}

fn audit_from_row(r: &PgRow) -> Result<AuditEntry> {
    Ok(AuditEntry {
        id: r.try_get("id")?,
        at: r.try_get("at")?,
        actor_id: r.try_get("actor_id")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        target_type: r.try_get("target_type")?,
        target_id: r.try_get("target_id")?,
        subject_id: r.try_get("subject_id")?,
        details: r.try_get("details")?,
    })
}

fn record_from_row(r: &PgRow) -> Result<Record> {
    let mut record = record_from_parts(
        r.try_get("device_id")?,
        r.try_get::<&str, _>("protocol")?,
        r.try_get("device_time")?,
        r.try_get("received_time")?,
        r.try_get("seq")?,
        r.try_get("lat")?,
        r.try_get("lon")?,
        r.try_get("accuracy_m")?,
        r.try_get("speed_kmh")?,
        r.try_get("valid")?,
        r.try_get::<Option<i16>, _>("battery_pct")?.map(i64::from),
        r.try_get("charging")?,
        r.try_get("beacon_in_range")?,
        r.try_get("extra")?,
    )?;
    // Rows of the fast write path hold these in columns (NULL in rows of the earlier path,
    // which kept them in `extra`).
    if let Some(g) = r.try_get::<Option<i16>, _>("gsm_signal")? {
        record.gsm_signal = small_u8("GSM signal", Some(i64::from(g)))?;
    }
    if let Some(p) = record.position.as_mut() {
        apply_position_columns(r, p)?;
    }
    Ok(record)
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

fn zone_kind_str(k: ZoneKind) -> &'static str {
    match k {
        ZoneKind::Inclusion => "inclusion",
        ZoneKind::Exclusion => "exclusion",
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> &'static str {
        match self.layout {
            PositionsLayout::Timescale => "timescaledb",
            PositionsLayout::NativePartitions => "postgres",
        }
    }

    async fn upsert_device(&self, device: &Device) -> Result<()> {
        if device.device_id.is_empty() {
            return Err(StoreError::Invalid("device id must not be empty".into()));
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO devices (device_id, protocol, secret, active, class) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (device_id) DO UPDATE SET protocol = EXCLUDED.protocol,
               secret = EXCLUDED.secret, active = EXCLUDED.active, class = EXCLUDED.class",
        )
        .bind(&device.device_id)
        .bind(device.protocol.as_str())
        .bind(device.secret.as_deref().map(device_secret::stored_form))
        .bind(device.active)
        .bind(device.class.as_str())
        .execute(&mut *tx)
        .await?;
        Self::append_change(
            &mut tx,
            &Change::Device {
                device_id: device.device_id.clone(),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<Device>> {
        sqlx::query("SELECT * FROM devices WHERE device_id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| device_from_row(&r))
            .transpose()
    }

    async fn list_devices(&self) -> Result<Vec<Device>> {
        sqlx::query("SELECT * FROM devices ORDER BY device_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(device_from_row)
            .collect()
    }

    async fn assign_device(
        &self,
        device_id: &str,
        subject_id: SubjectId,
        from: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        // Serialise assignment changes of one device.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('em_assign:' || $1))")
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        let current = sqlx::query(
            "SELECT * FROM assignments WHERE device_id = $1 AND valid_to IS NULL FOR UPDATE",
        )
        .bind(device_id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| assignment_from_row(&r))
        .transpose()?;
        if let Some(cur) = current {
            if from < cur.from {
                return Err(StoreError::Invalid(format!(
                    "device {device_id}: new assignment at {from} precedes the current one (from {})",
                    cur.from
                )));
            }
            sqlx::query(
                "UPDATE assignments SET valid_to = $1 WHERE device_id = $2 AND valid_to IS NULL",
            )
            .bind(from)
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO assignments (device_id, subject_id, valid_from) VALUES ($1, $2, $3)",
        )
        .bind(device_id)
        .bind(subject_id)
        .bind(from)
        .execute(&mut *tx)
        .await?;
        Self::append_change(
            &mut tx,
            &Change::Device {
                device_id: device_id.to_string(),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn unassign_device(&self, device_id: &str, at: DateTime<Utc>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let current = sqlx::query(
            "SELECT * FROM assignments WHERE device_id = $1 AND valid_to IS NULL FOR UPDATE",
        )
        .bind(device_id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| assignment_from_row(&r))
        .transpose()?
        .ok_or_else(|| {
            StoreError::NotFound(format!("no current assignment of device {device_id}"))
        })?;
        if at < current.from {
            return Err(StoreError::Invalid(format!(
                "device {device_id}: unassignment at {at} precedes the assignment start {}",
                current.from
            )));
        }
        sqlx::query(
            "UPDATE assignments SET valid_to = $1 WHERE device_id = $2 AND valid_to IS NULL",
        )
        .bind(at)
        .bind(device_id)
        .execute(&mut *tx)
        .await?;
        Self::append_change(
            &mut tx,
            &Change::Device {
                device_id: device_id.to_string(),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn assignments(&self, device_id: &str) -> Result<Vec<Assignment>> {
        sqlx::query("SELECT * FROM assignments WHERE device_id = $1 ORDER BY valid_from, id")
            .bind(device_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(assignment_from_row)
            .collect()
    }

    async fn subject_for_device_at(
        &self,
        device_id: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<SubjectId>> {
        Ok(sqlx::query_scalar(
            "SELECT subject_id FROM assignments WHERE device_id = $1 AND valid_from <= $2
               AND (valid_to IS NULL OR valid_to > $2) ORDER BY valid_from DESC, id DESC LIMIT 1",
        )
        .bind(device_id)
        .bind(at)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn current_assignments(&self) -> Result<Vec<Assignment>> {
        sqlx::query("SELECT * FROM assignments WHERE valid_to IS NULL ORDER BY device_id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(assignment_from_row)
            .collect()
    }

    async fn upsert_subject(&self, s: &Subject) -> Result<SubjectId> {
        let rules = to_json("breach rules", &s.rules)?;
        let mut tx = self.pool.begin().await?;
        let id: SubjectId = if s.id == 0 {
            sqlx::query_scalar(
                "INSERT INTO subjects (reference, display_name, officer_id, timezone, order_start, order_end, rules)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(&s.reference)
            .bind(&s.display_name)
            .bind(s.officer_id)
            .bind(&s.timezone)
            .bind(s.order_start)
            .bind(s.order_end)
            .bind(rules)
            .fetch_one(&mut *tx)
            .await?
        } else {
            sqlx::query_scalar(
                "UPDATE subjects SET reference = $1, display_name = $2, officer_id = $3, timezone = $4,
                   order_start = $5, order_end = $6, rules = $7 WHERE id = $8 RETURNING id",
            )
            .bind(&s.reference)
            .bind(&s.display_name)
            .bind(s.officer_id)
            .bind(&s.timezone)
            .bind(s.order_start)
            .bind(s.order_end)
            .bind(rules)
            .bind(s.id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("subject {}", s.id)))?
        };
        let subject = Subject { id, ..s.clone() };
        Self::append_change(&mut tx, &Change::Subject { subject }).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn get_subject(&self, id: SubjectId) -> Result<Option<Subject>> {
        sqlx::query("SELECT * FROM subjects WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| subject_from_row(&r))
            .transpose()
    }

    async fn list_subjects(&self, officer: Option<UserId>) -> Result<Vec<Subject>> {
        sqlx::query(
            "SELECT * FROM subjects WHERE ($1::int8 IS NULL OR officer_id = $1) ORDER BY id",
        )
        .bind(officer)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(subject_from_row)
        .collect()
    }

    async fn set_subject_zone_groups(&self, subject: SubjectId, groups: &[String]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM subject_zone_groups WHERE subject_id = $1")
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO subject_zone_groups (subject_id, group_name)
             SELECT $1, g FROM UNNEST($2::text[]) AS g ON CONFLICT DO NOTHING",
        )
        .bind(subject)
        .bind(groups)
        .execute(&mut *tx)
        .await?;
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT group_name FROM subject_zone_groups WHERE subject_id = $1 ORDER BY group_name",
        )
        .bind(subject)
        .fetch_all(&mut *tx)
        .await?;
        Self::append_change(
            &mut tx,
            &Change::SubjectZoneGroups {
                subject_id: subject,
                groups,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn subject_zone_groups(&self, subject: SubjectId) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT group_name FROM subject_zone_groups WHERE subject_id = $1 ORDER BY group_name",
        )
        .bind(subject)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn upsert_zone(&self, z: &ZoneSpec) -> Result<ZoneId> {
        validate_zone(z)?;
        let geometry = to_json("zone geometry", &z.geometry)?;
        let schedule = z
            .schedule
            .as_ref()
            .map(|s| to_json("zone schedule", s))
            .transpose()?;
        let mut tx = self.pool.begin().await?;
        let id: ZoneId = if z.id == 0 {
            sqlx::query_scalar(
                "INSERT INTO zones (subject_id, group_name, name, kind, geometry, schedule, is_curfew_home)
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(z.subject_id)
            .bind(&z.group)
            .bind(&z.name)
            .bind(zone_kind_str(z.kind))
            .bind(geometry)
            .bind(schedule)
            .bind(z.is_curfew_home)
            .fetch_one(&mut *tx)
            .await?
        } else {
            sqlx::query_scalar(
                "UPDATE zones SET subject_id = $1, group_name = $2, name = $3, kind = $4, geometry = $5,
                   schedule = $6, is_curfew_home = $7 WHERE id = $8 RETURNING id",
            )
            .bind(z.subject_id)
            .bind(&z.group)
            .bind(&z.name)
            .bind(zone_kind_str(z.kind))
            .bind(geometry)
            .bind(schedule)
            .bind(z.is_curfew_home)
            .bind(z.id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("zone {}", z.id)))?
        };
        let zone = ZoneSpec { id, ..z.clone() };
        Self::append_change(&mut tx, &Change::Zone { zone }).await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn delete_zone(&self, id: ZoneId) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let subject_id: Option<Option<SubjectId>> =
            sqlx::query_scalar("DELETE FROM zones WHERE id = $1 RETURNING subject_id")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(subject_id) = subject_id else {
            return Err(StoreError::NotFound(format!("zone {id}")));
        };
        Self::append_change(
            &mut tx,
            &Change::ZoneDeleted {
                zone_id: id,
                subject_id,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_zone(&self, id: ZoneId) -> Result<Option<ZoneSpec>> {
        sqlx::query("SELECT * FROM zones WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| zone_from_row(&r))
            .transpose()
    }

    async fn list_zones(&self, subject: Option<SubjectId>) -> Result<Vec<ZoneSpec>> {
        sqlx::query(
            "SELECT * FROM zones WHERE $1::int8 IS NULL OR subject_id = $1
               OR (subject_id IS NULL AND group_name IN
                   (SELECT group_name FROM subject_zone_groups WHERE subject_id = $1))
             ORDER BY id",
        )
        .bind(subject)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(zone_from_row)
        .collect()
    }

    async fn insert_records(&self, records: &[StoredRecord]) -> Result<()> {
        fixes::insert_records(self, records).await
    }

    async fn trail(
        &self,
        subject: SubjectId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<TrailPoint>> {
        let limit = check_limit(limit)?;
        let rows = sqlx::query(
            "SELECT * FROM positions WHERE subject_id = $1 AND device_time >= $2 AND device_time <= $3
               AND lat IS NOT NULL AND lon IS NOT NULL ORDER BY device_time, seq, device_id LIMIT $4",
        )
        .bind(subject)
        .bind(from)
        .bind(to)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let rec = record_from_row(r)?;
                let position = rec
                    .position
                    .ok_or_else(|| StoreError::Invalid("trail row without position".into()))?;
                Ok(TrailPoint {
                    device_id: rec.device_id,
                    device_time: rec.device_time,
                    received_time: rec.received_time,
                    position,
                    battery_pct: rec.battery_pct,
                })
            })
            .collect()
    }

    async fn latest_states(&self, subjects: Option<&[SubjectId]>) -> Result<Vec<LatestState>> {
        let rows = sqlx::query(
            "SELECT * FROM latest_state WHERE $1::int8[] IS NULL OR subject_id = ANY($1)
             ORDER BY subject_id",
        )
        .bind(subjects)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let lat: Option<f64> = r.try_get("lat")?;
                let lon: Option<f64> = r.try_get("lon")?;
                let position = match (lat, lon) {
                    (Some(lat), Some(lon)) => {
                        let extra: RecordExtra =
                            match r.try_get::<Option<serde_json::Value>, _>("position_extra")? {
                                Some(v) => from_json("position extras", v)?,
                                None => RecordExtra::default(),
                            };
                        let mut p = Position {
                            lat,
                            lon,
                            accuracy_m: r.try_get("accuracy_m")?,
                            speed_kmh: r.try_get("speed_kmh")?,
                            course_deg: extra.course_deg,
                            altitude_m: extra.altitude_m,
                            satellites: extra.satellites,
                            valid: r.try_get::<Option<bool>, _>("valid")?.unwrap_or(false),
                            source: extra.source.unwrap_or_default(),
                        };
                        apply_position_columns(r, &mut p)?;
                        Some(p)
                    }
                    _ => None,
                };
                Ok(LatestState {
                    subject_id: r.try_get("subject_id")?,
                    device_id: r.try_get("device_id")?,
                    last_contact: r.try_get("last_contact")?,
                    position,
                    position_time: r.try_get("position_time")?,
                    battery_pct: small_u8(
                        "battery",
                        r.try_get::<Option<i16>, _>("battery_pct")?.map(i64::from),
                    )?,
                    charging: r.try_get("charging")?,
                    beacon_in_range: r.try_get("beacon_in_range")?,
                    strap_ok: r.try_get("strap_ok")?,
                    case_ok: r.try_get("case_ok")?,
                })
            })
            .collect()
    }

    async fn count_records(&self, device_id: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM positions WHERE device_id = $1")
                .bind(device_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn device_records(&self, device_id: &str, limit: i64) -> Result<Vec<Record>> {
        let limit = check_limit(limit)?;
        sqlx::query(
            "SELECT * FROM positions WHERE device_id = $1 ORDER BY device_time, seq LIMIT $2",
        )
        .bind(device_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(record_from_row)
        .collect()
    }

    async fn insert_victim_records(&self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let rows = records
            .iter()
            .map(|r| {
                RecordRow::from_stored(&StoredRecord {
                    subject_id: None,
                    record: r.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(1000) {
            let mut qb: QueryBuilder<Postgres> = QueryBuilder::new(
                "INSERT INTO victim_positions (device_id, device_time, seq, received_time, protocol,
                   lat, lon, accuracy_m, speed_kmh, valid, battery_pct, charging, beacon_in_range, extra) ",
            );
            qb.push_values(chunk, |mut b, r| {
                b.push_bind(&r.device_id)
                    .push_bind(r.device_time)
                    .push_bind(r.seq)
                    .push_bind(r.received_time)
                    .push_bind(r.protocol)
                    .push_bind(r.lat)
                    .push_bind(r.lon)
                    .push_bind(r.accuracy_m)
                    .push_bind(r.speed_kmh)
                    .push_bind(r.valid)
                    .push_bind(r.battery_pct)
                    .push_bind(r.charging)
                    .push_bind(r.beacon_in_range)
                    .push_bind(&r.extra)
                    .push_unseparated("::jsonb");
            });
            qb.push(" ON CONFLICT (device_id, device_time, seq) DO NOTHING");
            qb.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn victim_positions(
        &self,
        device_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<TrailPoint>> {
        let limit = check_limit(limit)?;
        let rows = sqlx::query(
            "SELECT * FROM victim_positions WHERE device_id = $1 AND device_time >= $2
               AND device_time <= $3 AND lat IS NOT NULL AND lon IS NOT NULL
             ORDER BY device_time, seq LIMIT $4",
        )
        .bind(device_id)
        .bind(from)
        .bind(to)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                trail_point(record_from_parts(
                    r.try_get("device_id")?,
                    r.try_get::<&str, _>("protocol")?,
                    r.try_get("device_time")?,
                    r.try_get("received_time")?,
                    r.try_get("seq")?,
                    r.try_get("lat")?,
                    r.try_get("lon")?,
                    r.try_get("accuracy_m")?,
                    r.try_get("speed_kmh")?,
                    r.try_get("valid")?,
                    r.try_get::<Option<i16>, _>("battery_pct")?.map(i64::from),
                    r.try_get("charging")?,
                    r.try_get("beacon_in_range")?,
                    r.try_get("extra")?,
                )?)
            })
            .collect()
    }

    async fn count_victim_records(&self, device_id: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM victim_positions WHERE device_id = $1")
                .bind(device_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn write_alert(
        &self,
        w: &AlertWrite,
        effects: AlertEffectsFn<'_>,
    ) -> Result<VersionedAlert> {
        let a = &w.alert;
        let mut tx = self.pool.begin().await?;
        let row = match w.expected_version {
            None => sqlx::query(
                "INSERT INTO alerts (subject_id, device_id, kind, severity, state, zone_id, zone_key,
                     message, started_at, last_seen_at, created_at, ended_at, escalated,
                     acknowledged_by, acknowledged_at, resolved_by, resolved_at, resolution_code,
                     resolution_note, evidence, occurrences, version)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17,
                     $18, $19, $20, $21, 1)
                 RETURNING *",
            )
            .bind(a.subject_id)
            .bind(&a.device_id)
            .bind(a.kind.as_str())
            .bind(severity_to_db(a.severity))
            .bind(a.state.as_str())
            .bind(a.zone_id)
            .bind(a.zone_id.unwrap_or(0))
            .bind(&a.message)
            .bind(a.started_at)
            .bind(a.last_seen_at)
            .bind(a.created_at)
            .bind(a.ended_at)
            .bind(a.escalated)
            .bind(a.acknowledged_by)
            .bind(a.acknowledged_at)
            .bind(a.resolved_by)
            .bind(a.resolved_at)
            .bind(&a.resolution_code)
            .bind(&a.resolution_note)
            .bind(&a.evidence)
            .bind(a.occurrences)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| {
                map_unique(e, || {
                    format!(
                        "subject {} already has an ongoing {} alert for this zone",
                        a.subject_id,
                        a.kind.as_str()
                    )
                })
            })?,
            Some(expected) => {
                let row = sqlx::query(
                    "UPDATE alerts SET device_id = $1, severity = $2, state = $3, message = $4,
                         last_seen_at = $5, ended_at = $6, escalated = $7, acknowledged_by = $8,
                         acknowledged_at = $9, resolved_by = $10, resolved_at = $11,
                         resolution_code = $12, resolution_note = $13, evidence = $14,
                         occurrences = $15, version = version + 1
                     WHERE id = $16 AND version = $17 RETURNING *",
                )
                .bind(&a.device_id)
                .bind(severity_to_db(a.severity))
                .bind(a.state.as_str())
                .bind(&a.message)
                .bind(a.last_seen_at)
                .bind(a.ended_at)
                .bind(a.escalated)
                .bind(a.acknowledged_by)
                .bind(a.acknowledged_at)
                .bind(a.resolved_by)
                .bind(a.resolved_at)
                .bind(&a.resolution_code)
                .bind(&a.resolution_note)
                .bind(&a.evidence)
                .bind(a.occurrences)
                .bind(a.id)
                .bind(expected)
                .fetch_optional(&mut *tx)
                .await?;
                match row {
                    Some(r) => r,
                    None => {
                        let exists: bool =
                            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM alerts WHERE id = $1)")
                                .bind(a.id)
                                .fetch_one(&mut *tx)
                                .await?;
                        return Err(if exists {
                            StoreError::Conflict(format!(
                                "alert {} changed meanwhile (expected version {expected})",
                                a.id
                            ))
                        } else {
                            StoreError::NotFound(format!("alert {}", a.id))
                        });
                    }
                }
            }
        };
        let (alert, version) = alert_from_row(&row)?;
        let stored = VersionedAlert { alert, version };
        let fx = effects(&stored)?;
        Self::insert_audit(&mut tx, &fx.audit).await?;
        Self::append_change(&mut tx, &fx.change).await?;
        Self::insert_outbox(&mut tx, &fx.outbox).await?;
        tx.commit().await?;
        Ok(stored)
    }

    async fn get_alert(&self, id: AlertId) -> Result<Option<VersionedAlert>> {
        let mut conn = self.pool.acquire().await?;
        Ok(Self::alert_row(&mut conn, id, false)
            .await?
            .map(|(alert, version)| VersionedAlert { alert, version }))
    }

    async fn list_alerts(&self, f: &AlertFilter) -> Result<Vec<Alert>> {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT * FROM alerts WHERE true");
        if let Some(ids) = &f.subject_ids {
            qb.push(" AND subject_id = ANY(")
                .push_bind(ids.clone())
                .push(")");
        }
        if let Some(states) = &f.states {
            let states: Vec<&'static str> = states.iter().map(|s| s.as_str()).collect();
            qb.push(" AND state = ANY(").push_bind(states).push(")");
        }
        if let Some(since) = f.since {
            qb.push(" AND started_at >= ").push_bind(since);
        }
        qb.push(" ORDER BY started_at DESC, severity DESC, id DESC");
        if let Some(limit) = f.limit {
            qb.push(" LIMIT ").push_bind(check_limit(limit)?);
        }
        qb.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| alert_from_row(r).map(|(a, _)| a))
            .collect()
    }

    async fn ongoing_alert(
        &self,
        subject: SubjectId,
        kind: AlertKind,
        zone: Option<ZoneId>,
    ) -> Result<Option<VersionedAlert>> {
        sqlx::query(
            "SELECT * FROM alerts WHERE subject_id = $1 AND kind = $2 AND zone_key = $3
               AND state <> 'resolved'",
        )
        .bind(subject)
        .bind(kind.as_str())
        .bind(zone.unwrap_or(0))
        .fetch_optional(&self.pool)
        .await?
        .map(|r| alert_from_row(&r).map(|(alert, version)| VersionedAlert { alert, version }))
        .transpose()
    }

    async fn unacknowledged_alerts(&self, before: DateTime<Utc>) -> Result<Vec<Alert>> {
        sqlx::query(
            "SELECT * FROM alerts WHERE state = 'open' AND NOT escalated AND created_at < $1
             ORDER BY created_at, id",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| alert_from_row(r).map(|(a, _)| a))
        .collect()
    }

    async fn due_outbox(
        &self,
        channel: &str,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>> {
        let limit = check_limit(limit)?;
        sqlx::query(
            "SELECT o.* FROM outbox o
             WHERE o.channel = $1 AND o.status = 'pending' AND o.next_attempt_at <= $2
               AND o.id = (SELECT min(p.id) FROM outbox p WHERE p.channel = o.channel
                             AND p.ordering_key = o.ordering_key AND p.status = 'pending')
             ORDER BY o.id LIMIT $3",
        )
        .bind(channel)
        .bind(now)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(outbox_from_row)
        .collect()
    }

    async fn mark_outbox_delivered(&self, id: i64, at: DateTime<Utc>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        match Self::outbox_status_locked(&mut tx, id).await?.as_deref() {
            None => return Err(StoreError::NotFound(format!("outbox message {id}"))),
            Some("pending") => {}
            Some("delivered") => return Ok(()),
            Some(other) => {
                return Err(StoreError::Conflict(format!(
                    "outbox message {id} is {other}"
                )))
            }
        }
        sqlx::query("UPDATE outbox SET status = 'delivered', delivered_at = $1 WHERE id = $2")
            .bind(at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn mark_outbox_failed(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: DateTime<Utc>,
        dead: bool,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        match Self::outbox_status_locked(&mut tx, id).await?.as_deref() {
            None => return Err(StoreError::NotFound(format!("outbox message {id}"))),
            Some("pending") => {}
            Some(other) => {
                return Err(StoreError::Conflict(format!(
                    "outbox message {id} is {other}, not pending"
                )))
            }
        }
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $1, next_attempt_at = $2,
                 status = $3 WHERE id = $4",
        )
        .bind(error)
        .bind(next_attempt_at)
        .bind(if dead { "dead_letter" } else { "pending" })
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_status(&self, id: i64) -> Result<Option<OutboxStatus>> {
        let s: Option<String> = sqlx::query_scalar("SELECT status FROM outbox WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        s.map(|s| outbox_status_from_str(&s)).transpose()
    }

    async fn count_outbox(&self, channel: &str, status: OutboxStatus) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE channel = $1 AND status = $2")
                .bind(channel)
                .bind(outbox_status_str(status))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn changes_after(&self, after: ChangeId, limit: i64) -> Result<Vec<ChangeEntry>> {
        let limit = check_limit(limit)?;
        sqlx::query("SELECT id, at, payload FROM changes WHERE id > $1 ORDER BY id LIMIT $2")
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(ChangeEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    change: from_json("change", r.try_get("payload")?)?,
                })
            })
            .collect()
    }

    async fn last_change_id(&self) -> Result<ChangeId> {
        Ok(
            sqlx::query_scalar::<_, Option<i64>>("SELECT max(id) FROM changes")
                .fetch_one(&self.pool)
                .await?
                .unwrap_or(0),
        )
    }

    fn change_wakeups(&self) -> tokio::sync::watch::Receiver<u64> {
        self.wakeups.clone()
    }

    fn change_poll_interval(&self) -> Duration {
        // NOTIFY wakes readers at once; the poll only covers notifications lost while the
        // listening connection was being re-established.
        Duration::from_secs(1)
    }

    async fn read_cursor(&self, consumer: &str) -> Result<Option<ChangeId>> {
        Ok(
            sqlx::query_scalar("SELECT change_id FROM change_cursors WHERE consumer = $1")
                .bind(consumer)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn write_cursor(&self, consumer: &str, id: ChangeId) -> Result<()> {
        sqlx::query(
            "INSERT INTO change_cursors (consumer, change_id, updated_at) VALUES ($1, $2, now())
             ON CONFLICT (consumer) DO UPDATE SET change_id = EXCLUDED.change_id, updated_at = now()",
        )
        .bind(consumer)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn acquire_lease(&self, name: &str, holder: &str) -> Result<Option<Lease>> {
        use sqlx::Connection;
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

    async fn upsert_user(&self, u: &User) -> Result<UserId> {
        if u.username.trim().is_empty() {
            return Err(StoreError::Invalid("username must not be empty".into()));
        }
        let res = if u.id == 0 {
            sqlx::query_scalar(
                "INSERT INTO users (username, display_name, role, password_hash, active)
                 VALUES ($1, $2, $3, $4, $5) RETURNING id",
            )
            .bind(&u.username)
            .bind(&u.display_name)
            .bind(u.role.as_str())
            .bind(&u.password_hash)
            .bind(u.active)
            .fetch_one(&self.pool)
            .await
        } else {
            sqlx::query_scalar(
                "UPDATE users SET username = $1, display_name = $2, role = $3, password_hash = $4,
                   active = $5 WHERE id = $6 RETURNING id",
            )
            .bind(&u.username)
            .bind(&u.display_name)
            .bind(u.role.as_str())
            .bind(&u.password_hash)
            .bind(u.active)
            .bind(u.id)
            .fetch_optional(&self.pool)
            .await
            .and_then(|o| o.ok_or(sqlx::Error::RowNotFound))
        };
        match res {
            Ok(id) => Ok(id),
            Err(sqlx::Error::RowNotFound) => Err(StoreError::NotFound(format!("user {}", u.id))),
            Err(e) => Err(map_unique(e, || {
                format!("username {:?} is already taken", u.username)
            })),
        }
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>> {
        sqlx::query("SELECT * FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| user_from_row(&r))
            .transpose()
    }

    async fn get_user_by_name(&self, username: &str) -> Result<Option<User>> {
        sqlx::query("SELECT * FROM users WHERE username = $1")
            .bind(username)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| user_from_row(&r))
            .transpose()
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        sqlx::query("SELECT * FROM users ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(user_from_row)
            .collect()
    }

    async fn append_audit(&self, entry: &NewAudit) -> Result<i64> {
        let mut conn = self.pool.acquire().await?;
        Self::insert_audit(&mut conn, entry).await
    }

    async fn list_audit(&self, f: &AuditFilter) -> Result<Vec<AuditEntry>> {
        let mut qb: QueryBuilder<Postgres> = QueryBuilder::new("SELECT * FROM audit WHERE true");
        if let Some(a) = f.actor_id {
            qb.push(" AND actor_id = ").push_bind(a);
        }
        if let Some(s) = f.subject_id {
            qb.push(" AND subject_id = ").push_bind(s);
        }
        if let Some(t) = &f.target_type {
            qb.push(" AND target_type = ").push_bind(t.clone());
        }
        if let Some(t) = f.since {
            qb.push(" AND at >= ").push_bind(t);
        }
        if let Some(t) = f.until {
            qb.push(" AND at < ").push_bind(t);
        }
        qb.push(" ORDER BY at DESC, id DESC");
        if let Some(limit) = f.limit {
            qb.push(" LIMIT ").push_bind(check_limit(limit)?);
        }
        qb.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(audit_from_row)
            .collect()
    }

    async fn apply_retention(
        &self,
        positions_before: DateTime<Utc>,
        alerts_before: Option<DateTime<Utc>>,
        audit_before: Option<DateTime<Utc>>,
    ) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
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
                    report.positions_deleted += u64::try_from(n).unwrap_or(0);
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
                report.positions_deleted = u64::try_from(n).unwrap_or(0);
            }
        }
        let mut tx = self.pool.begin().await?;
        report.positions_deleted +=
            sqlx::query("DELETE FROM victim_positions WHERE device_time < $1")
                .bind(positions_before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if self.layout == PositionsLayout::NativePartitions {
            report.positions_deleted += sqlx::query("DELETE FROM positions WHERE device_time < $1")
                .bind(positions_before)
                .execute(&mut *tx)
                .await?
                .rows_affected();
        }
        if let Some(t) = alerts_before {
            report.alerts_deleted =
                sqlx::query("DELETE FROM alerts WHERE state = 'resolved' AND resolved_at < $1")
                    .bind(t)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
        }
        if let Some(t) = audit_before {
            sqlx::query("INSERT INTO audit_retention_gate (open) VALUES (true)")
                .execute(&mut *tx)
                .await?;
            report.audit_deleted = sqlx::query("DELETE FROM audit WHERE at < $1")
                .bind(t)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM audit_retention_gate")
                .execute(&mut *tx)
                .await?;
        }
        report.changes_deleted = sqlx::query("DELETE FROM changes WHERE at < $1")
            .bind(Utc::now() - chrono::Duration::days(CHANGE_LOG_DAYS))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(report)
    }
}

/// A lease held as a session advisory lock on a connection of its own.
struct PgLease {
    conn: Option<PgConnection>,
    name: String,
}

#[async_trait]
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
