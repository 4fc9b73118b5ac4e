//! The per-subject state machine: hysteresis, curfew windows, beacon, no-fix, dynamic zones.

use chrono::{DateTime, Duration, TimeZone, Utc};
use em_geofence::geometry::M_PER_DEG;
use em_geofence::{
    ComplianceEvent, ComplianceEventKind as K, EndReason, EvidenceSource, SharedZoneIndex,
    SubjectMonitor, ZoneIndex,
};
use em_model::{
    AlertKind, BreachRules, ExceptionKind, FixSource, Position, Protocol, Record,
    ScheduleException, ScheduleSpec, Subject, WeeklyWindow, ZoneGeometry, ZoneKind, ZoneSpec,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HOME: [f64; 2] = [12.5683, 55.6761];

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

fn subject(id: i64, tz: &str) -> Subject {
    Subject {
        id,
        reference: format!("case-{id}"),
        display_name: "Test Person".into(),
        officer_id: None,
        timezone: tz.into(),
        order_start: None,
        order_end: None,
        rules: BreachRules {
            buffer_m: 25.0,
            consecutive_fixes: 3,
            persist_secs: 60,
            no_fix_secs: 900,
        },
    }
}

/// A point `north_m` metres north and `east_m` east of `origin`.
fn offset(origin: [f64; 2], north_m: f64, east_m: f64) -> [f64; 2] {
    [
        origin[0] + east_m / (M_PER_DEG * origin[1].to_radians().cos()),
        origin[1] + north_m / M_PER_DEG,
    ]
}

fn fix(device: &str, t: DateTime<Utc>, p: [f64; 2], acc: f32) -> Record {
    let mut r = Record::new(device, Protocol::Em, t);
    r.position = Some(Position {
        lat: p[1],
        lon: p[0],
        accuracy_m: Some(acc),
        speed_kmh: None,
        course_deg: None,
        altitude_m: None,
        satellites: Some(8),
        valid: true,
        source: FixSource::Gnss,
    });
    r
}

fn beacon(t: DateTime<Utc>, in_range: bool) -> Record {
    let mut r = Record::new("tag", Protocol::Em, t);
    r.beacon_in_range = Some(in_range);
    r
}

fn home_zone(id: i64, subject: i64, schedule: Option<ScheduleSpec>) -> ZoneSpec {
    ZoneSpec {
        id,
        subject_id: Some(subject),
        group: None,
        name: "home".into(),
        kind: ZoneKind::Inclusion,
        geometry: ZoneGeometry::Circle {
            center: HOME,
            radius_m: 200.0,
        },
        schedule,
        is_curfew_home: true,
    }
}

fn nightly() -> ScheduleSpec {
    ScheduleSpec {
        windows: (1..=7)
            .map(|day| WeeklyWindow {
                day,
                start: "19:00".into(),
                end: "07:00".into(),
            })
            .collect(),
        exceptions: vec![],
    }
}

fn kinds(ev: &[ComplianceEvent]) -> Vec<K> {
    ev.iter().map(|e| e.kind).collect()
}

#[test]
fn noisy_track_on_the_boundary_does_not_flap_and_a_real_exit_starts_one_breach() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, None)).unwrap();
    let s = subject(1, "Europe/Copenhagen");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let mut rng = StdRng::seed_from_u64(42);
    let mut t = utc(2024, 6, 3, 12, 0);
    let mut all = Vec::new();
    let mut single_fixes_beyond_margin = 0;
    // 600 fixes wandering along the 200 m boundary with ~15 m (1 sigma) noise.
    for i in 0..600 {
        let noise: f64 = (0..12).map(|_| rng.gen_range(-0.5..0.5)).sum::<f64>() * 15.0;
        let bearing = i as f64 * 0.01;
        let dist = 200.0 + noise;
        if noise > 35.0 {
            single_fixes_beyond_margin += 1;
        }
        let p = offset(HOME, dist * bearing.cos(), dist * bearing.sin());
        all.extend(m.on_record(&idx, &s, &fix("tag", t, p, 10.0)));
        t += Duration::seconds(10);
    }
    assert!(
        single_fixes_beyond_margin > 0,
        "the noise must sometimes cross the margin"
    );
    assert_eq!(
        all,
        vec![],
        "jitter around the boundary must not produce events"
    );

    // Real exit: 1 km away.
    let exit_start = t;
    let mut exit = Vec::new();
    for _ in 0..20 {
        exit.extend(m.on_record(&idx, &s, &fix("tag", t, offset(HOME, 1000.0, 0.0), 10.0)));
        t += Duration::seconds(10);
    }
    assert_eq!(kinds(&exit), vec![K::BreachStarted]);
    let e = &exit[0];
    assert_eq!(e.started_at, exit_start);
    assert_eq!(e.at, exit_start + Duration::seconds(20));
    assert_eq!(e.evidence.len(), 3);
    assert!(e.evidence.iter().all(|f| f.distance_m.unwrap() > 700.0));
    assert!(e.is_curfew);
    assert_eq!(e.alert_kind(), Some(AlertKind::CurfewViolation));
    assert_eq!(m.breaches().collect::<Vec<_>>(), vec![1]);

    // Back home: ends once, after three clearly-inside fixes.
    let back = t;
    let mut home = Vec::new();
    for _ in 0..10 {
        home.extend(m.on_record(&idx, &s, &fix("tag", t, offset(HOME, 30.0, 0.0), 10.0)));
        t += Duration::seconds(10);
    }
    assert_eq!(kinds(&home), vec![K::BreachEnded]);
    assert_eq!(home[0].ended_at, Some(back));
    assert_eq!(home[0].started_at, exit_start);
    assert_eq!(home[0].reason, Some(EndReason::BackInCompliance));
}

