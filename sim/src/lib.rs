//! Fleet simulator and load tool: drives simulated ankle tags against the service.
//!
//! [`run`] opens one connection per device — GT06 and Teltonika over TCP, the open EM
//! protocol over MQTT (QoS 1) — logs in, then records one report (fix) per device every
//! [`SimConfig::pacing`] interval while moving the subject along a plausible track
//! ([`track`]) and playing its scripted [`Behaviour`] (stay home, leave home during the
//! curfew, enter an exclusion zone, approach a victim, cut the strap, run the battery down,
//! go silent). Like real tags, a device sends its fixes in batches of
//! [`SimConfig::records_per_packet`] (one Teltonika AVL packet, one EM JSON array, GT06
//! location frames in one write), but a fix that should provoke an alert goes out at once
//! with whatever is buffered. Every batch waits for the protocol's acknowledgement (GT06
//! heartbeat/alarm ACK, which also confirms the location frames before it; Teltonika
//! accepted-record count; MQTT PUBACK) and each of its reports is counted as sent and acked;
//! send→ACK latency (from the batch's send) goes into an HDR-style [`Histogram`]. When an
//! MQTT broker is reachable the simulator also subscribes to the alert feed
//! `em/v1/alerts/#` and measures **fix→alert latency**: from the send of the last report
//! that should provoke an alert to the `alert.created` notice for that device.
//!
//! Connections are spread over several local source addresses
//! ([`SimConfig::source_ips`], e.g. `127.0.0.1-127.0.0.20`) so that 100,000 TCP
//! connections do not exhaust one address's ephemeral ports, opened at a bounded
//! concurrency over a ramp-up period, and re-opened with back-off when the service drops
//! them. The run always ends: at [`SimConfig::duration`], after
//! [`SimConfig::max_reports`], or when the cancellation token fires.
//!
//! The `em-sim` binary is the command-line front end (`em-sim --help`); the embedded
//! default of the `em` binary runs the demo fleet from [`crate::demo::seed`] through
//! [`SimConfig::from_demo`].

pub mod behaviour;
pub mod conn;
pub mod demo;
pub mod fleet;
pub mod histogram;
pub mod track;

pub use behaviour::{Behaviour, DeviceScript, Report, SimDevice, Tick};
pub use conn::{Confirmed, Fix, TELTONIKA_MAX_RECORDS};
pub use fleet::{
    generate_fleet, imei, parse_source_ips, BehaviourShares, FleetSpec, ProtocolMix, SimConfigError,
};
pub use histogram::{Histogram, LatencySummary};

use conn::{ConnError, DeviceConn, Gt06Conn, MqttConn, TeltonikaConn};
use em_model::{AlertKind, DeviceId, Protocol, SubjectId};
use em_protocols::em::MAX_BATCH as EM_MAX_BATCH;
use em_store::Store;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// MQTT topic filter of the live alert feed (published by `em-alerts`).
pub const ALERT_TOPIC_FILTER: &str = "em/v1/alerts/#";

/// An MQTT broker address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttEndpoint {
    pub host: String,
    pub port: u16,
}

impl std::str::FromStr for MqttEndpoint {
    type Err = SimConfigError;
    /// `mqtt://host:port`, `tcp://host:port`, `host:port` or `host` (port 1883).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| SimConfigError::Other(format!("invalid MQTT URL {s:?}: {why}"));
        let rest = s.trim();
        let rest = match rest.split_once("://") {
            Some((scheme, rest)) => {
                if !matches!(scheme, "mqtt" | "tcp") {
                    return Err(bad("only mqtt:// and tcp:// are supported"));
                }
                rest
            }
            None => rest,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('@') || rest.contains('/') || rest.contains('?') {
            return Err(bad("expected host[:port] without credentials or path"));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') || h.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse::<u16>().map_err(|_| bad("port is not a number"))?,
            ),
            _ => (rest, 1883),
        };
        if host.is_empty() {
            return Err(bad("host is empty"));
        }
        Ok(MqttEndpoint {
            host: host.to_string(),
            port,
        })
    }
}

impl std::fmt::Display for MqttEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mqtt://{}:{}", self.host, self.port)
    }
}

/// How often devices report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pacing {
    /// Each device reports every interval.
    Interval(Duration),
    /// The whole fleet together sends this many reports per second, evenly phased.
    TotalRate(f64),
}

