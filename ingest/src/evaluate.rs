//! Post-storage evaluation in each pipeline worker: geofences and curfews (one
//! [`SubjectMonitor`] per subject, against the shared [`SharedZoneIndex`]), dynamic zones
//! (victim protection: another device's position moves a zone), device health, and the
//! resulting alert signals handed to the [`AlertService`].
//!
//! Every subject's state lives in the worker that owns its CURRENT device (devices are
//! sharded by id). When a victim's device moves, the subjects whose dynamic zones follow it
//! are re-evaluated in their own workers through [`Control`] messages.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use em_alerts::{signals_from_compliance, AlertService, Phase, Signal};
use em_geofence::{ComplianceEvent, SharedZoneIndex, SubjectMonitor};
use em_model::{DeviceId, Subject, SubjectId};
use em_store::{Store, StoredRecord};

use crate::health::{DeviceHealth, HealthConfig, HealthPhase, HealthSignal};
use crate::metrics as m;
use crate::pipeline::{Control, ShardLinks, ShardProcessor};
use crate::registry::Registry;

/// Subjects by id, shared by the workers and the order-change task.
#[derive(Clone, Default)]
pub struct SubjectCache(Arc<RwLock<HashMap<SubjectId, Subject>>>);

impl SubjectCache {
    pub fn get(&self, id: SubjectId) -> Option<Subject> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn insert(&self, s: Subject) {
        self.0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(s.id, s);
    }

    pub fn replace_all(&self, subjects: Vec<Subject>) {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        g.clear();
        g.extend(subjects.into_iter().map(|s| (s.id, s)));
    }
}

/// What every worker's evaluator shares.
#[derive(Clone)]
pub struct EvalContext {
    pub store: Arc<dyn Store>,
    pub registry: Registry,
    pub zones: SharedZoneIndex,
    pub subjects: SubjectCache,
    pub alerts: Arc<AlertService>,
    pub health: HealthConfig,
    /// Last contact per device known at start-up (so silence across a restart is noticed).
    pub last_contacts: Arc<HashMap<DeviceId, DateTime<Utc>>>,
}

/// The [`ShardProcessor`] of the running service.
pub struct Evaluator {
    ctx: EvalContext,
    links: ShardLinks,
    monitors: HashMap<SubjectId, SubjectMonitor>,
    /// Time zone each monitor was built / last updated with.
    monitor_tz: HashMap<SubjectId, String>,
    health: HashMap<DeviceId, DeviceHealth>,
}

impl Evaluator {
    pub fn new(ctx: EvalContext, links: ShardLinks) -> Self {
        let mut e = Evaluator {
            ctx,
            links,
            monitors: HashMap::new(),
            monitor_tz: HashMap::new(),
            health: HashMap::new(),
        };
        e.adopt_assignments();
        e
    }

    /// Creates state for the subjects/devices currently assigned to devices of this worker
    /// and drops state of subjects whose device moved elsewhere.
    fn adopt_assignments(&mut self) {
        let assignments = self.ctx.registry.current_assignments();
        let mut local_subjects = std::collections::HashSet::new();
        for a in &assignments {
            if !self.links.is_local(&a.device_id) {
                continue;
            }
            local_subjects.insert(a.subject_id);
            if !self.health.contains_key(&a.device_id) {
                let last = self
                    .ctx
                    .last_contacts
                    .get(&a.device_id)
                    .copied()
                    .map_or(a.from, |t| t.max(a.from));
                self.health
                    .insert(a.device_id.clone(), DeviceHealth::with_last_contact(last));
            }
            if !self.monitors.contains_key(&a.subject_id) {
                if let Some(s) = self.ctx.subjects.get(a.subject_id) {
                    self.ensure_monitor(&s);
                }
            }
        }
        self.monitors.retain(|id, _| local_subjects.contains(id));
        self.monitor_tz.retain(|id, _| local_subjects.contains(id));
        // Devices no longer assigned to anyone: stop their timers (no subject to alert).
        let assigned: std::collections::HashSet<&str> =
            assignments.iter().map(|a| a.device_id.as_str()).collect();
        self.health.retain(|d, _| assigned.contains(d.as_str()));
    }

