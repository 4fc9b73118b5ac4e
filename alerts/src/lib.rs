//! `em-alerts` owns the alert engine of the EM platform: turning conditions ([`Signal`]s from
//! ingest and the geofence engine) into alerts with a default severity and a plain-words
//! message, their lifecycle (open → acknowledged → resolved, automatic resolution when the
//! condition ends, folding of repeats into one alert), escalation of unacknowledged alerts to
//! the supervisor level by configured per-severity times, the live notice feed (dashboard SSE
//! and MQTT `em/v1/alerts/...`), and signed, ordered, retried delivery of the transactional
//! outbox to the offender-management system (OMS). Persistence and the audit trail are the
//! store's: every change goes through one `Store` transaction that also writes the audit record
//! and the outbox rows.

mod config;
mod escalation;
pub mod health;
pub mod lifecycle;
mod message;
mod mqtt;
mod outbox;
mod payload;
mod service;
mod signal;

pub use config::{
    default_rule, AlertConfig, ConfigError, EffectiveRule, EscalationConfig, KindRule, OmsConfig,
    MIN_SECRET_LEN,
};
pub use escalation::run_escalation;
pub use lifecycle::{
    alert_idempotency_key, apply_update, subject_ordering_key, AlertUpdate, OutboxPayload,
    Transition, TransitionError,
};
pub use message::{describe, duration_words, local_time, MessageContext};
pub use mqtt::{alert_topic, MqttAlertPublisher, PUBLISHER_CURSOR, PUBLISHER_LEASE};
pub use outbox::{
    backoff_delay, classify_status, sign_body, verify_signature, OutboxWorker, Outcome,
};
pub use payload::{OmsPayload, OmsSubject, OMS_SCHEMA_VERSION};
pub use service::{
    condition_ongoing, resolution_blocked, AlertError, AlertNotice, AlertNotices, AlertService,
    SYSTEM_ACTOR,
};
pub use signal::{signals_from_compliance, signals_from_health, Phase, Signal};

/// Outbox channel of the OMS webhook.
pub const OMS_CHANNEL: &str = "oms";

/// Notice event names (also the `event` of OMS payloads).
pub mod events {
    pub const CREATED: &str = "alert.created";
    pub const UPDATED: &str = "alert.updated";
    pub const ACKNOWLEDGED: &str = "alert.acknowledged";
    pub const RESOLVED: &str = "alert.resolved";
    pub const ESCALATED: &str = "alert.escalated";
    pub const ALL: [&str; 5] = [CREATED, UPDATED, ACKNOWLEDGED, RESOLVED, ESCALATED];
}
