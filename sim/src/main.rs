//! `em-sim`: fleet simulator and load tool for the EM service.
//!
//! Drives N simulated ankle tags against the service's GT06 and Teltonika TCP listeners and
//! its MQTT broker, waits for every acknowledgement, and reports sent/acked counts,
//! throughput and latency percentiles (send→ACK; fix→alert when the alert feed
//! `em/v1/alerts/#` is reachable on the broker). It always stops by itself.
//!
//! Examples:
//!
//! ```text
//! # Demo-sized smoke test against a local service (devices registered first):
//! em-sim --gt06 127.0.0.1:5023 --teltonika 127.0.0.1:5027 --mqtt mqtt://127.0.0.1:1883 \
//!        --devices 200 --interval 5 --duration 60 --register sqlite://em.db
//!
//! # Load test: 100,000 connections, 50,000 reports/s in total, 5 minutes, sockets spread
//! # over 20 loopback source addresses (raise `ulimit -n` above 100,000 first):
//! em-sim --gt06 127.0.0.1:5023 --teltonika 127.0.0.1:5027 --mqtt mqtt://127.0.0.1:1883 \
//!        --devices 100000 --mix gt06=40,teltonika=40,mqtt=20 --rate 50000 --duration 300 \
//!        --source-ips 127.0.0.1-127.0.0.20 --ramp-up 60 --connect-concurrency 1000 \
//!        --register postgres://postgres@127.0.0.1:5432/test --json
//! ```

