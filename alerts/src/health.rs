//! Device health rules: turn the stream of records of one device (and the passing of time)
//! into alert transitions — lost communication, low battery / battery dead, charger not
//! connected, strap and case tamper, GPS jamming (reported or suspected) and a wrong device
//! clock.
//!
//! [`DeviceHealth`] is a plain state machine with no I/O: the pipeline worker that owns the
//! device calls [`DeviceHealth::on_record`] after the record is stored and
//! [`DeviceHealth::on_tick`] periodically, and hands the returned [`HealthSignal`]s to
//! [`crate::signals_from_health`] — the one place, beside [`crate::signals_from_compliance`]
//! for the geofence rules, where rule outcomes become alert [`crate::Signal`]s.

use chrono::{DateTime, Duration, Utc};
use em_model::{AlertKind, DeviceEventKind, Record};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use crate::signal::HealthSignal;
use crate::signal::Phase;

/// Thresholds of the device-health rules (`[health]` in the configuration).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// No message at all from a device for this long raises "lost communication".
    pub lost_comm_secs: u64,
    /// Battery at or below this percentage raises "low battery".
    pub low_battery_pct: u8,
    /// Battery at or below this percentage (or a device "battery dead" report) raises "battery dead".
    pub battery_dead_pct: u8,
    /// A battery condition ends only when the level is this many points above its threshold.
    pub battery_hysteresis_pct: u8,
    /// Low battery and not charging for this long raises "charger not connected".
    pub charger_grace_secs: u64,
    /// No valid fix for this long while the device keeps talking with good GSM coverage (and is
    /// not at its home unit) raises "GPS jamming suspected".
    pub jamming_no_fix_secs: u64,
    /// Minimum GSM signal (0..=100 %) for a no-fix period to count as suspected jamming.
    pub jamming_min_gsm_pct: u8,
    /// |device time − received time| above this many seconds is a wrong device clock.
    pub clock_skew_secs: u64,
    /// The skew must persist for this long (server time) before it is raised, so a burst of
    /// buffered records uploaded after a coverage gap is not mistaken for a wrong clock.
    pub clock_skew_confirm_secs: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            lost_comm_secs: 1800,
            low_battery_pct: 20,
            battery_dead_pct: 5,
            battery_hysteresis_pct: 5,
            charger_grace_secs: 1800,
            jamming_no_fix_secs: 900,
            jamming_min_gsm_pct: 50,
            clock_skew_secs: 300,
            clock_skew_confirm_secs: 300,
        }
    }
}

impl HealthConfig {
    /// Checks the thresholds are coherent; the error names the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.lost_comm_secs == 0 {
            return Err("health.lost_comm_secs must be > 0".into());
        }
        if self.low_battery_pct > 100 || self.battery_dead_pct > 100 {
            return Err("health battery thresholds must be percentages (0..=100)".into());
        }
        if self.battery_dead_pct >= self.low_battery_pct {
            return Err(format!(
                "health.battery_dead_pct ({}) must be below health.low_battery_pct ({})",
                self.battery_dead_pct, self.low_battery_pct
            ));
        }
        if self.jamming_min_gsm_pct > 100 {
            return Err("health.jamming_min_gsm_pct must be 0..=100".into());
        }
        if self.jamming_no_fix_secs == 0 {
            return Err("health.jamming_no_fix_secs must be > 0".into());
        }
        if self.clock_skew_secs == 0 {
            return Err("health.clock_skew_secs must be > 0".into());
        }
        Ok(())
    }
}

