//! The decoding logic of the `em-decode` tool, kept here (I/O-free) so it is tested.
//!
//! One input line is one frame: hex for GT06, Teltonika and binary H02 (`$…`), raw text
//! for H02 and OsmAnd (query or JSON body), `topic payload` for EM; or a whole raw byte
//! stream ([`Session::decode_stream`]). Each decoded record becomes one JSON object (the
//! serialised [`Record`]); each error becomes `{"error": reason, "message": …}`.
//! A [`Session`] keeps the per-connection state (GT06 login, Teltonika IMEI) across
//! lines, as a TCP connection would, and counts what it saw in a [`Summary`].

use std::collections::BTreeMap;

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_util::codec::Decoder;

use crate::gt06::{Gt06Codec, Imei};
use crate::h02::{H02Codec, H02Profile};
use crate::teltonika::TeltonikaCodec;
use crate::{detect, em, osmand, CodecError, DecodeError, Protocol, Record};

/// Decoding state across lines.
#[derive(Debug, Clone, Default)]
pub struct Session {
    gt06: Gt06Codec,
    teltonika: TeltonikaCodec,
    h02: H02Codec,
    summary: Summary,
}

/// What a session decoded and refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Frames decoded (with or without records).
    pub decoded: u64,
    /// Records produced.
    pub records: u64,
    /// Decoded frames by `protocol:kind`.
    pub kinds: BTreeMap<String, u64>,
    /// Refused frames / bytes by reason (`bad_checksum`, `malformed`, `unknown_type`…).
    pub refused: BTreeMap<String, u64>,
    /// Unknown message types by `protocol:type` (also counted under `refused`).
    pub unknown_types: BTreeMap<String, u64>,
}

impl Summary {
    fn refuse(&mut self, e: &DecodeError) {
        *self.refused.entry(e.reason().to_owned()).or_default() += 1;
        if let DecodeError::UnknownType { protocol, kind } = e {
            *self
                .unknown_types
                .entry(format!("{protocol}:{kind}"))
                .or_default() += 1;
        }
    }

    fn decoded(&mut self, protocol: Protocol, kind: &str, records: usize) {
        self.decoded += 1;
        self.records += records as u64;
        *self.kinds.entry(format!("{protocol}:{kind}")).or_default() += 1;
    }

    /// Total refused.
    pub fn refused_total(&self) -> u64 {
        self.refused.values().sum()
    }

    pub fn to_json(&self) -> Value {
        json!({
            "decoded": self.decoded,
            "records": self.records,
            "kinds": self.kinds,
            "refused": self.refused,
            "refused_total": self.refused_total(),
            "unknown_types": self.unknown_types,
        })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "decoded: {} frames, {} records; refused: {}",
            self.decoded,
            self.records,
            self.refused_total()
        )?;
        for (k, n) in &self.kinds {
            writeln!(f, "  decoded {k}: {n}")?;
        }
        for (k, n) in &self.refused {
            writeln!(f, "  refused {k}: {n}")?;
        }
        for (k, n) in &self.unknown_types {
            writeln!(f, "  unknown type {k}: {n}")?;
        }
        Ok(())
    }
}

/// Error object for a line that is not even a frame of the chosen protocol.
fn input_error(protocol: Option<Protocol>, message: impl Into<String>) -> Value {
    json!({
        "error": "bad_input",
        "protocol": protocol.map(|p| p.as_str()),
        "message": message.into(),
        "fatal": false,
    })
}

fn error_json(e: &DecodeError) -> Value {
    let mut v = json!({
        "error": e.reason(),
        "protocol": e.protocol().as_str(),
        "message": e.to_string(),
        "fatal": e.is_fatal(),
    });
    if let DecodeError::UnknownType { kind, .. } = e {
        v["type"] = json!(kind);
    }
    v
}

fn records_json(records: Vec<Record>, kind: &str) -> Vec<Value> {
    if records.is_empty() {
        return vec![json!({ "frame": kind, "records": 0 })];
    }
    records
        .into_iter()
        .map(|r| serde_json::to_value(r).unwrap_or_else(|e| input_error(None, e.to_string())))
        .collect()
}

/// The bytes the server would answer a frame with, as one JSON value.
fn reply_json(kind: &str, reply: Option<bytes::Bytes>) -> Option<Value> {
    let reply = reply?;
    Some(
        if reply.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            json!({ "frame": kind, "reply": String::from_utf8_lossy(&reply) })
        } else {
            json!({ "frame": kind, "reply_hex": hex::encode(&reply) })
        },
    )
}

