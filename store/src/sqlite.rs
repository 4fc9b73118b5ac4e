//! SQLite backend: the embedded default. WAL journal, `synchronous=FULL` (a committed
//! transaction survives power loss), a busy timeout, and write transactions opened with
//! `BEGIN IMMEDIATE` so concurrent writers queue instead of failing on lock upgrade.
//! Timestamps are stored as INTEGER microseconds since the Unix epoch (UTC).

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use em_model::*;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use crate::common::*;
use crate::*;

/// Embedded migrations of the SQLite schema (`store/migrations/sqlite`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Bound parameters per statement stay well below SQLite's limit (32766).
const RECORD_COLUMNS: usize = 15;
const MAX_ROWS_PER_INSERT: usize = 2000;

/// The two tables of device records: offender tags' `positions` and protected persons'
/// `victim_positions` (same columns, without `subject_id`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum PositionTable {
    Positions,
    Victim,
}

/// Inserts record rows into `table` in chunks (idempotent on device, device time, sequence).
async fn insert_position_rows(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    table: PositionTable,
    rows: &[RecordRow],
) -> Result<()> {
    let head = match table {
        PositionTable::Positions => {
            "INSERT INTO positions (device_id, device_time, seq, received_time, subject_id, protocol,
               lat, lon, accuracy_m, speed_kmh, valid, battery_pct, charging, beacon_in_range, extra) "
        }
        PositionTable::Victim => {
            "INSERT INTO victim_positions (device_id, device_time, seq, received_time, protocol,
               lat, lon, accuracy_m, speed_kmh, valid, battery_pct, charging, beacon_in_range, extra) "
        }
    };
    for chunk in rows.chunks(MAX_ROWS_PER_INSERT.min(30_000 / RECORD_COLUMNS)) {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(head);
        qb.push_values(chunk, |mut b, r| {
            b.push_bind(&r.device_id)
                .push_bind(us(r.device_time))
                .push_bind(r.seq)
                .push_bind(us(r.received_time));
            if table == PositionTable::Positions {
                b.push_bind(r.subject_id);
            }
            b.push_bind(r.protocol)
                .push_bind(r.lat)
                .push_bind(r.lon)
                .push_bind(r.accuracy_m)
                .push_bind(r.speed_kmh)
                .push_bind(r.valid)
                .push_bind(r.battery_pct)
                .push_bind(r.charging)
                .push_bind(r.beacon_in_range)
                .push_bind(&r.extra);
        });
        qb.push(" ON CONFLICT (device_id, device_time, seq) DO NOTHING");
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

fn us(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn opt_us(t: Option<DateTime<Utc>>) -> Option<i64> {
    t.map(us)
}

fn from_us(v: i64) -> Result<DateTime<Utc>> {
    DateTime::from_timestamp_micros(v)
        .ok_or_else(|| StoreError::Invalid(format!("stored timestamp {v} out of range")))
}

fn opt_from_us(v: Option<i64>) -> Result<Option<DateTime<Utc>>> {
    v.map(from_us).transpose()
}

fn json_col(row: &SqliteRow, col: &str) -> Result<serde_json::Value> {
    let s: String = row.try_get(col)?;
    serde_json::from_str(&s).map_err(|e| StoreError::Invalid(format!("stored {col}: {e}")))
}

fn opt_json_col(row: &SqliteRow, col: &str) -> Result<Option<serde_json::Value>> {
    let s: Option<String> = row.try_get(col)?;
    s.map(|s| {
        serde_json::from_str(&s).map_err(|e| StoreError::Invalid(format!("stored {col}: {e}")))
    })
    .transpose()
}

fn json_text<T: serde::Serialize>(what: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Invalid(format!("cannot encode {what}: {e}")))
}

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
        hash_plaintext_secrets(&pool).await?;
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

    async fn alert_row(
        conn: &mut sqlx::SqliteConnection,
        id: AlertId,
    ) -> Result<Option<(Alert, i64)>> {
        let row = sqlx::query("SELECT * FROM alerts WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
        row.map(|r| alert_from_row(&r)).transpose()
    }

    async fn insert_audit(conn: &mut sqlx::SqliteConnection, e: &NewAudit) -> Result<i64> {
        let at = e.at.unwrap_or_else(Utc::now);
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO audit (at, actor_id, actor, action, target_type, target_id, subject_id, details)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(us(at))
        .bind(e.actor_id)
        .bind(&e.actor)
        .bind(&e.action)
        .bind(&e.target_type)
        .bind(&e.target_id)
        .bind(e.subject_id)
        .bind(json_text("audit details", &e.details)?)
        .fetch_one(&mut *conn)
        .await?;
        Ok(id)
    }

    async fn insert_outbox(
        conn: &mut sqlx::SqliteConnection,
        messages: &[NewOutbox],
    ) -> Result<()> {
        let now = us(Utc::now());
        for m in messages {
            sqlx::query(
                "INSERT INTO outbox (channel, ordering_key, idempotency_key, payload, status, attempts,
                     next_attempt_at, created_at)
                 VALUES (?, ?, ?, ?, 'pending', 0, ?, ?)
                 ON CONFLICT (channel, idempotency_key) DO NOTHING",
            )
            .bind(&m.channel)
            .bind(&m.ordering_key)
            .bind(&m.idempotency_key)
            .bind(json_text("outbox payload", &m.payload)?)
            .bind(now)
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
        Ok(())
    }

    /// Appends `change` to the log inside the caller's (write) transaction. SQLite has one
    /// writer at a time, so ids commit in order.
    async fn append_change(conn: &mut sqlx::SqliteConnection, change: &Change) -> Result<ChangeId> {
        Ok(sqlx::query_scalar(
            "INSERT INTO changes (at, topic, subject_id, payload) VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(us(Utc::now()))
        .bind(change.topic())
        .bind(change.subject_id())
        .bind(json_text("change", change)?)
        .fetch_one(&mut *conn)
        .await?)
    }

    /// Commits a transaction that wrote to the change log and wakes this process's readers.
    async fn commit_changes(&self, tx: sqlx::Transaction<'static, Sqlite>) -> Result<()> {
        tx.commit().await?;
        self.wakeups.send_modify(|c| *c = c.wrapping_add(1));
        Ok(())
    }
}

/// Replaces every device secret still stored as plaintext (rows written before secrets were
/// hashed) by its stored form ([`device_secret`]). SQLite has no SHA-256 in SQL, so this runs
/// here on every open; idempotent, and a row changed meanwhile is left to the next open.
async fn hash_plaintext_secrets(pool: &SqlitePool) -> Result<()> {
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
            sqlx::query("UPDATE devices SET secret = ? WHERE device_id = ? AND secret = ?")
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

fn device_from_row(r: &SqliteRow) -> Result<Device> {
    Ok(Device {
        device_id: r.try_get("device_id")?,
        protocol: parse_col("protocol", r.try_get::<&str, _>("protocol")?)?,
        secret: r.try_get("secret")?,
        active: r.try_get("active")?,
        class: parse_col("device class", r.try_get::<&str, _>("class")?)?,
    })
}

fn assignment_from_row(r: &SqliteRow) -> Result<Assignment> {
    Ok(Assignment {
        device_id: r.try_get("device_id")?,
        subject_id: r.try_get("subject_id")?,
        from: from_us(r.try_get("valid_from")?)?,
        to: opt_from_us(r.try_get("valid_to")?)?,
    })
}

fn subject_from_row(r: &SqliteRow) -> Result<Subject> {
    Ok(Subject {
        id: r.try_get("id")?,
        reference: r.try_get("reference")?,
        display_name: r.try_get("display_name")?,
        officer_id: r.try_get("officer_id")?,
        timezone: r.try_get("timezone")?,
        order_start: opt_from_us(r.try_get("order_start")?)?,
        order_end: opt_from_us(r.try_get("order_end")?)?,
        rules: from_json("breach rules", json_col(r, "rules")?)?,
    })
}

fn zone_from_row(r: &SqliteRow) -> Result<ZoneSpec> {
    let kind: String = r.try_get("kind")?;
    Ok(ZoneSpec {
        id: r.try_get("id")?,
        subject_id: r.try_get("subject_id")?,
        group: r.try_get("group_name")?,
        name: r.try_get("name")?,
        kind: from_json("zone kind", serde_json::Value::String(kind))?,
        geometry: from_json("zone geometry", json_col(r, "geometry")?)?,
        schedule: opt_json_col(r, "schedule")?
            .map(|v| from_json("zone schedule", v))
            .transpose()?,
        is_curfew_home: r.try_get("is_curfew_home")?,
    })
}

fn user_from_row(r: &SqliteRow) -> Result<User> {
    Ok(User {
        id: r.try_get("id")?,
        username: r.try_get("username")?,
        display_name: r.try_get("display_name")?,
        role: parse_col("role", r.try_get::<&str, _>("role")?)?,
        password_hash: r.try_get("password_hash")?,
        active: r.try_get("active")?,
    })
}

fn alert_from_row(r: &SqliteRow) -> Result<(Alert, i64)> {
    let alert = Alert {
        id: r.try_get("id")?,
        subject_id: r.try_get("subject_id")?,
        device_id: r.try_get("device_id")?,
        kind: parse_col("alert kind", r.try_get::<&str, _>("kind")?)?,
        severity: severity_from_db(r.try_get("severity")?)?,
        state: parse_col("alert state", r.try_get::<&str, _>("state")?)?,
        zone_id: r.try_get("zone_id")?,
        message: r.try_get("message")?,
        started_at: from_us(r.try_get("started_at")?)?,
        created_at: from_us(r.try_get("created_at")?)?,
        last_seen_at: from_us(r.try_get("last_seen_at")?)?,
        ended_at: opt_from_us(r.try_get("ended_at")?)?,
        escalated: r.try_get("escalated")?,
        acknowledged_by: r.try_get("acknowledged_by")?,
        acknowledged_at: opt_from_us(r.try_get("acknowledged_at")?)?,
        resolved_by: r.try_get("resolved_by")?,
        resolved_at: opt_from_us(r.try_get("resolved_at")?)?,
        resolution_code: r.try_get("resolution_code")?,
        resolution_note: r.try_get("resolution_note")?,
        evidence: json_col(r, "evidence")?,
        occurrences: r.try_get("occurrences")?,
    };
    Ok((alert, r.try_get("version")?))
}

fn outbox_from_row(r: &SqliteRow) -> Result<OutboxMessage> {
    Ok(OutboxMessage {
        id: r.try_get("id")?,
        channel: r.try_get("channel")?,
        ordering_key: r.try_get("ordering_key")?,
        idempotency_key: r.try_get("idempotency_key")?,
        payload: json_col(r, "payload")?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: from_us(r.try_get("next_attempt_at")?)?,
        last_error: r.try_get("last_error")?,
        created_at: from_us(r.try_get("created_at")?)?,
    })
}

fn audit_from_row(r: &SqliteRow) -> Result<AuditEntry> {
    Ok(AuditEntry {
        id: r.try_get("id")?,
        at: from_us(r.try_get("at")?)?,
        actor_id: r.try_get("actor_id")?,
        actor: r.try_get("actor")?,
        action: r.try_get("action")?,
        target_type: r.try_get("target_type")?,
        target_id: r.try_get("target_id")?,
        subject_id: r.try_get("subject_id")?,
        details: json_col(r, "details")?,
    })
}

fn record_from_row(r: &SqliteRow) -> Result<Record> {
    record_from_parts(
        r.try_get("device_id")?,
        r.try_get::<&str, _>("protocol")?,
        from_us(r.try_get("device_time")?)?,
        from_us(r.try_get("received_time")?)?,
        r.try_get("seq")?,
        r.try_get("lat")?,
        r.try_get("lon")?,
        r.try_get("accuracy_m")?,
        r.try_get("speed_kmh")?,
        r.try_get("valid")?,
        r.try_get("battery_pct")?,
        r.try_get("charging")?,
        r.try_get("beacon_in_range")?,
        json_col(r, "extra")?,
    )
}

fn zone_kind_str(k: ZoneKind) -> &'static str {
    match k {
        ZoneKind::Inclusion => "inclusion",
        ZoneKind::Exclusion => "exclusion",
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn upsert_device(&self, device: &Device) -> Result<()> {
        if device.device_id.is_empty() {
            return Err(StoreError::Invalid("device id must not be empty".into()));
        }
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO devices (device_id, protocol, secret, active, class) VALUES (?, ?, ?, ?, ?)
             ON CONFLICT (device_id) DO UPDATE SET protocol = excluded.protocol,
               secret = excluded.secret, active = excluded.active, class = excluded.class",
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
        self.commit_changes(tx).await
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<Device>> {
        sqlx::query("SELECT * FROM devices WHERE device_id = ?")
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
        let mut tx = self.begin_write().await?;
        let current =
            sqlx::query("SELECT * FROM assignments WHERE device_id = ? AND valid_to IS NULL")
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
                "UPDATE assignments SET valid_to = ? WHERE device_id = ? AND valid_to IS NULL",
            )
            .bind(us(from))
            .bind(device_id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("INSERT INTO assignments (device_id, subject_id, valid_from) VALUES (?, ?, ?)")
            .bind(device_id)
            .bind(subject_id)
            .bind(us(from))
            .execute(&mut *tx)
            .await?;
        Self::append_change(
            &mut tx,
            &Change::Device {
                device_id: device_id.to_string(),
            },
        )
        .await?;
        self.commit_changes(tx).await
    }

    async fn unassign_device(&self, device_id: &str, at: DateTime<Utc>) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let current =
            sqlx::query("SELECT * FROM assignments WHERE device_id = ? AND valid_to IS NULL")
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
        sqlx::query("UPDATE assignments SET valid_to = ? WHERE device_id = ? AND valid_to IS NULL")
            .bind(us(at))
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
        self.commit_changes(tx).await
    }

    async fn assignments(&self, device_id: &str) -> Result<Vec<Assignment>> {
        sqlx::query("SELECT * FROM assignments WHERE device_id = ? ORDER BY valid_from, id")
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
            "SELECT subject_id FROM assignments WHERE device_id = ? AND valid_from <= ?
               AND (valid_to IS NULL OR valid_to > ?) ORDER BY valid_from DESC, id DESC LIMIT 1",
        )
        .bind(device_id)
        .bind(us(at))
        .bind(us(at))
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
        let rules = json_text("breach rules", &s.rules)?;
        let mut tx = self.begin_write().await?;
        let id: SubjectId = if s.id == 0 {
            sqlx::query_scalar(
                "INSERT INTO subjects (reference, display_name, officer_id, timezone, order_start, order_end, rules)
                 VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            )
            .bind(&s.reference)
            .bind(&s.display_name)
            .bind(s.officer_id)
            .bind(&s.timezone)
            .bind(opt_us(s.order_start))
            .bind(opt_us(s.order_end))
            .bind(rules)
            .fetch_one(&mut *tx)
            .await?
        } else {
            sqlx::query_scalar(
                "UPDATE subjects SET reference = ?, display_name = ?, officer_id = ?, timezone = ?,
                   order_start = ?, order_end = ?, rules = ? WHERE id = ? RETURNING id",
            )
            .bind(&s.reference)
            .bind(&s.display_name)
            .bind(s.officer_id)
            .bind(&s.timezone)
            .bind(opt_us(s.order_start))
            .bind(opt_us(s.order_end))
            .bind(rules)
            .bind(s.id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("subject {}", s.id)))?
        };
        let subject = Subject { id, ..s.clone() };
        Self::append_change(&mut tx, &Change::Subject { subject }).await?;
        self.commit_changes(tx).await?;
        Ok(id)
    }

    async fn get_subject(&self, id: SubjectId) -> Result<Option<Subject>> {
        sqlx::query("SELECT * FROM subjects WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| subject_from_row(&r))
            .transpose()
    }

    async fn list_subjects(&self, officer: Option<UserId>) -> Result<Vec<Subject>> {
        let rows = match officer {
            Some(o) => {
                sqlx::query("SELECT * FROM subjects WHERE officer_id = ? ORDER BY id")
                    .bind(o)
                    .fetch_all(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM subjects ORDER BY id")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(subject_from_row).collect()
    }

    async fn set_subject_zone_groups(&self, subject: SubjectId, groups: &[String]) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query("DELETE FROM subject_zone_groups WHERE subject_id = ?")
            .bind(subject)
            .execute(&mut *tx)
            .await?;
        for g in groups {
            sqlx::query(
                "INSERT INTO subject_zone_groups (subject_id, group_name) VALUES (?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(subject)
            .bind(g)
            .execute(&mut *tx)
            .await?;
        }
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT group_name FROM subject_zone_groups WHERE subject_id = ? ORDER BY group_name",
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
        self.commit_changes(tx).await
    }

    async fn subject_zone_groups(&self, subject: SubjectId) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT group_name FROM subject_zone_groups WHERE subject_id = ? ORDER BY group_name",
        )
        .bind(subject)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn upsert_zone(&self, z: &ZoneSpec) -> Result<ZoneId> {
        validate_zone(z)?;
        let geometry = json_text("zone geometry", &z.geometry)?;
        let schedule = z
            .schedule
            .as_ref()
            .map(|s| json_text("zone schedule", s))
            .transpose()?;
        let mut tx = self.begin_write().await?;
        let id: ZoneId = if z.id == 0 {
            sqlx::query_scalar(
                "INSERT INTO zones (subject_id, group_name, name, kind, geometry, schedule, is_curfew_home)
                 VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
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
                "UPDATE zones SET subject_id = ?, group_name = ?, name = ?, kind = ?, geometry = ?,
                   schedule = ?, is_curfew_home = ? WHERE id = ? RETURNING id",
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
        self.commit_changes(tx).await?;
        Ok(id)
    }

    async fn delete_zone(&self, id: ZoneId) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let subject_id: Option<Option<SubjectId>> =
            sqlx::query_scalar("DELETE FROM zones WHERE id = ? RETURNING subject_id")
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
        self.commit_changes(tx).await
    }

    async fn get_zone(&self, id: ZoneId) -> Result<Option<ZoneSpec>> {
        sqlx::query("SELECT * FROM zones WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| zone_from_row(&r))
            .transpose()
    }

    async fn list_zones(&self, subject: Option<SubjectId>) -> Result<Vec<ZoneSpec>> {
        let rows = match subject {
            Some(s) => {
                sqlx::query(
                    "SELECT * FROM zones WHERE subject_id = ? OR (subject_id IS NULL AND group_name IN
                       (SELECT group_name FROM subject_zone_groups WHERE subject_id = ?)) ORDER BY id",
                )
                .bind(s)
                .bind(s)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query("SELECT * FROM zones ORDER BY id")
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(zone_from_row).collect()
    }

    async fn insert_records(&self, records: &[StoredRecord]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let rows = records
            .iter()
            .map(RecordRow::from_stored)
            .collect::<Result<Vec<_>>>()?;
        let deltas = fold_latest(records);
        let mut tx = self.begin_write().await?;
        insert_position_rows(&mut tx, PositionTable::Positions, &rows).await?;
        for d in &deltas {
            let pos_extra = d
                .position
                .map(|p| {
                    json_text(
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
                .bind(us(d.last_contact))
                .bind(d.position.map(|p| p.lat))
                .bind(d.position.map(|p| p.lon))
                .bind(d.position.and_then(|p| p.accuracy_m))
                .bind(d.position.and_then(|p| p.speed_kmh))
                .bind(d.position.map(|p| p.valid))
                .bind(pos_extra)
                .bind(opt_us(d.position_time))
                .bind(opt_us(d.status_time))
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

    async fn trail(
        &self,
        subject: SubjectId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<TrailPoint>> {
        let limit = check_limit(limit)?;
        let rows = sqlx::query(
            "SELECT * FROM positions WHERE subject_id = ? AND device_time >= ? AND device_time <= ?
               AND lat IS NOT NULL AND lon IS NOT NULL ORDER BY device_time, seq, device_id LIMIT ?",
        )
        .bind(subject)
        .bind(us(from))
        .bind(us(to))
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
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT * FROM latest_state");
        if let Some(ids) = subjects {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            qb.push(" WHERE subject_id IN (");
            let mut sep = qb.separated(", ");
            for id in ids {
                sep.push_bind(*id);
            }
            qb.push(")");
        }
        qb.push(" ORDER BY subject_id");
        let rows = qb.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let lat: Option<f64> = r.try_get("lat")?;
                let lon: Option<f64> = r.try_get("lon")?;
                let position = match (lat, lon) {
                    (Some(lat), Some(lon)) => {
                        let extra: RecordExtra = match opt_json_col(r, "position_extra")? {
                            Some(v) => from_json("position extras", v)?,
                            None => RecordExtra::default(),
                        };
                        Some(Position {
                            lat,
                            lon,
                            accuracy_m: r.try_get("accuracy_m")?,
                            speed_kmh: r.try_get("speed_kmh")?,
                            course_deg: extra.course_deg,
                            altitude_m: extra.altitude_m,
                            satellites: extra.satellites,
                            valid: r.try_get::<Option<bool>, _>("valid")?.unwrap_or(false),
                            source: extra.source.unwrap_or_default(),
                        })
                    }
                    _ => None,
                };
                Ok(LatestState {
                    subject_id: r.try_get("subject_id")?,
                    device_id: r.try_get("device_id")?,
                    last_contact: from_us(r.try_get("last_contact")?)?,
                    position,
                    position_time: opt_from_us(r.try_get("position_time")?)?,
                    battery_pct: small_u8("battery", r.try_get("battery_pct")?)?,
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
            sqlx::query_scalar("SELECT count(*) FROM positions WHERE device_id = ?")
                .bind(device_id)
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn device_records(&self, device_id: &str, limit: i64) -> Result<Vec<Record>> {
        let limit = check_limit(limit)?;
        sqlx::query("SELECT * FROM positions WHERE device_id = ? ORDER BY device_time, seq LIMIT ?")
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
        let mut tx = self.begin_write().await?;
        insert_position_rows(&mut tx, PositionTable::Victim, &rows).await?;
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
            "SELECT * FROM victim_positions WHERE device_id = ? AND device_time >= ? AND device_time <= ?
               AND lat IS NOT NULL AND lon IS NOT NULL ORDER BY device_time, seq LIMIT ?",
        )
        .bind(device_id)
        .bind(us(from))
        .bind(us(to))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| trail_point(record_from_row(r)?))
            .collect()
    }

    async fn count_victim_records(&self, device_id: &str) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM victim_positions WHERE device_id = ?")
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
        let evidence = json_text("evidence", &a.evidence)?;
        let mut tx = self.begin_write().await?;
        let row = match w.expected_version {
            None => sqlx::query(
                "INSERT INTO alerts (subject_id, device_id, kind, severity, state, zone_id, zone_key,
                     message, started_at, last_seen_at, created_at, ended_at, escalated,
                     acknowledged_by, acknowledged_at, resolved_by, resolved_at, resolution_code,
                     resolution_note, evidence, occurrences, version)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1)
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
            .bind(us(a.started_at))
            .bind(us(a.last_seen_at))
            .bind(us(a.created_at))
            .bind(opt_us(a.ended_at))
            .bind(a.escalated)
            .bind(a.acknowledged_by)
            .bind(opt_us(a.acknowledged_at))
            .bind(a.resolved_by)
            .bind(opt_us(a.resolved_at))
            .bind(&a.resolution_code)
            .bind(&a.resolution_note)
            .bind(&evidence)
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
                    "UPDATE alerts SET device_id = ?, severity = ?, state = ?, message = ?,
                         last_seen_at = ?, ended_at = ?, escalated = ?, acknowledged_by = ?,
                         acknowledged_at = ?, resolved_by = ?, resolved_at = ?,
                         resolution_code = ?, resolution_note = ?, evidence = ?,
                         occurrences = ?, version = version + 1
                     WHERE id = ? AND version = ? RETURNING *",
                )
                .bind(&a.device_id)
                .bind(severity_to_db(a.severity))
                .bind(a.state.as_str())
                .bind(&a.message)
                .bind(us(a.last_seen_at))
                .bind(opt_us(a.ended_at))
                .bind(a.escalated)
                .bind(a.acknowledged_by)
                .bind(opt_us(a.acknowledged_at))
                .bind(a.resolved_by)
                .bind(opt_us(a.resolved_at))
                .bind(&a.resolution_code)
                .bind(&a.resolution_note)
                .bind(&evidence)
                .bind(a.occurrences)
                .bind(a.id)
                .bind(expected)
                .fetch_optional(&mut *tx)
                .await?;
                match row {
                    Some(r) => r,
                    None => {
                        let exists: bool =
                            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM alerts WHERE id = ?)")
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
        self.commit_changes(tx).await?;
        Ok(stored)
    }

    async fn get_alert(&self, id: AlertId) -> Result<Option<VersionedAlert>> {
        let mut conn = self.pool.acquire().await?;
        Ok(Self::alert_row(&mut conn, id)
            .await?
            .map(|(alert, version)| VersionedAlert { alert, version }))
    }

    async fn list_alerts(&self, f: &AlertFilter) -> Result<Vec<Alert>> {
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT * FROM alerts WHERE 1 = 1");
        if let Some(ids) = &f.subject_ids {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            qb.push(" AND subject_id IN (");
            let mut sep = qb.separated(", ");
            for id in ids {
                sep.push_bind(*id);
            }
            qb.push(")");
        }
        if let Some(states) = &f.states {
            if states.is_empty() {
                return Ok(Vec::new());
            }
            qb.push(" AND state IN (");
            let mut sep = qb.separated(", ");
            for s in states {
                sep.push_bind(s.as_str());
            }
            qb.push(")");
        }
        if let Some(since) = f.since {
            qb.push(" AND started_at >= ").push_bind(us(since));
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
            "SELECT * FROM alerts WHERE subject_id = ? AND kind = ? AND zone_key = ? AND state <> 'resolved'",
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
            "SELECT * FROM alerts WHERE state = 'open' AND escalated = 0 AND created_at < ?
             ORDER BY created_at, id",
        )
        .bind(us(before))
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
             WHERE o.channel = ? AND o.status = 'pending' AND o.next_attempt_at <= ?
               AND o.id = (SELECT min(p.id) FROM outbox p WHERE p.channel = o.channel
                             AND p.ordering_key = o.ordering_key AND p.status = 'pending')
             ORDER BY o.id LIMIT ?",
        )
        .bind(channel)
        .bind(us(now))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(outbox_from_row)
        .collect()
    }

    async fn mark_outbox_delivered(&self, id: i64, at: DateTime<Utc>) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM outbox WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        match status.as_deref() {
            None => return Err(StoreError::NotFound(format!("outbox message {id}"))),
            Some("pending") => {}
            Some("delivered") => return Ok(()),
            Some(other) => {
                return Err(StoreError::Conflict(format!(
                    "outbox message {id} is {other}"
                )))
            }
        }
        sqlx::query("UPDATE outbox SET status = 'delivered', delivered_at = ? WHERE id = ?")
            .bind(us(at))
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
        let mut tx = self.begin_write().await?;
        let status: Option<String> = sqlx::query_scalar("SELECT status FROM outbox WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
        match status.as_deref() {
            None => return Err(StoreError::NotFound(format!("outbox message {id}"))),
            Some("pending") => {}
            Some(other) => {
                return Err(StoreError::Conflict(format!(
                    "outbox message {id} is {other}, not pending"
                )))
            }
        }
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?,
                 status = ? WHERE id = ?",
        )
        .bind(error)
        .bind(us(next_attempt_at))
        .bind(if dead { "dead_letter" } else { "pending" })
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn outbox_status(&self, id: i64) -> Result<Option<OutboxStatus>> {
        let s: Option<String> = sqlx::query_scalar("SELECT status FROM outbox WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        s.map(|s| outbox_status_from_str(&s)).transpose()
    }

    async fn count_outbox(&self, channel: &str, status: OutboxStatus) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM outbox WHERE channel = ? AND status = ?")
                .bind(channel)
                .bind(outbox_status_str(status))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn changes_after(&self, after: ChangeId, limit: i64) -> Result<Vec<ChangeEntry>> {
        let limit = check_limit(limit)?;
        sqlx::query("SELECT id, at, payload FROM changes WHERE id > ? ORDER BY id LIMIT ?")
            .bind(after)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                let payload: String = r.try_get("payload")?;
                Ok(ChangeEntry {
                    id: r.try_get("id")?,
                    at: from_us(r.try_get("at")?)?,
                    change: serde_json::from_str(&payload)
                        .map_err(|e| StoreError::Invalid(format!("stored change: {e}")))?,
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
        self.wakeups.subscribe()
    }

    fn change_poll_interval(&self) -> Duration {
        // Commits of this process wake readers at once; the poll sees other processes'
        // (tools writing to the same file).
        Duration::from_millis(250)
    }

    async fn read_cursor(&self, consumer: &str) -> Result<Option<ChangeId>> {
        Ok(
            sqlx::query_scalar("SELECT change_id FROM change_cursors WHERE consumer = ?")
                .bind(consumer)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn write_cursor(&self, consumer: &str, id: ChangeId) -> Result<()> {
        sqlx::query(
            "INSERT INTO change_cursors (consumer, change_id, updated_at) VALUES (?, ?, ?)
             ON CONFLICT (consumer) DO UPDATE SET change_id = excluded.change_id,
               updated_at = excluded.updated_at",
        )
        .bind(consumer)
        .bind(id)
        .bind(us(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn acquire_lease(&self, name: &str, holder: &str) -> Result<Option<Lease>> {
        let now = Utc::now();
        let n = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES (?, ?, ?)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at
             WHERE leases.expires_at < ? OR leases.holder = excluded.holder",
        )
        .bind(name)
        .bind(holder)
        .bind(us(now + SQLITE_LEASE_TTL))
        .bind(us(now))
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

    async fn upsert_user(&self, u: &User) -> Result<UserId> {
        if u.username.trim().is_empty() {
            return Err(StoreError::Invalid("username must not be empty".into()));
        }
        let res = if u.id == 0 {
            sqlx::query_scalar(
                "INSERT INTO users (username, display_name, role, password_hash, active)
                 VALUES (?, ?, ?, ?, ?) RETURNING id",
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
                "UPDATE users SET username = ?, display_name = ?, role = ?, password_hash = ?, active = ?
                 WHERE id = ? RETURNING id",
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
        sqlx::query("SELECT * FROM users WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| user_from_row(&r))
            .transpose()
    }

    async fn get_user_by_name(&self, username: &str) -> Result<Option<User>> {
        sqlx::query("SELECT * FROM users WHERE username = ?")
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
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new("SELECT * FROM audit WHERE 1 = 1");
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
            qb.push(" AND at >= ").push_bind(us(t));
        }
        if let Some(t) = f.until {
            qb.push(" AND at < ").push_bind(us(t));
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
        let mut tx = self.begin_write().await?;
        let mut report = RetentionReport {
            positions_deleted: sqlx::query("DELETE FROM positions WHERE device_time < ?")
                .bind(us(positions_before))
                .execute(&mut *tx)
                .await?
                .rows_affected(),
            ..RetentionReport::default()
        };
        report.positions_deleted +=
            sqlx::query("DELETE FROM victim_positions WHERE device_time < ?")
                .bind(us(positions_before))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if let Some(t) = alerts_before {
            report.alerts_deleted =
                sqlx::query("DELETE FROM alerts WHERE state = 'resolved' AND resolved_at < ?")
                    .bind(us(t))
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
        }
        if let Some(t) = audit_before {
            sqlx::query("INSERT INTO audit_retention_gate (open) VALUES (1)")
                .execute(&mut *tx)
                .await?;
            report.audit_deleted = sqlx::query("DELETE FROM audit WHERE at < ?")
                .bind(us(t))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM audit_retention_gate")
                .execute(&mut *tx)
                .await?;
        }
        report.changes_deleted = sqlx::query("DELETE FROM changes WHERE at < ?")
            .bind(us(Utc::now() - chrono::Duration::days(CHANGE_LOG_DAYS)))
            .execute(&mut *tx)
            .await?
            .rows_affected();
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

#[async_trait]
impl LeaseHold for SqliteLease {
    async fn still_held(&mut self) -> bool {
        let now = Utc::now();
        sqlx::query(
            "UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ? AND expires_at >= ?",
        )
        .bind(us(now + SQLITE_LEASE_TTL))
        .bind(&self.name)
        .bind(&self.holder)
        .bind(us(now))
        .execute(&self.pool)
        .await
        .is_ok_and(|r| r.rows_affected() == 1)
    }

    async fn release(self: Box<Self>) {
        let _ = sqlx::query("DELETE FROM leases WHERE name = ? AND holder = ?")
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
