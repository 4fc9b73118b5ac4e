//! Shared harness of the dashboard tests: a seeded store, the app on 127.0.0.1:0, and
//! small HTTP helpers.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use em_alerts::{AlertConfig, AlertService};
use em_dashboard::{ensure_user, router, AppState, DashboardConfig};
use em_model::{BreachRules, Role, Subject, SubjectId, UserId};
use em_store::Store;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, COOKIE, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::Value;

pub const PASSWORD: &str = "correct-horse-battery";

pub struct App {
    pub base: String,
    pub state: AppState,
    pub store: Arc<dyn Store>,
    pub alerts: Arc<AlertService>,
    pub officer_a: UserId,
    pub officer_b: UserId,
    pub supervisor: UserId,
    pub admin: UserId,
    pub subject_a: SubjectId,
    pub subject_b: SubjectId,
    pub http: reqwest::Client,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub fn subject(reference: &str, name: &str, officer: UserId) -> Subject {
    Subject {
        id: 0,
        reference: reference.into(),
        display_name: name.into(),
        officer_id: Some(officer),
        timezone: "UTC".into(),
        order_start: None,
        order_end: None,
        rules: BreachRules::default(),
    }
}

/// Seed two officers with one subject each, a supervisor and an admin; serve the app.
pub async fn start(store: Arc<dyn Store>, config: DashboardConfig) -> App {
    let s = store.as_ref();
    let officer_a = ensure_user(s, "officer.a", "Anna Officer", Role::Officer, PASSWORD)
        .await
        .expect("seed officer a");
    let officer_b = ensure_user(s, "officer.b", "Bo Officer", Role::Officer, PASSWORD)
        .await
        .expect("seed officer b");
    let supervisor = ensure_user(s, "super", "Sara Supervisor", Role::Supervisor, PASSWORD)
        .await
        .expect("seed supervisor");
    let admin = ensure_user(s, "admin", "Adam Admin", Role::Admin, PASSWORD)
        .await
        .expect("seed admin");
    let subject_a = store
        .upsert_subject(&subject("CASE-A", "Alex Andersen", officer_a))
        .await
        .expect("subject a");
    let subject_b = store
        .upsert_subject(&subject("CASE-B", "Billie Berg", officer_b))
        .await
        .expect("subject b");
    let alerts =
        Arc::new(AlertService::new(store.clone(), AlertConfig::default()).expect("alert service"));
    let state = AppState::new(store.clone(), alerts.clone()).with_config(&config);
    let app = router(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        if let Err(e) = axum::serve(listener, app).await {
            eprintln!("test server stopped: {e}");
        }
    });
    App {
        base: format!("http://{addr}"),
        state,
        store,
        alerts,
        officer_a,
        officer_b,
        supervisor,
        admin,
        subject_a,
        subject_b,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client"),
        server,
    }
}

/// Test config: fast failed logins.
pub fn config() -> DashboardConfig {
    DashboardConfig {
        login_failure_delay_ms: 10,
        ..DashboardConfig::default()
    }
}

/// A logged-in session (cookie based, as the page uses it).
#[derive(Clone)]
pub struct Session {
    pub cookie: String,
    pub base: String,
    pub http: reqwest::Client,
}

pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub text: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

pub async fn raw(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    cookie: Option<&str>,
    body: Option<Value>,
) -> Resp {
    let mut req = http.request(method, url);
    if let Some(c) = cookie {
        req = req.header(COOKIE, c);
    }
    if let Some(b) = body {
        req = req
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(b.to_string());
    } else {
        req = req.header("X-Requested-With", "test");
    }
    let res = req.send().await.expect("request");
    Resp {
        status: res.status(),
        headers: res.headers().clone(),
        text: res.text().await.expect("body"),
    }
}

impl App {
    pub async fn login_response(&self, username: &str, password: &str) -> Resp {
        raw(
            &self.http,
            Method::POST,
            &format!("{}/api/login", self.base),
            None,
            Some(serde_json::json!({ "username": username, "password": password })),
        )
        .await
    }

