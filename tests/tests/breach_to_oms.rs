//! Issue #5's done-criterion, end to end: a GT06 tag leaving its curfew home during an active
//! curfew window becomes a curfew alert in PostgreSQL and a signed `alert.created` POST at the
//! offender-management system (OMS); alert changes made while the OMS answers 503 are
//! delivered exactly once, in order, after it recovers.
//!
//! The OMS is a real HTTP server (axum on 127.0.0.1:0) that checks the `X-EM-Signature`
//! HMAC-SHA256 itself, the way an OMS would, with `hmac` + `sha2` (not the platform's own
//! verification function), and de-duplicates by `Idempotency-Key`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use chrono::{Duration as ChronoDuration, Utc};
use em_alerts::OmsPayload;
use em_e2e::*;
use em_model::{
    AlertKind, AlertState, BreachRules, Protocol, Role, ScheduleSpec, Subject, User, WeeklyWindow,
    ZoneGeometry, ZoneKind, ZoneSpec,
};
use em_store::{AlertFilter, OutboxStatus, Store};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "e2e-oms-shared-secret-0123456789";
const HOME: [f64; 2] = [12.5683, 55.6761]; // lon, lat (Copenhagen)
const TZ: &str = "Europe/Copenhagen";

/// One request as the OMS saw it.
#[derive(Debug, Clone)]
struct Hit {
    status: u16,
    key: String,
    event_header: String,
    attempt: u32,
    /// `X-EM-Timestamp`: Unix seconds of the attempt.
    timestamp: i64,
    signature_ok: bool,
    /// Accepted, but the key had been processed before (absorbed by idempotency).
    duplicate: bool,
    body: Option<Value>,
}

/// The stand-in OMS.
struct Oms {
    secret: Vec<u8>,
    failing: AtomicBool,
    hits: Mutex<Vec<Hit>>,
    processed: Mutex<HashSet<String>>,
}

impl Oms {
    fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("hits lock").clone()
    }

    /// Accepted, first-time deliveries about alert `id`, in arrival order.
    fn delivered(&self, alert_id: i64) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.status == 200 && !h.duplicate)
            .filter(|h| {
                h.body
                    .as_ref()
                    .and_then(|b| b.pointer("/alert/id"))
                    .and_then(Value::as_i64)
                    == Some(alert_id)
            })
            .collect()
    }
}

fn header(h: &HeaderMap, name: &str) -> String {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// HMAC-SHA256 of the raw body with the shared secret, compared in constant time with the
/// hex digest of `sha256=<hex>`.
fn signature_ok(secret: &[u8], body: &[u8], header_value: &str) -> bool {
    let Some(hex_digest) = header_value.strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_digest) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

async fn webhook(State(oms): State<Arc<Oms>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let key = header(&headers, "idempotency-key");
    let signature_ok = signature_ok(&oms.secret, &body, &header(&headers, "x-em-signature"));
    let parsed: Option<Value> = serde_json::from_slice(&body).ok();
    let mut hit = Hit {
        status: 0,
        key: key.clone(),
        event_header: header(&headers, "x-em-event"),
        attempt: header(&headers, "x-em-attempt").parse().unwrap_or(0),
        timestamp: header(&headers, "x-em-timestamp").parse().unwrap_or(0),
        signature_ok,
        duplicate: false,
        body: parsed.clone(),
    };
    let status = if oms.failing.load(Ordering::SeqCst) {
        StatusCode::SERVICE_UNAVAILABLE
    } else if !signature_ok {
        StatusCode::UNAUTHORIZED
    } else {
        match parsed
            .as_ref()
            .and_then(|b| b.get("id"))
            .and_then(Value::as_str)
        {
            Some(id) if !key.is_empty() && id == key => {
                let first = oms.processed.lock().expect("lock").insert(key);
                hit.duplicate = !first;
                StatusCode::OK
            }
            _ => StatusCode::BAD_REQUEST,
        }
    };
    hit.status = status.as_u16();
    oms.hits.lock().expect("hits lock").push(hit);
    status
}

/// Starts the OMS receiver; returns its webhook URL.
async fn start_oms(oms: Arc<Oms>, stop: CancellationToken) -> String {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind the OMS receiver");
    let addr = listener.local_addr().expect("OMS address");
    let app = Router::new()
        .route("/em/webhook", post(webhook))
        .with_state(oms);
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(e) = served {
            eprintln!("OMS receiver failed: {e}");
        }
    });
    format!("http://{addr}/em/webhook")
}