#[test]
fn persist_secs_on_tick_and_uncertain_fix_cancels_pending() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, None)).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let t0 = utc(2024, 6, 3, 12, 0);
    assert!(m
        .on_record(&idx, &s, &fix("tag", t0, offset(HOME, 500.0, 0.0), 10.0))
        .is_empty());
    // An uncertain fix (just outside, within margin) cancels the pending breach.
    assert!(m
        .on_record(
            &idx,
            &s,
            &fix(
                "tag",
                t0 + Duration::seconds(5),
                offset(HOME, 210.0, 0.0),
                10.0
            )
        )
        .is_empty());
    assert!(m.on_tick(&idx, &s, t0 + Duration::seconds(120)).is_empty());
    // One clearly-outside fix, then silence: the breach starts when persist_secs elapse.
    let t1 = t0 + Duration::seconds(130);
    assert!(m
        .on_record(&idx, &s, &fix("tag", t1, offset(HOME, 500.0, 0.0), 10.0))
        .is_empty());
    assert_eq!(m.next_deadline(&s), Some(t1 + Duration::seconds(60)));
    assert!(m.on_tick(&idx, &s, t1 + Duration::seconds(59)).is_empty());
    let ev = m.on_tick(&idx, &s, t1 + Duration::seconds(60));
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
    assert_eq!(ev[0].started_at, t1);
    // A large accuracy keeps an outside fix from counting.
    let mut m2 = SubjectMonitor::new(&s).unwrap();
    for i in 0..5 {
        let r = fix(
            "tag",
            t0 + Duration::seconds(i),
            offset(HOME, 500.0, 0.0),
            400.0,
        );
        assert!(m2.on_record(&idx, &s, &r).is_empty());
    }
}

