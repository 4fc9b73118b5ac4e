//! `em-model` owns the domain vocabulary shared by every crate of the EM platform:
//! the normalised device [`Record`] that all protocol decoders produce, the persisted
//! specifications of subjects, zones and curfew schedules, and the alert types.
//! It has no I/O and no heavy dependencies; every other crate depends on it, never the
//! other way round.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub mod change;
pub use change::{Change, ChangeEntry, ChangeId};

/// Device identifier as the device reports it (IMEI for GT06/Teltonika/H02, vendor id for EM).
pub type DeviceId = String;
/// Database id of a supervised person.
pub type SubjectId = i64;
/// Database id of a zone.
pub type ZoneId = i64;
/// Database id of a dashboard user (officer, supervisor, admin).
pub type UserId = i64;
/// Database id of an alert.
pub type AlertId = i64;

/// Wire protocol a record arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Gt06,
    Teltonika,
    H02,
    Osmand,
    Em,
}

impl Protocol {
    pub const ALL: [Protocol; 5] = [
        Protocol::Gt06,
        Protocol::Teltonika,
        Protocol::H02,
        Protocol::Osmand,
        Protocol::Em,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Gt06 => "gt06",
            Protocol::Teltonika => "teltonika",
            Protocol::H02 => "h02",
            Protocol::Osmand => "osmand",
            Protocol::Em => "em",
        }
    }

    /// True when the protocol can carry a per-device secret (OsmAnd token, EM/MQTT password),
    /// so a device registered for it must have one and present it. GT06, Teltonika and H02
    /// cannot: their only identity is the IMEI (private APN/VPN, listener allow lists).
    pub fn carries_secret(self) -> bool {
        match self {
            Protocol::Osmand | Protocol::Em => true,
            Protocol::Gt06 | Protocol::Teltonika | Protocol::H02 => false,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown protocol {s:?} (expected gt06, teltonika, h02, osmand or em)")
            })
    }
}

/// Where a position came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FixSource {
    #[default]
    Gnss,
    /// Cell-tower (LBS) estimate: coarse, accuracy usually hundreds of metres.
    Lbs,
    Wifi,
    /// Position of a fixed RF beacon / home unit the tag is in range of.
    Beacon,
}

/// One position estimate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Position {
    /// WGS84 latitude, degrees, -90..=90.
    pub lat: f64,
    /// WGS84 longitude, degrees, -180..=180.
    pub lon: f64,
    /// Horizontal accuracy radius in metres (from HDOP × a UERE factor when only HDOP is known).
    pub accuracy_m: Option<f32>,
    pub speed_kmh: Option<f32>,
    /// Course over ground, degrees from true north.
    pub course_deg: Option<f32>,
    pub altitude_m: Option<f32>,
    pub satellites: Option<u8>,
    /// False when the device says the fix is not valid (no GNSS lock; last known position).
    pub valid: bool,
    pub source: FixSource,
}

/// A discrete thing a device reports, beyond its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceEventKind {
    StrapTamper,
    StrapRestored,
    CaseTamper,
    CaseRestored,
    LowBattery,
    BatteryDead,
    ChargerConnected,
    ChargerDisconnected,
    /// External power removed (vehicle/home unit) — GT06 "power cut".
    PowerCut,
    Sos,
    /// Vibration / shock sensor.
    Vibration,
    /// Device itself reports GNSS jamming.
    GpsJamming,
    /// Tag entered range of its home unit / beacon.
    BeaconInRange,
    /// Tag left range of its home unit / beacon.
    BeaconOutOfRange,
    /// Device-side geofence alarm (informational; the server evaluates its own zones).
    DeviceGeofence,
    Heartbeat,
    Login,
    /// An alarm the device sent whose code the protocol's alarm table does not know (or knows
    /// only as "reserved"): raised as "unknown alarm (code)", never dropped and never read as
    /// another alarm. `code` is the protocol's own alarm code as its decoder documents it
    /// (GT06: the alarm byte, or `0x100 | bits` for the terminal-information alarm bits).
    UnknownAlarm {
        code: u32,
    },
}

