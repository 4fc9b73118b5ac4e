//! Scripted behaviours of simulated subjects and what each report of a device contains.
//!
//! A [`DeviceScript`] is the per-device state machine: given the time since the simulation
//! started it moves the subject ([`super::track::Mover`]), drains the battery, injects
//! device events (strap cut) and says which alert the report should provoke, so the
//! simulator can measure fix→alert latency.

use super::track::{distance_m, street_route, Gait, GpsModel, Mover};
use em_model::{
    AlertKind, DeviceEventKind, DeviceId, LonLat, Position, Protocol, SubjectId, ZoneId,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Battery level at or below which a low-battery alert is expected.
pub const LOW_BATTERY_PCT: u8 = 20;

/// What a simulated subject does. Times are seconds after the simulation started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Behaviour {
    /// Stays at home (curfew-compliant), moving about inside.
    AtHome,
    /// Out and about around home by day: walks (and sometimes rides) within `radius_m`.
    Roam { radius_m: f64 },
    /// Leaves home during the curfew after `after_secs`, driving to `to`.
    LeaveHome { after_secs: u32, to: LonLat },
    /// Starts at `start` (out of home, e.g. on an approved absence) and after `after_secs`
    /// cycles into the exclusion zone around `target`, which is about `radius_m` across.
    EnterZone {
        after_secs: u32,
        start: LonLat,
        target: LonLat,
        radius_m: f64,
        zone_id: Option<ZoneId>,
    },
    /// Stays home and cuts the strap after `after_secs` (tamper alarm).
    StrapCut { after_secs: u32 },
    /// Stays home while the battery runs down from `start_pct` by `drop_per_fix` per report,
    /// to no lower than `min_pct`.
    BatteryDrain {
        start_pct: u8,
        drop_per_fix: u8,
        min_pct: u8,
    },
    /// Stays home and stops reporting after `after_secs` (lost communication).
    GoSilent { after_secs: u32 },
    /// Starts at `start`, after `after_secs` cycles towards the victim at `victim_at`
    /// (whose device `victim_device` carries a dynamic exclusion zone of `radius_m`).
    ApproachVictim {
        after_secs: u32,
        start: LonLat,
        victim_device: DeviceId,
        victim_at: LonLat,
        radius_m: f64,
    },
    /// A victim's own device: stays near `at`.
    Victim { at: LonLat },
}

impl Behaviour {
    /// Short name for reports.
    pub fn name(&self) -> &'static str {
        match self {
            Behaviour::AtHome => "at_home",
            Behaviour::Roam { .. } => "roam",
            Behaviour::LeaveHome { .. } => "leave_home",
            Behaviour::EnterZone { .. } => "enter_zone",
            Behaviour::StrapCut { .. } => "strap_cut",
            Behaviour::BatteryDrain { .. } => "battery_drain",
            Behaviour::GoSilent { .. } => "go_silent",
            Behaviour::ApproachVictim { .. } => "approach_victim",
            Behaviour::Victim { .. } => "victim",
        }
    }

    /// The alert this behaviour is meant to provoke, if any.
    pub fn expected_alert(&self) -> Option<AlertKind> {
        match self {
            Behaviour::AtHome | Behaviour::Roam { .. } | Behaviour::Victim { .. } => None,
            Behaviour::LeaveHome { .. } => Some(AlertKind::CurfewViolation),
            Behaviour::EnterZone { .. } => Some(AlertKind::ExclusionZoneEntry),
            Behaviour::StrapCut { .. } => Some(AlertKind::StrapTamper),
            Behaviour::BatteryDrain { .. } => Some(AlertKind::LowBattery),
            Behaviour::GoSilent { .. } => Some(AlertKind::LostCommunication),
            Behaviour::ApproachVictim { .. } => Some(AlertKind::VictimProximity),
        }
    }
}

/// One simulated device and the subject wearing it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimDevice {
    pub device_id: DeviceId,
    /// `Gt06`, `Teltonika` or `Em` (MQTT).
    pub protocol: Protocol,
    /// MQTT password for EM devices (None = connect without credentials).
    pub secret: Option<String>,
    pub subject_id: Option<SubjectId>,
    /// Centre of the home.
    pub home: LonLat,
    /// Radius of the home (curfew) zone, metres.
    pub home_radius_m: f64,
    pub behaviour: Behaviour,
}

