//! Simulator runs against tiny in-test servers speaking the real codecs.

use super::*;
use em_protocols::gt06::{Gt06Codec, Gt06Message};
use em_protocols::teltonika::{imei_response, TeltonikaCodec, TeltonikaFrame};
use futures::StreamExt;
use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

#[derive(Default)]
struct ServerCounts {
    logins: AtomicU64,
    locations: AtomicU64,
    heartbeats: AtomicU64,
    alarms: AtomicU64,
    avl_records: AtomicU64,
    avl_packets: AtomicU64,
    /// Packets without a high-priority record, and their records.
    plain_packets: AtomicU64,
    plain_records: AtomicU64,
    urgent_records: AtomicU64,
    /// High-priority (alerting) records that were not the last of their packet.
    urgent_not_last: AtomicU64,
    /// Largest age (receive time − record time, ms) of a high-priority record.
    urgent_max_age_ms: AtomicU64,
    peers: Mutex<HashSet<IpAddr>>,
}

/// A GT06 server that acknowledges what the protocol says it must (login, heartbeat, alarm).
async fn gt06_server() -> (SocketAddr, Arc<ServerCounts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(ServerCounts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, peer)) = listener.accept().await {
            c.peers.lock().unwrap().insert(peer.ip());
            let c = c.clone();
            tokio::spawn(async move {
                let mut framed = Framed::new(stream, Gt06Codec::new());
                while let Some(Ok(item)) = framed.next().await {
                    let Ok(frame) = item else { continue };
                    match &frame.message {
                        Gt06Message::Login { .. } => c.logins.fetch_add(1, Ordering::Relaxed),
                        Gt06Message::Location { .. } => c.locations.fetch_add(1, Ordering::Relaxed),
                        Gt06Message::Status(_) => c.heartbeats.fetch_add(1, Ordering::Relaxed),
                        Gt06Message::Alarm { .. } => c.alarms.fetch_add(1, Ordering::Relaxed),
                        _ => 0,
                    };
                    if let Some(resp) = frame.response() {
                        if framed.get_mut().write_all(&resp).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    (addr, counts)
}

/// A Teltonika server: accepts every IMEI, acknowledges AVL packets with their record count.
async fn teltonika_server() -> (SocketAddr, Arc<ServerCounts>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(ServerCounts::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let c = c.clone();
            tokio::spawn(async move {
                let mut framed = Framed::new(stream, TeltonikaCodec::new());
                while let Some(Ok(item)) = framed.next().await {
                    let Ok(frame) = item else { continue };
                    let resp = match &frame {
                        TeltonikaFrame::Imei(_) => {
                            c.logins.fetch_add(1, Ordering::Relaxed);
                            Some(imei_response(true))
                        }
                        TeltonikaFrame::Avl(p) => {
                            c.avl_records
                                .fetch_add(p.records.len() as u64, Ordering::Relaxed);
                            c.avl_packets.fetch_add(1, Ordering::Relaxed);
                            let now = chrono::Utc::now();
                            let last = p.records.len().saturating_sub(1);
                            if p.records.iter().all(|r| r.priority == 0) {
                                c.plain_packets.fetch_add(1, Ordering::Relaxed);
                                c.plain_records
                                    .fetch_add(p.records.len() as u64, Ordering::Relaxed);
                            }
                            for (i, r) in p.records.iter().enumerate() {
                                if r.priority > 0 {
                                    c.urgent_records.fetch_add(1, Ordering::Relaxed);
                                    if i != last {
                                        c.urgent_not_last.fetch_add(1, Ordering::Relaxed);
                                    }
                                    let age = (now - r.timestamp).num_milliseconds().max(0);
                                    c.urgent_max_age_ms.fetch_max(age as u64, Ordering::Relaxed);
                                }
                            }
                            frame.response()
                        }
                        _ => frame.response(),
                    };
                    if let Some(resp) = resp {
                        if framed.get_mut().write_all(&resp).await.is_err() {
                            break;
                        }
                    }
                }
            });
        }
    });
    (addr, counts)
}

fn fleet(n: usize, mix: &str, shares: BehaviourShares) -> Vec<SimDevice> {
    generate_fleet(&FleetSpec {
        devices: n,
        mix: mix.parse().unwrap(),
        shares,
        misbehave_after_secs: 0,
        ..FleetSpec::default()
    })
    .unwrap()
}

#[tokio::test]
async fn gt06_fleet_every_report_is_acked() {
    let (addr, server) = gt06_server().await;
    let mut shares = BehaviourShares::none();
    shares.strap_cut = 0.3;
    let mut cfg = SimConfig::new(fleet(20, "gt06=1", shares));
    cfg.gt06 = Some(addr);
    cfg.pacing = Pacing::Interval(Duration::from_millis(200));
    cfg.duration = Some(Duration::from_secs(2));
    cfg.ramp_up = Duration::from_millis(200);
    cfg.source_ips = parse_source_ips("127.0.0.1-127.0.0.2").unwrap();
    let report = run(cfg, CancellationToken::new()).await.unwrap();
    assert!(report.reports_sent >= 100, "{report}");
    assert_eq!(report.reports_sent, report.reports_acked, "{report}");
    assert_eq!(report.connections_opened, 20);
    assert_eq!(report.ack_timeouts, 0);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(server.logins.load(Ordering::Relaxed), 20);
    // Every report is a location or (once, for strap cutters) an alarm.
    let received = server.locations.load(Ordering::Relaxed) + server.alarms.load(Ordering::Relaxed);
    assert_eq!(received, report.reports_sent);
    assert!(server.alarms.load(Ordering::Relaxed) >= 1);
    assert_eq!(report.ack_latency.count, report.reports_acked);
    assert!(report.ack_latency.p99_ms.is_some());
    // Both source addresses were used.
    assert_eq!(server.peers.lock().unwrap().len(), 2);
    assert_eq!(
        report.by_protocol["gt06"].reports_acked,
        report.reports_acked
    );
}

#[tokio::test]
async fn gt06_sparse_heartbeats_confirm_earlier_locations() {
    let (addr, server) = gt06_server().await;
    let mut cfg = SimConfig::new(fleet(5, "gt06=1", BehaviourShares::none()));
    cfg.gt06 = Some(addr);
    cfg.gt06_heartbeat_every = 4;
    cfg.pacing = Pacing::Interval(Duration::from_millis(100));
    cfg.max_reports = Some(53);
    cfg.duration = Some(Duration::from_secs(10));
    cfg.ramp_up = Duration::from_millis(50);
    let report = run(cfg, CancellationToken::new()).await.unwrap();
    assert_eq!(report.reports_sent, 53, "{report}");
    // Pending locations are confirmed by a final heartbeat before closing.
    assert_eq!(report.reports_acked, 53, "{report}");
    assert_eq!(server.locations.load(Ordering::Relaxed), 53);
    let hb = server.heartbeats.load(Ordering::Relaxed);
    assert!(hb < 53 / 2, "{hb} heartbeats for 53 locations");
}

#[tokio::test]
async fn teltonika_and_gt06_mixed_rate_paced() {
    let (g, _) = gt06_server().await;
    let (t, tserver) = teltonika_server().await;
    let mut cfg = SimConfig::new(fleet(
        40,
        "gt06=50,teltonika=50",
        BehaviourShares::default(),
    ));
    cfg.gt06 = Some(g);
    cfg.teltonika = Some(t);
    // 40 devices, 100 reports/s in total: one report per device every 0.4 s.
    cfg.pacing = Pacing::TotalRate(100.0);
    cfg.duration = Some(Duration::from_secs(2));
    cfg.ramp_up = Duration::from_millis(100);
    assert_eq!(cfg.device_interval(), Duration::from_millis(400));
    let report = run(cfg, CancellationToken::new()).await.unwrap();
    assert_eq!(report.reports_sent, report.reports_acked, "{report}");
    let tel = &report.by_protocol["teltonika"];
    assert_eq!(tel.devices, 20);
    assert_eq!(
        tel.reports_acked,
        tserver.avl_records.load(Ordering::Relaxed)
    );
    // About 100/s over ~1.9 s of reporting.
    assert!(
        (120..=260).contains(&report.reports_sent),
        "sent {}",
        report.reports_sent
    );
}

#[tokio::test]
async fn teltonika_batches_many_records_per_packet() {
    let (t, server) = teltonika_server().await;
    let mut shares = BehaviourShares::none();
    // Teltonika "strap cutters" run their battery down instead: once low, every record
    // should keep the low-battery alert going and is sent at once (high priority).
    shares.strap_cut = 0.3;
    let devices = fleet(20, "teltonika=1", shares);
    assert!(
        devices
            .iter()
            .any(|d| matches!(d.behaviour, Behaviour::BatteryDrain { .. })),
        "the fleet must hold battery drainers for this test"
    );
    let mut cfg = SimConfig::new(devices);
    cfg.teltonika = Some(t);
    cfg.records_per_packet = 10;
    // 20 devices, 400 fixes/s in total: one fix per device every 50 ms, a packet per 0.5 s.
    cfg.pacing = Pacing::TotalRate(400.0);
    cfg.duration = Some(Duration::from_secs(3));
    cfg.ramp_up = Duration::from_millis(100);
    let report = run(cfg, CancellationToken::new()).await.unwrap();
    assert_eq!(report.records_per_packet, 10);
    assert_eq!(report.reports_sent, report.reports_acked, "{report}");
    assert_eq!(report.reports_rejected, 0);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.ack_latency.count, report.reports_acked);
    let records = server.avl_records.load(Ordering::Relaxed);
    let packets = server.avl_packets.load(Ordering::Relaxed);
    assert_eq!(records, report.reports_sent);
    assert_eq!(packets, report.frames_sent);
    // Pacing is still fixes per second: ~400/s over ~2.9 s of reporting.
    assert!(
        (800..=1300).contains(&report.reports_sent),
        "sent {}",
        report.reports_sent
    );
    // Packets of ordinary records carry several (the first and last of a device's run
    // fewer); an alerting record ends its packet and goes out when recorded.
    let plain = server.plain_records.load(Ordering::Relaxed);
    let plain_packets = server.plain_packets.load(Ordering::Relaxed);
    assert!(
        plain >= 6 * plain_packets,
        "{plain} records in {plain_packets} packets ({records} in {packets} in all)"
    );
    assert!(server.urgent_records.load(Ordering::Relaxed) > 0);
    assert_eq!(server.urgent_not_last.load(Ordering::Relaxed), 0);
    // An alerting record is sent when recorded, not after the rest of a batch (10 × 50 ms).
    let age = server.urgent_max_age_ms.load(Ordering::Relaxed);
    assert!(age < 300, "alerting record {age} ms old on arrival");
}

#[tokio::test]
async fn gt06_batches_locations_in_one_write_with_one_heartbeat() {
    let (addr, server) = gt06_server().await;
    let mut shares = BehaviourShares::none();
    shares.strap_cut = 0.3;
    let mut cfg = SimConfig::new(fleet(10, "gt06=1", shares));
    cfg.gt06 = Some(addr);
    cfg.records_per_packet = 5;
    cfg.pacing = Pacing::Interval(Duration::from_millis(40));
    cfg.max_reports = Some(400);
    cfg.duration = Some(Duration::from_secs(10));
    cfg.ramp_up = Duration::from_millis(50);
    let report = run(cfg, CancellationToken::new()).await.unwrap();
    assert_eq!(report.reports_sent, 400, "{report}");
    assert_eq!(report.reports_acked, 400, "{report}");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let received = server.locations.load(Ordering::Relaxed) + server.alarms.load(Ordering::Relaxed);
    assert_eq!(received, 400);
    assert!(server.alarms.load(Ordering::Relaxed) >= 1);
    // About one heartbeat per batch of five, not per location.
    let hb = server.heartbeats.load(Ordering::Relaxed);
    assert!(hb <= 400 / 5 + 10, "{hb} heartbeats for 400 locations");
}

#[test]
fn records_per_packet_is_validated_and_capped_for_em() {
    let mut cfg = SimConfig::new(fleet(1, "gt06=1", BehaviourShares::none()));
    cfg.gt06 = Some("127.0.0.1:5023".parse().unwrap());
    for ok in [1, 50, 255] {
        cfg.records_per_packet = ok;
        cfg.validate().unwrap();
    }
    for bad in [0, 256] {
        cfg.records_per_packet = bad;
        assert!(cfg.validate().is_err(), "{bad}");
    }
    cfg.records_per_packet = 255;
    assert_eq!(cfg.records_per_packet_for(Protocol::Teltonika), 255);
    assert_eq!(cfg.records_per_packet_for(Protocol::Gt06), 255);
    assert_eq!(cfg.records_per_packet_for(Protocol::Em), 100);
    cfg.records_per_packet = 20;
    assert_eq!(cfg.records_per_packet_for(Protocol::Em), 20);
}

#[tokio::test]
async fn unreachable_service_is_counted_not_fatal() {
    // Bind then drop: nothing listens on this port any more.
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = SimConfig::new(fleet(3, "gt06=1", BehaviourShares::none()));
    cfg.gt06 = Some(addr);
    cfg.duration = Some(Duration::from_millis(1200));
    let report = run(cfg, CancellationToken::new()).await.unwrap();
    assert_eq!(report.reports_sent, 0);
    assert!(report.connect_failures >= 3);
    assert!(report.errors.contains_key("connect"));
    assert!(report.alert_latency.is_none());
}

#[tokio::test]
async fn cancellation_stops_an_unbounded_run() {
    let (addr, _) = gt06_server().await;
    let mut cfg = SimConfig::new(fleet(4, "gt06=1", BehaviourShares::none()));
    cfg.gt06 = Some(addr);
    cfg.duration = None;
    cfg.pacing = Pacing::Interval(Duration::from_millis(100));
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        t.cancel();
    });
    let report = tokio::time::timeout(Duration::from_secs(10), run(cfg, token))
        .await
        .expect("run did not stop on cancellation")
        .unwrap();
    assert!(report.reports_sent > 0);
}