/// The normalised record every decoder produces: one device report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub device_id: DeviceId,
    pub protocol: Protocol,
    /// Time the device says the observation was made (UTC).
    pub device_time: DateTime<Utc>,
    /// Time the server received it (set by the listener; decoders set it to the time passed in).
    pub received_time: DateTime<Utc>,
    /// Device-side sequence / serial number when the protocol has one.
    pub seq: Option<u64>,
    pub position: Option<Position>,
    /// Battery level 0..=100 %.
    pub battery_pct: Option<u8>,
    pub charging: Option<bool>,
    /// GSM signal strength 0..=100 % (protocol scales normalised).
    pub gsm_signal: Option<u8>,
    /// Whether the tag is in RF range of its home unit (None = not reported).
    pub beacon_in_range: Option<bool>,
    pub events: Vec<DeviceEventKind>,
    /// How far the device time can be trusted, set by ingest from its [`TimePolicy`] before the
    /// record is stored ([`TimeStatus::Unchecked`] until then; see [`Record::time_status`]).
    #[serde(default, skip_serializing_if = "TimeStatus::is_unchecked")]
    pub time_status: TimeStatus,
    /// Mobile-network cells the device reported with this record (serving cell first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cells: Vec<CellTower>,
    /// Wi-Fi access points the device reported with this record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub wifi: Vec<WifiAccessPoint>,
}

/// One mobile-network cell as a device reports it (for cell-based positioning later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CellTower {
    pub mcc: u16,
    pub mnc: u16,
    /// Location / tracking area code.
    pub lac: u32,
    pub cell_id: u64,
    /// Signal as the device reports it: dBm when negative, otherwise the protocol's own scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

/// One Wi-Fi access point as a device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WifiAccessPoint {
    /// MAC address, lower-case `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal_dbm: Option<i32>,
}

impl Record {
    /// The record's time status: the one ingest set, or for a record that never went through
    /// ingest the verdict of [`TimePolicy::DEFAULT`].
    pub fn time_status(&self) -> TimeStatus {
        match self.time_status {
            TimeStatus::Unchecked => {
                TimePolicy::DEFAULT.classify(self.device_time, self.received_time)
            }
            s => s,
        }
    }

    /// Whether the device time may move state (monitors, dynamic zones, latest state, alert
    /// times): see [`TimePolicy`].
    pub fn time_trusted(&self) -> bool {
        self.time_status() == TimeStatus::Trusted
    }

    /// An empty record for `device_id` at `time`, to be filled in by a decoder.
    pub fn new(device_id: impl Into<DeviceId>, protocol: Protocol, time: DateTime<Utc>) -> Self {
        Record {
            device_id: device_id.into(),
            protocol,
            device_time: time,
            received_time: time,
            seq: None,
            position: None,
            battery_pct: None,
            charging: None,
            gsm_signal: None,
            beacon_in_range: None,
            events: Vec::new(),
            time_status: TimeStatus::Unchecked,
            cells: Vec::new(),
            wifi: Vec::new(),
        }
    }
}

// ---------------------------------------------------------------------------
// Device time
// ---------------------------------------------------------------------------

/// Where a record's device time stands against the server's receive time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeStatus {
    /// Not classified yet (a decoder's output before ingest saw it).
    #[default]
    Unchecked,
    /// Within the policy's bounds: the device time orders state changes.
    Trusted,
    /// Device time more than [`TimePolicy::max_future_secs`] after the receive time.
    Future,
    /// Device time more than [`TimePolicy::max_past_secs`] before the receive time.
    FarPast,
}

impl TimeStatus {
    pub fn is_unchecked(&self) -> bool {
        *self == TimeStatus::Unchecked
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TimeStatus::Unchecked => "unchecked",
            TimeStatus::Trusted => "trusted",
            TimeStatus::Future => "future",
            TimeStatus::FarPast => "far_past",
        }
    }
}

/// The one rule for device time, used everywhere a device time enters state.
///
/// A device clock can be years off (GPS week roll-over, a reset RTC, a forged frame). A record
/// whose device time lies outside `[received - max_past, received + max_future]` is still
/// stored, flagged with its [`TimeStatus`], but never moves a subject monitor, a dynamic
/// (victim) zone, the latest state, or an alert's start or end time. Within the bounds the
/// device time orders events (buffered uploads are placed where they happened); the receive
/// time is the judge of the bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimePolicy {
    /// A device time this far after the receive time is trusted, seconds (clock drift,
    /// network delay). Beyond it: [`TimeStatus::Future`].
    pub max_future_secs: i64,
    /// A device time this far before the receive time is trusted, seconds (buffered uploads
    /// after a coverage gap). Beyond it: [`TimeStatus::FarPast`].
    pub max_past_secs: i64,
}

impl TimePolicy {
    /// 5 minutes ahead, 7 days behind.
    pub const DEFAULT: TimePolicy = TimePolicy {
        max_future_secs: 300,
        max_past_secs: 7 * 24 * 3600,
    };

