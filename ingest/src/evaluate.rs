//! Post-storage evaluation in each pipeline worker: geofences and curfews (one
//! [`SubjectMonitor`] per subject, against the shared [`SharedZoneIndex`]), dynamic zones
//! (victim protection: another device's position moves a zone), device health, and the
//! resulting alert signals handed to the [`AlertService`].
//!
//! Every subject's state lives in the worker that owns its CURRENT device (devices are
//! sharded by id). When a victim's device moves, the subjects whose dynamic zones follow it
//! are re-evaluated in their own workers through [`Control`] messages.
//!
//! # Several instances on one database
//!
//! With several ingest processes sharing the store (README "Scaling out",
//! `listeners.reuse_port`) every process tracks every assigned device, but a device's
//! records reach only the process it is connected to. Rules driven by the tick from what a
//! process saw LOCALLY would fire falsely in the others, so before raising any of them the
//! tick compares the device's last contact in the shared store (`latest_states`, written by
//! every instance) with its own; if the device talked more recently, the local view is
//! re-based on the store contact and the alert is not raised:
//!
//! * lost communication: timer restarts from the store's last contact;
//! * GPS jamming suspected (no fix with good GSM) and charger not connected (health timers):
//!   the local health state is stale and is reset (the receiving instance owns them);
//! * geofence timers (no fix during curfew, a pending breach persisting, a window opening on
//!   the last fix seen here, and ends on complying evidence): the subject's monitor is
//!   rebuilt, so its timers count from now. Ends because a window closed or a zone changed
//!   are emitted as before.
//!
//! A device believed lost is re-checked every half `lost_comm_secs`, so a process that
//! raised an outage the device recovered from elsewhere can raise the next one. When the
//! device is truly silent every process raises; the alert service folds the raises into one
//! open alert. Record-driven rules (tamper, battery, clock, breaches on fixes) run only where
//! the records arrive. Not handled across instances: handing monitor state (an open breach)
//! over when a device moves its connection to another instance, and dynamic (victim) zones,
//! whose positions are shared only within one process.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use em_alerts::{signals_from_compliance, signals_from_health, Signal};

use crate::alert_lanes::AlertLanes;
use em_geofence::monitor::{ComplianceEventKind, EndReason};
use em_geofence::{ComplianceEvent, SharedZoneIndex, SubjectMonitor};
use em_model::{DeviceId, Subject, SubjectId};
use em_store::{Store, StoredRecord};