/// Health state of one device.
#[derive(Debug, Clone, Default)]
pub struct DeviceHealth {
    /// Server time of the last message (any kind) from the device.
    last_contact: Option<DateTime<Utc>>,
    lost_comm: bool,
    low_battery: bool,
    battery_dead: bool,
    /// Server time the battery was first seen low while not charging.
    low_not_charging_since: Option<DateTime<Utc>>,
    charging: Option<bool>,
    last_battery: Option<u8>,
    charger_alert: bool,
    strap_tamper: bool,
    case_tamper: bool,
    jamming_reported: bool,
    jamming_suspected: bool,
    /// Server time of the last valid fix (or of the first contact when none yet).
    last_valid_fix: Option<DateTime<Utc>>,
    last_gsm: Option<u8>,
    at_home_unit: bool,
    clock_wrong: bool,
    /// Server time from which the skew has been continuously above the threshold.
    skew_since: Option<DateTime<Utc>>,
    /// Newest trusted device time of a record evaluated: an older (buffered, re-sent) or
    /// untrusted record may raise a condition but never ends one or moves the battery state.
    newest_device_time: Option<DateTime<Utc>>,
    /// Server time this device's last contact was last compared with the shared store
    /// (see [`DeviceHealth::store_check_due`]).
    store_checked_at: Option<DateTime<Utc>>,
}

impl DeviceHealth {
    /// A device never heard from in this process.
    pub fn new() -> Self {
        Self::default()
    }

    /// A device whose last contact is known from the store (so a device that stays silent
    /// across a restart still raises lost communication).
    pub fn with_last_contact(last_contact: DateTime<Utc>) -> Self {
        DeviceHealth {
            last_contact: Some(last_contact),
            last_valid_fix: Some(last_contact),
            ..Self::default()
        }
    }

    /// Server time of the last message, if any.
    pub fn last_contact(&self) -> Option<DateTime<Utc>> {
        self.last_contact
    }

    /// True while "lost communication" is active in this state.
    pub fn is_lost(&self) -> bool {
        self.lost_comm
    }

    /// Whether a device this state believes silent ("lost communication" raised) should be
    /// compared with the shared store again: at most every half `lost_comm_secs`.
    ///
    /// With several ingest instances on one database the device may have come back on another
    /// instance; this state would then stay "lost" for ever and never raise the NEXT outage
    /// (the instance that raised nothing new would be the only one left if the other one is
    /// gone). The check runs only for devices in the lost state, never per record.
    pub fn store_check_due(&self, cfg: &HealthConfig, now: DateTime<Utc>) -> bool {
        let every = secs(cfg.lost_comm_secs / 2).max(Duration::seconds(1));
        self.lost_comm && self.store_checked_at.is_none_or(|t| now - t >= every)
    }

    /// Notes that the store was consulted for this device at `now`.
    pub fn mark_store_checked(&mut self, now: DateTime<Utc>) {
        self.store_checked_at = Some(now);
    }

