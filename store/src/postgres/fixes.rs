//! The write path of fix batches (issue #4).
//!
//! One transaction per batch, two statements, no JSON built per row in Rust nor parsed per row
//! by the server (course, altitude, satellites, fix source and GSM signal are columns,
//! [`POSITION_COLUMNS`]; `extra` only carries device events and is `{}` for the usual record):
//!
//! 1. The positions go in with a binary `COPY positions … FROM STDIN` (partition routing, the
//!    default partition and TimescaleDB chunks included). `COPY` has no `ON CONFLICT`: when the
//!    batch holds a record that is already stored (a device re-sending an un-ACKed record, or
//!    the same record twice in one batch) the primary key rejects it, the transaction is rolled
//!    back and the batch is written again with `INSERT … SELECT FROM UNNEST(typed arrays)
//!    ON CONFLICT (device_id, device_time, seq) DO NOTHING`. After such a duplicate the store
//!    keeps using that form for [`DUPLICATE_WINDOW`] (re-sends come in bursts after
//!    reconnects), then tries `COPY` again.
//! 2. One `latest_state` upsert of the batch folded to one row per subject (see
//!    `common::fold_latest`), every field moving forward in device time only.
//!
//! Then `COMMIT` (with the server's `synchronous_commit`, on by default): the batch is durable
//! when [`crate::Store::insert_records`] returns. Rows written by the earlier path (full JSON in
//! `extra` / `position_extra`) stay readable: readers take a column when it is set and the JSON
//! value otherwise.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use em_model::*;
use serde::Serialize;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, Postgres};

use crate::common::*;
use crate::*;

use super::PgStore;

/// Columns the fast path needs on `positions` besides those of the original layout; added at
/// start-up to tables created before them (nullable, so adding them rewrites nothing).
pub(super) const POSITION_COLUMNS: &[(&str, &str)] = &[
    ("course_deg", "REAL"),
    ("altitude_m", "REAL"),
    ("satellites", "SMALLINT"),
    ("fix_source", "TEXT"),
    ("gsm_signal", "SMALLINT"),
];

/// How long the `ON CONFLICT` form stays in use after a batch met an already stored record.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(30);

macro_rules! positions_insert {
    () => {
        "INSERT INTO positions (device_id, device_time, seq, received_time, subject_id, protocol,
    lat, lon, accuracy_m, speed_kmh, valid, battery_pct, charging, beacon_in_range, extra,
    course_deg, altitude_m, satellites, fix_source, gsm_signal)
SELECT d, t, s, rt, sub, p, la, lo, acc, spd, v, bat, chg, bcn, COALESCE(ev::jsonb, '{}'::jsonb),
    crs, alt, sat, src, gsm
FROM UNNEST($1::text[], $2::timestamptz[], $3::int8[], $4::timestamptz[], $5::int8[], $6::text[],
    $7::float8[], $8::float8[], $9::float4[], $10::float4[], $11::bool[], $12::int2[], $13::bool[],
    $14::bool[], $15::text[], $16::float4[], $17::float4[], $18::int2[], $19::text[], $20::int2[])
    AS u(d, t, s, rt, sub, p, la, lo, acc, spd, v, bat, chg, bcn, ev, crs, alt, sat, src, gsm)"
    };
}

/// Idempotent insert, used after a unique violation.
const POSITIONS_INSERT_SKIP_STORED: &str = concat!(
    positions_insert!(),
    "\nON CONFLICT (device_id, device_time, seq) DO NOTHING"
);

/// Plain path: binary `COPY` straight into `positions` (partition routing included). Same
/// columns, in the order [`encode_copy`] writes them.
const POSITIONS_COPY: &str =
    "COPY positions (device_id, device_time, seq, received_time, subject_id,
    protocol, lat, lon, accuracy_m, speed_kmh, valid, battery_pct, charging, beacon_in_range, extra,
    course_deg, altitude_m, satellites, fix_source, gsm_signal) FROM STDIN WITH (FORMAT binary)";

/// Fields per row of [`POSITIONS_COPY`].
const COPY_FIELDS: i16 = 20;

/// `extra` of a record without device events.
const EMPTY_EXTRA: &str = "{}";

/// PostgreSQL's timestamp epoch (2000-01-01T00:00:00Z) in Unix seconds.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

fn pg_micros(t: DateTime<Utc>) -> Result<i64> {
    DateTime::<Utc>::from_timestamp(PG_EPOCH_UNIX_SECS, 0)
        .and_then(|epoch| (t - epoch).num_microseconds())
        .ok_or_else(|| StoreError::Invalid(format!("time {t} out of the storable range")))
}