fn parse_hex(line: &str) -> Option<Vec<u8>> {
    let compact: String = line
        .split_whitespace()
        .collect::<String>()
        .trim_start_matches("0x")
        .to_owned();
    if compact.is_empty() {
        return None;
    }
    hex::decode(compact).ok()
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// A session whose GT06 / Teltonika connection is already logged in as `imei`.
    pub fn with_imei(imei: &str) -> Result<Self, String> {
        let parsed = Imei::parse(imei).ok_or_else(|| format!("{imei:?} is not an IMEI"))?;
        Ok(Session {
            gt06: Gt06Codec::with_imei(parsed),
            teltonika: TeltonikaCodec::with_imei(imei),
            h02: H02Codec::new(),
            summary: Summary::default(),
        })
    }

    /// Per-device H02 settings: binary report length (0 = recognise) and sensor wiring.
    pub fn with_h02(mut self, binary_len: usize, profile: H02Profile) -> Self {
        self.h02 = self
            .h02
            .clone()
            .with_binary_len(binary_len)
            .with_profile(profile);
        self
    }

    /// What this session decoded and refused so far.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Decode a whole raw byte stream of one connection (`protocol` `None` = detect from
    /// the first bytes). Only the streaming protocols (GT06, Teltonika, H02) have one.
    pub fn decode_stream(
        &mut self,
        protocol: Option<Protocol>,
        bytes: &[u8],
        received: DateTime<Utc>,
    ) -> Vec<Value> {
        if bytes.is_empty() {
            return Vec::new();
        }
        let Some(protocol) = protocol.or_else(|| detect(bytes)) else {
            self.bad_input();
            return vec![input_error(None, "could not detect the protocol")];
        };
        let mut buf = BytesMut::from(bytes);
        self.drain_protocol(protocol, &mut buf, received)
            .unwrap_or_else(|| {
                self.bad_input();
                vec![input_error(
                    Some(protocol),
                    "raw input needs a stream protocol (gt06, teltonika, h02)",
                )]
            })
    }

    fn bad_input(&mut self) {
        *self.summary.refused.entry("bad_input".into()).or_default() += 1;
    }

    /// Run the protocol's streaming codec over `buf`; `None` for non-stream protocols.
    fn drain_protocol(
        &mut self,
        protocol: Protocol,
        buf: &mut BytesMut,
        received: DateTime<Utc>,
    ) -> Option<Vec<Value>> {
        let summary = &mut self.summary;
        Some(match protocol {
            Protocol::Gt06 => drain(&mut self.gt06, buf, summary, |codec, frame, sum| {
                let id = codec.device_id().unwrap_or_default().to_owned();
                let recs = frame.to_records(&id, received);
                sum.decoded(protocol, frame.kind(), recs.len());
                let mut out = records_json(recs, frame.kind());
                out.extend(reply_json(frame.kind(), frame.response()));
                out
            }),
            Protocol::Teltonika => drain(&mut self.teltonika, buf, summary, |codec, frame, sum| {
                let id = codec.imei().unwrap_or_default().to_owned();
                let recs = frame.to_records(&id, received);
                sum.decoded(protocol, frame.kind(), recs.len());
                let mut out = records_json(recs, frame.kind());
                out.extend(reply_json(frame.kind(), frame.response()));
                out
            }),
            Protocol::H02 => drain(&mut self.h02, buf, summary, |codec, frame, sum| {
                let recs = frame.to_records_with(frame.device_id(), received, codec.profile());
                sum.decoded(protocol, frame.kind(), recs.len());
                let mut out = records_json(recs, frame.kind());
                out.extend(reply_json(frame.kind(), frame.response_at(received)));
                out
            }),
            Protocol::Osmand | Protocol::Em => return None,
        })
    }

    /// Decode one input line with `protocol` (`None` = auto-detect per line).
    pub fn decode_line(
        &mut self,
        protocol: Option<Protocol>,
        line: &str,
        received: DateTime<Utc>,
    ) -> Vec<Value> {
        let line = line.trim();
        if line.is_empty() {
            return Vec::new();
        }
        let protocol = match protocol {
            Some(p) => p,
            None => {
                let guess = match parse_hex(line) {
                    Some(bytes) => detect(&bytes),
                    None => detect(line.as_bytes())
                        .or_else(|| osmand::is_json(line).then_some(Protocol::Osmand)),
                };
                match guess {
                    Some(p) => p,
                    None => {
                        self.bad_input();
                        return vec![input_error(None, "could not detect the protocol")];
                    }
                }
            }
        };
        match protocol {
            Protocol::Gt06 | Protocol::Teltonika => {
                let Some(bytes) = parse_hex(line) else {
                    self.bad_input();
                    return vec![input_error(Some(protocol), "expected a hex-encoded frame")];
                };
                let mut buf = BytesMut::from(&bytes[..]);
                self.drain_protocol(protocol, &mut buf, received)
                    .unwrap_or_default()
            }
            Protocol::H02 => {
                // Binary reports (`$…`, `X…`) come as hex, text reports as they are.
                let mut buf = match parse_hex(line) {
                    Some(b) if matches!(b.first(), Some(b'$' | b'X')) => BytesMut::from(&b[..]),
                    _ => BytesMut::from(line.as_bytes()),
                };
                self.h02 = self.h02.clone().with_clock(received);
                self.drain_protocol(protocol, &mut buf, received)
                    .unwrap_or_default()
            }
            Protocol::Osmand => match osmand::decode_all(line) {
                Ok(reports) => {
                    let recs: Vec<Record> = reports
                        .iter()
                        .flat_map(|r| r.to_records(received))
                        .collect();
                    self.summary.decoded(protocol, "report", recs.len());
                    records_json(recs, "report")
                }
                Err(e) => {
                    self.summary.refuse(&e);
                    vec![error_json(&e)]
                }
            },
            Protocol::Em => {
                let Some((topic, payload)) = line.split_once(char::is_whitespace) else {
                    self.bad_input();
                    return vec![input_error(Some(protocol), "expected `topic payload`")];
                };
                match em::decode(topic, payload.trim().as_bytes()) {
                    Ok(msg) => {
                        let recs = msg.to_records(received);
                        self.summary
                            .decoded(protocol, msg.topic.as_str(), recs.len());
                        records_json(recs, msg.topic.as_str())
                    }
                    Err(e) => {
                        self.summary.refuse(&e);
                        vec![error_json(&e)]
                    }
                }
            }
        }
    }
}