#[test]
fn curfew_window_opening_with_subject_outside_across_dst() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, Some(nightly()))).unwrap();
    let s = subject(1, "Europe/London");
    let mut m = SubjectMonitor::new(&s).unwrap();
    // Saturday 30 March 2024, before the spring-forward night. Outside at 18:50 GMT.
    let t = utc(2024, 3, 30, 18, 50);
    let far = offset(HOME, 2000.0, 0.0);
    assert!(m.on_record(&idx, &s, &fix("tag", t, far, 10.0)).is_empty());
    assert_eq!(m.next_deadline(&s), Some(utc(2024, 3, 30, 19, 0)));
    // Window opens at 19:00: a pending breach from the last (outside) fix.
    let ev = m.on_tick(&idx, &s, utc(2024, 3, 30, 19, 0));
    assert_eq!(kinds(&ev), vec![K::WindowOpened]);
    let w = ev[0].window.unwrap();
    assert_eq!(
        (w.start, w.end),
        (utc(2024, 3, 30, 19, 0), utc(2024, 3, 31, 6, 0))
    );
    assert_eq!(
        w.end - w.start,
        Duration::hours(11),
        "23-hour day: the 19:00-07:00 window is 11 h"
    );
    let ev = m.on_tick(&idx, &s, utc(2024, 3, 30, 19, 1));
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
    assert_eq!(ev[0].started_at, utc(2024, 3, 30, 19, 0));
    assert!(ev[0].window.is_some());
    // No evidence since 18:50: no-fix 15 minutes after the window opened.
    assert!(m.on_tick(&idx, &s, utc(2024, 3, 30, 19, 14)).is_empty());
    let ev = m.on_tick(&idx, &s, utc(2024, 3, 30, 19, 15));
    assert_eq!(kinds(&ev), vec![K::NoFixStarted]);
    // Window closes at 07:00 BST = 06:00Z (a tick at 06:30 replays it at 06:00).
    let ev = m.on_tick(&idx, &s, utc(2024, 3, 31, 6, 30));
    assert_eq!(
        kinds(&ev),
        vec![K::BreachEnded, K::NoFixEnded, K::WindowClosed]
    );
    assert!(ev
        .iter()
        .all(|e| e.ended_at == Some(utc(2024, 3, 31, 6, 0))));
    let ev = m.on_tick(&idx, &s, utc(2024, 3, 31, 6, 31));
    assert!(ev.is_empty(), "{ev:?}");
    let mut m = SubjectMonitor::new(&s).unwrap();
    m.on_record(&idx, &s, &fix("tag", utc(2024, 10, 26, 17, 50), far, 10.0));
    let ev = m.on_tick(&idx, &s, utc(2024, 10, 26, 18, 0));
    let opened = ev.iter().find(|e| e.kind == K::WindowOpened).unwrap();
    let w = opened.window.unwrap();
    assert_eq!(
        w.end - w.start,
        Duration::hours(13),
        "25-hour day: the window is 13 h"
    );
}

#[test]
fn window_close_ends_breach_and_order_dates_bound_enforcement() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, Some(nightly()))).unwrap();
    let mut s = subject(1, "UTC");
    s.order_start = Some(utc(2024, 6, 4, 0, 0));
    s.order_end = Some(utc(2024, 6, 6, 0, 0));
    let mut m = SubjectMonitor::new(&s).unwrap();
    let far = offset(HOME, 2000.0, 0.0);
    // Before the order: nothing, even at night.
    for i in 0..5 {
        assert!(m
            .on_record(&idx, &s, &fix("tag", utc(2024, 6, 3, 20, i), far, 5.0))
            .is_empty());
    }
    // Order starts at midnight inside a window: enforcement opens at the order start.
    let ev = m.on_record(&idx, &s, &fix("tag", utc(2024, 6, 4, 0, 1), far, 5.0));
    assert_eq!(kinds(&ev), vec![K::WindowOpened]);
    let w = ev[0].window.unwrap();
    assert_eq!(
        (w.start, w.end),
        (utc(2024, 6, 4, 0, 0), utc(2024, 6, 4, 7, 0))
    );
    let mut all = Vec::new();
    for i in 2..6 {
        all.extend(m.on_record(&idx, &s, &fix("tag", utc(2024, 6, 4, 0, i), far, 5.0)));
    }
    assert_eq!(kinds(&all), vec![K::BreachStarted]);
    let ev = m.on_record(&idx, &s, &fix("tag", utc(2024, 6, 4, 7, 5), far, 5.0));
    assert_eq!(kinds(&ev), vec![K::BreachEnded, K::WindowClosed]);
    assert_eq!(ev[0].reason, Some(EndReason::WindowClosed));
    assert_eq!(ev[0].ended_at, Some(utc(2024, 6, 4, 7, 0)));
    // After the order end nothing is enforced.
    let ev = m.on_tick(&idx, &s, utc(2024, 6, 6, 20, 0));
    assert!(
        !ev.iter()
            .any(|e| e.kind == K::BreachStarted || e.kind == K::NoFixStarted),
        "{ev:?}"
    );
    for i in 0..5 {
        let ev = m.on_record(&idx, &s, &fix("tag", utc(2024, 6, 6, 21, i), far, 5.0));
        assert!(ev.is_empty(), "{ev:?}");
    }
}

