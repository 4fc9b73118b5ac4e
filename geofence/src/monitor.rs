//! The per-subject compliance state machine.
//!
//! For every zone that applies to the subject a [`SubjectMonitor`] keeps a small state:
//! the zone's schedule state (cached until its next transition), compliant or in
//! breach, a pending change with its evidence, and the "no fix" state.
//!
//! # Hysteresis
//!
//! Each fix is classified against a zone with the signed distance `d` to the boundary
//! (metres, positive outside), the margin `m = accuracy + BreachRules::buffer_m`, and
//! the inside margin `m_in = min(m, depth / 2)` where `depth` is the zone's inscribed
//! radius (so a small zone can still be "clearly inside" near its middle):
//!
//! | zone      | violating   | complying   | otherwise |
//! |-----------|-------------|-------------|-----------|
//! | inclusion | `d > m`     | `d <= -m_in`| uncertain |
//! | exclusion | `d < -m_in` | `d > m`     | uncertain |
//!
//! A breach starts after `consecutive_fixes` violating fixes in a row, or when the first
//! of an unbroken run of violating evidence is `persist_secs` old (checked on each record
//! and on [`SubjectMonitor::on_tick`]). It ends the same way with complying evidence.
//! An uncertain fix or evidence for the current state cancels a pending change, so GPS
//! jitter in the band between the two thresholds never flaps.
//!
//! # Evidence
//!
//! * A valid position fix (any source; its accuracy widens the margin). Missing accuracy
//!   counts as [`ASSUMED_ACCURACY_M`]. Invalid fixes (`valid == false`) are ignored.
//! * RF home unit: `beacon_in_range == Some(true)` (or a `BeaconInRange` event) is
//!   complying evidence for the subject's curfew home zones, `Some(false)` violating
//!   evidence, whatever the GPS says. Either resets the no-fix timer.
//!
//! # No fix
//!
//! While an inclusion zone is active and neither a fix nor beacon evidence has arrived for
//! `no_fix_secs` (counted from the later of the last evidence and the moment the zone
//! became active or started being monitored), the zone enters its own "no fix" state
//! ([`ComplianceEventKind::NoFixStarted`]); the next evidence ends it. `no_fix_secs == 0`
//! disables the check.
//!
//! # Time
//!
//! Record time is `device_time`. A record whose device time the time policy does not trust
//! ([`Record::time_trusted`]: far in the future or far in the past of its receive time) is
//! ignored whole: it is stored, flagged, and raises a clock alert elsewhere, but it never moves
//! this state machine (one fix dated 2099 would otherwise stop every later fix from being
//! evaluated). Records not newer than the latest record already processed are ignored (the
//! state machine only moves forward, and a re-sent fix does not count twice towards
//! `consecutive_fixes`).

use crate::geometry::{bearing_deg, haversine_m, CompiledGeometry};
use crate::index::{PeerFix, Zone, ZoneIndex};
use crate::schedule::{parse_timezone, Interval};
use crate::GeofenceError;
use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use em_model::{
    AlertKind, BreachRules, DeviceEventKind, DeviceId, FixSource, Record, Subject, SubjectId,
    ZoneId, ZoneKind,
};
use serde::{Deserialize, Serialize};

/// Most evidence entries kept per event.
pub const MAX_EVIDENCE: usize = 10;
/// Accuracy assumed for a fix that reports none, metres.
pub const ASSUMED_ACCURACY_M: f64 = 10.0;
/// On a dynamic-zone update the subject's last fix is re-used only if at most this old, seconds.
pub const DYNAMIC_REEVAL_MAX_AGE_SECS: i64 = 120;
/// At most this many schedule transitions are replayed in one step (then jump to now).
const MAX_REPLAYED_TRANSITIONS: usize = 64;
/// Freshness of the last evidence re-used when a window opens, when `no_fix_secs` is 0.
const DEFAULT_REEVAL_MAX_AGE_SECS: i64 = 900;

/// R-tree answers are reused while the subject stays within this distance (metres) of
/// the point they were computed for (queried with the margin plus this slack), and the
/// index has not changed. Stationary subjects then skip the tree entirely.
pub const NEAR_CACHE_SLACK_M: f64 = 250.0;

/// Candidate exclusion zones within `radius_m` of a point.
#[derive(Debug, Clone, PartialEq, Default)]
struct NearCache {
    lon: f64,
    lat: f64,
    radius_m: f64,
    stamp: (u64, u64),
    zones: Vec<ZoneId>,
}

