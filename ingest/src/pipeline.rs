//! The sharded ingest pipeline.
//!
//! Every frame's records are routed by a hash of the device id to one of a fixed set of
//! workers, over a queue BOUNDED in records: when a worker falls behind,
//! [`Pipeline::submit_frame`] waits, which stops the connection task reading from its socket
//! (backpressure reaches the device; memory stays bounded). Because one device always lands on
//! the same worker, its records are handled in order and its per-device / per-subject state
//! lives in exactly one place.
//!
//! A frame (a Teltonika AVL packet of up to 255 records, an EM batch, one GT06 location) is one
//! queue entry with one completion: a device's packet costs one channel send and one oneshot,
//! not one per record. A worker takes what is queued (up to `batch_max_records`, waiting at
//! most `batch_max_wait_ms` for more), resolves each record's subject through the assignment
//! history, writes the whole batch with ONE `Store::insert_records` call and only then
//! completes each frame's oneshot — the connection task waits for that before it writes the
//! protocol ACK, so a device is never acknowledged for data that is not durably stored. After the ACKs, the
//! worker's [`ShardProcessor`] evaluates the stored records (geofences, device health, alerts);
//! a periodic tick drives the time-based rules.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use em_model::{DeviceClass, Record, SubjectId, TimePolicy, TimeStatus};
use em_store::{Store, StoreError, StoredRecord};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::metrics as m;
use crate::registry::Registry;

/// `[pipeline]` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Number of workers (shards). 0 = two per CPU core, at least four: a worker spends most
    /// of a batch waiting for the database's commit, so more workers than cores overlap those
    /// waits (and a slow commit stalls a smaller share of the devices).
    pub workers: usize,
    /// Capacity of each worker's queue, in records (a frame larger than this is admitted
    /// alone). A full queue makes connections wait.
    pub queue_capacity: usize,
    /// Maximum records per `insert_records` call.
    pub batch_max_records: usize,
    /// How long a worker waits for more records before writing a non-full batch.
    pub batch_max_wait_ms: u64,
    /// Period of the time-based rules (lost communication, no-fix timers, curfew windows).
    pub tick_secs: u64,
    /// Attempts of a failing batch write before the records are refused (not ACKed).
    pub store_attempts: u32,
    /// Tasks handling alert signals off the workers (ordered per subject; each signal is a
    /// database transaction, so a few lanes keep the database busy while workers go on).
    pub alert_lanes: usize,
    /// Device-time policy ([`TimePolicy`]): a record dated more than this many seconds after
    /// its receive time is stored flagged `future` and moves no state.
    pub max_future_secs: i64,
    /// ... and one dated more than this many seconds before it is stored flagged `far_past`.
    pub max_past_secs: i64,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            workers: 0,
            queue_capacity: 1024,
            batch_max_records: 500,
            batch_max_wait_ms: 2,
            tick_secs: 10,
            store_attempts: 4,
            alert_lanes: 4,
            max_future_secs: TimePolicy::DEFAULT.max_future_secs,
            max_past_secs: TimePolicy::DEFAULT.max_past_secs,
        }
    }
}