#[test]
fn config_validation() {
    let devs = fleet(3, "gt06=1,teltonika=1,mqtt=1", BehaviourShares::none());
    let mut cfg = SimConfig::new(devs);
    assert!(cfg.validate().is_err(), "no endpoints");
    cfg.gt06 = Some("127.0.0.1:5023".parse().unwrap());
    cfg.teltonika = Some("127.0.0.1:5027".parse().unwrap());
    assert!(cfg.validate().unwrap_err().to_string().contains("MQTT"));
    cfg.mqtt = Some("mqtt://127.0.0.1:1883".parse().unwrap());
    cfg.validate().unwrap();
    let mut lenient = cfg.clone();
    lenient.mqtt = None;
    lenient.skip_devices_without_endpoint = true;
    lenient.validate().unwrap();
    cfg.pacing = Pacing::TotalRate(0.0);
    assert!(cfg.validate().is_err());
    cfg.pacing = Pacing::TotalRate(f64::NAN);
    assert!(cfg.validate().is_err());
}

#[test]
fn mqtt_endpoints_parse() {
    let e: MqttEndpoint = "mqtt://127.0.0.1:1883".parse().unwrap();
    assert_eq!((e.host.as_str(), e.port), ("127.0.0.1", 1883));
    let e: MqttEndpoint = "localhost".parse().unwrap();
    assert_eq!((e.host.as_str(), e.port), ("localhost", 1883));
    let e: MqttEndpoint = "tcp://broker:11883/".parse().unwrap();
    assert_eq!(e.port, 11883);
    assert!("http://x:1".parse::<MqttEndpoint>().is_err());
    assert!("mqtt://user:pw@x:1".parse::<MqttEndpoint>().is_err());
    assert!("mqtt://x:port".parse::<MqttEndpoint>().is_err());
    assert!("mqtt://:1883".parse::<MqttEndpoint>().is_err());
}

