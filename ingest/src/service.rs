//! Wiring of the running service: store, registry, zone index, alert service, pipeline,
//! listeners, MQTT, dashboard, background jobs, the embedded MQTT endpoint/demo/simulator — and the
//! orderly shutdown (stop accepting → let connections finish → drain the pipeline queues →
//! stop background jobs → close the store).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::Utc;
use em_alerts::{run_escalation, AlertService, OutboxWorker};
use em_dashboard::AppState;
use em_geofence::{SharedZoneIndex, ZoneIndex};
use em_model::Change;
use em_store::{run_leased, ChangeFeed, ChangeStream, Store};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::alert_lanes::{AlertLanes, LaneTasks};
use crate::config::{redact_url, Config};
use crate::evaluate::{EvalContext, Evaluator, SubjectCache};
use crate::pipeline::{Pipeline, Workers};
use crate::registry::Registry;
use crate::tcp::{Gt06, TcpServer, TcpSettings, Teltonika, H02};

/// Addresses the service actually listens on.
#[derive(Debug, Clone, Default)]
pub struct BoundAddrs {
    pub gt06: Option<SocketAddr>,
    pub teltonika: Option<SocketAddr>,
    /// Teltonika over UDP.
    pub teltonika_udp: Option<SocketAddr>,
    pub h02: Option<SocketAddr>,
    pub osmand: Option<SocketAddr>,
    /// The embedded MQTT endpoint.
    pub mqtt: Option<SocketAddr>,
    /// The dashboard (HTTP or HTTPS).
    pub dashboard: Option<SocketAddr>,
    /// Prometheus `/metrics` (served by the binary; the address it bound).
    pub metrics: Option<SocketAddr>,
}

/// A started service; [`Service::wait`] runs it until the shutdown token is cancelled.
pub struct Service {
    pub addrs: BoundAddrs,
    pub store: Arc<dyn Store>,
    pub alerts: Arc<AlertService>,
    shutdown: CancellationToken,
    background: CancellationToken,
    listeners_tracker: TaskTracker,
    connections: TaskTracker,
    background_tasks: Vec<JoinHandle<()>>,
    pipeline: Option<Pipeline>,
    workers: Option<Workers>,
    alert_lanes: Option<LaneTasks>,
    grace: Duration,
}

/// Opens the store named by the configuration.
pub async fn open_store(cfg: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let url = cfg.database.url.as_str();
    if let Some(schema) = cfg.database.schema.as_deref() {
        let s = em_store::PgStore::connect_in_schema(url, schema)
            .await
            .with_context(|| format!("connecting to {} (schema {schema})", redact_url(url)))?;
        return Ok(Arc::new(s));
    }
    let url = sqlite_url(url)?;
    em_store::connect(&url)
        .await
        .with_context(|| format!("connecting to {}", redact_url(&url)))
}

/// For a SQLite file URL: creates the parent directory and asks for the file to be created.
fn sqlite_url(url: &str) -> anyhow::Result<String> {
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Ok(url.to_owned());
    };
    if rest.contains(":memory:") || rest.contains('?') {
        return Ok(url.to_owned());
    }
    let path = rest.trim_start_matches("//");
    if let Some(parent) = std::path::Path::new(path).parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating the database directory {}", parent.display()))?;
        }
    }
    Ok(format!("{url}?mode=rwc"))
}

/// Zone-group memberships per subject, as applied to the index.
pub type GroupBindings = HashMap<em_model::SubjectId, Vec<String>>;

/// Loads zones, group bindings and subjects into the shared index and cache; returns the
/// bindings applied.
pub async fn load_orders(
    store: &dyn Store,
    zones: &SharedZoneIndex,
    subjects: &SubjectCache,
) -> anyhow::Result<GroupBindings> {
    let all_subjects = store.list_subjects(None).await?;
    let all_zones = store.list_zones(None).await?;
    let mut bindings = GroupBindings::new();
    for s in &all_subjects {
        let groups = store.subject_zone_groups(s.id).await?;
        if !groups.is_empty() {
            bindings.insert(s.id, groups);
        }
    }
    {
        let mut idx = zones.write();
        // Zones deleted since an earlier load.
        let keep: std::collections::HashSet<_> = all_zones.iter().map(|z| z.id).collect();
        let stale: Vec<_> = idx
            .zones()
            .map(|z| z.id)
            .filter(|id| !keep.contains(id))
            .collect();
        for id in stale {
            idx.remove(id);
        }
        for z in &all_zones {
            if let Err(e) = idx.upsert(z) {
                tracing::error!(zone = z.id, error = %e, "zone rejected by the geofence engine; not enforced");
            }
        }
        for (s, groups) in &bindings {
            for g in groups {
                idx.bind_group(*s, g);
            }
        }
    }
    tracing::info!(
        zones = all_zones.len(),
        subjects = all_subjects.len(),
        "orders loaded"
    );
    subjects.replace_all(all_subjects);
    Ok(bindings)
}

