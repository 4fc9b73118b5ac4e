//! The live alert feed on the real MQTT broker (`MQTT_URL`, default mqtt://127.0.0.1:1883).

mod common;

use std::sync::Arc;
use std::time::Duration;

use em_alerts::*;
use em_model::*;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

use common::*;

fn broker() -> (String, u16) {
    let url = std::env::var("MQTT_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
    let rest = url
        .trim()
        .strip_prefix("mqtt://")
        .or_else(|| url.strip_prefix("tcp://"))
        .unwrap_or(&url)
        .trim_end_matches('/')
        .to_string();
    match rest.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().expect("MQTT_URL port")),
        None => (rest, 1883),
    }
}

/// True when the broker answers; otherwise SKIPPED (or a panic when CI=true).
async fn reachable(host: &str, port: u16) -> bool {
    let ok = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((host, port)),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    if !ok {
        let msg = format!("MQTT broker not reachable at {host}:{port}; set MQTT_URL");
        if std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1") {
            panic!("CI=true and {msg}");
        }
        eprintln!("\n*** SKIPPED: {msg} ***\n");
    }
    ok
}

#[tokio::test]
async fn alert_notices_are_published_on_mqtt() {
    let (host, port) = broker();
    if !reachable(&host, port).await {
        return;
    }
    let store = em_store::testing::sqlite_store().await;
    let f = fixture(&store).await;
    let service = Arc::new(AlertService::new(store.clone(), AlertConfig::default()).unwrap());
    let topic = alert_topic(f.subject, AlertKind::StrapTamper);
    assert_eq!(topic, format!("em/v1/alerts/{}/strap_tamper", f.subject));

    // Subscriber (a dashboard or an integration listening to the feed).
    let id = std::process::id();
    let mut sub_opts = MqttOptions::new(format!("em-alerts-test-sub-{id}"), &host, port);
    sub_opts.set_keep_alive(Duration::from_secs(5));
    let (sub, mut sub_loop) = AsyncClient::new(sub_opts, 16);
    sub.subscribe("em/v1/alerts/+/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed_tx = Some(subscribed_tx);
        loop {
            match sub_loop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = subscribed_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber connection failed: {e}"),
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("SUBACK within 10 s")
        .unwrap();

    // Publisher, as the service binary wires it.
    let mut pub_opts = MqttOptions::new(format!("em-alerts-test-pub-{id}"), &host, port);
    pub_opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut pub_loop) = AsyncClient::new(pub_opts, 64);
    let token = CancellationToken::new();
    let poll_token = token.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = poll_token.cancelled() => break,
                r = pub_loop.poll() => if let Err(e) = r {
                    eprintln!("publisher connection error: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    let feed = em_store::ChangeFeed::start(service.store().clone(), token.clone())
        .await
        .unwrap();
    let publisher = tokio::spawn(MqttAlertPublisher::new(client).run(
        service.store().clone(),
        feed,
        token.clone(),
    ));

    let alert = service
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Started,
            f.subject,
            minutes_ago(1),
        ))
        .await
        .unwrap()
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let notice = loop {
        let p = tokio::time::timeout_at(deadline, got.recv())
            .await
            .expect("alert notice on MQTT within 10 s")
            .expect("subscriber alive");
        // Other test runs may share the broker: wait for ours.
        let Ok(n) = serde_json::from_slice::<AlertNotice>(&p.payload) else {
            continue;
        };
        if n.alert.id == alert.id && p.topic == topic {
            assert_eq!(p.qos, QoS::AtLeastOnce);
            assert!(!p.retain);
            break n;
        }
    };
    assert_eq!(notice.event, events::CREATED);
    assert_eq!(notice.alert, alert);
    assert_eq!(notice.alert.severity, Severity::Critical);

    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), publisher)
        .await
        .expect("publisher stops on shutdown")
        .unwrap();
}
