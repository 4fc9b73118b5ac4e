//! The alert engine: raising, folding, ending, acknowledging, resolving and escalating alerts.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use em_model::{
    Alert, AlertId, AlertKind, AlertState, Change, ChangeEntry, Severity, SubjectId, TimePolicy,
    User, UserId,
};
use em_store::{
    AlertEffects, AlertWrite, ChangeStream, NewAudit, NewOutbox, Store, StoreError, VersionedAlert,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, MutexGuard};
use tracing::{debug, info, warn};

use crate::config::{AlertConfig, ConfigError};
use crate::events;
use crate::lifecycle::{
    actions, alert_idempotency_key, apply_update, fold_repeat, subject_ordering_key, AlertUpdate,
    OutboxPayload, TransitionError,
};
use crate::message::{auto_resolve_note, describe, parse_tz, MessageContext};
use crate::signal::{Phase, Signal};

/// Whether the alert's condition is still going on: no end recorded, or the condition came
/// back (a repeat folded in after the recorded end).
pub fn condition_ongoing(alert: &Alert) -> bool {
    alert.ended_at.is_none_or(|end| end < alert.last_seen_at)
}

/// Why an officer may not resolve this alert now, if they may not.
///
/// Alert kinds are conditions with an end (a strap open, a zone breached, a device silent),
/// except device-reported alarms with no known meaning (`unknown_alarm`), which are events a
/// person closes. Resolving a condition while it persists would silence it: the rules raise once
/// per condition, so no new alert would come while the strap stays open. So a person cannot
/// resolve a live condition; they acknowledge it (it stays in the queue, owned, not
/// escalating) and it is resolved once the device's data shows the condition ended — by the
/// engine (`auto_resolve`) or by them afterwards.
pub fn resolution_blocked(alert: &Alert) -> Option<String> {
    if alert.state == em_model::AlertState::Resolved || !condition_ongoing(alert) {
        return None;
    }
    let what = match alert.kind {
        // An event, not a condition: nothing ends it but a person.
        AlertKind::UnknownAlarm => return None,
        AlertKind::InclusionZoneExit => "the subject is still outside the zone",
        AlertKind::ExclusionZoneEntry => "the subject is still inside the exclusion zone",
        AlertKind::VictimProximity => "the subject is still too close to the protected person",
        AlertKind::CurfewViolation => "the subject is still away from the curfew address",
        AlertKind::NoFixDuringCurfew => "there is still no location during the curfew",
        AlertKind::StrapTamper => "the strap is still reported open",
        AlertKind::CaseTamper => "the case is still reported open",
        AlertKind::LowBattery => "the battery is still low",
        AlertKind::BatteryDead => "the battery is still flat",
        AlertKind::ChargerNotConnected => "the charger is still not connected",
        AlertKind::LostCommunication => "the device is still not communicating",
        AlertKind::GpsJammingSuspected => "the GPS signal is still missing",
        AlertKind::DeviceClockWrong => "the device clock is still wrong",
    };
    Some(format!(
        "the condition is still ongoing ({what}; last seen {}): resolving it would silence it. \
         Acknowledge it instead; it can be resolved once the device shows the condition ended",
        alert.last_seen_at.format("%Y-%m-%d %H:%M:%S UTC")
    ))
}

/// Audit actor of changes the engine makes on its own (raise, fold, end, auto-resolve, escalate).
pub const SYSTEM_ACTOR: &str = "system:alerts";

/// Largest accepted evidence document (serialised JSON bytes).
const MAX_EVIDENCE_BYTES: usize = 64 * 1024;
/// Longest accepted resolution note (characters).
const MAX_NOTE_CHARS: usize = 4000;
/// Number of subject lock stripes.
const LOCK_STRIPES: usize = 64;
/// Times a change is decided again when another instance changed the alert meanwhile.
const WRITE_ATTEMPTS: usize = 8;