/// What one report of a device carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub position: Position,
    pub battery_pct: u8,
    pub charging: bool,
    /// False once the strap has been cut (it stays cut).
    pub strap_intact: bool,
    pub events: Vec<DeviceEventKind>,
    /// The alert this report should provoke (or keep provoking), for latency measurement.
    pub expect_alert: Option<AlertKind>,
}

/// Output of one tick of a [`DeviceScript`].
#[derive(Debug, Clone, PartialEq)]
pub enum Tick {
    Report(Report),
    /// The device has gone silent for good (lost communication).
    Silent,
}

/// Per-device state machine producing reports.
#[derive(Debug, Clone)]
pub struct DeviceScript {
    behaviour: Behaviour,
    mover: Mover,
    gps: GpsModel,
    rng: StdRng,
    battery: f64,
    drain_per_fix: f64,
    battery_floor: f64,
    started: bool,
    strap_cut_sent: bool,
    low_battery_sent: bool,
    home: LonLat,
    home_radius_m: f64,
}

/// How far inside the home a compliant subject moves about (metres): a flat or a garden.
fn indoor_radius(home_radius_m: f64) -> f64 {
    (home_radius_m * 0.25).clamp(5.0, 25.0)
}

impl DeviceScript {
    /// Script for `device`, deterministic for a given `seed`.
    pub fn new(device: &SimDevice, seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let home = device.home;
        let inside = indoor_radius(device.home_radius_m);
        let mover = match &device.behaviour {
            Behaviour::Roam { radius_m } => Mover::wander(home, home, *radius_m, Gait::Walking),
            Behaviour::EnterZone { start, .. } | Behaviour::ApproachVictim { start, .. } => {
                Mover::wander(*start, *start, 15.0, Gait::Walking)
            }
            Behaviour::Victim { at } => Mover::wander(*at, *at, 15.0, Gait::Indoor),
            _ => Mover::wander(home, home, inside, Gait::Indoor),
        };
        let (battery, drain_per_fix, battery_floor) = match &device.behaviour {
            Behaviour::BatteryDrain {
                start_pct,
                drop_per_fix,
                min_pct,
            } => (
                f64::from(*start_pct.min(&100)),
                f64::from(*drop_per_fix),
                f64::from(*min_pct.min(start_pct)),
            ),
            _ => (rng.gen_range(60.0..100.0), 0.02, 40.0),
        };
        DeviceScript {
            behaviour: device.behaviour.clone(),
            mover,
            gps: GpsModel::default(),
            rng,
            battery,
            drain_per_fix,
            battery_floor,
            started: false,
            strap_cut_sent: false,
            low_battery_sent: false,
            home,
            home_radius_m: device.home_radius_m,
        }
    }

    pub fn behaviour(&self) -> &Behaviour {
        &self.behaviour
    }

    /// True position of the subject (before GNSS error).
    pub fn true_position(&self) -> LonLat {
        self.mover.position()
    }

    pub fn gait(&self) -> Gait {
        self.mover.gait()
    }

