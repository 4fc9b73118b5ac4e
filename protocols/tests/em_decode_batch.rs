//! `em-decode` batch mode, through the binary: many frames from a file or stdin, one
//! connection's state across them, raw byte streams, and the summary.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::Value;

fn em_decode(args: &[&str], stdin: &[u8]) -> (i32, Vec<Value>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_em-decode"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run em-decode");
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let lines = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    (
        out.status.code().unwrap_or(-1),
        lines,
        String::from_utf8(out.stderr).unwrap(),
    )
}

const LOGIN: &str = "78 78 0D 01 01 23 45 67 89 01 23 45 00 01 8C DD 0D 0A";
const GT06_LOC: &str = "78781F120B081D112E10CF027AC7EB0C46584900148F01CC00287D001FB8000380810D0A";

#[test]
fn file_of_mixed_frames_keeps_state_and_summarises() {
    let dir = std::env::temp_dir().join(format!("em-decode-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("frames.txt");
    let frames = [
        GT06_LOC, // before login: refused (not_logged_in)
        LOGIN,
        GT06_LOC, // after login: decoded with the IMEI learned from the login line
        "*HQ,865205030001234,V1,101530,A,5540.8000,N,954.9490,E,3.50,120,150325,FFFFFBFF#",
        "*HQ,865205030001234,ZZ9,1#",
        "*HQ,865205030001234,ZZ9,2#",
        "244209917123101530150325554080004b012345000e012270fffffbffff0000",
        r#"{"device_id":"tc-1","location":{"timestamp":"2025-03-15T10:15:30Z","coords":{"latitude":55.6761,"longitude":12.5683}}}"#,
        "not a frame",
    ];
    std::fs::write(&path, frames.join("\n")).unwrap();
    let (code, lines, stderr) = em_decode(
        &["--file", path.to_str().unwrap(), "--summary", "json"],
        b"",
    );
    assert_eq!(code, 1, "something was refused: exit 1\n{stderr}");
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(summary["refused"]["not_logged_in"], 1, "{summary}");
    assert_eq!(summary["refused"]["unknown_type"], 2, "{summary}");
    assert_eq!(summary["refused"]["bad_input"], 1, "{summary}");
    assert_eq!(summary["unknown_types"]["h02:ZZ9"], 2, "{summary}");
    assert_eq!(summary["kinds"]["gt06:login"], 1, "{summary}");
    assert_eq!(summary["kinds"]["gt06:location"], 1, "{summary}");
    assert_eq!(summary["kinds"]["h02:location"], 1, "{summary}");
    assert_eq!(summary["kinds"]["h02:binary_location"], 1, "{summary}");
    assert_eq!(summary["kinds"]["osmand:report"], 1, "{summary}");
    assert_eq!(summary["decoded"], 5, "{summary}");
    let gt06_fix = lines
        .iter()
        .find(|v| v["protocol"] == "gt06" && !v["position"].is_null())
        .expect("a GT06 fix");
    assert_eq!(gt06_fix["device_id"], "123456789012345");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn stdin_quiet_text_summary() {
    let input = "*HQ,865205030001234,XT#\n*HQ,865205030001234,HTBT,80#\n";
    let (code, lines, stderr) = em_decode(&["--protocol", "h02", "--quiet"], input.as_bytes());
    assert_eq!(code, 0, "{stderr}");
    assert!(lines.is_empty(), "quiet prints no records");
    assert!(
        stderr.contains("decoded: 2 frames, 2 records; refused: 0"),
        "{stderr}"
    );
    assert!(stderr.contains("decoded h02:heartbeat: 2"), "{stderr}");
}

#[test]
fn raw_stream_of_one_connection() {
    // A GT06 capture: login, then the location, as one byte stream (no line structure).
    let mut raw = hex::decode(LOGIN.replace(' ', "")).unwrap();
    raw.extend(hex::decode(GT06_LOC).unwrap());
    raw.extend(b"\x00\x01garbage"); // trailing bytes that are no frame
    let (code, lines, _) = em_decode(&["--raw", "--summary", "json"], &raw);
    assert_eq!(code, 1);
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(summary["kinds"]["gt06:location"], 1, "{summary}");
    assert_eq!(summary["decoded"], 2, "{summary}");
    assert!(summary["refused_total"].as_u64().unwrap() >= 1, "{summary}");
    // H02 text and binary reports mixed in one raw stream.
    let mut h02 = b"*HQ,4209917123,XT#\r\n".to_vec();
    h02.extend(
        hex::decode("244209917123101530150325554080004b012345000e012270fffffbffff0000").unwrap(),
    );
    h02.extend(b"*HQ,4209917123,HTBT#");
    let (code, lines, stderr) = em_decode(&["--raw", "-p", "h02", "--summary", "json"], &h02);
    assert_eq!(code, 0, "{stderr}");
    let summary = &lines.last().unwrap()["summary"];
    assert_eq!(summary["decoded"], 3, "{summary}");
    assert_eq!(summary["refused_total"], 0, "{summary}");
    // The HTBT heartbeat's echo is shown.
    assert!(lines.iter().any(|v| v["reply"] == "*HQ,4209917123,HTBT#"));
}
