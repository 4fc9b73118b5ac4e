//! Several ingest instances on one database ("Scaling out" in the README): every instance
//! tracks every assigned device, but a device talks to only one of them. An instance that
//! hears nothing from a device must not raise silence-based alerts (lost communication, no
//! fix during curfew) while the device keeps talking to another instance; when the device
//! really goes silent the alert is raised, and the raises of both instances fold into ONE
//! open alert.

mod common;

use std::time::Duration;

use common::*;
use em_model::{AlertKind, AlertState};
use em_store::Store;

const T: Duration = Duration::from_secs(20);
/// Short thresholds so the test runs in seconds (ticks are 1 s in `test_config`).
const LOST_COMM_SECS: u64 = 3;
const NO_FIX_SECS: u32 = 3;

/// Alerts of `kind` for subject `sid`.
async fn alerts_of_kind(store: &dyn Store, sid: i64, kind: AlertKind) -> Vec<em_model::Alert> {
    alerts_of(store, sid)
        .await
        .into_iter()
        .filter(|a| a.kind == kind)
        .collect()
}

/// One fix at home (an alarm frame, which the server acknowledges).
async fn talk(s: &mut tokio::net::TcpStream, serial: &mut u16) {
    *serial += 1;
    send(s, &gt06_alarm(*serial, now_s(), HOME[1], HOME[0])).await;
    read_n(s, 10, T).await.expect("ACK");
}

async fn device_on_one_instance_is_not_lost_on_the_other(db: TestDb) {
    let imei = "358307100000960";
    let sid = subject_with_curfew_home(&*db.store, imei, NO_FIX_SECS).await;
    let mut cfg = test_config(&db);
    cfg.health.lost_comm_secs = LOST_COMM_SECS;
    let a = start(cfg.clone()).await;

    // The device talks to A only, every second. (It was assigned two hours ago and never
    // heard from, so A may raise lost communication / no fix at its first tick: true alerts,
    // ended by the device's first messages.)
    let mut s = connect(a.addrs.gt06.unwrap()).await;
    send(&mut s, &gt06_login(imei, 1)).await;
    read_n(&mut s, 10, T).await.expect("login ACK");
    let mut serial = 10u16;
    talk(&mut s, &mut serial).await;

    // Instance B on the same database; it never hears from the device.
    let mut cfg_b = test_config(&db);
    cfg_b.health = cfg.health.clone();
    let b = start(cfg_b).await;
    let b_started = chrono::Utc::now();

    // Well over twice the lost-comm threshold and the no-fix time: B ticks every second and,
    // judging by what it hears itself, would have raised both by now.
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(4 * LOST_COMM_SECS) {
        talk(&mut s, &mut serial).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for kind in [AlertKind::LostCommunication, AlertKind::NoFixDuringCurfew] {
        for alert in alerts_of_kind(&*db.store, sid, kind).await {
            assert!(
                alert.created_at < b_started && alert.ended_at.is_some(),
                "{kind:?} raised while the device talks to instance A: {alert:#?}"
            );
        }
    }

    // Now the device really goes silent (connection kept open, nothing sent).
    let silent_from = chrono::Utc::now();
    let since_silence = |alerts: Vec<em_model::Alert>| -> Vec<em_model::Alert> {
        alerts
            .into_iter()
            .filter(|a| a.created_at >= silent_from)
            .collect()
    };
    eventually("lost communication alert", T, || async {
        !since_silence(alerts_of_kind(&*db.store, sid, AlertKind::LostCommunication).await)
            .is_empty()
    })
    .await;
    // Give the other instance time to raise too (its timer may have been re-based on the
    // store's last contact, so it can fire up to one threshold later).
    tokio::time::sleep(Duration::from_secs(2 * LOST_COMM_SECS + 2)).await;
    let lost = since_silence(alerts_of_kind(&*db.store, sid, AlertKind::LostCommunication).await);
    assert_eq!(lost.len(), 1, "one lost-communication alert: {lost:#?}");
    assert_eq!(lost[0].state, AlertState::Open);
    assert!(lost[0].ended_at.is_none(), "still silent: {:#?}", lost[0]);
    assert!(
        (1..=2).contains(&lost[0].occurrences),
        "at most one raise per instance: {:#?}",
        lost[0]
    );
    // No fix during curfew is a true condition now too; raised at most once.
    let no_fix = since_silence(alerts_of_kind(&*db.store, sid, AlertKind::NoFixDuringCurfew).await);
    assert!(no_fix.len() <= 1, "no-fix raises folded: {no_fix:#?}");

    // The device comes back on A: the condition ends.
    talk(&mut s, &mut serial).await;
    eventually("lost communication ended", T, || async {
        alerts_of_kind(&*db.store, sid, AlertKind::LostCommunication)
            .await
            .iter()
            .all(|a| a.ended_at.is_some())
    })
    .await;
    drop(s);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_device_on_one_instance_is_not_lost_on_the_other() {
    device_on_one_instance_is_not_lost_on_the_other(sqlite_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_device_on_one_instance_is_not_lost_on_the_other() {
    let Some(db) = postgres_db().await else {
        return;
    };
    device_on_one_instance_is_not_lost_on_the_other(db).await;
}
