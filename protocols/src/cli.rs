//! The decoding logic of the `em-decode` tool, kept here (I/O-free) so it is tested.
//!
//! One input line is one frame: hex for GT06 and Teltonika, raw text for H02 and
//! OsmAnd, `topic payload` for EM. Each decoded record becomes one JSON object (the
//! serialised [`Record`]); each error becomes `{"error": reason, "message": …}`.
//! A [`Session`] keeps the per-connection state (GT06 login, Teltonika IMEI) across
//! lines, as a TCP connection would.

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_util::codec::Decoder;

use crate::gt06::{Gt06Codec, Imei};
use crate::h02::H02Codec;
use crate::teltonika::TeltonikaCodec;
use crate::{detect, em, osmand, CodecError, DecodeError, Protocol, Record};

/// Decoding state across lines.
#[derive(Debug, Clone, Default)]
pub struct Session {
    gt06: Gt06Codec,
    teltonika: TeltonikaCodec,
    h02: H02Codec,
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
    json!({
        "error": e.reason(),
        "protocol": e.protocol().as_str(),
        "message": e.to_string(),
        "fatal": e.is_fatal(),
    })
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
                    None => detect(line.as_bytes()),
                };
                match guess {
                    Some(p) => p,
                    None => return vec![input_error(None, "could not detect the protocol")],
                }
            }
        };
        match protocol {
            Protocol::Gt06 | Protocol::Teltonika => {
                let Some(bytes) = parse_hex(line) else {
                    return vec![input_error(Some(protocol), "expected a hex-encoded frame")];
                };
                let mut buf = BytesMut::from(&bytes[..]);
                if protocol == Protocol::Gt06 {
                    let codec = &mut self.gt06;
                    drain(codec, &mut buf, |codec, frame| {
                        let id = codec.device_id().unwrap_or_default().to_owned();
                        records_json(frame.to_records(&id, received), frame.kind())
                    })
                } else {
                    let codec = &mut self.teltonika;
                    drain(codec, &mut buf, |codec, frame| {
                        let id = codec.imei().unwrap_or_default().to_owned();
                        records_json(frame.to_records(&id, received), frame.kind())
                    })
                }
            }
            Protocol::H02 => {
                let mut buf = BytesMut::from(line.as_bytes());
                drain(&mut self.h02, &mut buf, |_, frame| {
                    records_json(frame.to_records(frame.device_id(), received), frame.kind())
                })
            }
            Protocol::Osmand => match osmand::decode(line) {
                Ok(report) => records_json(report.to_records(received), "report"),
                Err(e) => vec![error_json(&e)],
            },
            Protocol::Em => {
                let Some((topic, payload)) = line.split_once(char::is_whitespace) else {
                    return vec![input_error(Some(protocol), "expected `topic payload`")];
                };
                match em::decode(topic, payload.trim().as_bytes()) {
                    Ok(msg) => records_json(msg.to_records(received), msg.topic.as_str()),
                    Err(e) => vec![error_json(&e)],
                }
            }
        }
    }
}

/// Run a streaming codec over one line's bytes until it is used up.
fn drain<C, F, T>(codec: &mut C, buf: &mut BytesMut, mut on_frame: F) -> Vec<Value>
where
    C: Decoder<Item = Result<T, DecodeError>, Error = CodecError>,
    F: FnMut(&C, T) -> Vec<Value>,
{
    let mut out = Vec::new();
    loop {
        match codec.decode_eof(buf) {
            Ok(Some(Ok(frame))) => {
                let values = on_frame(codec, frame);
                out.extend(values);
            }
            Ok(Some(Err(e))) => out.push(error_json(&e)),
            Ok(None) => break,
            Err(CodecError::Fatal(e)) => {
                out.push(error_json(&e));
                break;
            }
            Err(CodecError::Io(e)) => {
                out.push(input_error(None, e.to_string()));
                break;
            }
        }
    }
    out
}
