//! Geofence + alerts wired through the pipeline: a device leaving its curfew home ends in a
//! curfew-violation alert row; a device that goes silent ends in a lost-communication alert.

mod common;

use std::time::Duration;

use chrono::Duration as ChronoDuration;
use common::*;
use em_model::AlertKind;

const T: Duration = Duration::from_secs(15);
async fn leaving_curfew_home_raises_an_alert(db: TestDb) {
    let imei = "358307100000950";
    let sid = subject_with_curfew_home(&*db.store, imei, 3600).await;
    let svc = start(test_config(&db)).await;
    let mut s = connect(svc.addrs.gt06.unwrap()).await;
    send(&mut s, &gt06_login(imei, 1)).await;
    read_n(&mut s, 10, T).await.expect("login ACK");

    let t0 = now_s() - ChronoDuration::seconds(60);
    // Two fixes at home, then four ~2 km away.
    let fixes = [
        (HOME[1], HOME[0]),
        (HOME[1] + 0.0002, HOME[0]),
        (HOME[1] + 0.02, HOME[0]),
        (HOME[1] + 0.021, HOME[0]),
        (HOME[1] + 0.022, HOME[0]),
        (HOME[1] + 0.023, HOME[0]),
    ];
    for (i, (lat, lon)) in fixes.iter().enumerate() {
        let serial = 10 + i as u16;
        let t = t0 + ChronoDuration::seconds(10 * i as i64);
        send(&mut s, &gt06_alarm(serial, t, *lat, *lon)).await;
        read_n(&mut s, 10, T).await.expect("ACK");
    }
    eventually("curfew violation alert", T, || async {
        alerts_of(&*db.store, sid)
            .await
            .iter()
            .any(|a| a.kind == AlertKind::CurfewViolation)
    })
    .await;
    let a = alerts_of(&*db.store, sid)
        .await
        .into_iter()
        .find(|a| a.kind == AlertKind::CurfewViolation)
        .unwrap();
    assert_eq!(a.device_id.as_deref(), Some(imei));
    assert!(a.zone_id.is_some());
    drop(s);
    svc.stop().await;
}

async fn silence_raises_lost_communication(db: TestDb) {
    let imei = "358307100000951";
    let sid = subject_with_curfew_home(&*db.store, imei, 3600).await;
    let mut cfg = test_config(&db);
    cfg.health.lost_comm_secs = 2;
    let svc = start(cfg).await;
    let mut s = connect(svc.addrs.gt06.unwrap()).await;
    send(&mut s, &gt06_login(imei, 1)).await;
    read_n(&mut s, 10, T).await.expect("login ACK");
    eventually("lost communication alert", T, || async {
        alerts_of(&*db.store, sid)
            .await
            .iter()
            .any(|a| a.kind == AlertKind::LostCommunication)
    })
    .await;
    // Talking again ends it (auto-resolved by default for this kind).
    send(&mut s, &gt06_alarm(2, now_s(), HOME[1], HOME[0])).await;
    read_n(&mut s, 10, T).await.expect("ACK");
    eventually("lost communication ended", T, || async {
        alerts_of(&*db.store, sid)
            .await
            .iter()
            .any(|a| a.kind == AlertKind::LostCommunication && a.ended_at.is_some())
    })
    .await;
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_leaving_curfew_home_raises_an_alert() {
    leaving_curfew_home_raises_an_alert(sqlite_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_leaving_curfew_home_raises_an_alert() {
    let Some(db) = postgres_db().await else {
        return;
    };
    leaving_curfew_home_raises_an_alert(db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_silence_raises_lost_communication() {
    silence_raises_lost_communication(sqlite_db().await).await;
}