    /// Advance by `dt_s` seconds to `elapsed_s` seconds after the start and produce the
    /// device's report.
    pub fn tick(&mut self, elapsed_s: f64, dt_s: f64) -> Tick {
        let after = |secs: &u32| elapsed_s >= f64::from(*secs);
        match &self.behaviour {
            Behaviour::GoSilent { after_secs } if after(after_secs) => return Tick::Silent,
            Behaviour::LeaveHome { after_secs, to } if !self.started && after(after_secs) => {
                let route = street_route(self.mover.position(), *to, &mut self.rng);
                self.mover
                    .set_route(route, Gait::Driving, 40.0, Gait::Walking);
                self.started = true;
            }
            Behaviour::EnterZone {
                after_secs, target, ..
            } if !self.started && after(after_secs) => {
                let route = street_route(self.mover.position(), *target, &mut self.rng);
                self.mover
                    .set_route(route, Gait::Cycling, 20.0, Gait::Walking);
                self.started = true;
            }
            Behaviour::ApproachVictim {
                after_secs,
                victim_at,
                ..
            } if !self.started && after(after_secs) => {
                let route = street_route(self.mover.position(), *victim_at, &mut self.rng);
                self.mover
                    .set_route(route, Gait::Cycling, 20.0, Gait::Walking);
                self.started = true;
            }
            _ => {}
        }
        self.mover.step(dt_s, &mut self.rng);
        let position = self.gps.observe(&self.mover, &mut self.rng);
        self.battery =
            (self.battery - self.drain_per_fix).max(self.battery_floor.min(self.battery));
        let battery_pct = self.battery.round().clamp(0.0, 100.0) as u8;
        let mut events = Vec::new();
        let here = self.mover.position();
        let expect_alert = match &self.behaviour {
            Behaviour::LeaveHome { .. } => (self.started
                && distance_m(here, self.home) > self.home_radius_m)
                .then_some(AlertKind::CurfewViolation),
            Behaviour::EnterZone {
                target, radius_m, ..
            } => (self.started && distance_m(here, *target) <= *radius_m)
                .then_some(AlertKind::ExclusionZoneEntry),
            Behaviour::ApproachVictim {
                victim_at,
                radius_m,
                ..
            } => (self.started && distance_m(here, *victim_at) <= *radius_m)
                .then_some(AlertKind::VictimProximity),
            Behaviour::StrapCut { after_secs } if after(after_secs) && !self.strap_cut_sent => {
                self.strap_cut_sent = true;
                events.push(DeviceEventKind::StrapTamper);
                Some(AlertKind::StrapTamper)
            }
            Behaviour::BatteryDrain { .. } if battery_pct <= LOW_BATTERY_PCT => {
                // The device flags the crossing once; the level itself keeps reporting it.
                if !self.low_battery_sent {
                    self.low_battery_sent = true;
                    events.push(DeviceEventKind::LowBattery);
                }
                Some(AlertKind::LowBattery)
            }
            _ => None,
        };
        Tick::Report(Report {
            position,
            battery_pct,
            charging: false,
            strap_intact: !self.strap_cut_sent,
            events,
            expect_alert,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::offset;

    const HOME: LonLat = [12.5496, 55.6929];

    fn device(behaviour: Behaviour) -> SimDevice {
        SimDevice {
            device_id: "356307042441013".into(),
            protocol: Protocol::Gt06,
            secret: None,
            subject_id: Some(1),
            home: HOME,
            home_radius_m: 120.0,
            behaviour,
        }
    }

    fn run(script: &mut DeviceScript, secs: u32, dt: f64) -> Vec<(f64, Tick)> {
        let mut out = Vec::new();
        let mut t = 0.0;
        while t <= f64::from(secs) {
            out.push((t, script.tick(t, dt)));
            t += dt;
        }
        out
    }

    fn reports(ticks: &[(f64, Tick)]) -> Vec<(f64, Report)> {
        ticks
            .iter()
            .filter_map(|(t, k)| match k {
                Tick::Report(r) => Some((*t, r.clone())),
                Tick::Silent => None,
            })
            .collect()
    }

    #[test]
    fn at_home_stays_inside_the_home_zone() {
        let mut s = DeviceScript::new(&device(Behaviour::AtHome), 1);
        for (_, r) in reports(&run(&mut s, 3600, 5.0)) {
            let acc = f64::from(r.position.accuracy_m.unwrap());
            let d = distance_m(HOME, [r.position.lon, r.position.lat]);
            // True position within the indoor radius, error within 3σ·√2 of accuracy.
            assert!(d <= indoor_radius(120.0) + 3.0 * acc, "{d} m from home");
            assert!(r.expect_alert.is_none());
            assert!(r.events.is_empty());
        }
    }

    #[test]
    fn leave_home_breaches_within_a_minute() {
        let to = offset(HOME, 1500.0, 900.0);
        let mut s = DeviceScript::new(&device(Behaviour::LeaveHome { after_secs: 10, to }), 2);
        let ticks = reports(&run(&mut s, 120, 3.0));
        let first = ticks
            .iter()
            .find(|(_, r)| r.expect_alert == Some(AlertKind::CurfewViolation))
            .map(|(t, _)| *t)
            .expect("never left home");
        assert!(first > 10.0 && first < 45.0, "left at {first}");
        // Before leaving, no alert is expected.
        assert!(ticks
            .iter()
            .filter(|(t, _)| *t < 10.0)
            .all(|(_, r)| r.expect_alert.is_none()));
        // Driving speed in town.
        let moving: Vec<f32> = ticks
            .iter()
            .filter(|(t, _)| *t > 12.0 && *t < 60.0)
            .filter_map(|(_, r)| r.position.speed_kmh)
            .collect();
        assert!(moving.iter().all(|v| *v <= 58.0), "{moving:?}");
        assert!(moving.iter().any(|v| *v >= 18.0), "{moving:?}");
    }

    #[test]
    fn enter_zone_reaches_the_target() {
        let target = offset(HOME, 1200.0, 0.0);
        let start = offset(target, -200.0, -60.0);
        let mut s = DeviceScript::new(
            &device(Behaviour::EnterZone {
                after_secs: 5,
                start,
                target,
                radius_m: 60.0,
                zone_id: Some(3),
            }),
            3,
        );
        let ticks = reports(&run(&mut s, 120, 3.0));
        let inside: Vec<f64> = ticks
            .iter()
            .filter(|(_, r)| r.expect_alert == Some(AlertKind::ExclusionZoneEntry))
            .map(|(t, _)| *t)
            .collect();
        assert!(!inside.is_empty(), "never entered");
        assert!(inside[0] < 90.0, "entered at {}", inside[0]);
        assert!(distance_m(s.true_position(), target) <= 25.0);
    }

    #[test]
    fn strap_cut_sends_one_tamper_event() {
        let mut s = DeviceScript::new(&device(Behaviour::StrapCut { after_secs: 20 }), 4);
        let ticks = reports(&run(&mut s, 60, 5.0));
        let tampers: Vec<f64> = ticks
            .iter()
            .filter(|(_, r)| r.events.contains(&DeviceEventKind::StrapTamper))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(tampers, vec![20.0]);
    }

    #[test]
    fn battery_drain_goes_low() {
        let mut s = DeviceScript::new(
            &device(Behaviour::BatteryDrain {
                start_pct: 30,
                drop_per_fix: 2,
                min_pct: 5,
            }),
            5,
        );
        let ticks = reports(&run(&mut s, 60, 3.0));
        let levels: Vec<u8> = ticks.iter().map(|(_, r)| r.battery_pct).collect();
        assert_eq!(levels[0], 28);
        assert!(levels.windows(2).all(|w| w[1] <= w[0]));
        let low = ticks
            .iter()
            .find(|(_, r)| r.expect_alert == Some(AlertKind::LowBattery))
            .expect("never low");
        assert!(low.1.battery_pct <= LOW_BATTERY_PCT);
        assert!(low.1.events.contains(&DeviceEventKind::LowBattery));
        assert_eq!(*levels.last().unwrap(), 5);
    }

    #[test]
    fn go_silent_stops_reporting() {
        let mut s = DeviceScript::new(&device(Behaviour::GoSilent { after_secs: 30 }), 6);
        let ticks = run(&mut s, 60, 10.0);
        let kinds: Vec<bool> = ticks.iter().map(|(_, k)| *k == Tick::Silent).collect();
        assert_eq!(kinds, vec![false, false, false, true, true, true, true]);
    }

    #[test]
    fn scripts_are_deterministic_per_seed() {
        let d = device(Behaviour::Roam { radius_m: 500.0 });
        let a = run(&mut DeviceScript::new(&d, 9), 300, 5.0);
        let b = run(&mut DeviceScript::new(&d, 9), 300, 5.0);
        let c = run(&mut DeviceScript::new(&d, 10), 300, 5.0);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
