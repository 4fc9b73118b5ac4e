//! The sharded ingest pipeline.
//!
//! Every record is routed by a hash of its device id to one of a fixed set of workers, over a
//! BOUNDED queue: when a worker falls behind, [`Pipeline::submit`] waits, which stops the
//! connection task reading from its socket (backpressure reaches the device; memory stays
//! bounded). Because one device always lands on the same worker, its records are handled in
//! order and its per-device / per-subject state lives in exactly one place.
//!
//! A worker takes what is queued (up to `batch_max_records`, waiting at most
//! `batch_max_wait_ms` for more), resolves each record's subject through the assignment history,
//! writes the whole batch with ONE `Store::insert_records` call and only then completes each
//! record's oneshot — the connection task waits for that before it writes the protocol ACK, so a
//! device is never acknowledged for data that is not durably stored. After the ACKs, the
//! worker's [`ShardProcessor`] evaluates the stored records (geofences, device health, alerts);
//! a periodic tick drives the time-based rules.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use em_model::{Record, SubjectId};
use em_store::{Store, StoreError, StoredRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::metrics as m;
use crate::registry::Registry;

/// `[pipeline]` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Number of workers (shards). 0 = one per CPU core.
    pub workers: usize,
    /// Capacity of each worker's queue, in records. A full queue makes connections wait.
    pub queue_capacity: usize,
    /// Maximum records per `insert_records` call.
    pub batch_max_records: usize,
    /// How long a worker waits for more records before writing a non-full batch.
    pub batch_max_wait_ms: u64,
    /// Period of the time-based rules (lost communication, no-fix timers, curfew windows).
    pub tick_secs: u64,
    /// Attempts of a failing batch write before the records are refused (not ACKed).
    pub store_attempts: u32,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 0,
            queue_capacity: 1024,
            batch_max_records: 500,
            batch_max_wait_ms: 5,
            tick_secs: 10,
            store_attempts: 4,
        }
    }
}

impl PipelineConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.workers > 1024 {
            return Err("pipeline.workers must be at most 1024 (0 = one per CPU)".into());
        }
        if self.queue_capacity == 0 {
            return Err("pipeline.queue_capacity must be > 0".into());
        }
        if self.batch_max_records == 0 {
            return Err("pipeline.batch_max_records must be > 0".into());
        }
        if self.batch_max_wait_ms > 10_000 {
            return Err("pipeline.batch_max_wait_ms must be at most 10000".into());
        }
        if self.tick_secs == 0 {
            return Err("pipeline.tick_secs must be > 0".into());
        }
        if self.store_attempts == 0 {
            return Err("pipeline.store_attempts must be > 0".into());
        }
        Ok(())
    }

    /// Effective number of workers.
    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            self.workers
        }
    }
}

/// Why a record was not stored (and so must not be acknowledged).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum IngestError {
    #[error("storage failed: {0}")]
    Store(String),
    #[error("the pipeline is shutting down")]
    Closed,
}

type Done = oneshot::Sender<Result<(), IngestError>>;

enum Job {
    Record { record: Record, done: Option<Done> },
    Control(Control),
}

/// A message from one worker to another (state of a subject lives in one worker only).
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// The device defining a dynamic zone moved: re-evaluate `subject` against it.
    DynamicUpdate {
        subject_id: SubjectId,
        device_id: String,
        at: DateTime<Utc>,
    },
}

/// Lets a worker's processor send [`Control`] messages to the worker owning a device. Holds
/// only weak references, so it never keeps the pipeline alive at shutdown.
#[derive(Clone)]
pub struct ShardLinks {
    index: usize,
    shards: Arc<Vec<mpsc::WeakSender<Job>>>,
}

impl ShardLinks {
    /// Index of the worker owning this processor.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Number of workers.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// True when `device_id` is routed to this worker.
    pub fn is_local(&self, device_id: &str) -> bool {
        shard_of(device_id, self.shards.len()) == self.index
    }

    /// Sends `msg` to the worker owning `device_id` without waiting (two workers waiting on
    /// each other's full queues would deadlock). Returns false when the queue is full or the
    /// pipeline is shutting down; the message is then dropped (the receiver catches up at its
    /// next record or tick).
    pub fn send(&self, device_id: &str, msg: Control) -> bool {
        let idx = shard_of(device_id, self.shards.len());
        let Some(tx) = self.shards.get(idx).and_then(|w| w.upgrade()) else {
            return false;
        };
        tx.try_send(Job::Control(msg)).is_ok()
    }
}

/// Per-shard evaluation after storage. One instance per worker; it owns the state of the
/// devices and subjects routed to that worker.
#[async_trait]
pub trait ShardProcessor: Send + 'static {
    /// Called with each batch after it is durably stored and acknowledged.
    async fn after_store(&mut self, batch: &[StoredRecord]);
    /// Called every `tick_secs` with the current server time.
    async fn tick(&mut self, now: DateTime<Utc>);
    /// A message from another worker.
    async fn control(&mut self, msg: Control);
}