#[test]
fn approved_absence_suppresses_and_extra_curfew_adds() {
    let mut spec = nightly();
    spec.exceptions = vec![
        ScheduleException {
            kind: ExceptionKind::Absence,
            start: utc(2024, 6, 4, 18, 0),
            end: utc(2024, 6, 5, 8, 0),
            note: Some("night shift".into()),
        },
        ScheduleException {
            kind: ExceptionKind::ExtraCurfew,
            start: utc(2024, 6, 5, 12, 0),
            end: utc(2024, 6, 5, 14, 0),
            note: None,
        },
    ];
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, Some(spec))).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let far = offset(HOME, 2000.0, 0.0);
    let mut all = Vec::new();
    for i in 0..30 {
        all.extend(m.on_record(
            &idx,
            &s,
            &fix(
                "tag",
                utc(2024, 6, 4, 20, 0) + Duration::minutes(i * 10),
                far,
                5.0,
            ),
        ));
    }
    assert!(all.iter().all(|e| e.kind != K::BreachStarted), "{all:?}");
    let mut extra = Vec::new();
    for i in 0..5 {
        extra.extend(m.on_record(&idx, &s, &fix("tag", utc(2024, 6, 5, 12, 10 + i), far, 5.0)));
    }
    assert_eq!(kinds(&extra), vec![K::WindowOpened, K::BreachStarted]);
}

#[test]
fn beacon_presence_and_absence() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, Some(nightly()))).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let t0 = utc(2024, 6, 3, 20, 0);
    // Out of range during curfew, no GPS at all: a violation.
    let mut ev = Vec::new();
    for i in 0..3 {
        ev.extend(m.on_record(&idx, &s, &beacon(t0 + Duration::seconds(i * 20), false)));
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
    assert!(ev[0]
        .evidence
        .iter()
        .all(|e| e.source == EvidenceSource::BeaconOutOfRange));
    // In range again: as good as a fix inside, even if GPS drifts outside.
    let mut ev = Vec::new();
    for i in 3..6 {
        let mut r = fix(
            "tag",
            t0 + Duration::seconds(i * 20),
            offset(HOME, 800.0, 0.0),
            10.0,
        );
        r.beacon_in_range = Some(true);
        ev.extend(m.on_record(&idx, &s, &r));
    }
    assert_eq!(kinds(&ev), vec![K::BreachEnded]);
    // Beacon presence keeps the no-fix timer quiet for hours.
    for h in 0..5 {
        let ev = m.on_record(&idx, &s, &beacon(t0 + Duration::minutes(10 + h * 10), true));
        assert!(ev.is_empty(), "{ev:?}");
    }
    // Outside curfew hours an out-of-range beacon is fine.
    let day = utc(2024, 6, 4, 12, 0);
    for i in 0..5 {
        let ev = m.on_record(&idx, &s, &beacon(day + Duration::seconds(i * 30), false));
        assert!(!ev.iter().any(|e| e.kind == K::BreachStarted), "{ev:?}");
    }
}