/// Simulator configuration. Build with [`SimConfig::new`] and adjust the public fields.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// GT06 TCP listener of the service.
    pub gt06: Option<SocketAddr>,
    /// Teltonika TCP listener of the service.
    pub teltonika: Option<SocketAddr>,
    /// MQTT broker for EM devices.
    pub mqtt: Option<MqttEndpoint>,
    /// Broker carrying the alert feed for fix→alert latency (None = measure send→ACK only).
    pub alerts_mqtt: Option<MqttEndpoint>,
    /// Username and password of the alert-feed subscriber (the embedded endpoint's feed user).
    pub alerts_mqtt_login: Option<(String, String)>,
    pub devices: Vec<SimDevice>,
    pub pacing: Pacing,
    /// Stop after this long (None = until the token is cancelled; the CLI always sets one).
    pub duration: Option<Duration>,
    /// Stop after this many reports in total.
    pub max_reports: Option<u64>,
    /// Local addresses client sockets bind to, round-robin by device (empty = kernel's choice).
    /// Not applied to MQTT connections (rumqttc cannot bind a source address).
    pub source_ips: Vec<IpAddr>,
    /// Seed of all randomness (tracks, noise, battery).
    pub seed: u64,
    /// Connections being opened at the same time.
    pub connect_concurrency: usize,
    /// Connections are opened evenly over this period (devices' reports start after it).
    pub ramp_up: Duration,
    /// How long to wait for a login or report acknowledgement.
    pub ack_timeout: Duration,
    /// GT06: send a heartbeat (which is acknowledged) after every N location reports
    /// (checked after each batch: with `records_per_packet` ≥ N, one heartbeat per batch).
    pub gt06_heartbeat_every: u32,
    /// Reports a device accumulates before sending them together: in one Teltonika AVL
    /// packet (1..=255), one EM JSON array (capped at the protocol's 100), or as GT06
    /// location frames written back to back in one write. The fleet still records
    /// [`SimConfig::pacing`] reports per interval; a device sends a batch every N intervals.
    /// Reports that should provoke an alert are sent at once with what is buffered.
    pub records_per_packet: usize,
    /// After the devices stop, how long to keep listening for alerts still in flight.
    pub alert_grace: Duration,
    /// Leave out (with a warning) devices whose protocol has no endpoint configured,
    /// instead of failing validation. The demo sets it: the service may run without MQTT.
    pub skip_devices_without_endpoint: bool,
}

impl SimConfig {
    /// Defaults for `devices`: one report per device every 10 s for 60 s, 256 concurrent
    /// connects, ramp-up of one second per 2,000 devices (at least half a second).
    pub fn new(devices: Vec<SimDevice>) -> Self {
        let ramp = Duration::from_secs_f64((devices.len() as f64 / 2000.0).max(0.5));
        SimConfig {
            gt06: None,
            teltonika: None,
            mqtt: None,
            alerts_mqtt: None,
            alerts_mqtt_login: None,
            devices,
            pacing: Pacing::Interval(Duration::from_secs(10)),
            duration: Some(Duration::from_secs(60)),
            max_reports: None,
            source_ips: Vec::new(),
            seed: 1,
            connect_concurrency: 256,
            ramp_up: ramp,
            ack_timeout: Duration::from_secs(10),
            gt06_heartbeat_every: 1,
            records_per_packet: 1,
            alert_grace: Duration::from_secs(5),
            skip_devices_without_endpoint: false,
        }
    }

    /// Whether this configuration has an endpoint for `protocol`.
    pub fn has_endpoint(&self, protocol: Protocol) -> bool {
        match protocol {
            Protocol::Gt06 => self.gt06.is_some(),
            Protocol::Teltonika => self.teltonika.is_some(),
            Protocol::Em => self.mqtt.is_some(),
            _ => false,
        }
    }

    /// The demo fleet of `plan`, reporting every 3 s with no time limit (the embedded
    /// default runs it until shutdown); set the endpoints before calling [`run`].
    pub fn from_demo(plan: &crate::demo::DemoPlan) -> Self {
        let mut cfg = SimConfig::new(plan.devices.iter().map(|d| d.sim_device()).collect());
        cfg.pacing = Pacing::Interval(Duration::from_secs(3));
        cfg.duration = None;
        cfg.ramp_up = Duration::from_millis(500);
        cfg.skip_devices_without_endpoint = true;
        cfg
    }

    /// Reports per batch for devices speaking `protocol`: [`SimConfig::records_per_packet`],
    /// capped at 100 for the EM protocol (its largest store-and-forward array).
    pub fn records_per_packet_for(&self, protocol: Protocol) -> usize {
        let n = self.records_per_packet.max(1);
        match protocol {
            Protocol::Em => n.min(EM_MAX_BATCH),
            _ => n,
        }
    }

    /// Interval between two reports of one device.
    pub fn device_interval(&self) -> Duration {
        match self.pacing {
            Pacing::Interval(d) => d,
            Pacing::TotalRate(r) => {
                Duration::from_secs_f64(self.devices.len().max(1) as f64 / r.max(1e-9))
            }
        }
    }

    /// Check the configuration: every device has an endpoint for its protocol, rates are
    /// positive and finite.
    pub fn validate(&self) -> Result<(), SimConfigError> {
        if let Pacing::TotalRate(r) = self.pacing {
            if !r.is_finite() || r <= 0.0 {
                return Err(SimConfigError::Other(format!(
                    "rate must be a positive number of reports per second, got {r}"
                )));
            }
        }
        let iv = self.device_interval();
        if iv < Duration::from_millis(1) {
            return Err(SimConfigError::Other(format!(
                "per-device interval {iv:?} is below 1 ms"
            )));
        }
        if !(1..=TELTONIKA_MAX_RECORDS).contains(&self.records_per_packet) {
            return Err(SimConfigError::Other(format!(
                "records per packet must be within 1..={TELTONIKA_MAX_RECORDS}, got {}",
                self.records_per_packet
            )));
        }
        if self.connect_concurrency == 0 {
            return Err(SimConfigError::Other(
                "connect concurrency must be at least 1".into(),
            ));
        }
        for d in &self.devices {
            if !matches!(
                d.protocol,
                Protocol::Gt06 | Protocol::Teltonika | Protocol::Em
            ) {
                return Err(SimConfigError::Other(format!(
                    "device {}: the simulator does not speak {}",
                    d.device_id, d.protocol
                )));
            }
            if !self.has_endpoint(d.protocol) && !self.skip_devices_without_endpoint {
                return Err(SimConfigError::Other(format!(
                    "device {} uses {} but no {} address is configured",
                    d.device_id,
                    d.protocol,
                    match d.protocol {
                        Protocol::Em => "MQTT",
                        p => p.as_str(),
                    }
                )));
            }
        }
        Ok(())
    }
}