    /// The shared store shows a contact newer than any this state saw: the device talks to
    /// another ingest instance, so everything this state derived from records (battery, fix,
    /// GSM, tamper, clock) is stale. Forget it, keep `contact` as the last contact, and
    /// re-run the timers at `now` (so a device that came back elsewhere and went silent
    /// again still raises "lost communication" at once).
    ///
    /// An active "lost communication" is dropped WITHOUT an `Ended` signal: the instance that
    /// received the device's next message ends it (its own state had raised it too, and the
    /// alert service folds both raises into one alert); an end from here could only guess
    /// when the device resumed.
    pub fn adopt_store_contact(
        &mut self,
        cfg: &HealthConfig,
        contact: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Vec<HealthSignal> {
        let checked = self.store_checked_at;
        *self = DeviceHealth::with_last_contact(contact);
        self.store_checked_at = checked;
        self.on_tick(cfg, now)
    }

    /// Evaluate one stored record.
    ///
    /// Device time orders the record only when the time policy trusts it
    /// ([`Record::time_trusted`]) and it is not older than the newest record evaluated. Other
    /// records (a clock years off, a re-sent or buffered old report) still raise what they
    /// report — a tamper is never dropped — stamped with the server's receive time when the
    /// device time is untrusted, but they end nothing and move no battery, charger, jamming or
    /// home-unit state: one bad record must not close an open strap alert.
    pub fn on_record(&mut self, cfg: &HealthConfig, rec: &Record) -> Vec<HealthSignal> {
        let mut out = Vec::new();
        let now = rec.received_time;
        let trusted = rec.time_trusted();
        let at = if trusted { rec.device_time } else { now };
        let in_order = trusted && self.newest_device_time.is_none_or(|n| rec.device_time >= n);
        if in_order {
            self.newest_device_time = Some(rec.device_time);
        }

        // Lost communication ends with any message.
        if self.lost_comm {
            self.lost_comm = false;
            out.push(signal(
                AlertKind::LostCommunication,
                Phase::Ended,
                now,
                json!({"last_contact": self.last_contact, "resumed_at": now}),
            ));
        }
        // Buffered records can arrive out of order: keep the newest contact.
        self.last_contact = Some(self.last_contact.map_or(now, |t| t.max(now)));
        if self.last_valid_fix.is_none() {
            self.last_valid_fix = Some(now);
        }

        self.tamper_rules(rec, at, in_order, &mut out);
        unknown_alarm_rule(rec, at, &mut out);
        if in_order {
            if let Some(g) = rec.gsm_signal {
                self.last_gsm = Some(g);
            }
            if let Some(b) = rec.beacon_in_range {
                self.at_home_unit = b;
            }
            if rec.events.contains(&DeviceEventKind::BeaconInRange) {
                self.at_home_unit = true;
            }
            if rec.events.contains(&DeviceEventKind::BeaconOutOfRange) {
                self.at_home_unit = false;
            }
            self.battery_rules(cfg, rec, &mut out);
            self.jamming_on_record(cfg, rec, &mut out);
        }
        self.clock_rule(cfg, rec, &mut out);
        self.charger_timer(cfg, now, at, &mut out);
        out
    }

    /// Evaluate timers at server time `now`.
    pub fn on_tick(&mut self, cfg: &HealthConfig, now: DateTime<Utc>) -> Vec<HealthSignal> {
        let mut out = Vec::new();
        if let Some(last) = self.last_contact {
            if !self.lost_comm && now - last >= secs(cfg.lost_comm_secs) {
                self.lost_comm = true;
                out.push(signal(
                    AlertKind::LostCommunication,
                    Phase::Started,
                    now,
                    json!({"last_contact": last, "silent_secs": (now - last).num_seconds()}),
                ));
            }
        }
        // Timers that need the device to be talking are evaluated only while it is.
        if !self.lost_comm {
            self.jamming_timer(cfg, now, &mut out);
            self.charger_timer(cfg, now, now, &mut out);
        }
        out
    }

    /// Strap and case: raised from any record at `at`; ended only by an in-order record.
    fn tamper_rules(
        &mut self,
        rec: &Record,
        at: DateTime<Utc>,
        may_end: bool,
        out: &mut Vec<HealthSignal>,
    ) {
        for ev in &rec.events {
            let (flag, kind, phase) = match ev {
                DeviceEventKind::StrapTamper => {
                    (&mut self.strap_tamper, AlertKind::StrapTamper, true)
                }
                DeviceEventKind::StrapRestored => {
                    (&mut self.strap_tamper, AlertKind::StrapTamper, false)
                }
                DeviceEventKind::CaseTamper => (&mut self.case_tamper, AlertKind::CaseTamper, true),
                DeviceEventKind::CaseRestored => {
                    (&mut self.case_tamper, AlertKind::CaseTamper, false)
                }
                _ => continue,
            };
            let evidence = json!({
                "event": ev,
                "device_time": rec.device_time,
                "received_time": rec.received_time,
                "time_status": rec.time_status(),
                "position": rec.position,
            });
            match (phase, *flag) {
                (true, false) => {
                    *flag = true;
                    out.push(signal(kind, Phase::Started, at, evidence));
                }
                (true, true) => out.push(signal(kind, Phase::Ongoing, at, evidence)),
                (false, true) if may_end => {
                    *flag = false;
                    out.push(signal(kind, Phase::Ended, at, evidence));
                }
                (false, _) => {}
            }
        }
    }

    fn battery_rules(&mut self, cfg: &HealthConfig, rec: &Record, out: &mut Vec<HealthSignal>) {
        let at = rec.device_time;
        let now = rec.received_time;
        if let Some(c) = rec.charging {
            self.charging = Some(c);
        }
        if rec.events.contains(&DeviceEventKind::ChargerConnected) {
            self.charging = Some(true);
        }
        if rec.events.contains(&DeviceEventKind::ChargerDisconnected) {
            self.charging = Some(false);
        }
        if let Some(b) = rec.battery_pct {
            self.last_battery = Some(b.min(100));
        }
        let level = self.last_battery;
        let evidence = json!({
            "battery_pct": level,
            "charging": self.charging,
            "device_time": at,
        });

        let reported_dead = rec.events.contains(&DeviceEventKind::BatteryDead);
        let reported_low = rec.events.contains(&DeviceEventKind::LowBattery);
        let hyst = u16::from(cfg.battery_hysteresis_pct);

        // Battery dead.
        let dead_now = reported_dead || level.is_some_and(|b| b <= cfg.battery_dead_pct);
        let dead_over =
            level.is_some_and(|b| u16::from(b) > u16::from(cfg.battery_dead_pct) + hyst);
        if dead_now && !self.battery_dead {
            self.battery_dead = true;
            out.push(signal(
                AlertKind::BatteryDead,
                Phase::Started,
                at,
                evidence.clone(),
            ));
        } else if self.battery_dead && !reported_dead && dead_over {
            self.battery_dead = false;
            out.push(signal(
                AlertKind::BatteryDead,
                Phase::Ended,
                at,
                evidence.clone(),
            ));
        }

        // Low battery.
        let low_now = reported_low || dead_now || level.is_some_and(|b| b <= cfg.low_battery_pct);
        let low_over = level.is_some_and(|b| u16::from(b) > u16::from(cfg.low_battery_pct) + hyst);
        if low_now && !self.low_battery {
            self.low_battery = true;
            out.push(signal(
                AlertKind::LowBattery,
                Phase::Started,
                at,
                evidence.clone(),
            ));
        } else if self.low_battery && !reported_low && !dead_now && low_over {
            self.low_battery = false;
            out.push(signal(
                AlertKind::LowBattery,
                Phase::Ended,
                at,
                evidence.clone(),
            ));
        }

        // Charger timer bookkeeping.
        let charging = self.charging == Some(true);
        if self.low_battery && !charging {
            if self.low_not_charging_since.is_none() {
                self.low_not_charging_since = Some(now);
            }
        } else {
            self.low_not_charging_since = None;
            if self.charger_alert {
                self.charger_alert = false;
                out.push(signal(
                    AlertKind::ChargerNotConnected,
                    Phase::Ended,
                    at,
                    evidence,
                ));
            }
        }
    }

    fn charger_timer(
        &mut self,
        cfg: &HealthConfig,
        now: DateTime<Utc>,
        at: DateTime<Utc>,
        out: &mut Vec<HealthSignal>,
    ) {
        if let Some(since) = self.low_not_charging_since {
            if !self.charger_alert && now - since >= secs(cfg.charger_grace_secs) {
                self.charger_alert = true;
                out.push(signal(
                    AlertKind::ChargerNotConnected,
                    Phase::Started,
                    at,
                    json!({
                        "battery_pct": self.last_battery,
                        "low_since": since,
                        "not_charging_secs": (now - since).num_seconds(),
                    }),
                ));
            }
        }
    }

    fn jamming_on_record(&mut self, cfg: &HealthConfig, rec: &Record, out: &mut Vec<HealthSignal>) {
        let at = rec.device_time;
        let now = rec.received_time;
        let valid_fix = rec
            .position
            .is_some_and(|p| p.valid && p.source == em_model::FixSource::Gnss);
        if rec.events.contains(&DeviceEventKind::GpsJamming) {
            let evidence = json!({"reason": "device_reported", "device_time": at, "gsm_signal": self.last_gsm});
            if self.jamming_reported || self.jamming_suspected {
                out.push(signal(
                    AlertKind::GpsJammingSuspected,
                    Phase::Ongoing,
                    at,
                    evidence,
                ));
            } else {
                out.push(signal(
                    AlertKind::GpsJammingSuspected,
                    Phase::Started,
                    at,
                    evidence,
                ));
            }
            self.jamming_reported = true;
        } else if valid_fix && (self.jamming_reported || self.jamming_suspected) {
            self.jamming_reported = false;
            self.jamming_suspected = false;
            out.push(signal(
                AlertKind::GpsJammingSuspected,
                Phase::Ended,
                at,
                json!({"reason": "valid_fix", "device_time": at, "position": rec.position}),
            ));
        }
        if valid_fix {
            self.last_valid_fix = Some(self.last_valid_fix.map_or(now, |t| t.max(now)));
        } else {
            self.jamming_timer(cfg, now, out);
        }
    }

    fn jamming_timer(
        &mut self,
        cfg: &HealthConfig,
        now: DateTime<Utc>,
        out: &mut Vec<HealthSignal>,
    ) {
        if self.jamming_reported || self.jamming_suspected || self.at_home_unit {
            return;
        }
        let Some(last_fix) = self.last_valid_fix else {
            return;
        };
        let good_gsm = self.last_gsm.is_some_and(|g| g >= cfg.jamming_min_gsm_pct);
        if good_gsm && now - last_fix >= secs(cfg.jamming_no_fix_secs) {
            self.jamming_suspected = true;
            out.push(signal(
                AlertKind::GpsJammingSuspected,
                Phase::Started,
                now,
                json!({
                    "reason": "no_fix_with_good_gsm",
                    "last_valid_fix": last_fix,
                    "no_fix_secs": (now - last_fix).num_seconds(),
                    "gsm_signal": self.last_gsm,
                }),
            ));
        }
    }

    fn clock_rule(&mut self, cfg: &HealthConfig, rec: &Record, out: &mut Vec<HealthSignal>) {
        let skew = rec.device_time - rec.received_time;
        let skewed = skew.num_seconds().unsigned_abs() > cfg.clock_skew_secs;
        let evidence = json!({
            "device_time": rec.device_time,
            "received_time": rec.received_time,
            "skew_secs": skew.num_seconds(),
            "time_status": rec.time_status(),
        });
        if skewed {
            let since = *self.skew_since.get_or_insert(rec.received_time);
            // A time in the future beyond the policy is raised at once: its record moved no
            // state, and whoever watches the subject must know why. (A far-past time may be a
            // long buffered backlog: it must persist like any other skew.)
            let refused = rec.time_status() == em_model::TimeStatus::Future;
            if !self.clock_wrong
                && (refused || rec.received_time - since >= secs(cfg.clock_skew_confirm_secs))
            {
                self.clock_wrong = true;
                out.push(signal(
                    AlertKind::DeviceClockWrong,
                    Phase::Started,
                    rec.received_time,
                    evidence,
                ));
            }
        } else {
            self.skew_since = None;
            if self.clock_wrong {
                self.clock_wrong = false;
                out.push(signal(
                    AlertKind::DeviceClockWrong,
                    Phase::Ended,
                    rec.received_time,
                    evidence,
                ));
            }
        }
    }
}

fn secs(s: u64) -> Duration {
    Duration::seconds(i64::try_from(s).unwrap_or(i64::MAX / 1000))
}

/// An alarm the decoder could not map ("unknown alarm (code)") is raised every time it is
/// reported: it may be a tamper or an SOS, so a person looks at it (repeats fold into the open
/// alert). It has no end: the device sends no "alarm over" for a code we cannot read.
/// An alarm with no exact meaning is raised every time, at `at` (the device time when the time
/// policy trusts it, else the server's receive time): never dropped, never read as another.
fn unknown_alarm_rule(rec: &Record, at: DateTime<Utc>, out: &mut Vec<HealthSignal>) {
    for ev in &rec.events {
        if let DeviceEventKind::UnknownAlarm { code } = ev {
            out.push(signal(
                AlertKind::UnknownAlarm,
                Phase::Started,
                at,
                json!({
                    "code": code,
                    "protocol": rec.protocol.as_str(),
                    "device_time": rec.device_time,
                    "position": rec.position,
                }),
            ));
        }
    }
}

fn signal(
    kind: AlertKind,
    phase: Phase,
    at: DateTime<Utc>,
    evidence: serde_json::Value,
) -> HealthSignal {
    HealthSignal {
        kind,
        phase,
        at,
        evidence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use em_model::{FixSource, Position, Protocol};

    fn t0() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap()
    }

    fn rec_at(secs_after: i64) -> Record {
        let t = t0() + Duration::seconds(secs_after);
        Record::new("dev1", Protocol::Gt06, t)
    }

    fn fix(valid: bool) -> Position {
        Position {
            lat: 55.0,
            lon: 12.0,
            accuracy_m: Some(10.0),
            speed_kmh: None,
            course_deg: None,
            altitude_m: None,
            satellites: Some(8),
            valid,
            source: FixSource::Gnss,
        }
    }

    fn kinds(sigs: &[HealthSignal]) -> Vec<(AlertKind, Phase)> {
        sigs.iter().map(|s| (s.kind, s.phase)).collect()
    }

    #[test]
    fn lost_communication_starts_on_tick_and_ends_with_next_message() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        assert!(
            h.on_tick(&cfg, t0()).is_empty(),
            "never-seen device has no timer"
        );
        h.on_record(&cfg, &rec_at(0));
        assert!(h.on_tick(&cfg, t0() + Duration::seconds(1799)).is_empty());
        let s = h.on_tick(&cfg, t0() + Duration::seconds(1800));
        assert_eq!(
            kinds(&s),
            vec![(AlertKind::LostCommunication, Phase::Started)]
        );
        assert!(
            h.on_tick(&cfg, t0() + Duration::seconds(4000)).is_empty(),
            "raised once"
        );
        let s = h.on_record(&cfg, &rec_at(5000));
        assert_eq!(
            kinds(&s),
            vec![(AlertKind::LostCommunication, Phase::Ended)]
        );
    }