impl NearCache {
    /// Distance from the cached point, metres (local projection; +1 m for rounding).
    fn distance_m(&self, lon: f64, lat: f64) -> f64 {
        let dlon = crate::geometry::shift_into_frame(lon, self.lon) - self.lon;
        let dx = dlon * crate::geometry::M_PER_DEG * self.lat.to_radians().cos();
        let dy = (lat - self.lat) * crate::geometry::M_PER_DEG;
        (dx * dx + dy * dy).sqrt() * 1.001 + 1.0
    }
}

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComplianceEventKind {
    /// Subject left an inclusion zone / entered an exclusion zone while it was active.
    BreachStarted,
    /// The breach ended (see [`ComplianceEvent::reason`]).
    BreachEnded,
    /// No fix and no beacon evidence for `no_fix_secs` while an inclusion zone is active.
    NoFixStarted,
    NoFixEnded,
    /// A scheduled zone became active (a curfew window opened).
    WindowOpened,
    /// A scheduled zone became inactive.
    WindowClosed,
}

/// Why a breach or no-fix state ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// Complying evidence met the hysteresis rules.
    BackInCompliance,
    /// A fix or beacon report arrived (ends no-fix).
    EvidenceReceived,
    /// The zone stopped being active: window end, approved absence, or order end.
    WindowClosed,
    /// The zone was removed, changed kind, or no longer applies to the subject.
    ZoneChanged,
}

/// Where a piece of evidence came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvidenceSource {
    Gnss,
    Lbs,
    Wifi,
    /// A position the device derived from a fixed beacon.
    BeaconPosition,
    /// RF home unit reported the tag in range.
    BeaconInRange,
    /// RF home unit reported the tag out of range.
    BeaconOutOfRange,
    /// The latest position of the other device of a dynamic zone.
    PeerPosition,
}

/// One piece of evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvidenceFix {
    /// Observation time (device time).
    pub at: DateTime<Utc>,
    pub source: EvidenceSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lat: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lon: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_m: Option<f64>,
    /// Signed distance to the zone boundary in metres (positive outside), when computed. For
    /// [`EvidenceSource::PeerPosition`]: the distance between the subject and the protected
    /// person, rounded to 10 m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_m: Option<f64>,
    /// For [`EvidenceSource::PeerPosition`]: where the subject is as seen from the protected
    /// person, degrees clockwise from north, rounded to 10°.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearing_deg: Option<f64>,
    /// For [`EvidenceSource::PeerPosition`]: the other device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<DeviceId>,
}

impl EvidenceFix {
    fn with_distance(&self, d: Option<f64>) -> Self {
        EvidenceFix {
            distance_m: d.map(|d| (d * 10.0).round() / 10.0),
            ..self.clone()
        }
    }
}

/// An active schedule interval, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventWindow {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// A state change of one subject against one zone.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComplianceEvent {
    pub subject_id: SubjectId,
    pub zone_id: ZoneId,
    pub zone_kind: ZoneKind,
    pub kind: ComplianceEventKind,
    /// The zone is the curfew home (an inclusion zone with `is_curfew_home`).
    pub is_curfew: bool,
    /// For dynamic zones: the device whose position defines the zone (victim's device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dynamic_device_id: Option<DeviceId>,
    /// When the engine decided the change.
    pub at: DateTime<Utc>,
    /// When the condition started (first evidence of the breach, silence start, window start).
    pub started_at: DateTime<Utc>,
    /// For *Ended/WindowClosed events: when the condition ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<DateTime<Utc>>,
    /// The schedule interval in force, for scheduled zones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<EventWindow>,
    /// For *Ended events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<EndReason>,
    /// The evidence that decided the change (at most [`MAX_EVIDENCE`] entries).
    pub evidence: Vec<EvidenceFix>,
}