const PROTOCOLS: [Protocol; 3] = [Protocol::Gt06, Protocol::Teltonika, Protocol::Em];

fn proto_index(p: Protocol) -> usize {
    match p {
        Protocol::Teltonika => 1,
        Protocol::Em => 2,
        _ => 0,
    }
}

/// Per-protocol live counters.
#[derive(Debug, Default)]
pub struct ProtocolStats {
    pub connected: AtomicU64,
    pub reports_sent: AtomicU64,
    pub reports_acked: AtomicU64,
}

/// Live counters of a run, readable while it goes (the CLI's progress bar polls them).
#[derive(Debug, Default)]
pub struct LiveStats {
    /// Devices currently connected.
    pub connected_now: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connect_failures: AtomicU64,
    pub login_rejected: AtomicU64,
    /// Established connections lost (timeouts, server closes).
    pub disconnects: AtomicU64,
    pub reports_sent: AtomicU64,
    pub reports_acked: AtomicU64,
    /// Reports the server answered as not accepted (Teltonika count 0).
    pub reports_rejected: AtomicU64,
    pub ack_timeouts: AtomicU64,
    pub frames_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Devices that went silent on purpose.
    pub silent_devices: AtomicU64,
    pub alerts_received: AtomicU64,
    pub alerts_matched: AtomicU64,
    pub per_protocol: [ProtocolStats; 3],
    /// Alert watcher connected to the broker.
    pub alert_feed_up: AtomicBool,
}

/// Counts of one protocol in the final report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProtocolReport {
    pub devices: u64,
    pub connected: u64,
    pub reports_sent: u64,
    pub reports_acked: u64,
}

/// Outcome of a run (the CLI prints it, `--json` as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimReport {
    pub devices: u64,
    /// Seconds from start to the last device stopping.
    pub elapsed_secs: f64,
    /// Per-device report interval used, seconds.
    pub device_interval_secs: f64,
    /// Reports per batch (EM devices use at most 100).
    #[serde(default)]
    pub records_per_packet: u64,
    pub connections_opened: u64,
    pub connect_failures: u64,
    pub login_rejected: u64,
    pub disconnects: u64,
    pub reports_sent: u64,
    pub reports_acked: u64,
    pub reports_rejected: u64,
    pub ack_timeouts: u64,
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Reports sent per second over the run.
    pub sent_per_sec: f64,
    pub acked_per_sec: f64,
    /// Send → protocol acknowledgement.
    pub ack_latency: LatencySummary,
    /// Fix → `alert.created` notice on the alert feed (None when no broker was reachable).
    pub alert_latency: Option<LatencySummary>,
    /// Last report → lost-communication alert (measures the service's silence threshold).
    pub lost_comm_latency: Option<LatencySummary>,
    /// `alert.created` notices received per alert kind (all subjects).
    pub alerts_created: BTreeMap<String, u64>,
    /// Devices whose behaviour should have provoked each alert kind by the end.
    pub alerts_expected: BTreeMap<String, u64>,
    /// Of those, devices whose alert arrived.
    pub alerts_matched: BTreeMap<String, u64>,
    pub silent_devices: u64,
    pub by_protocol: BTreeMap<String, ProtocolReport>,
    /// Why the alert feed was not used, when it was not.
    pub alert_feed_error: Option<String>,
    /// Error counts by kind (connect, timeout, closed, …) with one example message each.
    pub errors: BTreeMap<String, ErrorCount>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorCount {
    pub count: u64,
    pub example: String,
}

impl std::fmt::Display for SimReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "devices {} | elapsed {:.1} s | interval {:.2} s/device | {} reports/packet",
            self.devices, self.elapsed_secs, self.device_interval_secs, self.records_per_packet
        )?;
        writeln!(
            f,
            "connections opened {} | connect failures {} | login rejected {} | disconnects {}",
            self.connections_opened, self.connect_failures, self.login_rejected, self.disconnects
        )?;
        writeln!(
            f,
            "reports sent {} | acked {} | rejected {} | ack timeouts {} | {:.1} sent/s, {:.1} acked/s",
            self.reports_sent,
            self.reports_acked,
            self.reports_rejected,
            self.ack_timeouts,
            self.sent_per_sec,
            self.acked_per_sec
        )?;
        for (p, r) in &self.by_protocol {
            writeln!(
                f,
                "  {p:<10} devices {} connected {} sent {} acked {}",
                r.devices, r.connected, r.reports_sent, r.reports_acked
            )?;
        }
        writeln!(f, "send→ACK latency: {}", self.ack_latency)?;
        match &self.alert_latency {
            Some(l) => writeln!(f, "fix→alert latency: {l}")?,
            None => writeln!(
                f,
                "fix→alert latency: not measured ({})",
                self.alert_feed_error
                    .as_deref()
                    .unwrap_or("no alert broker")
            )?,
        }
        if let Some(l) = &self.lost_comm_latency {
            writeln!(f, "silence→lost-communication alert: {l}")?;
        }
        if !self.alerts_expected.is_empty() || !self.alerts_created.is_empty() {
            writeln!(f, "alerts (expected devices / matched / created notices):")?;
            let mut kinds: Vec<&String> = self
                .alerts_expected
                .keys()
                .chain(self.alerts_created.keys())
                .collect();
            kinds.sort();
            kinds.dedup();
            for k in kinds {
                writeln!(
                    f,
                    "  {k:<24} {} / {} / {}",
                    self.alerts_expected.get(k).copied().unwrap_or(0),
                    self.alerts_matched.get(k).copied().unwrap_or(0),
                    self.alerts_created.get(k).copied().unwrap_or(0)
                )?;
            }
        }
        for (k, e) in &self.errors {
            writeln!(f, "error {k}: {} (e.g. {})", e.count, e.example)?;
        }
        Ok(())
    }
}