    fn ensure_monitor(&mut self, subject: &Subject) -> bool {
        if let Some(mon) = self.monitors.get_mut(&subject.id) {
            if self.monitor_tz.get(&subject.id) != Some(&subject.timezone) {
                if let Err(e) = mon.set_timezone(&subject.timezone) {
                    tracing::error!(subject = subject.id, error = %e, "subject time zone rejected; keeping the previous one");
                }
                self.monitor_tz.insert(subject.id, subject.timezone.clone());
            }
            return true;
        }
        match SubjectMonitor::new(subject) {
            Ok(mon) => {
                self.monitors.insert(subject.id, mon);
                self.monitor_tz.insert(subject.id, subject.timezone.clone());
                true
            }
            Err(e) => {
                tracing::error!(subject = subject.id, error = %e, "cannot monitor subject (invalid time zone?)");
                false
            }
        }
    }

    async fn subject(&self, id: SubjectId) -> Option<Subject> {
        if let Some(s) = self.ctx.subjects.get(id) {
            return Some(s);
        }
        match self.ctx.store.get_subject(id).await {
            Ok(Some(s)) => {
                self.ctx.subjects.insert(s.clone());
                Some(s)
            }
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(subject = id, error = %e, "subject look-up failed");
                None
            }
        }
    }

    async fn emit(&self, signal: Signal) {
        m::alert_signal(signal.kind.as_str(), phase_str(signal.phase));
        if let Err(e) = self.ctx.alerts.handle(signal.clone()).await {
            tracing::error!(subject = signal.subject_id, kind = signal.kind.as_str(), error = %e,
                "alert handling failed");
        }
    }

    async fn emit_compliance(&self, events: Vec<ComplianceEvent>, device: Option<&str>) {
        for ev in events {
            tracing::info!(subject = ev.subject_id, zone = ev.zone_id, kind = ?ev.kind, "compliance event");
            for mut s in signals_from_compliance(&ev) {
                if s.device_id.is_none() {
                    s.device_id = device.map(str::to_owned);
                }
                self.emit(s).await;
            }
        }
    }

    async fn emit_health(&self, sigs: Vec<HealthSignal>, subject: SubjectId, device: &str) {
        for h in sigs {
            tracing::info!(subject, device, kind = h.kind.as_str(), phase = ?h.phase, "device health");
            let s = Signal::new(h.kind, health_phase(h.phase), subject, h.at)
                .with_device(device)
                .with_evidence(h.evidence);
            self.emit(s).await;
        }
    }

    async fn on_stored(&mut self, rec: &StoredRecord) {
        let r = &rec.record;
        // Dynamic zones following this device (victim protection).
        if let Some(pos) = r.position.as_ref().filter(|p| p.valid) {
            let affected = self
                .ctx
                .zones
                .read()
                .update_dynamic(&r.device_id, pos, r.device_time);
            for subject_id in affected {
                let Some(a) = self.owner_device(subject_id) else {
                    continue;
                };
                if self.links.is_local(&a) {
                    self.dynamic_update(subject_id, &r.device_id, r.device_time)
                        .await;
                } else {
                    let sent = self.links.send(
                        &a,
                        Control::DynamicUpdate {
                            subject_id,
                            device_id: r.device_id.clone(),
                            at: r.device_time,
                        },
                    );
                    if !sent {
                        tracing::debug!(
                            subject = subject_id,
                            "dynamic-zone update dropped (queue full)"
                        );
                    }
                }
            }
        }

        // Only the current wearer's live data drives the state machines; buffered data from
        // a previous assignment is stored under its subject but not evaluated.
        let current = self.ctx.registry.current_assignment(&r.device_id);
        let Some(subject_id) = rec
            .subject_id
            .filter(|s| current.as_ref().is_some_and(|a| a.subject_id == *s))
        else {
            return;
        };

        let health_sigs = self
            .health
            .entry(r.device_id.clone())
            .or_default()
            .on_record(&self.ctx.health, r);
        self.emit_health(health_sigs, subject_id, &r.device_id)
            .await;

        // Only records with location evidence go to the geofence engine: it ignores records
        // older than the last one it saw, so a login/heartbeat stamped with the server time
        // must not hide the buffered fixes uploaded right after it.
        let has_evidence = r.position.is_some()
            || r.beacon_in_range.is_some()
            || r.events.iter().any(|e| {
                matches!(
                    e,
                    em_model::DeviceEventKind::BeaconInRange
                        | em_model::DeviceEventKind::BeaconOutOfRange
                )
            });
        if !has_evidence {
            return;
        }
        if let Some(subject) = self.subject(subject_id).await {
            if self.ensure_monitor(&subject) {
                let events = match self.monitors.get_mut(&subject_id) {
                    Some(mon) => {
                        let index = self.ctx.zones.read();
                        mon.on_record(&index, &subject, r)
                    }
                    None => Vec::new(),
                };
                self.emit_compliance(events, Some(&r.device_id)).await;
            }
        }
        let latency = (Utc::now() - r.received_time)
            .num_microseconds()
            .unwrap_or(0);
        m::fix_to_event(latency as f64 / 1e6);
    }

    fn owner_device(&self, subject: SubjectId) -> Option<DeviceId> {
        self.ctx.registry.device_of(subject)
    }

    async fn dynamic_update(&mut self, subject_id: SubjectId, device_id: &str, at: DateTime<Utc>) {
        let Some(subject) = self.subject(subject_id).await else {
            return;
        };
        if !self.ensure_monitor(&subject) {
            return;
        }
        let events = match self.monitors.get_mut(&subject_id) {
            Some(mon) => {
                let index = self.ctx.zones.read();
                mon.on_dynamic_update(&index, &subject, device_id, at)
            }
            None => Vec::new(),
        };
        let own = self.owner_device(subject_id);
        self.emit_compliance(events, own.as_deref()).await;
    }
}

