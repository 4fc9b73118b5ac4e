//! The input of the alert engine: a condition starting, continuing or ending.

use chrono::{DateTime, Utc};
use em_geofence::{ComplianceEvent, ComplianceEventKind, EvidenceFix, EvidenceSource};
use em_model::{AlertKind, DeviceId, SubjectId, ZoneId, ZoneKind};
use serde::{Deserialize, Serialize};

/// One transition produced by the device-health rules ([`crate::health`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthSignal {
    pub kind: AlertKind,
    pub phase: Phase,
    /// Evidence time: device time for device-reported conditions, server time for timers.
    pub at: DateTime<Utc>,
    pub evidence: serde_json::Value,
}

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

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Started => "started",
            Phase::Ongoing => "ongoing",
            Phase::Ended => "ended",
        }
    }
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
    /// `last_contact` (RFC 3339), `silent_secs`, `offset_secs` or `skew_secs` (device clock
    /// minus server clock), `not_charging_secs`, `reason` (`"device_reported"` for jamming the
    /// tag itself reports), `last_valid_fix` (RFC 3339), `no_fix_secs`, and `window_start` /
    /// `window_end` (RFC 3339, the curfew interval in force).
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

/// The alert kind of a breach of `ev`'s zone (victim circle, curfew home, inclusion, exclusion).
fn breach_kind(ev: &ComplianceEvent) -> AlertKind {
    if ev.dynamic_device_id.is_some() {
        AlertKind::VictimProximity
    } else if ev.is_curfew {
        AlertKind::CurfewViolation
    } else if ev.zone_kind == ZoneKind::Inclusion {
        AlertKind::InclusionZoneExit
    } else {
        AlertKind::ExclusionZoneEntry
    }
}

/// The evidence entry with the protected person's coordinates removed (peer evidence carries
/// distance and bearing only).
fn without_victim_position(f: &EvidenceFix) -> EvidenceFix {
    if f.source == EvidenceSource::PeerPosition {
        EvidenceFix {
            lat: None,
            lon: None,
            accuracy_m: None,
            ..f.clone()
        }
    } else {
        f.clone()
    }
}

fn is_own_fix(f: &EvidenceFix) -> bool {
    !matches!(
        f.source,
        EvidenceSource::PeerPosition
            | EvidenceSource::BeaconInRange
            | EvidenceSource::BeaconOutOfRange
    )
}

/// Evidence document of a compliance event: the engine's evidence list plus the keys the
/// message builder reads (see [`Signal::evidence`]).
fn compliance_evidence(ev: &ComplianceEvent, kind: AlertKind) -> serde_json::Value {
    let own = ev
        .evidence
        .iter()
        .filter(|f| is_own_fix(f) && f.lat.is_some() && f.lon.is_some())
        .max_by_key(|f| f.at);
    // Victim data is its own class: whatever the engine handed over, the protected person's
    // coordinates never enter an alert (stored, listed, streamed, published and sent to the OMS).
    let fixes: Vec<EvidenceFix> = ev.evidence.iter().map(without_victim_position).collect();
    let mut doc = serde_json::json!({
        "source": "geofence",
        "compliance_event": ev.kind,
        "zone_id": ev.zone_id,
        "zone_kind": ev.zone_kind,
        "is_curfew": ev.is_curfew,
        "condition_started_at": ev.started_at,
        "decided_at": ev.at,
        "fixes": fixes,
    });
    let Some(obj) = doc.as_object_mut() else {
        return doc;
    };
    let mut put = |k: &str, v: serde_json::Value| {
        obj.insert(k.to_string(), v);
    };
    if let Some(end) = ev.ended_at {
        put("condition_ended_at", serde_json::json!(end));
    }
    if let Some(reason) = ev.reason {
        put("end_reason", serde_json::json!(reason));
    }
    if let Some(w) = ev.window {
        put("window_start", serde_json::json!(w.start));
        put("window_end", serde_json::json!(w.end));
    }
    if let Some(f) = own {
        put("fix_time", serde_json::json!(f.at));
        if let Some(d) = f.distance_m {
            put("boundary_distance_m", serde_json::json!(d));
        }
    }
    if let Some(victim) = &ev.dynamic_device_id {
        put("victim_device_id", serde_json::json!(victim));
        let peer = ev
            .evidence
            .iter()
            .filter(|f| f.source == EvidenceSource::PeerPosition)
            .max_by_key(|f| f.at);
        if let Some(p) = peer {
            if let Some(d) = p.distance_m {
                put("distance_m", serde_json::json!(d));
            }
            if let Some(b) = p.bearing_deg {
                put("bearing_deg", serde_json::json!(b));
            }
        }
    } else if kind == AlertKind::NoFixDuringCurfew {
        if let Some(f) = ev
            .evidence
            .iter()
            .filter(|f| is_own_fix(f))
            .max_by_key(|f| f.at)
        {
            put("last_fix_time", serde_json::json!(f.at));
        }
    } else if let Some(d) = own.and_then(|f| f.distance_m) {
        put("distance_m", serde_json::json!(d));
    }
    doc
}