/// Appends the binary `COPY` fields of one record, in the order of [`POSITIONS_COPY`].
struct CopyRow<'b> {
    buf: &'b mut Vec<u8>,
}

impl CopyRow<'_> {
    fn field(&mut self, bytes: &[u8]) -> Result<()> {
        let len = i32::try_from(bytes.len())
            .map_err(|_| StoreError::Invalid(format!("field of {} bytes too long", bytes.len())))?;
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    fn null(&mut self) -> Result<()> {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        Ok(())
    }

    fn text(&mut self, v: &str) -> Result<()> {
        self.field(v.as_bytes())
    }

    fn opt_text(&mut self, v: Option<&str>) -> Result<()> {
        match v {
            Some(v) => self.text(v),
            None => self.null(),
        }
    }

    /// Microseconds since 2000-01-01, rounded exactly as sqlx binds a `DateTime` (toward the
    /// epoch): a record re-sent through the `UNNEST` path must hit the same key.
    fn timestamp(&mut self, t: DateTime<Utc>) -> Result<()> {
        self.field(&pg_micros(t)?.to_be_bytes())
    }

    fn i64(&mut self, v: Option<i64>) -> Result<()> {
        match v {
            Some(v) => self.field(&v.to_be_bytes()),
            None => self.null(),
        }
    }

    fn i16(&mut self, v: Option<i16>) -> Result<()> {
        match v {
            Some(v) => self.field(&v.to_be_bytes()),
            None => self.null(),
        }
    }

    fn f64(&mut self, v: Option<f64>) -> Result<()> {
        match v {
            Some(v) => self.field(&v.to_be_bytes()),
            None => self.null(),
        }
    }

    fn f32(&mut self, v: Option<f32>) -> Result<()> {
        match v {
            Some(v) => self.field(&v.to_be_bytes()),
            None => self.null(),
        }
    }

    fn bool(&mut self, v: Option<bool>) -> Result<()> {
        match v {
            Some(v) => self.field(&[u8::from(v)]),
            None => self.null(),
        }
    }

    /// `jsonb` binary input: format version 1, then the JSON text.
    fn jsonb(&mut self, json: &str) -> Result<()> {
        let len = i32::try_from(json.len() + 1)
            .map_err(|_| StoreError::Invalid(format!("JSON of {} bytes too long", json.len())))?;
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.push(1);
        self.buf.extend_from_slice(json.as_bytes());
        Ok(())
    }
}

/// The whole batch as one binary `COPY` stream (header, rows, trailer).
fn encode_copy(records: &[StoredRecord]) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(32 + records.len() * 256);
    buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
    buf.extend_from_slice(&0i32.to_be_bytes()); // no header extension
    for sr in records {
        let r = &sr.record;
        validate_record(r)?;
        let p = r.position.as_ref();
        buf.extend_from_slice(&COPY_FIELDS.to_be_bytes());
        let mut row = CopyRow { buf: &mut buf };
        row.text(&r.device_id)?;
        row.timestamp(r.device_time)?;
        row.i64(Some(seq_to_db(r.seq)?))?;
        row.timestamp(r.received_time)?;
        row.i64(sr.subject_id)?;
        row.text(r.protocol.as_str())?;
        row.f64(p.map(|p| p.lat))?;
        row.f64(p.map(|p| p.lon))?;
        row.f32(p.and_then(|p| p.accuracy_m))?;
        row.f32(p.and_then(|p| p.speed_kmh))?;
        row.bool(p.map(|p| p.valid))?;
        row.i16(r.battery_pct.map(i16::from))?;
        row.bool(r.charging)?;
        row.bool(r.beacon_in_range)?;
        match extra_json(r)? {
            None => row.jsonb(EMPTY_EXTRA)?,
            Some(extra) => row.jsonb(&extra)?,
        }
        row.f32(p.and_then(|p| p.course_deg))?;
        row.f32(p.and_then(|p| p.altitude_m))?;
        row.i16(p.and_then(|p| p.satellites).map(i16::from))?;
        row.opt_text(p.map(|p| fix_source_str(p.source)))?;
        row.i16(r.gsm_signal.map(i16::from))?;
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    Ok(buf)
}

