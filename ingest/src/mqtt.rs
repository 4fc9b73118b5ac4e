//! The open EM protocol over MQTT (`em/v1/{device_id}/telemetry|event|status`).
//!
//! Subscribes with QoS 1 and MANUAL acknowledgements on a persistent session
//! (`clean_session = false`): a message is PUBACKed only after its records are durably stored,
//! so the broker keeps (and redelivers after a reconnect) everything not yet stored. (The
//! device's own PUBACK comes from the broker on receipt; the embedded endpoint,
//! `crate::mqtt_server`, is the path that PUBACKs devices after the store.) With
//! `shared_group` set the subscriptions are `$share/<group>/em/v1/...`, and the broker splits
//! devices between several ingest instances.
//!
//! Device authentication is the broker's job (per-device credentials and an ACL that lets
//! device `<id>` publish only below `em/v1/<id>/`); here every message goes through the one
//! admission check ([`Registry::admit`] with [`Credential::Broker`]): messages whose topic
//! names an unknown or inactive device, or a device registered under another protocol (a GT06
//! tag's IMEI on `em/v1/<imei>/...`), are dropped (acknowledged, counted, logged with the
//! reason), as are malformed ones.
//!
//! The event loop is never blocked by storage: received publishes go to a handler task
//! (bounded queue = `max_inflight`), which queues the records in the pipeline and hands the
//! "stored" receivers in order to an acker task that waits for them and sends the PUBACKs.

use std::time::Duration;

use chrono::Utc;
use em_alerts::MqttAlertPublisher;
use em_model::Protocol;
use em_protocols::em;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::{MqttConfig, MqttUrl};
use crate::metrics as m;
use crate::pipeline::{Pipeline, Stored};
use crate::registry::{Credential, Registry};

const P: Protocol = Protocol::Em;
/// Topic kinds subscribed to.
pub const TOPIC_KINDS: [&str; 3] = ["telemetry", "event", "status"];

/// Topic filters for the configuration (shared subscriptions when a group is set).
pub fn topic_filters(shared_group: Option<&str>) -> Vec<String> {
    TOPIC_KINDS
        .iter()
        .map(|k| match shared_group {
            Some(g) => format!("$share/{g}/em/v1/+/{k}"),
            None => format!("em/v1/+/{k}"),
        })
        .collect()
}

/// Builds the client options from the configuration.
pub fn options(cfg: &MqttConfig) -> Result<MqttOptions, String> {
    let url = MqttUrl::parse(&cfg.url)?;
    let mut o = MqttOptions::new(cfg.client_id.clone(), url.host, url.port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(5)))
        .set_clean_session(false)
        .set_manual_acks(true)
        .set_inflight(cfg.max_inflight.max(1))
        // Oversized payloads are refused by the application (acknowledged and dropped);
        // a transport limit below the broker's would make the client reconnect forever.
        .set_max_packet_size(cfg.max_payload_bytes.max(1 << 20) * 2, 1 << 20);
    if let Some(u) = url.username {
        o.set_credentials(u, url.password.unwrap_or_default());
    }
    Ok(o)
}

/// Where the alert publisher reads alert changes: the store's change log, through this
/// process's feed.
#[derive(Clone)]
pub struct AlertFeedSource {
    pub store: std::sync::Arc<dyn em_store::Store>,
    pub feed: std::sync::Arc<em_store::ChangeFeed>,
}

/// The alert publisher on `client`, run under its lease: one instance publishes each change.
fn spawn_publisher(
    client: AsyncClient,
    src: AlertFeedSource,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let publisher = MqttAlertPublisher::new(client);
    let store = src.store.clone();
    tokio::spawn(em_store::run_leased(
        store,
        em_alerts::PUBLISHER_LEASE,
        em_store::lease::holder_id(),
        stop,
        move |token| {
            publisher
                .clone()
                .run(src.store.clone(), src.feed.clone(), token)
        },
    ))
}

struct Acked {
    publish: Publish,
    stored: Stored,
}