impl ComplianceEvent {
    /// The alert an event opens, if any: breaches and no-fix starts. (Ended events resolve
    /// the alert of the same subject/zone; window events are informational.)
    pub fn alert_kind(&self) -> Option<AlertKind> {
        match self.kind {
            ComplianceEventKind::BreachStarted => Some(if self.dynamic_device_id.is_some() {
                AlertKind::VictimProximity
            } else if self.is_curfew {
                AlertKind::CurfewViolation
            } else if self.zone_kind == ZoneKind::Inclusion {
                AlertKind::InclusionZoneExit
            } else {
                AlertKind::ExclusionZoneEntry
            }),
            ComplianceEventKind::NoFixStarted => Some(AlertKind::NoFixDuringCurfew),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Violating,
    Complying,
    Uncertain,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pending {
    since: DateTime<Utc>,
    count: u32,
    evidence: Vec<EvidenceFix>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ZoneTrack {
    zone_id: ZoneId,
    zone_version: u64,
    kind: ZoneKind,
    is_curfew: bool,
    standing: bool,
    scheduled: bool,
    dynamic_device: Option<DeviceId>,
    active: bool,
    /// When the zone became active or started being monitored (no-fix reference).
    active_since: Option<DateTime<Utc>>,
    window: Option<Interval>,
    /// The activity state is valid until this instant (None = for ever).
    valid_until: Option<DateTime<Utc>>,
    /// Start of the current breach.
    breach_since: Option<DateTime<Utc>>,
    pending: Option<Pending>,
    no_fix_since: Option<DateTime<Utc>>,
}

impl ZoneTrack {
    fn in_breach(&self) -> bool {
        self.breach_since.is_some()
    }

    fn event(
        &self,
        subject_id: SubjectId,
        kind: ComplianceEventKind,
        at: DateTime<Utc>,
        started_at: DateTime<Utc>,
    ) -> ComplianceEvent {
        ComplianceEvent {
            subject_id,
            zone_id: self.zone_id,
            zone_kind: self.kind,
            kind,
            is_curfew: self.is_curfew,
            dynamic_device_id: self.dynamic_device.clone(),
            at,
            started_at,
            ended_at: None,
            window: self.window.map(|(start, end)| EventWindow { start, end }),
            reason: None,
            evidence: Vec::new(),
        }
    }
}

struct Activity {
    active: bool,
    window: Option<Interval>,
    valid_until: Option<DateTime<Utc>>,
}

fn activity(zone: &Zone, tz: Tz, subject: &Subject, t: DateTime<Utc>) -> Activity {
    let inactive = |until| Activity {
        active: false,
        window: None,
        valid_until: until,
    };
    if let Some(start) = subject.order_start.filter(|s| t < *s) {
        return inactive(Some(start));
    }
    if subject.order_end.is_some_and(|e| t >= e) {
        return inactive(None);
    }
    let clip = |(s, e): Interval| {
        let s = subject.order_start.map_or(s, |o| s.max(o));
        let e = subject.order_end.map_or(e, |o| e.min(o));
        (s, e)
    };
    match &zone.schedule {
        None => Activity {
            active: true,
            window: None,
            valid_until: subject.order_end,
        },
        Some(schedule) => {
            let st = schedule.state_at(tz, t);
            let until = subject
                .order_end
                .map_or(st.next_change, |e| e.min(st.next_change));
            Activity {
                active: st.active,
                window: st.interval.map(clip),
                valid_until: Some(until),
            }
        }
    }
}

/// Classify a signed distance against a zone kind with hysteresis margins.
fn classify(kind: ZoneKind, d: f64, margin: f64, depth: f64) -> Verdict {
    let m_in = margin.min(depth / 2.0);
    match kind {
        ZoneKind::Inclusion if d > margin => Verdict::Violating,
        ZoneKind::Inclusion if d <= -m_in => Verdict::Complying,
        ZoneKind::Exclusion if d < -m_in => Verdict::Violating,
        ZoneKind::Exclusion if d > margin => Verdict::Complying,
        _ => Verdict::Uncertain,
    }
}

fn push_evidence(v: &mut Vec<EvidenceFix>, e: EvidenceFix) {
    if v.len() < MAX_EVIDENCE {
        v.push(e);
    } else if let Some(last) = v.last_mut() {
        // Keep the first entries (how it started) and the latest one.
        *last = e;
    }
}

/// The per-subject state. Lives in exactly one worker; serde-able so the pipeline can
/// persist it across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SubjectMonitor {
    subject_id: SubjectId,
    timezone: Tz,
    tracks: Vec<ZoneTrack>,
    last_fix: Option<EvidenceFix>,
    last_beacon: Option<EvidenceFix>,
    last_evidence_at: Option<DateTime<Utc>>,
    last_record_at: Option<DateTime<Utc>>,
    /// Latest time seen from records or ticks.
    clock: Option<DateTime<Utc>>,
    /// Exclusion-zone candidates around a recent fix (not persisted).
    #[serde(default, skip)]
    near_cache: Option<NearCache>,
    /// (index instance, generation) the tracks were last synced with.
    #[serde(default, skip)]
    synced: Option<(u64, u64)>,
}

impl SubjectMonitor {
    /// A monitor for `subject`. Fails if the subject's time zone is not a valid IANA name.
    pub fn new(subject: &Subject) -> Result<Self, GeofenceError> {
        Ok(SubjectMonitor {
            subject_id: subject.id,
            timezone: parse_timezone(&subject.timezone)?,
            tracks: Vec::new(),
            last_fix: None,
            last_beacon: None,
            last_evidence_at: None,
            last_record_at: None,
            clock: None,
            synced: None,
            near_cache: None,
        })
    }

    pub fn subject_id(&self) -> SubjectId {
        self.subject_id
    }

    /// Apply a changed subject time zone. On error the previous zone stays in force.
    pub fn set_timezone(&mut self, name: &str) -> Result<(), GeofenceError> {
        let tz = parse_timezone(name)?;
        if tz != self.timezone {
            self.timezone = tz;
            // Schedules must be re-evaluated in the new zone.
            for t in &mut self.tracks {
                t.zone_version = 0;
            }
        }
        Ok(())
    }

    /// Zones currently in breach.
    pub fn breaches(&self) -> impl Iterator<Item = ZoneId> + '_ {
        self.tracks
            .iter()
            .filter(|t| t.in_breach())
            .map(|t| t.zone_id)
    }

    /// Zones currently in the no-fix state.
    pub fn no_fix_zones(&self) -> impl Iterator<Item = ZoneId> + '_ {
        self.tracks
            .iter()
            .filter(|t| t.no_fix_since.is_some())
            .map(|t| t.zone_id)
    }

    /// The earliest instant at which [`SubjectMonitor::on_tick`] can change something
    /// (window transition, `persist_secs` elapsing, no-fix timer). Zones added to the
    /// index after the last call are not known yet, so also tick periodically.
    pub fn next_deadline(&self, subject: &Subject) -> Option<DateTime<Utc>> {
        let rules = &subject.rules;
        let persist = Duration::seconds(i64::from(rules.persist_secs));
        let no_fix = Duration::seconds(i64::from(rules.no_fix_secs));
        self.tracks
            .iter()
            .flat_map(|t| {
                let pending = t.pending.as_ref().map(|p| p.since + persist);
                let nofix = (t.active
                    && t.kind == ZoneKind::Inclusion
                    && t.dynamic_device.is_none()
                    && rules.no_fix_secs > 0
                    && t.no_fix_since.is_none())
                .then(|| self.no_fix_reference(t).map(|r| r + no_fix))
                .flatten();
                [t.valid_until, pending, nofix]
            })
            .flatten()
            .min()
    }

    fn no_fix_reference(&self, t: &ZoneTrack) -> Option<DateTime<Utc>> {
        match (self.last_evidence_at, t.active_since) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    fn advance_clock(&mut self, t: DateTime<Utc>) -> DateTime<Utc> {
        let c = self.clock.map_or(t, |c| c.max(t));
        self.clock = Some(c);
        c
    }

    /// Process one record of the subject's own device. Returns the state changes.
    ///
    /// Zone edits and group bindings are noticed through [`ZoneIndex::generation`]; a
    /// changed `Subject::timezone` is picked up on the next [`SubjectMonitor::on_tick`].
    pub fn on_record(
        &mut self,
        index: &ZoneIndex,
        subject: &Subject,
        record: &Record,
    ) -> Vec<ComplianceEvent> {
        let mut events = Vec::new();
        if !record.time_trusted() {
            return events;
        }
        let t_rec = record.device_time;
        if self.last_record_at.is_some_and(|l| t_rec <= l) {
            return events;
        }
        self.last_record_at = Some(t_rec);
        let now = self.advance_clock(t_rec);
        self.advance(index, subject, now, false, &mut events);

        let fix = record.position.as_ref().filter(|p| {
            p.valid
                && p.lat.is_finite()
                && p.lon.is_finite()
                && p.lat.abs() <= 90.0
                && p.lon.abs() <= 180.0
        });
        let beacon = record.beacon_in_range.or_else(|| {
            record.events.iter().rev().find_map(|e| match e {
                DeviceEventKind::BeaconInRange => Some(true),
                DeviceEventKind::BeaconOutOfRange => Some(false),
                _ => None,
            })
        });
        if fix.is_none() && beacon.is_none() {
            return events;
        }
        let fix_ev = fix.map(|p| EvidenceFix {
            at: t_rec,
            source: match p.source {
                FixSource::Gnss => EvidenceSource::Gnss,
                FixSource::Lbs => EvidenceSource::Lbs,
                FixSource::Wifi => EvidenceSource::Wifi,
                FixSource::Beacon => EvidenceSource::BeaconPosition,
            },
            lat: Some(p.lat),
            lon: Some(p.lon),
            accuracy_m: Some(
                p.accuracy_m
                    .map(f64::from)
                    .filter(|a| a.is_finite() && *a >= 0.0)
                    .unwrap_or(ASSUMED_ACCURACY_M),
            ),
            distance_m: None,
            bearing_deg: None,
            device_id: None,
        });
        let beacon_ev = beacon.map(|b| EvidenceFix {
            at: t_rec,
            source: if b {
                EvidenceSource::BeaconInRange
            } else {
                EvidenceSource::BeaconOutOfRange
            },
            lat: None,
            lon: None,
            accuracy_m: None,
            distance_m: None,
            bearing_deg: None,
            device_id: None,
        });

        // Evidence ends every no-fix state.
        self.last_evidence_at = Some(self.last_evidence_at.map_or(t_rec, |l| l.max(t_rec)));
        for track in self.tracks.iter_mut() {
            if let Some(since) = track.no_fix_since.take() {
                let mut e =
                    track.event(self.subject_id, ComplianceEventKind::NoFixEnded, now, since);
                e.ended_at = Some(t_rec.max(since));
                e.reason = Some(EndReason::EvidenceReceived);
                e.evidence
                    .extend(fix_ev.clone().or_else(|| beacon_ev.clone()));
                events.push(e);
            }
        }
        if fix_ev.is_some() {
            self.last_fix = fix_ev.clone();
        }
        if beacon_ev.is_some() {
            self.last_beacon = beacon_ev.clone();
        }

        // Exclusion zones near the fix (R-tree); other tracked exclusion zones are clear.
        let mut near: Vec<ZoneId> = Vec::new();
        if let Some(f) = &fix_ev {
            let (lon, lat) = (f.lon.unwrap_or(0.0), f.lat.unwrap_or(0.0));
            let margin =
                f.accuracy_m.unwrap_or(ASSUMED_ACCURACY_M) + subject.rules.buffer_m.max(0.0);
            let stamp = (index.instance_id(), index.generation());
            let reuse = self
                .near_cache
                .as_ref()
                .is_some_and(|c| c.stamp == stamp && c.distance_m(lon, lat) + margin <= c.radius_m);
            if !reuse {
                let radius_m = margin + NEAR_CACHE_SLACK_M;
                let mut zones = self.near_cache.take().map(|c| c.zones).unwrap_or_default();
                zones.clear();
                index.for_each_candidate(subject.id, lon, lat, radius_m, |zone| {
                    if zone.kind == ZoneKind::Exclusion {
                        zones.push(zone.id);
                    }
                });
                self.near_cache = Some(NearCache {
                    lon,
                    lat,
                    radius_m,
                    stamp,
                    zones,
                });
            }
            if let Some(c) = self.near_cache.as_mut() {
                near = std::mem::take(&mut c.zones);
            }
            for &id in &near {
                if !self.tracks.iter().any(|t| t.zone_id == id) {
                    if let Some(zone) = index.zone(id) {
                        let track = self.new_track(zone, subject, now);
                        self.tracks.push(track);
                    }
                }
            }
        }

        let rules = subject.rules;
        let subject_id = self.subject_id;
        for track in self.tracks.iter_mut() {
            if !track.active {
                continue;
            }
            let Some(zone) = index.zone(track.zone_id) else {
                continue;
            };
            let judged = judge(
                zone,
                track,
                index,
                &rules,
                fix_ev.as_ref(),
                beacon_ev.as_ref(),
                &near,
                now,
            );
            if let Some(j) = judged {
                apply_verdict(track, subject_id, &rules, &j, t_rec, now, &mut events);
            }
        }
        // Forget quiet exclusion tracks the subject is no longer near.
        if fix_ev.is_some() {
            self.tracks.retain(|t| {
                t.standing || t.in_breach() || t.pending.is_some() || near.contains(&t.zone_id)
            });
            if let Some(c) = self.near_cache.as_mut() {
                c.zones = near;
            }
        }
        events
    }

    /// Time-driven transitions at `now` (server time): windows opening/closing (a window
    /// that opens while the last evidence says "outside" starts a pending breach),
    /// `persist_secs` elapsing, no-fix timers, zones removed from the index.
    pub fn on_tick(
        &mut self,
        index: &ZoneIndex,
        subject: &Subject,
        now: DateTime<Utc>,
    ) -> Vec<ComplianceEvent> {
        let mut events = Vec::new();
        let now = self.advance_clock(now);
        self.advance(index, subject, now, true, &mut events);
        events
    }

    /// Re-evaluate the dynamic zones that follow `device_id` after that device moved
    /// (call it for each subject [`ZoneIndex::update_dynamic`] returned). Uses the
    /// subject's last fix if it is at most [`DYNAMIC_REEVAL_MAX_AGE_SECS`] old.
    pub fn on_dynamic_update(
        &mut self,
        index: &ZoneIndex,
        subject: &Subject,
        device_id: &str,
        at: DateTime<Utc>,
    ) -> Vec<ComplianceEvent> {
        let mut events = Vec::new();
        let now = self.advance_clock(at);
        self.advance(index, subject, now, false, &mut events);
        let Some(fix) = self.last_fix.clone() else {
            return events;
        };
        if now - fix.at > Duration::seconds(DYNAMIC_REEVAL_MAX_AGE_SECS) {
            return events;
        }
        let rules = subject.rules;
        let subject_id = self.subject_id;
        for track in self.tracks.iter_mut() {
            if !track.active || track.dynamic_device.as_deref() != Some(device_id) {
                continue;
            }
            let Some(zone) = index.zone(track.zone_id) else {
                continue;
            };
            if let Some(j) = judge(zone, track, index, &rules, Some(&fix), None, &[], now) {
                apply_verdict(track, subject_id, &rules, &j, now, now, &mut events);
            }
        }
        events
    }

    fn new_track(&self, zone: &Zone, subject: &Subject, now: DateTime<Utc>) -> ZoneTrack {
        let act = activity(zone, self.timezone, subject, now);
        ZoneTrack {
            zone_id: zone.id,
            zone_version: zone.version,
            kind: zone.kind,
            is_curfew: zone.is_curfew(),
            standing: zone.is_standing(),
            scheduled: zone.schedule.is_some(),
            dynamic_device: zone.dynamic_device().map(str::to_string),
            active: act.active,
            active_since: act.active.then_some(now),
            window: act.window,
            valid_until: act.valid_until,
            breach_since: None,
            pending: None,
            no_fix_since: None,
        }
    }

    /// Bring every track to `now`: sync with the index, replay schedule transitions,
    /// fire elapsed `persist_secs` and no-fix timers.
    fn advance(
        &mut self,
        index: &ZoneIndex,
        subject: &Subject,
        now: DateTime<Utc>,
        full_sync: bool,
        events: &mut Vec<ComplianceEvent>,
    ) {
        // Zone/binding changes are looked for only when the index changed since the last
        // call (or on ticks, which also pick up a changed subject time zone).
        let stamp = (index.instance_id(), index.generation());
        let synced = !full_sync && self.synced == Some(stamp);
        if !synced {
            if subject.timezone != self.timezone.name() {
                // An invalid new name keeps the previous zone (validated when saved).
                let _ = self.set_timezone(&subject.timezone);
            }
            for zone in index.standing_zones(subject.id) {
                if !self.tracks.iter().any(|t| t.zone_id == zone.id) {
                    let track = self.new_track(zone, subject, now);
                    self.tracks.push(track);
                }
            }
        }
        let subject_id = self.subject_id;
        let rules = subject.rules;
        let tz = self.timezone;
        let reeval_age = Duration::seconds(if rules.no_fix_secs > 0 {
            i64::from(rules.no_fix_secs)
        } else {
            DEFAULT_REEVAL_MAX_AGE_SECS
        });
        let mut tracks = std::mem::take(&mut self.tracks);
        tracks.retain_mut(|track| {
            if !synced {
                let zone = index
                    .zone(track.zone_id)
                    .filter(|z| index.applies_to(z, subject.id));
                let Some(zone) = zone else {
                    end_all(track, subject_id, now, EndReason::ZoneChanged, events);
                    return false;
                };
                if zone.version != track.zone_version {
                    if zone.kind != track.kind
                        || zone.dynamic_device() != track.dynamic_device.as_deref()
                    {
                        end_all(track, subject_id, now, EndReason::ZoneChanged, events);
                    }
                    let fresh = self.new_track(zone, subject, now);
                    let was_active = track.active;
                    let keep = (
                        track.breach_since,
                        track.pending.take(),
                        track.no_fix_since,
                        track.active_since,
                    );
                    *track = fresh;
                    if was_active && !track.active {
                        // Edited so that it is no longer active now.
                        track.window = None;
                        let (b, _, nf, _) = keep;
                        track.breach_since = b;
                        track.no_fix_since = nf;
                        end_all(track, subject_id, now, EndReason::WindowClosed, events);
                    } else if was_active {
                        track.breach_since = keep.0;
                        track.pending = keep.1;
                        track.no_fix_since = keep.2;
                        track.active_since = keep.3;
                    }
                }
            }
            // Replay schedule transitions up to now.
            if let Some(zone) = track
                .valid_until
                .filter(|u| *u <= now)
                .and_then(|_| index.zone(track.zone_id))
            {
                let mut replayed = 0;
                while let Some(until) = track.valid_until.filter(|u| *u <= now) {
                    let at = if replayed < MAX_REPLAYED_TRANSITIONS {
                        until
                    } else {
                        now
                    };
                    replayed += 1;
                    let act = activity(zone, tz, subject, at);
                    if act.active != track.active {
                        if act.active {
                            track.active = true;
                            track.active_since = Some(at);
                            track.window = act.window;
                            if track.scheduled {
                                events.push(track.event(
                                    subject_id,
                                    ComplianceEventKind::WindowOpened,
                                    at,
                                    act.window.map_or(at, |w| w.0),
                                ));
                            }
                            // Window opens: judge the latest evidence as of now.
                            let judged = judge(
                                zone,
                                track,
                                index,
                                &rules,
                                self.last_fix.as_ref().filter(|f| at - f.at <= reeval_age),
                                self.last_beacon
                                    .as_ref()
                                    .filter(|f| at - f.at <= reeval_age),
                                &[],
                                at,
                            );
                            if let Some(j) = judged {
                                apply_verdict(track, subject_id, &rules, &j, at, at, events);
                            }
                        } else {
                            end_all(track, subject_id, at, EndReason::WindowClosed, events);
                            if track.scheduled {
                                let started = track.window.map_or(at, |w| w.0);
                                let mut e = track.event(
                                    subject_id,
                                    ComplianceEventKind::WindowClosed,
                                    at,
                                    started,
                                );
                                e.ended_at = Some(at);
                                events.push(e);
                            }
                            track.active = false;
                            track.active_since = None;
                        }
                    }
                    track.window = act.window;
                    track.valid_until = act.valid_until;
                    if at >= now {
                        break;
                    }
                }
            }
            if !track.active {
                return true;
            }
            // persist_secs elapsing without contrary evidence.
            let persist = Duration::seconds(i64::from(rules.persist_secs));
            if track
                .pending
                .as_ref()
                .is_some_and(|p| now - p.since >= persist)
            {
                flip(track, subject_id, now, events);
            }
            // No-fix timer.
            if track.kind == ZoneKind::Inclusion
                && track.dynamic_device.is_none()
                && rules.no_fix_secs > 0
                && track.no_fix_since.is_none()
            {
                let reference = match (self.last_evidence_at, track.active_since) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                if let Some(r) = reference {
                    if now - r >= Duration::seconds(i64::from(rules.no_fix_secs)) {
                        track.no_fix_since = Some(r);
                        let mut e =
                            track.event(subject_id, ComplianceEventKind::NoFixStarted, now, r);
                        e.evidence.extend(self.last_fix.clone());
                        e.evidence.extend(self.last_beacon.clone());
                        events.push(e);
                    }
                }
            }
            true
        });
        self.tracks = tracks;
        self.synced = Some(stamp);
    }
}

/// The verdict on one zone and what it was based on (evidence is built only when needed).
struct Judged<'a> {
    verdict: Verdict,
    fix: Option<&'a EvidenceFix>,
    beacon: Option<&'a EvidenceFix>,
    distance_m: Option<f64>,
    peer: Option<(PeerFix, &'a str)>,
}

impl Judged<'_> {
    fn evidence(&self) -> Vec<EvidenceFix> {
        let mut v = Vec::with_capacity(2);
        v.extend(self.beacon.cloned());
        v.extend(self.fix.map(|f| f.with_distance(self.distance_m)));
        if let Some((p, device)) = self.peer {
            v.push(peer_evidence(&p, device, self.fix));
        }
        v
    }
}

/// Evidence about the other device of a dynamic zone (the protected person). Victim data is
/// its own class: the evidence carries the distance and bearing between the subject and the
/// protected person (rounded to 10 m and 10°), never the victim's coordinates or accuracy —
/// it ends up in alerts, the live feeds and the OMS, which officers and systems read.
fn peer_evidence(p: &PeerFix, device: &str, own: Option<&EvidenceFix>) -> EvidenceFix {
    let victim = [p.lon, p.lat];
    let subject = own.and_then(|f| Some([f.lon?, f.lat?]));
    EvidenceFix {
        at: p.at,
        source: EvidenceSource::PeerPosition,
        lat: None,
        lon: None,
        accuracy_m: None,
        distance_m: subject.map(|s| (haversine_m(victim, s) / 10.0).round() * 10.0),
        bearing_deg: subject.map(|s| (bearing_deg(victim, s) / 10.0).round() * 10.0 % 360.0),
        device_id: Some(device.to_string()),
    }
}

/// Classify the available evidence against one zone. None = no evidence about it.
#[allow(clippy::too_many_arguments)]
fn judge<'a>(
    zone: &'a Zone,
    track: &ZoneTrack,
    index: &ZoneIndex,
    rules: &BreachRules,
    fix: Option<&'a EvidenceFix>,
    beacon: Option<&'a EvidenceFix>,
    near: &[ZoneId],
    now: DateTime<Utc>,
) -> Option<Judged<'a>> {
    let buffer = rules.buffer_m.max(0.0);
    if track.is_curfew {
        if let Some(b) = beacon {
            let verdict = if b.source == EvidenceSource::BeaconInRange {
                Verdict::Complying
            } else {
                Verdict::Violating
            };
            return Some(Judged {
                verdict,
                fix: None,
                beacon: Some(b),
                distance_m: None,
                peer: None,
            });
        }
    }
    let f = fix?;
    let (lon, lat) = (f.lon?, f.lat?);
    let acc = f.accuracy_m.unwrap_or(ASSUMED_ACCURACY_M);
    match &zone.geometry {
        CompiledGeometry::Dynamic {
            device_id,
            radius_m,
        } => {
            let peer: PeerFix = index.peer_position(device_id, now)?;
            let d = haversine_m([lon, lat], [peer.lon, peer.lat]) - radius_m;
            Some(Judged {
                verdict: classify(zone.kind, d, acc + peer.accuracy_m + buffer, *radius_m),
                fix: Some(f),
                beacon: None,
                distance_m: Some(d),
                peer: Some((peer, device_id)),
            })
        }
        geometry => {
            if zone.kind == ZoneKind::Exclusion && !near.contains(&zone.id) {
                // Not an R-tree candidate: farther than the margin from the zone.
                return Some(Judged {
                    verdict: Verdict::Complying,
                    fix: Some(f),
                    beacon: None,
                    distance_m: None,
                    peer: None,
                });
            }
            let d = geometry.signed_distance_m(lon, lat)?;
            Some(Judged {
                verdict: classify(zone.kind, d, acc + buffer, geometry.depth_m()),
                fix: Some(f),
                beacon: None,
                distance_m: Some(d),
                peer: None,
            })
        }
    }
}