/// Why an alert operation failed.
#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("alert {0} not found")]
    NotFound(AlertId),
    #[error("subject {0} not found")]
    UnknownSubject(SubjectId),
    #[error("alert {id} cannot be changed: {reason}")]
    InvalidTransition { id: AlertId, reason: String },
    #[error("unknown resolution code {code:?} (allowed: {allowed})")]
    UnknownResolutionCode { code: String, allowed: String },
    #[error("user {0:?} is deactivated and cannot change alerts")]
    InactiveUser(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

/// A change of an alert, as published on the live feed (dashboard SSE, MQTT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertNotice {
    /// `alert.created`, `alert.updated`, `alert.acknowledged`, `alert.resolved` or `alert.escalated`.
    pub event: String,
    /// The alert after the change.
    pub alert: Alert,
}

impl AlertNotice {
    /// The notice of a change-log entry, when it is an alert change.
    pub fn from_change(entry: &ChangeEntry) -> Option<AlertNotice> {
        match &entry.change {
            Change::Alert { event, alert, .. } => Some(AlertNotice {
                event: event.clone(),
                alert: alert.clone(),
            }),
            _ => None,
        }
    }
}

/// The alert changes of a change-log stream (every instance's), as notices.
#[derive(Debug)]
pub struct AlertNotices {
    stream: ChangeStream,
}

impl AlertNotices {
    pub fn new(stream: ChangeStream) -> Self {
        AlertNotices { stream }
    }

    /// The next alert notice with its change id.
    pub async fn next(&mut self) -> Result<(em_model::ChangeId, AlertNotice), StoreError> {
        loop {
            let entry = self.stream.next().await?;
            if let Some(n) = AlertNotice::from_change(&entry) {
                return Ok((entry.id, n));
            }
        }
    }
}

/// The alert engine. Cheap to share as `Arc<AlertService>`.
///
/// Every change is decided here from the alert as read, and written with the version it was
/// read at ([`AlertWrite`]): when another instance changed the alert in between, the store
/// refuses the write and the change is decided again on the fresh alert. At most one alert
/// per condition is ongoing (the store refuses a second). Within one instance, changes to one
/// subject's alerts also take a striped lock, so they rarely meet. Every change goes into the
/// change log in the same transaction; the live feeds read it there ([`AlertNotices`]).
pub struct AlertService {
    store: Arc<dyn Store>,
    config: AlertConfig,
    locks: Vec<Mutex<()>>,
}

impl std::fmt::Debug for AlertService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertService")
            .field("backend", &self.store.backend())
            .field("config", &self.config)
            .finish()
    }
}

fn map_transition(id: AlertId, e: TransitionError) -> AlertError {
    match e {
        TransitionError::NotAllowed(reason) | TransitionError::Invalid(reason) => {
            AlertError::InvalidTransition { id, reason }
        }
    }
}

/// Who makes a change, for the audit record.
struct Actor<'a> {
    name: &'a str,
    id: Option<UserId>,
}

/// What an alert write is, beside the alert: its event, audit action and details, who makes
/// it, and the outbox channels it goes to.
struct What<'a> {
    event: &'static str,
    action: &'static str,
    actor: &'a Actor<'a>,
    details: serde_json::Value,
    channels: &'a [&'a str],
}

const SYSTEM: Actor<'static> = Actor {
    name: SYSTEM_ACTOR,
    id: None,
};

