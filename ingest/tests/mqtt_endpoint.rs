//! The embedded MQTT endpoint (`[mqtt.broker]`): devices log in with their id and secret,
//! publish only on their own topics, get each PUBACK only once the message is stored, and the
//! feed user receives the alert feed. (The kill -9 test over MQTT is in `crash.rs`.)

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use em_model::Protocol;
use rumqttc::mqttbytes::v4::{Packet, SubscribeReasonCode};
use rumqttc::ConnectReturnCode;

const T: Duration = Duration::from_secs(15);
const FEED_PASSWORD: &str = "feed-password-0123456789";

fn endpoint_config(db: &TestDb) -> em_ingest::config::Config {
    let mut cfg = test_config(db);
    cfg.mqtt.broker.enabled = true;
    cfg.mqtt.broker.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.mqtt.broker.feed_password = Some(FEED_PASSWORD.into());
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_log_in_with_their_secret_and_publish_only_on_their_own_topics() {
    let db = sqlite_db().await;
    let (a, b, plain) = ("em-ep-a", "em-ep-b", "em-ep-nosecret");
    register(&*db.store, a, Protocol::Em, Some("secret-of-a-0123456789")).await;
    register(&*db.store, b, Protocol::Em, Some("secret-of-b-0123456789")).await;
    register(&*db.store, plain, Protocol::Em, None).await;
    let svc = start(endpoint_config(&db)).await;
    let addr = svc.addrs.mqtt.expect("endpoint address");

    // Refused logins: CONNACK 5 "not authorised", then the connection is closed.
    for (who, login) in [
        ("wrong password", Some((a, "secret-of-b-0123456789"))),
        ("no password", None),
        (
            "unknown device",
            Some(("em-ep-unknown", "whatever-0123456789")),
        ),
        ("device without a secret", Some((plain, ""))),
        (
            "feed user, wrong password",
            Some(("em-feed", "not-the-feed-password")),
        ),
    ] {
        let (mut c, code) = RawMqtt::connect(addr, "x", login).await.expect(who);
        assert_eq!(code, ConnectReturnCode::NotAuthorized, "{who}");
        assert!(c.next(T).await.is_err(), "{who}: connection closed");
    }

    let (mut dev, code) = RawMqtt::connect(addr, a, Some((a, "secret-of-a-0123456789")))
        .await
        .unwrap();
    assert_eq!(code, ConnectReturnCode::Success);
    let t = now_s();

    // Own topic: the PUBACK comes after the record is stored.
    dev.publish(
        &format!("em/v1/{a}/telemetry"),
        &em_telemetry(1, t, 55.67, 12.56),
        1,
    )
    .await
    .unwrap();
    assert!(dev.puback(1, T).await.unwrap(), "PUBACK");
    assert_eq!(
        db.store.count_records(a).await.unwrap(),
        1,
        "stored at PUBACK"
    );

    // Another device's topic: acknowledged (MQTT 3.1.1 has no refusal code) but not stored,
    // and the connection stays up.
    dev.publish(
        &format!("em/v1/{b}/telemetry"),
        &em_telemetry(2, t, 55.0, 12.0),
        2,
    )
    .await
    .unwrap();
    assert!(dev.puback(2, T).await.unwrap());
    // Malformed payload on its own topic: dropped the same way.
    dev.publish(&format!("em/v1/{a}/telemetry"), b"{not json", 3)
        .await
        .unwrap();
    assert!(dev.puback(3, T).await.unwrap());
    // A device may not subscribe to the alert feed or to other devices.
    dev.subscribe("em/v1/alerts/#", 4).await.unwrap();
    match dev.next(T).await.unwrap() {
        Some(Packet::SubAck(s)) => assert_eq!(s.return_codes, vec![SubscribeReasonCode::Failure]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    dev.subscribe(&format!("em/v1/{a}/#"), 5).await.unwrap();
    match dev.next(T).await.unwrap() {
        Some(Packet::SubAck(s)) => assert!(matches!(
            s.return_codes[..],
            [SubscribeReasonCode::Success(_)]
        )),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // Still connected: the next report is stored and acknowledged.
    dev.send(|b| rumqttc::mqttbytes::v4::PingReq.write(b))
        .await
        .unwrap();
    assert!(matches!(dev.next(T).await.unwrap(), Some(Packet::PingResp)));
    dev.publish(
        &format!("em/v1/{a}/telemetry"),
        &em_telemetry(4, t + chrono::Duration::seconds(1), 55.67, 12.56),
        6,
    )
    .await
    .unwrap();
    assert!(dev.puback(6, T).await.unwrap());
    assert_eq!(db.store.count_records(a).await.unwrap(), 2);
    assert_eq!(
        db.store.count_records(b).await.unwrap(),
        0,
        "no record under b"
    );

    // A second connection of the same device replaces the first.
    let (mut again, code) = RawMqtt::connect(addr, a, Some((a, "secret-of-a-0123456789")))
        .await
        .unwrap();
    assert_eq!(code, ConnectReturnCode::Success);
    assert!(dev.next(T).await.is_err(), "old connection closed");
    again
        .send(|b| rumqttc::mqttbytes::v4::PingReq.write(b))
        .await
        .unwrap();
    assert!(matches!(
        again.next(T).await.unwrap(),
        Some(Packet::PingResp)
    ));
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_user_receives_alert_notices() {
    let db = sqlite_db().await;
    let dev = "em-ep-tamper";
    let sid = subject_with_curfew_home(&*db.store, dev, 0).await;
    register(
        &*db.store,
        dev,
        Protocol::Em,
        Some("secret-tamper-0123456789"),
    )
    .await;
    let svc = start(endpoint_config(&db)).await;
    let addr = svc.addrs.mqtt.expect("endpoint address");

    let (mut feed, code) = RawMqtt::connect(addr, "feed-1", Some(("em-feed", FEED_PASSWORD)))
        .await
        .unwrap();
    assert_eq!(code, ConnectReturnCode::Success);
    feed.subscribe("em/v1/alerts/#", 1).await.unwrap();
    match feed.next(T).await.unwrap() {
        Some(Packet::SubAck(s)) => assert_eq!(
            s.return_codes,
            vec![SubscribeReasonCode::Success(rumqttc::QoS::AtLeastOnce)]
        ),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The feed user cannot inject device data.
    feed.publish(
        &format!("em/v1/{dev}/telemetry"),
        &em_telemetry(1, now_s(), 55.0, 12.0),
        2,
    )
    .await
    .unwrap();
    assert!(feed.puback(2, T).await.unwrap());

    let (mut tag, _) = RawMqtt::connect(addr, dev, Some((dev, "secret-tamper-0123456789")))
        .await
        .unwrap();
    let payload = serde_json::json!({
        "seq": 10, "time": now_s().to_rfc3339(),
        "position": {"lat": HOME[1], "lon": HOME[0]},
        "strap": "tampered", "events": ["strap_tamper"]
    });
    tag.publish(
        &format!("em/v1/{dev}/event"),
        payload.to_string().as_bytes(),
        1,
    )
    .await
    .unwrap();
    assert!(tag.puback(1, T).await.unwrap());

    let want = format!("em/v1/alerts/{sid}/strap_tamper");
    let deadline = tokio::time::Instant::now() + T;
    let notice = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match feed.next(left).await.unwrap() {
            Some(Packet::Publish(p)) if p.topic == want => break p,
            // Other alerts of the subject (e.g. lost communication) may come first.
            Some(Packet::Publish(p)) => assert!(
                p.topic.starts_with(&format!("em/v1/alerts/{sid}/")),
                "unexpected notice on {}",
                p.topic
            ),
            Some(_) => {}
            None => panic!("no alert notice on {want}"),
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(v["event"], "alert.created", "{v}");
    assert_eq!(v["alert"]["kind"], "strap_tamper", "{v}");
    // Only the tag's own record was stored (the feed user's publish was dropped).
    assert_eq!(db.store.count_records(dev).await.unwrap(), 1);
    svc.stop().await;
}

/// While the store cannot write (the positions table is locked by another transaction), the
/// device gets no PUBACK; once the write goes through, it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_puback_before_the_record_is_stored() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let Backend::Postgres(schema) = db.backend.clone() else {
        unreachable!()
    };
    let dev = "em-ep-blocked";
    register(
        &*db.store,
        dev,
        Protocol::Em,
        Some("secret-blocked-0123456789"),
    )
    .await;
    let svc = start(endpoint_config(&db)).await;
    let addr = svc.addrs.mqtt.expect("endpoint address");
    let (mut c, code) = RawMqtt::connect(addr, dev, Some((dev, "secret-blocked-0123456789")))
        .await
        .unwrap();
    assert_eq!(code, ConnectReturnCode::Success);

    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    let mut lock = pool.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "LOCK TABLE \"{schema}\".positions IN EXCLUSIVE MODE"
    )))
    .execute(&mut *lock)
    .await
    .unwrap();

    c.publish(
        &format!("em/v1/{dev}/telemetry"),
        &em_telemetry(1, now_s(), 55.67, 12.56),
        1,
    )
    .await
    .unwrap();
    assert!(
        !c.puback(1, Duration::from_secs(2)).await.unwrap(),
        "PUBACK while the record could not be stored"
    );
    assert_eq!(db.store.count_records(dev).await.unwrap(), 0);

    lock.rollback().await.unwrap();
    assert!(c.puback(1, T).await.unwrap(), "PUBACK once stored");
    assert_eq!(db.store.count_records(dev).await.unwrap(), 1);
    svc.stop().await;
}
