//! Helpers for tests of every crate: a fresh, migrated store per call.
//!
//! * [`sqlite_store`] — a private in-memory SQLite database.
//! * [`postgres_store`] — a fresh, uniquely named schema in the PostgreSQL database at
//!   `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`), so tests running in
//!   parallel never see each other's rows. When the server is unreachable it returns `None`
//!   after printing `SKIPPED: …` to stderr — or panics when `CI=true`.
//! * [`postgres_store_with_schema`] / [`postgres_store_in_schema`] — to reconnect to the same
//!   data (crash/restart tests).
//! * [`postgres_store_with_layout`] — the same with the positions layout chosen: tests of the
//!   PostgreSQL backend run on native partitions ([`LayoutRequest::Native`]) and on a
//!   TimescaleDB hypertable ([`LayoutRequest::Timescale`]). Without a usable TimescaleDB
//!   (extension installed and preloaded) a hypertable test prints `SKIPPED: …` and gets
//!   `None` — or panics when `CI=true`. [`LayoutRequest::Auto`] (what production does, and what
//!   [`postgres_store`] uses) is a hypertable exactly when TimescaleDB is usable.
//!
//! Test schemas are named `em_test_<pid>_<n>_<nanos>`; [`drop_test_schemas`] removes them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPoolOptions;

use crate::postgres::{timescale_status, TimescaleStatus, TIMESCALE_PRELOAD_HINT};
use crate::{redact_url, LayoutRequest, PgStore, SqliteStore, Store};

/// Default PostgreSQL URL of the test machine.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// `DATABASE_URL`, or [`DEFAULT_DATABASE_URL`].
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_string())
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// A fresh in-memory SQLite store with the schema applied.
///
/// Panics (test helper) when SQLite cannot be opened or migrated — that is a build defect.
pub async fn sqlite_store() -> Arc<dyn Store> {
    match SqliteStore::connect("sqlite::memory:").await {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("cannot open an in-memory SQLite store: {e}"),
    }
}

/// A store on the SQLite file at `path` (created when missing), e.g. for restart tests.
pub async fn sqlite_file_store(path: &std::path::Path) -> Arc<dyn Store> {
    let url = format!("sqlite://{}?mode=rwc", path.display());
    match SqliteStore::connect(&url).await {
        Ok(s) => Arc::new(s),
        Err(e) => panic!("cannot open SQLite store {url}: {e}"),
    }
}

/// A unique schema name for one test.
pub fn unique_schema_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "em_test_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos
    )
}

/// Checks that the server answers; handles the skip/CI policy. Returns false to skip.
async fn reachable(url: &str) -> bool {
    let probe = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await;
    match probe {
        Ok(pool) => {
            pool.close().await;
            true
        }
        Err(e) => {
            let msg = format!(
                "PostgreSQL not reachable at {} ({e}); set DATABASE_URL",
                redact_url(url)
            );
            if in_ci() {
                panic!("CI=true and {msg}");
            }
            eprintln!("\n*** SKIPPED: {msg} ***\n");
            false
        }
    }
}

/// A fresh PostgreSQL store in its own new schema, or `None` (after a loud `SKIPPED:` line on
/// stderr) when the server is unreachable and `CI` is not `true`.
pub async fn postgres_store() -> Option<Arc<dyn Store>> {
    postgres_store_with_schema().await.map(|(s, _)| s)
}

/// Like [`postgres_store`], also returning the schema name for a later
/// [`postgres_store_in_schema`].
pub async fn postgres_store_with_schema() -> Option<(Arc<dyn Store>, String)> {
    postgres_store_with_layout(LayoutRequest::Auto).await
}

/// A fresh PostgreSQL store in its own new schema with the positions `layout` asked for, and
/// the schema name. `None` (after a loud `SKIPPED:` line) when the server is unreachable, or
/// when a hypertable is asked for and TimescaleDB is not usable; both panic under `CI=true`.
pub async fn postgres_store_with_layout(layout: LayoutRequest) -> Option<(Arc<dyn Store>, String)> {
    postgres_pg_store_with_layout(layout)
        .await
        .map(|(s, schema)| (Arc::new(s) as Arc<dyn Store>, schema))
}

/// The concrete [`PgStore`] of [`postgres_store_with_layout`].
pub async fn postgres_pg_store_with_layout(layout: LayoutRequest) -> Option<(PgStore, String)> {
    let url = database_url();
    if !reachable(&url).await {
        return None;
    }
    if layout == LayoutRequest::Timescale && !timescale_usable(&url).await {
        return None;
    }
    let schema = unique_schema_name();
    match PgStore::connect_in_schema_with(&url, &schema, layout).await {
        Ok(s) => Some((s, schema)),
        Err(e) => panic!("PostgreSQL store ({layout:?}) in schema {schema} failed: {e}"),
    }
}

/// Whether the server at `url` can hold hypertables; handles the skip/CI policy. Returns false
/// to skip.
async fn timescale_usable(url: &str) -> bool {
    let status = async {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        let (available, preload): (bool, String) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'),
                    current_setting('shared_preload_libraries')",
        )
        .fetch_one(&pool)
        .await?;
        pool.close().await;
        Ok::<_, sqlx::Error>(timescale_status(available, &preload))
    }
    .await;
    let msg = match status {
        Ok(TimescaleStatus::Usable) => return true,
        Ok(TimescaleStatus::NotInstalled) => format!(
            "PostgreSQL at {} has no timescaledb extension (bash ../shared/timescaledb/install.sh \
             builds it); hypertable test not run",
            redact_url(url)
        ),
        Ok(TimescaleStatus::NotPreloaded) => format!(
            "TimescaleDB is installed at {} but not preloaded ({TIMESCALE_PRELOAD_HINT}); \
             hypertable test not run",
            redact_url(url)
        ),
        Err(e) => format!(
            "cannot read the TimescaleDB status of {} ({e})",
            redact_url(url)
        ),
    };
    if in_ci() {
        panic!("CI=true and {msg}");
    }
    eprintln!("\n*** SKIPPED: {msg} ***\n");
    false
}

/// Reconnects to an existing (or new) schema, e.g. after dropping a store in a restart test.
pub async fn postgres_store_in_schema(schema: &str) -> Option<Arc<dyn Store>> {
    postgres_pg_store_in_schema(schema)
        .await
        .map(|s| Arc::new(s) as Arc<dyn Store>)
}

/// The concrete [`PgStore`] in `schema` (for backend-specific tests and tools).
pub async fn postgres_pg_store_in_schema(schema: &str) -> Option<PgStore> {
    let url = database_url();
    if !reachable(&url).await {
        return None;
    }
    match PgStore::connect_in_schema(&url, schema).await {
        Ok(s) => Some(s),
        Err(e) => panic!("PostgreSQL store in schema {schema} failed: {e}"),
    }
}

/// Drops every `em_test_*` schema left by earlier test runs; returns how many were dropped.
pub async fn drop_test_schemas() -> crate::Result<u64> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&database_url())
        .await?;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'em\\_test\\_%'")
            .fetch_all(&pool)
            .await?;
    for n in &names {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{n}\" CASCADE"
        )))
        .execute(&pool)
        .await?;
    }
    pool.close().await;
    Ok(names.len() as u64)
}
