//! ACK-after-store across a graceful restart, on PostgreSQL.
//!
//! GT06 tags (pipelining a window of fixes ahead of the ACKs, so some are in flight when the
//! service stops) and Teltonika trackers (packets of records, one ACK per packet) report
//! while the service is stopped through its shutdown token. Then:
//!
//! * every fix the service acknowledged is in the store — checked before anything restarts;
//! * a new service instance starts on the same schema;
//! * the devices re-send what was not acknowledged, plus their last acknowledged batch (an
//!   ACK lost on the way), and each of those is acknowledged again;
//! * the store then holds every fix ever sent exactly once: re-sends do not duplicate.
//!
//! (The kill -9 variant is `ingest/tests/crash.rs`.)

use std::collections::{BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use em_e2e::*;
use em_model::Protocol;
use em_protocols::gt06::proto;
use em_store::Store;
use tokio::io::AsyncWriteExt;

/// GT06 fixes a tag writes ahead of the acknowledgements.
const WINDOW: usize = 8;
/// Upper bound of fixes per device in the first phase.
const MAX_FIXES: u32 = 4000;
/// Records per Teltonika packet.
const BATCH: usize = 5;
const GT06_TAGS: u32 = 3;
const TELTONIKA_TAGS: u32 = 2;

/// A fix identified by its device time (unique per device in this test).
type FixTime = DateTime<Utc>;

#[derive(Debug, Default)]
struct Log {
    /// Acknowledged fixes.
    acked: Vec<FixTime>,
    /// Sent (or being sent) but never acknowledged: (GT06 serial or 0, times of the frame/packet).
    unacked: Vec<(u16, Vec<FixTime>)>,
    /// The last acknowledged frame/packet, re-sent later as if its ACK had been lost.
    last_acked: Option<(u16, Vec<FixTime>)>,
}

impl Log {
    fn all_sent(&self) -> BTreeSet<FixTime> {
        self.acked
            .iter()
            .copied()
            .chain(self.unacked.iter().flat_map(|(_, t)| t.iter().copied()))
            .collect()
    }
}

fn fix_time(base: FixTime, n: u32) -> FixTime {
    base + ChronoDuration::seconds(i64::from(n))
}

fn lat_of(n: u32) -> f64 {
    55.6 + f64::from(n % 500) * 1e-5
}

/// GT06 tag: keeps `WINDOW` fixes in flight until the server closes the connection.
async fn gt06_tag(addr: SocketAddr, imei: String, base: FixTime, stop: Arc<AtomicBool>) -> Log {
    let mut log = Log::default();
    let mut tag = Gt06Tag::login(addr, &imei).await.expect("GT06 login");
    let mut inflight: VecDeque<(u16, FixTime)> = VecDeque::new();
    let mut n: u32 = 0;
    // After a failed write the tag stops sending but still reads the ACKs already on the way.
    let mut writable = true;
    loop {
        while writable && inflight.len() < WINDOW && n < MAX_FIXES && !stop.load(Ordering::Relaxed)
        {
            n += 1;
            let serial = (n % 60_000) as u16 + 2;
            let t = fix_time(base, n);
            inflight.push_back((serial, t));
            if tag
                .stream
                .write_all(&gt06_fix(serial, t, lat_of(n), 12.5))
                .await
                .is_err()
            {
                writable = false;
            }
        }
        let Some(&(serial, t)) = inflight.front() else {
            // Nothing in flight and nothing more to send: wait for the server to close.
            if read_n(&mut tag.stream, 1, STEP).await.is_err() {
                break;
            }
            panic!("unexpected bytes from the server on an idle GT06 connection");
        };
        match read_n(&mut tag.stream, GT06_ACK_LEN, STEP).await {
            Ok(ack) => {
                assert_eq!(
                    ack,
                    gt06_ack(proto::ALARM, serial),
                    "{imei}: ACKs come in order"
                );
                inflight.pop_front();
                log.acked.push(t);
                log.last_acked = Some((serial, vec![t]));
            }
            Err(_) => break,
        }
    }
    log.unacked = inflight.into_iter().map(|(s, t)| (s, vec![t])).collect();
    log
}

/// Teltonika tracker: one packet at a time, each acknowledged with its record count.
async fn teltonika_tag(
    addr: SocketAddr,
    imei: String,
    base: FixTime,
    stop: Arc<AtomicBool>,
) -> Log {
    let mut log = Log::default();
    let mut tag = TeltonikaTag::connect(addr, &imei)
        .await
        .expect("Teltonika handshake");
    let mut n: u32 = 0;
    while n < MAX_FIXES && !stop.load(Ordering::Relaxed) {
        let times: Vec<FixTime> = (0..BATCH as u32).map(|i| fix_time(base, n + i)).collect();
        n += BATCH as u32;
        match tag.send(&teltonika_packet(&times, 55.6, 12.5)).await {
            Ok(count) => {
                assert_eq!(count as usize, BATCH, "{imei}: whole packet acknowledged");
                log.acked.extend(&times);
                log.last_acked = Some((0, times));
            }
            Err(_) => {
                log.unacked.push((0, times));
                return log;
            }
        }
    }
    // Out of fixes: hold the connection until the server closes it.
    let _ = read_n(&mut tag.stream, 1, STEP).await;
    log
}

/// Device times of the stored fixes of `device` (records with a position: a GT06 login is
/// stored too, as a record without one), and how many such rows there are.
async fn stored_times(store: &dyn Store, device: &str) -> (usize, BTreeSet<FixTime>) {
    let fixes: Vec<FixTime> = store
        .device_records(device, 100_000)
        .await
        .expect("records")
        .into_iter()
        .filter(|r| r.position.is_some())
        .map(|r| r.device_time)
        .collect();
    let rows = fixes.len();
    (rows, fixes.into_iter().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_fixes_survive_a_graceful_restart_and_resends_do_not_duplicate() {
    let Some((store, schema)) = postgres().await else {
        return;
    };
    let gt06_ids: Vec<String> = (0..GT06_TAGS)
        .map(|i| format!("3583071000{:05}", 60_000 + i))
        .collect();
    let telt_ids: Vec<String> = (0..TELTONIKA_TAGS)
        .map(|i| format!("3520940000{:05}", 60_000 + i))
        .collect();
    for id in &gt06_ids {
        register(&*store, id, Protocol::Gt06).await;
    }
    for id in &telt_ids {
        register(&*store, id, Protocol::Teltonika).await;
    }
    let base = now_s() - ChronoDuration::hours(3);

    // Phase 1: load, then a graceful stop in the middle of it.
    let svc = start(service_config(&schema)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for id in &gt06_ids {
        let (addr, id, s) = (svc.gt06(), id.clone(), stop.clone());
        tasks.push((id.clone(), tokio::spawn(gt06_tag(addr, id, base, s))));
    }
    for id in &telt_ids {
        let (addr, id, s) = (svc.teltonika(), id.clone(), stop.clone());
        tasks.push((id.clone(), tokio::spawn(teltonika_tag(addr, id, base, s))));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopping = Instant::now();
    svc.stop().await;
    let stop_took = stopping.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for (id, task) in tasks {
        let log = tokio::time::timeout(STEP, task)
            .await
            .unwrap_or_else(|_| panic!("{id}: device did not notice the shutdown"))
            .unwrap_or_else(|e| panic!("{id}: device task failed: {e}"));
        logs.push((id, log));
    }

    // Every acknowledged fix is stored, once — before anything is re-sent.
    let mut acked_total = 0;
    let mut unacked_gt06 = 0;
    let mut unacked_but_stored = 0;
    for (id, log) in &logs {
        assert!(!log.acked.is_empty(), "{id}: some fixes acknowledged");
        acked_total += log.acked.len();
        if gt06_ids.contains(id) {
            unacked_gt06 += log.unacked.len();
        }
        let (count, times) = stored_times(&*store, id).await;
        let missing: Vec<_> = log.acked.iter().filter(|t| !times.contains(t)).collect();
        assert!(
            missing.is_empty(),
            "{id}: {} acknowledged fixes are not in the store after the stop: {:?}",
            missing.len(),
            &missing[..missing.len().min(5)]
        );
        assert_eq!(count, times.len(), "{id}: no duplicate rows");
        unacked_but_stored += log
            .unacked
            .iter()
            .flat_map(|(_, t)| t.iter())
            .filter(|t| times.contains(t))
            .count();
    }
    assert!(
        unacked_gt06 > 0,
        "the GT06 tags had fixes in flight at the stop (test precondition)"
    );

    // Phase 2: a new instance on the same schema; devices re-send.
    let svc = start(service_config(&schema)).await;
    for (id, log) in &logs {
        let mut resend: Vec<(u16, Vec<FixTime>)> = log.unacked.clone();
        resend.extend(log.last_acked.clone());
        if gt06_ids.contains(id) {
            let mut tag = Gt06Tag::login(svc.gt06(), id).await.expect("GT06 login");
            for (serial, times) in &resend {
                for t in times {
                    let n = (*t - base).num_seconds() as u32;
                    tag.stream
                        .write_all(&gt06_fix(*serial, *t, lat_of(n), 12.5))
                        .await
                        .expect("re-send");
                    let ack = read_n(&mut tag.stream, GT06_ACK_LEN, STEP)
                        .await
                        .expect("re-sent fix acknowledged");
                    assert_eq!(ack, gt06_ack(proto::ALARM, *serial));
                }
            }
        } else {
            let mut tag = TeltonikaTag::connect(svc.teltonika(), id)
                .await
                .expect("Teltonika handshake");
            for (_, times) in &resend {
                let count = tag
                    .send(&teltonika_packet(times, 55.6, 12.5))
                    .await
                    .expect("re-sent packet acknowledged");
                assert_eq!(count as usize, times.len());
            }
        }
    }

    // Exactly the fixes ever sent, each once.
    let mut stored_total = 0;
    for (id, log) in &logs {
        let sent = log.all_sent();
        let (count, times) = stored_times(&*store, id).await;
        let lost: Vec<_> = sent.difference(&times).collect();
        let extra: Vec<_> = times.difference(&sent).collect();
        assert!(
            lost.is_empty() && extra.is_empty(),
            "{id}: the store must hold exactly the fixes the device sent; not stored: {lost:?}, never sent: {extra:?}"
        );
        assert_eq!(count, sent.len(), "{id}: re-sent fixes were not duplicated");
        stored_total += sent.len();
    }
    println!(
        "RESTART TEST: {acked_total} fixes acknowledged before the stop, {unacked_gt06} GT06 fixes in flight \
         ({unacked_but_stored} un-ACKed fixes of all devices already stored); graceful stop took {stop_took:?}; {stored_total} fixes stored once each after the re-sends"
    );
    svc.stop().await;
}
