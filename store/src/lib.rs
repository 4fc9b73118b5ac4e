//! `em-store` owns persistence: the [`Store`] trait that every other crate talks to, and its two
//! backends on `sqlx` — PostgreSQL (TimescaleDB hypertables when the extension exists, native
//! time partitioning otherwise) and SQLite (the embedded default). Migrations, batched fix writes,
//! alert + outbox transactions, the append-only audit log and retention live here. One
//! conformance suite runs against both backends.
//!
//! The backends share one body: `body.rs` holds the [`Store`] logic once (a `macro_rules!`
//! stamped into [`postgres`] and [`sqlite`], since sqlx's query types are per database), the
//! per-dialect parts live in `dialect/postgres.rs` and `dialect/sqlite.rs` (the SQL that differs,
//! and how time, JSON and lists are bound), and row → model conversions are in `rows.rs`.
//! `postgres.rs` and `sqlite.rs` keep only what one backend does alone (positions layout and
//! writes, change-log wake-ups, leases, retention of positions).
//!
//! Entry point: [`connect`] picks the backend from the URL and runs the migrations.
//! [`testing`] gives other crates' tests a fresh, migrated store of either backend.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use em_model::*;
pub use em_model::{Change, ChangeEntry, ChangeId};
use serde::{Deserialize, Serialize};

mod body;
pub mod changes;
mod common;
pub mod device_secret;
mod dialect;
pub mod lease;
pub mod postgres;
mod rows;
pub mod sqlite;
pub mod testing;

pub use changes::{ChangeFeed, ChangeStream};
pub use lease::{run_leased, Lease, LeaseHold};
pub use postgres::{LayoutRequest, PgStore, PositionsLayout};
pub use sqlite::SqliteStore;

/// Opens the store at `url` and brings its schema up to date.
///
/// * `sqlite://path?mode=rwc`, `sqlite:path`, `sqlite::memory:` → [`SqliteStore`]
/// * `postgres://…` / `postgresql://…` → [`PgStore`] (TimescaleDB layout when the extension
///   is available, native time partitioning otherwise)
pub async fn connect(url: &str) -> Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(SqliteStore::connect(url).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(PgStore::connect(url).await?))
    } else {
        Err(StoreError::Invalid(format!(
            "unsupported database URL {:?}: expected sqlite:… or postgres://…",
            redact_url(url)
        )))
    }
}

/// The URL without its password, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let creds = &url[scheme_end + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme_end + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// Days the change log keeps its entries (retention deletes older ones). The log is the bus
/// between instances, not evidence: the audit log and the alerts are the record.
pub const CHANGE_LOG_DAYS: i64 = 7;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("invalid data: {0}")]
    Invalid(String),
}

/// A record as stored: the normalised record plus the subject it was attributed to
/// (resolved through the assignment history at `device_time`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredRecord {
    pub subject_id: Option<SubjectId>,
    pub record: Record,
}

/// One point of a subject's trail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrailPoint {
    pub device_id: DeviceId,
    pub device_time: DateTime<Utc>,
    pub received_time: DateTime<Utc>,
    pub position: Position,
    pub battery_pct: Option<u8>,
}

/// Latest known state of a subject's device, for the map and the subject page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LatestState {
    pub subject_id: SubjectId,
    pub device_id: DeviceId,
    pub last_contact: DateTime<Utc>,
    pub position: Option<Position>,
    pub position_time: Option<DateTime<Utc>>,
    pub battery_pct: Option<u8>,
    pub charging: Option<bool>,
    pub beacon_in_range: Option<bool>,
    pub strap_ok: Option<bool>,
    pub case_ok: Option<bool>,
}

/// An alert as stored, with its version (1 when raised, one more with every change).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionedAlert {
    pub alert: Alert,
    pub version: i64,
}

/// One write of the alert engine: the whole alert row after the change. The store applies it
/// as given and knows no alert rules; the engine (`em-alerts`) decides what the row becomes.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertWrite {
    /// `None`: a new alert (the store assigns the id; version 1). `Some(v)`: replace alert
    /// `alert.id` only while its stored version is still `v` — otherwise
    /// [`StoreError::Conflict`] (someone else changed it: read again and decide again).
    /// A new alert that meets an ongoing one of the same subject, kind and zone is also a
    /// `Conflict`: at most one alert per condition is ongoing, across every instance.
    pub expected_version: Option<i64>,
    pub alert: Alert,
}

