//! Demo data for the embedded default: users, subjects, devices, zones and curfews.
//!
//! [`seed`] writes a small, realistic caseload into a store — an admin, a supervisor and two
//! officers; subjects in Copenhagen (time zone `Europe/Copenhagen`) split over the officers,
//! each with a circular home zone under a nightly curfew (21:00–07:00 every day) plus a
//! demo exception so that a curfew is **active right now** whatever time the demo starts;
//! exclusion zones around a victim's street and a school; a dynamic exclusion zone around a
//! victim's device; GT06, Teltonika and EM/MQTT tags assigned to the subjects. It returns a
//! [`DemoPlan`] listing the users (with passwords to print at start-up) and, per simulated
//! device, its protocol, subject, home, zones and scripted [`Behaviour`], which
//! [`crate::SimConfig::from_demo`] turns into a simulator run that raises curfew,
//! exclusion, victim-proximity, strap-tamper and low-battery alerts within about a minute.
//!
//! Seeding is idempotent: subjects are found again by their `DEMO-…` reference, zones by
//! name, users by username, devices by id; a second run updates them in place (and moves
//! the demo curfew/absence exceptions to the new "now") instead of adding rows.

use crate::track::offset;
use crate::{imei, Behaviour, SimDevice};
use anyhow::Context as _;
use chrono::{DateTime, Duration, Utc};
use em_model::{
    BreachRules, Device, DeviceClass, DeviceId, ExceptionKind, LonLat, Protocol, Role,
    ScheduleException, ScheduleSpec, Subject, SubjectId, UserId, WeeklyWindow, ZoneGeometry,
    ZoneId, ZoneKind, ZoneSpec,
};
use em_store::Store;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// Reference prefix of demo subjects (how a re-run finds them).
pub const REFERENCE_PREFIX: &str = "DEMO-";
/// Note prefix of the schedule exceptions the demo manages (replaced on every run).
pub const EXCEPTION_NOTE_PREFIX: &str = "demo:";
/// Time zone of the demo city.
pub const TIMEZONE: &str = "Europe/Copenhagen";
/// Scripted subjects: one per kind of misbehaviour, before the compliant ones.
pub const SCRIPTED_SUBJECTS: usize = 7;

/// Options of [`seed`].
#[derive(Debug, Clone, PartialEq)]
pub struct DemoOptions {
    /// Number of subjects (clamped to 1..=40; the first [`SCRIPTED_SUBJECTS`] misbehave).
    pub subjects: usize,
    /// Password of every demo user (at least 10 characters). None = a fresh random password
    /// per user on every run (returned in the plan).
    pub password: Option<String>,
    /// Leave users that already exist untouched (their password is then not in the plan).
    pub keep_existing_users: bool,
    /// "Now": the demo curfew and absences are placed around it.
    pub now: DateTime<Utc>,
    /// How long the demo curfew/absence exceptions last from `now`.
    pub demo_hours: i64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            subjects: 12,
            password: None,
            keep_existing_users: false,
            now: Utc::now(),
            demo_hours: 6,
        }
    }
}

/// A demo dashboard user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoUser {
    pub id: UserId,
    pub username: String,
    pub display_name: String,
    pub role: Role,
    /// Password set by this run (None when an existing user was kept).
    pub password: Option<String>,
}

/// A zone of a demo subject.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoZone {
    pub id: ZoneId,
    pub name: String,
    pub kind: ZoneKind,
    pub geometry: ZoneGeometry,
    pub is_curfew_home: bool,
}

/// One simulated device of the demo and what it will do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoDevice {
    pub device_id: DeviceId,
    pub protocol: Protocol,
    /// MQTT password of EM devices.
    pub secret: Option<String>,
    /// None for the victim's device (not worn by a subject).
    pub subject_id: Option<SubjectId>,
    pub subject_reference: Option<String>,
    pub subject_name: String,
    pub home: LonLat,
    pub home_radius_m: f64,
    pub zones: Vec<DemoZone>,
    pub behaviour: Behaviour,
}

