//! Reading the change log: one [`ChangeFeed`] per process reads the log from the database
//! (woken by [`Store::change_wakeups`], polling as a fallback) and hands each entry to the
//! process's local followers; a [`ChangeStream`] follows it from any id, catching up from the
//! database first and again whenever it falls behind. Nothing here carries state between
//! processes: every process reads the log itself.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::{ChangeEntry, ChangeId, Result, Store};

/// Largest page read from the log at once.
const PAGE: i64 = 500;
/// Entries buffered per local follower before it must catch up from the database.
const FANOUT_BUFFER: usize = 4096;

/// The process's reader of the change log.
pub struct ChangeFeed {
    store: Arc<dyn Store>,
    start: ChangeId,
    tx: broadcast::Sender<Arc<ChangeEntry>>,
    position: watch::Receiver<ChangeId>,
}

impl std::fmt::Debug for ChangeFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed")
            .field("position", &*self.position.borrow())
            .finish()
    }
}

impl ChangeFeed {
    /// Starts reading after the newest change now in the log (history is read by followers
    /// that ask for it with [`ChangeFeed::follow`]). Stops at `shutdown`.
    pub async fn start(store: Arc<dyn Store>, shutdown: CancellationToken) -> Result<Arc<Self>> {
        let start = store.last_change_id().await?;
        let (tx, _) = broadcast::channel(FANOUT_BUFFER);
        let (pos_tx, position) = watch::channel(start);
        let feed = Arc::new(ChangeFeed {
            store: store.clone(),
            start,
            tx: tx.clone(),
            position,
        });
        tokio::spawn(read_log(store, tx, pos_tx, start, shutdown));
        Ok(feed)
    }

    /// Id of the newest change when this process started reading (what it read on its own
    /// start-up comes after this).
    pub fn start_position(&self) -> ChangeId {
        self.start
    }

    /// Id of the newest change this process has read.
    pub fn position(&self) -> ChangeId {
        *self.position.borrow()
    }

    /// Waits until this process has read the log up to at least `id` (or `timeout` passed);
    /// returns whether it has.
    pub async fn reached(&self, id: ChangeId, timeout: Duration) -> bool {
        let mut rx = self.position.clone();
        tokio::time::timeout(timeout, rx.wait_for(|p| *p >= id))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Every change with an id above `after`, in id order: first from the database, then live.
    pub fn follow(self: &Arc<Self>, after: ChangeId) -> ChangeStream {
        ChangeStream {
            store: self.store.clone(),
            rx: self.tx.subscribe(),
            last: after,
            backlog: VecDeque::new(),
            catching_up: true,
        }
    }

    /// Follows from the newest change this process has read (live changes only).
    pub fn follow_live(self: &Arc<Self>) -> ChangeStream {
        // Subscribe before reading the position: nothing between the two is missed, and what
        // both see is skipped by id.
        let mut s = self.follow(0);
        s.last = self.position();
        s.catching_up = false;
        s
    }
}

async fn read_log(
    store: Arc<dyn Store>,
    tx: broadcast::Sender<Arc<ChangeEntry>>,
    position: watch::Sender<ChangeId>,
    mut last: ChangeId,
    shutdown: CancellationToken,
) {
    let mut wake = store.change_wakeups();
    let poll = store.change_poll_interval();
    loop {
        loop {
            match store.changes_after(last, PAGE).await {
                Ok(page) if page.is_empty() => break,
                Ok(page) => {
                    let full = page.len() as i64 >= PAGE;
                    for e in page {
                        last = e.id;
                        // No local follower is not an error.
                        let _ = tx.send(Arc::new(e));
                    }
                    position.send_replace(last);
                    if !full {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, after = last, "reading the change log failed; retrying");
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            changed = wake.changed() => {
                if changed.is_err() {
                    // The store's notifier is gone; keep polling.
                    tokio::time::sleep(poll).await;
                }
            }
            _ = tokio::time::sleep(poll) => {}
        }
    }
}

/// One follower's view of the log: every change after its start, once, in id order.
pub struct ChangeStream {
    store: Arc<dyn Store>,
    rx: broadcast::Receiver<Arc<ChangeEntry>>,
    last: ChangeId,
    backlog: VecDeque<ChangeEntry>,
    catching_up: bool,
}

impl std::fmt::Debug for ChangeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeStream")
            .field("last", &self.last)
            .field("catching_up", &self.catching_up)
            .finish()
    }
}

impl ChangeStream {
    /// Id of the last change returned (or the start).
    pub fn last(&self) -> ChangeId {
        self.last
    }

    /// The next change. Errors only when the database cannot be read while catching up; the
    /// stream stays usable (call again).
    pub async fn next(&mut self) -> Result<ChangeEntry> {
        loop {
            if let Some(e) = self.backlog.pop_front() {
                if e.id > self.last {
                    self.last = e.id;
                    return Ok(e);
                }
                continue;
            }
            if self.catching_up {
                let page = self.store.changes_after(self.last, PAGE).await?;
                if page.is_empty() {
                    self.catching_up = false;
                } else {
                    self.backlog.extend(page);
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(e) => {
                    if e.id > self.last {
                        self.last = e.id;
                        return Ok((*e).clone());
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::debug!(
                        missed = n,
                        "change follower fell behind; catching up from the log"
                    );
                    self.catching_up = true;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // The feed stopped (shutdown): nothing more will come.
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}
