//! A vendor device speaking the open EM protocol over the real MQTT broker (Mosquitto at
//! `MQTT_URL`): its telemetry (the documented example payload) is stored in PostgreSQL with
//! the right values and attributed to its subject, a QoS 1 re-delivery does not duplicate it,
//! and a strap-tamper event becomes a `strap_tamper` alert row that is also published on the
//! MQTT alert feed `em/v1/alerts/{subject}/strap_tamper`.

use std::time::Duration;

use chrono::{Duration as ChronoDuration, SecondsFormat, Utc};
use em_e2e::*;
use em_model::{AlertKind, AlertState, BreachRules, DeviceEventKind, FixSource, Protocol, Subject};
use em_store::{AlertFilter, Store};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use tokio::sync::mpsc;

const TELEMETRY_EXAMPLE: &str = include_str!("../../docs/examples/em/telemetry-gnss.json");
const TAMPER_EXAMPLE: &str = include_str!("../../docs/examples/em/event-strap-tamper.json");

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// An MQTT client whose event loop runs in a task; incoming publishes are forwarded.
struct Client {
    client: AsyncClient,
    publishes: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    subacks: mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

fn mqtt_client(id: &str, host: &str, port: u16, clean: bool) -> Client {
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(10));
    o.set_clean_session(clean);
    let (client, mut el) = AsyncClient::new(o, 32);
    let (ptx, publishes) = mpsc::unbounded_channel();
    let (stx, subacks) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = ptx.send((p.topic.clone(), p.payload.to_vec()));
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = stx.send(());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Client {
        client,
        publishes,
        subacks,
        task,
    }
}

