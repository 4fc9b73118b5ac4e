//! The example payloads of docs/examples/em validate against docs/em-protocol.schema.json
//! AND decode with our decoder; invalid payloads fail both.

use std::path::PathBuf;

use chrono::{TimeZone, Utc};
use em_model::{DeviceEventKind, FixSource};
use em_protocols::em;

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn validator() -> jsonschema::Validator {
    let text = std::fs::read_to_string(docs().join("em-protocol.schema.json")).unwrap();
    let schema: serde_json::Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&schema).expect("schema compiles")
}

#[test]
fn every_example_validates_and_decodes() {
    let validator = validator();
    let mut seen = 0;
    for entry in std::fs::read_dir(docs().join("examples/em")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let kind = name.split('-').next().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{name} fails the schema: {errors:?}");
        let topic = format!("em/v1/tag-0001/{kind}");
        let msg = em::decode(&topic, &bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!msg.to_records(Utc::now()).is_empty());
        seen += 1;
    }
    assert!(seen >= 5, "only {seen} examples found");
}

#[test]
fn examples_decode_to_the_documented_values() {
    let read = |f: &str| std::fs::read(docs().join("examples/em").join(f)).unwrap();
    let received = Utc.with_ymd_and_hms(2025, 3, 15, 0, 0, 0).unwrap();

    let msg = em::decode("em/v1/tag-0001/telemetry", &read("telemetry-gnss.json")).unwrap();
    let r = &msg.to_records(received)[0];
    assert_eq!(r.device_id, "tag-0001");
    assert_eq!(r.seq, Some(1842));
    assert_eq!(
        r.device_time,
        Utc.with_ymd_and_hms(2025, 3, 14, 21, 5, 30).unwrap()
    );
    assert_eq!(r.received_time, received);
    let p = r.position.unwrap();
    assert_eq!(
        (p.lat, p.lon, p.accuracy_m),
        (55.676098, 12.568337, Some(6.5))
    );
    assert_eq!(p.source, FixSource::Gnss);
    assert_eq!(
        (r.battery_pct, r.charging, r.gsm_signal),
        (Some(78), Some(false), Some(64))
    );
    assert_eq!(r.beacon_in_range, Some(false));
    assert!(r.events.is_empty());

    let msg = em::decode("em/v1/tag-0001/telemetry", &read("telemetry-lbs-hdop.json")).unwrap();
    let r = &msg.to_records(received)[0];
    // 21:10:30+01:00 = 20:10:30Z; HDOP 1.8 × 5 m
    assert_eq!(
        r.device_time,
        Utc.with_ymd_and_hms(2025, 3, 14, 20, 10, 30).unwrap()
    );
    let p = r.position.unwrap();
    assert_eq!(p.source, FixSource::Lbs);
    assert!((p.accuracy_m.unwrap() - 9.0).abs() < 1e-4);

    let msg = em::decode("em/v1/tag-0001/event", &read("event-strap-tamper.json")).unwrap();
    let r = &msg.to_records(received)[0];
    assert_eq!(r.events, vec![DeviceEventKind::StrapTamper]);
    assert!(!r.position.unwrap().valid);

    let msg = em::decode("em/v1/tag-0001/status", &read("status-heartbeat.json")).unwrap();
    let r = &msg.to_records(received)[0];
    assert_eq!(
        r.events,
        vec![
            DeviceEventKind::Heartbeat,
            DeviceEventKind::LowBattery,
            DeviceEventKind::ChargerConnected
        ]
    );

    let msg = em::decode("em/v1/tag-0001/telemetry", &read("telemetry-batch.json")).unwrap();
    assert!(msg.batch);
    let recs = msg.to_records(received);
    assert_eq!(
        recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
        vec![Some(500), Some(501)]
    );
    assert_eq!(recs[1].position.unwrap().source, FixSource::Beacon);
}

#[test]
fn invalid_payloads_fail_schema_and_decoder() {
    let validator = validator();
    for bad in [
        r#"{"time":"2025-03-14T21:05:30Z"}"#,
        r#"{"seq":-1,"time":"2025-03-14T21:05:30Z"}"#,
        r#"{"seq":1,"time":"yesterday"}"#,
        r#"{"seq":1,"time":"2025-03-14T21:05:30Z","position":{"lat":91,"lon":0}}"#,
        r#"{"seq":1,"time":"2025-03-14T21:05:30Z","position":{"lon":0}}"#,
        r#"{"seq":1,"time":"2025-03-14T21:05:30Z","battery_pct":101}"#,
        r#"{"seq":1,"time":"2025-03-14T21:05:30Z","strap":"cut"}"#,
        r#"{"seq":1,"time":"2025-03-14T21:05:30Z","position":{"lat":1,"lon":2,"source":"radar"}}"#,
        r#"[]"#,
        r#"42"#,
    ] {
        let value: serde_json::Value = serde_json::from_str(bad).unwrap();
        assert!(!validator.is_valid(&value), "schema accepts {bad}");
        assert!(
            em::decode("em/v1/tag-0001/telemetry", bad.as_bytes()).is_err(),
            "decoder accepts {bad}"
        );
    }
}