    pub fn classify(&self, device_time: DateTime<Utc>, received_time: DateTime<Utc>) -> TimeStatus {
        let ahead = device_time
            .signed_duration_since(received_time)
            .num_seconds();
        if ahead > self.max_future_secs {
            TimeStatus::Future
        } else if ahead < -self.max_past_secs {
            TimeStatus::FarPast
        } else {
            TimeStatus::Trusted
        }
    }
}

impl Default for TimePolicy {
    fn default() -> Self {
        TimePolicy::DEFAULT
    }
}

// ---------------------------------------------------------------------------
// Orders: subjects, zones, schedules (persisted specs; the geofence crate compiles them)
// ---------------------------------------------------------------------------

/// Inclusion: must be inside while active. Exclusion: must stay out while active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZoneKind {
    Inclusion,
    Exclusion,
}

/// A point as `[lon, lat]` (GeoJSON order).
pub type LonLat = [f64; 2];

/// Zone geometry in WGS84, GeoJSON-like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ZoneGeometry {
    /// First ring is the exterior, further rings are holes. Rings need not repeat the first point.
    Polygon {
        rings: Vec<Vec<LonLat>>,
    },
    MultiPolygon {
        polygons: Vec<Vec<Vec<LonLat>>>,
    },
    Circle {
        center: LonLat,
        radius_m: f64,
    },
    /// A circle around another device's latest position (victim protection).
    Dynamic {
        device_id: DeviceId,
        radius_m: f64,
    },
}

/// Day of week, ISO numbering (Monday = 1 .. Sunday = 7).
pub type IsoWeekday = u8;

/// A weekly window in the subject's local time. `end <= start` means it crosses midnight
/// and ends on the next day. Times are "HH:MM".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeeklyWindow {
    pub day: IsoWeekday,
    pub start: String,
    pub end: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExceptionKind {
    /// Approved absence: the zone is not enforced in this interval.
    Absence,
    /// Extra curfew: the zone is enforced in this interval even outside weekly windows.
    ExtraCurfew,
}

/// One-off exception, as absolute instants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleException {
    pub kind: ExceptionKind,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
    #[serde(default)]
    pub note: Option<String>,
}

/// When a zone is enforced. A zone without schedule is always active (within the order dates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ScheduleSpec {
    #[serde(default)]
    pub windows: Vec<WeeklyWindow>,
    #[serde(default)]
    pub exceptions: Vec<ScheduleException>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneSpec {
    pub id: ZoneId,
    /// Owning subject; `None` for a group zone listed in `group`.
    pub subject_id: Option<SubjectId>,
    /// Group name for zones shared by many subjects (e.g. "school-exclusions").
    #[serde(default)]
    pub group: Option<String>,
    pub name: String,
    pub kind: ZoneKind,
    pub geometry: ZoneGeometry,
    /// None = always active.
    #[serde(default)]
    pub schedule: Option<ScheduleSpec>,
    /// True for the home zone used for curfew (RF home-unit presence counts as inside).
    #[serde(default)]
    pub is_curfew_home: bool,
}

/// Hysteresis and evidence rules of an order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BreachRules {
    /// Extra margin beyond the fix's own accuracy before a fix counts as outside/inside.
    pub buffer_m: f64,
    /// Consecutive fixes needed to start or end a breach.
    pub consecutive_fixes: u32,
    /// Or: seconds the condition must persist to start or end a breach.
    pub persist_secs: u32,
    /// During an active inclusion window, no fix (and no beacon evidence) for this long is "no fix".
    pub no_fix_secs: u32,
}

