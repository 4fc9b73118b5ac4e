//! The pipeline's storage contract, observed through a store wrapper over a REAL SQLite
//! store: a record's "stored" completion (what the listeners wait for before the ACK) never
//! fires before `insert_records` has returned; full queues make `submit` wait
//! (backpressure); a failing write is retried and then refused (no ACK), and a bad record
//! does not take the rest of its batch down.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use em_ingest::pipeline::{IngestError, NoopProcessor, Pipeline, PipelineConfig};
use em_ingest::registry::Registry;
use em_model::*;
use em_store::*;
use tokio::sync::Semaphore;

/// Delegates to a real store; `insert_records` first waits for a permit of `gate`, and fails
/// while `fail` is set or when a batch contains the `poison` device.
struct GatedStore {
    inner: Arc<dyn Store>,
    gate: Semaphore,
    fail: AtomicBool,
    poison: Option<String>,
    inserted_batches: AtomicUsize,
}

impl GatedStore {
    fn new(inner: Arc<dyn Store>, open: bool, poison: Option<&str>) -> Arc<Self> {
        Arc::new(GatedStore {
            inner,
            gate: Semaphore::new(if open { Semaphore::MAX_PERMITS } else { 0 }),
            fail: AtomicBool::new(false),
            poison: poison.map(str::to_owned),
            inserted_batches: AtomicUsize::new(0),
        })
    }

