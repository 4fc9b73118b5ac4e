//! The OMS webhook payload (documented in `docs/oms-webhook.md`).

use chrono::{DateTime, Utc};
use em_model::{Alert, SubjectId};
use serde::{Deserialize, Serialize};

/// Version of the payload shape; bumped on incompatible changes.
pub const OMS_SCHEMA_VERSION: u32 = 1;

/// The subject an alert concerns, as the OMS knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OmsSubject {
    pub id: SubjectId,
    /// OMS case reference; None only if the subject was deleted before delivery.
    pub reference: Option<String>,
}

/// The JSON body POSTed to the OMS for each alert change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OmsPayload {
    pub schema_version: u32,
    /// Unique per message and stable across retries; equal to the `Idempotency-Key` header.
    pub id: String,
    /// `alert.created`, `alert.updated`, `alert.acknowledged`, `alert.resolved`, `alert.escalated`.
    pub event: String,
    /// Version of the alert this message carries (increases with every change of the alert).
    pub alert_version: i64,
    /// When the change was committed (the outbox row's creation time).
    pub occurred_at: DateTime<Utc>,
    pub subject: OmsSubject,
    /// The alert after the change.
    pub alert: Alert,
}

/// The shape the store writes into the outbox row.
#[derive(Debug, Deserialize)]
pub(crate) struct StoredPayload {
    pub event: String,
    #[serde(default)]
    pub version: Option<i64>,
    pub alert: Alert,
}
