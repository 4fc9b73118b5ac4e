//! Backend-independent pieces: enum ↔ column encodings, the per-subject latest-state fold and
//! input validation. No alert rules: those are `em-alerts`'.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use em_model::*;
use serde::{Deserialize, Serialize};

use crate::{Result, StoreError, StoredRecord};

/// `seq` column value for records whose protocol has no sequence number (keeps the
/// (device_id, device_time, seq) uniqueness meaningful: NULLs would never conflict).
pub(crate) const NO_SEQ: i64 = -1;

pub(crate) fn seq_to_db(seq: Option<u64>) -> Result<i64> {
    match seq {
        None => Ok(NO_SEQ),
        Some(v) => i64::try_from(v).map_err(|_| {
            StoreError::Invalid(format!("sequence number {v} exceeds the storable range"))
        }),
    }
}

pub(crate) fn seq_from_db(seq: i64) -> Option<u64> {
    u64::try_from(seq).ok()
}

pub(crate) fn severity_to_db(s: Severity) -> i16 {
    match s {
        Severity::Low => 0,
        Severity::Medium => 1,
        Severity::High => 2,
        Severity::Critical => 3,
    }
}

pub(crate) fn severity_from_db(v: i64) -> Result<Severity> {
    match v {
        0 => Ok(Severity::Low),
        1 => Ok(Severity::Medium),
        2 => Ok(Severity::High),
        3 => Ok(Severity::Critical),
        _ => Err(StoreError::Invalid(format!(
            "stored severity {v} is not 0..=3"
        ))),
    }
}

pub(crate) fn parse_col<T: std::str::FromStr<Err = String>>(what: &str, v: &str) -> Result<T> {
    v.parse::<T>()
        .map_err(|e| StoreError::Invalid(format!("stored {what}: {e}")))
}

pub(crate) fn small_u8(what: &str, v: Option<i64>) -> Result<Option<u8>> {
    v.map(|v| {
        u8::try_from(v).map_err(|_| StoreError::Invalid(format!("stored {what} {v} out of range")))
    })
    .transpose()
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    v: serde_json::Value,
) -> Result<T> {
    serde_json::from_value(v).map_err(|e| StoreError::Invalid(format!("stored {what}: {e}")))
}

pub(crate) fn to_json<T: Serialize>(what: &str, v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| StoreError::Invalid(format!("cannot encode {what}: {e}")))
}

pub(crate) fn check_limit(limit: i64) -> Result<i64> {
    if limit < 0 {
        Err(StoreError::Invalid(format!(
            "limit must be >= 0, got {limit}"
        )))
    } else {
        Ok(limit)
    }
}

/// Fields of a record that are not hot columns; stored as JSON (`extra`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct RecordExtra {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub course_deg: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub altitude_m: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub satellites: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<FixSource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gsm_signal: Option<u8>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<DeviceEventKind>,
    /// Set only for a record whose device time is not trusted (see [`em_model::TimePolicy`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_status: Option<TimeStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<CellTower>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wifi: Vec<WifiAccessPoint>,
}

/// The time flag a record is stored with: its [`TimeStatus`] when that is `Future` or
/// `FarPast`, nothing for a trusted (or not yet classified) record.
pub(crate) fn stored_time_flag(r: &Record) -> Option<TimeStatus> {
    matches!(r.time_status, TimeStatus::Future | TimeStatus::FarPast).then_some(r.time_status)
}

impl RecordExtra {
    pub fn of(r: &Record) -> Self {
        RecordExtra {
            course_deg: r.position.and_then(|p| p.course_deg),
            altitude_m: r.position.and_then(|p| p.altitude_m),
            satellites: r.position.and_then(|p| p.satellites),
            source: r.position.map(|p| p.source),
            gsm_signal: r.gsm_signal,
            events: r.events.clone(),
            time_status: stored_time_flag(r),
            cells: r.cells.clone(),
            wifi: r.wifi.clone(),
        }
    }
}