impl AlertService {
    /// Validates `config` and builds the service.
    pub fn new(store: Arc<dyn Store>, config: AlertConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(AlertService {
            store,
            config,
            locks: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    pub fn config(&self) -> &AlertConfig {
        &self.config
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    async fn lock(&self, subject: SubjectId) -> MutexGuard<'_, ()> {
        let idx = usize::try_from(subject.rem_euclid(LOCK_STRIPES as i64)).unwrap_or(0);
        match self.locks.get(idx) {
            Some(m) => m.lock().await,
            // Unreachable: idx < LOCK_STRIPES == locks.len(); fall back to the first stripe.
            None => self.locks[0].lock().await,
        }
    }

    /// Writes one alert change with its audit record, change-log entry and (for `channels`)
    /// outbox messages, in one store transaction.
    async fn write(
        &self,
        expected_version: Option<i64>,
        alert: Alert,
        what: What<'_>,
    ) -> Result<VersionedAlert, StoreError> {
        let What {
            event,
            action,
            actor,
            details,
            channels,
        } = what;
        let write = AlertWrite {
            expected_version,
            alert,
        };
        let effects = |stored: &VersionedAlert| -> Result<AlertEffects, StoreError> {
            let a = &stored.alert;
            let key = alert_idempotency_key(a.id, stored.version);
            let payload = serde_json::to_value(OutboxPayload {
                event: event.to_string(),
                idempotency_key: key.clone(),
                version: stored.version,
                alert: a.clone(),
            })
            .map_err(|e| StoreError::Invalid(format!("cannot encode the outbox payload: {e}")))?;
            Ok(AlertEffects {
                audit: NewAudit {
                    at: Some(Utc::now()),
                    actor_id: actor.id,
                    actor: actor.name.to_string(),
                    action: action.to_string(),
                    target_type: "alert".into(),
                    target_id: Some(a.id.to_string()),
                    subject_id: Some(a.subject_id),
                    details: details.clone(),
                },
                change: Change::Alert {
                    event: event.to_string(),
                    alert: a.clone(),
                    version: stored.version,
                },
                outbox: channels
                    .iter()
                    .map(|ch| NewOutbox {
                        channel: ch.to_string(),
                        ordering_key: subject_ordering_key(a.subject_id),
                        idempotency_key: key.clone(),
                        payload: payload.clone(),
                    })
                    .collect(),
            })
        };
        let stored = self.store.write_alert(&write, &effects).await?;
        metrics::counter!("em_alerts_notices_total", "event" => event).increment(1);
        Ok(stored)
    }

    /// Applies `update` to alert `id` as it is now, retrying on the fresh alert when another
    /// instance changed it meanwhile. `check` may refuse the change given the current alert.
    async fn change(
        &self,
        id: AlertId,
        update: &AlertUpdate,
        actor: &Actor<'_>,
        check: impl Fn(&Alert) -> Result<(), AlertError>,
    ) -> Result<Alert, AlertError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let current = self
                .store
                .get_alert(id)
                .await?
                .ok_or(AlertError::NotFound(id))?;
            check(&current.alert)?;
            let t = apply_update(&current.alert, update).map_err(|e| map_transition(id, e))?;
            let details = serde_json::json!({
                "previous": current.alert,
                "update": update,
            });
            match self
                .write(
                    Some(current.version),
                    t.alert,
                    What {
                        event: t.event,
                        action: t.action,
                        actor,
                        details,
                        channels: self.config.outbox_channels(),
                    },
                )
                .await
            {
                Ok(stored) => return Ok(stored.alert),
                Err(StoreError::Conflict(reason)) if attempt < WRITE_ATTEMPTS => {
                    debug!(
                        alert_id = id,
                        reason, "alert changed meanwhile; deciding again"
                    );
                    metrics::counter!("em_alerts_write_retries_total").increment(1);
                }
                Err(StoreError::NotFound(_)) => return Err(AlertError::NotFound(id)),
                Err(StoreError::Conflict(reason)) => {
                    return Err(AlertError::InvalidTransition { id, reason })
                }
                Err(e) => return Err(AlertError::Store(e)),
            }
        }
    }

    /// Applies a signal: `Started`/`Ongoing` raise a new alert or fold a repeat into the
    /// ongoing one; `Ended` records the end and, per the kind's `auto_resolve`, resolves it.
    /// Returns the alert concerned, or `None` when the kind is disabled or an `Ended` signal
    /// has no ongoing alert.
    pub async fn handle(&self, mut signal: Signal) -> Result<Option<Alert>, AlertError> {
        // Signal times come from device clocks. Ingest already refuses records whose time the
        // policy does not trust; this is the alert engine's own bound, so that no source can
        // date an alert in the future: a start is judged by the server's clock, an end
        // claimed for the future is not an end.
        let now = Utc::now();
        if signal.at > now + chrono::Duration::seconds(TimePolicy::DEFAULT.max_future_secs) {
            metrics::counter!("em_alerts_future_signals_total", "phase" => signal.phase.as_str())
                .increment(1);
            match signal.phase {
                Phase::Ended => {
                    warn!(kind = signal.kind.as_str(), subject_id = signal.subject_id, at = %signal.at,
                        "end of a condition dated in the future ignored");
                    return Ok(None);
                }
                Phase::Started | Phase::Ongoing => {
                    warn!(kind = signal.kind.as_str(), subject_id = signal.subject_id, at = %signal.at,
                        "alert dated in the future; raised at the server's time");
                    signal.at = now;
                }
            }
        }
        // The stores keep microseconds; compare like with like.
        signal.at = signal.at.trunc_subsecs(6);
        let rule = self.config.rule(signal.kind);
        if !rule.enabled {
            debug!(
                kind = signal.kind.as_str(),
                "alert kind disabled; signal ignored"
            );
            return Ok(None);
        }
        let evidence_len = serde_json::to_vec(&signal.evidence)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if evidence_len > MAX_EVIDENCE_BYTES {
            return Err(AlertError::Invalid(format!(
                "evidence of a {} signal is {evidence_len} bytes (limit {MAX_EVIDENCE_BYTES})",
                signal.kind.as_str()
            )));
        }
        let _guard = self.lock(signal.subject_id).await;
        match signal.phase {
            Phase::Started | Phase::Ongoing => self.raise(signal, rule.severity).await.map(Some),
            Phase::Ended => self.end(signal, rule.auto_resolve).await,
        }
    }

    async fn raise(&self, signal: Signal, severity: Severity) -> Result<Alert, AlertError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let written = match self
                .store
                .ongoing_alert(signal.subject_id, signal.kind, signal.zone_id)
                .await?
            {
                // A repeat: one alert, and no OMS message per repeat (that would be a flood).
                Some(current) => {
                    let folded = fold_repeat(
                        &current.alert,
                        signal.at,
                        severity,
                        signal.device_id.as_deref(),
                    );
                    let details = serde_json::json!({
                        "kind": folded.kind.as_str(),
                        "occurrences": folded.occurrences,
                        "at": signal.at,
                        "message": folded.message,
                    });
                    self.write(
                        Some(current.version),
                        folded,
                        What {
                            event: events::UPDATED,
                            action: actions::REPEAT,
                            actor: &SYSTEM,
                            details,
                            channels: &[],
                        },
                    )
                    .await
                    .map(|v| (v, false))
                }
                None => {
                    let message = self.compose(&signal).await?;
                    let alert = Alert {
                        id: 0,
                        subject_id: signal.subject_id,
                        device_id: signal.device_id.clone(),
                        kind: signal.kind,
                        severity,
                        state: AlertState::Open,
                        zone_id: signal.zone_id,
                        message,
                        started_at: signal.at,
                        created_at: Utc::now().trunc_subsecs(6),
                        last_seen_at: signal.at,
                        ended_at: None,
                        escalated: false,
                        acknowledged_by: None,
                        acknowledged_at: None,
                        resolved_by: None,
                        resolved_at: None,
                        resolution_code: None,
                        resolution_note: None,
                        evidence: signal.evidence.clone(),
                        occurrences: 1,
                    };
                    let details = serde_json::json!({
                        "kind": alert.kind.as_str(),
                        "occurrences": 1,
                        "at": signal.at,
                        "message": alert.message,
                    });
                    self.write(
                        None,
                        alert,
                        What {
                            event: events::CREATED,
                            action: actions::CREATE,
                            actor: &SYSTEM,
                            details,
                            channels: self.config.outbox_channels(),
                        },
                    )
                    .await
                    .map(|v| (v, true))
                }
            };
            match written {
                Ok((stored, created)) => {
                    if created {
                        info!(
                            alert_id = stored.alert.id,
                            subject_id = stored.alert.subject_id,
                            kind = stored.alert.kind.as_str(),
                            "alert raised"
                        );
                        metrics::counter!("em_alerts_raised_total", "kind" => stored.alert.kind.as_str())
                            .increment(1);
                    }
                    return Ok(stored.alert);
                }
                // Another instance raised, repeated or resolved it between the read and the
                // write: decide again on what is there now.
                Err(StoreError::Conflict(reason)) if attempt < WRITE_ATTEMPTS => {
                    debug!(
                        subject_id = signal.subject_id,
                        kind = signal.kind.as_str(),
                        reason,
                        "ongoing alert changed meanwhile; deciding again"
                    );
                    metrics::counter!("em_alerts_write_retries_total").increment(1);
                }
                Err(e) => return Err(AlertError::Store(e)),
            }
        }
    }

    async fn end(&self, signal: Signal, auto_resolve: bool) -> Result<Option<Alert>, AlertError> {
        let Some(ongoing) = self
            .store
            .ongoing_alert(signal.subject_id, signal.kind, signal.zone_id)
            .await?
        else {
            return Ok(None);
        };
        let id = ongoing.alert.id;
        // A repeated end (same or older evidence) changes nothing.
        let already = |a: &Alert| {
            a.ended_at
                .is_some_and(|e| e >= signal.at && e >= a.last_seen_at)
        };
        let mut alert = ongoing.alert;
        if !already(&alert) {
            alert = self
                .change(
                    id,
                    &AlertUpdate::ConditionEnded { at: signal.at },
                    &SYSTEM,
                    |_| Ok(()),
                )
                .await?;
        }
        if auto_resolve {
            let tz = match self.store.get_subject(signal.subject_id).await? {
                Some(s) => parse_tz(&s.timezone).0,
                None => chrono_tz::Tz::UTC,
            };
            let note = auto_resolve_note(alert.kind, signal.at, Utc::now(), tz);
            alert = self
                .change(
                    id,
                    &AlertUpdate::Resolve {
                        by: None,
                        at: Utc::now(),
                        code: self.config.auto_resolve_code.clone(),
                        note: Some(note),
                    },
                    &SYSTEM,
                    |_| Ok(()),
                )
                .await?;
            info!(alert_id = alert.id, "alert resolved automatically");
        }
        Ok(Some(alert))
    }

    /// The plain-words message of a new alert (subject's time zone, zone name and window).
    async fn compose(&self, signal: &Signal) -> Result<String, AlertError> {
        let subject = self
            .store
            .get_subject(signal.subject_id)
            .await?
            .ok_or(AlertError::UnknownSubject(signal.subject_id))?;
        let (tz, known) = parse_tz(&subject.timezone);
        if !known {
            warn!(
                subject_id = subject.id,
                timezone = subject.timezone.as_str(),
                "subject has an unknown time zone; alert times are shown in UTC"
            );
        }
        let zone = match signal.zone_id {
            Some(id) => self.store.get_zone(id).await?,
            None => None,
        };
        let mut text = describe(&MessageContext {
            kind: signal.kind,
            at: signal.at,
            now: Utc::now(),
            tz,
            zone: zone.as_ref(),
            evidence: &signal.evidence,
        });
        if !known {
            text.push_str(" (Times in UTC.)");
        }
        Ok(text)
    }

    async fn existing(&self, id: AlertId) -> Result<Alert, AlertError> {
        self.store
            .get_alert(id)
            .await?
            .map(|v| v.alert)
            .ok_or(AlertError::NotFound(id))
    }

    fn check_user(by: &User) -> Result<(), AlertError> {
        if by.active {
            Ok(())
        } else {
            Err(AlertError::InactiveUser(by.username.clone()))
        }
    }

    /// An officer takes the alert: open → acknowledged (audited with the username).
    pub async fn acknowledge(&self, id: AlertId, by: &User) -> Result<Alert, AlertError> {
        Self::check_user(by)?;
        let current = self.existing(id).await?;
        let _guard = self.lock(current.subject_id).await;
        let actor = Actor {
            name: &by.username,
            id: Some(by.id),
        };
        let alert = self
            .change(
                id,
                &AlertUpdate::Acknowledge {
                    by: by.id,
                    at: Utc::now(),
                },
                &actor,
                |_| Ok(()),
            )
            .await?;
        info!(
            alert_id = id,
            user = by.username.as_str(),
            "alert acknowledged"
        );
        Ok(alert)
    }

    /// Resolves the alert with a configured reason code and an optional note.
    pub async fn resolve(
        &self,
        id: AlertId,
        by: &User,
        code: &str,
        note: Option<String>,
    ) -> Result<Alert, AlertError> {
        Self::check_user(by)?;
        if !self.config.resolution_codes.iter().any(|c| c == code) {
            return Err(AlertError::UnknownResolutionCode {
                code: code.to_string(),
                allowed: self.config.resolution_codes.join(", "),
            });
        }
        let note = note.map(|n| n.trim().to_string()).filter(|n| !n.is_empty());
        if let Some(n) = &note {
            let chars = n.chars().count();
            if chars > MAX_NOTE_CHARS {
                return Err(AlertError::Invalid(format!(
                    "resolution note is {chars} characters (limit {MAX_NOTE_CHARS})"
                )));
            }
        }
        let current = self.existing(id).await?;
        let _guard = self.lock(current.subject_id).await;
        let actor = Actor {
            name: &by.username,
            id: Some(by.id),
        };
        // Checked on the alert as written against (a repeat on another instance may have
        // brought the condition back meanwhile: then the write conflicts and this runs again).
        let alert = self
            .change(
                id,
                &AlertUpdate::Resolve {
                    by: Some(by.id),
                    at: Utc::now(),
                    code: code.to_string(),
                    note,
                },
                &actor,
                |current| match resolution_blocked(current) {
                    Some(reason) => Err(AlertError::InvalidTransition { id, reason }),
                    None => Ok(()),
                },
            )
            .await?;
        info!(
            alert_id = id,
            user = by.username.as_str(),
            code,
            "alert resolved"
        );
        Ok(alert)
    }

    /// How long an alert of this kind and severity may stay unacknowledged; None = never escalates.
    pub fn escalate_after(&self, kind: AlertKind, severity: Severity) -> Option<Duration> {
        self.config.escalate_after(kind, severity)
    }

    /// Escalates every open alert that has not been acknowledged within its time as of `now`.
    /// The time counts from `created_at` (when the platform raised the alert, server clock), not
    /// from `started_at` (device time of the first evidence): an alert raised from a late,
    /// buffered backlog gives the officer the full time. Returns the escalated alerts.
    pub async fn escalate_due(&self, now: DateTime<Utc>) -> Result<Vec<Alert>, AlertError> {
        let mut limits: BTreeSet<Duration> = BTreeSet::new();
        for sev in [
            Severity::Low,
            Severity::Medium,
            Severity::High,
            Severity::Critical,
        ] {
            for kind in AlertKind::ALL {
                if let Some(d) = self.escalate_after(kind, sev) {
                    limits.insert(d);
                }
            }
        }
        let mut seen = HashSet::new();
        let mut escalated = Vec::new();
        for limit in limits {
            let Ok(limit_td) = chrono::Duration::from_std(limit) else {
                continue;
            };
            let Some(before) = now.checked_sub_signed(limit_td) else {
                continue;
            };
            for alert in self.store.unacknowledged_alerts(before).await? {
                if self.escalate_after(alert.kind, alert.severity) != Some(limit)
                    || !seen.insert(alert.id)
                {
                    continue;
                }
                match self
                    .change(
                        alert.id,
                        &AlertUpdate::Escalate { at: now },
                        &SYSTEM,
                        |_| Ok(()),
                    )
                    .await
                {
                    Ok(a) => {
                        warn!(
                            alert_id = a.id,
                            subject_id = a.subject_id,
                            kind = a.kind.as_str(),
                            "alert not acknowledged in time; escalated to supervisors"
                        );
                        metrics::counter!("em_alerts_escalated_total").increment(1);
                        escalated.push(a);
                    }
                    // Acknowledged, resolved or removed meanwhile: nothing to escalate.
                    Err(AlertError::InvalidTransition { reason, .. }) => {
                        debug!(alert_id = alert.id, reason, "escalation skipped");
                    }
                    Err(AlertError::NotFound(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(escalated)
    }
}
