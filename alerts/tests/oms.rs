//! OMS webhook delivery against a REAL HTTP receiver (axum on 127.0.0.1:0): an outage with
//! recovery, ordering, idempotency, signatures, dead-lettering of 4xx answers, retry limits.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use chrono::Utc;
use em_alerts::*;
use em_model::*;
use em_store::{OutboxStatus, Store};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use common::*;

const SECRET: &str = "oms-shared-secret-for-tests";

#[derive(Debug, Clone)]
struct Delivery {
    key: String,
    signature_ok: bool,
    timestamp: i64,
    event_header: String,
    body: Value,
}

/// What the fake OMS answers and what it has seen.
#[derive(Default)]
struct Receiver {
    /// Answer 503 until this instant (the outage).
    outage_until: Option<Instant>,
    /// Answer this status to everything (with a short text body).
    fixed: Option<u16>,
    hits: usize,
    unavailable: usize,
    accepted: Vec<Delivery>,
    /// Accepted deliveries per idempotency key (a real OMS would dedupe; we count).
    per_key: HashMap<String, usize>,
}

type Shared = Arc<Mutex<Receiver>>;

/// Recomputes the HMAC independently of the crate under test.
fn signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(sig) = headers.get("x-em-signature").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    sig == expected
}

async fn webhook(
    State(rx): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let mut r = rx.lock().unwrap();
    r.hits += 1;
    if let Some(code) = r.fixed {
        return (
            StatusCode::from_u16(code).unwrap(),
            format!("fixed answer {code}: unknown case reference"),
        );
    }
    if r.outage_until.is_some_and(|t| Instant::now() < t) {
        r.unavailable += 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "maintenance".into());
    }
    let h = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    if h("content-type") != "application/json" {
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, "json only".into());
    }
    let d = Delivery {
        key: h("idempotency-key"),
        signature_ok: signature_ok(&headers, &body),
        timestamp: h("x-em-timestamp").parse().unwrap_or(0),
        event_header: h("x-em-event"),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
    };
    *r.per_key.entry(d.key.clone()).or_default() += 1;
    r.accepted.push(d);
    (StatusCode::OK, "ok".into())
}

async fn start_receiver(rx: Shared) -> SocketAddr {
    let app = Router::new()
        .route("/webhook", post(webhook))
        .with_state(rx);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    addr
}

fn config(addr: SocketAddr) -> AlertConfig {
    AlertConfig {
        oms: OmsConfig {
            enabled: true,
            url: Some(format!("http://{addr}/webhook")),
            secret: Some(SECRET.into()),
            timeout_secs: 5,
            max_attempts: 10_000,
            backoff_base_ms: 10,
            backoff_max_ms: 150,
            poll_interval_ms: 10,
            batch_size: 100,
            concurrency: 4,
        },
        ..AlertConfig::default()
    }
}

/// Field names of a JSON document, recursively (values ignored) — the payload "shape".
/// `alert.evidence` is free-form (it depends on the alert kind) and compared as opaque.
fn shape(v: &Value) -> Value {
    fn walk(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (k.clone(), walk(v))).collect())
            }
            _ => Value::Null,
        }
    }
    let mut s = walk(v);
    if let Some(e) = s.pointer_mut("/alert/evidence") {
        *e = Value::Null;
    }
    s
}

fn example_payload() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/examples/oms/alert-created.json"
    );
    let text = std::fs::read_to_string(path).expect("docs/examples/oms/alert-created.json");
    serde_json::from_str(&text).expect("example is JSON")
}

#[test]
fn documented_example_matches_the_payload_type() {
    let v = example_payload();
    let p: OmsPayload =
        serde_json::from_value(v.clone()).expect("example deserialises (deny_unknown_fields)");
    assert_eq!(p.schema_version, OMS_SCHEMA_VERSION);
    assert_eq!(p.event, events::CREATED);
    assert_eq!(p.alert.state, AlertState::Open);
    // Serialising back gives the same document: no field is missing from the example.
    assert_eq!(serde_json::to_value(&p).unwrap(), v);
}