/// A curfew window around now on every day of the week, in the subject's local time.
fn curfew_around_now() -> ScheduleSpec {
    let tz: chrono_tz::Tz = TZ.parse().expect("time zone");
    let local = Utc::now().with_timezone(&tz);
    let start = (local - ChronoDuration::hours(1))
        .format("%H:%M")
        .to_string();
    let end = (local + ChronoDuration::hours(2))
        .format("%H:%M")
        .to_string();
    ScheduleSpec {
        windows: (1..=7)
            .map(|day| WeeklyWindow {
                day,
                start: start.clone(),
                end: end.clone(),
            })
            .collect(),
        exceptions: Vec::new(),
    }
}

struct Seeded {
    subject: i64,
    zone: i64,
    reference: String,
    officer: User,
}

async fn seed(store: &dyn Store, imei: &str) -> Seeded {
    let mut officer = User {
        id: 0,
        username: "officer.e2e".into(),
        display_name: "E2E Officer".into(),
        role: Role::Officer,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$ZTJlc2FsdA$ZTJlaGFzaA".into(),
        active: true,
    };
    officer.id = store.upsert_user(&officer).await.expect("officer");
    let reference = format!("OMS-CASE-{}", std::process::id());
    let subject = store
        .upsert_subject(&Subject {
            id: 0,
            reference: reference.clone(),
            display_name: "Curfew Subject".into(),
            officer_id: Some(officer.id),
            timezone: TZ.into(),
            order_start: Some(Utc::now() - ChronoDuration::days(30)),
            order_end: Some(Utc::now() + ChronoDuration::days(30)),
            rules: BreachRules {
                buffer_m: 10.0,
                consecutive_fixes: 3,
                // Persistence by count only in this test (the time rule would need an hour).
                persist_secs: 3600,
                no_fix_secs: 3600,
            },
        })
        .await
        .expect("subject");
    let zone = store
        .upsert_zone(&ZoneSpec {
            id: 0,
            subject_id: Some(subject),
            group: None,
            name: "Home".into(),
            kind: ZoneKind::Inclusion,
            geometry: ZoneGeometry::Circle {
                center: HOME,
                radius_m: 150.0,
            },
            schedule: Some(curfew_around_now()),
            is_curfew_home: true,
        })
        .await
        .expect("curfew home zone");
    register(store, imei, Protocol::Gt06).await;
    store
        .assign_device(imei, subject, Utc::now() - ChronoDuration::hours(2))
        .await
        .expect("assign the tag");
    Seeded {
        subject,
        zone,
        reference,
        officer,
    }
}

async fn subject_alerts(store: &dyn Store, subject: i64) -> Vec<em_model::Alert> {
    store
        .list_alerts(&AlertFilter {
            subject_ids: Some(vec![subject]),
            ..AlertFilter::default()
        })
        .await
        .expect("list alerts")
}