use clap::Parser;
use em_sim::{
    generate_fleet, parse_source_ips, BehaviourShares, FleetSpec, LiveStats, MqttEndpoint, Pacing,
    ProtocolMix, SimConfig,
};
use indicatif::{ProgressBar, ProgressStyle};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "em-sim",
    version,
    about = "Fleet simulator and load tool for the EM service",
    long_about = "Simulates ankle tags (GT06 and Teltonika over TCP, the open EM protocol over \
MQTT): logs in, moves subjects along plausible tracks with GPS noise, plays scripted \
misbehaviours (leaving home, strap cut, battery drain, going silent), waits for every \
acknowledgement and reports sent/acked counts, throughput and latency percentiles. \
Fix→alert latency is measured when the broker carries the alert feed em/v1/alerts/#. \
The run always ends after --duration (or --max-reports, or Ctrl-C).",
    after_help = "Load test example (100,000 connections, 50,000 reports/s):\n  \
ulimit -n 262144\n  \
em-sim --gt06 127.0.0.1:5023 --teltonika 127.0.0.1:5027 --mqtt mqtt://127.0.0.1:1883 \\\n    \
--devices 100000 --mix gt06=40,teltonika=40,mqtt=20 --rate 50000 --duration 300 \\\n    \
--source-ips 127.0.0.1-127.0.0.20 --ramp-up 60 --connect-concurrency 1000 \\\n    \
--register postgres://postgres@127.0.0.1:5432/test --json"
)]
struct Args {
    /// GT06 TCP listener of the service (host:port).
    #[arg(long, value_name = "ADDR")]
    gt06: Option<String>,
    /// Teltonika TCP listener of the service (host:port).
    #[arg(long, value_name = "ADDR")]
    teltonika: Option<String>,
    /// MQTT broker for EM devices, e.g. mqtt://127.0.0.1:1883 (also used for the alert feed).
    #[arg(long, value_name = "URL")]
    mqtt: Option<String>,
    /// Broker carrying the alert feed, when different from --mqtt.
    #[arg(long, value_name = "URL")]
    alerts_mqtt: Option<String>,
    /// Username of the alert-feed subscriber (the embedded MQTT endpoint's feed user,
    /// `mqtt.broker.feed_username`).
    #[arg(long, value_name = "USER", requires = "alerts_password")]
    alerts_username: Option<String>,
    /// Password of the alert-feed subscriber (`mqtt.broker.feed_password`).
    #[arg(
        long,
        env = "EM_SIM_ALERTS_PASSWORD",
        hide_env_values = true,
        requires = "alerts_username"
    )]
    alerts_password: Option<String>,
    /// Do not subscribe to the alert feed (measure send→ACK latency only).
    #[arg(long)]
    no_alert_feed: bool,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// Protocol weights, e.g. gt06=40,teltonika=40,mqtt=20. Protocols without an address
    /// given are dropped from the mix.
    #[arg(long, default_value = "gt06=40,teltonika=40,mqtt=20")]
    mix: String,
    /// Total reports (fixes) per second of the whole fleet, evenly paced over the devices
    /// (whatever --records-per-packet is).
    #[arg(long, value_name = "FIXES_PER_SEC", conflicts_with = "interval")]
    rate: Option<f64>,
    /// Seconds between two reports of one device (default 10 unless --rate is given).
    #[arg(long, value_name = "SECS")]
    interval: Option<f64>,
    /// Stop after this many seconds (required to be > 0: load runs are always bounded).
    #[arg(long, value_name = "SECS", default_value_t = 60.0)]
    duration: f64,
    /// Stop after this many reports in total.
    #[arg(long)]
    max_reports: Option<u64>,
    /// Local source addresses to bind client sockets to, round-robin: addresses and IPv4
    /// ranges, comma separated (e.g. 127.0.0.1-127.0.0.20). Each gives ~28k ports.
    #[arg(long, value_name = "LIST")]
    source_ips: Option<String>,
    /// Seed of tracks, noise and behaviours.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Register the simulated devices in this store first (sqlite://… or postgres://…), so
    /// the service accepts them (it must load them: start or reload it afterwards).
    #[arg(long, value_name = "DB_URL")]
    register: Option<String>,
    /// With --register: also create one subject per device with a home zone under a curfew
    /// in force for --curfew-hours, assigned to the device, so misbehaviours raise alerts
    /// (restart the service afterwards so it loads the orders).
    #[arg(long, requires = "register")]
    register_subjects: bool,
    /// Hours the curfew of --register-subjects stays in force.
    #[arg(long, default_value_t = 2)]
    curfew_hours: i64,
    /// With --register: register the devices and exit without simulating.
    #[arg(long, requires = "register")]
    register_only: bool,
    /// IMEI prefix (up to 13 digits): device i gets prefix + zero-padded i + Luhn digit. Use
    /// the prefix of devices the service already knows instead of --register.
    #[arg(long, default_value = "35")]
    imei_prefix: String,
    /// Index of the first device (run several simulators on disjoint IMEIs).
    #[arg(long, default_value_t = 0)]
    first_index: u64,
    /// MQTT password of the EM devices (as registered).
    #[arg(long, env = "EM_SIM_MQTT_SECRET", hide_env_values = true)]
    mqtt_secret: Option<String>,
    /// Share of devices leaving home (curfew violation when their curfew is active).
    #[arg(long, default_value_t = 0.02)]
    share_leave_home: f64,
    /// Share of devices cutting their strap.
    #[arg(long, default_value_t = 0.01)]
    share_strap_cut: f64,
    /// Share of devices running their battery down.
    #[arg(long, default_value_t = 0.02)]
    share_battery_drain: f64,
    /// Share of devices going silent (lost communication).
    #[arg(long, default_value_t = 0.01)]
    share_go_silent: f64,
    /// Seconds after start before misbehaviours begin.
    #[arg(long, default_value_t = 20)]
    misbehave_after: u32,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Seconds over which connections are opened (default: 1 s per 2,000 devices).
    #[arg(long, value_name = "SECS")]
    ramp_up: Option<f64>,
    /// Seconds to wait for a login or report acknowledgement.
    #[arg(long, default_value_t = 10.0)]
    ack_timeout: f64,
    /// GT06: heartbeat (acknowledged) after every N locations (which are not).
    #[arg(long, default_value_t = 1)]
    gt06_heartbeat_every: u32,
    /// Reports a device accumulates and sends together, as real tags do: N records in one
    /// Teltonika AVL packet (ACK = N), a JSON array of N reports per EM publication (at most
    /// 100), N GT06 location frames in one write. --rate/--interval still count reports;
    /// a device sends every N intervals. Alerting reports are sent at once.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=255))]
    records_per_packet: u16,
    /// Allow targets that are not loopback addresses with more than 1,000 devices.
    #[arg(long)]
    allow_remote: bool,
    /// Print the final report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn resolve(what: &str, s: &str) -> anyhow::Result<SocketAddr> {
    s.to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("--{what} {s:?}: {e}"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("--{what} {s:?}: no address"))
}

