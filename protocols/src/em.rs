//! Open EM protocol v1: JSON over MQTT, specified in `docs/em-protocol.md` with the
//! JSON Schema `docs/em-protocol.schema.json`.
//!
//! Topics are `em/v1/{device_id}/telemetry`, `…/event` and `…/status`; a payload is
//! one JSON object or an array of up to [`MAX_BATCH`] objects (store-and-forward).
//! [`decode`] turns a topic and payload into an [`EmMessage`], whose
//! [`EmMessage::to_records`] gives one [`Record`] per object. [`EmMessage::topic`] and
//! [`EmMessage::payload`] are the encoder the simulator uses.

use chrono::{DateTime, Utc};
use em_model::{DeviceEventKind, FixSource, Position, Protocol, Record};
use serde::{Deserialize, Deserializer, Serialize};

use crate::util::hdop_to_accuracy_m;
use crate::{DecodeError, EncodeError};

const P: Protocol = Protocol::Em;

/// Topic prefix of protocol version 1.
pub const TOPIC_PREFIX: &str = "em/v1/";
/// Subscription filter covering every v1 topic.
pub const SUBSCRIPTION: &str = "em/v1/+/+";
/// Largest payload accepted, bytes.
pub const MAX_PAYLOAD_LEN: usize = 64 * 1024;
/// Most objects in one batch payload.
pub const MAX_BATCH: usize = 100;
/// Longest device id.
pub const MAX_DEVICE_ID_LEN: usize = 64;

/// Last topic level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EmTopic {
    /// Periodic report, normally with a position.
    Telemetry,
    /// Something happened: `events` is required and non-empty.
    Event,
    /// Heartbeat / device state without position.
    Status,
}

impl EmTopic {
    pub fn as_str(self) -> &'static str {
        match self {
            EmTopic::Telemetry => "telemetry",
            EmTopic::Event => "event",
            EmTopic::Status => "status",
        }
    }
}

/// Strap or case state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TamperState {
    Intact,
    Tampered,
}

/// Position object of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EmPosition {
    pub lat: f64,
    pub lon: f64,
    /// Horizontal accuracy radius, metres (preferred over `hdop`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_m: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hdop: Option<f32>,
    #[serde(default)]
    pub source: FixSource,
    #[serde(default = "yes")]
    pub valid: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub speed_kmh: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub course_deg: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub altitude_m: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub satellites: Option<u8>,
}

fn yes() -> bool {
    true
}

impl EmPosition {
    pub fn new(lat: f64, lon: f64) -> Self {
        EmPosition {
            lat,
            lon,
            accuracy_m: None,
            hdop: None,
            source: FixSource::Gnss,
            valid: true,
            speed_kmh: None,
            course_deg: None,
            altitude_m: None,
            satellites: None,
        }
    }
}

/// One report object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmPayload {
    /// Device sequence number, increasing by one per message.
    pub seq: u64,
    /// Device time of the observation (RFC 3339).
    pub time: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<EmPosition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub battery_pct: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charging: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gsm_signal: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strap: Option<TamperState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub case: Option<TamperState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beacon_in_range: Option<bool>,
    /// Known event names; unknown names (from newer minor versions) are dropped.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "known_events"
    )]
    pub events: Vec<DeviceEventKind>,
}

fn known_events<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DeviceEventKind>, D::Error> {
    let names: Vec<String> = Vec::deserialize(d)?;
    Ok(names
        .into_iter()
        .filter_map(|n| serde_json::from_value(serde_json::Value::String(n)).ok())
        .collect())
}

impl EmPayload {
    pub fn new(seq: u64, time: DateTime<Utc>) -> Self {
        EmPayload {
            seq,
            time,
            position: None,
            battery_pct: None,
            charging: None,
            gsm_signal: None,
            strap: None,
            case: None,
            beacon_in_range: None,
            events: Vec::new(),
        }
    }

    fn validate(&self, topic: EmTopic) -> Result<(), DecodeError> {
        if let Some(p) = &self.position {
            if !(-90.0..=90.0).contains(&p.lat) || !(-180.0..=180.0).contains(&p.lon) {
                return Err(bad(
                    "position",
                    format!("lat {} / lon {} out of range", p.lat, p.lon),
                ));
            }
            if !non_negative(p.accuracy_m) || !non_negative(p.hdop) || !non_negative(p.speed_kmh) {
                return Err(bad(
                    "position",
                    "accuracy_m, hdop and speed_kmh must be ≥ 0",
                ));
            }
            if p.course_deg.is_some_and(|c| !(0.0..=360.0).contains(&c)) {
                return Err(bad("position.course_deg", "must be within 0..=360"));
            }
        }
        if self.battery_pct.is_some_and(|b| b > 100) {
            return Err(bad("battery_pct", "must be within 0..=100"));
        }
        if self.gsm_signal.is_some_and(|b| b > 100) {
            return Err(bad("gsm_signal", "must be within 0..=100"));
        }
        if topic == EmTopic::Event && self.events.is_empty() {
            return Err(bad(
                "events",
                "an event message needs at least one known event",
            ));
        }
        Ok(())
    }