/// `extra` of a record: its device events and, when its device time is not trusted, the
/// time flag (same keys as [`crate::common::RecordExtra`]); None for the usual record.
fn extra_json(r: &Record) -> Result<Option<String>> {
    let time_status = stored_time_flag(r);
    if r.events.is_empty() && time_status.is_none() && r.cells.is_empty() && r.wifi.is_empty() {
        return Ok(None);
    }
    serde_json::to_string(&EventsOnly {
        events: &r.events,
        time_status,
        cells: &r.cells,
        wifi: &r.wifi,
    })
    .map(Some)
    .map_err(|e| StoreError::Invalid(format!("cannot encode device events: {e}")))
}

/// Position fields move together, when the batch's position is at least as new as the stored one.
macro_rules! if_newer_position {
    ($col:literal) => {
        concat!(
            $col,
            " = CASE WHEN EXCLUDED.position_time >= ls.position_time
                 OR (ls.position_time IS NULL AND EXCLUDED.position_time IS NOT NULL)
               THEN EXCLUDED.",
            $col,
            " ELSE ls.",
            $col,
            " END"
        )
    };
}

/// Each status field moves when the batch reported it and its status time is not older.
macro_rules! if_newer_status {
    ($col:literal) => {
        concat!(
            $col,
            " = CASE WHEN EXCLUDED.",
            $col,
            " IS NOT NULL AND (ls.status_time IS NULL OR EXCLUDED.status_time >= ls.status_time)
               THEN EXCLUDED.",
            $col,
            " ELSE ls.",
            $col,
            " END"
        )
    };
}

/// One statement for all subjects of a batch; each field only moves forward in device time.
/// `position_extra` (JSON of the earlier write path) is cleared whenever the position moves.
const LATEST_UPSERT: &str = concat!(
    "INSERT INTO latest_state AS ls (subject_id, device_id, last_contact, lat, lon, accuracy_m,
    speed_kmh, valid, course_deg, altitude_m, satellites, fix_source, position_extra,
    position_time, status_time, battery_pct, charging, beacon_in_range, strap_ok, case_ok)
SELECT sub, dev, lc, la, lo, acc, spd, v, crs, alt, sat, src, NULL::jsonb, pt, st, bat, chg, bcn,
    strap, cse
FROM UNNEST($1::int8[], $2::text[], $3::timestamptz[], $4::float8[], $5::float8[], $6::float4[],
    $7::float4[], $8::bool[], $9::float4[], $10::float4[], $11::int2[], $12::text[],
    $13::timestamptz[], $14::timestamptz[], $15::int2[], $16::bool[], $17::bool[], $18::bool[],
    $19::bool[])
    AS u(sub, dev, lc, la, lo, acc, spd, v, crs, alt, sat, src, pt, st, bat, chg, bcn, strap, cse)
ON CONFLICT (subject_id) DO UPDATE SET
    device_id = CASE WHEN EXCLUDED.last_contact >= ls.last_contact
        THEN EXCLUDED.device_id ELSE ls.device_id END,
    last_contact = GREATEST(ls.last_contact, EXCLUDED.last_contact),
    ",
    if_newer_position!("lat"),
    ",\n    ",
    if_newer_position!("lon"),
    ",\n    ",
    if_newer_position!("accuracy_m"),
    ",\n    ",
    if_newer_position!("speed_kmh"),
    ",\n    ",
    if_newer_position!("valid"),
    ",\n    ",
    if_newer_position!("course_deg"),
    ",\n    ",
    if_newer_position!("altitude_m"),
    ",\n    ",
    if_newer_position!("satellites"),
    ",\n    ",
    if_newer_position!("fix_source"),
    ",\n    ",
    if_newer_position!("position_extra"),
    ",\n    ",
    if_newer_position!("position_time"),
    ",\n    ",
    if_newer_status!("battery_pct"),
    ",\n    ",
    if_newer_status!("charging"),
    ",\n    ",
    if_newer_status!("beacon_in_range"),
    ",\n    ",
    if_newer_status!("strap_ok"),
    ",\n    ",
    if_newer_status!("case_ok"),
    ",\n    ",
    if_newer_status!("status_time"),
);

/// Column value of a fix source (its serde name, as the earlier JSON held it).
pub(super) fn fix_source_str(s: FixSource) -> &'static str {
    match s {
        FixSource::Gnss => "gnss",
        FixSource::Lbs => "lbs",
        FixSource::Wifi => "wifi",
        FixSource::Beacon => "beacon",
    }
}

