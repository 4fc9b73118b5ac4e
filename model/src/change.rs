//! The change log: every change that another part of the system — or another instance — must
//! see is written as a [`Change`] in the same database transaction as the change itself, and
//! read back in id order by every consumer (geofence index and registry of each instance, the
//! dashboard's live feeds, the MQTT alert publisher, the OMS outbox worker). The database is
//! the one bus; nothing in memory carries these changes between processes.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{Alert, DeviceId, Subject, SubjectId, ZoneId, ZoneSpec};

/// Position in the change log. Ids only grow, and a reader that has seen id `n` has seen every
/// committed change with a smaller id (the store commits change rows in id order).
pub type ChangeId = i64;

/// One change, as written to the log.
///
/// Victim data is its own class and never travels here: zones that follow a protected person
/// name the device, never a position, and alert evidence carries distance and bearing only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Change {
    /// An alert was raised, repeated, ended, acknowledged, resolved or escalated. `event` and
    /// the alert's meaning are the alert engine's (`em-alerts`); the store does not read them.
    Alert {
        event: String,
        alert: Alert,
        /// The alert's version after the change (one more than before).
        version: i64,
    },
    /// A zone was created or changed (the zone after the change).
    Zone { zone: ZoneSpec },
    /// A zone was removed.
    ZoneDeleted {
        zone_id: ZoneId,
        subject_id: Option<SubjectId>,
    },
    /// A subject was created or changed (the subject after the change).
    Subject { subject: Subject },
    /// A subject's zone-group bindings were replaced.
    SubjectZoneGroups {
        subject_id: SubjectId,
        groups: Vec<String>,
    },
    /// A device was registered or changed (protocol, secret, active, class), or assigned to or
    /// taken off a subject. Readers re-read the device and its assignments.
    Device { device_id: DeviceId },
}

impl Change {
    /// Short name of the change type, stored beside the payload for filtering.
    pub fn topic(&self) -> &'static str {
        match self {
            Change::Alert { .. } => "alert",
            Change::Zone { .. } => "zone",
            Change::ZoneDeleted { .. } => "zone_deleted",
            Change::Subject { .. } => "subject",
            Change::SubjectZoneGroups { .. } => "subject_zone_groups",
            Change::Device { .. } => "device",
        }
    }

    /// The subject the change concerns, where there is one.
    pub fn subject_id(&self) -> Option<SubjectId> {
        match self {
            Change::Alert { alert, .. } => Some(alert.subject_id),
            Change::Zone { zone } => zone.subject_id,
            Change::ZoneDeleted { subject_id, .. } => *subject_id,
            Change::Subject { subject } => Some(subject.id),
            Change::SubjectZoneGroups { subject_id, .. } => Some(*subject_id),
            Change::Device { .. } => None,
        }
    }
}

/// A change as read back from the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEntry {
    pub id: ChangeId,
    /// Server time of the commit.
    pub at: DateTime<Utc>,
    pub change: Change,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_round_trip_as_tagged_json() {
        let c = Change::SubjectZoneGroups {
            subject_id: 4,
            groups: vec!["schools".into()],
        };
        let v = serde_json::to_value(&c).expect("encode");
        assert_eq!(v["type"], "subject_zone_groups");
        assert_eq!(c.topic(), "subject_zone_groups");
        assert_eq!(serde_json::from_value::<Change>(v).expect("decode"), c);
        let d = Change::Device {
            device_id: "864000000000001".into(),
        };
        assert_eq!(d.subject_id(), None);
        assert_eq!(serde_json::to_value(&d).expect("encode")["type"], "device");
    }
}