/// Runs the MQTT subscriber (and, with `alerts`, the alert publisher on the same connection)
/// until `shutdown`; then lets in-flight messages finish and disconnects.
pub async fn run(
    cfg: MqttConfig,
    pipeline: Pipeline,
    registry: Registry,
    alerts: Option<AlertFeedSource>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let opts = options(&cfg)?;
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let filters = topic_filters(cfg.shared_group.as_deref());
    let inflight = usize::from(cfg.max_inflight.max(1));

    let (msg_tx, msg_rx) = mpsc::channel::<Publish>(inflight);
    let (ack_tx, ack_rx) = mpsc::channel::<Acked>(inflight);
    let handler = tokio::spawn(handle_messages(
        msg_rx,
        ack_tx,
        pipeline,
        registry,
        cfg.max_payload_bytes,
    ));
    let acker = tokio::spawn(ack_messages(ack_rx, client.clone()));
    let publisher_stop = CancellationToken::new();
    let publisher = alerts
        .filter(|_| cfg.publish_alerts)
        .map(|src| spawn_publisher(client.clone(), src, publisher_stop.clone()));

    let mut backoff = Duration::from_millis(500);
    let mut msg_tx = Some(msg_tx);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(500);
                tracing::info!(url = %crate::config::redact_url(&cfg.url), session_present = ack.session_present,
                    filters = ?filters, "MQTT connected");
                let c = client.clone();
                let f = filters.clone();
                tokio::spawn(async move {
                    for t in f {
                        if let Err(e) = c.subscribe(t.clone(), QoS::AtLeastOnce).await {
                            tracing::error!(topic = t, error = %e, "MQTT subscribe failed");
                        }
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                tracing::debug!(codes = ?s.return_codes, "MQTT subscribed");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if let Some(tx) = &msg_tx {
                    if tx.send(p).await.is_err() {
                        msg_tx = None;
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "MQTT connection error");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }

    // Shutdown: no new messages; let the queued ones be stored and acknowledged while the
    // event loop keeps running (it is what sends the PUBACKs), then disconnect.
    drop(msg_tx);
    publisher_stop.cancel();
    let drain = async {
        let _ = handler.await;
        let _ = acker.await;
        if let Some(p) = publisher {
            let _ = p.await;
        }
    };
    tokio::pin!(drain);
    let deadline = tokio::time::sleep(Duration::from_secs(5));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut drain => break,
            _ = &mut deadline => {
                tracing::warn!("MQTT drain timed out; unacknowledged messages will be redelivered");
                break;
            }
            ev = eventloop.poll() => if ev.is_err() { tokio::time::sleep(Duration::from_millis(100)).await },
        }
    }
    let _ = client.try_disconnect();
    let flush = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), flush).await;
    tracing::info!("MQTT subscriber stopped");
    Ok(())
}

/// Only the alert publisher (subscription disabled): keeps the connection's event loop
/// running until `shutdown`.
pub async fn run_publisher_only(
    cfg: MqttConfig,
    alerts: AlertFeedSource,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let mut opts = options(&cfg)?;
    opts.set_clean_session(true).set_manual_acks(false);
    let (client, mut eventloop) = AsyncClient::new(opts, 256);
    let stop = CancellationToken::new();
    let publisher = spawn_publisher(client.clone(), alerts, stop.clone());
    let mut backoff = Duration::from_millis(500);
    loop {
        let ev = tokio::select! {
            _ = shutdown.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => backoff = Duration::from_millis(500),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "MQTT (alert publisher) connection error");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    stop.cancel();
    let _ = publisher.await;
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), eventloop.poll()).await;
    Ok(())
}

async fn handle_messages(
    mut rx: mpsc::Receiver<Publish>,
    ack_tx: mpsc::Sender<Acked>,
    pipeline: Pipeline,
    registry: Registry,
    max_payload: usize,
) {
    while let Some(publish) = rx.recv().await {
        m::frame(P);
        let stored = match accept(&publish, &pipeline, &registry, max_payload).await {
            Ok(stored) => stored,
            Err(Refuse::Acknowledge) => {
                // Nothing to store: PUBACK at once, in order with the others.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(Ok(()));
                rx
            }
            Err(Refuse::Later) => continue,
            Err(Refuse::Closed) => break,
        };
        if ack_tx.send(Acked { publish, stored }).await.is_err() {
            break;
        }
    }
}

