//! Prometheus metrics of the ingest service (via the `metrics` facade). The names are the
//! contract with dashboards and alerting rules:
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `em_connections_total` | counter | protocol |
//! | `em_connections_active` | gauge | protocol |
//! | `em_connections_refused_total` | counter | protocol, reason (`per_ip_limit`, `total_limit`) |
//! | `em_frames_total` | counter | protocol |
//! | `em_decode_errors_total` | counter | protocol, reason |
//! | `em_unknown_message_types_total` | counter | protocol, type (e.g. `0x9c`, `codec 0x07`) |
//! | `em_records_rejected_total` | counter | protocol, reason (records out of range dropped from an acknowledged packet) |
//! | `em_devices_rejected_total` | counter | protocol, reason (`unknown_device`, `inactive_device`, `wrong_protocol`, `missing_credential`, `bad_credential`, `no_registered_secret`, `source_not_allowed`, `id_changed`, `no_login`; see `registry::Refusal`; embedded MQTT endpoint also `no_credentials`, `protocol_version`, `bad_client_id`, `foreign_topic`, `registry_unavailable`) |
//! | `em_records_stored_total` | counter | protocol |
//! | `em_records_untrusted_time_total` | counter | protocol, status (`future`, `far_past`): stored flagged, moved no state |
//! | `em_queue_depth` | gauge | shard |
//! | `em_alert_queue_depth` | gauge | lane |
//! | `em_store_batch_seconds` | histogram | backend |
//! | `em_store_batch_records` | histogram | |
//! | `em_worker_phase_seconds` | histogram | phase (`evaluate`: a stored batch through geofences/health; `tick`: the time-based rules) |
//! | `em_store_errors_total` | counter | |
//! | `em_fix_to_event_seconds` | histogram | |
//! | `em_alert_signals_total` | counter | kind, phase |
//! | `em_mqtt_messages_total` | counter | result (`accepted`, `malformed`, `oversized`, `rejected`, `store_failed`; embedded endpoint also `forbidden_topic`, `subscribe_refused`) |
//! | `em_mqtt_deliveries_total` | counter | result (`sent`, `subscriber_lagging`): embedded endpoint to its subscribers |

use std::net::SocketAddr;
use std::time::Duration;

use em_model::Protocol;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

/// Installs the global recorder and serves `/metrics` on `bind` (port 0: one the OS picks);
/// returns the address bound. Call inside the Tokio runtime.
pub fn install(bind: SocketAddr) -> anyhow::Result<SocketAddr> {
    let latency = [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let listener = std::net::TcpListener::bind(bind)
        .map_err(|e| anyhow::anyhow!("cannot bind the metrics listener to {bind}: {e}"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("em_store_batch_seconds".into()), &latency)?
        .set_buckets_for_metric(Matcher::Full("em_fix_to_event_seconds".into()), &latency)?
        .set_buckets_for_metric(Matcher::Full("em_worker_phase_seconds".into()), &latency)?
        .set_buckets_for_metric(
            Matcher::Full("em_store_batch_records".into()),
            &[1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0],
        )?
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(5));
        loop {
            t.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let h = handle.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    h.render(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics listener failed");
        }
    });
    Ok(local)
}

pub fn connection_opened(p: Protocol) {
    counter!("em_connections_total", "protocol" => p.as_str()).increment(1);
    gauge!("em_connections_active", "protocol" => p.as_str()).increment(1.0);
}

pub fn connection_closed(p: Protocol) {
    gauge!("em_connections_active", "protocol" => p.as_str()).decrement(1.0);
}

pub fn connection_refused(p: Protocol, reason: &'static str) {
    counter!("em_connections_refused_total", "protocol" => p.as_str(), "reason" => reason)
        .increment(1);
}

pub fn frame(p: Protocol) {
    counter!("em_frames_total", "protocol" => p.as_str()).increment(1);
}

pub fn decode_error(p: Protocol, reason: &str) {
    counter!("em_decode_errors_total", "protocol" => p.as_str(), "reason" => reason.to_owned())
        .increment(1);
}

/// A well-framed message of a type the decoder does not support (skipped, connection kept).
/// The label is bounded: the decoders name types by one protocol byte.
pub fn unknown_message_type(p: Protocol, kind: &str) {
    counter!("em_unknown_message_types_total", "protocol" => p.as_str(), "type" => kind.to_owned())
        .increment(1);
}

/// Records dropped from a packet because a value is out of range (the packet is still ACKed).
pub fn records_rejected(p: Protocol, reason: &'static str, n: u64) {
    counter!("em_records_rejected_total", "protocol" => p.as_str(), "reason" => reason)
        .increment(n);
}

pub fn device_rejected(p: Protocol, reason: &'static str) {
    counter!("em_devices_rejected_total", "protocol" => p.as_str(), "reason" => reason)
        .increment(1);
}

pub fn records_stored(p: Protocol, n: u64) {
    counter!("em_records_stored_total", "protocol" => p.as_str()).increment(n);
}

pub fn alert_queue_depth(lane: &str, depth: usize) {
    gauge!("em_alert_queue_depth", "lane" => lane.to_owned()).set(depth as f64);
}

pub fn queue_depth(shard: &str, depth: usize) {
    gauge!("em_queue_depth", "shard" => shard.to_owned()).set(depth as f64);
}

pub fn store_batch(elapsed: Duration, records: usize, backend: &'static str) {
    histogram!("em_store_batch_seconds", "backend" => backend).record(elapsed.as_secs_f64());
    histogram!("em_store_batch_records").record(records as f64);
}

/// Time a pipeline worker spent in one phase (while it runs, its queue waits).
pub fn worker_phase(phase: &'static str, elapsed: Duration) {
    histogram!("em_worker_phase_seconds", "phase" => phase).record(elapsed.as_secs_f64());
}

/// A record whose device time is outside the time policy (stored flagged, moves no state).
pub fn untrusted_time(protocol: &'static str, status: &'static str) {
    counter!("em_records_untrusted_time_total", "protocol" => protocol, "status" => status)
        .increment(1);
}

pub fn store_error() {
    counter!("em_store_errors_total").increment(1);
}

pub fn fix_to_event(seconds: f64) {
    histogram!("em_fix_to_event_seconds").record(seconds.max(0.0));
}

pub fn alert_signal(kind: &'static str, phase: &'static str) {
    counter!("em_alert_signals_total", "kind" => kind, "phase" => phase).increment(1);
}

pub fn mqtt_message(result: &'static str) {
    counter!("em_mqtt_messages_total", "result" => result).increment(1);
}

pub fn mqtt_delivery(result: &'static str) {
    counter!("em_mqtt_deliveries_total", "result" => result).increment(1);
}