/// Applies a subject's new zone groups (from the change log) to the index.
fn rebind_subject(
    zones: &SharedZoneIndex,
    bindings: &mut GroupBindings,
    subject: em_model::SubjectId,
    groups: Vec<String>,
) {
    let old = bindings.remove(&subject).unwrap_or_default();
    {
        let mut idx = zones.write();
        for g in old.iter().filter(|g| !groups.contains(g)) {
            idx.unbind_group(subject, g);
        }
        for g in groups.iter().filter(|g| !old.contains(g)) {
            idx.bind_group(subject, g);
        }
    }
    if !groups.is_empty() {
        bindings.insert(subject, groups);
    }
}

/// Lease of the escalation job.
pub const ESCALATION_LEASE: &str = "alert-escalation";
/// Lease of the OMS outbox delivery.
pub const OMS_LEASE: &str = "oms-outbox";
/// Lease of the retention job.
pub const RETENTION_LEASE: &str = "retention";

impl Service {
    /// Starts everything the configuration asks for. Errors (port taken, database
    /// unreachable, …) are returned before anything is left running.
    pub async fn start(cfg: Config, shutdown: CancellationToken) -> anyhow::Result<Service> {
        let store = open_store(&cfg).await?;
        tracing::info!(backend = store.backend(), url = %redact_url(&cfg.database.url), "store ready");

        let demo_plan = if cfg.demo.enabled {
            let plan = em_sim::demo::seed(&*store, &em_sim::demo::DemoOptions::default())
                .await
                .context("seeding the demo data")?;
            println!("{}", plan.summary());
            Some(plan)
        } else {
            None
        };

        let background = CancellationToken::new();
        // The change log is read from here on; what the loads below read may appear again in
        // it, and applying it twice is harmless. Nothing committed after this point is missed.
        let changes = ChangeFeed::start(store.clone(), background.clone())
            .await
            .context("reading the change log")?;
        let orders_from = changes.position();
        let registry = Registry::load(store.clone()).await?;
        let zones = SharedZoneIndex::new(ZoneIndex::new());
        let subjects = SubjectCache::default();
        let bindings = load_orders(&*store, &zones, &subjects).await?;
        let last_contacts: HashMap<_, _> = store
            .latest_states(None)
            .await?
            .into_iter()
            .map(|l| (l.device_id, l.last_contact))
            .collect();

        let alerts = Arc::new(
            AlertService::new(store.clone(), cfg.alerts.clone())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let (lanes, lane_tasks) = AlertLanes::start(alerts.clone(), cfg.pipeline.alert_lanes);
        let ctx = EvalContext {
            store: store.clone(),
            registry: registry.clone(),
            zones: zones.clone(),
            subjects: subjects.clone(),
            alerts: lanes,
            health: cfg.health.clone(),
            last_contacts: Arc::new(last_contacts),
        };
        let (pipeline, workers) =
            Pipeline::start(&cfg.pipeline, store.clone(), registry.clone(), |links| {
                Box::new(Evaluator::new(ctx.clone(), links))
            });
        tracing::info!(workers = pipeline.shards(), "pipeline started");

        let listeners_tracker = TaskTracker::new();
        let connections = TaskTracker::new();
        let mut bg: Vec<JoinHandle<()>> = Vec::new();

        // Bind every listener first, so a taken port fails the start cleanly.
        let l = &cfg.listeners;
        let settings = TcpSettings {
            idle_timeout: Duration::from_secs(l.idle_timeout_secs),
            login_timeout: Duration::from_secs(l.login_timeout_secs),
            max_frame_bytes: l.max_frame_bytes,
            max_connections_per_ip: l.max_connections_per_ip,
            max_connections: l.max_connections,
            allow: Default::default(),
        };
        let with_allow = |access: &crate::config::ListenerAccess| TcpSettings {
            allow: access.allow.clone(),
            ..settings.clone()
        };
        // With ephemeral ports every enabled listener binds port 0 (the OS picks one).
        let addr = |port: u16| SocketAddr::new(l.bind, if l.ephemeral_ports { 0 } else { port });
        let reuse = l.reuse_port;
        let gt06 = bind_opt::<Gt06>(l.gt06_port, addr(l.gt06_port), reuse).await?;
        let telt = bind_opt::<Teltonika>(l.teltonika_port, addr(l.teltonika_port), reuse).await?;
        let h02 = bind_opt::<H02>(l.h02_port, addr(l.h02_port), reuse).await?;
        let telt_udp = if l.teltonika_udp_port > 0 {
            let a = addr(l.teltonika_udp_port);
            Some(
                tokio::net::UdpSocket::bind(a)
                    .await
                    .with_context(|| format!("binding the Teltonika UDP listener to {a}"))?,
            )
        } else {
            None
        };
        let osmand = if l.osmand_port > 0 {
            Some(
                tokio::net::TcpListener::bind(addr(l.osmand_port))
                    .await
                    .with_context(|| {
                        format!("binding the OsmAnd listener to {}", addr(l.osmand_port))
                    })?,
            )
        } else {
            None
        };
        let mut dashboard_cfg = cfg.dashboard.clone();
        if l.ephemeral_ports {
            dashboard_cfg.bind.set_port(0);
        }
        let dashboard_listener = em_dashboard::bind(&dashboard_cfg)?;
        let mqtt_endpoint = if cfg.mqtt.broker.enabled {
            let mut bind = cfg.mqtt.broker.bind;
            if l.ephemeral_ports {
                bind.set_port(0);
            }
            Some(
                crate::mqtt_server::MqttEndpoint::bind(bind)
                    .await
                    .with_context(|| format!("binding the embedded MQTT endpoint to {bind}"))?,
            )
        } else {
            None
        };
        // The feed user of the embedded endpoint; the demo makes one up when none is set.
        let feed = match (&cfg.mqtt.broker.feed_password, &demo_plan) {
            (Some(pw), _) => Some(pw.clone()),
            (None, Some(_)) if cfg.mqtt.broker.enabled => Some(random_password(20)),
            (None, _) => None,
        }
        .map(|password| crate::mqtt_server::FeedLogin {
            username: cfg.mqtt.broker.feed_username.clone(),
            password,
        });

        let mut addrs = BoundAddrs::default();
        if let Some(s) = gt06 {
            addrs.gt06 = s.local_addr().ok();
            listeners_tracker.spawn(s.serve(
                with_allow(&l.gt06),
                pipeline.clone(),
                registry.clone(),
                connections.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(s) = telt {
            addrs.teltonika = s.local_addr().ok();
            listeners_tracker.spawn(s.serve(
                with_allow(&l.teltonika),
                pipeline.clone(),
                registry.clone(),
                connections.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(s) = h02 {
            addrs.h02 = s.local_addr().ok();
            listeners_tracker.spawn(s.serve(
                with_allow(&l.h02),
                pipeline.clone(),
                registry.clone(),
                connections.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(sock) = telt_udp {
            addrs.teltonika_udp = sock.local_addr().ok();
            listeners_tracker.spawn(crate::udp::serve(
                sock,
                l.teltonika.allow.clone(),
                pipeline.clone(),
                registry.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(lst) = osmand {
            addrs.osmand = lst.local_addr().ok();
            let (p, r, s) = (pipeline.clone(), registry.clone(), shutdown.clone());
            let allow = l.osmand.allow.clone();
            // The same limits as the other device listeners; the headers of a report must
            // arrive within the login timeout.
            let limits = em_dashboard::serve::HttpLimits {
                max_connections_per_ip: l.max_connections_per_ip,
                max_connections: l.max_connections,
                header_timeout: Duration::from_secs(l.login_timeout_secs.max(1)),
            };
            listeners_tracker.spawn(async move {
                if let Err(e) = crate::osmand::serve(lst, allow, limits, p, r, s).await {
                    tracing::error!(error = %e, "OsmAnd listener failed");
                }
            });
        }
        if let Some(ep) = mqtt_endpoint {
            addrs.mqtt = ep.local_addr().ok();
            let settings = crate::mqtt_server::EndpointSettings {
                login_timeout: Duration::from_secs(l.login_timeout_secs),
                idle_timeout: Duration::from_secs(l.idle_timeout_secs),
                max_connections_per_ip: l.max_connections_per_ip,
                max_connections: l.max_connections,
                max_payload_bytes: cfg.mqtt.max_payload_bytes,
                feed: feed.clone(),
            };
            if feed.is_none() {
                tracing::info!("embedded MQTT endpoint: no feed user (mqtt.broker.feed_password unset); devices only");
            }
            bg.push(tokio::spawn(crate::mqtt_server::forward_alerts(
                ep.router(),
                changes.clone(),
                background.clone(),
            )));
            listeners_tracker.spawn(ep.serve(
                settings,
                pipeline.clone(),
                registry.clone(),
                connections.clone(),
                shutdown.clone(),
            ));
        }
        if cfg.mqtt.enabled || cfg.mqtt.publish_alerts {
            let (mcfg, p, r, a, s) = (
                cfg.mqtt.clone(),
                pipeline.clone(),
                registry.clone(),
                crate::mqtt::AlertFeedSource {
                    store: store.clone(),
                    feed: changes.clone(),
                },
                shutdown.clone(),
            );
            let subscribe = cfg.mqtt.enabled;
            listeners_tracker.spawn(async move {
                let res = if subscribe {
                    crate::mqtt::run(mcfg, p, r, Some(a), s).await
                } else {
                    crate::mqtt::run_publisher_only(mcfg, a, s).await
                };
                if let Err(e) = res {
                    tracing::error!(error = %e, "MQTT client failed");
                }
            });
        }

        addrs.dashboard = dashboard_listener.local_addr().ok();
        addrs.metrics = cfg.metrics.enabled.then_some(cfg.metrics.bind);
        tracing::info!(addrs = ?addrs, "listening");
        if let Some(path) = &l.addr_file {
            write_addr_file(path, &addrs)
                .with_context(|| format!("writing the bound addresses to {}", path.display()))?;
        }
        // Orders edited on any instance reach this one's geofence engine and registry
        // through the change log.
        bg.push(tokio::spawn(apply_order_changes(
            changes.follow(orders_from),
            bindings,
            zones.clone(),
            subjects.clone(),
            registry.clone(),
            background.clone(),
        )));
        {
            let state = AppState::new(store.clone(), alerts.clone()).with_feed(changes.clone());
            let b = background.clone();
            bg.push(tokio::spawn(async move {
                if let Err(e) =
                    em_dashboard::serve_on(dashboard_listener, dashboard_cfg, state, b).await
                {
                    tracing::error!(error = %e, "dashboard failed");
                }
            }));
        }
        // Single-runner jobs: each runs on exactly one instance at a time, under its lease.
        let holder = em_store::lease::holder_id();
        {
            let (a, every) = (alerts.clone(), cfg.alerts.escalation.check_interval());
            bg.push(tokio::spawn(run_leased(
                store.clone(),
                ESCALATION_LEASE,
                holder.clone(),
                background.clone(),
                move |token| run_escalation(a.clone(), every, token),
            )));
        }
        if cfg.alerts.oms.enabled {
            let worker = Arc::new(
                OutboxWorker::new(store.clone(), cfg.alerts.oms.clone())
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            );
            bg.push(tokio::spawn(run_leased(
                store.clone(),
                OMS_LEASE,
                holder.clone(),
                background.clone(),
                move |token| worker.clone().run_shared(token),
            )));
        }
        bg.push(tokio::spawn(refresh_registry(
            registry.clone(),
            Duration::from_secs(cfg.database.registry_refresh_secs),
            background.clone(),
        )));
        if cfg.retention.enabled {
            let (st, rc) = (store.clone(), cfg.retention.clone());
            bg.push(tokio::spawn(run_leased(
                store.clone(),
                RETENTION_LEASE,
                holder.clone(),
                background.clone(),
                move |token| run_retention(st.clone(), rc.clone(), token),
            )));
        }

        if let (Some(plan), true) = (&demo_plan, cfg.demo.simulate) {
            let mut sim = em_sim::SimConfig::from_demo(plan);
            sim.gt06 = addrs.gt06.map(loopback);
            sim.teltonika = addrs.teltonika.map(loopback);
            if let Some(a) = addrs.mqtt.map(loopback) {
                // EM devices and the alert feed on the embedded endpoint.
                let ep = em_sim::MqttEndpoint {
                    host: a.ip().to_string(),
                    port: a.port(),
                };
                sim.mqtt = Some(ep.clone());
                if let Some(f) = &feed {
                    sim.alerts_mqtt = Some(ep);
                    sim.alerts_mqtt_login = Some((f.username.clone(), f.password.clone()));
                }
            } else if cfg.mqtt.enabled {
                if let Ok(u) = crate::config::MqttUrl::parse(&cfg.mqtt.url) {
                    sim.mqtt = Some(em_sim::MqttEndpoint {
                        host: u.host,
                        port: u.port,
                    });
                    // The alert feed is published on the same broker: the demo simulator
                    // then measures fix→alert latency too.
                    if cfg.mqtt.publish_alerts {
                        sim.alerts_mqtt = sim.mqtt.clone();
                    }
                }
            }
            let s = shutdown.clone();
            listeners_tracker.spawn(async move {
                match em_sim::run(sim, s).await {
                    Ok(report) => tracing::info!(?report, "demo simulator stopped"),
                    Err(e) => tracing::error!(error = %e, "demo simulator failed"),
                }
            });
        }
        if let (true, Some(a), Some(f)) = (cfg.demo.enabled, addrs.mqtt, &feed) {
            println!(
                "MQTT alert feed: mqtt://{a} topic em/v1/alerts/#  user {}  password {}",
                f.username, f.password
            );
        }
        if cfg.demo.enabled {
            println!(
                "EM is running: dashboard http://{}  (Ctrl-C to stop)",
                addrs.dashboard.map(loopback).unwrap_or(cfg.dashboard.bind)
            );
        }

        Ok(Service {
            addrs,
            store,
            alerts,
            shutdown,
            background,
            listeners_tracker,
            connections,
            background_tasks: bg,
            pipeline: Some(pipeline),
            workers: Some(workers),
            alert_lanes: Some(lane_tasks),
            grace: Duration::from_secs(cfg.listeners.shutdown_grace_secs),
        })
    }

    /// Runs until the shutdown token is cancelled, then stops in order.
    pub async fn wait(mut self) {
        self.shutdown.cancelled().await;
        tracing::info!("shutting down: no new connections");
        self.listeners_tracker.close();
        self.connections.close();
        let drained = async {
            self.listeners_tracker.wait().await;
            self.connections.wait().await;
        };
        if tokio::time::timeout(self.grace + Duration::from_secs(5), drained)
            .await
            .is_err()
        {
            tracing::warn!("some connections did not finish within the grace period");
        }
        // Every Pipeline handle of the listeners is gone now (or abandoned): drain the queues.
        drop(self.pipeline.take());
        if let Some(w) = self.workers.take() {
            tracing::info!("draining the pipeline");
            if tokio::time::timeout(Duration::from_secs(30), w.join())
                .await
                .is_err()
            {
                tracing::error!("pipeline did not drain within 30 s");
            }
        }
        // The evaluators went with the workers: the alert lanes finish their queues and stop.
        if let Some(l) = self.alert_lanes.take() {
            if tokio::time::timeout(Duration::from_secs(30), l.join())
                .await
                .is_err()
            {
                tracing::error!("alert signals not all handled within 30 s");
            }
        }
        self.background.cancel();
        for h in self.background_tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
        tracing::info!("stopped");
    }
}

/// Writes the bound addresses as JSON, atomically (temporary file, then rename).
fn write_addr_file(path: &std::path::Path, a: &BoundAddrs) -> std::io::Result<()> {
    let show = |x: Option<SocketAddr>| x.map(|a| loopback(a).to_string());
    let json = serde_json::json!({
        "gt06": show(a.gt06),
        "teltonika": show(a.teltonika),
        "teltonika_udp": show(a.teltonika_udp),
        "h02": show(a.h02),
        "osmand": show(a.osmand),
        "mqtt": show(a.mqtt),
        "dashboard": show(a.dashboard),
        "metrics": show(a.metrics),
    });
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&json).unwrap_or_default())?;
    std::fs::rename(tmp, path)
}

fn random_password(len: usize) -> String {
    use rand::{distributions::Alphanumeric, Rng};
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(len)
        .map(char::from)
        .collect()
}

fn loopback(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], a.port()))
    } else {
        a
    }
}

async fn bind_opt<P: crate::tcp::TcpProtocol>(
    configured_port: u16,
    addr: SocketAddr,
    reuse_port: bool,
) -> anyhow::Result<Option<TcpServer<P>>> {
    if configured_port == 0 {
        return Ok(None);
    }
    let s = TcpServer::<P>::bind_with(addr, reuse_port)
        .await
        .with_context(|| format!("binding the {} listener to {addr}", P::PROTOCOL))?;
    Ok(Some(s))
}

/// Applies order and registry changes from the change log (made on any instance) to this
/// instance's geofence index, subject cache and device registry, until `shutdown`.
async fn apply_order_changes(
    mut changes: ChangeStream,
    mut bindings: GroupBindings,
    zones: SharedZoneIndex,
    subjects: SubjectCache,
    registry: Registry,
    shutdown: CancellationToken,
) {
    loop {
        let entry = tokio::select! {
            _ = shutdown.cancelled() => break,
            c = changes.next() => c,
        };
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "reading order changes failed; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        metrics::gauge!("em_change_log_applied_id").set(entry.id as f64);
        match entry.change {
            Change::Zone { zone } => {
                let res = zones.write().upsert(&zone);
                match res {
                    Ok(()) => tracing::info!(zone = zone.id, change = entry.id, "zone updated"),
                    Err(e) => {
                        tracing::error!(zone = zone.id, error = %e, "zone rejected by the geofence engine")
                    }
                }
            }
            Change::ZoneDeleted { zone_id, .. } => {
                zones.write().remove(zone_id);
                tracing::info!(zone = zone_id, change = entry.id, "zone removed");
            }
            Change::Subject { subject } => {
                tracing::info!(subject = subject.id, change = entry.id, "subject updated");
                subjects.insert(subject);
            }
            Change::SubjectZoneGroups { subject_id, groups } => {
                rebind_subject(&zones, &mut bindings, subject_id, groups);
            }
            Change::Device { device_id } => {
                // Rare (an admin action): re-read the whole registry rather than patch it.
                match registry.refresh().await {
                    Ok(()) => {
                        tracing::info!(device = %device_id, change = entry.id, "device registry reloaded")
                    }
                    Err(e) => tracing::error!(device = %device_id, error = %e,
                        "reloading the device registry failed; the periodic refresh will retry"),
                }
            }
            Change::Alert { .. } => {}
        }
    }
}

async fn refresh_registry(registry: Registry, every: Duration, shutdown: CancellationToken) {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = t.tick() => {}
        }
        if let Err(e) = registry.refresh().await {
            tracing::warn!(error = %e, "registry refresh failed; keeping the cached registry");
        }
    }
}

async fn run_retention(
    store: Arc<dyn Store>,
    cfg: crate::config::RetentionConfig,
    shutdown: CancellationToken,
) {
    let mut t = tokio::time::interval(Duration::from_secs(cfg.interval_secs));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = t.tick() => {}
        }
        let now = Utc::now();
        let days = |d: u32| now - chrono::Duration::days(i64::from(d));
        match store
            .apply_retention(
                days(cfg.positions_days),
                cfg.alerts_days.map(days),
                cfg.audit_days.map(days),
            )
            .await
        {
            Ok(r) => tracing::info!(
                positions = r.positions_deleted,
                alerts = r.alerts_deleted,
                audit = r.audit_deleted,
                "retention applied"
            ),
            Err(e) => tracing::error!(error = %e, "retention failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_get_create_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/em.db");
        let url = format!("sqlite://{}", p.display());
        assert_eq!(sqlite_url(&url).unwrap(), format!("{url}?mode=rwc"));
        assert!(p.parent().unwrap().is_dir());
        assert_eq!(sqlite_url("sqlite::memory:").unwrap(), "sqlite::memory:");
        assert_eq!(sqlite_url("postgres://h/db").unwrap(), "postgres://h/db");
    }
}