/// Validated, column-shaped form of one record, shared by both backends' insert paths.
pub(crate) struct RecordRow {
    pub device_id: String,
    pub device_time: DateTime<Utc>,
    pub seq: i64,
    pub received_time: DateTime<Utc>,
    pub subject_id: Option<i64>,
    pub protocol: &'static str,
    pub lat: Option<f64>,
    pub lon: Option<f64>,
    pub accuracy_m: Option<f32>,
    pub speed_kmh: Option<f32>,
    pub valid: Option<bool>,
    pub battery_pct: Option<i16>,
    pub charging: Option<bool>,
    pub beacon_in_range: Option<bool>,
    pub extra: String,
}

impl RecordRow {
    /// The rows of a batch, every record validated.
    pub fn all(records: &[StoredRecord]) -> Result<Vec<Self>> {
        records.iter().map(RecordRow::from_stored).collect()
    }

    pub fn from_stored(sr: &StoredRecord) -> Result<Self> {
        let r = &sr.record;
        validate_record(r)?;
        let extra = serde_json::to_string(&RecordExtra::of(r))
            .map_err(|e| StoreError::Invalid(format!("cannot encode record extras: {e}")))?;
        Ok(RecordRow {
            device_id: r.device_id.clone(),
            device_time: r.device_time,
            seq: seq_to_db(r.seq)?,
            received_time: r.received_time,
            subject_id: sr.subject_id,
            protocol: r.protocol.as_str(),
            lat: r.position.map(|p| p.lat),
            lon: r.position.map(|p| p.lon),
            accuracy_m: r.position.and_then(|p| p.accuracy_m),
            speed_kmh: r.position.and_then(|p| p.speed_kmh),
            valid: r.position.map(|p| p.valid),
            battery_pct: r.battery_pct.map(i16::from),
            charging: r.charging,
            beacon_in_range: r.beacon_in_range,
            extra,
        })
    }
}