impl Default for BreachRules {
    fn default() -> Self {
        BreachRules {
            buffer_m: 25.0,
            consecutive_fixes: 3,
            persist_secs: 60,
            no_fix_secs: 900,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subject {
    pub id: SubjectId,
    /// Reference in the OMS (case number).
    pub reference: String,
    pub display_name: String,
    /// Responsible officer (caseload).
    pub officer_id: Option<UserId>,
    /// IANA time zone, e.g. "Europe/Copenhagen".
    pub timezone: String,
    pub order_start: Option<DateTime<Utc>>,
    pub order_end: Option<DateTime<Utc>>,
    pub rules: BreachRules,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Device {
    pub device_id: DeviceId,
    pub protocol: Protocol,
    /// Shared secret for protocols that authenticate (EM/MQTT password, OsmAnd token); None = IMEI allow-list only.
    /// Written as plaintext or already hashed; the store keeps only its hash (`sha256$<hex>`,
    /// see `em_store::device_secret`), so a device read back carries the hash, never the secret.
    pub secret: Option<String>,
    pub active: bool,
    /// Whose device it is: an offender's tag (the default) or a protected person's device.
    #[serde(default)]
    pub class: DeviceClass,
}

/// Whose device it is. Victim data is its own class: the records of a
/// [`DeviceClass::Victim`] device are stored apart from offender data (never in positions,
/// latest state, trails, maps, reports or exports), are shown only to supervisors and victim
/// liaison officers, and reach alerts only as distance and bearing.
///
/// Set by an admin or a supervisor; a device referenced by a dynamic zone
/// ([`ZoneGeometry::Dynamic`]) is made a victim device when the zone is saved through the
/// dashboard (and by the store migration for zones that existed before). A victim device is
/// never assigned to a subject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeviceClass {
    /// A tag worn by a supervised person (its data is the subject's).
    #[default]
    OffenderTag,
    /// A protected person's device (defines dynamic exclusion zones).
    Victim,
}

impl DeviceClass {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceClass::OffenderTag => "offender_tag",
            DeviceClass::Victim => "victim",
        }
    }
}

impl std::str::FromStr for DeviceClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "offender_tag" => Ok(DeviceClass::OffenderTag),
            "victim" => Ok(DeviceClass::Victim),
            _ => Err(format!(
                "unknown device class {s:?} (expected offender_tag or victim)"
            )),
        }
    }
}

/// A device ↔ subject assignment; history is kept so a tag moved to another person does not mix data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub device_id: DeviceId,
    pub subject_id: SubjectId,
    pub from: DateTime<Utc>,
    pub to: Option<DateTime<Utc>>,
}

// ---------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Low,
    Medium,
    High,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    InclusionZoneExit,
    ExclusionZoneEntry,
    VictimProximity,
    CurfewViolation,
    NoFixDuringCurfew,
    StrapTamper,
    CaseTamper,
    LowBattery,
    BatteryDead,
    ChargerNotConnected,
    LostCommunication,
    GpsJammingSuspected,
    DeviceClockWrong,
    /// The tag sent an alarm whose code is not in its protocol's alarm table.
    UnknownAlarm,
}

impl AlertKind {
    pub const ALL: [AlertKind; 14] = [
        AlertKind::InclusionZoneExit,
        AlertKind::ExclusionZoneEntry,
        AlertKind::VictimProximity,
        AlertKind::CurfewViolation,
        AlertKind::NoFixDuringCurfew,
        AlertKind::StrapTamper,
        AlertKind::CaseTamper,
        AlertKind::LowBattery,
        AlertKind::BatteryDead,
        AlertKind::ChargerNotConnected,
        AlertKind::LostCommunication,
        AlertKind::GpsJammingSuspected,
        AlertKind::DeviceClockWrong,
        AlertKind::UnknownAlarm,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::InclusionZoneExit => "inclusion_zone_exit",
            AlertKind::ExclusionZoneEntry => "exclusion_zone_entry",
            AlertKind::VictimProximity => "victim_proximity",
            AlertKind::CurfewViolation => "curfew_violation",
            AlertKind::NoFixDuringCurfew => "no_fix_during_curfew",
            AlertKind::StrapTamper => "strap_tamper",
            AlertKind::CaseTamper => "case_tamper",
            AlertKind::LowBattery => "low_battery",
            AlertKind::BatteryDead => "battery_dead",
            AlertKind::ChargerNotConnected => "charger_not_connected",
            AlertKind::LostCommunication => "lost_communication",
            AlertKind::GpsJammingSuspected => "gps_jamming_suspected",
            AlertKind::DeviceClockWrong => "device_clock_wrong",
            AlertKind::UnknownAlarm => "unknown_alarm",
        }
    }
}

impl std::str::FromStr for AlertKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        AlertKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown alert kind {s:?}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Open,
    Acknowledged,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Open => "open",
            AlertState::Acknowledged => "acknowledged",
            AlertState::Resolved => "resolved",
        }
    }
}

