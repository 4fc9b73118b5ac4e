//! Victim data is its own class (issue 12, findings 3 and 4), end to end through the service:
//! a supervisor creates a dynamic (victim-protection) zone through the dashboard API; the
//! victim's device and the offender's tag talk GT06; the victim's records land in the victim
//! store (never in positions / latest state); the zone is enforced (a victim-proximity alert);
//! and the officer's alert list, the live SSE feed and the MQTT alert feed carry the distance
//! and bearing to the protected person but none of the victim's coordinates. A victim liaison
//! officer reads the victim's positions (audited); the officer gets 403.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Duration as ChronoDuration;
use common::*;
use em_alerts::{AlertConfig, AlertService};
use em_dashboard::{ensure_user, router, AppState};
use em_model::{AlertKind, BreachRules, DeviceClass, Protocol, Role, Subject};
use em_store::{AuditFilter, Store};
use reqwest::header::{CONTENT_TYPE, COOKIE, SET_COOKIE};
use reqwest::StatusCode;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(20);
const PASSWORD: &str = "correct-horse-battery";

/// Where the protected person is (distinctive digits: the assertions look for them).
const VICTIM: (f64, f64) = (55.683217, 12.571934);
/// The offender, ~150 m south-west of the victim (inside a 500 m protection circle).
const OFFENDER: (f64, f64) = (55.682150, 12.570410);

/// True when the broker answers; otherwise SKIPPED (or a panic under CI=true).
async fn mosquitto_available(url: &str) -> bool {
    let u = em_ingest::config::MqttUrl::parse(url).expect("MQTT_URL");
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((u.host.as_str(), u.port)),
    )
    .await
    {
        Ok(Ok(_)) => true,
        _ => {
            let msg = format!("MQTT broker not reachable at {url}; set MQTT_URL");
            if in_ci() {
                panic!("CI=true and {msg}");
            }
            eprintln!("\n*** SKIPPED: {msg} ***\n");
            false
        }
    }
}

