//! End-to-end tests of the device listeners against a real store (SQLite file and
//! PostgreSQL): login, ACK only after storage, unknown devices, malformed frames, limits.

mod common;

use std::time::Duration;

use chrono::Duration as ChronoDuration;
use common::*;
use em_model::Protocol;
use em_protocols::gt06;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(10);

async fn gt06_fixes_are_acked_after_storage(db: TestDb) {
    let imei = "358307100000901";
    register(&*db.store, imei, Protocol::Gt06, None).await;
    let svc = start(test_config(&db)).await;
    let addr = svc.addrs.gt06.expect("gt06 listener");
    let mut s = connect(addr).await;

    send(&mut s, &gt06_login(imei, 1)).await;
    let ack = read_n(&mut s, 10, T).await.expect("login ACK");
    assert_eq!(ack, gt06_ack(gt06::proto::LOGIN, 1));
    // The login ACK is written only after the login record is stored.
    assert_eq!(db.store.count_records(imei).await.unwrap(), 1);

    let t0 = now_s() - ChronoDuration::seconds(60);
    for i in 0..5u16 {
        let t = t0 + ChronoDuration::seconds(i64::from(i));
        send(
            &mut s,
            &gt06_alarm(10 + i, t, 55.68 + f64::from(i) * 1e-4, 12.57),
        )
        .await;
        let ack = read_n(&mut s, 10, T).await.expect("alarm ACK");
        assert_eq!(ack, gt06_ack(gt06::proto::ALARM, 10 + i));
        // Durable when acknowledged: visible in the store right after the ACK.
        let n = db.store.count_records(imei).await.unwrap();
        assert_eq!(n, 2 + i64::from(i), "record {i} stored before its ACK");
    }
    // Location frames have no ACK in GT06; they are stored all the same.
    send(
        &mut s,
        &gt06_location(20, t0 + ChronoDuration::seconds(30), 55.69, 12.58),
    )
    .await;
    eventually("location stored", T, || async {
        db.store.count_records(imei).await.unwrap() == 7
    })
    .await;
    let recs = db.store.device_records(imei, 100).await.unwrap();
    let with_pos = recs.iter().filter(|r| r.position.is_some()).count();
    assert_eq!(with_pos, 6);
    assert!(recs.iter().all(|r| r.protocol == Protocol::Gt06));
    drop(s);
    svc.stop().await;
}

async fn teltonika_packet_count_is_acked_after_storage(db: TestDb) {
    let imei = "352094000000901";
    register(&*db.store, imei, Protocol::Teltonika, None).await;
    let svc = start(test_config(&db)).await;
    let mut s = connect(svc.addrs.teltonika.expect("teltonika listener")).await;
    send(&mut s, &teltonika_imei(imei)).await;
    assert_eq!(read_n(&mut s, 1, T).await.expect("IMEI reply"), vec![0x01]);

    let t0 = now_s() - ChronoDuration::seconds(120);
    send(&mut s, &teltonika_packet(t0, 7, 55.6, 12.5)).await;
    let ack = read_n(&mut s, 4, T).await.expect("record count");
    assert_eq!(ack, 7u32.to_be_bytes().to_vec());
    // 1 login record + 7 AVL records, all stored before the count was sent.
    assert_eq!(db.store.count_records(imei).await.unwrap(), 8);

    // Re-sending the same packet (as a device does without an ACK) does not duplicate.
    send(&mut s, &teltonika_packet(t0, 7, 55.6, 12.5)).await;
    assert_eq!(
        read_n(&mut s, 4, T).await.unwrap(),
        7u32.to_be_bytes().to_vec()
    );
    assert_eq!(db.store.count_records(imei).await.unwrap(), 8);
    drop(s);
    svc.stop().await;
}

async fn h02_reports_are_stored(db: TestDb) {
    let imei = "4209917123";
    register(&*db.store, imei, Protocol::H02, None).await;
    let svc = start(test_config(&db)).await;
    let mut s = connect(svc.addrs.h02.expect("h02 listener")).await;
    let t = now_s();
    let frame = format!(
        "*HQ,{imei},V1,{},A,5540.8000,N,01234.5000,E,0.00,0,{},FFFFFBFF#",
        t.format("%H%M%S"),
        t.format("%d%m%y")
    );
    send(&mut s, frame.as_bytes()).await;
    send(&mut s, format!("*HQ,{imei},XT#").as_bytes()).await;
    eventually("H02 records stored", T, || async {
        db.store.count_records(imei).await.unwrap() == 2
    })
    .await;
    let recs = db.store.device_records(imei, 10).await.unwrap();
    let pos = recs.iter().find_map(|r| r.position).expect("a position");
    assert!(
        (pos.lat - 55.68).abs() < 1e-3 && (pos.lon - 12.575).abs() < 1e-3,
        "{pos:?}"
    );

    // Another IMEI on the same connection is refused: the connection is closed.
    send(&mut s, b"*HQ,4209917999,XT#").await;
    assert!(closed_by_server(&mut s, T).await);
    drop(s);
    svc.stop().await;
}

