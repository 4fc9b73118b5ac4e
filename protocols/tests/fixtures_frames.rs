//! Runs every fixture of `protocols/fixtures/<protocol>/*.json` (frames constructed from the
//! vendor documents by `protocols/fixtures/build.py`, each naming its source).
//!
//! A fixture feeds its frames (hex; all of them into one connection's codec, in order) and
//! compares each decoded item with its expectation: an `error` reason, or the `records` (only
//! the keys written in the fixture are compared; numbers within 1e-6), the `response` bytes
//! (hex or null), the number of `rejected` records and a `command` text.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use em_protocols::gt06::{Gt06Codec, Imei};
use em_protocols::teltonika::{udp, TeltonikaCodec, TeltonikaFrame};
use em_protocols::{DecodeError, Decoder};
use serde_json::Value;

struct Outcome {
    records: Vec<Value>,
    response: Option<Vec<u8>>,
    rejected: usize,
    command: Option<String>,
}

fn fixtures(protocol: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(protocol);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    files
}

/// `expected` ⊆ `actual`: every key of an expected object is compared, numbers within 1e-6.
fn matches(expected: &Value, actual: &Value, path: &str) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, v) in e {
                let got = a.get(k).unwrap_or(&Value::Null);
                matches(v, got, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!("{path}: expected {expected}, got {actual}"));
            }
            for (i, (x, y)) in e.iter().zip(a).enumerate() {
                matches(x, y, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Number(e), Value::Number(a)) => {
            let (e, a) = (e.as_f64().unwrap(), a.as_f64().unwrap());
            if (e - a).abs() <= 1e-6 {
                Ok(())
            } else {
                Err(format!("{path}: expected {e}, got {a}"))
            }
        }
        _ if expected == actual => Ok(()),
        _ => Err(format!("{path}: expected {expected}, got {actual}")),
    }
}

fn check(file: &Path, fx: &Value, outcomes: Vec<Result<Outcome, DecodeError>>) {
    let name = file.file_name().unwrap().to_string_lossy();
    let source = fx["source"].as_str().unwrap_or("");
    assert!(!source.is_empty(), "{name}: a fixture names its source");
    let expect = fx["expect"].as_array().unwrap();
    assert_eq!(
        outcomes.len(),
        expect.len(),
        "{name}: {} items decoded, {} expected",
        outcomes.len(),
        expect.len()
    );
    for (i, (got, exp)) in outcomes.into_iter().zip(expect).enumerate() {
        let at = format!("{name} item {i}");
        if let Some(reason) = exp.get("error") {
            let e = got
                .err()
                .unwrap_or_else(|| panic!("{at}: expected an error"));
            assert_eq!(Some(e.reason()), reason.as_str(), "{at}: {e}");
            continue;
        }
        let got = got.unwrap_or_else(|e| panic!("{at}: {e}"));
        let records = Value::Array(got.records);
        if let Err(msg) = matches(&exp["records"], &records, "records") {
            panic!("{at}: {msg}\nall records: {records:#}");
        }
        let response = exp["response"].as_str().map(|h| hex::decode(h).unwrap());
        assert_eq!(
            got.response.as_deref().map(hex::encode),
            response.as_deref().map(hex::encode),
            "{at}: response"
        );
        let rejected = exp.get("rejected").and_then(Value::as_u64).unwrap_or(0);
        assert_eq!(got.rejected as u64, rejected, "{at}: rejected records");
        if let Some(c) = exp.get("command") {
            assert_eq!(got.command.as_deref(), c.as_str(), "{at}: command text");
        }
    }
}

fn received(fx: &Value) -> DateTime<Utc> {
    fx["received"].as_str().unwrap().parse().unwrap()
}

fn frames(fx: &Value) -> Vec<Vec<u8>> {
    fx["frames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| hex::decode(h.as_str().unwrap()).unwrap())
        .collect()
}

#[test]
fn gt06_fixtures() {
    for file in fixtures("gt06") {
        let fx: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let now = received(&fx);
        let imei = fx["imei"].as_str().unwrap();
        let mut codec = Gt06Codec::with_imei(Imei::parse(imei).unwrap());
        let mut out = Vec::new();
        for bytes in frames(&fx) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Some(item) = codec
                .decode_eof(&mut buf)
                .expect("GT06 never loses framing")
            {
                out.push(item.map(|f| {
                    Outcome {
                        records: f
                            .to_records(imei, now)
                            .iter()
                            .map(|r| serde_json::to_value(r).unwrap())
                            .collect(),
                        response: f.response_at(now).map(|b| b.to_vec()),
                        rejected: 0,
                        command: None,
                    }
                }));
            }
        }
        check(&file, &fx, out);
    }
}

fn teltonika_outcome(f: &TeltonikaFrame, imei: &str, now: DateTime<Utc>) -> Outcome {
    Outcome {
        records: f
            .to_records(imei, now)
            .iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect(),
        response: f.response().map(|b| b.to_vec()),
        rejected: match f {
            TeltonikaFrame::AvlPartial(p) => p.rejected.len(),
            _ => 0,
        },
        command: match f {
            TeltonikaFrame::Command(c) => Some(c.text()),
            _ => None,
        },
    }
}

#[test]
fn teltonika_fixtures() {
    for file in fixtures("teltonika") {
        let fx: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let now = received(&fx);
        let imei = fx["imei"].as_str().unwrap();
        let mut out = Vec::new();
        if fx["transport"] == "udp" {
            for bytes in frames(&fx) {
                out.push(udp::parse_udp(&bytes).map(|p| {
                    assert_eq!(p.imei, imei);
                    let mut o = teltonika_outcome(&p.frame, imei, now);
                    o.response = Some(p.response().to_vec());
                    o
                }));
            }
        } else {
            let mut codec = TeltonikaCodec::with_imei(imei);
            for bytes in frames(&fx) {
                let mut buf = BytesMut::from(&bytes[..]);
                while let Some(item) = codec.decode_eof(&mut buf).expect("framing kept") {
                    out.push(item.map(|f| teltonika_outcome(&f, imei, now)));
                }
            }
        }
        check(&file, &fx, out);
    }
}
