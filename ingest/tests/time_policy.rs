//! One device-time policy on every path, through the real GT06 port and the pipeline
//! (issue 12, finding 1): a fix dated in the future (or years in the past) is stored flagged,
//! but moves no dynamic (victim) zone, no subject monitor, no latest position and no alert.
//!
//! Before the policy, one victim fix dated 2099 became the victim zone's position for good
//! (later real fixes were "older" and ignored), so an offender walking up to the victim raised
//! nothing.

mod common;

use std::time::Duration;

use chrono::{Duration as ChronoDuration, TimeZone, Utc};
use common::*;
use em_model::{
    AlertKind, BreachRules, Protocol, Subject, TimeStatus, ZoneGeometry, ZoneKind, ZoneSpec,
};
use em_store::Store;

const T: Duration = Duration::from_secs(15);

/// Where the victim really is (lon, lat): 2 km north of [`HOME`].
const VICTIM: [f64; 2] = [HOME[0], HOME[1] + 0.018];

/// A subject wearing GT06 `offender`, with a 300 m dynamic exclusion zone around the GT06
/// `victim` device (registered, worn by nobody).
async fn victim_protection(store: &dyn Store, offender: &str, victim: &str) -> i64 {
    let sid = store
        .upsert_subject(&Subject {
            id: 0,
            reference: format!("CASE-{offender}"),
            display_name: "Test Subject".into(),
            officer_id: None,
            timezone: "Europe/London".into(),
            order_start: None,
            order_end: None,
            rules: BreachRules {
                buffer_m: 10.0,
                consecutive_fixes: 2,
                persist_secs: 3600,
                no_fix_secs: 0,
            },
        })
        .await
        .expect("subject");
    store
        .upsert_zone(&ZoneSpec {
            id: 0,
            subject_id: Some(sid),
            group: None,
            name: "Victim (dynamic, 300 m)".into(),
            kind: ZoneKind::Exclusion,
            geometry: ZoneGeometry::Dynamic {
                device_id: victim.into(),
                radius_m: 300.0,
            },
            schedule: None,
            is_curfew_home: false,
        })
        .await
        .expect("zone");
    register(store, offender, Protocol::Gt06, None).await;
    register(store, victim, Protocol::Gt06, None).await;
    store
        .assign_device(offender, sid, Utc::now() - ChronoDuration::hours(2))
        .await
        .expect("assignment");
    sid
}

async fn gt06_device(svc: &Running, imei: &str) -> tokio::net::TcpStream {
    let mut s = connect(svc.addrs.gt06.expect("gt06 listener")).await;
    send(&mut s, &gt06_login(imei, 1)).await;
    read_n(&mut s, 10, T).await.expect("login ACK");
    s
}

async fn fix(s: &mut tokio::net::TcpStream, serial: u16, t: chrono::DateTime<Utc>, p: [f64; 2]) {
    send(s, &gt06_alarm(serial, t, p[1], p[0])).await;
    read_n(s, 10, T)
        .await
        .expect("ACK: an untrusted record is still stored and acknowledged");
}

async fn future_fix_moves_no_state(db: TestDb) {
    let (offender, victim) = ("358307100000960", "358307100000961");
    let sid = victim_protection(&*db.store, offender, victim).await;
    let svc = start(test_config(&db)).await;
    let mut v = gt06_device(&svc, victim).await;
    let mut o = gt06_device(&svc, offender).await;
    let year_2099 = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap();
    let far = [HOME[0] + 0.2, HOME[1] - 0.1];

    // The victim's tag sends one fix dated 2099, far away; then real fixes where she is.
    fix(&mut v, 2, year_2099, far).await;
    let t0 = now_s() - ChronoDuration::seconds(30);
    fix(&mut v, 3, t0, VICTIM).await;
    fix(&mut v, 4, t0 + ChronoDuration::seconds(5), VICTIM).await;
    // The offender walks up to her: 100 m away, well inside the 300 m zone.
    let near = [VICTIM[0], VICTIM[1] + 0.0009];
    for i in 0..3 {
        fix(
            &mut o,
            10 + i,
            t0 + ChronoDuration::seconds(10 + 5 * i64::from(i)),
            near,
        )
        .await;
    }
    eventually("victim-proximity alert from the real fixes", T, || async {
        alerts_of(&*db.store, sid)
            .await
            .iter()
            .any(|a| a.kind == AlertKind::VictimProximity)
    })
    .await;

    // The victim's tag re-sends old fixes from far away (a buffered backlog, or a replay):
    // they are history and do not move her zone away from the offender.
    for i in 0..3 {
        fix(
            &mut v,
            30 + i,
            t0 - ChronoDuration::seconds(600 - i64::from(i)),
            far,
        )
        .await;
    }
    // The offender's own tag now sends a fix dated 2099, far away: it neither ends the
    // breach, nor becomes the latest position, nor dates anything in 2099.
    fix(&mut o, 20, year_2099, far).await;
    // And one from 2006 (GPS week roll-over).
    fix(
        &mut o,
        21,
        Utc.with_ymd_and_hms(2006, 4, 16, 12, 0, 0).unwrap(),
        far,
    )
    .await;
    let last_real = t0 + ChronoDuration::seconds(25);
    fix(&mut o, 22, last_real, near).await;
    eventually("latest state follows the real fix", T, || async {
        let st = db.store.latest_states(Some(&[sid])).await.expect("latest");
        st.first().is_some_and(|s| {
            s.position_time == Some(last_real)
                && s.position.is_some_and(|p| (p.lat - near[1]).abs() < 1e-4)
        })
    })
    .await;
    // A device-clock alert is raised at once for the 2099 fix (server time).
    eventually("device clock alert", T, || async {
        alerts_of(&*db.store, sid)
            .await
            .iter()
            .any(|a| a.kind == AlertKind::DeviceClockWrong)
    })
    .await;
    let alerts = alerts_of(&*db.store, sid).await;
    let proximity = alerts
        .iter()
        .find(|a| a.kind == AlertKind::VictimProximity)
        .expect("proximity alert");
    assert_eq!(
        proximity.ended_at, None,
        "the 2099 fix ended the victim alert"
    );
    for a in &alerts {
        assert!(
            a.started_at < Utc::now() + ChronoDuration::seconds(60),
            "{a:?}"
        );
        assert!(
            a.last_seen_at < Utc::now() + ChronoDuration::seconds(60),
            "{a:?}"
        );
        assert!(
            a.ended_at
                .is_none_or(|e| e < Utc::now() + ChronoDuration::seconds(60)),
            "{a:?}"
        );
    }

    // Every record is stored; the bad ones carry their flag.
    let stored = db
        .store
        .device_records(offender, 100)
        .await
        .expect("records");
    let status_of = |year: i32| {
        stored
            .iter()
            .filter(|r| chrono::Datelike::year(&r.device_time) == year && r.position.is_some())
            .map(|r| r.time_status)
            .collect::<Vec<_>>()
    };
    assert_eq!(status_of(2099), vec![TimeStatus::Future]);
    assert_eq!(status_of(2006), vec![TimeStatus::FarPast]);
    let victim_stored = db.store.device_records(victim, 100).await.expect("records");
    assert!(victim_stored
        .iter()
        .any(|r| r.time_status == TimeStatus::Future));
    drop((v, o));
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_future_fix_moves_no_state() {
    future_fix_moves_no_state(sqlite_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_future_fix_moves_no_state() {
    if let Some(db) = postgres_db().await {
        future_fix_moves_no_state(db).await;
    }
}