async fn unknown_devices_are_rejected(db: TestDb) {
    let svc = start(test_config(&db)).await;
    // GT06: no login ACK, connection closed.
    let mut s = connect(svc.addrs.gt06.unwrap()).await;
    send(&mut s, &gt06_login("358307100000999", 1)).await;
    assert!(
        closed_by_server(&mut s, T).await,
        "GT06 unknown device closed"
    );
    // Teltonika: 0x00, then closed.
    let mut s = connect(svc.addrs.teltonika.unwrap()).await;
    send(&mut s, &teltonika_imei("352094000000999")).await;
    assert_eq!(read_n(&mut s, 1, T).await.unwrap(), vec![0x00]);
    assert!(
        closed_by_server(&mut s, T).await,
        "Teltonika unknown device closed"
    );
    // Inactive devices are refused like unknown ones.
    db.store
        .upsert_device(&em_model::Device {
            device_id: "352094000000998".into(),
            protocol: Protocol::Teltonika,
            secret: None,
            active: false,
            class: em_model::DeviceClass::OffenderTag,
        })
        .await
        .unwrap();
    let mut s = connect(svc.addrs.teltonika.unwrap()).await;
    send(&mut s, &teltonika_imei("352094000000998")).await;
    assert_eq!(read_n(&mut s, 1, T).await.unwrap(), vec![0x00]);
    assert_eq!(db.store.count_records("358307100000999").await.unwrap(), 0);
    assert_eq!(db.store.count_records("352094000000998").await.unwrap(), 0);
    svc.stop().await;
}

async fn malformed_frames_keep_or_close_the_connection(db: TestDb) {
    let gt = "358307100000902";
    let tt = "352094000000902";
    register(&*db.store, gt, Protocol::Gt06, None).await;
    register(&*db.store, tt, Protocol::Teltonika, None).await;
    let svc = start(test_config(&db)).await;

    // GT06 resynchronises: a frame with a bad checksum and some garbage are skipped, the
    // connection stays, the next good frame is acknowledged.
    let mut s = connect(svc.addrs.gt06.unwrap()).await;
    send(&mut s, &gt06_login(gt, 1)).await;
    read_n(&mut s, 10, T).await.expect("login ACK");
    let mut bad = gt06_alarm(2, now_s(), 55.0, 12.0).to_vec();
    let n = bad.len();
    bad[n - 4] ^= 0xFF; // corrupt the CRC
    send(&mut s, &bad).await;
    send(&mut s, b"\x01\x02garbage").await;
    send(&mut s, &gt06_alarm(3, now_s(), 55.0, 12.0)).await;
    assert_eq!(
        read_n(&mut s, 10, T).await.expect("ACK after resync"),
        gt06_ack(gt06::proto::ALARM, 3)
    );
    assert_eq!(db.store.count_records(gt).await.unwrap(), 2);

    // Teltonika cannot resynchronise after a broken preamble: the connection is closed.
    let mut s = connect(svc.addrs.teltonika.unwrap()).await;
    send(&mut s, &teltonika_imei(tt)).await;
    assert_eq!(read_n(&mut s, 1, T).await.unwrap(), vec![0x01]);
    send(&mut s, &[0, 0, 0, 7, 0, 0, 0, 10, 1, 2, 3]).await;
    assert!(
        closed_by_server(&mut s, T).await,
        "fatal framing error closes"
    );
    svc.stop().await;
}

async fn connection_limit_per_ip(db: TestDb) {
    let imei = "358307100000903";
    register(&*db.store, imei, Protocol::Gt06, None).await;
    let mut cfg = test_config(&db);
    cfg.listeners.max_connections_per_ip = 2;
    let svc = start(cfg).await;
    let addr = svc.addrs.gt06.unwrap();
    let mut a = connect(addr).await;
    let mut b = connect(addr).await;
    // Make sure both are accepted (a login round trip on each).
    for s in [&mut a, &mut b] {
        send(s, &gt06_login(imei, 1)).await;
        read_n(s, 10, T).await.expect("login ACK");
    }
    let mut c = connect(addr).await;
    assert!(
        closed_by_server(&mut c, T).await,
        "third connection refused"
    );
    // Closing one frees a slot.
    a.shutdown().await.ok();
    drop(a);
    eventually("slot freed", T, || async {
        let mut d = connect(addr).await;
        send(&mut d, &gt06_login(imei, 1)).await;
        read_n(&mut d, 10, Duration::from_millis(500)).await.is_ok()
    })
    .await;
    svc.stop().await;
}

async fn login_timeout_closes_silent_connections(db: TestDb) {
    let mut cfg = test_config(&db);
    cfg.listeners.login_timeout_secs = 1;
    let svc = start(cfg).await;
    let mut s = connect(svc.addrs.gt06.unwrap()).await;
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await);
    svc.stop().await;
}

macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(sqlite_db().await).await;
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(db) = postgres_db().await else { return };
                    super::$name(db).await;
                }
            )*
        }
    };
}

both_backends!(
    gt06_fixes_are_acked_after_storage,
    teltonika_packet_count_is_acked_after_storage,
    h02_reports_are_stored,
    unknown_devices_are_rejected,
    malformed_frames_keep_or_close_the_connection,
    connection_limit_per_ip,
    login_timeout_closes_silent_connections,
);