/// Hysteresis: count evidence towards a change of state, flip when the rules are met.
#[allow(clippy::too_many_arguments)]
fn apply_verdict(
    track: &mut ZoneTrack,
    subject_id: SubjectId,
    rules: &BreachRules,
    judged: &Judged<'_>,
    evidence_at: DateTime<Utc>,
    now: DateTime<Utc>,
    events: &mut Vec<ComplianceEvent>,
) {
    let towards_change = match judged.verdict {
        Verdict::Violating => !track.in_breach(),
        Verdict::Complying => track.in_breach(),
        Verdict::Uncertain => false,
    };
    if !towards_change {
        track.pending = None;
        return;
    }
    let p = track.pending.get_or_insert_with(|| Pending {
        since: evidence_at,
        count: 0,
        evidence: Vec::new(),
    });
    p.count = p.count.saturating_add(1);
    for e in judged.evidence() {
        push_evidence(&mut p.evidence, e);
    }
    let enough_fixes = p.count >= rules.consecutive_fixes.max(1);
    let long_enough = now - p.since >= Duration::seconds(i64::from(rules.persist_secs));
    if enough_fixes || long_enough {
        flip(track, subject_id, now, events);
    }
}

/// Carry out the pending change.
fn flip(
    track: &mut ZoneTrack,
    subject_id: SubjectId,
    now: DateTime<Utc>,
    events: &mut Vec<ComplianceEvent>,
) {
    let Some(p) = track.pending.take() else {
        return;
    };
    match track.breach_since {
        None => {
            track.breach_since = Some(p.since);
            let mut e = track.event(subject_id, ComplianceEventKind::BreachStarted, now, p.since);
            e.evidence = p.evidence;
            events.push(e);
        }
        Some(since) => {
            track.breach_since = None;
            let mut e = track.event(subject_id, ComplianceEventKind::BreachEnded, now, since);
            e.ended_at = Some(p.since.max(since));
            e.reason = Some(EndReason::BackInCompliance);
            e.evidence = p.evidence;
            events.push(e);
        }
    }
}

/// End breach and no-fix states (zone inactive, removed or changed).
fn end_all(
    track: &mut ZoneTrack,
    subject_id: SubjectId,
    at: DateTime<Utc>,
    reason: EndReason,
    events: &mut Vec<ComplianceEvent>,
) {
    track.pending = None;
    if let Some(since) = track.breach_since.take() {
        let mut e = track.event(subject_id, ComplianceEventKind::BreachEnded, at, since);
        e.ended_at = Some(at.max(since));
        e.reason = Some(reason);
        events.push(e);
    }
    if let Some(since) = track.no_fix_since.take() {
        let mut e = track.event(subject_id, ComplianceEventKind::NoFixEnded, at, since);
        e.ended_at = Some(at.max(since));
        e.reason = Some(reason);
        events.push(e);
    }
}
