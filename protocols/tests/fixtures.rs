//! Runs every fixture under `protocols/fixtures/<protocol>/` (GT06 and Teltonika have their
//! own frame-level runner, `tests/fixtures_frames.rs`): a frame file (`*.hex`: one
//! hex frame or byte stream per line; `*.txt`: one text frame per line) and a `*.json` of
//! the same name with `source` (the document and section the frame was built from),
//! optional `received` (RFC 3339, default 2025-03-15T10:00:00Z) and `output`: the values
//! `em-decode` prints for the file, in order, decoded on one connection.
//!
//! `output` is compared as a pattern: every key of an expected object must be present
//! with an equal value (a `null` also matches an absent key), arrays must have the same
//! length, numbers match within 1e-6. Keys not in the pattern are not checked, so a
//! fixture states what its source defines; `events` and `cells` are always given in full.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use em_protocols::cli::Session;
use em_protocols::Protocol;
use serde_json::Value;

fn matches(expected: &Value, actual: Option<&Value>, path: &str, errors: &mut Vec<String>) {
    match (expected, actual) {
        (Value::Null, None | Some(Value::Null)) => {}
        (Value::Object(e), Some(Value::Object(a))) => {
            for (k, v) in e {
                matches(v, a.get(k), &format!("{path}.{k}"), errors);
            }
        }
        (Value::Array(e), Some(Value::Array(a))) => {
            if e.len() != a.len() {
                errors.push(format!(
                    "{path}: expected {} items, got {}: {}",
                    e.len(),
                    a.len(),
                    Value::Array(a.clone())
                ));
                return;
            }
            for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                matches(ev, Some(av), &format!("{path}[{i}]"), errors);
            }
        }
        (Value::Number(e), Some(Value::Number(a))) => {
            let (e, a) = (e.as_f64().unwrap(), a.as_f64().unwrap());
            if (e - a).abs() > 1e-6 {
                errors.push(format!("{path}: expected {e}, got {a}"));
            }
        }
        (e, a) => {
            if Some(e) != a {
                errors.push(format!("{path}: expected {e}, got {a:?}"));
            }
        }
    }
}

/// Protocol folders whose fixtures `tests/fixtures_frames.rs` runs (frame + response level).
const FRAME_LEVEL: [&str; 2] = ["gt06", "teltonika"];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Decodes one fixture; returns the mismatches.
fn run_fixture(protocol: Protocol, frames: &Path) -> Result<Vec<String>, String> {
    let json_path = frames.with_extension("json");
    let spec: Value = serde_json::from_str(
        &std::fs::read_to_string(&json_path)
            .map_err(|e| format!("{}: {e}", json_path.display()))?,
    )
    .map_err(|e| format!("{}: {e}", json_path.display()))?;
    let source = spec["source"].as_str().unwrap_or_default();
    if source.len() < 10 {
        return Err(format!("{}: names no source", json_path.display()));
    }
    let received: DateTime<Utc> = spec["received"]
        .as_str()
        .unwrap_or("2025-03-15T10:00:00Z")
        .parse()
        .map_err(|e| format!("{}: received: {e}", json_path.display()))?;
    let text = std::fs::read_to_string(frames).map_err(|e| e.to_string())?;
    let mut session = Session::new();
    let mut actual = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        actual.extend(session.decode_line(Some(protocol), line, received));
    }
    let mut errors = Vec::new();
    matches(
        &spec["output"],
        Some(&Value::Array(actual)),
        "output",
        &mut errors,
    );
    Ok(errors)
}

#[test]
fn every_fixture_decodes_to_its_expected_output() {
    let mut failures = Vec::new();
    let mut counts = Vec::new();
    let mut dirs: Vec<_> = std::fs::read_dir(fixtures_dir())
        .expect("fixtures dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        // GT06 and Teltonika fixtures are frame-level (`tests/fixtures_frames.rs`).
        if FRAME_LEVEL.contains(&name.as_str()) {
            continue;
        }
        let protocol: Protocol = name
            .parse()
            .unwrap_or_else(|e| panic!("fixtures/{name}: {e}"));
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("hex" | "txt")))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "fixtures/{name} has no frames");
        for f in &files {
            match run_fixture(protocol, f) {
                Ok(errs) => failures.extend(errs.into_iter().map(|e| {
                    format!("{}: {e}", f.strip_prefix(fixtures_dir()).unwrap().display())
                })),
                Err(e) => failures.push(e),
            }
        }
        counts.push(format!("{name}: {}", files.len()));
    }
    assert!(
        failures.is_empty(),
        "fixture mismatches:\n{}",
        failures.join("\n")
    );
    eprintln!("fixtures run: {}", counts.join(", "));
}

/// The runner itself fails on a wrong value (a test that cannot fail proves nothing).
#[test]
fn matcher_catches_differences() {
    let mut errs = Vec::new();
    let exp: Value = serde_json::json!({"a": 1.0, "events": ["sos"], "p": null});
    matches(
        &exp,
        Some(&serde_json::json!({"a": 1.0000001, "events": ["sos"], "x": 3})),
        "",
        &mut errs,
    );
    assert!(errs.is_empty(), "{errs:?}");
    matches(
        &exp,
        Some(&serde_json::json!({"a": 2, "events": ["sos", "power_cut"], "p": 1})),
        "",
        &mut errs,
    );
    assert_eq!(errs.len(), 3, "{errs:?}");
}
