//! Weekly windows, DST, exceptions and active intervals.

use chrono::{DateTime, TimeZone, Utc};
use chrono_tz::Tz;
use em_geofence::schedule::{resolve_local, CompiledSchedule};
use em_geofence::{active_intervals, parse_timezone, GeofenceError};
use em_model::{ExceptionKind, ScheduleException, ScheduleSpec, WeeklyWindow};

fn utc(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
}

fn every_day(start: &str, end: &str) -> ScheduleSpec {
    ScheduleSpec {
        windows: (1..=7)
            .map(|day| WeeklyWindow {
                day,
                start: start.into(),
                end: end.into(),
            })
            .collect(),
        exceptions: vec![],
    }
}

fn hours(iv: &(DateTime<Utc>, DateTime<Utc>)) -> i64 {
    (iv.1 - iv.0).num_minutes()
}

#[test]
fn overnight_window_lasts_11h_on_spring_forward_and_13h_on_fall_back() {
    for tz_name in ["Europe/London", "Europe/Copenhagen"] {
        let tz: Tz = parse_timezone(tz_name).unwrap();
        let spec = every_day("19:00", "07:00");
        // 2024: spring forward on Sunday 31 March, fall back on Sunday 27 October.
        let ivs =
            active_intervals(&spec, tz, utc(2024, 3, 29, 12, 0), utc(2024, 4, 1, 12, 0)).unwrap();
        let mins: Vec<i64> = ivs.iter().map(hours).collect();
        assert_eq!(
            mins,
            vec![12 * 60, 11 * 60, 12 * 60],
            "{tz_name} spring: {ivs:?}"
        );
        let ivs = active_intervals(
            &spec,
            tz,
            utc(2024, 10, 25, 12, 0),
            utc(2024, 10, 28, 12, 0),
        )
        .unwrap();
        let mins: Vec<i64> = ivs.iter().map(hours).collect();
        assert_eq!(
            mins,
            vec![12 * 60, 13 * 60, 12 * 60],
            "{tz_name} autumn: {ivs:?}"
        );
    }
    // Exact instants in London: Sat 30 Mar 19:00 GMT -> Sun 31 Mar 07:00 BST (06:00Z).
    let tz = parse_timezone("Europe/London").unwrap();
    let ivs = active_intervals(
        &every_day("19:00", "07:00"),
        tz,
        utc(2024, 3, 30, 12, 0),
        utc(2024, 3, 31, 12, 0),
    )
    .unwrap();
    assert_eq!(ivs, vec![(utc(2024, 3, 30, 19, 0), utc(2024, 3, 31, 6, 0))]);
}

#[test]
fn nonexistent_and_ambiguous_local_times() {
    let tz = parse_timezone("Europe/London").unwrap();
    // 01:30 on 31 March 2024 does not exist: the first instant after the gap (01:00Z = 02:00 BST).
    let gap = chrono::NaiveDate::from_ymd_opt(2024, 3, 31)
        .unwrap()
        .and_hms_opt(1, 30, 0)
        .unwrap();
    assert_eq!(resolve_local(tz, gap), utc(2024, 3, 31, 1, 0));
    // 01:30 on 27 October 2024 happens twice: the earlier (BST, 00:30Z).
    let amb = chrono::NaiveDate::from_ymd_opt(2024, 10, 27)
        .unwrap()
        .and_hms_opt(1, 30, 0)
        .unwrap();
    assert_eq!(resolve_local(tz, amb), utc(2024, 10, 27, 0, 30));
    // A window starting inside the gap starts when the clock jumps.
    let spec = ScheduleSpec {
        windows: vec![WeeklyWindow {
            day: 7,
            start: "01:30".into(),
            end: "06:00".into(),
        }],
        exceptions: vec![],
    };
    let ivs = active_intervals(&spec, tz, utc(2024, 3, 30, 0, 0), utc(2024, 4, 1, 0, 0)).unwrap();
    assert_eq!(ivs, vec![(utc(2024, 3, 31, 1, 0), utc(2024, 3, 31, 5, 0))]);
}