impl DemoDevice {
    /// The simulator's view of this device.
    pub fn sim_device(&self) -> SimDevice {
        SimDevice {
            device_id: self.device_id.clone(),
            protocol: self.protocol,
            secret: self.secret.clone(),
            subject_id: self.subject_id,
            home: self.home,
            home_radius_m: self.home_radius_m,
            behaviour: self.behaviour.clone(),
        }
    }
}

/// What [`seed`] created or updated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DemoPlan {
    pub city: String,
    pub timezone: String,
    pub centre: LonLat,
    pub users: Vec<DemoUser>,
    pub devices: Vec<DemoDevice>,
    /// End of the demo curfew exception.
    pub demo_until: DateTime<Utc>,
}

impl DemoPlan {
    /// Start-up text: logins and the scripted behaviours.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "Demo caseload in {} ({}), demo curfew until {}\n",
            self.city,
            self.timezone,
            self.demo_until.format("%Y-%m-%d %H:%M UTC")
        );
        s.push_str("Users:\n");
        for u in &self.users {
            s.push_str(&format!(
                "  {:<12} {:<10} password: {}\n",
                u.username,
                u.role.as_str(),
                u.password.as_deref().unwrap_or("(unchanged)")
            ));
        }
        s.push_str("Simulated devices:\n");
        for d in &self.devices {
            s.push_str(&format!(
                "  {:<9} {} {:<28} {}\n",
                d.protocol.as_str(),
                d.device_id,
                d.subject_name,
                d.behaviour.name()
            ));
        }
        s
    }
}

/// A place in the demo city.
struct Place {
    area: &'static str,
    /// Home of the subject `[lon, lat]`.
    home: LonLat,
}

/// Homes in Copenhagen neighbourhoods (street-level accuracy is not needed: fictitious).
const HOMES: [Place; 12] = [
    Place {
        area: "Nørrebro",
        home: [12.5496, 55.6929],
    },
    Place {
        area: "Vesterbro",
        home: [12.5486, 55.6685],
    },
    Place {
        area: "Amager",
        home: [12.6031, 55.6617],
    },
    Place {
        area: "Valby",
        home: [12.5159, 55.6617],
    },
    Place {
        area: "Bispebjerg",
        home: [12.5360, 55.7090],
    },
    Place {
        area: "Sydhavn",
        home: [12.5370, 55.6503],
    },
    Place {
        area: "Østerbro",
        home: [12.5775, 55.7065],
    },
    Place {
        area: "Frederiksberg",
        home: [12.5326, 55.6786],
    },
    Place {
        area: "Christianshavn",
        home: [12.5939, 55.6727],
    },
    Place {
        area: "Islands Brygge",
        home: [12.5790, 55.6640],
    },
    Place {
        area: "Brønshøj",
        home: [12.4940, 55.7060],
    },
    Place {
        area: "Vanløse",
        home: [12.4910, 55.6870],
    },
];

const NAMES: [&str; 12] = [
    "Mads Kjær",
    "Jonas Holm",
    "Emil Brandt",
    "Oliver Dahl",
    "Lucas Friis",
    "Noah Lund",
    "William Krog",
    "Victor Ravn",
    "Magnus Bech",
    "Elias Storm",
    "Anton Vinther",
    "Oscar Mølgaard",
];

/// Copenhagen city hall square.
const CENTRE: LonLat = [12.5683, 55.6761];

fn rect(centre: LonLat, half_east_m: f64, half_north_m: f64) -> ZoneGeometry {
    let c = |e: f64, n: f64| offset(centre, e, n);
    ZoneGeometry::Polygon {
        rings: vec![vec![
            c(-half_east_m, -half_north_m),
            c(half_east_m, -half_north_m),
            c(half_east_m, half_north_m),
            c(-half_east_m, half_north_m),
        ]],
    }
}