fn phase_str(p: Phase) -> &'static str {
    match p {
        Phase::Started => "started",
        Phase::Ongoing => "ongoing",
        Phase::Ended => "ended",
    }
}

fn health_phase(p: HealthPhase) -> Phase {
    match p {
        HealthPhase::Started => Phase::Started,
        HealthPhase::Ongoing => Phase::Ongoing,
        HealthPhase::Ended => Phase::Ended,
    }
}

#[async_trait]
impl ShardProcessor for Evaluator {
    async fn after_store(&mut self, batch: &[StoredRecord]) {
        for rec in batch {
            self.on_stored(rec).await;
        }
    }

    async fn tick(&mut self, now: DateTime<Utc>) {
        self.adopt_assignments();
        // Device health timers.
        let mut due = Vec::new();
        for (device, h) in self.health.iter_mut() {
            let sigs = h.on_tick(&self.ctx.health, now);
            if !sigs.is_empty() {
                due.push((device.clone(), sigs));
            }
        }
        for (device, sigs) in due {
            if let Some(a) = self.ctx.registry.current_assignment(&device) {
                self.emit_health(sigs, a.subject_id, &device).await;
            }
        }
        // Geofence timers: windows opening, persistence, no-fix.
        let ids: Vec<SubjectId> = self.monitors.keys().copied().collect();
        for id in ids {
            let Some(subject) = self.subject(id).await else {
                continue;
            };
            self.ensure_monitor(&subject);
            let events = match self.monitors.get_mut(&id) {
                Some(mon) => {
                    let index = self.ctx.zones.read();
                    mon.on_tick(&index, &subject, now)
                }
                None => Vec::new(),
            };
            if !events.is_empty() {
                let own = self.owner_device(id);
                self.emit_compliance(events, own.as_deref()).await;
            }
        }
    }

    async fn control(&mut self, msg: Control) {
        match msg {
            Control::DynamicUpdate {
                subject_id,
                device_id,
                at,
            } => self.dynamic_update(subject_id, &device_id, at).await,
        }
    }
}