    /// The normalised record of this object.
    pub fn to_record(&self, device_id: &str, topic: EmTopic, received: DateTime<Utc>) -> Record {
        let mut r = Record::new(device_id, P, received);
        r.device_time = self.time;
        r.seq = Some(self.seq);
        r.position = self.position.map(|p| Position {
            lat: p.lat,
            lon: p.lon,
            accuracy_m: p.accuracy_m.or(p.hdop.map(hdop_to_accuracy_m)),
            speed_kmh: p.speed_kmh,
            course_deg: p.course_deg,
            altitude_m: p.altitude_m,
            satellites: p.satellites,
            valid: p.valid,
            source: p.source,
        });
        r.battery_pct = self.battery_pct;
        r.charging = self.charging;
        r.gsm_signal = self.gsm_signal;
        r.beacon_in_range = self.beacon_in_range;
        if topic == EmTopic::Status {
            r.events.push(DeviceEventKind::Heartbeat);
        }
        let mut add = |e: DeviceEventKind| {
            if !r.events.contains(&e) {
                r.events.push(e);
            }
        };
        for e in &self.events {
            add(*e);
        }
        if self.strap == Some(TamperState::Tampered) {
            add(DeviceEventKind::StrapTamper);
        }
        if self.case == Some(TamperState::Tampered) {
            add(DeviceEventKind::CaseTamper);
        }
        r
    }
}

fn non_negative(v: Option<f32>) -> bool {
    match v {
        Some(v) => v.is_finite() && v >= 0.0,
        None => true,
    }
}

/// A decoded EM message: the device and topic from the topic name, one or more objects.
#[derive(Debug, Clone, PartialEq)]
pub struct EmMessage {
    pub device_id: String,
    pub topic: EmTopic,
    pub payloads: Vec<EmPayload>,
    /// Whether the payload was a JSON array.
    pub batch: bool,
}

impl EmMessage {
    /// A single-object message.
    pub fn new(device_id: impl Into<String>, topic: EmTopic, payload: EmPayload) -> Self {
        EmMessage {
            device_id: device_id.into(),
            topic,
            payloads: vec![payload],
            batch: false,
        }
    }

    pub fn to_records(&self, received: DateTime<Utc>) -> Vec<Record> {
        self.payloads
            .iter()
            .map(|p| p.to_record(&self.device_id, self.topic, received))
            .collect()
    }

    /// The MQTT topic to publish on.
    pub fn topic(&self) -> Result<String, EncodeError> {
        topic(&self.device_id, self.topic)
    }

    /// The JSON payload.
    pub fn payload(&self) -> Result<Vec<u8>, EncodeError> {
        let json = if self.batch {
            serde_json::to_vec(&self.payloads)
        } else {
            match self.payloads.as_slice() {
                [one] => serde_json::to_vec(one),
                _ => {
                    return Err(EncodeError::new(
                        P,
                        "payloads",
                        "a non-batch message holds exactly one object",
                    ))
                }
            }
        };
        json.map_err(|e| EncodeError::new(P, "payload", e.to_string()))
    }

    /// EM messages are acknowledged by the broker (QoS 1 PUBACK), not by the server.
    pub fn response(&self) -> Option<bytes::Bytes> {
        None
    }
}

fn bad(field: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError::malformed(P, field, detail)
}

/// Whether `id` is a valid device id (1–64 of `A-Z a-z 0-9 . _ -`).
pub fn valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Topic for `device_id` and `kind`.
pub fn topic(device_id: &str, kind: EmTopic) -> Result<String, EncodeError> {
    if !valid_device_id(device_id) {
        return Err(EncodeError::new(P, "device_id", format!("{device_id:?}")));
    }
    Ok(format!("{TOPIC_PREFIX}{device_id}/{}", kind.as_str()))
}

/// Split a topic into device id and kind.
pub fn parse_topic(topic: &str) -> Result<(&str, EmTopic), DecodeError> {
    let rest = topic
        .strip_prefix(TOPIC_PREFIX)
        .ok_or_else(|| DecodeError::UnknownType {
            protocol: P,
            kind: format!("topic {:?} (expected em/v1/...)", truncate(topic)),
        })?;
    let (id, kind) = rest.split_once('/').ok_or_else(|| {
        bad(
            "topic",
            format!("{:?} has no message kind", truncate(topic)),
        )
    })?;
    if !valid_device_id(id) {
        return Err(bad(
            "topic",
            format!("device id {:?} is not valid", truncate(id)),
        ));
    }
    let kind = match kind {
        "telemetry" => EmTopic::Telemetry,
        "event" => EmTopic::Event,
        "status" => EmTopic::Status,
        other => {
            return Err(DecodeError::UnknownType {
                protocol: P,
                kind: truncate(other).to_owned(),
            })
        }
    };
    Ok((id, kind))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Decode an MQTT publish on an EM topic.
pub fn decode(topic: &str, payload: &[u8]) -> Result<EmMessage, DecodeError> {
    let (device_id, kind) = parse_topic(topic)?;
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(DecodeError::Oversized {
            protocol: P,
            len: payload.len(),
            max: MAX_PAYLOAD_LEN,
        });
    }
    let value: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| bad("payload", format!("not JSON: {e}")))?;
    let (batch, items) = match value {
        serde_json::Value::Array(items) => (true, items),
        obj @ serde_json::Value::Object(_) => (false, vec![obj]),
        _ => {
            return Err(bad(
                "payload",
                "must be a JSON object or an array of objects",
            ))
        }
    };
    if items.is_empty() || items.len() > MAX_BATCH {
        return Err(bad(
            "payload",
            format!("batch of {} objects (1..={MAX_BATCH})", items.len()),
        ));
    }
    let mut payloads = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let p: EmPayload =
            serde_json::from_value(item).map_err(|e| bad("payload", format!("object {i}: {e}")))?;
        p.validate(kind)?;
        payloads.push(p);
    }
    Ok(EmMessage {
        device_id: device_id.to_owned(),
        topic: kind,
        payloads,
        batch,
    })
}