pub(super) fn fix_source_from_str(s: &str) -> Result<FixSource> {
    match s {
        "gnss" => Ok(FixSource::Gnss),
        "lbs" => Ok(FixSource::Lbs),
        "wifi" => Ok(FixSource::Wifi),
        "beacon" => Ok(FixSource::Beacon),
        other => Err(StoreError::Invalid(format!(
            "stored fix source {other:?} unknown"
        ))),
    }
}

/// `extra` of a record with device events (same key as the earlier `RecordExtra` JSON).
#[derive(Serialize)]
struct EventsOnly<'a> {
    #[serde(skip_serializing_if = "<[DeviceEventKind]>::is_empty")]
    events: &'a [DeviceEventKind],
    #[serde(skip_serializing_if = "Option::is_none")]
    time_status: Option<TimeStatus>,
    #[serde(skip_serializing_if = "<[CellTower]>::is_empty")]
    cells: &'a [CellTower],
    #[serde(skip_serializing_if = "<[WifiAccessPoint]>::is_empty")]
    wifi: &'a [WifiAccessPoint],
}

/// The positions of one batch, one array per column.
struct FixColumns<'a> {
    device_id: Vec<&'a str>,
    device_time: Vec<DateTime<Utc>>,
    seq: Vec<i64>,
    received: Vec<DateTime<Utc>>,
    subject: Vec<Option<i64>>,
    protocol: Vec<&'static str>,
    lat: Vec<Option<f64>>,
    lon: Vec<Option<f64>>,
    accuracy: Vec<Option<f32>>,
    speed: Vec<Option<f32>>,
    valid: Vec<Option<bool>>,
    battery: Vec<Option<i16>>,
    charging: Vec<Option<bool>>,
    beacon: Vec<Option<bool>>,
    events: Vec<Option<String>>,
    course: Vec<Option<f32>>,
    altitude: Vec<Option<f32>>,
    satellites: Vec<Option<i16>>,
    source: Vec<Option<&'static str>>,
    gsm: Vec<Option<i16>>,
}

impl<'a> FixColumns<'a> {
    fn build(records: &'a [StoredRecord]) -> Result<Self> {
        let n = records.len();
        let mut c = FixColumns {
            device_id: Vec::with_capacity(n),
            device_time: Vec::with_capacity(n),
            seq: Vec::with_capacity(n),
            received: Vec::with_capacity(n),
            subject: Vec::with_capacity(n),
            protocol: Vec::with_capacity(n),
            lat: Vec::with_capacity(n),
            lon: Vec::with_capacity(n),
            accuracy: Vec::with_capacity(n),
            speed: Vec::with_capacity(n),
            valid: Vec::with_capacity(n),
            battery: Vec::with_capacity(n),
            charging: Vec::with_capacity(n),
            beacon: Vec::with_capacity(n),
            events: Vec::with_capacity(n),
            course: Vec::with_capacity(n),
            altitude: Vec::with_capacity(n),
            satellites: Vec::with_capacity(n),
            source: Vec::with_capacity(n),
            gsm: Vec::with_capacity(n),
        };
        for sr in records {
            let r = &sr.record;
            validate_record(r)?;
            let p = r.position.as_ref();
            c.device_id.push(&r.device_id);
            c.device_time.push(r.device_time);
            c.seq.push(seq_to_db(r.seq)?);
            c.received.push(r.received_time);
            c.subject.push(sr.subject_id);
            c.protocol.push(r.protocol.as_str());
            c.lat.push(p.map(|p| p.lat));
            c.lon.push(p.map(|p| p.lon));
            c.accuracy.push(p.and_then(|p| p.accuracy_m));
            c.speed.push(p.and_then(|p| p.speed_kmh));
            c.valid.push(p.map(|p| p.valid));
            c.battery.push(r.battery_pct.map(i16::from));
            c.charging.push(r.charging);
            c.beacon.push(r.beacon_in_range);
            c.events.push(extra_json(r)?);
            c.course.push(p.and_then(|p| p.course_deg));
            c.altitude.push(p.and_then(|p| p.altitude_m));
            c.satellites
                .push(p.and_then(|p| p.satellites).map(i16::from));
            c.source.push(p.map(|p| fix_source_str(p.source)));
            c.gsm.push(r.gsm_signal.map(i16::from));
        }
        Ok(c)
    }