fn secs(what: &str, v: f64) -> anyhow::Result<Duration> {
    if !v.is_finite() || v <= 0.0 {
        anyhow::bail!("--{what} must be a positive number of seconds, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

/// Soft limit of open files, from /proc (Linux), to warn before running out.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

async fn build_config(args: &Args) -> anyhow::Result<SimConfig> {
    let gt06 = args
        .gt06
        .as_deref()
        .map(|s| resolve("gt06", s))
        .transpose()?;
    let teltonika = args
        .teltonika
        .as_deref()
        .map(|s| resolve("teltonika", s))
        .transpose()?;
    let mqtt: Option<MqttEndpoint> = args.mqtt.as_deref().map(str::parse).transpose()?;
    if gt06.is_none() && teltonika.is_none() && mqtt.is_none() {
        anyhow::bail!("give at least one of --gt06, --teltonika, --mqtt");
    }
    if args.devices == 0 {
        anyhow::bail!("--devices must be at least 1");
    }
    let duration = secs("duration", args.duration)?;
    let mut mix: ProtocolMix = args.mix.parse()?;
    if gt06.is_none() {
        mix.gt06 = 0;
    }
    if teltonika.is_none() {
        mix.teltonika = 0;
    }
    if mqtt.is_none() {
        mix.mqtt = 0;
    }
    if mix.total() == 0 {
        anyhow::bail!(
            "--mix {:?} has no weight for any protocol with an address",
            args.mix
        );
    }
    if !args.allow_remote && args.devices > 1000 {
        let remote = gt06
            .into_iter()
            .chain(teltonika)
            .any(|a| !a.ip().is_loopback())
            || mqtt.as_ref().is_some_and(|m| {
                m.host != "localhost"
                    && m.host
                        .parse::<std::net::IpAddr>()
                        .map_or(true, |ip| !ip.is_loopback())
            });
        if remote {
            anyhow::bail!(
                "refusing to load a non-loopback target with {} devices without --allow-remote",
                args.devices
            );
        }
    }
    let spec = FleetSpec {
        devices: args.devices,
        mix,
        imei_prefix: args.imei_prefix.clone(),
        first_index: args.first_index,
        shares: BehaviourShares {
            leave_home: args.share_leave_home,
            strap_cut: args.share_strap_cut,
            battery_drain: args.share_battery_drain,
            go_silent: args.share_go_silent,
            at_home: 0.5,
        },
        mqtt_secret: args.mqtt_secret.clone(),
        seed: args.seed,
        misbehave_after_secs: args.misbehave_after,
        ..FleetSpec::default()
    };
    let mut devices = generate_fleet(&spec)?;

    if let Some(url) = &args.register {
        let store = em_store::connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("--register: {e}"))?;
        if args.register_subjects {
            let n = em_sim::register_subjects(
                store.as_ref(),
                &mut devices,
                chrono::Utc::now(),
                args.curfew_hours,
            )
            .await?;
            eprintln!(
                "registered {n} devices with subjects and curfew homes in the {} store",
                store.backend()
            );
        } else {
            let n = em_sim::register_devices(store.as_ref(), &devices).await?;
            eprintln!("registered {n} devices in the {} store", store.backend());
        }
    }

    let mut cfg = SimConfig::new(devices);
    cfg.gt06 = gt06;
    cfg.teltonika = teltonika;
    cfg.alerts_mqtt = if args.no_alert_feed {
        None
    } else {
        match &args.alerts_mqtt {
            Some(s) => Some(s.parse()?),
            None => mqtt.clone(),
        }
    };
    cfg.alerts_mqtt_login = args
        .alerts_username
        .clone()
        .zip(args.alerts_password.clone());
    cfg.mqtt = mqtt;
    cfg.pacing = match (args.rate, args.interval) {
        (Some(r), _) => Pacing::TotalRate(r),
        (None, Some(i)) => Pacing::Interval(secs("interval", i)?),
        (None, None) => Pacing::Interval(Duration::from_secs(10)),
    };
    cfg.duration = Some(duration);
    cfg.max_reports = args.max_reports;
    if let Some(s) = &args.source_ips {
        cfg.source_ips = parse_source_ips(s)?;
    }
    cfg.seed = args.seed;
    cfg.connect_concurrency = args.connect_concurrency;
    if let Some(r) = args.ramp_up {
        cfg.ramp_up = if r == 0.0 {
            Duration::ZERO
        } else {
            secs("ramp-up", r)?
        };
    }
    cfg.ack_timeout = secs("ack-timeout", args.ack_timeout)?;
    cfg.gt06_heartbeat_every = args.gt06_heartbeat_every.max(1);
    cfg.records_per_packet = usize::from(args.records_per_packet);
    cfg.validate()?;
    Ok(cfg)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = build_config(&args).await?;
    if args.register_only {
        return Ok(());
    }

    let tcp_devices = cfg
        .devices
        .iter()
        .filter(|d| d.protocol != em_model::Protocol::Em)
        .count() as u64;
    if let Some(limit) = open_files_limit() {
        let need = cfg.devices.len() as u64 + 64;
        if limit < need {
            eprintln!(
                "warning: open-file limit is {limit} but {need} descriptors are needed; \
                 run `ulimit -n {}` first",
                need.next_power_of_two()
            );
        }
    }
    if cfg.source_ips.len() <= 1 && tcp_devices > 25_000 {
        eprintln!(
            "warning: {tcp_devices} TCP connections from one source address may exhaust its \
             ephemeral ports; use --source-ips 127.0.0.1-127.0.0.20"
        );
    }

    let shutdown = CancellationToken::new();
    {
        let s = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                s.cancel();
            }
        });
    }
    let stats = Arc::new(LiveStats::default());
    let duration = cfg.duration.unwrap_or(Duration::from_secs(60));
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::new(duration.as_secs().max(1));
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len}s {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar
    };
    let ticker = {
        let stats = stats.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            let start = std::time::Instant::now();
            let mut last_sent = 0u64;
            let mut last_t = start;
            let mut iv = tokio::time::interval(Duration::from_millis(500));
            loop {
                iv.tick().await;
                let now = std::time::Instant::now();
                let sent = stats.reports_sent.load(Ordering::Relaxed);
                let rate = (sent - last_sent) as f64 / now.duration_since(last_t).as_secs_f64();
                last_sent = sent;
                last_t = now;
                bar.set_position(now.duration_since(start).as_secs());
                bar.set_message(format!(
                    "conn {} | sent {} acked {} | {:.0}/s | fail {} | alerts {}",
                    stats.connected_now.load(Ordering::Relaxed),
                    sent,
                    stats.reports_acked.load(Ordering::Relaxed),
                    rate,
                    stats.connect_failures.load(Ordering::Relaxed)
                        + stats.login_rejected.load(Ordering::Relaxed)
                        + stats.disconnects.load(Ordering::Relaxed),
                    stats.alerts_received.load(Ordering::Relaxed),
                ));
            }
        })
    };
    let report = em_sim::run_with_stats(cfg, shutdown, stats).await?;
    ticker.abort();
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{report}");
    }
    Ok(())
}
