//! Row → model conversions, written once for both backends.
//!
//! A row is read through [`DbRow`], which hides the two ways the dialects store time and JSON
//! (PostgreSQL `timestamptz` / `jsonb`; SQLite INTEGER microseconds / TEXT). Each dialect
//! implements it for its row type in `crate::dialect`.

use chrono::{DateTime, Utc};
use em_model::*;
use sqlx::{Decode, Postgres, Sqlite, Type};

use crate::common::*;
use crate::{ChangeEntry, LatestState, OutboxMessage, Result};

/// A column type both drivers decode the same way (text, integers, floats, booleans and their
/// `Option`s).
pub(crate) trait Col:
    for<'r> Decode<'r, Postgres> + Type<Postgres> + for<'r> Decode<'r, Sqlite> + Type<Sqlite>
{
}

impl<T> Col for T where
    T: for<'r> Decode<'r, Postgres> + Type<Postgres> + for<'r> Decode<'r, Sqlite> + Type<Sqlite>
{
}

/// Reads columns of a row by name, time and JSON in the dialect's stored form.
pub(crate) trait DbRow {
    fn col<T: Col>(&self, name: &str) -> Result<T>;
    fn ts(&self, name: &str) -> Result<DateTime<Utc>>;
    fn opt_ts(&self, name: &str) -> Result<Option<DateTime<Utc>>>;
    fn json(&self, name: &str) -> Result<serde_json::Value>;
    fn opt_json(&self, name: &str) -> Result<Option<serde_json::Value>>;

    /// A text column parsed into an enum of the model.
    fn parsed<T: std::str::FromStr<Err = String>>(&self, what: &str, name: &str) -> Result<T> {
        parse_col(what, &self.col::<String>(name)?)
    }
}

pub(crate) fn device(r: &impl DbRow) -> Result<Device> {
    Ok(Device {
        device_id: r.col("device_id")?,
        protocol: r.parsed("protocol", "protocol")?,
        secret: r.col("secret")?,
        active: r.col("active")?,
        class: r.parsed("device class", "class")?,
    })
}

pub(crate) fn assignment(r: &impl DbRow) -> Result<Assignment> {
    Ok(Assignment {
        device_id: r.col("device_id")?,
        subject_id: r.col("subject_id")?,
        from: r.ts("valid_from")?,
        to: r.opt_ts("valid_to")?,
    })
}

pub(crate) fn subject(r: &impl DbRow) -> Result<Subject> {
    Ok(Subject {
        id: r.col("id")?,
        reference: r.col("reference")?,
        display_name: r.col("display_name")?,
        officer_id: r.col("officer_id")?,
        timezone: r.col("timezone")?,
        order_start: r.opt_ts("order_start")?,
        order_end: r.opt_ts("order_end")?,
        rules: from_json("breach rules", r.json("rules")?)?,
    })
}

pub(crate) fn zone(r: &impl DbRow) -> Result<ZoneSpec> {
    let kind: String = r.col("kind")?;
    Ok(ZoneSpec {
        id: r.col("id")?,
        subject_id: r.col("subject_id")?,
        group: r.col("group_name")?,
        name: r.col("name")?,
        kind: from_json("zone kind", serde_json::Value::String(kind))?,
        geometry: from_json("zone geometry", r.json("geometry")?)?,
        schedule: r
            .opt_json("schedule")?
            .map(|v| from_json("zone schedule", v))
            .transpose()?,
        is_curfew_home: r.col("is_curfew_home")?,
    })
}

pub(crate) fn user(r: &impl DbRow) -> Result<User> {
    Ok(User {
        id: r.col("id")?,
        username: r.col("username")?,
        display_name: r.col("display_name")?,
        role: r.parsed("role", "role")?,
        password_hash: r.col("password_hash")?,
        active: r.col("active")?,
    })
}

