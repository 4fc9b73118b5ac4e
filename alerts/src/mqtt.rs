//! Publication of the live alert feed on MQTT: `em/v1/alerts/{subject_id}/{kind}`, QoS 1.

use std::sync::Arc;

use em_model::{AlertKind, SubjectId};
use em_store::{ChangeFeed, Store};
use rumqttc::{AsyncClient, QoS};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::service::{AlertNotice, AlertNotices};

/// Lease under which one instance publishes the alert feed to the external broker.
pub const PUBLISHER_LEASE: &str = "mqtt-alert-publisher";
/// Where the publisher left off in the change log.
pub const PUBLISHER_CURSOR: &str = "mqtt-alert-publisher";

/// Topic of a subject's alerts of one kind.
pub fn alert_topic(subject: SubjectId, kind: AlertKind) -> String {
    format!("em/v1/alerts/{subject}/{}", kind.as_str())
}

/// Publishes every [`AlertNotice`] as JSON with QoS 1 (not retained).
///
/// The caller owns the MQTT connection: it creates the `AsyncClient` and must keep polling its
/// `EventLoop` (that is what actually sends; rumqttc reconnects on the next poll after an error).
#[derive(Clone)]
pub struct MqttAlertPublisher {
    client: AsyncClient,
}

impl std::fmt::Debug for MqttAlertPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttAlertPublisher").finish_non_exhaustive()
    }
}

impl MqttAlertPublisher {
    pub fn new(client: AsyncClient) -> Self {
        MqttAlertPublisher { client }
    }

    /// Publishes one notice.
    pub async fn publish(&self, notice: &AlertNotice) -> Result<(), rumqttc::ClientError> {
        let topic = alert_topic(notice.alert.subject_id, notice.alert.kind);
        let payload = match serde_json::to_vec(notice) {
            Ok(p) => p,
            Err(e) => {
                // An Alert always serialises; keep the feed running if that ever changes.
                error!(error = %e, "cannot serialise alert notice");
                return Ok(());
            }
        };
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
    }

    /// Publishes every alert change of the change log (whichever instance made it) from
    /// where the publisher left off (cursor [`PUBLISHER_CURSOR`] in the store; on the very
    /// first run, from this process's start), until `shutdown`. Run it under the lease [`PUBLISHER_LEASE`]
    /// ([`em_store::run_leased`]) so that exactly one instance publishes each change; the
    /// cursor moves after each publish, so a take-over goes on from there (a change published
    /// just before the holder died may go out twice; QoS 1 is at-least-once anyway).
    pub async fn run(
        self,
        store: Arc<dyn Store>,
        feed: Arc<ChangeFeed>,
        shutdown: CancellationToken,
    ) {
        let start = match store.read_cursor(PUBLISHER_CURSOR).await {
            Ok(Some(id)) => id,
            // The first publisher ever: from this process's start (alerts its own start-up
            // raised included), and the cursor is saved at once, so that an instance taking
            // over later goes on from here even if nothing was published meanwhile.
            Ok(None) => {
                let start = feed.start_position();
                if let Err(e) = store.write_cursor(PUBLISHER_CURSOR, start).await {
                    warn!(error = %e, "MQTT alert publisher cannot save its cursor");
                }
                start
            }
            Err(e) => {
                error!(error = %e, "MQTT alert publisher cannot read its cursor; not started");
                return;
            }
        };
        info!(from_change = start, "MQTT alert publisher started");
        let mut notices = AlertNotices::new(feed.follow(start));
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => break,
                n = notices.next() => n,
            };
            match next {
                Ok((id, n)) => {
                    if let Err(e) = self.publish(&n).await {
                        // The request queue is closed: the event loop was dropped.
                        error!(error = %e, "MQTT alert publish failed; publisher stops");
                        break;
                    }
                    debug!(
                        alert_id = n.alert.id,
                        event = n.event.as_str(),
                        "alert notice published"
                    );
                    if let Err(e) = store.write_cursor(PUBLISHER_CURSOR, id).await {
                        warn!(error = %e, "MQTT alert publisher cannot save its cursor");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "MQTT alert publisher cannot read the change log; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                    }
                }
            }
        }
        info!("MQTT alert publisher stopped");
    }
}