    pub async fn login(&self, username: &str) -> Session {
        let r = self.login_response(username, PASSWORD).await;
        assert_eq!(r.status, StatusCode::OK, "login {username}: {}", r.text);
        let set = r
            .headers
            .get(SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .expect("Set-Cookie")
            .to_string();
        let cookie = set.split(';').next().expect("cookie pair").to_string();
        Session {
            cookie,
            base: self.base.clone(),
            http: self.http.clone(),
        }
    }

    pub async fn audit_actions(&self, actor: UserId) -> Vec<em_model::AuditEntry> {
        self.store
            .list_audit(&em_store::AuditFilter {
                actor_id: Some(actor),
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .expect("audit")
    }
}

impl Session {
    pub async fn get(&self, path: &str) -> Resp {
        raw(
            &self.http,
            Method::GET,
            &format!("{}{path}", self.base),
            Some(&self.cookie),
            None,
        )
        .await
    }
    pub async fn post(&self, path: &str, body: Option<Value>) -> Resp {
        raw(
            &self.http,
            Method::POST,
            &format!("{}{path}", self.base),
            Some(&self.cookie),
            body,
        )
        .await
    }
    pub async fn put(&self, path: &str, body: Value) -> Resp {
        raw(
            &self.http,
            Method::PUT,
            &format!("{}{path}", self.base),
            Some(&self.cookie),
            Some(body),
        )
        .await
    }
    pub async fn delete(&self, path: &str) -> Resp {
        raw(
            &self.http,
            Method::DELETE,
            &format!("{}{path}", self.base),
            Some(&self.cookie),
            None,
        )
        .await
    }
}

pub fn ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .expect("test timestamp")
        .with_timezone(&Utc)
}

/// Minimal reader of a `text/event-stream` response.
pub struct SseReader {
    res: reqwest::Response,
    buf: String,
}

impl SseReader {
    pub async fn open(s: &Session) -> SseReader {
        let res = s
            .http
            .get(format!("{}/api/alerts/stream", s.base))
            .header(COOKIE, &s.cookie)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .expect("stream");
        assert_eq!(res.status(), StatusCode::OK);
        SseReader {
            res,
            buf: String::new(),
        }
    }

    /// Next (event, data) within `wait`, skipping keep-alive comments; None on timeout.
    pub async fn next(&mut self, wait: Duration) -> Option<(String, String)> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Some(pos) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..pos + 2).collect();
                let mut event = String::from("message");
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if !data.is_empty() || event != "message" {
                    return Some((event, data));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.res.chunk()).await;
            match chunk {
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// Next `alert` event's notice within `wait`.
    pub async fn next_alert(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let (event, data) = self.next(left).await?;
            if event == "alert" {
                return Some(serde_json::from_str(&data).expect("notice JSON"));
            }
        }
    }
}

/// Seeds data whose optional fields are both set and unset, so that responses exercise every
/// nullable field: a subject without officer or order, a device with full and bare records, a
/// record without position, a victim device, zones with and without schedule, and alerts in
/// every state (with and without device, zone, end, acknowledgement, resolution note).
pub async fn seed_variety(app: &App) {
    use em_alerts::{Phase, Signal};
    use em_model::{
        AlertKind, Device, DeviceClass, ExceptionKind, FixSource, Position, Protocol, Record,
        ScheduleException, ScheduleSpec, WeeklyWindow, ZoneGeometry, ZoneKind, ZoneSpec,
    };
    use em_store::StoredRecord;
    use serde_json::json;

    let s = app.store.as_ref();
    let now = Utc::now();
    s.upsert_subject(&Subject {
        officer_id: None,
        ..subject("CASE-C", "Chris Carlsen", app.officer_a)
    })
    .await
    .expect("subject c");
    s.upsert_subject(&Subject {
        order_start: Some(now - chrono::Duration::days(30)),
        order_end: Some(now + chrono::Duration::days(300)),
        ..subject("CASE-D", "Dana Dahl", app.officer_b)
    })
    .await
    .expect("subject d");
    for (id, class) in [
        ("tag-a", DeviceClass::OffenderTag),
        ("tag-b", DeviceClass::OffenderTag),
        ("victim-1", DeviceClass::Victim),
    ] {
        s.upsert_device(&Device {
            device_id: id.into(),
            protocol: Protocol::Em,
            secret: None,
            active: true,
            class,
        })
        .await
        .expect("device");
    }
    s.assign_device("tag-a", app.subject_a, now - chrono::Duration::days(2))
        .await
        .expect("assign a");
    s.assign_device("tag-b", app.subject_b, now - chrono::Duration::days(2))
        .await
        .expect("assign b");
    let full = Position {
        lat: 55.6761,
        lon: 12.5683,
        accuracy_m: Some(8.0),
        speed_kmh: Some(4.5),
        course_deg: Some(45.0),
        altitude_m: Some(12.0),
        satellites: Some(9),
        valid: true,
        source: FixSource::Gnss,
    };
    let bare = Position {
        accuracy_m: None,
        speed_kmh: None,
        course_deg: None,
        altitude_m: None,
        satellites: None,
        valid: false,
        ..full
    };
    let mut records = Vec::new();
    let mut victim = Vec::new();
    for (i, pos) in [Some(full), Some(bare), None].into_iter().enumerate() {
        let t = now - chrono::Duration::minutes(30 - 5 * i as i64);
        let mut r = Record::new("tag-a", Protocol::Em, t);
        r.position = pos;
        if i == 0 {
            r.battery_pct = Some(80);
            r.charging = Some(false);
            r.beacon_in_range = Some(true);
        }
        records.push(StoredRecord {
            subject_id: Some(app.subject_a),
            record: r,
        });
        let mut v = Record::new("victim-1", Protocol::Em, t);
        v.position = pos.or(Some(full));
        victim.push(v);
    }
    // Subject b's latest record has no position at all.
    records.push(StoredRecord {
        subject_id: Some(app.subject_b),
        record: Record::new("tag-b", Protocol::Em, now - chrono::Duration::minutes(3)),
    });
    s.insert_records(&records).await.expect("records");
    s.insert_victim_records(&victim)
        .await
        .expect("victim records");

    let zone = ZoneSpec {
        id: 0,
        subject_id: Some(app.subject_a),
        group: None,
        name: "Home".into(),
        kind: ZoneKind::Inclusion,
        geometry: ZoneGeometry::Circle {
            center: [12.5683, 55.6761],
            radius_m: 150.0,
        },
        schedule: Some(ScheduleSpec {
            windows: vec![WeeklyWindow {
                day: 1,
                start: "21:00".into(),
                end: "07:00".into(),
            }],
            exceptions: vec![
                ScheduleException {
                    kind: ExceptionKind::Absence,
                    start: now,
                    end: now + chrono::Duration::hours(2),
                    note: None,
                },
                ScheduleException {
                    kind: ExceptionKind::Absence,
                    start: now + chrono::Duration::days(1),
                    end: now + chrono::Duration::days(2),
                    note: Some("hospital".into()),
                },
            ],
        }),
        is_curfew_home: true,
    };
    let home = s.upsert_zone(&zone).await.expect("home zone");
    s.upsert_zone(&ZoneSpec {
        name: "Park".into(),
        kind: ZoneKind::Exclusion,
        geometry: ZoneGeometry::Polygon {
            rings: vec![vec![[12.0, 55.0], [12.1, 55.0], [12.1, 55.1]]],
        },
        schedule: None,
        is_curfew_home: false,
        ..zone.clone()
    })
    .await
    .expect("park zone");

    let kinds = [
        (AlertKind::LostCommunication, None, None),
        (AlertKind::LowBattery, Some("tag-a"), None),
        (AlertKind::InclusionZoneExit, Some("tag-a"), Some(home)),
        (AlertKind::StrapTamper, Some("tag-a"), None),
    ];
    let mut ids = Vec::new();
    for (kind, device, zone) in kinds {
        let alert = app
            .alerts
            .handle(Signal {
                kind,
                phase: Phase::Started,
                subject_id: app.subject_a,
                device_id: device.map(Into::into),
                zone_id: zone,
                at: now - chrono::Duration::minutes(20),
                evidence: json!({}),
            })
            .await
            .expect("raise")
            .expect("kind enabled");
        ids.push(alert.id);
    }
    // The zone exit ends and is resolved with a note; one alert is acknowledged.
    app.alerts
        .handle(Signal {
            kind: AlertKind::InclusionZoneExit,
            phase: Phase::Ended,
            subject_id: app.subject_a,
            device_id: Some("tag-a".into()),
            zone_id: Some(home),
            at: now - chrono::Duration::minutes(10),
            evidence: json!({}),
        })
        .await
        .expect("end");
    let sup = app.login("super").await;
    let r = sup.post(&format!("/api/alerts/{}/ack", ids[1]), None).await;
    assert_eq!(r.status, StatusCode::OK, "ack: {}", r.text);
    let r = sup
        .post(
            &format!("/api/alerts/{}/resolve", ids[2]),
            Some(json!({ "code": "other", "note": "checked on site" })),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "resolve: {}", r.text);
}