/// An alert row with its version.
pub(crate) fn versioned_alert(r: &impl DbRow) -> Result<crate::VersionedAlert> {
    let alert = Alert {
        id: r.col("id")?,
        subject_id: r.col("subject_id")?,
        device_id: r.col("device_id")?,
        kind: r.parsed("alert kind", "kind")?,
        severity: severity_from_db(r.col::<i16>("severity")?.into())?,
        state: r.parsed("alert state", "state")?,
        zone_id: r.col("zone_id")?,
        message: r.col("message")?,
        started_at: r.ts("started_at")?,
        created_at: r.ts("created_at")?,
        last_seen_at: r.ts("last_seen_at")?,
        ended_at: r.opt_ts("ended_at")?,
        escalated: r.col("escalated")?,
        acknowledged_by: r.col("acknowledged_by")?,
        acknowledged_at: r.opt_ts("acknowledged_at")?,
        resolved_by: r.col("resolved_by")?,
        resolved_at: r.opt_ts("resolved_at")?,
        resolution_code: r.col("resolution_code")?,
        resolution_note: r.col("resolution_note")?,
        evidence: r.json("evidence")?,
        occurrences: r.col("occurrences")?,
    };
    Ok(crate::VersionedAlert {
        alert,
        version: r.col("version")?,
    })
}

pub(crate) fn alert(r: &impl DbRow) -> Result<Alert> {
    versioned_alert(r).map(|v| v.alert)
}

pub(crate) fn outbox(r: &impl DbRow) -> Result<OutboxMessage> {
    Ok(OutboxMessage {
        id: r.col("id")?,
        channel: r.col("channel")?,
        ordering_key: r.col("ordering_key")?,
        idempotency_key: r.col("idempotency_key")?,
        payload: r.json("payload")?,
        attempts: r.col("attempts")?,
        next_attempt_at: r.ts("next_attempt_at")?,
        last_error: r.col("last_error")?,
        created_at: r.ts("created_at")?,
    })
}

pub(crate) fn audit(r: &impl DbRow) -> Result<AuditEntry> {
    Ok(AuditEntry {
        id: r.col("id")?,
        at: r.ts("at")?,
        actor_id: r.col("actor_id")?,
        actor: r.col("actor")?,
        action: r.col("action")?,
        target_type: r.col("target_type")?,
        target_id: r.col("target_id")?,
        subject_id: r.col("subject_id")?,
        details: r.json("details")?,
    })
}

pub(crate) fn change_entry(r: &impl DbRow) -> Result<ChangeEntry> {
    Ok(ChangeEntry {
        id: r.col("id")?,
        at: r.ts("at")?,
        change: from_json("change", r.json("payload")?)?,
    })
}

/// A record from the columns `positions` and `victim_positions` share (the PostgreSQL backend
/// adds the columns of its fast write path on top, see `postgres::positions_record`).
pub(crate) fn record(r: &impl DbRow) -> Result<Record> {
    record_from_parts(
        r.col("device_id")?,
        &r.col::<String>("protocol")?,
        r.ts("device_time")?,
        r.ts("received_time")?,
        r.col("seq")?,
        r.col("lat")?,
        r.col("lon")?,
        r.col("accuracy_m")?,
        r.col("speed_kmh")?,
        r.col("valid")?,
        r.col::<Option<i16>>("battery_pct")?.map(i64::from),
        r.col("charging")?,
        r.col("beacon_in_range")?,
        r.json("extra")?,
    )
}

/// A `latest_state` row (position extras from the `position_extra` JSON).
pub(crate) fn latest_state(r: &impl DbRow) -> Result<LatestState> {
    let lat: Option<f64> = r.col("lat")?;
    let lon: Option<f64> = r.col("lon")?;
    let position = match (lat, lon) {
        (Some(lat), Some(lon)) => {
            let extra: RecordExtra = match r.opt_json("position_extra")? {
                Some(v) => from_json("position extras", v)?,
                None => RecordExtra::default(),
            };
            Some(Position {
                lat,
                lon,
                accuracy_m: r.col("accuracy_m")?,
                speed_kmh: r.col("speed_kmh")?,
                course_deg: extra.course_deg,
                altitude_m: extra.altitude_m,
                satellites: extra.satellites,
                valid: r.col::<Option<bool>>("valid")?.unwrap_or(false),
                source: extra.source.unwrap_or_default(),
            })
        }
        _ => None,
    };
    Ok(LatestState {
        subject_id: r.col("subject_id")?,
        device_id: r.col("device_id")?,
        last_contact: r.ts("last_contact")?,
        position,
        position_time: r.opt_ts("position_time")?,
        battery_pct: small_u8(
            "battery",
            r.col::<Option<i16>>("battery_pct")?.map(i64::from),
        )?,
        charging: r.col("charging")?,
        beacon_in_range: r.col("beacon_in_range")?,
        strap_ok: r.col("strap_ok")?,
        case_ok: r.col("case_ok")?,
    })
}
