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