/// What the alert engine writes in the same transaction as an [`AlertWrite`], built from the
/// alert as stored (its id and new version known).
#[derive(Debug, Clone, PartialEq)]
pub struct AlertEffects {
    pub audit: NewAudit,
    /// The change-log entry (always a [`Change::Alert`]).
    pub change: Change,
    pub outbox: Vec<NewOutbox>,
}

/// Builds the [`AlertEffects`] of a write from the stored alert and its new version.
pub type AlertEffectsFn<'a> = &'a (dyn Fn(&VersionedAlert) -> Result<AlertEffects> + Send + Sync);

/// A message for the transactional outbox (channel, ordering and payload are the writer's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewOutbox {
    pub channel: String,
    /// Deliveries with the same ordering key go out in id order.
    pub ordering_key: String,
    /// Unique per channel; a second message with the same key is not written.
    pub idempotency_key: String,
    pub payload: serde_json::Value,
}

/// One message waiting in the transactional outbox (OMS delivery, MQTT publication).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub id: i64,
    /// Delivery channel, e.g. "oms".
    pub channel: String,
    /// Deliveries for one ordering key (the subject) go out in id order.
    pub ordering_key: String,
    /// Stable idempotency key sent to the receiver.
    pub idempotency_key: String,
    pub payload: serde_json::Value,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    Pending,
    Delivered,
    DeadLetter,
}

/// Filter for alert listings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertFilter {
    /// Only these subjects (an officer's caseload); None = all.
    pub subject_ids: Option<Vec<SubjectId>>,
    pub states: Option<Vec<AlertState>>,
    pub since: Option<DateTime<Utc>>,
    pub limit: Option<i64>,
}

/// Filter for the audit view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AuditFilter {
    pub actor_id: Option<UserId>,
    pub subject_id: Option<SubjectId>,
    pub target_type: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Only actions starting with this (`auth.` → every login event; `access.denied`).
    #[serde(default)]
    pub action: Option<String>,
    pub limit: Option<i64>,
    /// Rows to skip (paging; newest first).
    #[serde(default)]
    pub offset: Option<i64>,
    /// Only rows with a smaller id (stable paging while new rows arrive: pass the last id of
    /// the previous page).
    #[serde(default)]
    pub before_id: Option<i64>,
}

/// New audit record (id and time are assigned by the store; `at` defaults to now when None).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewAudit {
    pub at: Option<DateTime<Utc>>,
    pub actor_id: Option<UserId>,
    pub actor: String,
    pub action: String,
    pub target_type: String,
    pub target_id: Option<String>,
    pub subject_id: Option<SubjectId>,
    pub details: serde_json::Value,
}

/// A new dashboard session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewSession {
    /// Hex SHA-256 of the token (the token itself is never stored).
    pub token_hash: String,
    pub user_id: UserId,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
}

/// Counts returned by a retention run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionReport {
    pub positions_deleted: u64,
    pub alerts_deleted: u64,
    pub audit_deleted: u64,
    pub changes_deleted: u64,
}