#[test]
fn no_fix_during_window_is_its_own_state() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, Some(nightly()))).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    m.on_record(&idx, &s, &fix("tag", utc(2024, 6, 3, 18, 0), HOME, 5.0));
    let ev = m.on_tick(&idx, &s, utc(2024, 6, 3, 19, 0));
    assert_eq!(kinds(&ev), vec![K::WindowOpened]);
    assert!(m.on_tick(&idx, &s, utc(2024, 6, 3, 19, 14)).is_empty());
    assert_eq!(m.next_deadline(&s), Some(utc(2024, 6, 3, 19, 15)));
    let ev = m.on_tick(&idx, &s, utc(2024, 6, 3, 19, 15));
    assert_eq!(kinds(&ev), vec![K::NoFixStarted]);
    assert_eq!(ev[0].started_at, utc(2024, 6, 3, 19, 0));
    assert_eq!(ev[0].alert_kind(), Some(AlertKind::NoFixDuringCurfew));
    assert_eq!(m.no_fix_zones().collect::<Vec<_>>(), vec![1]);
    assert!(
        m.breaches().next().is_none(),
        "no fix is not a breach, and not compliant either"
    );
    // A fix at home ends it.
    let ev = m.on_record(&idx, &s, &fix("tag", utc(2024, 6, 3, 19, 40), HOME, 5.0));
    assert_eq!(kinds(&ev), vec![K::NoFixEnded]);
    assert_eq!(ev[0].reason, Some(EndReason::EvidenceReceived));
    assert_eq!(ev[0].ended_at, Some(utc(2024, 6, 3, 19, 40)));
}