    fn bind(&self, sql: &'static str) -> Query<'_, Postgres, PgArguments> {
        sqlx::query(sql)
            .bind(&self.device_id)
            .bind(&self.device_time)
            .bind(&self.seq)
            .bind(&self.received)
            .bind(&self.subject)
            .bind(&self.protocol)
            .bind(&self.lat)
            .bind(&self.lon)
            .bind(&self.accuracy)
            .bind(&self.speed)
            .bind(&self.valid)
            .bind(&self.battery)
            .bind(&self.charging)
            .bind(&self.beacon)
            .bind(&self.events)
            .bind(&self.course)
            .bind(&self.altitude)
            .bind(&self.satellites)
            .bind(&self.source)
            .bind(&self.gsm)
    }
}

/// The batch folded to one `latest_state` row per subject, one array per column.
struct LatestColumns<'a> {
    subject: Vec<i64>,
    device_id: Vec<&'a str>,
    last_contact: Vec<DateTime<Utc>>,
    lat: Vec<Option<f64>>,
    lon: Vec<Option<f64>>,
    accuracy: Vec<Option<f32>>,
    speed: Vec<Option<f32>>,
    valid: Vec<Option<bool>>,
    course: Vec<Option<f32>>,
    altitude: Vec<Option<f32>>,
    satellites: Vec<Option<i16>>,
    source: Vec<Option<&'static str>>,
    position_time: Vec<Option<DateTime<Utc>>>,
    status_time: Vec<Option<DateTime<Utc>>>,
    battery: Vec<Option<i16>>,
    charging: Vec<Option<bool>>,
    beacon: Vec<Option<bool>>,
    strap_ok: Vec<Option<bool>>,
    case_ok: Vec<Option<bool>>,
}

impl<'a> LatestColumns<'a> {
    fn build(deltas: &'a [LatestDelta]) -> Self {
        let p = |d: &LatestDelta| d.position;
        LatestColumns {
            subject: deltas.iter().map(|d| d.subject_id).collect(),
            device_id: deltas.iter().map(|d| d.device_id.as_str()).collect(),
            last_contact: deltas.iter().map(|d| d.last_contact).collect(),
            lat: deltas.iter().map(|d| p(d).map(|p| p.lat)).collect(),
            lon: deltas.iter().map(|d| p(d).map(|p| p.lon)).collect(),
            accuracy: deltas
                .iter()
                .map(|d| p(d).and_then(|p| p.accuracy_m))
                .collect(),
            speed: deltas
                .iter()
                .map(|d| p(d).and_then(|p| p.speed_kmh))
                .collect(),
            valid: deltas.iter().map(|d| p(d).map(|p| p.valid)).collect(),
            course: deltas
                .iter()
                .map(|d| p(d).and_then(|p| p.course_deg))
                .collect(),
            altitude: deltas
                .iter()
                .map(|d| p(d).and_then(|p| p.altitude_m))
                .collect(),
            satellites: deltas
                .iter()
                .map(|d| p(d).and_then(|p| p.satellites).map(i16::from))
                .collect(),
            source: deltas
                .iter()
                .map(|d| p(d).map(|p| fix_source_str(p.source)))
                .collect(),
            position_time: deltas.iter().map(|d| d.position_time).collect(),
            status_time: deltas.iter().map(|d| d.status_time).collect(),
            battery: deltas
                .iter()
                .map(|d| d.battery_pct.map(i16::from))
                .collect(),
            charging: deltas.iter().map(|d| d.charging).collect(),
            beacon: deltas.iter().map(|d| d.beacon_in_range).collect(),
            strap_ok: deltas.iter().map(|d| d.strap_ok).collect(),
            case_ok: deltas.iter().map(|d| d.case_ok).collect(),
        }
    }

    fn bind(&self) -> Query<'_, Postgres, PgArguments> {
        sqlx::query(LATEST_UPSERT)
            .bind(&self.subject)
            .bind(&self.device_id)
            .bind(&self.last_contact)
            .bind(&self.lat)
            .bind(&self.lon)
            .bind(&self.accuracy)
            .bind(&self.speed)
            .bind(&self.valid)
            .bind(&self.course)
            .bind(&self.altitude)
            .bind(&self.satellites)
            .bind(&self.source)
            .bind(&self.position_time)
            .bind(&self.status_time)
            .bind(&self.battery)
            .bind(&self.charging)
            .bind(&self.beacon)
            .bind(&self.strap_ok)
            .bind(&self.case_ok)
    }
}

/// Remembers when a batch last met an already stored record.
#[derive(Debug)]
pub(super) struct DuplicateWindow {
    origin: Instant,
    /// Milliseconds since `origin` until which inserts use `ON CONFLICT`; 0 = never met one.
    until_ms: AtomicU64,
}