/// State shared by the device tasks and the alert watcher.
struct Ctx {
    cfg: SimConfig,
    stats: Arc<LiveStats>,
    ack_hist: Histogram,
    alert_hist: Histogram,
    lost_hist: Histogram,
    /// Device → (expected alert, send time of the last report that should provoke it).
    pending: Mutex<HashMap<DeviceId, (AlertKind, Instant)>>,
    /// Device → alert kinds it was expected to provoke (for the expected/matched table).
    expected: Mutex<HashMap<DeviceId, AlertKind>>,
    matched: Mutex<BTreeMap<String, u64>>,
    created: Mutex<BTreeMap<String, u64>>,
    subject_device: HashMap<SubjectId, DeviceId>,
    errors: Mutex<BTreeMap<String, ErrorCount>>,
    connect_permits: Semaphore,
    reports_budget: Option<AtomicU64>,
    start: tokio::time::Instant,
    /// Wall-clock time at `start`: fixes' device times are derived from their schedule.
    wall_start: chrono::DateTime<chrono::Utc>,
    deadline: Option<tokio::time::Instant>,
    watch_alerts: AtomicBool,
}

impl Ctx {
    fn error(&self, e: &ConnError) {
        let Ok(mut errors) = self.errors.lock() else {
            return;
        };
        let entry = errors.entry(e.label().to_string()).or_default();
        entry.count += 1;
        if entry.example.is_empty() {
            entry.example = e.to_string();
        }
    }

    fn expect(&self, device: &str, kind: AlertKind, at: Instant) {
        if !self.watch_alerts.load(Ordering::Relaxed) {
            return;
        }
        if let Ok(mut m) = self.expected.lock() {
            m.entry(device.to_string()).or_insert(kind);
        }
        if let Ok(mut p) = self.pending.lock() {
            p.insert(device.to_string(), (kind, at));
        }
    }

    /// Wall-clock time of the monotonic instant `at` (not before the start).
    fn wall_time(&self, at: tokio::time::Instant) -> chrono::DateTime<chrono::Utc> {
        chrono::TimeDelta::from_std(at.saturating_duration_since(self.start))
            .ok()
            .and_then(|d| self.wall_start.checked_add_signed(d))
            .unwrap_or(self.wall_start)
    }

    /// Count the reports `confirmed` lists as acked and record their send→ACK latency;
    /// empties `confirmed`.
    fn record_confirmed(&self, pstats: &ProtocolStats, confirmed: &mut Vec<Confirmed>) {
        let acked_at = Instant::now();
        let mut n = 0;
        for c in confirmed.drain(..) {
            self.ack_hist
                .record_duration_n(acked_at.saturating_duration_since(c.sent_at), c.reports);
            n += c.reports;
        }
        if n > 0 {
            self.stats.reports_acked.fetch_add(n, Ordering::Relaxed);
            pstats.reports_acked.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn past_deadline(&self) -> bool {
        self.deadline
            .is_some_and(|d| tokio::time::Instant::now() >= d)
    }

    /// Take one report from the budget; false when it is used up.
    fn take_report(&self) -> bool {
        match &self.reports_budget {
            None => true,
            Some(b) => b
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
                .is_ok(),
        }
    }
}

/// Run the simulation until its duration, report budget or `shutdown`.
pub async fn run(cfg: SimConfig, shutdown: CancellationToken) -> anyhow::Result<SimReport> {
    run_with_stats(cfg, shutdown, Arc::new(LiveStats::default())).await
}

/// [`run`], updating `stats` live (for progress display).
pub async fn run_with_stats(
    cfg: SimConfig,
    shutdown: CancellationToken,
    stats: Arc<LiveStats>,
) -> anyhow::Result<SimReport> {
    let mut cfg = cfg;
    cfg.validate()?;
    if cfg.skip_devices_without_endpoint {
        let before = cfg.devices.len();
        let keep: Vec<SimDevice> = cfg
            .devices
            .iter()
            .filter(|d| cfg.has_endpoint(d.protocol))
            .cloned()
            .collect();
        if keep.len() < before {
            tracing::warn!(
                skipped = before - keep.len(),
                "simulated devices left out: no endpoint for their protocol"
            );
        }
        cfg.devices = keep;
    }
    let start = tokio::time::Instant::now();
    let started = Instant::now();
    let interval = cfg.device_interval();
    let subject_device = cfg
        .devices
        .iter()
        .filter_map(|d| d.subject_id.map(|s| (s, d.device_id.clone())))
        .collect();
    let ctx = Arc::new(Ctx {
        stats: stats.clone(),
        ack_hist: Histogram::new(),
        alert_hist: Histogram::new(),
        lost_hist: Histogram::new(),
        pending: Mutex::new(HashMap::new()),
        expected: Mutex::new(HashMap::new()),
        matched: Mutex::new(BTreeMap::new()),
        created: Mutex::new(BTreeMap::new()),
        subject_device,
        errors: Mutex::new(BTreeMap::new()),
        connect_permits: Semaphore::new(cfg.connect_concurrency),
        reports_budget: cfg.max_reports.map(AtomicU64::new),
        start,
        wall_start: chrono::Utc::now(),
        deadline: cfg.duration.map(|d| start + d),
        watch_alerts: AtomicBool::new(false),
        cfg,
    });

    // Alert feed first, so that early alerts are not missed.
    let watcher_stop = CancellationToken::new();
    let mut alert_feed_error = None;
    let watcher = match ctx.cfg.alerts_mqtt.clone() {
        None => {
            alert_feed_error = Some("no alert broker configured".to_string());
            None
        }
        Some(ep) => {
            match subscribe_alerts(&ep, ctx.cfg.alerts_mqtt_login.as_ref(), ctx.cfg.ack_timeout)
                .await
            {
                Ok((client, eventloop)) => {
                    ctx.watch_alerts.store(true, Ordering::Relaxed);
                    stats.alert_feed_up.store(true, Ordering::Relaxed);
                    let ctx = ctx.clone();
                    let stop = watcher_stop.clone();
                    Some(tokio::spawn(watch_alerts(client, eventloop, ctx, stop)))
                }
                Err(e) => {
                    tracing::warn!(broker = %ep, error = %e, "alert feed unavailable; measuring send→ACK latency only");
                    alert_feed_error = Some(format!("{ep}: {e}"));
                    None
                }
            }
        }
    };

    let n = ctx.cfg.devices.len();
    let mut tasks = tokio::task::JoinSet::new();
    for (idx, dev) in ctx.cfg.devices.iter().enumerate() {
        let ctx = ctx.clone();
        let dev = dev.clone();
        let shutdown = shutdown.clone();
        let frac = if n == 0 { 0.0 } else { idx as f64 / n as f64 };
        tasks.spawn(async move { device_task(idx, frac, dev, interval, ctx, shutdown).await });
    }
    while let Some(res) = tasks.join_next().await {
        if let Err(e) = res {
            tracing::error!(error = %e, "simulated device task failed");
        }
    }
    let devices_done = Instant::now();

    if let Some(w) = watcher {
        let has_pending = ctx.pending.lock().map(|p| !p.is_empty()).unwrap_or(false);
        if has_pending && !shutdown.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(ctx.cfg.alert_grace) => {}
                _ = shutdown.cancelled() => {}
            }
        }
        watcher_stop.cancel();
        let _ = w.await;
    }