fn random_secret(len: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn every_night() -> Vec<WeeklyWindow> {
    (1..=7)
        .map(|day| WeeklyWindow {
            day,
            start: "21:00".into(),
            end: "07:00".into(),
        })
        .collect()
}

/// Keep the exceptions somebody else added; replace the demo's own.
fn merge_exceptions(
    existing: Option<&ZoneSpec>,
    demo: Vec<ScheduleException>,
) -> Vec<ScheduleException> {
    let mut out: Vec<ScheduleException> = existing
        .and_then(|z| z.schedule.as_ref())
        .map(|s| {
            s.exceptions
                .iter()
                .filter(|e| {
                    !e.note
                        .as_deref()
                        .is_some_and(|n| n.starts_with(EXCEPTION_NOTE_PREFIX))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    out.extend(demo);
    out
}

/// What a scripted subject does, and the zones it needs.
struct Script {
    protocol: Protocol,
    /// Subject is out on an approved absence (instead of under the demo extra curfew).
    absence: bool,
}

fn script_for(i: usize) -> Script {
    let (protocol, absence) = match i {
        0 => (Protocol::Gt06, false),      // leaves home during curfew
        1 => (Protocol::Teltonika, true),  // enters the victim's street
        2 => (Protocol::Gt06, false),      // cuts the strap
        3 => (Protocol::Teltonika, false), // battery runs down
        4 => (Protocol::Em, true),         // approaches the victim
        5 => (Protocol::Em, false),        // goes silent
        6 => (Protocol::Gt06, true),       // enters the school zone
        _ => match i % 3 {
            0 => (Protocol::Gt06, false),
            1 => (Protocol::Teltonika, false),
            _ => (Protocol::Em, false),
        },
    };
    Script { protocol, absence }
}

/// Seed the demo into `store` (idempotent; see the module docs).
pub async fn seed(store: &dyn Store, opts: &DemoOptions) -> anyhow::Result<DemoPlan> {
    let now = opts.now;
    let n = opts.subjects.clamp(1, 40);
    if let Some(p) = &opts.password {
        if p.chars().count() < em_dashboard::auth::MIN_PASSWORD_LEN {
            anyhow::bail!(
                "demo password must have at least {} characters",
                em_dashboard::auth::MIN_PASSWORD_LEN
            );
        }
    }
    if opts.demo_hours < 1 {
        anyhow::bail!("demo_hours must be at least 1, got {}", opts.demo_hours);
    }
    let demo_from = now - Duration::minutes(10);
    let demo_until = now + Duration::hours(opts.demo_hours);

    // --- users ---------------------------------------------------------------------------
    let user_specs = [
        ("admin", "Demo Administrator", Role::Admin),
        (
            "supervisor",
            "Sofie Lindholm (supervisor)",
            Role::Supervisor,
        ),
        ("officer1", "Anders Thorsen (officer)", Role::Officer),
        ("officer2", "Ida Mikkelsen (officer)", Role::Officer),
    ];
    let mut users = Vec::new();
    for (username, display, role) in user_specs {
        let existing = store.get_user_by_name(username).await?;
        let (id, password) = match existing {
            Some(u) if opts.keep_existing_users => (u.id, None),
            _ => {
                let pw = opts.password.clone().unwrap_or_else(|| random_secret(16));
                let id = em_dashboard::ensure_user(store, username, display, role, &pw)
                    .await
                    .with_context(|| format!("creating demo user {username}"))?;
                (id, Some(pw))
            }
        };
        users.push(DemoUser {
            id,
            username: username.into(),
            display_name: display.into(),
            role,
            password,
        });
    }
    let officers: Vec<UserId> = users
        .iter()
        .filter(|u| u.role == Role::Officer)
        .map(|u| u.id)
        .collect();

    // --- subjects, zones, devices -------------------------------------------------------
    let existing_subjects = store.list_subjects(None).await?;
    let rules = BreachRules {
        buffer_m: 25.0,
        consecutive_fixes: 3,
        persist_secs: 30,
        no_fix_secs: 600,
    };
    let mut devices = Vec::new();
    // Victim of subject 4 (approach): her device carries the dynamic exclusion zone.
    let victim_device_id = imei("8644250", 9_000)?;
    let victim_at = offset(HOMES[4 % HOMES.len()].home, 1400.0, -900.0);
    let mut victim_needed = false;

    for i in 0..n {
        let place = &HOMES[i % HOMES.len()];
        let round = i / HOMES.len();
        // Further rounds of homes: a few hundred metres away from the first.
        let home = offset(place.home, 350.0 * round as f64, -250.0 * round as f64);
        let home_radius_m = 100.0 + 10.0 * (i % 5) as f64;
        let reference = format!("{REFERENCE_PREFIX}{:04}", i + 1);
        let name = if round == 0 {
            NAMES[i % NAMES.len()].to_string()
        } else {
            format!("{} {}", NAMES[i % NAMES.len()], round + 1)
        };
        let script = script_for(i);
        let officer = officers.get(i % officers.len().max(1)).copied();
        let prev = existing_subjects.iter().find(|s| s.reference == reference);
        let subject = Subject {
            id: prev.map_or(0, |s| s.id),
            reference: reference.clone(),
            display_name: name.clone(),
            officer_id: officer,
            timezone: TIMEZONE.into(),
            order_start: Some(
                prev.and_then(|s| s.order_start)
                    .unwrap_or(now - Duration::days(30)),
            ),
            order_end: Some(
                prev.and_then(|s| s.order_end)
                    .unwrap_or(now + Duration::days(180)),
            ),
            rules,
        };
        let subject_id = store.upsert_subject(&subject).await?;
        let existing_zones = store.list_zones(Some(subject_id)).await?;
        let find = |zname: &str| {
            existing_zones
                .iter()
                .find(|z| z.subject_id == Some(subject_id) && z.name == zname)
        };

        // Home with nightly curfew, plus the demo exception around now.
        let home_name = format!("Home ({})", place.area);
        let demo_exception = if script.absence {
            ScheduleException {
                kind: ExceptionKind::Absence,
                start: demo_from,
                end: demo_until,
                note: Some(format!("{EXCEPTION_NOTE_PREFIX} approved absence (work)")),
            }
        } else {
            ScheduleException {
                kind: ExceptionKind::ExtraCurfew,
                start: demo_from,
                end: demo_until,
                note: Some(format!(
                    "{EXCEPTION_NOTE_PREFIX} curfew in force for the demonstration"
                )),
            }
        };
        let prev_home = find(&home_name);
        let mut zone_specs = vec![ZoneSpec {
            id: prev_home.map_or(0, |z| z.id),
            subject_id: Some(subject_id),
            group: None,
            name: home_name,
            kind: ZoneKind::Inclusion,
            geometry: ZoneGeometry::Circle {
                center: home,
                radius_m: home_radius_m,
            },
            schedule: Some(ScheduleSpec {
                windows: every_night(),
                exceptions: merge_exceptions(prev_home, vec![demo_exception]),
            }),
            is_curfew_home: true,
        }];

        let protocol = script.protocol;
        let device_id = match protocol {
            Protocol::Gt06 => imei("3583071", i as u64)?,
            Protocol::Teltonika => imei("3520940", i as u64)?,
            _ => imei("8644250", i as u64)?,
        };
        let behaviour = match i {
            0 => Behaviour::LeaveHome {
                after_secs: 8,
                to: offset(home, 1800.0, 1100.0),
            },
            1 | 6 => {
                // Victim's street (a long narrow polygon) or a school, ~1.3 km from home.
                let (zname, target, half_e, half_n) = if i == 1 {
                    (
                        "Exclusion: victim's street",
                        offset(home, 1300.0, 400.0),
                        160.0,
                        60.0,
                    )
                } else {
                    (
                        "Exclusion: school",
                        offset(home, -900.0, 900.0),
                        110.0,
                        90.0,
                    )
                };
                let prev = find(zname);
                zone_specs.push(ZoneSpec {
                    id: prev.map_or(0, |z| z.id),
                    subject_id: Some(subject_id),
                    group: None,
                    name: zname.into(),
                    kind: ZoneKind::Exclusion,
                    geometry: rect(target, half_e, half_n),
                    schedule: None,
                    is_curfew_home: false,
                });
                Behaviour::EnterZone {
                    after_secs: 4,
                    // Starts ~110 m outside the zone's long side.
                    start: offset(target, -40.0, -(half_n + 110.0)),
                    target,
                    radius_m: half_n.min(half_e),
                    zone_id: None,
                }
            }
            2 => Behaviour::StrapCut { after_secs: 12 },
            3 => Behaviour::BatteryDrain {
                start_pct: 24,
                drop_per_fix: 1,
                min_pct: 9,
            },
            4 => {
                victim_needed = true;
                let zname = "Exclusion: victim (dynamic, 300 m)";
                let prev = find(zname);
                zone_specs.push(ZoneSpec {
                    id: prev.map_or(0, |z| z.id),
                    subject_id: Some(subject_id),
                    group: None,
                    name: zname.into(),
                    kind: ZoneKind::Exclusion,
                    geometry: ZoneGeometry::Dynamic {
                        device_id: victim_device_id.clone(),
                        radius_m: 300.0,
                    },
                    schedule: None,
                    is_curfew_home: false,
                });
                Behaviour::ApproachVictim {
                    after_secs: 4,
                    start: offset(victim_at, -380.0, -60.0),
                    victim_device: victim_device_id.clone(),
                    victim_at,
                    radius_m: 300.0,
                }
            }
            5 => Behaviour::GoSilent { after_secs: 20 },
            _ => Behaviour::AtHome,
        };

        let mut zones = Vec::new();
        for z in &zone_specs {
            let id = store.upsert_zone(z).await?;
            zones.push(DemoZone {
                id,
                name: z.name.clone(),
                kind: z.kind,
                geometry: z.geometry.clone(),
                is_curfew_home: z.is_curfew_home,
            });
        }
        let behaviour = match behaviour {
            Behaviour::EnterZone {
                after_secs,
                start,
                target,
                radius_m,
                ..
            } => Behaviour::EnterZone {
                after_secs,
                start,
                target,
                radius_m,
                zone_id: zones
                    .iter()
                    .find(|z| z.kind == ZoneKind::Exclusion)
                    .map(|z| z.id),
            },
            b => b,
        };

        let secret = register_device(store, &device_id, protocol, DeviceClass::OffenderTag).await?;
        if store.subject_for_device_at(&device_id, now).await? != Some(subject_id) {
            store.assign_device(&device_id, subject_id, now).await?;
        }
        devices.push(DemoDevice {
            device_id,
            protocol,
            secret,
            subject_id: Some(subject_id),
            subject_reference: Some(reference),
            subject_name: name,
            home,
            home_radius_m,
            zones,
            behaviour,
        });
    }

    if victim_needed {
        // A protected person's device: victim data, stored apart and never shown to officers.
        let secret =
            register_device(store, &victim_device_id, Protocol::Em, DeviceClass::Victim).await?;
        devices.push(DemoDevice {
            device_id: victim_device_id,
            protocol: Protocol::Em,
            secret,
            subject_id: None,
            subject_reference: None,
            subject_name: "Victim (protected person)".into(),
            home: victim_at,
            home_radius_m: 50.0,
            zones: Vec::new(),
            behaviour: Behaviour::Victim { at: victim_at },
        });
    }

    Ok(DemoPlan {
        city: "Copenhagen".into(),
        timezone: TIMEZONE.into(),
        centre: CENTRE,
        users,
        devices,
        demo_until,
    })
}

/// Register (or re-activate) a device. EM devices get a fresh secret on every seed: the store
/// keeps only its hash, so the plaintext of an earlier run cannot be read back, and the demo
/// drives its simulated devices with the plaintext returned here.
async fn register_device(
    store: &dyn Store,
    device_id: &str,
    protocol: Protocol,
    class: DeviceClass,
) -> anyhow::Result<Option<String>> {
    let secret = protocol
        .carries_secret()
        .then(em_store::device_secret::generate);
    store
        .upsert_device(&Device {
            device_id: device_id.to_string(),
            protocol,
            secret: secret.clone(),
            active: true,
            class,
        })
        .await?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;
    use em_geofence::CompiledSchedule;

    fn opts(now: DateTime<Utc>) -> DemoOptions {
        DemoOptions {
            password: Some("demo-password-1".into()),
            now,
            ..DemoOptions::default()
        }
    }

    fn active(zone: &ZoneSpec, at: DateTime<Utc>) -> bool {
        let tz: chrono_tz::Tz = TIMEZONE.parse().unwrap();
        match &zone.schedule {
            None => true,
            Some(s) => {
                CompiledSchedule::compile(s)
                    .unwrap()
                    .state_at(tz, at)
                    .active
            }
        }
    }

    /// Number of subjects whose curfew home zone is active at `t`; checks there is exactly
    /// one demo exception per home.
    async fn active_homes(store: &dyn Store, plan: &DemoPlan, t: DateTime<Utc>) -> usize {
        let mut n = 0;
        for d in plan.devices.iter().filter(|d| d.subject_id.is_some()) {
            let zones = store.list_zones(d.subject_id).await.unwrap();
            let home = zones.iter().find(|z| z.is_curfew_home).expect("home zone");
            if active(home, t) {
                n += 1;
            }
            let demo_exceptions = home
                .schedule
                .as_ref()
                .unwrap()
                .exceptions
                .iter()
                .filter(|e| e.note.as_deref().unwrap_or("").starts_with("demo:"))
                .count();
            assert_eq!(demo_exceptions, 1, "old demo exceptions are replaced");
        }
        n
    }

    #[tokio::test]
    async fn seed_is_idempotent_and_a_curfew_is_active_now() {
        let store = em_store::testing::sqlite_store().await;
        // Noon: outside the nightly 21:00–07:00 windows, so only the demo exception can
        // make the curfew active.
        let now = DateTime::parse_from_rfc3339("2025-06-11T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let plan = seed(store.as_ref(), &opts(now)).await.unwrap();
        // All but the three subjects on an approved absence are under curfew now.
        assert_eq!(active_homes(store.as_ref(), &plan, now).await, 12 - 3);
        let leaver = &plan.devices[0];
        assert!(matches!(leaver.behaviour, Behaviour::LeaveHome { .. }));
        let zones = store.list_zones(leaver.subject_id).await.unwrap();
        let home = zones.iter().find(|z| z.is_curfew_home).unwrap();
        assert!(active(home, now));
        // Without the demo exception, noon would be outside the curfew.
        let mut plain = home.clone();
        plain.schedule.as_mut().unwrap().exceptions.clear();
        assert!(!active(&plain, now));

        let counts = |store: std::sync::Arc<dyn Store>| async move {
            (
                store.list_users().await.unwrap().len(),
                store.list_subjects(None).await.unwrap().len(),
                store.list_devices().await.unwrap().len(),
                store.list_zones(None).await.unwrap().len(),
                store.current_assignments().await.unwrap().len(),
            )
        };
        let first = counts(store.clone()).await;
        assert_eq!(first.0, 4, "users");
        assert_eq!(first.1, 12, "subjects");
        assert_eq!(first.2, 13, "devices (12 tags + the victim's)");
        assert_eq!(first.4, 12, "assignments");

        // A later run (another day, mid-afternoon) must not duplicate anything, and moves
        // the demo curfew to its own "now".
        let later = now + Duration::days(1) + Duration::hours(3);
        let plan2 = seed(store.as_ref(), &opts(later)).await.unwrap();
        assert_eq!(counts(store.clone()).await, first);
        let ids = |p: &DemoPlan| {
            p.devices
                .iter()
                .map(|d| (d.device_id.clone(), d.subject_id))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&plan), ids(&plan2), "same devices and subjects");
        // Secrets are stored hashed, so each run provisions fresh ones; the stored hash is
        // always that of the plaintext the simulator will use.
        for d in plan2.devices.iter().filter(|d| d.secret.is_some()) {
            let stored = store.get_device(&d.device_id).await.unwrap().unwrap();
            let (hash, plain) = (stored.secret.unwrap(), d.secret.clone().unwrap());
            assert!(em_store::device_secret::verify(&hash, &plain));
            assert_ne!(hash, plain, "the row never holds the plaintext");
        }
        for d in &plan2.devices {
            let n = store.assignments(&d.device_id).await.unwrap().len();
            assert!(n <= 1, "{} has {n} assignments", d.device_id);
        }
        assert_eq!(active_homes(store.as_ref(), &plan2, later).await, 12 - 3);
        // The old window (yesterday's noon) is no longer a demo curfew.
        assert_eq!(active_homes(store.as_ref(), &plan2, now).await, 0);
    }

    #[tokio::test]
    async fn plan_covers_protocols_zones_and_behaviours() {
        let store = em_store::testing::sqlite_store().await;
        let plan = seed(store.as_ref(), &opts(Utc::now())).await.unwrap();
        for p in [Protocol::Gt06, Protocol::Teltonika, Protocol::Em] {
            assert!(plan.devices.iter().any(|d| d.protocol == p), "{p} missing");
        }
        for d in &plan.devices {
            assert_eq!(d.device_id.len(), 15, "{}", d.device_id);
            assert!(d.device_id.bytes().all(|b| b.is_ascii_digit()));
            if d.protocol == Protocol::Em {
                assert!(d.secret.as_deref().is_some_and(|s| s.len() >= 16));
            }
            let stored = store.get_device(&d.device_id).await.unwrap().unwrap();
            assert_eq!(stored.protocol, d.protocol);
            match (&stored.secret, &d.secret) {
                (Some(hash), Some(plain)) => {
                    assert!(em_store::device_secret::verify(hash, plain));
                    assert!(!hash.contains(plain.as_str()));
                }
                (None, None) => {}
                other => panic!("{}: secret mismatch {other:?}", d.device_id),
            }
        }
        let names: Vec<&str> = plan.devices.iter().map(|d| d.behaviour.name()).collect();
        for b in [
            "leave_home",
            "enter_zone",
            "strap_cut",
            "battery_drain",
            "approach_victim",
            "go_silent",
            "victim",
            "at_home",
        ] {
            assert!(names.contains(&b), "{b} missing from {names:?}");
        }
        // Exclusion zones exist: a polygon and a dynamic one around the victim's device.
        let zones = store.list_zones(None).await.unwrap();
        assert!(zones
            .iter()
            .any(|z| z.kind == ZoneKind::Exclusion
                && matches!(z.geometry, ZoneGeometry::Polygon { .. })));
        let victim = plan
            .devices
            .iter()
            .find(|d| d.subject_id.is_none())
            .unwrap();
        assert!(zones.iter().any(|z| matches!(&z.geometry,
            ZoneGeometry::Dynamic { device_id, .. } if *device_id == victim.device_id)));
        // The victim's device is registered as a victim device (its data is stored apart).
        assert_eq!(
            store
                .get_device(&victim.device_id)
                .await
                .unwrap()
                .map(|d| d.class),
            Some(DeviceClass::Victim)
        );
        // Subjects are split over the two officers.
        let subjects = store.list_subjects(None).await.unwrap();
        let officers: std::collections::HashSet<_> =
            subjects.iter().filter_map(|s| s.officer_id).collect();
        assert_eq!(officers.len(), 2);
        // Users can log in with the printed password.
        assert_eq!(plan.users.len(), 4);
        assert!(plan
            .users
            .iter()
            .all(|u| u.password.as_deref() == Some("demo-password-1")));
        assert!(plan.summary().contains("officer1"));
        // The enter-zone target lies inside its zone.
        for d in &plan.devices {
            if let Behaviour::EnterZone { zone_id, .. } = &d.behaviour {
                assert!(zone_id.is_some());
            }
        }
    }

    #[tokio::test]
    async fn rejects_short_password() {
        let store = em_store::testing::sqlite_store().await;
        let o = DemoOptions {
            password: Some("short".into()),
            ..DemoOptions::default()
        };
        assert!(seed(store.as_ref(), &o).await.is_err());
    }
}