    async fn gate(&self, records: &[StoredRecord]) -> Result<()> {
        let permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| StoreError::Invalid("gate closed".into()))?;
        permit.forget();
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Conflict("injected write failure".into()));
        }
        if let Some(p) = &self.poison {
            if records.iter().any(|r| &r.record.device_id == p) {
                return Err(StoreError::Invalid("poison record".into()));
            }
        }
        self.inserted_batches.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl Store for GatedStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    async fn upsert_device(&self, device: &Device) -> Result<()> {
        self.inner.upsert_device(device).await
    }

    async fn get_device(&self, device_id: &str) -> Result<Option<Device>> {
        self.inner.get_device(device_id).await
    }

    async fn list_devices(&self) -> Result<Vec<Device>> {
        self.inner.list_devices().await
    }

    async fn insert_victim_records(&self, records: &[Record]) -> Result<()> {
        self.inner.insert_victim_records(records).await
    }

    async fn victim_positions(
        &self,
        device_id: &str,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<em_store::TrailPoint>> {
        self.inner
            .victim_positions(device_id, from, to, limit)
            .await
    }

    async fn count_victim_records(&self, device_id: &str) -> Result<i64> {
        self.inner.count_victim_records(device_id).await
    }

    async fn assign_device(
        &self,
        device_id: &str,
        subject_id: SubjectId,
        from: DateTime<Utc>,
    ) -> Result<()> {
        self.inner.assign_device(device_id, subject_id, from).await
    }

    async fn unassign_device(&self, device_id: &str, at: DateTime<Utc>) -> Result<()> {
        self.inner.unassign_device(device_id, at).await
    }

    async fn assignments(&self, device_id: &str) -> Result<Vec<Assignment>> {
        self.inner.assignments(device_id).await
    }

    async fn subject_for_device_at(
        &self,
        device_id: &str,
        at: DateTime<Utc>,
    ) -> Result<Option<SubjectId>> {
        self.inner.subject_for_device_at(device_id, at).await
    }

    async fn current_assignments(&self) -> Result<Vec<Assignment>> {
        self.inner.current_assignments().await
    }

    async fn upsert_subject(&self, subject: &Subject) -> Result<SubjectId> {
        self.inner.upsert_subject(subject).await
    }

    async fn get_subject(&self, id: SubjectId) -> Result<Option<Subject>> {
        self.inner.get_subject(id).await
    }

    async fn list_subjects(&self, officer: Option<UserId>) -> Result<Vec<Subject>> {
        self.inner.list_subjects(officer).await
    }

    async fn set_subject_zone_groups(&self, subject: SubjectId, groups: &[String]) -> Result<()> {
        self.inner.set_subject_zone_groups(subject, groups).await
    }

    async fn subject_zone_groups(&self, subject: SubjectId) -> Result<Vec<String>> {
        self.inner.subject_zone_groups(subject).await
    }

    async fn upsert_zone(&self, zone: &ZoneSpec) -> Result<ZoneId> {
        self.inner.upsert_zone(zone).await
    }

    async fn delete_zone(&self, id: ZoneId) -> Result<()> {
        self.inner.delete_zone(id).await
    }

    async fn get_zone(&self, id: ZoneId) -> Result<Option<ZoneSpec>> {
        self.inner.get_zone(id).await
    }

    async fn list_zones(&self, subject: Option<SubjectId>) -> Result<Vec<ZoneSpec>> {
        self.inner.list_zones(subject).await
    }

    async fn insert_records(&self, records: &[StoredRecord]) -> Result<()> {
        self.gate(records).await?;
        self.inner.insert_records(records).await
    }

    async fn trail(
        &self,
        subject: SubjectId,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<TrailPoint>> {
        self.inner.trail(subject, from, to, limit).await
    }

    async fn latest_states(&self, subjects: Option<&[SubjectId]>) -> Result<Vec<LatestState>> {
        self.inner.latest_states(subjects).await
    }

    async fn count_records(&self, device_id: &str) -> Result<i64> {
        self.inner.count_records(device_id).await
    }

    async fn device_records(&self, device_id: &str, limit: i64) -> Result<Vec<Record>> {
        self.inner.device_records(device_id, limit).await
    }

    async fn write_alert(
        &self,
        write: &AlertWrite,
        effects: AlertEffectsFn<'_>,
    ) -> Result<VersionedAlert> {
        self.inner.write_alert(write, effects).await
    }

    async fn get_alert(&self, id: AlertId) -> Result<Option<VersionedAlert>> {
        self.inner.get_alert(id).await
    }

    async fn list_alerts(&self, filter: &AlertFilter) -> Result<Vec<Alert>> {
        self.inner.list_alerts(filter).await
    }

    async fn ongoing_alert(
        &self,
        subject: SubjectId,
        kind: AlertKind,
        zone: Option<ZoneId>,
    ) -> Result<Option<VersionedAlert>> {
        self.inner.ongoing_alert(subject, kind, zone).await
    }

    async fn changes_after(&self, after: ChangeId, limit: i64) -> Result<Vec<ChangeEntry>> {
        self.inner.changes_after(after, limit).await
    }

    async fn last_change_id(&self) -> Result<ChangeId> {
        self.inner.last_change_id().await
    }

    fn change_wakeups(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.change_wakeups()
    }

    fn change_poll_interval(&self) -> std::time::Duration {
        self.inner.change_poll_interval()
    }

    async fn read_cursor(&self, consumer: &str) -> Result<Option<ChangeId>> {
        self.inner.read_cursor(consumer).await
    }

    async fn write_cursor(&self, consumer: &str, id: ChangeId) -> Result<()> {
        self.inner.write_cursor(consumer, id).await
    }

    async fn acquire_lease(&self, name: &str, holder: &str) -> Result<Option<Lease>> {
        self.inner.acquire_lease(name, holder).await
    }

    async fn create_session(&self, session: &NewSession) -> Result<()> {
        self.inner.create_session(session).await
    }

    async fn touch_session(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> Result<Option<UserId>> {
        self.inner.touch_session(token_hash, now, expires_at).await
    }

    async fn session_live(&self, token_hash: &str, now: DateTime<Utc>) -> Result<bool> {
        self.inner.session_live(token_hash, now).await
    }

    async fn delete_session(&self, token_hash: &str) -> Result<()> {
        self.inner.delete_session(token_hash).await
    }

    async fn delete_user_sessions(&self, user_id: UserId, keep: Option<&str>) -> Result<u64> {
        self.inner.delete_user_sessions(user_id, keep).await
    }

    async fn purge_sessions(&self, now: DateTime<Utc>) -> Result<u64> {
        self.inner.purge_sessions(now).await
    }

    async fn unacknowledged_alerts(&self, before: DateTime<Utc>) -> Result<Vec<Alert>> {
        self.inner.unacknowledged_alerts(before).await
    }

    async fn due_outbox(
        &self,
        channel: &str,
        now: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>> {
        self.inner.due_outbox(channel, now, limit).await
    }

    async fn mark_outbox_delivered(&self, id: i64, at: DateTime<Utc>) -> Result<()> {
        self.inner.mark_outbox_delivered(id, at).await
    }

    async fn mark_outbox_failed(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: DateTime<Utc>,
        dead: bool,
    ) -> Result<()> {
        self.inner
            .mark_outbox_failed(id, error, next_attempt_at, dead)
            .await
    }

    async fn outbox_status(&self, id: i64) -> Result<Option<OutboxStatus>> {
        self.inner.outbox_status(id).await
    }

    async fn count_outbox(&self, channel: &str, status: OutboxStatus) -> Result<i64> {
        self.inner.count_outbox(channel, status).await
    }

    async fn upsert_user(&self, user: &User) -> Result<UserId> {
        self.inner.upsert_user(user).await
    }

    async fn get_user(&self, id: UserId) -> Result<Option<User>> {
        self.inner.get_user(id).await
    }

    async fn get_user_by_name(&self, username: &str) -> Result<Option<User>> {
        self.inner.get_user_by_name(username).await
    }

    async fn list_users(&self) -> Result<Vec<User>> {
        self.inner.list_users().await
    }

    async fn append_audit(&self, entry: &NewAudit) -> Result<i64> {
        self.inner.append_audit(entry).await
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
        self.inner.list_audit(filter).await
    }

    async fn apply_retention(
        &self,
        positions_before: DateTime<Utc>,
        alerts_before: Option<DateTime<Utc>>,
        audit_before: Option<DateTime<Utc>>,
    ) -> Result<RetentionReport> {
        self.inner
            .apply_retention(positions_before, alerts_before, audit_before)
            .await
    }
}

fn rec(device: &str, secs: i64) -> Record {
    let t = DateTime::<Utc>::from_timestamp(1_700_000_000 + secs, 0).expect("time");
    let mut r = Record::new(device, Protocol::Gt06, t);
    r.seq = Some(secs as u64);
    r
}

async fn pipeline(
    store: Arc<GatedStore>,
    cfg: PipelineConfig,
) -> (Pipeline, em_ingest::pipeline::Workers) {
    let dyn_store: Arc<dyn Store> = store;
    let registry = Registry::load(dyn_store.clone()).await.expect("registry");
    Pipeline::start(&cfg, dyn_store, registry, |_| Box::new(NoopProcessor))
}

fn one_worker() -> PipelineConfig {
    PipelineConfig {
        workers: 1,
        batch_max_wait_ms: 0,
        store_attempts: 2,
        ..PipelineConfig::default()
    }
}

#[tokio::test]
async fn stored_completion_waits_for_the_write() {
    let real = em_store::testing::sqlite_store().await;
    let store = GatedStore::new(real.clone(), false, None);
    let (p, workers) = pipeline(store.clone(), one_worker()).await;
    let mut rx = p.submit(rec("d1", 1)).await.expect("queued");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        rx.try_recv().is_err(),
        "no completion while the write is blocked"
    );
    assert_eq!(real.count_records("d1").await.unwrap(), 0);
    store.gate.add_permits(1);
    let res = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("completes");
    assert_eq!(res.expect("sender kept"), Ok(()));
    assert_eq!(real.count_records("d1").await.unwrap(), 1);
    drop(p);
    workers.join().await;
}

#[tokio::test]
async fn full_queue_makes_submit_wait() {
    let real = em_store::testing::sqlite_store().await;
    let store = GatedStore::new(real.clone(), false, None);
    let cfg = PipelineConfig {
        queue_capacity: 2,
        batch_max_records: 1,
        ..one_worker()
    };
    let (p, workers) = pipeline(store.clone(), cfg).await;
    let mut pending = vec![p.submit(rec("d2", 1)).await.unwrap()];
    // Let the worker take the first record and block in the write.
    tokio::time::sleep(Duration::from_millis(100)).await;
    pending.push(p.submit(rec("d2", 2)).await.unwrap());
    pending.push(p.submit(rec("d2", 3)).await.unwrap());
    assert_eq!(p.queued(), 2);
    let blocked = tokio::time::timeout(Duration::from_millis(300), p.submit(rec("d2", 4))).await;
    assert!(blocked.is_err(), "submit must wait while the queue is full");
    store.gate.add_permits(100);
    pending.push(
        tokio::time::timeout(Duration::from_secs(5), p.submit(rec("d2", 4)))
            .await
            .expect("room again")
            .unwrap(),
    );
    for rx in pending {
        assert_eq!(rx.await.unwrap(), Ok(()));
    }
    assert_eq!(real.count_records("d2").await.unwrap(), 4);
    drop(p);
    workers.join().await;
}

#[tokio::test]
async fn failed_writes_are_refused_not_acknowledged() {
    let real = em_store::testing::sqlite_store().await;
    let store = GatedStore::new(real.clone(), true, None);
    store.fail.store(true, Ordering::SeqCst);
    let (p, workers) = pipeline(store.clone(), one_worker()).await;
    let res = p.store(rec("d3", 1)).await;
    assert!(matches!(res, Err(IngestError::Store(_))), "{res:?}");
    assert_eq!(real.count_records("d3").await.unwrap(), 0);
    // The database recovers: the device's re-send is stored.
    store.fail.store(false, Ordering::SeqCst);
    assert_eq!(p.store(rec("d3", 1)).await, Ok(()));
    assert_eq!(real.count_records("d3").await.unwrap(), 1);
    drop(p);
    workers.join().await;
}

#[tokio::test]
async fn a_bad_record_does_not_sink_its_batch() {
    let real = em_store::testing::sqlite_store().await;
    let store = GatedStore::new(real.clone(), false, Some("bad"));
    let (p, workers) = pipeline(store.clone(), one_worker()).await;
    // Queue three records while the writer is blocked so they form one batch.
    let blocker = p.submit(rec("first", 0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let good1 = p.submit(rec("good1", 1)).await.unwrap();
    let bad = p.submit(rec("bad", 2)).await.unwrap();
    let good2 = p.submit(rec("good2", 3)).await.unwrap();
    store.gate.add_permits(100);
    assert_eq!(blocker.await.unwrap(), Ok(()));
    assert_eq!(good1.await.unwrap(), Ok(()));
    assert!(matches!(bad.await.unwrap(), Err(IngestError::Store(_))));
    assert_eq!(good2.await.unwrap(), Ok(()));
    assert_eq!(real.count_records("good1").await.unwrap(), 1);
    assert_eq!(real.count_records("good2").await.unwrap(), 1);
    assert_eq!(real.count_records("bad").await.unwrap(), 0);
    drop(p);
    workers.join().await;
}

#[tokio::test]
async fn records_of_many_devices_share_one_write() {
    let real = em_store::testing::sqlite_store().await;
    let store = GatedStore::new(real.clone(), false, None);
    let (p, workers) = pipeline(store.clone(), one_worker()).await;
    let mut rxs = Vec::new();
    for i in 0..50 {
        rxs.push(p.submit(rec(&format!("dev{i}"), i)).await.unwrap());
    }
    store.gate.add_permits(100);
    for rx in rxs {
        assert_eq!(rx.await.unwrap(), Ok(()));
    }
    // The first record may have been taken alone before the rest were queued.
    assert!(store.inserted_batches.load(Ordering::SeqCst) <= 2);
    drop(p);
    workers.join().await;
}

#[tokio::test]
async fn a_frame_completes_once_all_its_records_are_stored() {
    let real = em_store::testing::sqlite_store().await;
    let store = GatedStore::new(real.clone(), false, None);
    let (p, workers) = pipeline(store.clone(), one_worker()).await;
    let frame: Vec<Record> = (0..20).map(|i| rec("multi", i)).collect();
    let mut rx = p.submit_frame(frame).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(rx.try_recv().is_err(), "no completion before the write");
    store.gate.add_permits(1);
    let res = tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .unwrap();
    assert_eq!(res.unwrap(), Ok(()));
    assert_eq!(real.count_records("multi").await.unwrap(), 20);
    assert_eq!(
        store.inserted_batches.load(Ordering::SeqCst),
        1,
        "one frame, one write"
    );
    // An empty frame (a heartbeat with nothing to store) completes at once.
    let empty = p.submit_frame(Vec::new()).await.unwrap();
    assert_eq!(empty.await.unwrap(), Ok(()));
    drop(p);
    workers.join().await;
}

#[tokio::test]
async fn queue_capacity_counts_records_not_frames() {
    let real = em_store::testing::sqlite_store().await;
    let store = GatedStore::new(real.clone(), false, None);
    let cfg = PipelineConfig {
        queue_capacity: 10,
        batch_max_records: 1,
        ..one_worker()
    };
    let (p, workers) = pipeline(store.clone(), cfg).await;
    // The worker takes the first frame and blocks in its write.
    let first = p.submit(rec("cap", 0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let eight = p
        .submit_frame((1..9).map(|i| rec("cap", i)).collect())
        .await
        .unwrap();
    assert_eq!(p.queued(), 8);
    // 8 of 10 slots taken: a 3-record frame must wait, a 2-record one fits.
    let three = (9..12).map(|i| rec("cap", i)).collect::<Vec<_>>();
    let blocked = tokio::time::timeout(Duration::from_millis(300), p.submit_frame(three)).await;
    assert!(blocked.is_err(), "a frame larger than the free room waits");
    let two = p
        .submit_frame((12..14).map(|i| rec("cap", i)).collect())
        .await
        .unwrap();
    assert_eq!(p.queued(), 10);
    // A frame larger than the whole queue is admitted alone once the queue is empty.
    store.gate.add_permits(1000);
    let huge = tokio::time::timeout(
        Duration::from_secs(5),
        p.submit_frame((100..130).map(|i| rec("cap", i)).collect()),
    )
    .await
    .expect("admitted when the queue drains")
    .unwrap();
    for rx in [first, eight, two, huge] {
        assert_eq!(rx.await.unwrap(), Ok(()));
    }
    assert_eq!(real.count_records("cap").await.unwrap(), 1 + 8 + 2 + 30);
    drop(p);
    workers.join().await;
}

#[tokio::test]
async fn a_frame_of_several_devices_completes_when_every_part_is_stored() {
    let real = em_store::testing::sqlite_store().await;
    let store = GatedStore::new(real.clone(), true, Some("mixed-bad"));
    let cfg = PipelineConfig {
        workers: 4,
        ..one_worker()
    };
    let (p, workers) = pipeline(store.clone(), cfg).await;
    let ok: Vec<Record> = (0..8)
        .map(|i| rec(&format!("mixed-{}", i % 4), i))
        .collect();
    assert_eq!(p.store_all(ok).await, Ok(()));
    for d in 0..4 {
        assert_eq!(real.count_records(&format!("mixed-{d}")).await.unwrap(), 2);
    }
    // One part refused: the whole frame is refused (no ACK), the other parts may be stored.
    let bad = vec![rec("mixed-9", 1), rec("mixed-bad", 2)];
    assert!(matches!(p.store_all(bad).await, Err(IngestError::Store(_))));
    drop(p);
    workers.join().await;
}