async fn seed(store: &dyn Store, device: &str) -> i64 {
    let subject = store
        .upsert_subject(&Subject {
            id: 0,
            reference: format!("OMS-{device}"),
            display_name: "MQTT Subject".into(),
            officer_id: None,
            timezone: "Europe/Copenhagen".into(),
            order_start: None,
            order_end: None,
            rules: BreachRules::default(),
        })
        .await
        .expect("subject");
    register(store, device, Protocol::Em).await;
    store
        .assign_device(device, subject, Utc::now() - ChronoDuration::hours(1))
        .await
        .expect("assign");
    subject
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn em_protocol_device_over_mosquitto_to_store_and_alert_feed() {
    let Some((host, port)) = mosquitto().await else {
        return;
    };
    let Some((store, schema)) = postgres().await else {
        return;
    };
    // Topics are fixed by the protocol: isolation from other tests comes from unique ids.
    let device = unique("e2e-tag");
    let ingest_id = unique("em-ingest-e2e");
    let subject = seed(&*store, &device).await;

    let mut cfg = service_config(&schema);
    cfg.listeners.gt06_port = 0;
    cfg.listeners.teltonika_port = 0;
    cfg.mqtt.enabled = true;
    cfg.mqtt.publish_alerts = true;
    cfg.mqtt.url = mqtt_url();
    cfg.mqtt.client_id = ingest_id.clone();
    let svc = start(cfg).await;

    // The alert feed, as a control room would watch it.
    let mut feed = mqtt_client(&unique("e2e-feed"), &host, port, true);
    let feed_topic = format!("em/v1/alerts/{subject}/strap_tamper");
    feed.client
        .subscribe(feed_topic.clone(), QoS::AtLeastOnce)
        .await
        .expect("subscribe to the alert feed");
    tokio::time::timeout(STEP, feed.subacks.recv())
        .await
        .expect("SUBACK of the alert feed");

    // The tag publishes the documented telemetry example, stamped now.
    let tag = mqtt_client(&device, &host, port, true);
    let time = now_s();
    let mut telemetry: Value = serde_json::from_str(TELEMETRY_EXAMPLE).expect("example JSON");
    telemetry["time"] = Value::String(time.to_rfc3339_opts(SecondsFormat::Secs, true));
    let telemetry_topic = format!("em/v1/{device}/telemetry");
    // Until ingest's subscription is in place the broker drops the message, so the tag
    // repeats it (a QoS 1 re-delivery: same seq and time), as a device without a PUBACK does.
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        tag.client
            .publish(
                telemetry_topic.clone(),
                QoS::AtLeastOnce,
                false,
                telemetry.to_string(),
            )
            .await
            .expect("publish telemetry");
        tokio::time::sleep(Duration::from_millis(400)).await;
        if store.count_records(&device).await.expect("count") > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "telemetry not stored within {STEP:?}"
        );
    }
    // One more re-delivery after it is known to be stored.
    tag.client
        .publish(
            telemetry_topic.clone(),
            QoS::AtLeastOnce,
            false,
            telemetry.to_string(),
        )
        .await
        .expect("publish telemetry again");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        store.count_records(&device).await.expect("count"),
        1,
        "re-deliveries of one report are stored once"
    );

    let records = store.device_records(&device, 10).await.expect("records");
    let r = &records[0];
    assert_eq!(r.device_id, device);
    assert_eq!(r.protocol, Protocol::Em);
    assert_eq!(r.device_time, time);
    assert_eq!(r.seq, Some(1842));
    assert_eq!(r.battery_pct, Some(78));
    assert_eq!(r.charging, Some(false));
    assert_eq!(r.gsm_signal, Some(64));
    assert_eq!(r.beacon_in_range, Some(false));
    assert!(r.events.is_empty(), "no events in a plain telemetry report");
    let p = r.position.as_ref().expect("position stored");
    assert!((p.lat - 55.676098).abs() < 1e-7, "lat {}", p.lat);
    assert!((p.lon - 12.568337).abs() < 1e-7, "lon {}", p.lon);
    assert_eq!(p.accuracy_m, Some(6.5));
    assert_eq!(p.speed_kmh, Some(3.4));
    assert_eq!(p.course_deg, Some(182.0));
    assert_eq!(p.altitude_m, Some(14.0));
    assert_eq!(p.satellites, Some(9));
    assert!(p.valid);
    assert_eq!(p.source, FixSource::Gnss);
    // Attributed to the subject wearing the tag.
    let trail = store
        .trail(
            subject,
            time - ChronoDuration::minutes(1),
            time + ChronoDuration::minutes(1),
            10,
        )
        .await
        .expect("trail");
    assert_eq!(trail.len(), 1, "the fix is on the subject's trail");
    assert_eq!(trail[0].device_id, device);

    // The strap is cut: the documented event example, stamped now.
    let tamper_time = Utc::now();
    let mut tamper: Value = serde_json::from_str(TAMPER_EXAMPLE).expect("example JSON");
    tamper["time"] = Value::String(tamper_time.to_rfc3339_opts(SecondsFormat::Millis, true));
    tag.client
        .publish(
            format!("em/v1/{device}/event"),
            QoS::AtLeastOnce,
            false,
            tamper.to_string(),
        )
        .await
        .expect("publish strap tamper");

    eventually("a strap_tamper alert row in PostgreSQL", STEP, || async {
        store
            .list_alerts(&AlertFilter {
                subject_ids: Some(vec![subject]),
                ..AlertFilter::default()
            })
            .await
            .expect("alerts")
            .iter()
            .any(|a| a.kind == AlertKind::StrapTamper)
    })
    .await;
    let alerts = store
        .list_alerts(&AlertFilter {
            subject_ids: Some(vec![subject]),
            ..AlertFilter::default()
        })
        .await
        .expect("alerts");
    let tamper_alerts: Vec<_> = alerts
        .iter()
        .filter(|a| a.kind == AlertKind::StrapTamper)
        .collect();
    assert_eq!(tamper_alerts.len(), 1, "{alerts:#?}");
    let alert = tamper_alerts[0];
    assert_eq!(alert.device_id.as_deref(), Some(device.as_str()));
    assert_eq!(alert.state, AlertState::Open);
    assert_eq!(alert.severity, em_model::Severity::Critical);
    let tamper_records = store.device_records(&device, 10).await.expect("records");
    assert!(tamper_records
        .iter()
        .any(|r| r.seq == Some(1844) && r.events.contains(&DeviceEventKind::StrapTamper)));

    // The same alert on the MQTT alert feed.
    let deadline = tokio::time::Instant::now() + STEP;
    let notice = loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let (topic, payload) = tokio::time::timeout(left, feed.publishes.recv())
            .await
            .expect("strap_tamper notice on the MQTT alert feed")
            .expect("feed client alive");
        assert_eq!(topic, feed_topic);
        let v: Value = serde_json::from_slice(&payload).expect("notice is JSON");
        // Other test runs may share the broker and the (small) subject id: match our tag.
        if v.pointer("/alert/device_id").and_then(Value::as_str) == Some(device.as_str()) {
            break v;
        }
    };
    assert_eq!(
        notice.get("event").and_then(Value::as_str),
        Some("alert.created")
    );
    assert_eq!(
        notice.pointer("/alert/id").and_then(Value::as_i64),
        Some(alert.id)
    );
    assert_eq!(
        notice.pointer("/alert/kind").and_then(Value::as_str),
        Some("strap_tamper")
    );
    assert_eq!(
        notice.pointer("/alert/subject_id").and_then(Value::as_i64),
        Some(subject)
    );

    feed.task.abort();
    tag.task.abort();
    svc.stop().await;

    // Ingest's session is persistent (clean_session = false); remove it from the broker so
    // test runs leave no queues behind.
    let cleanup = mqtt_client(&ingest_id, &host, port, true);
    cleanup
        .client
        .disconnect()
        .await
        .expect("disconnect the cleanup session");
    tokio::time::sleep(Duration::from_millis(200)).await;
    cleanup.task.abort();
}