use crate::metrics as m;
use crate::pipeline::{Control, ShardLinks, ShardProcessor};
use crate::registry::Registry;
use em_alerts::health::{DeviceHealth, HealthConfig, HealthSignal};

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
    /// Where alert signals go (ordered per subject, handled off the pipeline workers).
    pub alerts: AlertLanes,
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
        m::alert_signal(signal.kind.as_str(), signal.phase.as_str());
        self.ctx.alerts.send(signal).await;
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
        for h in &sigs {
            tracing::info!(subject, device, kind = h.kind.as_str(), phase = ?h.phase, "device health");
        }
        for s in signals_from_health(sigs, subject, device) {
            self.emit(s).await;
        }
    }

    async fn on_stored(&mut self, rec: &StoredRecord) {
        let r = &rec.record;
        // Dynamic zones following this device (victim protection). The index ignores a record
        // whose device time the policy does not trust, so `device_time` below is trusted.
        let affected = self.ctx.zones.read().update_dynamic(r);
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

    /// For the `devices` about to raise a silence-based alert: the last contact the shared
    /// store holds for those that talked more recently than this instance knows, i.e. to
    /// another ingest instance on the same database. One query for all of them, on the
    /// raise path only (never per record).
    ///
    /// In a single instance this finds nothing: a device is served by one worker, which
    /// evaluates every record it stores before its next tick. When the store cannot answer,
    /// nothing is reported stale and the alerts are raised (a missed lost-signal alert is
    /// worse than a false one).
    async fn contacts_elsewhere(
        &self,
        devices: &HashSet<DeviceId>,
        now: DateTime<Utc>,
    ) -> HashMap<DeviceId, DateTime<Utc>> {
        let mut out = HashMap::new();
        if devices.is_empty() {
            return out;
        }
        let mut subjects: HashMap<SubjectId, &DeviceId> = HashMap::new();
        for d in devices {
            if let Some(a) = self.ctx.registry.current_assignment(d) {
                subjects.insert(a.subject_id, d);
            }
        }
        if subjects.is_empty() {
            return out;
        }
        let ids: Vec<SubjectId> = subjects.keys().copied().collect();
        let states = match self.ctx.store.latest_states(Some(&ids)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(devices = devices.len(), error = %e,
                    "last-contact check failed; raising on this instance's own view");
                return out;
            }
        };
        for st in states {
            // The subject's latest contact may come from a previous device (buffered
            // upload): it says nothing about the current one.
            let Some(device) = subjects
                .get(&st.subject_id)
                .filter(|d| ***d == st.device_id)
            else {
                continue;
            };
            let local = self
                .health
                .get(*device)
                .and_then(DeviceHealth::last_contact);
            // A contact "from the future" (clock step) is not a reason to stay quiet.
            if local.is_none_or(|l| st.last_contact > l) && st.last_contact <= now {
                out.insert((*device).clone(), st.last_contact);
            }
        }
        out
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

/// Whether a tick-driven compliance event was decided by the records THIS instance saw (or
/// did not see): a breach or no-fix start (a pending change persisting, no evidence for
/// `no_fix_secs`, a window opening on the last fix seen here) and an end on complying
/// evidence. Ends because a window closed or a zone changed hold whoever saw the records.
fn depends_on_local_records(e: &ComplianceEvent) -> bool {
    match e.kind {
        ComplianceEventKind::BreachStarted | ComplianceEventKind::NoFixStarted => true,
        ComplianceEventKind::BreachEnded | ComplianceEventKind::NoFixEnded => !matches!(
            e.reason,
            Some(EndReason::WindowClosed) | Some(EndReason::ZoneChanged)
        ),
        ComplianceEventKind::WindowOpened | ComplianceEventKind::WindowClosed => false,
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
        // Device health timers. A device with something to raise (or believed lost and due for
        // a look) is checked against the shared store before anything is emitted.
        let mut due: Vec<(DeviceId, Vec<HealthSignal>)> = Vec::new();
        let mut check: HashSet<DeviceId> = HashSet::new();
        for (device, h) in self.health.iter_mut() {
            if h.store_check_due(&self.ctx.health, now) {
                check.insert(device.clone());
            }
            let sigs = h.on_tick(&self.ctx.health, now);
            if !sigs.is_empty() {
                check.insert(device.clone());
                due.push((device.clone(), sigs));
            }
        }
        // Geofence timers: windows opening, persistence, no-fix.
        let mut events_due: Vec<(SubjectId, Vec<ComplianceEvent>)> = Vec::new();
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
            if events.is_empty() {
                continue;
            }
            if events.iter().any(depends_on_local_records) {
                if let Some(device) = self.owner_device(id) {
                    check.insert(device);
                }
            }
            events_due.push((id, events));
        }

        // Devices that talked to another instance since this one last heard of them.
        let stale = self.contacts_elsewhere(&check, now).await;
        for device in &check {
            if let Some(h) = self.health.get_mut(device) {
                h.mark_store_checked(now);
            }
        }
        for (device, contact) in &stale {
            tracing::debug!(device = device.as_str(), last_contact = %contact,
                "device talks to another instance; local timers re-based on the store");
            let sigs = match self.health.get_mut(device) {
                Some(h) => h.adopt_store_contact(&self.ctx.health, *contact, now),
                None => Vec::new(),
            };
            due.retain(|(d, _)| d != device);
            if !sigs.is_empty() {
                due.push((device.clone(), sigs));
            }
            // The monitor's evidence is as stale as the health state: start it afresh (its
            // timers count again from now) rather than raise from what it last saw here.
            if let Some(a) = self.ctx.registry.current_assignment(device) {
                if self.monitors.remove(&a.subject_id).is_some() {
                    self.monitor_tz.remove(&a.subject_id);
                    if let Some(subject) = self.subject(a.subject_id).await {
                        self.ensure_monitor(&subject);
                    }
                }
                for (id, events) in events_due.iter_mut() {
                    if *id == a.subject_id {
                        events.retain(|e| !depends_on_local_records(e));
                    }
                }
            }
        }

        for (device, sigs) in due {
            if let Some(a) = self.ctx.registry.current_assignment(&device) {
                self.emit_health(sigs, a.subject_id, &device).await;
            }
        }
        for (id, events) in events_due {
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