/// Rebuilds a [`Record`] from its stored columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_from_parts(
    device_id: String,
    protocol: &str,
    device_time: DateTime<Utc>,
    received_time: DateTime<Utc>,
    seq: i64,
    lat: Option<f64>,
    lon: Option<f64>,
    accuracy_m: Option<f32>,
    speed_kmh: Option<f32>,
    valid: Option<bool>,
    battery_pct: Option<i64>,
    charging: Option<bool>,
    beacon_in_range: Option<bool>,
    extra: serde_json::Value,
) -> Result<Record> {
    let extra: RecordExtra = from_json("record extras", extra)?;
    let position = match (lat, lon) {
        (Some(lat), Some(lon)) => Some(Position {
            lat,
            lon,
            accuracy_m,
            speed_kmh,
            course_deg: extra.course_deg,
            altitude_m: extra.altitude_m,
            satellites: extra.satellites,
            valid: valid.unwrap_or(false),
            source: extra.source.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(Record {
        device_id,
        protocol: parse_col("protocol", protocol)?,
        device_time,
        received_time,
        seq: seq_from_db(seq),
        position,
        battery_pct: small_u8("battery", battery_pct)?,
        charging,
        gsm_signal: extra.gsm_signal,
        beacon_in_range,
        events: extra.events,
        time_status: extra.time_status.unwrap_or_default(),
        cells: extra.cells,
        wifi: extra.wifi,
    })
}

/// A stored record with a position as a trail point (the record must have a position).
pub(crate) fn trail_point(rec: Record) -> Result<crate::TrailPoint> {
    let position = rec
        .position
        .ok_or_else(|| StoreError::Invalid("trail row without position".into()))?;
    Ok(crate::TrailPoint {
        device_id: rec.device_id,
        device_time: rec.device_time,
        received_time: rec.received_time,
        position,
        battery_pct: rec.battery_pct,
    })
}

/// What one batch contributes to a subject's latest state (folded in device-time order).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LatestDelta {
    pub subject_id: SubjectId,
    pub device_id: DeviceId,
    pub last_contact: DateTime<Utc>,
    pub position: Option<Position>,
    pub position_time: Option<DateTime<Utc>>,
    /// Device time of the newest record that reported any status field.
    pub status_time: Option<DateTime<Utc>>,
    pub battery_pct: Option<u8>,
    pub charging: Option<bool>,
    pub beacon_in_range: Option<bool>,
    pub strap_ok: Option<bool>,
    pub case_ok: Option<bool>,
}

/// Folds a batch into one delta per subject. Records without subject are not part of any
/// subject's state. A record whose device time is not trusted ([`Record::time_trusted`])
/// counts as contact (server time) but moves no position or status: one record dated 2099
/// must not freeze the subject's latest position.
pub(crate) fn fold_latest(records: &[StoredRecord]) -> Vec<LatestDelta> {
    let mut sorted: Vec<&StoredRecord> =
        records.iter().filter(|r| r.subject_id.is_some()).collect();
    sorted.sort_by_key(|r| (r.record.device_time, r.record.seq));
    let mut by_subject: BTreeMap<SubjectId, LatestDelta> = BTreeMap::new();
    for sr in sorted {
        let Some(subject_id) = sr.subject_id else {
            continue;
        };
        let r = &sr.record;
        let d = by_subject.entry(subject_id).or_insert_with(|| LatestDelta {
            subject_id,
            device_id: r.device_id.clone(),
            last_contact: r.received_time,
            position: None,
            position_time: None,
            status_time: None,
            battery_pct: None,
            charging: None,
            beacon_in_range: None,
            strap_ok: None,
            case_ok: None,
        });
        d.device_id = r.device_id.clone();
        d.last_contact = d.last_contact.max(r.received_time);
        if !r.time_trusted() {
            continue;
        }
        if let Some(p) = r.position {
            d.position = Some(p);
            d.position_time = Some(r.device_time);
        }
        let mut status = false;
        if let Some(b) = r.battery_pct {
            d.battery_pct = Some(b);
            status = true;
        }
        if let Some(c) = r.charging {
            d.charging = Some(c);
            status = true;
        }
        if let Some(b) = r.beacon_in_range {
            d.beacon_in_range = Some(b);
            status = true;
        }
        for e in &r.events {
            let (strap, case) = match e {
                DeviceEventKind::StrapTamper => (Some(false), None),
                DeviceEventKind::StrapRestored => (Some(true), None),
                DeviceEventKind::CaseTamper => (None, Some(false)),
                DeviceEventKind::CaseRestored => (None, Some(true)),
                DeviceEventKind::ChargerConnected => {
                    d.charging = Some(true);
                    status = true;
                    (None, None)
                }
                DeviceEventKind::ChargerDisconnected => {
                    d.charging = Some(false);
                    status = true;
                    (None, None)
                }
                DeviceEventKind::BeaconInRange => {
                    d.beacon_in_range = Some(true);
                    status = true;
                    (None, None)
                }
                DeviceEventKind::BeaconOutOfRange => {
                    d.beacon_in_range = Some(false);
                    status = true;
                    (None, None)
                }
                _ => (None, None),
            };
            if strap.is_some() {
                d.strap_ok = strap;
                status = true;
            }
            if case.is_some() {
                d.case_ok = case;
                status = true;
            }
        }
        if status {
            d.status_time = Some(r.device_time);
        }
    }
    by_subject.into_values().collect()
}

/// Maps unique-constraint violations to [`StoreError::Conflict`].
pub(crate) fn map_unique(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match e.as_database_error() {
        Some(db) if db.is_unique_violation() => StoreError::Conflict(what()),
        _ => StoreError::Db(e),
    }
}

/// Rejects zone specs that cannot be evaluated.
pub(crate) fn validate_zone(z: &ZoneSpec) -> Result<()> {
    if z.name.trim().is_empty() {
        return Err(StoreError::Invalid("zone name must not be empty".into()));
    }
    let has_group = matches!(z.group.as_deref(), Some(g) if !g.trim().is_empty());
    if z.subject_id.is_none() && !has_group {
        return Err(StoreError::Invalid(format!(
            "zone {:?} has neither a subject nor a group",
            z.name
        )));
    }
    Ok(())
}

pub(crate) fn zone_kind_str(k: ZoneKind) -> &'static str {
    match k {
        ZoneKind::Inclusion => "inclusion",
        ZoneKind::Exclusion => "exclusion",
    }
}

pub(crate) fn outbox_status_str(s: crate::OutboxStatus) -> &'static str {
    match s {
        crate::OutboxStatus::Pending => "pending",
        crate::OutboxStatus::Delivered => "delivered",
        crate::OutboxStatus::DeadLetter => "dead_letter",
    }
}

