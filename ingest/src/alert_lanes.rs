//! Alert signals leave the pipeline workers through a few ordered lanes.
//!
//! Handling a signal is database work (look up the ongoing alert, write it with its audit
//! record and outbox message in one transaction, then commit): a few milliseconds each. Done
//! inline, it stalled the worker that found the breach, and with it every device of that
//! shard — under load the fix→alert latency and the throughput both collapsed while the CPU
//! idled. The workers now hand each signal to one of `alert_lanes` tasks, chosen by subject,
//! and go on with the next batch.
//!
//! - **Order per subject is kept**: all signals of a subject go to the same lane, in the order
//!   the (single) worker owning the subject produced them, and a lane handles them one by one.
//! - **Nothing is dropped**: lanes are bounded; a full lane makes the worker wait
//!   (backpressure up to the sockets), like a full pipeline queue.
//! - **Shutdown drains**: a lane stops when every sender is gone (the evaluators are dropped
//!   when the pipeline workers stop) and its queue is empty; [`LaneTasks::join`] waits for it.

use std::sync::Arc;

use em_alerts::{AlertService, Signal};
use em_model::SubjectId;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::metrics as m;

/// Signals waiting per lane before the sending worker has to wait.
pub const LANE_CAPACITY: usize = 4096;

/// Sender side, one clone per evaluator. Cheap to clone.
#[derive(Clone)]
pub struct AlertLanes {
    lanes: Arc<Vec<mpsc::Sender<Signal>>>,
}

/// The running lane tasks.
pub struct LaneTasks {
    handles: Vec<JoinHandle<()>>,
}

impl LaneTasks {
    /// Waits until every lane has handled its queue and stopped (after all senders dropped).
    pub async fn join(self) {
        for h in self.handles {
            if let Err(e) = h.await {
                tracing::error!(error = %e, "alert lane panicked");
            }
        }
    }
}

impl AlertLanes {
    /// Starts `lanes` tasks (at least one) handling signals through `alerts`.
    pub fn start(alerts: Arc<AlertService>, lanes: usize) -> (AlertLanes, LaneTasks) {
        let n = lanes.max(1);
        let mut senders = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = mpsc::channel(LANE_CAPACITY);
            senders.push(tx);
            handles.push(tokio::spawn(run_lane(i, rx, alerts.clone())));
        }
        (
            AlertLanes {
                lanes: Arc::new(senders),
            },
            LaneTasks { handles },
        )
    }

    fn lane_of(&self, subject: SubjectId) -> usize {
        let n = i64::try_from(self.lanes.len()).unwrap_or(1).max(1);
        usize::try_from(subject.rem_euclid(n)).unwrap_or(0)
    }

    /// Queues `signal` behind the earlier signals of its subject. Waits while the lane is
    /// full. Only fails (logged) when the lane task is gone, which happens at shutdown only
    /// after every sender is dropped — i.e. never while an evaluator can still call this.
    pub async fn send(&self, signal: Signal) {
        let idx = self.lane_of(signal.subject_id);
        let Some(tx) = self.lanes.get(idx) else {
            return;
        };
        if let Err(e) = tx.send(signal).await {
            let s = e.0;
            tracing::error!(
                subject = s.subject_id,
                kind = s.kind.as_str(),
                "alert lane stopped; signal not handled"
            );
        }
    }
}

async fn run_lane(index: usize, mut rx: mpsc::Receiver<Signal>, alerts: Arc<AlertService>) {
    let lane = index.to_string();
    while let Some(signal) = rx.recv().await {
        let (subject, kind) = (signal.subject_id, signal.kind);
        if let Err(e) = alerts.handle(signal).await {
            tracing::error!(subject, kind = kind.as_str(), error = %e, "alert handling failed");
        }
        m::alert_queue_depth(&lane, rx.len());
    }
    tracing::debug!(lane = index, "alert lane drained and stopped");
}