/// A processor that does nothing (tests of the storage path).
pub struct NoopProcessor;

#[async_trait]
impl ShardProcessor for NoopProcessor {
    async fn after_store(&mut self, _batch: &[StoredRecord]) {}
    async fn tick(&mut self, _now: DateTime<Utc>) {}
    async fn control(&mut self, _msg: Control) {}
}

/// Handle to the pipeline; cheap to clone. The workers stop (after draining their queues)
/// when every handle is dropped.
#[derive(Clone)]
pub struct Pipeline {
    shards: Arc<Vec<mpsc::Sender<Job>>>,
}

/// Worker index of a device (stable for the life of the process).
pub fn shard_of(device_id: &str, shards: usize) -> usize {
    let mut h = std::hash::DefaultHasher::new();
    device_id.hash(&mut h);
    let n = u64::try_from(shards.max(1)).unwrap_or(1);
    usize::try_from(h.finish() % n).unwrap_or(0)
}

/// Running workers; await [`Workers::join`] after dropping every [`Pipeline`] handle.
pub struct Workers {
    handles: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Waits until every worker has drained its queue and stopped.
    pub async fn join(self) {
        for h in self.handles {
            if let Err(e) = h.await {
                tracing::error!(error = %e, "pipeline worker panicked");
            }
        }
    }
}

impl Pipeline {
    /// Starts the workers. `make_processor(i)` builds the processor of worker `i`.
    pub fn start(
        cfg: &PipelineConfig,
        store: Arc<dyn Store>,
        registry: Registry,
        mut make_processor: impl FnMut(ShardLinks) -> Box<dyn ShardProcessor>,
    ) -> (Pipeline, Workers) {
        let n = cfg.worker_count();
        let mut senders = Vec::with_capacity(n);
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
            senders.push(tx);
            receivers.push(rx);
        }
        let weak: Arc<Vec<_>> = Arc::new(senders.iter().map(|s| s.downgrade()).collect());
        let mut handles = Vec::with_capacity(n);
        for (i, rx) in receivers.into_iter().enumerate() {
            let links = ShardLinks {
                index: i,
                shards: weak.clone(),
            };
            let w = Worker {
                index: i,
                rx,
                store: store.clone(),
                registry: registry.clone(),
                cfg: cfg.clone(),
                processor: make_processor(links),
            };
            handles.push(tokio::spawn(w.run()));
        }
        (
            Pipeline {
                shards: Arc::new(senders),
            },
            Workers { handles },
        )
    }

    /// Number of workers.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Queues a record and returns the receiver that completes once it is stored. Waits while
    /// the worker's queue is full (backpressure).
    pub async fn submit(
        &self,
        record: Record,
    ) -> Result<oneshot::Receiver<Result<(), IngestError>>, IngestError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(record, Some(tx)).await?;
        Ok(rx)
    }

    async fn enqueue(&self, record: Record, done: Option<Done>) -> Result<(), IngestError> {
        let idx = shard_of(&record.device_id, self.shards.len());
        let sender = self.shards.get(idx).ok_or(IngestError::Closed)?;
        sender
            .send(Job::Record { record, done })
            .await
            .map_err(|_| IngestError::Closed)
    }

    /// Stores one record; returns when it is durably stored (or failed).
    pub async fn store(&self, record: Record) -> Result<(), IngestError> {
        let rx = self.submit(record).await?;
        rx.await.unwrap_or(Err(IngestError::Closed))
    }

    /// Stores several records of one device (in order); returns when ALL are stored. The
    /// records are queued before waiting, so they can share one batch.
    pub async fn store_all(&self, records: Vec<Record>) -> Result<(), IngestError> {
        let mut pending = Vec::with_capacity(records.len());
        for r in records {
            pending.push(self.submit(r).await?);
        }
        for rx in pending {
            rx.await.unwrap_or(Err(IngestError::Closed))?;
        }
        Ok(())
    }

    /// Total records waiting in the queues.
    pub fn queued(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.max_capacity() - s.capacity())
            .sum()
    }
}

struct Worker {
    index: usize,
    rx: mpsc::Receiver<Job>,
    store: Arc<dyn Store>,
    registry: Registry,
    cfg: PipelineConfig,
    processor: Box<dyn ShardProcessor>,
}