impl DuplicateWindow {
    pub(super) fn new() -> Self {
        DuplicateWindow {
            origin: Instant::now(),
            until_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn open(&self) -> bool {
        self.now_ms() < self.until_ms.load(Ordering::Relaxed)
    }

    fn note_duplicate(&self) {
        let until = self
            .now_ms()
            .saturating_add(u64::try_from(DUPLICATE_WINDOW.as_millis()).unwrap_or(u64::MAX));
        self.until_ms.fetch_max(until, Ordering::Relaxed);
    }
}

/// How the positions of a batch go in.
enum PositionsWrite<'a> {
    /// Binary `COPY`: fails with a unique violation when a record is already stored.
    Copy(&'a [u8]),
    /// `INSERT … SELECT FROM UNNEST … ON CONFLICT DO NOTHING`.
    SkipStored(&'a FixColumns<'a>),
}

enum WriteError {
    /// The plain write met an already stored record (the transaction was rolled back).
    Duplicate,
    Store(StoreError),
}

impl From<sqlx::Error> for WriteError {
    fn from(e: sqlx::Error) -> Self {
        WriteError::Store(e.into())
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Writes a batch durably (see the module documentation).
pub(super) async fn insert_records(store: &PgStore, records: &[StoredRecord]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let deltas = fold_latest(records);
    let latest = LatestColumns::build(&deltas);
    let times: Vec<DateTime<Utc>> = records.iter().map(|r| r.record.device_time).collect();
    store.ensure_partitions_for(&times).await;
    if !store.duplicates.open() {
        let copy = encode_copy(records)?;
        let res = write(store, PositionsWrite::Copy(&copy), &latest).await;
        match res {
            Ok(()) => return Ok(()),
            Err(WriteError::Duplicate) => {
                store.duplicates.note_duplicate();
                tracing::debug!(
                    records = records.len(),
                    "batch holds an already stored record; writing it with ON CONFLICT"
                );
            }
            Err(WriteError::Store(e)) => return Err(e),
        }
    }
    let fixes = FixColumns::build(records)?;
    match write(store, PositionsWrite::SkipStored(&fixes), &latest).await {
        Ok(()) => Ok(()),
        Err(WriteError::Store(e)) => Err(e),
        Err(WriteError::Duplicate) => Err(StoreError::Conflict(
            "unique violation despite ON CONFLICT DO NOTHING".into(),
        )),
    }
}

async fn write(
    store: &PgStore,
    positions: PositionsWrite<'_>,
    latest: &LatestColumns<'_>,
) -> Result<(), WriteError> {
    let mut tx = store.pool().begin().await?;
    let (res, may_duplicate) = match positions {
        PositionsWrite::Copy(data) => (copy_in(&mut tx, data).await, true),
        PositionsWrite::SkipStored(fixes) => (
            fixes
                .bind(POSITIONS_INSERT_SKIP_STORED)
                .execute(&mut *tx)
                .await
                .map(|_| ()),
            false,
        ),
    };
    if let Err(e) = res {
        if may_duplicate && is_unique_violation(&e) {
            if let Err(e) = tx.rollback().await {
                tracing::warn!(error = %e, "rollback after a duplicate record failed");
            }
            return Err(WriteError::Duplicate);
        }
        return Err(e.into());
    }
    if !latest.subject.is_empty() {
        latest.bind().execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn copy_in(conn: &mut PgConnection, data: &[u8]) -> Result<(), sqlx::Error> {
    let mut copy = conn.copy_in_raw(POSITIONS_COPY).await?;
    if let Err(e) = copy.send(data).await {
        // The connection is unusable mid-COPY; `abort` ends the COPY before it returns.
        let _ = copy.abort(e.to_string()).await;
        return Err(e);
    }
    copy.finish().await.map(|_| ())
}

/// Adds the [`POSITION_COLUMNS`] missing on this schema's `positions` table. Looks first, so
/// a store starting against an up-to-date table takes no lock on it.
pub(super) async fn ensure_position_columns(conn: &mut PgConnection) -> Result<()> {
    let present: Vec<String> = sqlx::query_scalar(
        "SELECT a.attname::text FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relname = 'positions'
           AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .fetch_all(&mut *conn)
    .await?;
    let missing: Vec<String> = POSITION_COLUMNS
        .iter()
        .filter(|(name, _)| !present.iter().any(|p| p == name))
        .map(|(name, ty)| format!("ADD COLUMN IF NOT EXISTS {name} {ty}"))
        .collect();
    if !missing.is_empty() {
        // Column names and types come from POSITION_COLUMNS (constants), not from input.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE positions {}",
            missing.join(", ")
        )))
        .execute(&mut *conn)
        .await?;
        tracing::info!(columns = missing.len(), "positions columns added");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fix_source_round_trip_matches_serde_names() {
        for s in [
            FixSource::Gnss,
            FixSource::Lbs,
            FixSource::Wifi,
            FixSource::Beacon,
        ] {
            let name = fix_source_str(s);
            assert_eq!(serde_json::to_value(s).ok(), Some(name.into()));
            assert_eq!(fix_source_from_str(name).ok(), Some(s));
        }
        assert!(fix_source_from_str("radar").is_err());
    }

    #[test]
    fn statements_name_every_column() {
        let copy_columns = POSITIONS_COPY
            .split_once('(')
            .and_then(|(_, rest)| rest.split_once(')'))
            .map(|(cols, _)| cols.split(',').map(str::trim).collect::<Vec<_>>())
            .unwrap_or_default();
        assert_eq!(copy_columns.len(), COPY_FIELDS as usize);
        for c in &copy_columns {
            assert!(
                POSITIONS_INSERT_SKIP_STORED.contains(c),
                "{c} not in INSERT"
            );
        }
        for (name, _) in POSITION_COLUMNS {
            assert!(copy_columns.contains(name), "{name} not copied");
            if *name != "gsm_signal" {
                assert!(LATEST_UPSERT.contains(name), "{name} not in latest_state");
            }
        }
    }

    #[test]
    fn copy_timestamps_round_like_bound_parameters() {
        let t = |s: &str| s.parse::<DateTime<Utc>>().ok();
        assert_eq!(
            t("2000-01-01T00:00:00Z")
                .map(pg_micros)
                .and_then(Result::ok),
            Some(0)
        );
        assert_eq!(
            t("2000-01-01T00:00:01.0000019Z")
                .map(pg_micros)
                .and_then(Result::ok),
            Some(1_000_001)
        );
        // Before the epoch, toward zero (as sqlx's Duration::num_microseconds).
        assert_eq!(
            t("1999-12-31T23:59:59.9999991Z")
                .map(pg_micros)
                .and_then(Result::ok),
            Some(0)
        );
    }

    #[test]
    fn copy_stream_layout() {
        let mut r = Record::new("dev-1", Protocol::Em, Utc::now());
        r.events.push(DeviceEventKind::StrapTamper);
        let data = encode_copy(&[StoredRecord {
            subject_id: None,
            record: r,
        }])
        .unwrap_or_default();
        assert!(data.starts_with(b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0"));
        assert_eq!(data.get(19..21), Some(&COPY_FIELDS.to_be_bytes()[..]));
        assert!(data.ends_with(&(-1i16).to_be_bytes()));
        let text = String::from_utf8_lossy(&data);
        assert!(
            text.contains("\u{1}{\"events\":[\"strap_tamper\"]}"),
            "{text:?}"
        );
        let mut bad = Record::new("dev-1", Protocol::Em, Utc::now());
        bad.battery_pct = Some(101);
        assert!(encode_copy(&[StoredRecord {
            subject_id: None,
            record: bad,
        }])
        .is_err());
    }

    #[test]
    fn duplicate_window_opens_after_a_duplicate() {
        let w = DuplicateWindow::new();
        assert!(!w.open());
        w.note_duplicate();
        assert!(w.open());
    }

    fn fix(device: &str, subject: i64, secs: i64, seq: u64) -> StoredRecord {
        let base = "2026-01-10T08:00:00Z"
            .parse::<DateTime<Utc>>()
            .unwrap_or_default();
        let mut r = Record::new(
            device,
            Protocol::Teltonika,
            base + chrono::Duration::seconds(secs),
        );
        r.received_time = r.device_time + chrono::Duration::milliseconds(250);
        r.seq = Some(seq);
        r.gsm_signal = Some(17);
        r.battery_pct = Some(90);
        r.position = Some(Position {
            lat: 55.5 + secs as f64 * 1e-4,
            lon: 12.25,
            accuracy_m: Some(6.5),
            speed_kmh: Some(3.25),
            course_deg: Some(271.5),
            altitude_m: Some(-3.0),
            satellites: Some(9),
            valid: true,
            source: FixSource::Wifi,
        });
        StoredRecord {
            subject_id: Some(subject),
            record: r,
        }
    }

    fn batch() -> Vec<StoredRecord> {
        let mut b = vec![
            fix("dev-a", 1, 0, 1),
            fix("dev-a", 1, 10, 2),
            fix("dev-b", 2, 5, 7),
        ];
        let mut heartbeat = Record::new("dev-b", Protocol::Teltonika, b[2].record.device_time);
        heartbeat.device_time += chrono::Duration::seconds(30);
        heartbeat.events = vec![
            DeviceEventKind::StrapTamper,
            DeviceEventKind::ChargerConnected,
        ];
        b.push(StoredRecord {
            subject_id: Some(2),
            record: heartbeat,
        });
        b.push(StoredRecord {
            subject_id: None,
            record: Record::new("dev-c", Protocol::Em, b[0].record.device_time),
        });
        b
    }

    async fn store() -> Option<PgStore> {
        crate::testing::postgres_pg_store_in_schema(&crate::testing::unique_schema_name()).await
    }

    async fn snapshot(s: &PgStore) -> (Vec<Vec<Record>>, Vec<LatestState>) {
        let mut records = Vec::new();
        for d in ["dev-a", "dev-b", "dev-c"] {
            records.push(s.device_records(d, 100).await.expect("records"));
        }
        (records, s.latest_states(None).await.expect("latest"))
    }

    #[tokio::test]
    async fn fast_and_baseline_rows_read_back_alike() {
        let (Some(fast), Some(base)) = (store().await, store().await) else {
            return;
        };
        let b = batch();
        fast.insert_records(&b).await.expect("fast");
        base.insert_records_baseline(&b).await.expect("baseline");
        let (fast_records, fast_latest) = snapshot(&fast).await;
        assert_eq!(fast_records, snapshot(&base).await.0);
        assert_eq!(fast_latest, snapshot(&base).await.1);
        assert_eq!(fast_records[0].len(), 2);
        assert_eq!(
            fast_records[0],
            b[..2].iter().map(|r| r.record.clone()).collect::<Vec<_>>()
        );
        assert_eq!(fast_latest.len(), 2);
        assert_eq!(fast_latest[1].strap_ok, Some(false));
        assert_eq!(fast_latest[1].charging, Some(true));

        // Mixed formats on one subject: a newer fast-path fix replaces a baseline position
        // (JSON extras), an older baseline fix afterwards does not move it back.
        let newer = fix("dev-a", 1, 60, 3);
        base.insert_records(std::slice::from_ref(&newer))
            .await
            .expect("fast on baseline rows");
        let mut older = fix("dev-a", 1, 30, 4);
        if let Some(p) = older.record.position.as_mut() {
            p.course_deg = Some(5.0);
            p.source = FixSource::Gnss;
        }
        base.insert_records_baseline(std::slice::from_ref(&older))
            .await
            .expect("older baseline");
        let latest = base.latest_states(Some(&[1])).await.expect("latest");
        assert_eq!(latest[0].position, newer.record.position);
        assert_eq!(latest[0].position_time, Some(newer.record.device_time));
        let records = base.device_records("dev-a", 100).await.expect("records");
        assert_eq!(records.len(), 4);
        assert_eq!(
            records,
            [&b[0], &b[1], &older, &newer]
                .iter()
                .map(|r| r.record.clone())
                .collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn stored_records_switch_to_on_conflict_and_back() {
        let Some(s) = store().await else {
            return;
        };
        let first: Vec<StoredRecord> = (0..50).map(|i| fix("dev-d", 4, i, i as u64)).collect();
        s.insert_records(&first).await.expect("first");
        assert!(!s.duplicates.open());
        // Half re-sent, half new, and one record twice within the batch.
        let mut second: Vec<StoredRecord> =
            (25..75).map(|i| fix("dev-d", 4, i, i as u64)).collect();
        second.push(fix("dev-d", 4, 70, 70));
        s.insert_records(&second).await.expect("re-sent");
        assert!(s.duplicates.open());
        assert_eq!(s.count_records("dev-d").await.expect("count"), 75);
        s.insert_records(&second).await.expect("again");
        assert_eq!(s.count_records("dev-d").await.expect("count"), 75);
        let latest = s.latest_states(Some(&[4])).await.expect("latest");
        assert_eq!(
            latest[0].position_time,
            Some(fix("dev-d", 4, 74, 74).record.device_time)
        );
    }
}