async fn outage_on(name: &str, store: Arc<dyn Store>) {
    let rx: Shared = Arc::default();
    let addr = start_receiver(rx.clone()).await;
    let cfg = config(addr);
    let service = Arc::new(AlertService::new(store.clone(), cfg.clone()).unwrap());
    let f = fixture(&store).await;
    let mut subjects = vec![(f.subject, "CASE-2025-0042".to_string())];
    for i in 1..3 {
        let reference = format!("CASE-2025-01{i:02}");
        subjects.push((subject(&store, &reference).await, reference));
    }
    let mut feed = NoticeLog::at(service.store()).await;

    // The OMS is down for the first 1.5 s of delivery ("1 hour" with fast back-off).
    rx.lock().unwrap().outage_until = Some(Instant::now() + Duration::from_millis(1500));

    let ops = |step: usize| {
        let service = service.clone();
        let subjects = subjects.clone();
        let officer = f.officer.clone();
        async move {
            for (s, _) in &subjects {
                let t = minutes_ago(60 - step as i64);
                match step {
                    0 => {
                        service
                            .handle(Signal::new(AlertKind::StrapTamper, Phase::Started, *s, t))
                            .await
                            .unwrap();
                    }
                    1 => {
                        service
                            .handle(Signal::new(
                                AlertKind::CurfewViolation,
                                Phase::Started,
                                *s,
                                t,
                            ))
                            .await
                            .unwrap();
                    }
                    2 => {
                        let a = service
                            .store()
                            .ongoing_alert(*s, AlertKind::StrapTamper, None)
                            .await
                            .unwrap()
                            .unwrap()
                            .alert;
                        service.acknowledge(a.id, &officer).await.unwrap();
                    }
                    3 => {
                        service
                            .handle(Signal::new(AlertKind::LowBattery, Phase::Started, *s, t))
                            .await
                            .unwrap();
                        // A repeat: folded, no OMS message.
                        service
                            .handle(Signal::new(AlertKind::LowBattery, Phase::Ongoing, *s, t))
                            .await
                            .unwrap();
                    }
                    4 => {
                        // Ends and resolves automatically: two messages.
                        service
                            .handle(Signal::new(AlertKind::LowBattery, Phase::Ended, *s, t))
                            .await
                            .unwrap();
                    }
                    _ => {
                        // The subject comes home (the end is an OMS message), then the
                        // officer closes the alert: a live condition cannot be resolved.
                        service
                            .handle(Signal::new(AlertKind::CurfewViolation, Phase::Ended, *s, t))
                            .await
                            .unwrap();
                        let a = service
                            .store()
                            .ongoing_alert(*s, AlertKind::CurfewViolation, None)
                            .await
                            .unwrap()
                            .unwrap()
                            .alert;
                        service
                            .resolve(a.id, &officer, "subject_contacted", None)
                            .await
                            .unwrap();
                    }
                }
            }
        }
    };

    // Half of the changes happen before the worker starts, half during the outage.
    for step in 0..3 {
        ops(step).await;
    }
    let worker = OutboxWorker::new(store.clone(), cfg.oms.clone()).unwrap();
    let token = CancellationToken::new();
    let task = tokio::spawn(worker.run(token.clone()));
    for step in 3..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        ops(step).await;
    }

    // Expected order per subject = order of the changes that write an OMS message.
    let mut expected: BTreeMap<SubjectId, Vec<(AlertId, String)>> = BTreeMap::new();
    let mut folded = 0;
    for n in feed.drain().await {
        if n.event == events::UPDATED && n.alert.ended_at.is_none() {
            folded += 1; // a repeat: not sent to the OMS
            continue;
        }
        expected
            .entry(n.alert.subject_id)
            .or_default()
            .push((n.alert.id, n.event));
    }
    assert_eq!(folded, 3);
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(total, 24, "{name}: 8 OMS messages per subject");

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let delivered = store
            .count_outbox("oms", OutboxStatus::Delivered)
            .await
            .unwrap();
        if delivered as usize == total {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: only {delivered}/{total} delivered after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("worker stops on shutdown")
        .unwrap();

    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::Pending)
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::DeadLetter)
            .await
            .unwrap(),
        0
    );

    let r = rx.lock().unwrap();
    assert!(r.unavailable > 0, "{name}: the outage was not exercised");
    assert_eq!(r.accepted.len(), total, "{name}: accepted deliveries");
    // Exactly once per idempotency key.
    assert_eq!(r.per_key.len(), total);
    assert!(
        r.per_key.values().all(|n| *n == 1),
        "{name}: duplicates {:?}",
        r.per_key
    );

    let example_shape = shape(&example_payload());
    let now = Utc::now().timestamp();
    let mut got: BTreeMap<SubjectId, Vec<(AlertId, String)>> = BTreeMap::new();
    for d in &r.accepted {
        assert!(d.signature_ok, "{name}: bad signature on {}", d.key);
        assert!(
            (now - d.timestamp).abs() < 300,
            "X-EM-Timestamp {}",
            d.timestamp
        );
        let p: OmsPayload = serde_json::from_value(d.body.clone()).expect("payload shape");
        assert_eq!(p.id, d.key, "Idempotency-Key header = body id");
        assert_eq!(p.event, d.event_header);
        assert_eq!(p.schema_version, OMS_SCHEMA_VERSION);
        let reference = subjects
            .iter()
            .find(|(s, _)| *s == p.alert.subject_id)
            .map(|(_, r)| r.clone());
        assert_eq!(p.subject.reference, reference);
        assert_eq!(p.subject.id, p.alert.subject_id);
        // Same field set as the documented example (values aside).
        assert_eq!(
            shape(&d.body),
            example_shape,
            "{name}: payload shape drifted from docs"
        );
        got.entry(p.alert.subject_id)
            .or_default()
            .push((p.alert.id, p.event.clone()));
    }
    assert_eq!(got, expected, "{name}: per-subject delivery order");
}

