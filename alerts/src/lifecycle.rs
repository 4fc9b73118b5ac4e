//! The alert lifecycle, as pure functions: what an alert becomes on a repeat, an end, an
//! acknowledgement, a resolution or an escalation; the event and audit names of each change;
//! and the shapes the engine writes beside an alert (outbox payload, keys). The store applies
//! what these decide and knows none of it.

use chrono::{DateTime, Utc};
use em_model::{Alert, AlertId, AlertState, Severity, SubjectId, UserId};
use serde::{Deserialize, Serialize};

use crate::events;

/// A change an officer or the engine asks of an existing alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AlertUpdate {
    Acknowledge {
        by: UserId,
        at: DateTime<Utc>,
    },
    Resolve {
        by: Option<UserId>,
        at: DateTime<Utc>,
        code: String,
        note: Option<String>,
    },
    /// The condition ended on its own (evidence time); the alert stays open for a human
    /// unless the rules resolve it automatically (then `Resolve` follows with `by: None`).
    ConditionEnded {
        at: DateTime<Utc>,
    },
    Escalate {
        at: DateTime<Utc>,
    },
}

impl AlertUpdate {
    /// The user behind the update, for the audit record.
    pub fn actor_id(&self) -> Option<UserId> {
        match self {
            AlertUpdate::Acknowledge { by, .. } => Some(*by),
            AlertUpdate::Resolve { by, .. } => *by,
            AlertUpdate::ConditionEnded { .. } | AlertUpdate::Escalate { .. } => None,
        }
    }
}

/// Audit action names of alert changes.
pub mod actions {
    pub const CREATE: &str = "alert.create";
    pub const REPEAT: &str = "alert.repeat";
    pub const ACKNOWLEDGE: &str = "alert.acknowledge";
    pub const RESOLVE: &str = "alert.resolve";
    pub const CONDITION_ENDED: &str = "alert.condition_ended";
    pub const ESCALATE: &str = "alert.escalate";
}

/// An allowed change: the alert after it, its event (feeds, OMS) and audit action.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub alert: Alert,
    pub event: &'static str,
    pub action: &'static str,
}

/// Why a change is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    /// Not allowed from the alert's state.
    #[error("{0}")]
    NotAllowed(String),
    /// The update itself is malformed.
    #[error("{0}")]
    Invalid(String),
}

/// The lifecycle: open → acknowledged → resolved, open → resolved; resolved is final.
/// Escalation applies to open, not yet escalated alerts; `ConditionEnded` records the end of
/// the condition on an alert that is not resolved.
pub fn apply_update(current: &Alert, update: &AlertUpdate) -> Result<Transition, TransitionError> {
    let mut a = current.clone();
    if current.state == AlertState::Resolved {
        return Err(TransitionError::NotAllowed(format!(
            "alert {} is resolved; resolved alerts are final",
            current.id
        )));
    }
    match update {
        AlertUpdate::Acknowledge { by, at } => {
            if current.state != AlertState::Open {
                return Err(TransitionError::NotAllowed(format!(
                    "alert {} is already {}",
                    current.id,
                    current.state.as_str()
                )));
            }
            a.state = AlertState::Acknowledged;
            a.acknowledged_by = Some(*by);
            a.acknowledged_at = Some(*at);
            Ok(Transition {
                alert: a,
                event: events::ACKNOWLEDGED,
                action: actions::ACKNOWLEDGE,
            })
        }
        AlertUpdate::Resolve { by, at, code, note } => {
            if code.trim().is_empty() {
                return Err(TransitionError::Invalid(
                    "a resolution code is required to resolve an alert".into(),
                ));
            }
            a.state = AlertState::Resolved;
            a.resolved_by = *by;
            a.resolved_at = Some(*at);
            a.resolution_code = Some(code.clone());
            a.resolution_note = note.clone();
            Ok(Transition {
                alert: a,
                event: events::RESOLVED,
                action: actions::RESOLVE,
            })
        }
        AlertUpdate::ConditionEnded { at } => {
            a.ended_at = Some(*at);
            Ok(Transition {
                alert: a,
                event: events::UPDATED,
                action: actions::CONDITION_ENDED,
            })
        }
        AlertUpdate::Escalate { .. } => {
            if current.state != AlertState::Open {
                return Err(TransitionError::NotAllowed(format!(
                    "alert {} is {}; only open alerts escalate",
                    current.id,
                    current.state.as_str()
                )));
            }
            if current.escalated {
                return Err(TransitionError::NotAllowed(format!(
                    "alert {} is already escalated",
                    current.id
                )));
            }
            a.escalated = true;
            Ok(Transition {
                alert: a,
                event: events::ESCALATED,
                action: actions::ESCALATE,
            })
        }
    }
}