/// The dashboard router over `store` and `alerts` on 127.0.0.1:0; returns its base URL.
async fn serve_dashboard(store: Arc<dyn Store>, alerts: Arc<AlertService>) -> String {
    let app = router(AppState::new(store, alerts));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

struct Session {
    base: String,
    cookie: String,
    http: reqwest::Client,
}

impl Session {
    async fn login(base: &str, username: &str) -> Session {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .expect("client");
        let r = http
            .post(format!("{base}/api/login"))
            .json(&json!({ "username": username, "password": PASSWORD }))
            .send()
            .await
            .expect("login");
        assert_eq!(r.status(), StatusCode::OK, "login {username}");
        let cookie = r
            .headers()
            .get(SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .expect("cookie")
            .to_string();
        Session {
            base: base.to_string(),
            cookie,
            http,
        }
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header(COOKIE, &self.cookie)
            .send()
            .await
            .expect("GET");
        (r.status(), r.text().await.expect("body"))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, String) {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, &self.cookie)
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("POST");
        (r.status(), r.text().await.expect("body"))
    }

    /// Opens the live alert feed; returns the raw `data:` lines of `alert` events as they come.
    async fn alert_stream(&self) -> Arc<Mutex<Vec<String>>> {
        let mut res = self
            .http
            .get(format!("{}/api/alerts/stream", self.base))
            .header(COOKIE, &self.cookie)
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .expect("stream");
        assert_eq!(res.status(), StatusCode::OK);
        let out = Arc::new(Mutex::new(Vec::new()));
        let o2 = out.clone();
        tokio::spawn(async move {
            let mut buf = String::new();
            while let Ok(Some(chunk)) = res.chunk().await {
                buf.push_str(&String::from_utf8_lossy(&chunk));
                while let Some(pos) = buf.find("\n\n") {
                    let block: String = buf.drain(..pos + 2).collect();
                    if block.lines().any(|l| l.trim() == "event: alert") {
                        let data: String = block
                            .lines()
                            .filter_map(|l| l.strip_prefix("data:"))
                            .map(str::trim_start)
                            .collect();
                        o2.lock().unwrap().push(data);
                    }
                }
            }
        });
        out
    }
}

/// The victim's coordinates as the store holds them must not appear in `raw`, neither in full
/// nor to 5 decimals (~1 m); distance and bearing must.
fn assert_no_victim_position(what: &str, raw: &str, victim: &[(f64, f64)]) {
    assert!(
        raw.contains("\"distance_m\"") && raw.contains("\"bearing_deg\""),
        "{what}: no distance/bearing in {raw}"
    );
    for (lat, lon) in victim {
        for c in [*lat, *lon] {
            let full = c.to_string();
            let trunc = format!("{:.6}", c);
            let trunc = &trunc[..trunc.len() - 1];
            assert!(
                !raw.contains(&full) && !raw.contains(trunc),
                "{what}: victim coordinate {full} in {raw}"
            );
        }
    }
}

async fn victim_data_stays_apart(db: TestDb) {
    let url = mqtt_url();
    if !mosquitto_available(&url).await {
        return;
    }
    let store = db.store.clone();
    let pid = std::process::id() % 100_000;
    let backend = match &db.backend {
        Backend::Sqlite(_) => 1,
        Backend::Postgres(_) => 2,
    };
    let offender_imei = format!("3583071{backend}{pid:05}01");
    let victim_imei = format!("3583071{backend}{pid:05}02");
    let s = store.as_ref();
    let officer = ensure_user(s, "officer", "Olga Officer", Role::Officer, PASSWORD)
        .await
        .expect("officer");
    ensure_user(s, "super", "Sara Supervisor", Role::Supervisor, PASSWORD)
        .await
        .expect("supervisor");
    ensure_user(s, "liaison", "Liv Liaison", Role::VictimLiaison, PASSWORD)
        .await
        .expect("liaison");
    let sid = store
        .upsert_subject(&Subject {
            id: 0,
            reference: format!("CASE-{offender_imei}"),
            display_name: "Offender".into(),
            officer_id: Some(officer),
            timezone: "Europe/Copenhagen".into(),
            order_start: None,
            order_end: None,
            rules: BreachRules {
                buffer_m: 10.0,
                consecutive_fixes: 2,
                persist_secs: 3600,
                no_fix_secs: 3600,
            },
        })
        .await
        .expect("subject");
    register(s, &offender_imei, Protocol::Gt06, None).await;
    store
        .assign_device(
            &offender_imei,
            sid,
            chrono::Utc::now() - ChronoDuration::hours(2),
        )
        .await
        .expect("assign");
    // The victim's device is registered like any device; saving the zone makes it a victim device.
    register(s, &victim_imei, Protocol::Gt06, None).await;

    // A supervisor creates the dynamic zone through the API (before the service loads orders).
    let setup_alerts =
        Arc::new(AlertService::new(store.clone(), AlertConfig::default()).expect("alerts"));
    let setup = serve_dashboard(store.clone(), setup_alerts).await;
    let sup = Session::login(&setup, "super").await;
    let (status, body) = sup
        .post(
            &format!("/api/subjects/{sid}/zones"),
            json!({"name": "Victim protection", "kind": "exclusion", "shape": "dynamic",
                   "device_id": victim_imei, "radius_m": 500}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        store
            .get_device(&victim_imei)
            .await
            .unwrap()
            .map(|d| d.class),
        Some(DeviceClass::Victim)
    );

    // The service, publishing alerts to Mosquitto.
    let mut cfg = test_config(&db);
    cfg.mqtt.url = url.clone();
    cfg.mqtt.publish_alerts = true;
    cfg.mqtt.client_id = format!("em-victim-test-{pid}-{backend}");
    cfg.validate().expect("config");
    let shutdown = CancellationToken::new();
    let svc = em_ingest::service::Service::start(cfg, shutdown.clone())
        .await
        .expect("service");
    let addrs = svc.addrs.clone();
    let base = serve_dashboard(svc.store.clone(), svc.alerts.clone()).await;
    let task = tokio::spawn(svc.wait());

    // An MQTT subscriber on the alert feed.
    let u = em_ingest::config::MqttUrl::parse(&url).unwrap();
    let mut o = MqttOptions::new(format!("em-victim-feed-{pid}-{backend}"), u.host, u.port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(o, 16);
    client
        .subscribe("em/v1/alerts/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mqtt_msgs: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let m2 = mqtt_msgs.clone();
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let sub2 = subscribed.clone();
    let poller = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => sub2.notify_one(),
                Ok(Event::Incoming(Packet::Publish(p))) => m2
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&p.payload).into_owned()),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    tokio::time::timeout(T, subscribed.notified())
        .await
        .expect("SUBACK");

    let officer_session = Session::login(&base, "officer").await;
    let sse = officer_session.alert_stream().await;

    // The victim's device reports its position (ACKed only once durably stored).
    let t0 = now_s() - ChronoDuration::seconds(30);
    let mut v = connect(addrs.gt06.unwrap()).await;
    send(&mut v, &gt06_login(&victim_imei, 1)).await;
    read_n(&mut v, 10, T).await.expect("victim login ACK");
    send(&mut v, &gt06_alarm(2, t0, VICTIM.0, VICTIM.1)).await;
    read_n(&mut v, 10, T).await.expect("victim ACK");
    assert_eq!(
        store.count_victim_records(&victim_imei).await.unwrap(),
        2,
        "ACKed => stored in the victim store (the login and the fix)"
    );

    // The offender walks up to ~150 m of the victim.
    let mut o = connect(addrs.gt06.unwrap()).await;
    send(&mut o, &gt06_login(&offender_imei, 1)).await;
    read_n(&mut o, 10, T).await.expect("offender login ACK");
    for i in 0..3u16 {
        let t = t0 + ChronoDuration::seconds(5 + 5 * i64::from(i));
        send(&mut o, &gt06_alarm(10 + i, t, OFFENDER.0, OFFENDER.1)).await;
        read_n(&mut o, 10, T).await.expect("offender ACK");
    }
    eventually("victim proximity alert", T, || async {
        alerts_of(s, sid)
            .await
            .iter()
            .any(|a| a.kind == AlertKind::VictimProximity)
    })
    .await;

    // Victim records: in the victim store only.
    let victim_points = store
        .victim_positions(
            &victim_imei,
            t0 - ChronoDuration::hours(1),
            t0 + ChronoDuration::hours(1),
            100,
        )
        .await
        .unwrap();
    assert_eq!(victim_points.len(), 1);
    let victim: Vec<(f64, f64)> = victim_points
        .iter()
        .map(|p| (p.position.lat, p.position.lon))
        .collect();
    assert!((victim[0].0 - VICTIM.0).abs() < 1e-4);
    assert_eq!(store.count_records(&victim_imei).await.unwrap(), 0);
    assert!(store
        .latest_states(None)
        .await
        .unwrap()
        .iter()
        .all(|l| l.device_id != victim_imei));
    assert!(store.count_records(&offender_imei).await.unwrap() >= 3);

    // The stored alert, the officer's list, the SSE feed and the MQTT feed.
    let alert = alerts_of(s, sid)
        .await
        .into_iter()
        .find(|a| a.kind == AlertKind::VictimProximity)
        .unwrap();
    let stored = serde_json::to_string(&alert).unwrap();
    assert_no_victim_position("stored alert", &stored, &victim);
    let d = alert.evidence["distance_m"].as_f64().expect("distance");
    assert!((100.0..=200.0).contains(&d), "distance {d}");
    let b = alert.evidence["bearing_deg"].as_f64().expect("bearing");
    assert!(
        (190.0..=250.0).contains(&b),
        "offender is SW of the victim: {b}"
    );

    let (status, list) = officer_session.get("/api/alerts").await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert!(list.contains("victim_proximity"), "{list}");
    assert_no_victim_position("GET /api/alerts", &list, &victim);

    eventually("SSE victim alert", T, || async {
        sse.lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("victim_proximity"))
    })
    .await;
    for m in sse.lock().unwrap().iter() {
        if m.contains("victim_proximity") {
            assert_no_victim_position("SSE", m, &victim);
        }
    }

    let ours = |m: &String| m.contains("victim_proximity") && m.contains(&offender_imei);
    eventually("MQTT victim alert notice", T, || async {
        mqtt_msgs.lock().unwrap().iter().any(ours)
    })
    .await;
    for m in mqtt_msgs.lock().unwrap().iter().filter(|m| ours(m)) {
        assert_no_victim_position("MQTT em/v1/alerts", m, &victim);
    }

    // Victim positions: the liaison officer reads them (audited); the officer may not.
    let path = format!("/api/victim-devices/{victim_imei}/positions");
    let liaison = Session::login(&base, "liaison").await;
    let (status, body) = liaison.get(&path).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&victim[0].0.to_string()), "{body}");
    let (status, body) = officer_session.get(&path).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let audit = store
        .list_audit(&AuditFilter {
            target_type: Some("victim_device".into()),
            limit: Some(100),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert!(audit
        .iter()
        .any(|e| e.actor == "liaison" && e.action == "victim.positions.view"));
    assert!(audit
        .iter()
        .any(|e| e.actor == "officer" && e.action == "access.denied"));

    poller.abort();
    drop((v, o));
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("service stops")
        .expect("service task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_victim_data_stays_apart() {
    victim_data_stays_apart(sqlite_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_victim_data_stays_apart() {
    if let Some(db) = postgres_db().await {
        victim_data_stays_apart(db).await;
    }
}