#[test]
fn exclusion_zone_from_group_and_zone_removal() {
    let mut idx = ZoneIndex::new();
    let school = offset(HOME, 5000.0, 5000.0);
    idx.upsert(&ZoneSpec {
        id: 9,
        subject_id: None,
        group: Some("schools".into()),
        name: "school".into(),
        kind: ZoneKind::Exclusion,
        geometry: ZoneGeometry::Polygon {
            rings: vec![vec![
                offset(school, -100.0, -100.0),
                offset(school, -100.0, 100.0),
                offset(school, 100.0, 100.0),
                offset(school, 100.0, -100.0),
            ]],
        },
        schedule: None,
        is_curfew_home: false,
    })
    .unwrap();
    idx.bind_group(1, "schools");
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let t0 = utc(2024, 6, 3, 12, 0);
    let mut ev = Vec::new();
    for i in 0..4 {
        ev.extend(m.on_record(
            &idx,
            &s,
            &fix("tag", t0 + Duration::seconds(i * 10), school, 10.0),
        ));
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
    assert_eq!(ev[0].alert_kind(), Some(AlertKind::ExclusionZoneEntry));
    assert_eq!(ev[0].zone_kind, ZoneKind::Exclusion);
    assert!(!ev[0].is_curfew);
    idx.remove(9);
    let ev = m.on_tick(&idx, &s, t0 + Duration::seconds(60));
    assert_eq!(kinds(&ev), vec![K::BreachEnded]);
    assert_eq!(ev[0].reason, Some(EndReason::ZoneChanged));
}

#[test]
fn dynamic_exclusion_with_both_devices_moving() {
    let shared = victim_zone_index();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let t0 = utc(2024, 6, 3, 12, 0);
    let idx = shared.read();
    assert!(idx.is_dynamic_source("victim-phone"));
    assert_eq!(
        idx.update_dynamic(&fix("victim-phone", t0, HOME, 10.0)),
        vec![1]
    );
    assert!(idx
        .update_dynamic(&fix("someone-else", t0, HOME, 10.0))
        .is_empty());
    // Offender 3 km away.
    let offender = offset(HOME, 3000.0, 0.0);
    assert!(m
        .on_record(&idx, &s, &fix("tag", t0, offender, 10.0))
        .is_empty());
    // The victim walks towards the offender: the victim's updates alone raise the breach.
    let mut ev = Vec::new();
    for (i, north) in [2000.0, 2800.0, 2900.0, 2950.0].into_iter().enumerate() {
        let t = t0 + Duration::seconds(10 * (i as i64 + 1));
        let victim = fix("victim-phone", t, offset(HOME, north, 0.0), 10.0);
        for subj in idx.update_dynamic(&victim) {
            assert_eq!(subj, 1);
            ev.extend(m.on_dynamic_update(&idx, &s, "victim-phone", t));
        }
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
    assert_eq!(ev[0].dynamic_device_id.as_deref(), Some("victim-phone"));
    assert_eq!(ev[0].alert_kind(), Some(AlertKind::VictimProximity));
    // Victim data is its own class: the peer evidence is distance and bearing only.
    let peer = ev[0]
        .evidence
        .iter()
        .find(|e| e.source == EvidenceSource::PeerPosition)
        .expect("peer evidence");
    assert_eq!((peer.lat, peer.lon, peer.accuracy_m), (None, None, None));
    assert_eq!(
        peer.distance_m,
        Some(200.0),
        "decided when the victim was 200 m south of the offender"
    );
    assert_eq!(peer.bearing_deg, Some(0.0));
    assert_eq!(peer.device_id.as_deref(), Some("victim-phone"));
    // (Same longitude as the offender here; the latitude is the victim's alone.)
    let victim_lat = offset(HOME, 2800.0, 0.0)[1];
    let json = serde_json::to_string(&ev).unwrap();
    assert!(
        !json.contains(&victim_lat.to_string()),
        "victim latitude {victim_lat} in {json}"
    );
    // Now the offender moves away: his own fixes end it.
    let mut ev = Vec::new();
    for i in 0..4 {
        let t = t0 + Duration::seconds(60 + i * 10);
        ev.extend(m.on_record(&idx, &s, &fix("tag", t, offset(HOME, 5000.0, 0.0), 10.0)));
    }
    assert_eq!(kinds(&ev), vec![K::BreachEnded]);
    // And the offender walking into the (stationary) victim starts it again.
    let mut ev = Vec::new();
    for i in 0..4 {
        let t = t0 + Duration::seconds(120 + i * 10);
        ev.extend(m.on_record(&idx, &s, &fix("tag", t, offset(HOME, 2950.0, 0.0), 10.0)));
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
}

#[test]
fn event_json_shape_and_monitor_round_trip() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, Some(nightly()))).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let far = offset(HOME, 2000.0, 0.0);
    let mut ev = Vec::new();
    for i in 0..3 {
        ev.extend(m.on_record(&idx, &s, &fix("tag", utc(2024, 6, 3, 20, i), far, 5.0)));
    }
    let json = serde_json::to_value(&ev[0]).unwrap();
    assert_eq!(json["kind"], "breach_started");
    assert_eq!(json["zone_kind"], "inclusion");
    assert_eq!(json["is_curfew"], true);
    assert_eq!(json["subject_id"], 1);
    assert_eq!(json["zone_id"], 1);
    assert_eq!(json["started_at"], "2024-06-03T20:00:00Z");
    assert_eq!(json["window"]["start"], "2024-06-03T19:00:00Z");
    assert_eq!(json["window"]["end"], "2024-06-04T07:00:00Z");
    assert_eq!(json["evidence"][0]["source"], "gnss");
    assert!(json["evidence"][0]["distance_m"].as_f64().unwrap() > 1700.0);
    assert!(json.get("reason").is_none());
    let back: ComplianceEvent = serde_json::from_value(json).unwrap();
    assert_eq!(back, ev[0]);
    // The monitor state survives a restart.
    let saved = serde_json::to_string(&m).unwrap();
    let restored: SubjectMonitor = serde_json::from_str(&saved).unwrap();
    assert_eq!(serde_json::to_string(&restored).unwrap(), saved);
    assert!(SubjectMonitor::new(&subject(2, "Nowhere/Special")).is_err());
}