impl Worker {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(Duration::from_secs(self.cfg.tick_secs.max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let shard = self.index.to_string();
        let max = self.cfg.batch_max_records.max(1);
        let wait = Duration::from_millis(self.cfg.batch_max_wait_ms);
        loop {
            let first = tokio::select! {
                biased;
                job = self.rx.recv() => match job {
                    Some(j) => j,
                    None => break,
                },
                _ = tick.tick() => {
                    self.processor.tick(Utc::now()).await;
                    continue;
                }
            };
            let mut batch = Vec::new();
            let mut controls = Vec::new();
            let mut take = |job: Job, batch: &mut Vec<(Record, Option<Done>)>| match job {
                Job::Record { record, done } => batch.push((record, done)),
                Job::Control(c) => controls.push(c),
            };
            take(first, &mut batch);
            while batch.len() < max {
                match self.rx.try_recv() {
                    Ok(j) => take(j, &mut batch),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() && batch.len() < max && !wait.is_zero() {
                let deadline = tokio::time::Instant::now() + wait;
                while batch.len() < max {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(j)) => take(j, &mut batch),
                        _ => break,
                    }
                }
            }
            m::queue_depth(&shard, self.rx.len());
            if !batch.is_empty() {
                self.process(batch).await;
            }
            for c in controls {
                self.processor.control(c).await;
            }
        }
        tracing::debug!(worker = self.index, "pipeline worker drained and stopped");
    }

    async fn process(&mut self, batch: Vec<(Record, Option<Done>)>) {
        let mut stored = Vec::with_capacity(batch.len());
        let mut dones = Vec::with_capacity(batch.len());
        let mut resolve_err = None;
        for (record, done) in batch {
            let subject = if resolve_err.is_none() {
                match self
                    .registry
                    .subject_for(&record.device_id, record.device_time)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        resolve_err = Some(e.to_string());
                        None
                    }
                }
            } else {
                None
            };
            stored.push(StoredRecord {
                subject_id: subject,
                record,
            });
            dones.push(done);
        }
        if let Some(e) = resolve_err {
            tracing::error!(worker = self.index, error = %e, records = stored.len(),
                "subject resolution failed; batch not stored, devices will re-send");
            m::store_error();
            for d in dones.into_iter().flatten() {
                let _ = d.send(Err(IngestError::Store(e.clone())));
            }
            return;
        }

        let started = Instant::now();
        let result =
            insert_with_retry(&self.store, self.cfg.store_attempts, self.index, &stored).await;
        m::store_batch(started.elapsed(), stored.len(), self.store.backend());
        match result {
            Ok(()) => {
                for d in dones.into_iter().flatten() {
                    let _ = d.send(Ok(()));
                }
                for r in &stored {
                    m::record_stored(r.record.protocol);
                }
                self.processor.after_store(&stored).await;
            }
            Err(e) => {
                // Isolate bad records so one cannot block the rest of the batch.
                tracing::error!(worker = self.index, error = %e, records = stored.len(),
                    "batch write failed after retries");
                m::store_error();
                if stored.len() == 1 {
                    for d in dones.into_iter().flatten() {
                        let _ = d.send(Err(IngestError::Store(e.to_string())));
                    }
                    return;
                }
                let mut ok = Vec::new();
                for (rec, done) in stored.into_iter().zip(dones) {
                    let one = std::slice::from_ref(&rec);
                    match self.store.insert_records(one).await {
                        Ok(()) => {
                            m::record_stored(rec.record.protocol);
                            if let Some(d) = done {
                                let _ = d.send(Ok(()));
                            }
                            ok.push(rec);
                        }
                        Err(e) => {
                            tracing::warn!(device = %rec.record.device_id, error = %e,
                                "record refused by the store; not acknowledged");
                            if let Some(d) = done {
                                let _ = d.send(Err(IngestError::Store(e.to_string())));
                            }
                        }
                    }
                }
                if !ok.is_empty() {
                    self.processor.after_store(&ok).await;
                }
            }
        }
    }
}

async fn insert_with_retry(
    store: &Arc<dyn Store>,
    attempts: u32,
    worker: usize,
    batch: &[StoredRecord],
) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match store.insert_records(batch).await {
            Ok(()) => return Ok(()),
            Err(e @ StoreError::Invalid(_)) => return Err(e),
            Err(e) if attempt >= attempts => return Err(e),
            Err(e) => {
                tracing::warn!(worker, attempt, error = %e, "batch write failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 4).min(Duration::from_secs(5));
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharding_is_stable_and_in_range() {
        for n in 1..16 {
            for d in ["a", "359339075000001", "x-y-z"] {
                let s = shard_of(d, n);
                assert!(s < n);
                assert_eq!(s, shard_of(d, n));
            }
        }
        assert_eq!(shard_of("anything", 0), 0);
    }

    #[test]
    fn config_validation() {
        assert!(PipelineConfig::default().validate().is_ok());
        let bad = PipelineConfig {
            queue_capacity: 0,
            ..PipelineConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("queue_capacity"));
    }
}