#[test]
fn alert_notices_match_pending_expectations() {
    let cfg = SimConfig::new(Vec::new());
    let ctx = Ctx {
        stats: Arc::new(LiveStats::default()),
        ack_hist: Histogram::new(),
        alert_hist: Histogram::new(),
        lost_hist: Histogram::new(),
        pending: Mutex::new(HashMap::new()),
        expected: Mutex::new(HashMap::new()),
        matched: Mutex::new(BTreeMap::new()),
        created: Mutex::new(BTreeMap::new()),
        subject_device: [(7, "dev-b".to_string())].into_iter().collect(),
        errors: Mutex::new(BTreeMap::new()),
        connect_permits: Semaphore::new(1),
        reports_budget: None,
        start: tokio::time::Instant::now(),
        wall_start: chrono::Utc::now(),
        deadline: None,
        watch_alerts: AtomicBool::new(true),
        cfg,
    };
    let t0 = Instant::now();
    ctx.expect("dev-a", AlertKind::StrapTamper, t0);
    ctx.expect("dev-b", AlertKind::CurfewViolation, t0);
    let notice = |subject: i64, device: Option<&str>, kind: &str, event: &str| {
        serde_json::to_vec(&serde_json::json!({
            "event": event,
            "alert": {"subject_id": subject, "device_id": device, "kind": kind, "id": 1}
        }))
        .unwrap()
    };
    let later = t0 + Duration::from_millis(250);
    // Wrong kind for dev-a: counted, not matched.
    on_alert(
        &ctx,
        &notice(1, Some("dev-a"), "low_battery", "alert.created"),
        later,
    );
    // Updates are ignored.
    on_alert(
        &ctx,
        &notice(1, Some("dev-a"), "strap_tamper", "alert.updated"),
        later,
    );
    assert_eq!(ctx.alert_hist.count(), 0);
    on_alert(
        &ctx,
        &notice(1, Some("dev-a"), "strap_tamper", "alert.created"),
        later,
    );
    // dev-b found through its subject (no device id in the notice).
    on_alert(
        &ctx,
        &notice(7, None, "curfew_violation", "alert.created"),
        later,
    );
    // Garbage is ignored.
    on_alert(&ctx, b"not json", later);
    assert_eq!(ctx.alert_hist.count(), 2);
    assert_eq!(ctx.alert_hist.max(), Some(250_000));
    let created = ctx.created.lock().unwrap().clone();
    assert_eq!(created.get("low_battery"), Some(&1));
    assert_eq!(created.get("strap_tamper"), Some(&1));
    assert!(ctx.pending.lock().unwrap().is_empty());
    assert_eq!(ctx.matched.lock().unwrap().values().sum::<u64>(), 2);
}