/// The alert signals of the device-health rules' outcomes for one subject's device (lost
/// communication, battery, charger, tamper, jamming, clock). With [`signals_from_compliance`]
/// this is the one place where rule outcomes become [`Signal`]s.
pub fn signals_from_health(
    sigs: Vec<HealthSignal>,
    subject: SubjectId,
    device: &str,
) -> Vec<Signal> {
    sigs.into_iter()
        .map(|h| {
            Signal::new(h.kind, h.phase, subject, h.at)
                .with_device(device)
                .with_evidence(h.evidence)
        })
        .collect()
}

/// The alert signals of one geofence compliance event: a breach or no-fix start raises an
/// alert (`Started`, at the start of the condition), its end ends it (`Ended`, at the end of
/// the condition). Window open/close events are informational and give no signal.
pub fn signals_from_compliance(ev: &ComplianceEvent) -> Vec<Signal> {
    let (kind, phase, at) = match ev.kind {
        ComplianceEventKind::BreachStarted => (breach_kind(ev), Phase::Started, ev.started_at),
        ComplianceEventKind::BreachEnded => {
            (breach_kind(ev), Phase::Ended, ev.ended_at.unwrap_or(ev.at))
        }
        ComplianceEventKind::NoFixStarted => {
            (AlertKind::NoFixDuringCurfew, Phase::Started, ev.started_at)
        }
        ComplianceEventKind::NoFixEnded => (
            AlertKind::NoFixDuringCurfew,
            Phase::Ended,
            ev.ended_at.unwrap_or(ev.at),
        ),
        ComplianceEventKind::WindowOpened | ComplianceEventKind::WindowClosed => return Vec::new(),
    };
    vec![Signal {
        kind,
        phase,
        subject_id: ev.subject_id,
        device_id: None,
        zone_id: Some(ev.zone_id),
        at,
        evidence: compliance_evidence(ev, kind),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{describe, MessageContext};
    use chrono::TimeZone;
    use em_geofence::monitor::EventWindow;

    fn fix(
        at: DateTime<Utc>,
        source: EvidenceSource,
        lat: f64,
        lon: f64,
        d: Option<f64>,
    ) -> EvidenceFix {
        EvidenceFix {
            at,
            source,
            lat: Some(lat),
            lon: Some(lon),
            accuracy_m: Some(8.0),
            distance_m: d,
            bearing_deg: None,
            device_id: None,
        }
    }

    fn event(kind: ComplianceEventKind) -> ComplianceEvent {
        let t = Utc.with_ymd_and_hms(2025, 1, 15, 22, 13, 5).unwrap();
        ComplianceEvent {
            subject_id: 42,
            zone_id: 7,
            zone_kind: ZoneKind::Inclusion,
            kind,
            is_curfew: true,
            dynamic_device_id: None,
            at: t + chrono::Duration::seconds(60),
            started_at: t,
            ended_at: None,
            window: Some(EventWindow {
                start: Utc.with_ymd_and_hms(2025, 1, 15, 18, 0, 0).unwrap(),
                end: Utc.with_ymd_and_hms(2025, 1, 16, 6, 0, 0).unwrap(),
            }),
            reason: None,
            evidence: vec![
                fix(t, EvidenceSource::Gnss, 55.6774, 12.5713, Some(151.7)),
                fix(
                    t + chrono::Duration::seconds(60),
                    EvidenceSource::Gnss,
                    55.6781,
                    12.5726,
                    Some(240.4),
                ),
            ],
        }
    }

    #[test]
    fn curfew_breach_maps_to_a_curfew_alert_with_a_readable_message() {
        let ev = event(ComplianceEventKind::BreachStarted);
        let s = signals_from_compliance(&ev);
        assert_eq!(s.len(), 1);
        let s = &s[0];
        assert_eq!(
            (s.kind, s.phase),
            (AlertKind::CurfewViolation, Phase::Started)
        );
        assert_eq!(
            (s.subject_id, s.zone_id, s.at),
            (42, Some(7), ev.started_at)
        );
        assert_eq!(s.evidence["distance_m"], serde_json::json!(240.4));
        assert_eq!(s.evidence["fixes"].as_array().map(Vec::len), Some(2));
        let msg = describe(&MessageContext {
            kind: s.kind,
            at: s.at,
            now: s.at,
            tz: chrono_tz::Europe::Copenhagen,
            zone: None,
            evidence: &s.evidence,
        });
        assert_eq!(
            msg,
            "Left home during curfew (curfew 19:00–07:00). Last position 240 m outside the zone at 23:14."
        );
    }

    #[test]
    fn zone_kinds_and_phases_map_to_alert_kinds() {
        let mut ev = event(ComplianceEventKind::BreachEnded);
        let end = ev.at;
        ev.ended_at = Some(end);
        let s = signals_from_compliance(&ev);
        assert_eq!(
            (s[0].kind, s[0].phase, s[0].at),
            (AlertKind::CurfewViolation, Phase::Ended, end)
        );

        ev.is_curfew = false;
        ev.kind = ComplianceEventKind::BreachStarted;
        assert_eq!(
            signals_from_compliance(&ev)[0].kind,
            AlertKind::InclusionZoneExit
        );
        ev.zone_kind = ZoneKind::Exclusion;
        assert_eq!(
            signals_from_compliance(&ev)[0].kind,
            AlertKind::ExclusionZoneEntry
        );

        ev.kind = ComplianceEventKind::NoFixStarted;
        let s = signals_from_compliance(&ev);
        assert_eq!(
            (s[0].kind, s[0].phase),
            (AlertKind::NoFixDuringCurfew, Phase::Started)
        );
        assert!(s[0].evidence.get("last_fix_time").is_some());
        ev.kind = ComplianceEventKind::NoFixEnded;
        assert_eq!(signals_from_compliance(&ev)[0].phase, Phase::Ended);

        for k in [
            ComplianceEventKind::WindowOpened,
            ComplianceEventKind::WindowClosed,
        ] {
            ev.kind = k;
            assert!(signals_from_compliance(&ev).is_empty());
        }
    }

    #[test]
    fn victim_proximity_reports_the_distance_to_the_protected_person() {
        let mut ev = event(ComplianceEventKind::BreachStarted);
        ev.zone_kind = ZoneKind::Exclusion;
        ev.is_curfew = false;
        ev.dynamic_device_id = Some("victim-1".into());
        let t = ev.at;
        // The engine's peer evidence: distance and bearing. Even if a victim position were
        // handed over (older engine, bug), it must not reach the alert.
        let mut peer = fix(t, EvidenceSource::PeerPosition, 55.677718, 12.5699, None);
        peer.distance_m = Some(180.0);
        peer.bearing_deg = Some(200.0);
        peer.device_id = Some("victim-1".into());
        ev.evidence = vec![
            fix(t, EvidenceSource::Gnss, 55.6761, 12.5683, Some(-320.0)),
            peer,
        ];
        let s = &signals_from_compliance(&ev)[0];
        assert_eq!(s.kind, AlertKind::VictimProximity);
        assert_eq!(s.evidence["distance_m"], serde_json::json!(180.0));
        assert_eq!(s.evidence["bearing_deg"], serde_json::json!(200.0));
        let raw = s.evidence.to_string();
        assert!(
            !raw.contains("55.677718") && !raw.contains("12.5699"),
            "{raw}"
        );
        let fixes = s.evidence["fixes"].as_array().unwrap();
        assert_eq!(fixes[1]["source"], "peer_position");
        assert!(fixes[1].get("lat").is_none() && fixes[1].get("accuracy_m").is_none());
        assert_eq!(
            s.evidence["victim_device_id"],
            serde_json::json!("victim-1")
        );
    }
}
