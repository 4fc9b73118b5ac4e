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

/// Reads the alert of an outbox row. Rows written before alerts had `created_at` (still pending
/// when the store was upgraded) lack it; the store backfilled the column with `started_at`, so
/// the payload gets the same value instead of failing delivery permanently.
pub(crate) fn stored_alert<'de, D>(deserializer: D) -> Result<Alert, D::Error>
where
    D: serde::Deserializer<'de>,
{
    use serde::de::Error;
    let mut value = serde_json::Value::deserialize(deserializer)?;
    if let Some(obj) = value.as_object_mut() {
        if !obj.contains_key("created_at") {
            if let Some(started) = obj.get("started_at").cloned() {
                obj.insert("created_at".to_string(), started);
            }
        }
    }
    serde_json::from_value(value).map_err(D::Error::custom)
}

#[cfg(test)]
mod tests {
    use crate::lifecycle::OutboxPayload;
    use serde_json::json;

    fn stored(alert_extra: serde_json::Value) -> serde_json::Value {
        let mut alert = json!({
            "id": 5, "subject_id": 42, "device_id": null, "kind": "strap_tamper",
            "severity": "high", "state": "open", "zone_id": null, "message": "m",
            "started_at": "2025-01-15T22:13:05Z", "last_seen_at": "2025-01-15T22:13:05Z",
            "ended_at": null, "escalated": false, "acknowledged_by": null,
            "acknowledged_at": null, "resolved_by": null, "resolved_at": null,
            "resolution_code": null, "resolution_note": null, "evidence": {}, "occurrences": 1
        });
        if let (Some(a), Some(extra)) = (alert.as_object_mut(), alert_extra.as_object()) {
            a.extend(extra.clone());
        }
        json!({ "event": "alert.created", "version": 1, "alert": alert })
    }

    #[test]
    fn stored_payload_keeps_created_at() {
        let p: OutboxPayload =
            serde_json::from_value(stored(json!({"created_at": "2025-01-15T23:00:00Z"})))
                .expect("payload with created_at");
        assert_eq!(p.alert.created_at.to_rfc3339(), "2025-01-15T23:00:00+00:00");
        assert_eq!(p.alert.started_at.to_rfc3339(), "2025-01-15T22:13:05+00:00");
    }

    #[test]
    fn stored_payload_from_before_created_at_uses_started_at() {
        let p: OutboxPayload =
            serde_json::from_value(stored(json!({}))).expect("legacy payload still delivers");
        assert_eq!(p.alert.created_at, p.alert.started_at);
    }

    #[test]
    fn stored_payload_rejects_a_non_alert() {
        let v = json!({ "event": "alert.created", "alert": {"id": 1} });
        assert!(serde_json::from_value::<OutboxPayload>(v).is_err());
    }
}