    Ok(build_report(
        &ctx,
        n,
        interval,
        devices_done.duration_since(started),
        alert_feed_error,
    ))
}

fn build_report(
    ctx: &Ctx,
    n: usize,
    interval: Duration,
    elapsed: Duration,
    alert_feed_error: Option<String>,
) -> SimReport {
    let s = &ctx.stats;
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64().max(1e-9);
    let mut by_protocol = BTreeMap::new();
    for (i, p) in PROTOCOLS.iter().enumerate() {
        let devices = ctx.cfg.devices.iter().filter(|d| d.protocol == *p).count() as u64;
        if devices == 0 {
            continue;
        }
        let ps = &s.per_protocol[i];
        by_protocol.insert(
            if *p == Protocol::Em {
                "mqtt".to_string()
            } else {
                p.as_str().to_string()
            },
            ProtocolReport {
                devices,
                connected: get(&ps.connected),
                reports_sent: get(&ps.reports_sent),
                reports_acked: get(&ps.reports_acked),
            },
        );
    }
    let mut alerts_expected = BTreeMap::new();
    if let Ok(m) = ctx.expected.lock() {
        for k in m.values() {
            *alerts_expected.entry(k.as_str().to_string()).or_insert(0) += 1;
        }
    }
    let watched = ctx.watch_alerts.load(Ordering::Relaxed);
    SimReport {
        devices: n as u64,
        elapsed_secs: elapsed.as_secs_f64(),
        device_interval_secs: interval.as_secs_f64(),
        records_per_packet: ctx.cfg.records_per_packet as u64,
        connections_opened: get(&s.connections_opened),
        connect_failures: get(&s.connect_failures),
        login_rejected: get(&s.login_rejected),
        disconnects: get(&s.disconnects),
        reports_sent: get(&s.reports_sent),
        reports_acked: get(&s.reports_acked),
        reports_rejected: get(&s.reports_rejected),
        ack_timeouts: get(&s.ack_timeouts),
        frames_sent: get(&s.frames_sent),
        bytes_sent: get(&s.bytes_sent),
        sent_per_sec: get(&s.reports_sent) as f64 / secs,
        acked_per_sec: get(&s.reports_acked) as f64 / secs,
        ack_latency: ctx.ack_hist.summary_ms(),
        alert_latency: watched.then(|| ctx.alert_hist.summary_ms()),
        lost_comm_latency: (ctx.lost_hist.count() > 0).then(|| ctx.lost_hist.summary_ms()),
        alerts_created: ctx.created.lock().map(|m| m.clone()).unwrap_or_default(),
        alerts_expected,
        alerts_matched: ctx.matched.lock().map(|m| m.clone()).unwrap_or_default(),
        silent_devices: get(&s.silent_devices),
        by_protocol,
        alert_feed_error,
        errors: ctx.errors.lock().map(|m| m.clone()).unwrap_or_default(),
    }
}