pub(crate) fn outbox_status_from_str(s: &str) -> Result<crate::OutboxStatus> {
    match s {
        "pending" => Ok(crate::OutboxStatus::Pending),
        "delivered" => Ok(crate::OutboxStatus::Delivered),
        "dead_letter" => Ok(crate::OutboxStatus::DeadLetter),
        other => Err(StoreError::Invalid(format!(
            "stored outbox status {other:?}"
        ))),
    }
}

/// Rejects what the database must never hold; both backends and both PostgreSQL write paths
/// call it, so the rules are the same everywhere.
pub(crate) fn validate_record(r: &Record) -> Result<()> {
    if r.device_id.is_empty() {
        return Err(StoreError::Invalid("record without device id".into()));
    }
    if let Some(p) = &r.position {
        if !(p.lat.is_finite() && (-90.0..=90.0).contains(&p.lat)) {
            return Err(StoreError::Invalid(format!(
                "device {}: latitude {} out of range",
                r.device_id, p.lat
            )));
        }
        if !(p.lon.is_finite() && (-180.0..=180.0).contains(&p.lon)) {
            return Err(StoreError::Invalid(format!(
                "device {}: longitude {} out of range",
                r.device_id, p.lon
            )));
        }
    }
    if let Some(b) = r.battery_pct {
        if b > 100 {
            return Err(StoreError::Invalid(format!(
                "device {}: battery {b}% above 100",
                r.device_id
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .expect("valid time")
    }

    #[test]
    fn fold_latest_takes_newest_per_field() {
        let mut a = Record::new("d1", Protocol::Em, t(10));
        a.battery_pct = Some(50);
        a.position = Some(Position {
            lat: 1.0,
            lon: 2.0,
            accuracy_m: None,
            speed_kmh: None,
            course_deg: None,
            altitude_m: None,
            satellites: None,
            valid: true,
            source: FixSource::Gnss,
        });
        let mut b = Record::new("d1", Protocol::Em, t(5));
        b.battery_pct = Some(80);
        b.events = vec![DeviceEventKind::StrapTamper];
        let recs = vec![
            StoredRecord {
                subject_id: Some(1),
                record: a,
            },
            StoredRecord {
                subject_id: Some(1),
                record: b,
            },
            StoredRecord {
                subject_id: None,
                record: Record::new("d9", Protocol::Em, t(1)),
            },
        ];
        let d = fold_latest(&recs);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].battery_pct, Some(50));
        assert_eq!(d[0].strap_ok, Some(false));
        assert_eq!(d[0].position_time, Some(t(10)));
        assert_eq!(d[0].status_time, Some(t(10)));
        assert_eq!(d[0].last_contact, t(10));
    }

    #[test]
    fn seq_encoding() {
        assert_eq!(seq_to_db(None).expect("none"), NO_SEQ);
        assert_eq!(seq_from_db(NO_SEQ), None);
        assert_eq!(seq_from_db(seq_to_db(Some(42)).expect("42")), Some(42));
        assert!(seq_to_db(Some(u64::MAX)).is_err());
        for s in [
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ] {
            assert_eq!(severity_from_db(severity_to_db(s).into()).expect("sev"), s);
        }
        assert!(severity_from_db(9).is_err());
    }
}
