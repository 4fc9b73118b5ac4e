//! Leases: jobs that must run on exactly one instance (OMS delivery, escalation, retention, the
//! MQTT alert publisher) run under a lease taken from the database. On PostgreSQL the lease is
//! a session advisory lock held on a connection of its own: when the holder's process dies its
//! connection closes and the server drops the lock at once, so another instance takes over at
//! its next try (within [`RETRY`]). On SQLite it is a row with an expiry.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::Store;

/// How often an instance without the lease tries to take it, and how often the holder checks
/// that it still has it.
pub const RETRY: Duration = Duration::from_secs(1);

/// A held lease (backend-specific).
#[async_trait]
pub trait LeaseHold: Send {
    /// Whether the lease is still held (renews it where it expires).
    async fn still_held(&mut self) -> bool;
    /// Gives the lease up.
    async fn release(self: Box<Self>);
}

/// A lease taken with [`Store::acquire_lease`].
pub struct Lease {
    name: String,
    hold: Box<dyn LeaseHold>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("name", &self.name).finish()
    }
}

impl Lease {
    pub fn new(name: &str, hold: Box<dyn LeaseHold>) -> Self {
        Lease {
            name: name.to_string(),
            hold,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub async fn still_held(&mut self) -> bool {
        self.hold.still_held().await
    }

    pub async fn release(self) {
        self.hold.release().await
    }
}

/// A holder name for this process: host, pid and a random part (two processes never share one).
pub fn holder_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "host".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Runs `job` whenever this instance holds the lease `name`, until `shutdown`.
///
/// Without the lease it tries again every [`RETRY`]. With it, it checks every [`RETRY`] that
/// the lease is still held; when it is lost (database connection gone) the job's token is
/// cancelled, the job is awaited, and the instance goes back to trying. `job` gets a token
/// that is cancelled at shutdown or when the lease is lost, and should return soon after.
pub async fn run_leased<F, Fut>(
    store: Arc<dyn Store>,
    name: &'static str,
    holder: String,
    shutdown: CancellationToken,
    job: F,
) where
    F: Fn(CancellationToken) -> Fut + Send + Sync,
    Fut: Future<Output = ()> + Send,
{
    let mut waiting_logged = false;
    while !shutdown.is_cancelled() {
        match store.acquire_lease(name, &holder).await {
            Ok(Some(mut lease)) => {
                tracing::info!(
                    lease = name,
                    holder = holder.as_str(),
                    "lease taken; job running here"
                );
                waiting_logged = false;
                let token = shutdown.child_token();
                let run = job(token.clone());
                tokio::pin!(run);
                let mut check = tokio::time::interval(RETRY);
                check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                check.tick().await;
                let mut lost = false;
                loop {
                    tokio::select! {
                        _ = &mut run => break,
                        _ = check.tick(), if !lost => {
                            if !lease.still_held().await {
                                tracing::warn!(lease = name, "lease lost; stopping the job here");
                                lost = true;
                                token.cancel();
                            }
                        }
                    }
                }
                if !lost {
                    lease.release().await;
                }
                tracing::info!(lease = name, "job stopped; lease given up");
            }
            Ok(None) => {
                if !waiting_logged {
                    tracing::info!(lease = name, "lease held by another instance; standing by");
                    waiting_logged = true;
                }
            }
            Err(e) => tracing::warn!(lease = name, error = %e, "cannot take the lease; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}
