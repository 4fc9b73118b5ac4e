//! The escalation task: periodically moves overdue unacknowledged alerts to the supervisor level.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::service::AlertService;

/// Runs [`AlertService::escalate_due`] every `interval` until `shutdown` is cancelled.
/// Errors (e.g. the database is briefly unavailable) are logged and retried on the next tick.
pub async fn run_escalation(
    service: Arc<AlertService>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(
        interval_ms = interval.as_millis() as u64,
        "alert escalation started"
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => {
                if let Err(e) = service.escalate_due(Utc::now()).await {
                    error!(error = %e, "escalation check failed; retrying on the next tick");
                }
            }
        }
    }
    info!("alert escalation stopped");
}