/// The storage contract. Every method is durable when it returns `Ok` (the ingest pipeline
/// ACKs devices only after `insert_records` returns).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Backend name for logs and metrics ("postgres", "timescaledb", "sqlite").
    fn backend(&self) -> &'static str;

    // --- registry -------------------------------------------------------------------------
    async fn upsert_device(&self, device: &Device) -> Result<()>;
    async fn get_device(&self, device_id: &str) -> Result<Option<Device>>;
    async fn list_devices(&self) -> Result<Vec<Device>>;
    /// Ends the device's current assignment (if any) at `from` and starts a new one.
    async fn assign_device(
        &self,
        device_id: &str,
        subject_id: SubjectId,
        from: DateTime<Utc>,
    ) -> Result<()>;
    async fn unassign_device(&self, device_id: &str, at: DateTime<Utc>) -> Result<()>;
    async fn assignments(&self, device_id: &str) -> Result<Vec<Assignment>>;
    /// Subject wearing `device_id` at instant `at`, per the assignment history.
    async fn subject_for_device_at(
        &self,
        device_id: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<SubjectId>>;
    /// All current assignments (device → subject), loaded by ingest at start-up.
    async fn current_assignments(&self) -> Result<Vec<Assignment>>;

    /// Insert (id = 0) or update a subject; returns its id.
    async fn upsert_subject(&self, subject: &Subject) -> Result<SubjectId>;
    async fn get_subject(&self, id: SubjectId) -> Result<Option<Subject>>;
    /// All subjects, or those of one officer's caseload.
    async fn list_subjects(&self, officer: Option<UserId>) -> Result<Vec<Subject>>;
    /// (Added) Binds a subject to exactly these zone groups (replacing earlier bindings):
    /// group zones (`ZoneSpec::group`) of these groups are listed by `list_zones(Some(subject))`.
    async fn set_subject_zone_groups(&self, subject: SubjectId, groups: &[String]) -> Result<()>;
    /// (Added) The zone groups a subject is bound to, sorted.
    async fn subject_zone_groups(&self, subject: SubjectId) -> Result<Vec<String>>;

    /// Insert (id = 0) or update a zone; returns its id.
    async fn upsert_zone(&self, zone: &ZoneSpec) -> Result<ZoneId>;
    async fn delete_zone(&self, id: ZoneId) -> Result<()>;
    async fn get_zone(&self, id: ZoneId) -> Result<Option<ZoneSpec>>;
    /// Zones of one subject (including group zones it is bound to), or all zones when None.
    async fn list_zones(&self, subject: Option<SubjectId>) -> Result<Vec<ZoneSpec>>;

    // --- telemetry ------------------------------------------------------------------------
    /// Durably store a batch (one transaction, batched statement). Idempotent on
    /// (device_id, device_time, seq): a device re-sending an un-ACKed record does not duplicate it.
    async fn insert_records(&self, records: &[StoredRecord]) -> Result<()>;
    /// Positions of a subject between `from` and `to`, oldest first.
    async fn trail(
        &self,
        subject: SubjectId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<TrailPoint>>;
    /// Latest state per subject (one row per subject with a device), optionally restricted.
    async fn latest_states(&self, subjects: Option<&[SubjectId]>) -> Result<Vec<LatestState>>;
    /// Count of stored records of one device (for tests and the decode/support tools).
    async fn count_records(&self, device_id: &str) -> Result<i64>;
    /// Records of one device, oldest first (support and tests).
    async fn device_records(&self, device_id: &str, limit: i64) -> Result<Vec<Record>>;

    // --- victim data (its own class) -------------------------------------------------------
    /// Durably store records of victim devices ([`DeviceClass::Victim`]) in the victim store
    /// (`victim_positions`), apart from offender data: never in positions or latest state, so no
    /// trail, map, report or export shows them. One transaction; idempotent on
    /// (device_id, device_time, seq) like [`Store::insert_records`]. The ingest pipeline routes a
    /// victim device's records here (and ACKs only after this returns).
    async fn insert_victim_records(&self, records: &[Record]) -> Result<()>;
    /// Positions of a victim device between `from` and `to`, oldest first. Victim data: the
    /// caller checks the reader's permission and audits the read.
    async fn victim_positions(
        &self,
        device_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<TrailPoint>>;
    /// Count of stored victim records of one device (tests and support).
    async fn count_victim_records(&self, device_id: &str) -> Result<i64>;

    // --- alerts + outbox (one transaction each) -------------------------------------------
    /// Writes an alert as the engine decided it (see [`AlertWrite`]), and in the same
    /// transaction the audit record, the change-log entry and the outbox messages that
    /// `effects` builds from the stored alert. `Conflict` when the alert changed meanwhile
    /// (version) or a new alert meets an ongoing one; `NotFound` when an updated alert is gone.
    async fn write_alert(
        &self,
        write: &AlertWrite,
        effects: AlertEffectsFn<'_>,
    ) -> Result<VersionedAlert>;
    async fn get_alert(&self, id: AlertId) -> Result<Option<VersionedAlert>>;
    /// Newest and most severe first.
    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>>;
    /// The ongoing (not resolved) alert of this subject/kind/zone, if any.
    async fn ongoing_alert(
        &self,
        subject: SubjectId,
        kind: AlertKind,
        zone: Option<ZoneId>,
    ) -> Result<Option<VersionedAlert>>;
    /// Open (unacknowledged, not escalated) alerts whose `created_at` (server time of the raise,
    /// not the device time `started_at`) is before `before` — escalation input, oldest first.
    async fn unacknowledged_alerts(&self, before: DateTime<Utc>) -> Result<Vec<Alert>>;

    /// Up to `limit` pending messages of `channel` that are due at `now`, taking only the
    /// oldest pending message of each ordering key (per-subject order is kept).
    async fn due_outbox(
        &self,
        channel: &str,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>>;
    async fn mark_outbox_delivered(&self, id: i64, at: DateTime<Utc>) -> Result<()>;
    /// Record a failed attempt: next try at `next_attempt_at`, or dead-letter when `dead` is true.
    async fn mark_outbox_failed(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: DateTime<Utc>,
        dead: bool,
    ) -> Result<()>;
    async fn outbox_status(&self, id: i64) -> Result<Option<OutboxStatus>>;
    async fn count_outbox(&self, channel: &str, status: OutboxStatus) -> Result<i64>;

    // --- change log, cursors, leases -------------------------------------------------------
    /// Up to `limit` changes with an id above `after`, in id order. Every change is written in
    /// the transaction of what it describes, and change rows commit in id order, so a reader
    /// that goes on from the last id it saw misses nothing.
    async fn changes_after(&self, after: ChangeId, limit: i64) -> Result<Vec<ChangeEntry>>;
    /// Id of the newest change (0 when the log is empty).
    async fn last_change_id(&self) -> Result<ChangeId>;
    /// Ticks when a change may have been committed: PostgreSQL `LISTEN/NOTIFY` (any instance's
    /// commits); on SQLite, this process's commits. Readers also poll every
    /// [`Store::change_poll_interval`], so a missed wake-up only delays.
    fn change_wakeups(&self) -> tokio::sync::watch::Receiver<u64>;
    /// How often readers look at the log without a wake-up.
    fn change_poll_interval(&self) -> std::time::Duration;
    /// Where a named consumer (one per system, under a lease) left off.
    async fn read_cursor(&self, consumer: &str) -> Result<Option<ChangeId>>;
    async fn write_cursor(&self, consumer: &str, id: ChangeId) -> Result<()>;
    /// Tries to take the lease `name` for `holder`: PostgreSQL session advisory lock on a
    /// connection of its own (released when the holder's process or connection dies);
    /// SQLite: a row with an expiry renewed by [`Lease::still_held`]. `None` when another
    /// holder has it.
    async fn acquire_lease(&self, name: &str, holder: &str) -> Result<Option<Lease>>;

    // --- dashboard sessions (shared by every instance) --------------------------------------
    /// Stores a new session under the hash of its token.
    async fn create_session(&self, session: &NewSession) -> Result<()>;
    /// The user of a live session (idle expiry and absolute end both after `now`), moving its
    /// idle expiry to `expires_at` (capped at its end). `None` when unknown or expired.
    async fn touch_session(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Option<UserId>>;
    /// Whether a session is live at `now`, without extending it.
    async fn session_live(&self, token_hash: &str, now: DateTime<Utc>) -> Result<bool>;
    async fn delete_session(&self, token_hash: &str) -> Result<()>;
    /// Ends every session of `user_id`, but the one with hash `keep` when given.
    async fn delete_user_sessions(&self, user_id: UserId, keep: Option<&str>) -> Result<u64>;
    /// Deletes sessions expired at `now`.
    async fn purge_sessions(&self, now: DateTime<Utc>) -> Result<u64>;

    // --- users + audit --------------------------------------------------------------------
    /// Insert (id = 0) or update a user; returns its id.
    async fn upsert_user(&self, user: &User) -> Result<UserId>;
    async fn get_user(&self, id: UserId) -> Result<Option<User>>;
    async fn get_user_by_name(&self, username: &str) -> Result<Option<User>>;
    async fn list_users(&self) -> Result<Vec<User>>;
    /// Append-only: there is no update or delete of audit records except retention.
    async fn append_audit(&self, entry: &NewAudit) -> Result<i64>;
    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>>;

    // --- retention ------------------------------------------------------------------------
    /// Delete positions (offender and victim; both counted in `positions_deleted`) older than
    /// `positions_before`; resolved alerts older than
    /// `alerts_before` and audit older than `audit_before` when given.
    async fn apply_retention(
        &self,
        positions_before: DateTime<Utc>,
        alerts_before: Option<DateTime<Utc>>,
        audit_before: Option<DateTime<Utc>>,
    ) -> Result<RetentionReport>;
}
