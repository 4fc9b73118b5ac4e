//! The input of the alert engine: a condition starting, continuing or ending.

use chrono::{DateTime, Utc};
use em_model::{AlertKind, DeviceId, SubjectId, ZoneId};
use serde::{Deserialize, Serialize};

/// Where a condition is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The condition began: raise an alert (or fold into the ongoing one).
    Started,
    /// The condition is still there: fold into the ongoing alert (raise one if there is none).
    Ongoing,
    /// The condition ended: record the end on the ongoing alert and resolve it when the kind's
    /// rule says `auto_resolve`.
    Ended,
}

/// A condition starting, continuing or ending — the input of the alert engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    pub kind: AlertKind,
    pub phase: Phase,
    pub subject_id: SubjectId,
    pub device_id: Option<DeviceId>,
    /// Zone the condition concerns (zone, curfew and victim alerts); one alert per zone.
    pub zone_id: Option<ZoneId>,
    /// Time of the evidence (device time).
    pub at: DateTime<Utc>,
    /// Evidence stored with the alert. Keys the message builder uses when present (all optional):
    /// `zone_name` (string), `window` ("19:00–07:00"), `distance_m` (metres outside an
    /// inclusion zone / inside an exclusion zone / from the protected person), `radius_m`
    /// (allowed victim distance), `fix_time` and `last_fix_time` (RFC 3339), `battery_pct`,
    /// `last_contact` (RFC 3339), `silent_secs`, `offset_secs` (device clock minus server clock).
    pub evidence: serde_json::Value,
}

impl Signal {
    /// A signal with empty evidence.
    pub fn new(kind: AlertKind, phase: Phase, subject_id: SubjectId, at: DateTime<Utc>) -> Self {
        Signal {
            kind,
            phase,
            subject_id,
            device_id: None,
            zone_id: None,
            at,
            evidence: serde_json::Value::Null,
        }
    }

    pub fn with_device(mut self, device_id: impl Into<DeviceId>) -> Self {
        self.device_id = Some(device_id.into());
        self
    }

    pub fn with_zone(mut self, zone_id: ZoneId) -> Self {
        self.zone_id = Some(zone_id);
        self
    }

    pub fn with_evidence(mut self, evidence: serde_json::Value) -> Self {
        self.evidence = evidence;
        self
    }
}