impl PipelineConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.workers > 1024 {
            return Err("pipeline.workers must be at most 1024 (0 = automatic)".into());
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
        if self.alert_lanes == 0 || self.alert_lanes > 256 {
            return Err("pipeline.alert_lanes must be between 1 and 256".into());
        }
        if self.store_attempts == 0 {
            return Err("pipeline.store_attempts must be > 0".into());
        }
        if !(0..=86_400).contains(&self.max_future_secs) {
            return Err("pipeline.max_future_secs must be between 0 and 86400".into());
        }
        if !(60..=366 * 86_400).contains(&self.max_past_secs) {
            return Err("pipeline.max_past_secs must be between 60 and 31622400".into());
        }
        Ok(())
    }

    /// The device-time policy every record is classified with before it is stored.
    pub fn time_policy(&self) -> TimePolicy {
        TimePolicy {
            max_future_secs: self.max_future_secs,
            max_past_secs: self.max_past_secs,
        }
    }

    /// Effective number of workers.
    pub fn worker_count(&self) -> usize {
        if self.workers == 0 {
            let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
            (2 * cores).max(4)
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

/// Completes once every record of a submitted frame is durably stored (or was refused).
pub type Stored = oneshot::Receiver<Result<(), IngestError>>;

enum Job {
    /// Records of one device, in order, with the queue permits they hold.
    Records {
        records: Vec<Record>,
        done: Option<Done>,
        permits: u32,
    },
    Control(Control),
}

/// One worker's queue: an unbounded channel whose length is bounded by a semaphore counted in
/// records (a bounded channel would count frames, and a 255-record packet is not one fix).
struct Queue {
    tx: mpsc::UnboundedSender<Job>,
    room: Arc<Semaphore>,
    capacity: u32,
}

/// What a [`ShardLinks`] keeps of a queue: nothing that keeps the worker alive.
struct WeakQueue {
    tx: mpsc::WeakUnboundedSender<Job>,
    room: Arc<Semaphore>,
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
    shards: Arc<Vec<WeakQueue>>,
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
        let Some(q) = self.shards.get(idx) else {
            return false;
        };
        let Some(tx) = q.tx.upgrade() else {
            return false;
        };
        // A control message takes one slot of the record queue, so it is bounded like records.
        match q.room.try_acquire() {
            Ok(permit) => {
                permit.forget();
                tx.send(Job::Control(msg)).is_ok()
            }
            Err(_) => false,
        }
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
    shards: Arc<Vec<Queue>>,
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
        let capacity =
            u32::try_from(cfg.queue_capacity.clamp(1, Semaphore::MAX_PERMITS)).unwrap_or(u32::MAX);
        for _ in 0..n {
            let (tx, rx) = mpsc::unbounded_channel();
            let room = Arc::new(Semaphore::new(capacity as usize));
            senders.push(Queue {
                tx,
                room: room.clone(),
                capacity,
            });
            receivers.push((rx, room));
        }
        let weak: Arc<Vec<_>> = Arc::new(
            senders
                .iter()
                .map(|q| WeakQueue {
                    tx: q.tx.downgrade(),
                    room: q.room.clone(),
                })
                .collect(),
        );
        let mut handles = Vec::with_capacity(n);
        for (i, (rx, room)) in receivers.into_iter().enumerate() {
            let links = ShardLinks {
                index: i,
                shards: weak.clone(),
            };
            let w = Worker {
                index: i,
                rx,
                room,
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
    pub async fn submit(&self, record: Record) -> Result<Stored, IngestError> {
        self.submit_frame(vec![record]).await
    }

    /// Queues the records of one frame (one device, in order) and returns ONE receiver that
    /// completes when all of them are stored, or with the first error. Waits while the
    /// worker's queue is full (backpressure). An empty frame completes at once.
    ///
    /// Records of several devices (not produced by any codec) are split per worker and
    /// joined by a small task, so the contract holds for any input.
    pub async fn submit_frame(&self, records: Vec<Record>) -> Result<Stored, IngestError> {
        let (tx, rx) = oneshot::channel();
        let Some(first) = records.first() else {
            let _ = tx.send(Ok(()));
            return Ok(rx);
        };
        let n = self.shards.len();
        let idx = shard_of(&first.device_id, n);
        if records.iter().all(|r| r.device_id == first.device_id) {
            self.enqueue(idx, records, Some(tx)).await?;
            return Ok(rx);
        }
        let mut groups: Vec<(usize, Vec<Record>)> = Vec::new();
        for r in records {
            let i = shard_of(&r.device_id, n);
            match groups.iter_mut().find(|(g, _)| *g == i) {
                Some((_, v)) => v.push(r),
                None => groups.push((i, vec![r])),
            }
        }
        let mut parts = Vec::with_capacity(groups.len());
        for (i, recs) in groups {
            let (ptx, prx) = oneshot::channel();
            self.enqueue(i, recs, Some(ptx)).await?;
            parts.push(prx);
        }
        tokio::spawn(async move {
            let mut res = Ok(());
            for p in parts {
                if let Err(e) = p.await.unwrap_or(Err(IngestError::Closed)) {
                    res = Err(e);
                    break;
                }
            }
            let _ = tx.send(res);
        });
        Ok(rx)
    }

    async fn enqueue(
        &self,
        idx: usize,
        records: Vec<Record>,
        done: Option<Done>,
    ) -> Result<(), IngestError> {
        let q = self.shards.get(idx).ok_or(IngestError::Closed)?;
        // A frame larger than the whole queue waits for an empty queue, then goes in alone.
        let permits = u32::try_from(records.len())
            .unwrap_or(u32::MAX)
            .clamp(1, q.capacity);
        q.room
            .acquire_many(permits)
            .await
            .map_err(|_| IngestError::Closed)?
            .forget();
        q.tx.send(Job::Records {
            records,
            done,
            permits,
        })
        .map_err(|e| {
            q.room.add_permits(permits as usize);
            drop(e);
            IngestError::Closed
        })
    }

    /// Stores one record; returns when it is durably stored (or failed).
    pub async fn store(&self, record: Record) -> Result<(), IngestError> {
        self.store_all(vec![record]).await
    }

    /// Stores several records of one device (in order); returns when ALL are stored. They are
    /// queued as one frame, so they share one batch.
    pub async fn store_all(&self, records: Vec<Record>) -> Result<(), IngestError> {
        let rx = self.submit_frame(records).await?;
        rx.await.unwrap_or(Err(IngestError::Closed))
    }

    /// Total records waiting in the queues.
    pub fn queued(&self) -> usize {
        self.shards
            .iter()
            .map(|q| (q.capacity as usize).saturating_sub(q.room.available_permits()))
            .sum()
    }
}

struct Worker {
    index: usize,
    rx: mpsc::UnboundedReceiver<Job>,
    /// Queue permits; returned as jobs are taken off the queue.
    room: Arc<Semaphore>,
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
                    let started = Instant::now();
                    self.processor.tick(Utc::now()).await;
                    m::worker_phase("tick", started.elapsed());
                    continue;
                }
            };
            let mut batch = Batch::default();
            let room = &self.room;
            let take = |job: Job, batch: &mut Batch| match job {
                Job::Records {
                    records,
                    done,
                    permits,
                } => {
                    room.add_permits(permits as usize);
                    batch.records.extend(records);
                    batch.frames.push((batch.records.len(), done));
                }
                Job::Control(c) => {
                    room.add_permits(1);
                    batch.controls.push(c);
                }
            };
            take(first, &mut batch);
            while batch.records.len() < max {
                match self.rx.try_recv() {
                    Ok(j) => take(j, &mut batch),
                    Err(_) => break,
                }
            }
            if !batch.records.is_empty() && batch.records.len() < max && !wait.is_zero() {
                let deadline = tokio::time::Instant::now() + wait;
                while batch.records.len() < max {
                    match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                        Ok(Some(j)) => take(j, &mut batch),
                        _ => break,
                    }
                }
            }
            m::queue_depth(&shard, self.rx.len());
            let controls = std::mem::take(&mut batch.controls);
            if !batch.frames.is_empty() {
                self.process(batch).await;
            }
            for c in controls {
                self.processor.control(c).await;
            }
        }
        tracing::debug!(worker = self.index, "pipeline worker drained and stopped");
    }

    async fn process(&mut self, batch: Batch) {
        let Batch {
            records, frames, ..
        } = batch;
        let mut stored = Vec::with_capacity(records.len());
        let mut resolve_err = None;
        let policy = self.cfg.time_policy();
        let mut victims = VictimRecords::default();
        for mut record in records {
            // One time policy for every path: classified here, before the store, so the flag
            // is stored with the record and every consumer (latest state, monitors, dynamic
            // zones, device health, alert times) sees the same verdict.
            record.time_status = policy.classify(record.device_time, record.received_time);
            let trusted = record.time_status == TimeStatus::Trusted;
            if !trusted {
                m::untrusted_time(record.protocol.as_str(), record.time_status.as_str());
            }
            if resolve_err.is_none() {
                if let Err(e) = victims.note(&self.registry, &record, stored.len()).await {
                    resolve_err = Some(e.to_string());
                }
            }
            // Who wore the tag: at the device time when it can be trusted, else at the time
            // the server received the record.
            let at = if trusted {
                record.device_time
            } else {
                record.received_time
            };
            let subject = if resolve_err.is_none() && !victims.is_last() {
                match self.registry.subject_for(&record.device_id, at).await {
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
        }
        if let Some(e) = resolve_err {
            tracing::error!(worker = self.index, error = %e, records = stored.len(),
                "subject resolution failed; batch not stored, devices will re-send");
            m::store_error();
            for (_, d) in frames {
                if let Some(d) = d {
                    let _ = d.send(Err(IngestError::Store(e.clone())));
                }
            }
            return;
        }

        let started = Instant::now();
        let result = insert_with_retry(
            &self.store,
            self.cfg.store_attempts,
            self.index,
            &stored,
            &victims,
        )
        .await;
        m::store_batch(started.elapsed(), stored.len(), self.store.backend());
        match result {
            Ok(()) => {
                for (_, d) in frames {
                    if let Some(d) = d {
                        let _ = d.send(Ok(()));
                    }
                }
                count_stored(&stored);
                let started = Instant::now();
                self.processor.after_store(&stored).await;
                m::worker_phase("evaluate", started.elapsed());
            }
            Err(e) => {
                // Isolate bad frames so one cannot block the rest of the batch: each frame (one
                // device's packet) is written on its own and acknowledged or refused as a whole.
                tracing::error!(worker = self.index, error = %e, records = stored.len(),
                    "batch write failed after retries");
                m::store_error();
                if frames.len() == 1 {
                    for (_, d) in frames {
                        if let Some(d) = d {
                            let _ = d.send(Err(IngestError::Store(e.to_string())));
                        }
                    }
                    return;
                }
                let mut ok = Vec::new();
                let mut start = 0;
                for (end, done) in frames {
                    let part = stored.get(start..end).unwrap_or_default();
                    let part_victims = victims.slice(start, end);
                    start = end;
                    match write_batch(&self.store, part, &part_victims).await {
                        Ok(()) => {
                            count_stored(part);
                            if let Some(d) = done {
                                let _ = d.send(Ok(()));
                            }
                            ok.extend_from_slice(part);
                        }
                        Err(e) => {
                            let device = part.first().map(|r| r.record.device_id.as_str());
                            tracing::warn!(device, records = part.len(), error = %e,
                                "frame refused by the store; not acknowledged");
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

/// Counts stored records per protocol: one metrics update per protocol and batch (a labelled
/// counter costs a registry look-up per call).
fn count_stored(records: &[StoredRecord]) {
    let mut counts: Vec<(em_model::Protocol, u64)> = Vec::new();
    for r in records {
        match counts.iter_mut().find(|(p, _)| *p == r.record.protocol) {
            Some((_, n)) => *n += 1,
            None => counts.push((r.record.protocol, 1)),
        }
    }
    for (p, n) in counts {
        m::records_stored(p, n);
    }
}

/// Records taken off a worker's queue for one write.
#[derive(Default)]
struct Batch {
    records: Vec<Record>,
    /// Per frame: end index (exclusive) of its records in `records`, and its completion.
    frames: Vec<(usize, Option<Done>)>,
    controls: Vec<Control>,
}

/// Which records of a batch come from victim devices ([`DeviceClass::Victim`]): those are
/// victim data, written to the victim store and never to positions / latest state. Empty (no
/// allocation, one registry look-up per run of one device) in the usual batch without victims.
#[derive(Default)]
struct VictimRecords {
    /// Indexes (in the batch) of victim records, ascending.
    at: Vec<usize>,
    /// The device of the previous record and whether it is a victim device.
    last: Option<(String, bool)>,
}

impl VictimRecords {
    /// Classifies `record` (index `i` of the batch) by its device's class.
    async fn note(
        &mut self,
        registry: &Registry,
        record: &Record,
        i: usize,
    ) -> Result<(), StoreError> {
        let victim = match &self.last {
            Some((d, v)) if *d == record.device_id => *v,
            _ => {
                let v = registry
                    .device(&record.device_id)
                    .await?
                    .is_some_and(|d| d.class == DeviceClass::Victim);
                self.last = Some((record.device_id.clone(), v));
                v
            }
        };
        if victim {
            self.at.push(i);
        }
        Ok(())
    }

    /// Whether the record noted last is a victim record.
    fn is_last(&self) -> bool {
        self.last.as_ref().is_some_and(|(_, v)| *v)
    }

    /// The victim records of `start..end`, re-based on `start`.
    fn slice(&self, start: usize, end: usize) -> VictimRecords {
        VictimRecords {
            at: self
                .at
                .iter()
                .filter(|i| (start..end).contains(*i))
                .map(|i| i - start)
                .collect(),
            last: None,
        }
    }
}

/// Writes a batch: victim records to the victim store, the rest to positions. Both writes
/// return before the batch counts as stored (and is acknowledged).
async fn write_batch(
    store: &Arc<dyn Store>,
    batch: &[StoredRecord],
    victims: &VictimRecords,
) -> Result<(), StoreError> {
    if victims.at.is_empty() {
        return store.insert_records(batch).await;
    }
    let mut offender = Vec::with_capacity(batch.len().saturating_sub(victims.at.len()));
    let mut victim = Vec::with_capacity(victims.at.len());
    let mut next = victims.at.iter().peekable();
    for (i, r) in batch.iter().enumerate() {
        if next.peek() == Some(&&i) {
            next.next();
            victim.push(r.record.clone());
        } else {
            offender.push(r.clone());
        }
    }
    store.insert_victim_records(&victim).await?;
    store.insert_records(&offender).await
}

async fn insert_with_retry(
    store: &Arc<dyn Store>,
    attempts: u32,
    worker: usize,
    batch: &[StoredRecord],
    victims: &VictimRecords,
) -> Result<(), StoreError> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match write_batch(store, batch, victims).await {
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