impl std::str::FromStr for AlertState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "open" => Ok(AlertState::Open),
            "acknowledged" => Ok(AlertState::Acknowledged),
            "resolved" => Ok(AlertState::Resolved),
            _ => Err(format!("unknown alert state {s:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub id: AlertId,
    pub subject_id: SubjectId,
    pub device_id: Option<DeviceId>,
    pub kind: AlertKind,
    pub severity: Severity,
    pub state: AlertState,
    pub zone_id: Option<ZoneId>,
    /// Plain-words message for an officer.
    pub message: String,
    /// When the condition started (device time of the first evidence).
    pub started_at: DateTime<Utc>,
    /// When the platform raised the alert (server clock at insert; repeats leave it unchanged).
    /// Escalation counts from here: late, buffered evidence has an old `started_at`, but no
    /// officer has had the alert before it was raised.
    pub created_at: DateTime<Utc>,
    /// When the condition was last seen (repeats update this, not a new alert).
    pub last_seen_at: DateTime<Utc>,
    /// When the condition ended (auto-resolution evidence), if it has.
    pub ended_at: Option<DateTime<Utc>>,
    pub escalated: bool,
    pub acknowledged_by: Option<UserId>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    pub resolved_by: Option<UserId>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub resolution_code: Option<String>,
    pub resolution_note: Option<String>,
    /// Evidence: fixes and other data that justify the alert.
    pub evidence: serde_json::Value,
    /// Number of repeats folded into this alert.
    pub occurrences: i64,
}

// ---------------------------------------------------------------------------
// Users and audit
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Officer,
    Supervisor,
    Admin,
    /// Victim liaison officer: may read victim devices' positions (audited), and sees no
    /// subject's data (an empty caseload).
    #[serde(rename = "victim_liaison")]
    VictimLiaison,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Officer => "officer",
            Role::Supervisor => "supervisor",
            Role::Admin => "admin",
            Role::VictimLiaison => "victim_liaison",
        }
    }

    /// May read victim positions (the victim data class): supervisors and victim liaison
    /// officers. Admins manage devices but do not see where a protected person is.
    pub fn may_read_victim_data(self) -> bool {
        matches!(self, Role::Supervisor | Role::VictimLiaison)
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "officer" => Ok(Role::Officer),
            "supervisor" => Ok(Role::Supervisor),
            "admin" => Ok(Role::Admin),
            "victim_liaison" => Ok(Role::VictimLiaison),
            _ => Err(format!("unknown role {s:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
    pub role: Role,
    /// argon2 PHC string; never serialised to clients.
    #[serde(skip_serializing, default)]
    pub password_hash: String,
    pub active: bool,
}

/// One append-only audit record: who did or saw what, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// User id, or None for the system itself (ingest, escalation worker).
    pub actor_id: Option<UserId>,
    /// Username or "system:<component>".
    pub actor: String,
    /// e.g. "subject.view", "alert.acknowledge", "zone.update", "access.denied".
    pub action: String,
    /// e.g. "subject", "alert", "zone", "device", "user".
    pub target_type: String,
    pub target_id: Option<String>,
    pub subject_id: Option<SubjectId>,
    /// Previous state / details as JSON.
    pub details: serde_json::Value,
}

impl ZoneSpec {
    /// The victim device of a dynamic zone.
    pub fn dynamic_device(&self) -> Option<&str> {
        match &self.geometry {
            ZoneGeometry::Dynamic { device_id, .. } => Some(device_id),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_and_device_class_names_match_serde() {
        for r in [
            Role::Officer,
            Role::Supervisor,
            Role::Admin,
            Role::VictimLiaison,
        ] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::json!(r.as_str())
            );
        }
        for c in [DeviceClass::OffenderTag, DeviceClass::Victim] {
            assert_eq!(c.as_str().parse::<DeviceClass>().unwrap(), c);
            assert_eq!(
                serde_json::to_value(c).unwrap(),
                serde_json::json!(c.as_str())
            );
        }
        let d: Device = serde_json::from_str(
            r#"{"device_id":"1","protocol":"gt06","secret":null,"active":true}"#,
        )
        .unwrap();
        assert_eq!(d.class, DeviceClass::OffenderTag);
    }

    #[test]
    fn protocol_names_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(p.as_str().parse::<Protocol>().unwrap(), p);
        }
        assert!("nope".parse::<Protocol>().is_err());
    }

    #[test]
    fn alert_kind_names_round_trip_and_match_serde() {
        for k in AlertKind::ALL {
            assert_eq!(k.as_str().parse::<AlertKind>().unwrap(), k);
            assert_eq!(
                serde_json::to_value(k).unwrap(),
                serde_json::json!(k.as_str())
            );
        }
    }

    #[test]
    fn zone_geometry_json_shape() {
        let g: ZoneGeometry =
            serde_json::from_str(r#"{"type":"circle","center":[12.5,55.6],"radius_m":150}"#)
                .unwrap();
        assert_eq!(
            g,
            ZoneGeometry::Circle {
                center: [12.5, 55.6],
                radius_m: 150.0
            }
        );
    }
}
