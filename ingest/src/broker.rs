//! The in-process MQTT broker of the embedded default (`rumqttd`, MQTT 3.1.1, no
//! authentication — for local use; production deployments use an external broker such as
//! Mosquitto with per-device credentials and ACLs).
//!
//! rumqttd runs its own threads; it lives until the process exits.

use std::net::SocketAddr;
use std::time::Duration;

/// Starts the broker listening on `bind` and waits until it accepts connections.
pub async fn start(bind: SocketAddr) -> anyhow::Result<()> {
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 10485760
max_segment_count = 10

[v4.1]
name = "em-embedded"
listen = "{bind}"
next_connection_delay_ms = 1
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 262144
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("embedded MQTT broker configuration: {e}"))?;
    // Fail early with a clear message when the port is taken (rumqttd would only log it).
    std::net::TcpListener::bind(bind)
        .map_err(|e| anyhow::anyhow!("embedded MQTT broker cannot listen on {bind}: {e}"))?;
    std::thread::Builder::new()
        .name("em-mqtt-broker".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded MQTT broker stopped");
            }
        })?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(bind).await.is_ok() {
            tracing::info!(%bind, "embedded MQTT broker listening (no authentication: local use only)");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("embedded MQTT broker did not start listening on {bind}")
}