/// Deterministic per-device seed.
fn device_seed(seed: u64, idx: usize) -> u64 {
    // SplitMix64 step: well-spread seeds for consecutive indices.
    let mut z = seed ^ (idx as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

async fn connect_device(idx: usize, dev: &SimDevice, ctx: &Ctx) -> Result<DeviceConn, ConnError> {
    let cfg = &ctx.cfg;
    let source = (!cfg.source_ips.is_empty())
        .then(|| cfg.source_ips.get(idx % cfg.source_ips.len()).copied())
        .flatten();
    let t = cfg.ack_timeout;
    match dev.protocol {
        Protocol::Gt06 => {
            let addr = cfg.gt06.ok_or(ConnError::NoEndpoint(Protocol::Gt06))?;
            Gt06Conn::connect(source, addr, &dev.device_id, cfg.gt06_heartbeat_every, t)
                .await
                .map(DeviceConn::Gt06)
        }
        Protocol::Teltonika => {
            let addr = cfg
                .teltonika
                .ok_or(ConnError::NoEndpoint(Protocol::Teltonika))?;
            TeltonikaConn::connect(source, addr, &dev.device_id, t)
                .await
                .map(DeviceConn::Teltonika)
        }
        p => {
            let ep = cfg.mqtt.as_ref().ok_or(ConnError::NoEndpoint(p))?;
            MqttConn::connect(ep, &dev.device_id, dev.secret.as_deref(), t)
                .await
                .map(|c| DeviceConn::Mqtt(Box::new(c)))
        }
    }
}

async fn device_task(
    idx: usize,
    frac: f64,
    dev: SimDevice,
    interval: Duration,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) {
    let stats = &ctx.stats;
    let pstats = &stats.per_protocol[proto_index(dev.protocol)];
    let mut script = DeviceScript::new(&dev, device_seed(ctx.cfg.seed, idx));
    let per_packet = ctx.cfg.records_per_packet_for(dev.protocol);
    // A device whose behaviour may provoke an alert wakes at every fix, so that an urgent
    // fix goes out at once. The others wake only when a batch is due and then record the
    // fixes since the last batch with their own (past) device times: one timer wake-up
    // per batch instead of one per fix.
    let wake_per_fix = per_packet == 1 || dev.behaviour.expected_alert().is_some();
    let connect_at = ctx.start + ctx.cfg.ramp_up.mul_f64(frac);
    // Fixes are phased evenly over one interval across the fleet; batches are spread over
    // the batch period too: device `idx`'s first batch holds `1 + idx % per_packet` fixes.
    let mut next_fix = ctx.start + ctx.cfg.ramp_up + interval.mul_f64(frac);
    let mut quota = 1 + idx % per_packet;
    let mut fixes: Vec<Fix> = Vec::with_capacity(per_packet);
    let mut confirmed: Vec<Confirmed> = Vec::new();
    let stop_at = |t: tokio::time::Instant| match ctx.deadline {
        Some(d) => t.min(d),
        None => t,
    };
    tokio::select! {
        _ = tokio::time::sleep_until(stop_at(connect_at)) => {}
        _ = shutdown.cancelled() => return,
    }
    let mut conn: Option<DeviceConn> = None;
    let mut backoff = Duration::from_millis(500);
    let mut last_elapsed = 0.0f64;
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let Some(c) = conn.as_mut() else {
            if ctx.past_deadline() {
                break;
            }
            let attempt = async {
                let _permit = ctx.connect_permits.acquire().await;
                connect_device(idx, &dev, &ctx).await
            };
            let res = tokio::select! {
                r = attempt => r,
                _ = shutdown.cancelled() => break,
            };
            match res {
                Ok(c) => {
                    stats.connections_opened.fetch_add(1, Ordering::Relaxed);
                    stats.connected_now.fetch_add(1, Ordering::Relaxed);
                    pstats.connected.fetch_add(1, Ordering::Relaxed);
                    backoff = Duration::from_millis(500);
                    conn = Some(c);
                }
                Err(e) => {
                    if matches!(e, ConnError::LoginRejected) {
                        stats.login_rejected.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                    }
                    ctx.error(&e);
                    let wake = stop_at(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    tokio::select! {
                        _ = tokio::time::sleep_until(wake) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
            }
            continue;
        };
        // Wait for the next fix (or the fix completing the batch), keeping the connection
        // alive. `fixes.len() < quota` holds here: a full buffer has been sent.
        let wake = if wake_per_fix {
            next_fix
        } else {
            let more = quota.saturating_sub(fixes.len() + 1);
            next_fix + interval * u32::try_from(more).unwrap_or(u32::MAX)
        };
        let idle = tokio::select! {
            r = c.idle_until(stop_at(wake)) => r,
            _ = shutdown.cancelled() => break,
        };
        if let Err(e) = idle {
            ctx.error(&e);
            stats.disconnects.fetch_add(1, Ordering::Relaxed);
            stats.connected_now.fetch_sub(1, Ordering::Relaxed);
            conn = None;
            continue;
        }
        // Record the fixes due by now (by the deadline at the end of the run).
        let now = tokio::time::Instant::now();
        let (horizon, mut stop) = match ctx.deadline {
            Some(d) if now >= d => (d, true),
            _ => (now, false),
        };
        let mut flush = false;
        let mut silent = false;
        while !flush && next_fix <= horizon {
            let at = next_fix;
            next_fix += interval;
            let elapsed = at.saturating_duration_since(ctx.start).as_secs_f64();
            let dt = (elapsed - last_elapsed).max(0.0);
            last_elapsed = elapsed;
            let report = match script.tick(elapsed, dt) {
                Tick::Silent => {
                    silent = true;
                    break;
                }
                Tick::Report(r) => r,
            };
            if !ctx.take_report() {
                stop = true;
                break;
            }
            let fix = Fix {
                report,
                time: ctx.wall_time(at),
            };
            flush = fix.is_urgent() || fixes.len() + 1 >= quota;
            fixes.push(fix);
        }
        // After a long stall do not burst to catch up.
        if next_fix + interval < now {
            next_fix = now + interval;
        }
        // Send a full batch, an urgent fix, or what is left when the device stops.
        if flush || ((stop || silent) && !fixes.is_empty()) {
            quota = per_packet;
            if let Err(e) = send_batch(&ctx, &dev, pstats, c, &mut fixes, &mut confirmed).await {
                if matches!(e, ConnError::Timeout(_)) {
                    stats.ack_timeouts.fetch_add(1, Ordering::Relaxed);
                }
                ctx.error(&e);
                stats.disconnects.fetch_add(1, Ordering::Relaxed);
                stats.connected_now.fetch_sub(1, Ordering::Relaxed);
                conn = None;
            }
        }
        if silent {
            ctx.expect(&dev.device_id, AlertKind::LostCommunication, Instant::now());
            stats.silent_devices.fetch_add(1, Ordering::Relaxed);
            break;
        }
        if stop {
            break;
        }
    }
    if let Some(mut c) = conn {
        // GT06 locations since the last heartbeat are still unconfirmed: ask once more.
        if c.confirm_pending(ctx.cfg.ack_timeout, &mut confirmed)
            .await
            .is_ok()
        {
            ctx.record_confirmed(pstats, &mut confirmed);
        }
        c.close().await;
        stats.connected_now.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Send the buffered `fixes` as one batch on `conn` and count them as sent (and as acked,
/// as far as the acknowledgement confirms them). The buffer is emptied either way: reports
/// of a failed batch count as sent and not acked.
async fn send_batch(
    ctx: &Ctx,
    dev: &SimDevice,
    pstats: &ProtocolStats,
    conn: &mut DeviceConn,
    fixes: &mut Vec<Fix>,
    confirmed: &mut Vec<Confirmed>,
) -> Result<(), ConnError> {
    let stats = &ctx.stats;
    let n = fixes.len() as u64;
    stats.reports_sent.fetch_add(n, Ordering::Relaxed);
    pstats.reports_sent.fetch_add(n, Ordering::Relaxed);
    let sent_at = Instant::now();
    for kind in fixes.iter().filter_map(|f| f.report.expect_alert) {
        ctx.expect(&dev.device_id, kind, sent_at);
    }
    let res = conn.send(fixes, ctx.cfg.ack_timeout, confirmed).await;
    fixes.clear();
    let sent = res?;
    stats.frames_sent.fetch_add(sent.frames, Ordering::Relaxed);
    stats.bytes_sent.fetch_add(sent.bytes, Ordering::Relaxed);
    if sent.rejected > 0 {
        stats
            .reports_rejected
            .fetch_add(sent.rejected, Ordering::Relaxed);
    }
    ctx.record_confirmed(pstats, confirmed);
    Ok(())
}

/// Connect a subscriber to the alert feed; errors when the broker does not answer.
async fn subscribe_alerts(
    ep: &MqttEndpoint,
    login: Option<&(String, String)>,
    timeout: Duration,
) -> Result<(AsyncClient, rumqttc::EventLoop), String> {
    let id = format!(
        "em-sim-alerts-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut opts = MqttOptions::new(id, ep.host.clone(), ep.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(256 * 1024, 16 * 1024);
    if let Some((user, password)) = login {
        opts.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    eventloop
        .network_options
        .set_connection_timeout(timeout.as_secs().clamp(1, 5));
    client
        .try_subscribe(ALERT_TOPIC_FILTER, QoS::AtLeastOnce)
        .map_err(|e| e.to_string())?;
    let wait = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    };
    match tokio::time::timeout(timeout.min(Duration::from_secs(5)), wait).await {
        Ok(Ok(())) => Ok((client, eventloop)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("no SUBACK in time".into()),
    }
}

/// The fields of an `em-alerts` AlertNotice the simulator needs.
#[derive(Debug, Deserialize)]
struct NoticeLite {
    event: String,
    alert: AlertLite,
}

#[derive(Debug, Deserialize)]
struct AlertLite {
    subject_id: SubjectId,
    #[serde(default)]
    device_id: Option<DeviceId>,
    kind: String,
}

/// Handle one alert-feed message: count it and, when it answers a pending expectation,
/// record the fix→alert latency.
fn on_alert(ctx: &Ctx, payload: &[u8], at: Instant) {
    let Ok(notice) = serde_json::from_slice::<NoticeLite>(payload) else {
        return;
    };
    if notice.event != "alert.created" {
        return;
    }
    ctx.stats.alerts_received.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut c) = ctx.created.lock() {
        *c.entry(notice.alert.kind.clone()).or_insert(0) += 1;
    }
    let Ok(kind) = notice.alert.kind.parse::<AlertKind>() else {
        return;
    };
    let device = notice
        .alert
        .device_id
        .clone()
        .or_else(|| ctx.subject_device.get(&notice.alert.subject_id).cloned());
    let Some(device) = device else { return };
    let hit = {
        let Ok(mut p) = ctx.pending.lock() else {
            return;
        };
        match p.get(&device) {
            Some((k, t)) if *k == kind => {
                let t = *t;
                p.remove(&device);
                Some(t)
            }
            _ => None,
        }
    };
    if let Some(t) = hit {
        let latency = at.saturating_duration_since(t);
        if kind == AlertKind::LostCommunication {
            ctx.lost_hist.record_duration(latency);
        } else {
            ctx.alert_hist.record_duration(latency);
        }
        ctx.stats.alerts_matched.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = ctx.matched.lock() {
            *m.entry(kind.as_str().to_string()).or_insert(0) += 1;
        }
    }
}

async fn watch_alerts(
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    ctx: Arc<Ctx>,
    stop: CancellationToken,
) {
    loop {
        let ev = tokio::select! {
            ev = eventloop.poll() => ev,
            _ = stop.cancelled() => break,
        };
        match ev {
            Ok(Event::Incoming(Packet::Publish(p))) => on_alert(&ctx, &p.payload, Instant::now()),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "alert feed connection lost; retrying");
                ctx.stats.alert_feed_up.store(false, Ordering::Relaxed);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.cancelled() => break,
                }
                // rumqttc reconnects on the next poll; the subscription is re-sent by us.
                let _ = client.try_subscribe(ALERT_TOPIC_FILTER, QoS::AtLeastOnce);
                ctx.stats.alert_feed_up.store(true, Ordering::Relaxed);
            }
        }
    }
    let _ = client.try_disconnect();
}

/// Register `devices` in `store` (active; EM devices with their secret) so the service
/// accepts their logins. Idempotent. Returns how many were written.
pub async fn register_devices(store: &dyn Store, devices: &[SimDevice]) -> anyhow::Result<usize> {
    use futures::StreamExt;
    let results: Vec<Result<(), em_store::StoreError>> = futures::stream::iter(devices)
        .map(|d| async move {
            store
                .upsert_device(&em_model::Device {
                    device_id: d.device_id.clone(),
                    protocol: d.protocol,
                    secret: d.secret.clone(),
                    active: true,
                    class: em_model::DeviceClass::OffenderTag,
                })
                .await
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut n = 0;
    for r in results {
        r?;
        n += 1;
    }
    Ok(n)
}

/// Reference of the subject [`register_subjects`] creates for a device.
pub fn sim_subject_reference(device_id: &str) -> String {
    format!("SIM-{device_id}")
}

/// Register `devices` and, for each, a subject (`SIM-{device_id}`, Europe/Copenhagen) with a
/// circular curfew home zone at the device's home whose curfew is in force from
/// `now - 10 min` for `hours` (an extra-curfew exception), and assign the device to it, so
/// the scripted misbehaviours of a load run raise real alerts (the service must load the
/// orders: start it afterwards). Sets `subject_id` on the devices. Idempotent.
pub async fn register_subjects(
    store: &dyn Store,
    devices: &mut [SimDevice],
    now: chrono::DateTime<chrono::Utc>,
    hours: i64,
) -> anyhow::Result<usize> {
    use em_model::{
        BreachRules, ExceptionKind, ScheduleException, ScheduleSpec, Subject, ZoneGeometry,
        ZoneKind, ZoneSpec,
    };
    use futures::StreamExt;
    register_devices(store, devices).await?;
    let existing: HashMap<String, Subject> = store
        .list_subjects(None)
        .await?
        .into_iter()
        .map(|s| (s.reference.clone(), s))
        .collect();
    let existing = &existing;
    let from = now - chrono::Duration::minutes(10);
    let until = now + chrono::Duration::hours(hours.max(1));
    let ids: Vec<anyhow::Result<SubjectId>> = futures::stream::iter(devices.iter())
        .map(|d| async move {
            let reference = sim_subject_reference(&d.device_id);
            let prev = existing.get(&reference);
            let subject_id = store
                .upsert_subject(&Subject {
                    id: prev.map_or(0, |s| s.id),
                    reference,
                    display_name: format!("Simulated subject {}", d.device_id),
                    officer_id: None,
                    timezone: "Europe/Copenhagen".into(),
                    order_start: Some(prev.and_then(|s| s.order_start).unwrap_or(from)),
                    order_end: None,
                    rules: BreachRules {
                        buffer_m: 25.0,
                        consecutive_fixes: 3,
                        persist_secs: 30,
                        no_fix_secs: 600,
                    },
                })
                .await?;
            let zone_id = if prev.is_some() {
                store
                    .list_zones(Some(subject_id))
                    .await?
                    .into_iter()
                    .find(|z| z.is_curfew_home && z.subject_id == Some(subject_id))
                    .map_or(0, |z| z.id)
            } else {
                0
            };
            store
                .upsert_zone(&ZoneSpec {
                    id: zone_id,
                    subject_id: Some(subject_id),
                    group: None,
                    name: "Home".into(),
                    kind: ZoneKind::Inclusion,
                    geometry: ZoneGeometry::Circle {
                        center: d.home,
                        radius_m: d.home_radius_m,
                    },
                    schedule: Some(ScheduleSpec {
                        windows: Vec::new(),
                        exceptions: vec![ScheduleException {
                            kind: ExceptionKind::ExtraCurfew,
                            start: from,
                            end: until,
                            note: Some("sim: curfew for the load run".into()),
                        }],
                    }),
                    is_curfew_home: true,
                })
                .await?;
            if store.subject_for_device_at(&d.device_id, now).await? != Some(subject_id) {
                store.assign_device(&d.device_id, subject_id, now).await?;
            }
            Ok(subject_id)
        })
        .buffered(16)
        .collect()
        .await;
    for (d, id) in devices.iter_mut().zip(ids) {
        d.subject_id = Some(id?);
    }
    Ok(devices.len())
}

#[cfg(test)]
mod tests;
