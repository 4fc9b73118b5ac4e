//! `em-geofence` owns the geofence and curfew engine of the EM platform: it compiles the
//! persisted [`em_model::ZoneSpec`]s into validated WGS84 zones (polygons with holes,
//! multipolygons, circles, dynamic circles around another device), keeps them in one
//! `rstar` R-tree ([`ZoneIndex`]), evaluates curfew schedules in the subject's own IANA
//! time zone ([`schedule`]), and runs the per-subject compliance state machine with
//! hysteresis ([`SubjectMonitor`]) that turns device [`em_model::Record`]s into
//! [`ComplianceEvent`]s. It is pure: no I/O, no clocks (callers pass the time), no threads.
//!
//! # Sharding model
//!
//! * One [`ZoneIndex`] is shared by all ingest workers through a [`SharedZoneIndex`]
//!   (an `Arc<RwLock<ZoneIndex>>`): zone edits take the write lock briefly; workers take
//!   the read lock per record or, better, per batch of records. Positions of victims'
//!   devices for dynamic zones are stored inside the index behind their own small lock,
//!   so [`ZoneIndex::update_dynamic`] only needs a read guard.
//! * Each subject's [`SubjectMonitor`] lives in exactly one worker (shard by subject id).
//!   The worker calls [`SubjectMonitor::on_record`] for each record of the subject's
//!   device, [`SubjectMonitor::on_tick`] when [`SubjectMonitor::next_deadline`] passes
//!   (or periodically), and [`SubjectMonitor::on_dynamic_update`] for the subjects
//!   returned by [`ZoneIndex::update_dynamic`] when a victim's device reports a position.

pub mod geometry;
pub mod index;
pub mod monitor;
pub mod schedule;

pub use geometry::{bearing_deg, haversine_m, CompiledGeometry};
pub use index::{SharedZoneIndex, Zone, ZoneIndex, ZoneMatch};
pub use monitor::{
    ComplianceEvent, ComplianceEventKind, EndReason, EvidenceFix, EvidenceSource, SubjectMonitor,
    ASSUMED_ACCURACY_M, MAX_EVIDENCE,
};
pub use schedule::{active_intervals, parse_timezone, CompiledSchedule, ScheduleState};

use em_model::ZoneId;

/// Why a zone, schedule or time zone was rejected. Every variant says which zone and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GeofenceError {
    #[error("zone {zone_id}: latitude {lat} is beyond ±85° (polar zones are not supported)")]
    PolarLatitude { zone_id: ZoneId, lat: f64 },
    #[error("zone {zone_id}: invalid coordinate: {reason}")]
    InvalidCoordinate { zone_id: ZoneId, reason: String },
    #[error(
        "zone {zone_id}: polygon {polygon} ring {ring} has {points} distinct points (at least 3 needed)"
    )]
    RingTooShort {
        zone_id: ZoneId,
        polygon: usize,
        ring: usize,
        points: usize,
    },
    #[error("zone {zone_id}: invalid geometry: {reason}")]
    InvalidGeometry { zone_id: ZoneId, reason: String },
    #[error("zone {zone_id}: invalid radius {radius_m} m (must be finite, > 0 and <= 1000 km)")]
    InvalidRadius { zone_id: ZoneId, radius_m: f64 },
    #[error("zone {zone_id}: has neither a subject nor a group")]
    NoOwner { zone_id: ZoneId },
    #[error("invalid schedule: {0}")]
    InvalidSchedule(String),
    #[error("unknown IANA time zone {0:?}")]
    InvalidTimezone(String),
}
