//! Publication of the live alert feed on MQTT: `em/v1/alerts/{subject_id}/{kind}`, QoS 1.

use em_model::{AlertKind, SubjectId};
use rumqttc::{AsyncClient, QoS};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::service::AlertNotice;

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

    /// Forwards notices from `rx` until `shutdown` is cancelled or the sender is gone.
    /// A lagging receiver logs how many notices were skipped and carries on.
    pub async fn run(self, mut rx: broadcast::Receiver<AlertNotice>, shutdown: CancellationToken) {
        info!("MQTT alert publisher started");
        loop {
            let notice = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = rx.recv() => r,
            };
            match notice {
                Ok(n) => {
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
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    warn!(
                        skipped = n,
                        "MQTT alert publisher fell behind; notices skipped"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        info!("MQTT alert publisher stopped");
    }
}