#[tokio::test]
async fn register_subjects_is_idempotent_and_puts_homes_under_curfew() {
    let store = em_store::testing::sqlite_store().await;
    let mut shares = BehaviourShares::none();
    shares.leave_home = 0.5;
    let mut devs = fleet(6, "gt06=1,teltonika=1,mqtt=1", shares);
    let now = chrono::Utc::now();
    assert_eq!(
        register_subjects(store.as_ref(), &mut devs, now, 2)
            .await
            .unwrap(),
        6
    );
    let first: Vec<_> = devs.iter().map(|d| d.subject_id).collect();
    assert!(first.iter().all(Option::is_some));
    register_subjects(store.as_ref(), &mut devs, now, 2)
        .await
        .unwrap();
    assert_eq!(devs.iter().map(|d| d.subject_id).collect::<Vec<_>>(), first);
    assert_eq!(store.list_subjects(None).await.unwrap().len(), 6);
    assert_eq!(store.list_zones(None).await.unwrap().len(), 6);
    assert_eq!(store.current_assignments().await.unwrap().len(), 6);
    let tz: chrono_tz::Tz = "Europe/Copenhagen".parse().unwrap();
    for d in &devs {
        let zones = store.list_zones(d.subject_id).await.unwrap();
        let sched = zones[0].schedule.as_ref().unwrap();
        let compiled = em_geofence::CompiledSchedule::compile(sched).unwrap();
        assert!(compiled.state_at(tz, now).active);
        assert_eq!(
            store
                .subject_for_device_at(&d.device_id, now)
                .await
                .unwrap(),
            d.subject_id
        );
    }
}