enum Refuse {
    /// Refused for good (malformed, unknown device): acknowledge so it is not redelivered.
    Acknowledge,
    /// Transient failure: leave it unacknowledged (redelivered after a reconnect).
    Later,
    /// The pipeline is shutting down: leave it unacknowledged (redelivered later).
    Closed,
}

async fn accept(
    publish: &Publish,
    pipeline: &Pipeline,
    registry: &Registry,
    max_payload: usize,
) -> Result<Stored, Refuse> {
    if publish.payload.len() > max_payload {
        m::decode_error(P, "oversized");
        m::mqtt_message("oversized");
        tracing::warn!(topic = %publish.topic, len = publish.payload.len(), max = max_payload,
            "MQTT payload too large; dropped");
        return Err(Refuse::Acknowledge);
    }
    let msg = match em::decode(&publish.topic, &publish.payload) {
        Ok(msg) => msg,
        Err(e) => {
            m::decode_error(P, e.reason());
            m::mqtt_message("malformed");
            let device = em::parse_topic(&publish.topic)
                .ok()
                .map(|(d, _)| d.to_owned());
            tracing::warn!(topic = %publish.topic, device, reason = e.reason(), error = %e,
                "malformed EM message; dropped");
            return Err(Refuse::Acknowledge);
        }
    };
    // The external broker authenticated the device (username = device id, password = its
    // secret; ACL em/v1/%u/#): what is left to check here is that the topic's device is
    // registered, active and registered as an EM device.
    match registry.admit(&msg.device_id, P, Credential::Broker).await {
        Ok(Ok(_)) => {}
        Ok(Err(refusal)) => {
            m::device_rejected(P, refusal.as_str());
            m::mqtt_message("rejected");
            tracing::warn!(device = %msg.device_id, reason = %refusal, "EM message from a device not accepted; dropped");
            return Err(Refuse::Acknowledge);
        }
        Err(e) => {
            // Not acknowledged: redelivered after the next reconnect.
            tracing::error!(device = %msg.device_id, error = %e, "registry look-up failed");
            return Err(Refuse::Later);
        }
    }
    // One message (a report or a batch of up to 100) is one frame: one completion.
    let Ok(stored) = pipeline.submit_frame(msg.to_records(Utc::now())).await else {
        return Err(Refuse::Closed);
    };
    m::mqtt_message("accepted");
    Ok(stored)
}

async fn ack_messages(mut rx: mpsc::Receiver<Acked>, client: AsyncClient) {
    while let Some(a) = rx.recv().await {
        let ok = match a.stored.await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(topic = %a.publish.topic, error = %e,
                    "EM message not stored; not acknowledged (redelivered after reconnect)");
                false
            }
            Err(_) => false,
        };
        if !ok {
            m::mqtt_message("store_failed");
            // Reconnect so the broker redelivers what we could not store.
            let _ = client.try_disconnect();
            continue;
        }
        if let Err(e) = client.ack(&a.publish).await {
            tracing::warn!(error = %e, "PUBACK could not be queued");
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_plain_and_shared() {
        assert_eq!(
            topic_filters(None),
            vec!["em/v1/+/telemetry", "em/v1/+/event", "em/v1/+/status"]
        );
        assert_eq!(
            topic_filters(Some("g1"))[0],
            "$share/g1/em/v1/+/telemetry".to_string()
        );
    }

    #[test]
    fn options_from_config() {
        let cfg = MqttConfig {
            url: "mqtt://u:p@broker:1999".into(),
            ..MqttConfig::default()
        };
        let o = options(&cfg).unwrap();
        assert_eq!(o.broker_address(), ("broker".to_string(), 1999));
        assert!(!o.clean_session());
        assert!(options(&MqttConfig {
            url: "bad".into(),
            ..MqttConfig::default()
        })
        .is_err());
    }
}