/// A repeat of the ongoing condition folded into its alert: one more occurrence, last seen
/// moves forward only, the severity never drops, the first device stays.
pub fn fold_repeat(
    current: &Alert,
    at: DateTime<Utc>,
    severity: Severity,
    device_id: Option<&str>,
) -> Alert {
    let mut a = current.clone();
    a.occurrences = a.occurrences.saturating_add(1);
    a.last_seen_at = a.last_seen_at.max(at);
    a.severity = a.severity.max(severity);
    if a.device_id.is_none() {
        a.device_id = device_id.map(str::to_string);
    }
    a
}

/// Ordering key of everything concerning one subject (outbox per-subject ordering).
pub fn subject_ordering_key(subject: SubjectId) -> String {
    format!("subject:{subject}")
}

/// Stable idempotency key of one version of an alert.
pub fn alert_idempotency_key(id: AlertId, version: i64) -> String {
    format!("alert-{id}-v{version}")
}

/// What the engine writes into an outbox row, and what the outbox worker reads back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxPayload {
    pub event: String,
    #[serde(default)]
    pub idempotency_key: String,
    /// Absent in rows written before alert versions were recorded (read as 0).
    #[serde(default)]
    pub version: i64,
    #[serde(deserialize_with = "crate::payload::stored_alert")]
    pub alert: Alert,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use em_model::AlertKind;

    fn t(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000 + s, 0)
            .single()
            .expect("valid time")
    }

    fn alert(state: AlertState) -> Alert {
        Alert {
            id: 7,
            subject_id: 1,
            device_id: None,
            kind: AlertKind::StrapTamper,
            severity: Severity::High,
            state,
            zone_id: None,
            message: "m".into(),
            started_at: t(0),
            created_at: t(0),
            last_seen_at: t(0),
            ended_at: None,
            escalated: false,
            acknowledged_by: None,
            acknowledged_at: None,
            resolved_by: None,
            resolved_at: None,
            resolution_code: None,
            resolution_note: None,
            evidence: serde_json::json!({}),
            occurrences: 1,
        }
    }

    #[test]
    fn lifecycle_transitions() {
        let ack = AlertUpdate::Acknowledge { by: 3, at: t(5) };
        let res = AlertUpdate::Resolve {
            by: Some(3),
            at: t(9),
            code: "false_alarm".into(),
            note: None,
        };
        let open = alert(AlertState::Open);
        let acked = apply_update(&open, &ack).expect("open→ack");
        assert_eq!(acked.alert.state, AlertState::Acknowledged);
        assert_eq!(acked.event, events::ACKNOWLEDGED);
        assert!(matches!(
            apply_update(&acked.alert, &ack),
            Err(TransitionError::NotAllowed(_))
        ));
        let resolved = apply_update(&acked.alert, &res).expect("ack→resolved");
        assert_eq!(resolved.alert.state, AlertState::Resolved);
        for u in [
            ack.clone(),
            res.clone(),
            AlertUpdate::ConditionEnded { at: t(1) },
            AlertUpdate::Escalate { at: t(1) },
        ] {
            assert!(matches!(
                apply_update(&resolved.alert, &u),
                Err(TransitionError::NotAllowed(_))
            ));
        }
        assert_eq!(
            apply_update(&open, &res)
                .expect("open→resolved")
                .alert
                .state,
            AlertState::Resolved
        );
        let esc = apply_update(&open, &AlertUpdate::Escalate { at: t(2) }).expect("esc");
        assert!(esc.alert.escalated);
        assert!(apply_update(&esc.alert, &AlertUpdate::Escalate { at: t(3) }).is_err());
        assert!(apply_update(&acked.alert, &AlertUpdate::Escalate { at: t(3) }).is_err());
        let blank = AlertUpdate::Resolve {
            by: None,
            at: t(1),
            code: " ".into(),
            note: None,
        };
        assert!(matches!(
            apply_update(&open, &blank),
            Err(TransitionError::Invalid(_))
        ));
    }

    #[test]
    fn a_repeat_moves_last_seen_forward_and_never_lowers_severity() {
        let mut a = alert(AlertState::Open);
        a.last_seen_at = t(100);
        let f = fold_repeat(&a, t(50), Severity::Low, Some("d1"));
        assert_eq!(f.occurrences, 2);
        assert_eq!(f.last_seen_at, t(100));
        assert_eq!(f.severity, Severity::High);
        assert_eq!(f.device_id.as_deref(), Some("d1"));
        let g = fold_repeat(&f, t(200), Severity::Critical, Some("d2"));
        assert_eq!(g.last_seen_at, t(200));
        assert_eq!(g.severity, Severity::Critical);
        assert_eq!(g.device_id.as_deref(), Some("d1"));
    }
}