#[test]
fn stale_and_invalid_records_are_ignored() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, None)).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let t0 = utc(2024, 6, 3, 12, 0);
    let far = offset(HOME, 2000.0, 0.0);
    m.on_record(&idx, &s, &fix("tag", t0, far, 5.0));
    // Older records do not count.
    for i in 1..5 {
        assert!(m
            .on_record(&idx, &s, &fix("tag", t0 - Duration::seconds(i), far, 5.0))
            .is_empty());
    }
    // Invalid fixes and NaN do not count.
    for i in 1..5 {
        let mut r = fix("tag", t0 + Duration::seconds(i), far, 5.0);
        if let Some(p) = r.position.as_mut() {
            if i % 2 == 0 {
                p.valid = false;
            } else {
                p.lat = f64::NAN;
            }
        }
        assert!(m.on_record(&idx, &s, &r).is_empty());
    }
}

#[test]
fn walking_into_exclusion_zones_with_cached_candidates() {
    let mut idx = ZoneIndex::new();
    let school = offset(HOME, 0.0, 2000.0);
    let circle = |id: i64, c: [f64; 2]| ZoneSpec {
        id,
        subject_id: Some(1),
        group: None,
        name: "no-go".into(),
        kind: ZoneKind::Exclusion,
        geometry: ZoneGeometry::Circle {
            center: c,
            radius_m: 100.0,
        },
        schedule: None,
        is_curfew_home: false,
    };
    idx.upsert(&circle(1, school)).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let mut t = utc(2024, 6, 3, 12, 0);
    let mut ev = Vec::new();
    // Walk east 15 m per fix from home into the school zone, then stand still there.
    for i in 0..150 {
        let east = (i as f64 * 15.0).min(2000.0);
        ev.extend(m.on_record(&idx, &s, &fix("tag", t, offset(HOME, 0.0, east), 5.0)));
        t += Duration::seconds(10);
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
    // A zone added where the subject now stands is seen at once (index changed).
    idx.upsert(&circle(2, offset(school, 0.0, 10.0))).unwrap();
    let mut ev = Vec::new();
    for _ in 0..3 {
        ev.extend(m.on_record(&idx, &s, &fix("tag", t, school, 5.0)));
        t += Duration::seconds(10);
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
    assert_eq!(ev[0].zone_id, 2);
    // A jump far away ends both.
    let mut ev = Vec::new();
    for _ in 0..3 {
        ev.extend(m.on_record(&idx, &s, &fix("tag", t, offset(HOME, 0.0, -5000.0), 5.0)));
        t += Duration::seconds(10);
    }
    assert_eq!(kinds(&ev), vec![K::BreachEnded, K::BreachEnded]);
}

/// A fix whose device says `device_time` but that the server received at `received`.
fn fix_received(
    device: &str,
    device_time: DateTime<Utc>,
    received: DateTime<Utc>,
    p: [f64; 2],
) -> Record {
    let mut r = fix(device, device_time, p, 10.0);
    r.received_time = received;
    r
}

/// Subject 1 with a 500 m dynamic exclusion zone (id 50) around device `victim-phone`.
fn victim_zone_index() -> SharedZoneIndex {
    let shared = SharedZoneIndex::new(ZoneIndex::new());
    shared
        .write()
        .upsert(&ZoneSpec {
            id: 50,
            subject_id: Some(1),
            group: None,
            name: "victim".into(),
            kind: ZoneKind::Exclusion,
            geometry: ZoneGeometry::Dynamic {
                device_id: "victim-phone".into(),
                radius_m: 500.0,
            },
            schedule: None,
            is_curfew_home: false,
        })
        .unwrap();
    shared
}

#[test]
fn a_future_dated_victim_fix_neither_becomes_the_zone_nor_jumps_the_offender_clock() {
    let shared = victim_zone_index();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let t0 = utc(2026, 11, 30, 12, 0);
    let idx = shared.read();
    // The victim's tag sends one fix dated 2099, received now, far from where she is.
    let forged = fix_received(
        "victim-phone",
        utc(2099, 1, 1, 0, 0),
        t0,
        offset(HOME, -9000.0, 0.0),
    );
    assert!(
        idx.update_dynamic(&forged).is_empty(),
        "a future fix moves no dynamic zone"
    );
    // Nor a fix from far in the past (GPS week roll-over).
    let rolled = fix_received(
        "victim-phone",
        utc(2006, 4, 16, 12, 0),
        t0,
        offset(HOME, -9000.0, 0.0),
    );
    assert!(
        idx.update_dynamic(&rolled).is_empty(),
        "a far-past fix moves no dynamic zone"
    );
    assert!(idx.peer_position("victim-phone", t0).is_none());
    // Her real fixes still move the zone, and the offender walking up to her is caught.
    let offender = offset(HOME, 100.0, 0.0);
    let mut ev = Vec::new();
    for i in 0..4 {
        let t = t0 + Duration::seconds(10 * (i + 1));
        let victim = fix("victim-phone", t, HOME, 10.0);
        for subj in idx.update_dynamic(&victim) {
            assert_eq!(subj, 1);
            ev.extend(m.on_dynamic_update(&idx, &s, "victim-phone", t));
        }
        ev.extend(m.on_record(
            &idx,
            &s,
            &fix("tag", t + Duration::seconds(1), offender, 10.0),
        ));
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
    assert!(
        ev[0].started_at < t0 + Duration::seconds(60),
        "evaluated in 2026, not 2099"
    );
}

#[test]
fn untrusted_device_times_never_move_the_monitor() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, None)).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let t0 = utc(2026, 11, 30, 12, 0);
    let far = offset(HOME, 2000.0, 0.0);
    // Outside fixes dated in 2099 and in 2006 (received now): no breach from them ...
    for i in 0..5 {
        let recv = t0 + Duration::seconds(i);
        assert!(m
            .on_record(
                &idx,
                &s,
                &fix_received(
                    "tag",
                    utc(2099, 1, 1, 0, 0) + Duration::seconds(i),
                    recv,
                    far
                )
            )
            .is_empty());
        assert!(m
            .on_record(
                &idx,
                &s,
                &fix_received(
                    "tag",
                    utc(2006, 4, 16, 0, 0) + Duration::seconds(i),
                    recv,
                    far
                )
            )
            .is_empty());
    }
    // ... and the state did not jump: trusted fixes at t0 are still evaluated.
    let mut ev = Vec::new();
    for i in 1..=3 {
        ev.extend(m.on_record(
            &idx,
            &s,
            &fix("tag", t0 + Duration::seconds(10 * i), far, 5.0),
        ));
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
}

#[test]
fn a_resent_fix_counts_once_towards_consecutive_fixes() {
    let mut idx = ZoneIndex::new();
    idx.upsert(&home_zone(1, 1, None)).unwrap();
    let s = subject(1, "UTC");
    let mut m = SubjectMonitor::new(&s).unwrap();
    let t0 = utc(2026, 11, 30, 12, 0);
    let far = offset(HOME, 2000.0, 0.0);
    // A device re-sends the same outside fix (no ACK seen, reconnects): one piece of evidence.
    for _ in 0..5 {
        assert!(m.on_record(&idx, &s, &fix("tag", t0, far, 5.0)).is_empty());
    }
    // Two more distinct fixes make three.
    let mut ev = Vec::new();
    for i in 1..=2 {
        ev.extend(m.on_record(
            &idx,
            &s,
            &fix("tag", t0 + Duration::seconds(5 * i), far, 5.0),
        ));
    }
    assert_eq!(kinds(&ev), vec![K::BreachStarted]);
}

#[test]
fn bearing_between_points() {
    use em_geofence::bearing_deg;
    let b = |to: [f64; 2]| bearing_deg(HOME, to);
    assert!(b(offset(HOME, 1000.0, 0.0)) < 0.5 || b(offset(HOME, 1000.0, 0.0)) > 359.5);
    assert!((b(offset(HOME, 0.0, 1000.0)) - 90.0).abs() < 0.5);
    assert!((b(offset(HOME, -1000.0, 0.0)) - 180.0).abs() < 0.5);
    assert!((b(offset(HOME, 0.0, -1000.0)) - 270.0).abs() < 0.5);
    assert!((b(offset(HOME, 1000.0, 1000.0)) - 45.0).abs() < 0.5);
}