    #[test]
    fn lost_communication_survives_restart_via_last_contact() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::with_last_contact(t0());
        let s = h.on_tick(&cfg, t0() + Duration::hours(1));
        assert_eq!(
            kinds(&s),
            vec![(AlertKind::LostCommunication, Phase::Started)]
        );
    }

    #[test]
    fn low_battery_and_dead_with_hysteresis() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let mut r = rec_at(0);
        r.battery_pct = Some(50);
        assert!(h.on_record(&cfg, &r).is_empty());
        r.battery_pct = Some(20);
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::LowBattery, Phase::Started)]
        );
        r.battery_pct = Some(4);
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::BatteryDead, Phase::Started)]
        );
        // Within hysteresis: nothing ends.
        r.battery_pct = Some(9);
        assert!(h.on_record(&cfg, &r).is_empty());
        r.battery_pct = Some(11);
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::BatteryDead, Phase::Ended)]
        );
        r.battery_pct = Some(25);
        assert!(h.on_record(&cfg, &r).is_empty());
        r.battery_pct = Some(26);
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::LowBattery, Phase::Ended)]
        );
    }

    #[test]
    fn device_reported_battery_events_count() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let mut r = rec_at(0);
        r.events = vec![DeviceEventKind::BatteryDead];
        let s = kinds(&h.on_record(&cfg, &r));
        assert!(s.contains(&(AlertKind::BatteryDead, Phase::Started)));
        assert!(s.contains(&(AlertKind::LowBattery, Phase::Started)));
    }

    #[test]
    fn charger_not_connected_after_grace_and_ends_on_charging() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let mut r = rec_at(0);
        r.battery_pct = Some(15);
        r.charging = Some(false);
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::LowBattery, Phase::Started)]
        );
        // Keep talking so lost-comm does not fire, still not charging.
        let mut r2 = rec_at(1000);
        r2.battery_pct = Some(14);
        assert!(h.on_record(&cfg, &r2).is_empty());
        let s = h.on_tick(&cfg, t0() + Duration::seconds(1800));
        assert_eq!(
            kinds(&s),
            vec![(AlertKind::ChargerNotConnected, Phase::Started)]
        );
        let mut r3 = rec_at(1900);
        r3.events = vec![DeviceEventKind::ChargerConnected];
        assert_eq!(
            kinds(&h.on_record(&cfg, &r3)),
            vec![(AlertKind::ChargerNotConnected, Phase::Ended)]
        );
    }

    #[test]
    fn unknown_alarm_raises_an_alert_with_its_code() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let mut r = rec_at(0);
        r.events = vec![DeviceEventKind::UnknownAlarm { code: 0x37 }];
        let out = h.on_record(&cfg, &r);
        assert_eq!(kinds(&out), vec![(AlertKind::UnknownAlarm, Phase::Started)]);
        assert_eq!(out[0].evidence["code"], 0x37);
        assert_eq!(out[0].evidence["protocol"], "gt06");
        // Reported again: raised again (the alert service folds it into the open alert).
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::UnknownAlarm, Phase::Started)]
        );
    }

    #[test]
    fn strap_and_case_tamper_start_repeat_and_restore() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let mut r = rec_at(0);
        r.events = vec![DeviceEventKind::StrapTamper];
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::StrapTamper, Phase::Started)]
        );
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::StrapTamper, Phase::Ongoing)]
        );
        r.events = vec![DeviceEventKind::StrapRestored, DeviceEventKind::CaseTamper];
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![
                (AlertKind::StrapTamper, Phase::Ended),
                (AlertKind::CaseTamper, Phase::Started)
            ]
        );
        r.events = vec![DeviceEventKind::CaseRestored];
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::CaseTamper, Phase::Ended)]
        );
        // A restore without an active tamper is not a transition.
        assert!(h.on_record(&cfg, &r).is_empty());
    }

    #[test]
    fn reported_jamming_starts_and_valid_fix_ends_it() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let mut r = rec_at(0);
        r.events = vec![DeviceEventKind::GpsJamming];
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::GpsJammingSuspected, Phase::Started)]
        );
        let mut r2 = rec_at(60);
        r2.position = Some(fix(true));
        assert_eq!(
            kinds(&h.on_record(&cfg, &r2)),
            vec![(AlertKind::GpsJammingSuspected, Phase::Ended)]
        );
    }

    #[test]
    fn long_no_fix_with_good_gsm_is_suspected_jamming() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let mut r = rec_at(0);
        r.position = Some(fix(true));
        r.gsm_signal = Some(80);
        assert!(h.on_record(&cfg, &r).is_empty());
        let mut r = rec_at(600);
        r.position = Some(fix(false));
        r.gsm_signal = Some(80);
        assert!(h.on_record(&cfg, &r).is_empty());
        let mut r = rec_at(900);
        r.position = Some(fix(false));
        r.gsm_signal = Some(80);
        assert_eq!(
            kinds(&h.on_record(&cfg, &r)),
            vec![(AlertKind::GpsJammingSuspected, Phase::Started)]
        );
    }

    #[test]
    fn no_fix_with_poor_gsm_or_at_home_unit_is_not_jamming() {
        let cfg = HealthConfig::default();
        let mut poor = DeviceHealth::new();
        let mut r = rec_at(0);
        r.gsm_signal = Some(20);
        poor.on_record(&cfg, &r);
        assert!(poor
            .on_tick(&cfg, t0() + Duration::seconds(1000))
            .is_empty());

        let mut home = DeviceHealth::new();
        let mut r = rec_at(0);
        r.gsm_signal = Some(90);
        r.beacon_in_range = Some(true);
        home.on_record(&cfg, &r);
        assert!(home
            .on_tick(&cfg, t0() + Duration::seconds(1000))
            .is_empty());
    }

    #[test]
    fn clock_skew_needs_to_persist_and_ends_when_clock_is_right() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        // Device clock one hour behind.
        let mk = |recv: i64| {
            let mut r = rec_at(recv);
            r.device_time = r.received_time - Duration::hours(1);
            r
        };
        assert!(h.on_record(&cfg, &mk(0)).is_empty());
        assert!(h.on_record(&cfg, &mk(200)).is_empty());
        assert_eq!(
            kinds(&h.on_record(&cfg, &mk(300))),
            vec![(AlertKind::DeviceClockWrong, Phase::Started)]
        );
        assert!(h.on_record(&cfg, &mk(400)).is_empty());
        assert_eq!(
            kinds(&h.on_record(&cfg, &rec_at(500))),
            vec![(AlertKind::DeviceClockWrong, Phase::Ended)]
        );
    }

    #[test]
    fn buffered_backlog_is_not_a_wrong_clock() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        // 50 old records (30 s apart, 2 h ago) uploaded within a few seconds, then live data.
        for i in 0..50 {
            let mut r = rec_at(i / 10);
            r.device_time = t0() - Duration::hours(2) + Duration::seconds(i * 30);
            assert!(h.on_record(&cfg, &r).is_empty());
        }
        assert!(h.on_record(&cfg, &rec_at(10)).is_empty());
        assert!(h.on_record(&cfg, &rec_at(400)).is_empty());
    }

    #[test]
    fn config_validation_names_the_key() {
        let cfg = HealthConfig {
            battery_dead_pct: 30,
            ..HealthConfig::default()
        };
        let err = cfg.validate().unwrap_err();
        assert!(err.contains("battery_dead_pct"), "{err}");
        assert!(HealthConfig::default().validate().is_ok());
    }

    /// A record the device dates `device_secs` after t0, received `recv_secs` after t0.
    fn rec_dated(device: DateTime<Utc>, recv_secs: i64) -> Record {
        let mut r = rec_at(recv_secs);
        r.device_time = device;
        r
    }

    #[test]
    fn untrusted_or_old_records_raise_but_never_end_a_tamper() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let far_future = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap();
        // A strap cut reported with a clock years ahead is raised, at the server's time.
        let mut cut = rec_dated(far_future, 10);
        cut.events = vec![DeviceEventKind::StrapTamper];
        let s = h.on_record(&cfg, &cut);
        assert!(kinds(&s).contains(&(AlertKind::StrapTamper, Phase::Started)));
        let started = s.iter().find(|x| x.kind == AlertKind::StrapTamper).unwrap();
        assert_eq!(
            started.at,
            t0() + Duration::seconds(10),
            "server time, not 2099"
        );
        assert!(
            kinds(&s).contains(&(AlertKind::DeviceClockWrong, Phase::Started)),
            "a refused future time raises the clock alert at once"
        );
        // A "restored" dated in the future does not end it ...
        let mut restored = rec_dated(far_future + Duration::seconds(5), 20);
        restored.events = vec![DeviceEventKind::StrapRestored];
        assert!(
            !kinds(&h.on_record(&cfg, &restored)).contains(&(AlertKind::StrapTamper, Phase::Ended))
        );
        // ... a live record at t0+30 moves the order on, and a re-sent older "restored"
        // (device time t0+25, buffered) does not end it either ...
        h.on_record(&cfg, &rec_at(30));
        let mut old_restore = rec_dated(t0() + Duration::seconds(25), 40);
        old_restore.events = vec![DeviceEventKind::StrapRestored];
        assert!(!kinds(&h.on_record(&cfg, &old_restore))
            .contains(&(AlertKind::StrapTamper, Phase::Ended)));
        // ... only a trusted, in-order one does.
        let mut live_restore = rec_at(50);
        live_restore.events = vec![DeviceEventKind::StrapRestored];
        assert!(kinds(&h.on_record(&cfg, &live_restore))
            .contains(&(AlertKind::StrapTamper, Phase::Ended)));
    }

    #[test]
    fn an_old_battery_report_does_not_move_the_battery_state() {
        let cfg = HealthConfig::default();
        let mut h = DeviceHealth::new();
        let mut live = rec_at(100);
        live.battery_pct = Some(80);
        assert!(h.on_record(&cfg, &live).is_empty());
        // A buffered report from before says 3 %: it is history, not the battery now.
        let mut old = rec_dated(t0() + Duration::seconds(10), 110);
        old.battery_pct = Some(3);
        let s = h.on_record(&cfg, &old);
        assert!(
            !kinds(&s)
                .iter()
                .any(|(k, _)| matches!(k, AlertKind::LowBattery | AlertKind::BatteryDead)),
            "{s:?}"
        );
        // Nor does a future-dated one.
        let mut future = rec_dated(Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap(), 120);
        future.battery_pct = Some(3);
        let s = h.on_record(&cfg, &future);
        assert!(!kinds(&s)
            .iter()
            .any(|(k, _)| matches!(k, AlertKind::LowBattery | AlertKind::BatteryDead)));
    }
}