#[tokio::test]
async fn oms_outage_recovers_in_order_exactly_once_with_valid_signatures() {
    for (name, store) in stores().await {
        outage_on(name, store).await;
    }
}

#[tokio::test]
async fn client_errors_dead_letter_without_blocking_the_subject() {
    let store = em_store::testing::sqlite_store().await;
    let rx: Shared = Arc::default();
    let addr = start_receiver(rx.clone()).await;
    let cfg = config(addr);
    let service = AlertService::new(store.clone(), cfg.clone()).unwrap();
    let worker = OutboxWorker::new(store.clone(), cfg.oms.clone()).unwrap();
    let f = fixture(&store).await;

    rx.lock().unwrap().fixed = Some(400);
    let a = service
        .handle(Signal::new(
            AlertKind::CaseTamper,
            Phase::Started,
            f.subject,
            minutes_ago(1),
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(worker.run_once().await.unwrap(), 0);
    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::DeadLetter)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::Pending)
            .await
            .unwrap(),
        0
    );
    // Not retried.
    assert_eq!(worker.run_once().await.unwrap(), 0);
    assert_eq!(rx.lock().unwrap().hits, 1);

    // 408 and 429 are retryable, not dead letters.
    for code in [408u16, 429] {
        rx.lock().unwrap().fixed = Some(code);
        service
            .handle(Signal::new(
                AlertKind::LowBattery,
                Phase::Started,
                f.subject,
                minutes_ago(1),
            ))
            .await
            .unwrap();
        worker.run_once().await.unwrap();
        let pending = store
            .due_outbox("oms", Utc::now() + chrono::Duration::hours(1), 10)
            .await
            .unwrap();
        assert_eq!(pending.len(), 1, "{code}");
        assert_eq!(pending[0].attempts, 1);
        assert!(
            pending[0]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains(&code.to_string())),
            "{:?}",
            pending[0].last_error
        );
        rx.lock().unwrap().fixed = None;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            worker.run_once().await.unwrap(),
            1,
            "{code}: delivered after recovery"
        );
        service
            .handle(Signal::new(
                AlertKind::LowBattery,
                Phase::Ended,
                f.subject,
                minutes_ago(0),
            ))
            .await
            .unwrap();
        while worker.run_once().await.unwrap() > 0 {}
    }

    // A later change of the same subject still flows (the dead letter does not block it).
    service.acknowledge(a.id, &f.officer).await.unwrap();
    assert_eq!(worker.run_once().await.unwrap(), 1);
    let last = rx.lock().unwrap().accepted.last().cloned().unwrap();
    assert_eq!(last.body["event"], json!("alert.acknowledged"));
    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::DeadLetter)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn retryable_failures_dead_letter_after_the_attempt_limit() {
    let store = em_store::testing::sqlite_store().await;
    let rx: Shared = Arc::default();
    let addr = start_receiver(rx.clone()).await;
    let mut cfg = config(addr);
    cfg.oms.max_attempts = 3;
    cfg.oms.backoff_base_ms = 1;
    cfg.oms.backoff_max_ms = 2;
    let service = AlertService::new(store.clone(), cfg.clone()).unwrap();
    let worker = OutboxWorker::new(store.clone(), cfg.oms.clone()).unwrap();
    let f = fixture(&store).await;
    rx.lock().unwrap().fixed = Some(503);
    service
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Started,
            f.subject,
            minutes_ago(1),
        ))
        .await
        .unwrap();
    for _ in 0..50 {
        worker.run_once().await.unwrap();
        if store
            .count_outbox("oms", OutboxStatus::DeadLetter)
            .await
            .unwrap()
            == 1
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::DeadLetter)
            .await
            .unwrap(),
        1
    );
    assert_eq!(rx.lock().unwrap().hits, 3, "exactly max_attempts attempts");
}

#[tokio::test]
async fn unreachable_oms_keeps_messages_pending() {
    let store = em_store::testing::sqlite_store().await;
    // A port nothing listens on.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let cfg = config(addr);
    let service = AlertService::new(store.clone(), cfg.clone()).unwrap();
    let worker = OutboxWorker::new(store.clone(), cfg.oms.clone()).unwrap();
    let f = fixture(&store).await;
    service
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Started,
            f.subject,
            minutes_ago(1),
        ))
        .await
        .unwrap();
    assert_eq!(worker.run_once().await.unwrap(), 0);
    let pending = store
        .due_outbox("oms", Utc::now() + chrono::Duration::hours(1), 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].attempts, 1);
    assert!(pending[0].next_attempt_at > pending[0].created_at);
    assert!(
        pending[0]
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("connection failed")),
        "{:?}",
        pending[0].last_error
    );
}

#[tokio::test]
async fn worker_refuses_to_start_when_oms_is_disabled() {
    let store = em_store::testing::sqlite_store().await;
    let err = OutboxWorker::new(store, OmsConfig::default()).unwrap_err();
    assert!(err.to_string().contains("disabled"), "{err}");
}