fn is_curfew_breach(kind: AlertKind) -> bool {
    matches!(
        kind,
        AlertKind::CurfewViolation | AlertKind::InclusionZoneExit
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curfew_breach_reaches_the_oms_signed_and_survives_an_outage() {
    let Some((store, schema)) = postgres().await else {
        return;
    };
    let imei = "358307100005001";
    let seeded = seed(&*store, imei).await;

    let stop_oms = CancellationToken::new();
    let oms = Arc::new(Oms {
        secret: SECRET.as_bytes().to_vec(),
        failing: AtomicBool::new(false),
        hits: Mutex::new(Vec::new()),
        processed: Mutex::new(HashSet::new()),
    });
    let url = start_oms(oms.clone(), stop_oms.clone()).await;

    let mut cfg = service_config(&schema);
    cfg.alerts.oms.enabled = true;
    cfg.alerts.oms.url = Some(url);
    cfg.alerts.oms.secret = Some(SECRET.into());
    cfg.alerts.oms.timeout_secs = 5;
    cfg.alerts.oms.max_attempts = 10_000;
    cfg.alerts.oms.backoff_base_ms = 50;
    cfg.alerts.oms.backoff_max_ms = 250;
    cfg.alerts.oms.poll_interval_ms = 50;
    let svc = start(cfg).await;

    // The tag: at home, then clearly outside (~2 km north), every fix acknowledged.
    let mut tag = Gt06Tag::login(svc.gt06(), imei).await.expect("login");
    let t0 = now_s() - ChronoDuration::seconds(300);
    let mut t = t0;
    let mut next = || {
        t += ChronoDuration::seconds(10);
        t
    };
    for i in 0..3 {
        let lat = HOME[1] + f64::from(i) * 0.0001;
        tag.fix(next(), lat, HOME[0])
            .await
            .expect("fix at home ACKed");
    }
    for i in 0..4 {
        let lat = HOME[1] + 0.02 + f64::from(i) * 0.001;
        tag.fix(next(), lat, HOME[0])
            .await
            .expect("fix outside ACKed");
    }

    // 1. The alert row in PostgreSQL.
    eventually("a curfew alert row in PostgreSQL", STEP, || async {
        subject_alerts(&*store, seeded.subject)
            .await
            .iter()
            .any(|a| is_curfew_breach(a.kind))
    })
    .await;
    let alerts = subject_alerts(&*store, seeded.subject).await;
    let breaches: Vec<_> = alerts.iter().filter(|a| is_curfew_breach(a.kind)).collect();
    assert_eq!(breaches.len(), 1, "one breach, one alert: {alerts:#?}");
    let alert = breaches[0].clone();
    assert_eq!(alert.kind, AlertKind::CurfewViolation, "{alert:#?}");
    assert_eq!(alert.device_id.as_deref(), Some(imei));
    assert_eq!(alert.zone_id, Some(seeded.zone));
    assert_eq!(alert.state, AlertState::Open);
    assert!(alert.started_at >= t0 && alert.started_at <= Utc::now());

    // 2. The signed alert.created at the OMS.
    eventually("alert.created delivered to the OMS", STEP, || async {
        !oms.delivered(alert.id).is_empty()
    })
    .await;
    let created = oms.delivered(alert.id)[0].clone();
    assert!(created.signature_ok, "signature verified by the OMS");
    assert_eq!(created.event_header, "alert.created");
    assert!(!created.key.is_empty(), "Idempotency-Key header present");
    assert!(
        (Utc::now().timestamp() - created.timestamp).abs() < 120,
        "X-EM-Timestamp is the time of the attempt ({})",
        created.timestamp
    );
    let body = created.body.clone().expect("JSON body");
    let payload: OmsPayload = serde_json::from_value(body.clone()).expect("OMS payload shape");
    assert_eq!(payload.id, created.key, "body id = Idempotency-Key");
    assert_eq!(payload.event, "alert.created");
    assert_eq!(payload.schema_version, 1);
    assert_eq!(payload.subject.id, seeded.subject);
    assert_eq!(
        payload.subject.reference.as_deref(),
        Some(seeded.reference.as_str()),
        "the subject's OMS case reference travels with the alert"
    );
    assert_eq!(payload.alert.id, alert.id);
    assert_eq!(payload.alert.kind, AlertKind::CurfewViolation);
    assert_eq!(payload.alert.device_id.as_deref(), Some(imei));
    assert_eq!(
        body.pointer("/alert/kind").and_then(Value::as_str),
        Some("curfew_violation")
    );
    assert!(!payload.alert.message.is_empty());

    // 3. Outage: every request is answered 503. Meanwhile an officer acknowledges the alert
    // and the subject comes home (the condition ends).
    oms.failing.store(true, Ordering::SeqCst);
    let failed_before = oms.hits().iter().filter(|h| h.status == 503).count();
    let acked = svc
        .alerts
        .acknowledge(alert.id, &seeded.officer)
        .await
        .expect("acknowledge");
    assert_eq!(acked.state, AlertState::Acknowledged);
    for i in 0..4 {
        let lat = HOME[1] + f64::from(i) * 0.0001;
        tag.fix(next(), lat, HOME[0])
            .await
            .expect("fix back home ACKed");
    }
    eventually("the alert's end recorded in PostgreSQL", STEP, || async {
        store
            .get_alert(alert.id)
            .await
            .expect("get alert")
            .is_some_and(|a| a.alert.ended_at.is_some())
    })
    .await;
    // Several refused attempts, and the changes wait in the outbox.
    eventually("the OMS refused several retries", STEP, || async {
        oms.hits().iter().filter(|h| h.status == 503).count() >= failed_before + 4
    })
    .await;
    let pending = store
        .count_outbox(em_alerts::OMS_CHANNEL, OutboxStatus::Pending)
        .await
        .expect("count outbox");
    assert!(pending >= 2, "both changes wait in the outbox ({pending})");
    assert_eq!(
        oms.delivered(alert.id).len(),
        1,
        "nothing delivered during the outage"
    );

    // 4. Recovery: everything arrives, exactly once, in order.
    oms.failing.store(false, Ordering::SeqCst);
    eventually(
        "the changes made during the outage delivered",
        STEP,
        || async { oms.delivered(alert.id).len() >= 3 },
    )
    .await;
    // Give the worker time to (wrongly) send anything again.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let delivered = oms.delivered(alert.id);
    let events: Vec<&str> = delivered.iter().map(|h| h.event_header.as_str()).collect();
    assert_eq!(
        events,
        ["alert.created", "alert.acknowledged", "alert.updated"],
        "each change exactly once, in commit order"
    );
    let versions: Vec<i64> = delivered
        .iter()
        .map(|h| {
            h.body
                .as_ref()
                .and_then(|b| b.get("alert_version"))
                .and_then(Value::as_i64)
                .expect("alert_version")
        })
        .collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "alert versions increase: {versions:?}"
    );
    let ack_key = &delivered[1].key;
    let ack_attempts: Vec<u32> = oms
        .hits()
        .iter()
        .filter(|h| &h.key == ack_key)
        .map(|h| h.attempt)
        .collect();
    assert!(
        ack_attempts.len() >= 2 && ack_attempts.windows(2).all(|w| w[0] < w[1]),
        "the acknowledgement was retried under the same key with rising attempt numbers: {ack_attempts:?}"
    );
    let ack_body = delivered[1].body.clone().expect("body");
    assert_eq!(
        ack_body
            .pointer("/alert/acknowledged_by")
            .and_then(Value::as_i64),
        Some(seeded.officer.id)
    );
    assert_eq!(
        ack_body
            .pointer("/subject/reference")
            .and_then(Value::as_str),
        Some(seeded.reference.as_str())
    );
    assert!(delivered[2]
        .body
        .as_ref()
        .and_then(|b| b.pointer("/alert/ended_at"))
        .is_some_and(|v| !v.is_null()));

    let hits = oms.hits();
    assert!(
        hits.iter().all(|h| h.signature_ok),
        "every request carried a valid signature"
    );
    assert!(
        hits.iter().all(|h| h.status == 200 || h.status == 503),
        "no request was malformed: {:?}",
        hits.iter()
            .map(|h| (h.status, h.key.as_str()))
            .collect::<Vec<_>>()
    );
    assert!(
        hits.iter().all(|h| !h.duplicate),
        "no message was delivered twice"
    );
    assert_eq!(
        store
            .count_outbox(em_alerts::OMS_CHANNEL, OutboxStatus::Pending)
            .await
            .expect("count"),
        0
    );
    assert_eq!(
        store
            .count_outbox(em_alerts::OMS_CHANNEL, OutboxStatus::DeadLetter)
            .await
            .expect("count"),
        0
    );
    let final_alert = store
        .get_alert(alert.id)
        .await
        .expect("get")
        .expect("alert")
        .alert;
    assert_eq!(final_alert.state, AlertState::Acknowledged);
    assert!(final_alert.ended_at.is_some());

    drop(tag);
    svc.stop().await;
    stop_oms.cancel();
}