#[test]
fn midnight_windows_and_weekday_anchoring() {
    let tz = parse_timezone("Europe/Copenhagen").unwrap();
    // Friday 22:00 -> Saturday 06:00 only (ISO day 5).
    let spec = ScheduleSpec {
        windows: vec![WeeklyWindow {
            day: 5,
            start: "22:00".into(),
            end: "06:00".into(),
        }],
        exceptions: vec![],
    };
    // Week of Mon 3 June 2024 (CEST = UTC+2).
    let ivs = active_intervals(&spec, tz, utc(2024, 6, 3, 0, 0), utc(2024, 6, 10, 0, 0)).unwrap();
    assert_eq!(ivs, vec![(utc(2024, 6, 7, 20, 0), utc(2024, 6, 8, 4, 0))]);
    // Report period starting inside the window is clipped; the window of the day before counts.
    let ivs = active_intervals(&spec, tz, utc(2024, 6, 8, 0, 0), utc(2024, 6, 8, 12, 0)).unwrap();
    assert_eq!(ivs, vec![(utc(2024, 6, 8, 0, 0), utc(2024, 6, 8, 4, 0))]);
    // Consecutive whole days merge; "24:00" end accepted.
    let full = ScheduleSpec {
        windows: vec![
            WeeklyWindow {
                day: 1,
                start: "00:00".into(),
                end: "24:00".into(),
            },
            WeeklyWindow {
                day: 2,
                start: "00:00".into(),
                end: "12:00".into(),
            },
        ],
        exceptions: vec![],
    };
    let ivs = active_intervals(&full, tz, utc(2024, 6, 2, 0, 0), utc(2024, 6, 6, 0, 0)).unwrap();
    assert_eq!(ivs, vec![(utc(2024, 6, 2, 22, 0), utc(2024, 6, 4, 10, 0))]);
}

#[test]
fn exceptions_absence_wins_and_extra_curfew_adds() {
    let tz = parse_timezone("Europe/London").unwrap();
    let mut spec = every_day("19:00", "07:00");
    spec.exceptions = vec![
        ScheduleException {
            kind: ExceptionKind::Absence,
            start: utc(2024, 6, 4, 20, 0),
            end: utc(2024, 6, 4, 23, 0),
            note: Some("hospital".into()),
        },
        ScheduleException {
            kind: ExceptionKind::ExtraCurfew,
            start: utc(2024, 6, 5, 12, 0),
            end: utc(2024, 6, 5, 14, 0),
            note: None,
        },
    ];
    // BST: 19:00 local = 18:00Z, 07:00 local = 06:00Z.
    let ivs = active_intervals(&spec, tz, utc(2024, 6, 4, 12, 0), utc(2024, 6, 5, 16, 0)).unwrap();
    assert_eq!(
        ivs,
        vec![
            (utc(2024, 6, 4, 18, 0), utc(2024, 6, 4, 20, 0)),
            (utc(2024, 6, 4, 23, 0), utc(2024, 6, 5, 6, 0)),
            (utc(2024, 6, 5, 12, 0), utc(2024, 6, 5, 14, 0)),
        ]
    );
    let sched = CompiledSchedule::compile(&spec).unwrap();
    let st = sched.state_at(tz, utc(2024, 6, 4, 21, 0));
    assert!(!st.active);
    assert_eq!(st.next_change, utc(2024, 6, 4, 23, 0));
    let st = sched.state_at(tz, utc(2024, 6, 4, 23, 30));
    assert!(st.active);
    assert_eq!(
        st.interval,
        Some((utc(2024, 6, 4, 23, 0), utc(2024, 6, 5, 6, 0)))
    );
    assert_eq!(st.next_change, utc(2024, 6, 5, 6, 0));
}

#[test]
fn invalid_schedules_and_time_zones_are_rejected() {
    let bad = |start: &str, end: &str, day: u8| ScheduleSpec {
        windows: vec![WeeklyWindow {
            day,
            start: start.into(),
            end: end.into(),
        }],
        exceptions: vec![],
    };
    for s in [
        bad("7pm", "07:00", 1),
        bad("25:00", "07:00", 1),
        bad("19:00", "07:60", 1),
        bad("19:00", "07:00", 8),
        bad("24:00", "07:00", 1),
    ] {
        assert!(
            matches!(
                CompiledSchedule::compile(&s),
                Err(GeofenceError::InvalidSchedule(_))
            ),
            "{s:?}"
        );
    }
    let mut s = every_day("19:00", "07:00");
    s.exceptions.push(ScheduleException {
        kind: ExceptionKind::Absence,
        start: utc(2024, 1, 2, 0, 0),
        end: utc(2024, 1, 1, 0, 0),
        note: None,
    });
    assert!(CompiledSchedule::compile(&s).is_err());
    assert!(matches!(
        parse_timezone("Mars/Olympus"),
        Err(GeofenceError::InvalidTimezone(_))
    ));
    let tz = parse_timezone("UTC").unwrap();
    assert!(active_intervals(
        &every_day("19:00", "07:00"),
        tz,
        utc(2000, 1, 1, 0, 0),
        utc(2030, 1, 1, 0, 0)
    )
    .is_err());
    assert!(active_intervals(
        &every_day("19:00", "07:00"),
        tz,
        utc(2024, 1, 2, 0, 0),
        utc(2024, 1, 1, 0, 0)
    )
    .unwrap()
    .is_empty());
}