/// Run a streaming codec over `buf` until it is used up.
fn drain<C, F, T>(
    codec: &mut C,
    buf: &mut BytesMut,
    summary: &mut Summary,
    mut on_frame: F,
) -> Vec<Value>
where
    C: Decoder<Item = Result<T, DecodeError>, Error = CodecError>,
    F: FnMut(&C, T, &mut Summary) -> Vec<Value>,
{
    let mut out = Vec::new();
    loop {
        match codec.decode_eof(buf) {
            Ok(Some(Ok(frame))) => {
                let values = on_frame(codec, frame, summary);
                out.extend(values);
            }
            Ok(Some(Err(e))) => {
                summary.refuse(&e);
                out.push(error_json(&e));
            }
            Ok(None) => break,
            Err(CodecError::Fatal(e)) => {
                summary.refuse(&e);
                out.push(error_json(&e));
                break;
            }
            Err(CodecError::Io(e)) => {
                *summary.refused.entry("io".into()).or_default() += 1;
                out.push(input_error(None, e.to_string()));
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn gt06_session_learns_imei_from_login_line() {
        let mut s = Session::new();
        let loc = "78781F120B081D112E10CF027AC7EB0C46584900148F01CC00287D001FB8000380810D0A";
        let before = s.decode_line(Some(Protocol::Gt06), loc, t());
        assert_eq!(before[0]["error"], "not_logged_in");
        let login = s.decode_line(
            None,
            "78 78 0D 01 01 23 45 67 89 01 23 45 00 01 8C DD 0D 0A",
            t(),
        );
        assert_eq!(login[0]["events"][0], "login");
        let after = s.decode_line(None, loc, t());
        assert_eq!(after[0]["device_id"], "123456789012345");
        assert_eq!(after[0]["position"]["course_deg"], 143.0);
        assert_eq!(after[0]["received_time"], "2025-01-01T00:00:00Z");
    }

    #[test]
    fn each_protocol_and_errors() {
        let mut s = Session::with_imei("356307042441013").unwrap();
        let avl = "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF";
        let out = s.decode_line(Some(Protocol::Teltonika), avl, t());
        assert_eq!(out[0]["device_id"], "356307042441013");
        assert_eq!(out[0]["device_time"], "2019-06-10T10:04:46Z");
        let out = s.decode_line(None, "*HQ,353505910449999,XT#", t());
        assert_eq!(out[0]["events"][0], "heartbeat");
        let out = s.decode_line(None, "id=7&lat=1&lon=2", t());
        assert_eq!(out[0]["device_id"], "7");
        let out = s.decode_line(
            None,
            r#"em/v1/tag-1/event {"seq":3,"time":"2025-01-01T00:00:00Z","events":["sos"]}"#,
            t(),
        );
        assert_eq!(out[0]["events"][0], "sos");
        // Ack frames give a frame note, not a record.
        let out = s.decode_line(Some(Protocol::Gt06), "787805010001D9DC0D0A", t());
        assert_eq!(out[0]["frame"], "ack");
        // Errors carry the reason.
        let out = s.decode_line(
            Some(Protocol::Gt06),
            "78780D01012345678901234500018CDE0D0A",
            t(),
        );
        assert_eq!(out[0]["error"], "bad_checksum");
        assert_eq!(out[0]["fatal"], false);
        let out = s.decode_line(Some(Protocol::Teltonika), "00000001", t());
        assert_eq!(out[0]["fatal"], true);
        let out = s.decode_line(Some(Protocol::Gt06), "not hex", t());
        assert_eq!(out[0]["error"], "bad_input");
        let out = s.decode_line(None, "what is this", t());
        assert_eq!(out[0]["error"], "bad_input");
        assert!(s.decode_line(None, "   ", t()).is_empty());
        assert!(Session::with_imei("abc").is_err());
    }
}
