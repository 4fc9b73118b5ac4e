//! Device identity, end to end on real ports (SQLite file and PostgreSQL; MQTT through the
//! real Mosquitto): a device is admitted only on the protocol it is registered for, with its
//! secret where the protocol carries one; secrets are stored hashed (old plaintext rows are
//! converted on open); IMEI-only listeners can be limited to source networks; every refusal is
//! counted by protocol and reason.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use chrono::Duration as ChronoDuration;
use common::*;
use em_ingest::config::AllowList;
use em_model::Protocol;
use em_protocols::gt06;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The process-wide metrics recorder of this test binary (tests share it: compare deltas).
fn metrics() -> &'static PrometheusHandle {
    static H: OnceLock<PrometheusHandle> = OnceLock::new();
    H.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("metrics recorder")
    })
}

/// Current value of `em_devices_rejected_total{protocol, reason}` (0 when never counted).
fn rejected(protocol: &str, reason: &str) -> u64 {
    let text = metrics().render();
    let (p, r) = (
        format!("protocol=\"{protocol}\""),
        format!("reason=\"{reason}\""),
    );
    text.lines()
        .filter(|l| l.starts_with("em_devices_rejected_total{") && l.contains(&p) && l.contains(&r))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// One HTTP/1.1 request with optional extra header lines; returns the status code, or 0 when
/// the server closed the connection without answering.
async fn http(addr: std::net::SocketAddr, target: &str, extra_headers: &str) -> u16 {
    let mut s = connect(addr).await;
    let req =
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra_headers}\r\n");
    // A refused connection may be reset before or while the request is written.
    if s.write_all(req.as_bytes()).await.is_err() {
        return 0;
    }
    let mut resp = Vec::new();
    match tokio::time::timeout(T, s.read_to_end(&mut resp)).await {
        Ok(Ok(_)) => {}
        Ok(Err(_)) => return 0,
        Err(_) => panic!("no response in time"),
    }
    let text = String::from_utf8_lossy(&resp);
    text.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn h02_report(imei: &str) -> String {
    let t = now_s();
    format!(
        "*HQ,{imei},V1,{},A,5540.8000,N,01234.5000,E,0.00,0,{},FFFFFBFF#",
        t.format("%H%M%S"),
        t.format("%d%m%y")
    )
}

fn osmand_query(id: &str, lat: f64) -> String {
    format!(
        "/?id={id}&lat={lat}&lon=12.57&timestamp={}",
        now_s().timestamp()
    )
}

// ---------------------------------------------------------------------------------------
// Admitted only on the registered protocol
// ---------------------------------------------------------------------------------------

async fn devices_are_admitted_only_on_their_protocol(db: TestDb) {
    metrics();
    // A tag registered as EM (MQTT, with a secret) and one registered as GT06.
    let em_tag = "358307100007701";
    let gt06_tag = "358307100007702";
    register(
        &*db.store,
        em_tag,
        Protocol::Em,
        Some("em-secret-0123456789abcdef"),
    )
    .await;
    register(&*db.store, gt06_tag, Protocol::Gt06, None).await;
    let svc = start(test_config(&db)).await;
    let before_gt06 = rejected("gt06", "wrong_protocol");
    let before_h02 = rejected("h02", "wrong_protocol");
    let before_osmand = rejected("osmand", "wrong_protocol");

    // The EM tag over GT06: no login ACK, closed, nothing stored (nor the fix sent after).
    let mut s = connect(svc.addrs.gt06.expect("gt06")).await;
    send(&mut s, &gt06_login(em_tag, 1)).await;
    let t = now_s() + ChronoDuration::days(365 * 70);
    let _ = s.write_all(&gt06_location(2, t, 55.68, 12.57)).await;
    assert!(
        closed_by_server(&mut s, T).await,
        "EM tag refused over GT06"
    );

    // The EM tag over H02 (no login: the first report names it).
    let mut s = connect(svc.addrs.h02.expect("h02")).await;
    send(&mut s, h02_report(em_tag).as_bytes()).await;
    assert!(closed_by_server(&mut s, T).await, "EM tag refused over H02");

    // The EM tag over Teltonika: IMEI refused with 0x00.
    let mut s = connect(svc.addrs.teltonika.expect("teltonika")).await;
    send(&mut s, &teltonika_imei(em_tag)).await;
    assert_eq!(read_n(&mut s, 1, T).await.expect("IMEI reply"), vec![0x00]);
    assert!(closed_by_server(&mut s, T).await);

    // The GT06 tag over OsmAnd, without a token: 403 and nothing stored.
    let osmand = svc.addrs.osmand.expect("osmand");
    assert_eq!(http(osmand, &osmand_query(gt06_tag, 55.1), "").await, 403);

    assert_eq!(db.store.count_records(em_tag).await.unwrap(), 0);
    assert_eq!(db.store.count_records(gt06_tag).await.unwrap(), 0);
    // Every refusal counted with its reason.
    assert!(rejected("gt06", "wrong_protocol") > before_gt06);
    assert!(rejected("h02", "wrong_protocol") > before_h02);
    assert!(rejected("osmand", "wrong_protocol") > before_osmand);

    // The GT06 tag on its own protocol is still welcome.
    let mut s = connect(svc.addrs.gt06.unwrap()).await;
    send(&mut s, &gt06_login(gt06_tag, 1)).await;
    assert_eq!(
        read_n(&mut s, 10, T).await.expect("login ACK"),
        gt06_ack(gt06::proto::LOGIN, 1)
    );
    drop(s);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_admitted_only_on_their_protocol_sqlite() {
    devices_are_admitted_only_on_their_protocol(sqlite_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_admitted_only_on_their_protocol_postgres() {
    if let Some(db) = postgres_db().await {
        devices_are_admitted_only_on_their_protocol(db).await;
    }
}

// ---------------------------------------------------------------------------------------
// OsmAnd token
// ---------------------------------------------------------------------------------------

async fn osmand_devices_must_present_their_token(db: TestDb) {
    metrics();
    let phone = "osm-phone-71";
    let token = "osm-token-0123456789abcdef";
    register(&*db.store, phone, Protocol::Osmand, Some(token)).await;
    // Registered as OsmAnd but without a secret: refused too (the operator must set one).
    register(&*db.store, "osm-phone-72", Protocol::Osmand, None).await;
    let svc = start(test_config(&db)).await;
    let addr = svc.addrs.osmand.expect("osmand");
    let (missing, bad) = (
        rejected("osmand", "missing_credential"),
        rejected("osmand", "bad_credential"),
    );

    assert_eq!(http(addr, &osmand_query(phone, 55.1), "").await, 403);
    let wrong = format!(
        "{}&token=osm-token-0123456789abcdeX",
        osmand_query(phone, 55.1)
    );
    assert_eq!(http(addr, &wrong, "").await, 403);
    assert_eq!(
        http(
            addr,
            &osmand_query(phone, 55.1),
            "Authorization: Bearer not-the-token-0123456\r\n"
        )
        .await,
        403
    );
    assert_eq!(
        http(
            addr,
            &format!(
                "{}&token=whatever-0123456789",
                osmand_query("osm-phone-72", 55.1)
            ),
            ""
        )
        .await,
        403
    );
    assert_eq!(
        db.store.count_records(phone).await.unwrap(),
        0,
        "nothing stored when refused"
    );
    assert_eq!(db.store.count_records("osm-phone-72").await.unwrap(), 0);
    assert!(rejected("osmand", "missing_credential") > missing);
    assert!(rejected("osmand", "bad_credential") >= bad + 2);

    // The right token, as a parameter and as a bearer header: stored.
    let right = format!("{}&token={token}", osmand_query(phone, 55.1));
    assert_eq!(http(addr, &right, "").await, 200);
    assert_eq!(db.store.count_records(phone).await.unwrap(), 1);
    let t = now_s().timestamp() + 1;
    assert_eq!(
        http(
            addr,
            &format!("/?id={phone}&lat=55.2&lon=12.57&timestamp={t}"),
            &format!("Authorization: Bearer {token}\r\n")
        )
        .await,
        200
    );
    assert_eq!(db.store.count_records(phone).await.unwrap(), 2);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osmand_devices_must_present_their_token_sqlite() {
    osmand_devices_must_present_their_token(sqlite_db().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn osmand_devices_must_present_their_token_postgres() {
    if let Some(db) = postgres_db().await {
        osmand_devices_must_present_their_token(db).await;
    }
}

// ---------------------------------------------------------------------------------------
// Secrets stored hashed; old plaintext rows converted
// ---------------------------------------------------------------------------------------

/// The raw `devices.secret` column of `id`.
async fn raw_secret_sqlite(path: &std::path::Path, id: &str) -> Option<String> {
    let store = em_store::SqliteStore::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("open");
    sqlx::query_scalar("SELECT secret FROM devices WHERE device_id = ?")
        .bind(id)
        .fetch_one(store.pool())
        .await
        .expect("row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_stored_hashed_and_plaintext_rows_converted_sqlite() {
    let db = sqlite_db().await;
    let Backend::Sqlite(dir) = &db.backend else {
        unreachable!()
    };
    let path = dir.path().join("em.db");
    // Written through the store: the row holds the hash, never the plaintext.
    let token = "osm-token-fresh-0123456789";
    register(&*db.store, "osm-new", Protocol::Osmand, Some(token)).await;
    let raw = raw_secret_sqlite(&path, "osm-new").await.expect("secret");
    assert_eq!(raw, em_store::device_secret::hash(token));
    assert!(!raw.contains(token));

    // A row from before hashing: plaintext written behind the store's back.
    let legacy = "osm-token-legacy-0123456789";
    {
        let store = em_store::SqliteStore::connect(&format!("sqlite://{}", path.display()))
            .await
            .expect("open");
        sqlx::query(
            "INSERT INTO devices (device_id, protocol, secret, active) VALUES (?, 'osmand', ?, 1)",
        )
        .bind("osm-legacy")
        .bind(legacy)
        .execute(store.pool())
        .await
        .expect("legacy row");
        store.pool().close().await;
    }
    // Opening the store converts it.
    let raw = raw_secret_sqlite(&path, "osm-legacy")
        .await
        .expect("secret");
    assert_eq!(raw, em_store::device_secret::hash(legacy));
    // And the device still gets in with the secret it always had.
    let svc = start(test_config(&db)).await;
    let addr = svc.addrs.osmand.unwrap();
    let q = format!("{}&token={legacy}", osmand_query("osm-legacy", 55.3));
    assert_eq!(http(addr, &q, "").await, 200);
    assert_eq!(db.store.count_records("osm-legacy").await.unwrap(), 1);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_are_stored_hashed_and_plaintext_rows_converted_postgres() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let Backend::Postgres(schema) = db.backend.clone() else {
        unreachable!()
    };
    let url = database_url();
    let raw = |id: &'static str| {
        let (url, schema) = (url.clone(), schema.clone());
        async move {
            let store = em_store::PgStore::connect_in_schema(&url, &schema)
                .await
                .expect("open");
            let v: Option<String> =
                sqlx::query_scalar("SELECT secret FROM devices WHERE device_id = $1")
                    .bind(id)
                    .fetch_one(store.pool())
                    .await
                    .expect("row");
            store.pool().close().await;
            v
        }
    };
    let token = "em-secret-fresh-0123456789";
    register(&*db.store, "em-new", Protocol::Em, Some(token)).await;
    let v = raw("em-new").await.expect("secret");
    assert_eq!(v, em_store::device_secret::hash(token));

    let legacy = "osm-token-legacy-0123456789";
    {
        let store = em_store::PgStore::connect_in_schema(&url, &schema)
            .await
            .expect("open");
        sqlx::query(
            "INSERT INTO devices (device_id, protocol, secret, active) VALUES ($1, 'osmand', $2, true)",
        )
        .bind("osm-legacy")
        .bind(legacy)
        .execute(store.pool())
        .await
        .expect("legacy row");
        store.pool().close().await;
    }
    let v = raw("osm-legacy").await.expect("secret");
    assert_eq!(v, em_store::device_secret::hash(legacy));
    let svc = start(test_config(&db)).await;
    let q = format!("{}&token={legacy}", osmand_query("osm-legacy", 55.3));
    assert_eq!(http(svc.addrs.osmand.unwrap(), &q, "").await, 200);
    assert_eq!(db.store.count_records("osm-legacy").await.unwrap(), 1);
    svc.stop().await;
}

// ---------------------------------------------------------------------------------------
// Source allow lists of the listeners
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_allow_lists_refuse_other_networks_before_reading() {
    metrics();
    let db = sqlite_db().await;
    let imei = "358307100007703";
    register(&*db.store, imei, Protocol::Gt06, None).await;
    let phone = "osm-phone-73";
    let token = "osm-token-allow-0123456789";
    register(&*db.store, phone, Protocol::Osmand, Some(token)).await;

    // Only 10.0.0.0/8 may connect: 127.0.0.1 is refused.
    let mut cfg = test_config(&db);
    let private = AllowList::parse(&["10.0.0.0/8"]).unwrap();
    cfg.listeners.gt06.allow = private.clone();
    cfg.listeners.h02.allow = private.clone();
    cfg.listeners.osmand.allow = private;
    let svc = start(cfg).await;
    let (gt, osm) = (
        rejected("gt06", "source_not_allowed"),
        rejected("osmand", "source_not_allowed"),
    );
    let mut s = connect(svc.addrs.gt06.unwrap()).await;
    assert!(
        closed_by_server(&mut s, T).await,
        "closed without the device sending anything"
    );
    let mut s = connect(svc.addrs.h02.unwrap()).await;
    assert!(closed_by_server(&mut s, T).await);
    let q = format!("{}&token={token}", osmand_query(phone, 55.1));
    assert_eq!(
        http(svc.addrs.osmand.unwrap(), &q, "").await,
        0,
        "no answer"
    );
    assert_eq!(db.store.count_records(imei).await.unwrap(), 0);
    assert_eq!(db.store.count_records(phone).await.unwrap(), 0);
    assert!(rejected("gt06", "source_not_allowed") > gt);
    assert!(rejected("osmand", "source_not_allowed") > osm);
    // Listeners without a list accept any source.
    let mut s = connect(svc.addrs.teltonika.unwrap()).await;
    send(&mut s, &teltonika_imei("352094000007703")).await;
    assert_eq!(read_n(&mut s, 1, T).await.unwrap(), vec![0x00], "answered");
    svc.stop().await;

    // With 127.0.0.1 allowed, the same devices get in.
    let mut cfg = test_config(&db);
    let local = AllowList::parse(&["10.0.0.0/8", "127.0.0.1"]).unwrap();
    cfg.listeners.gt06.allow = local.clone();
    cfg.listeners.osmand.allow = local;
    let svc = start(cfg).await;
    let mut s = connect(svc.addrs.gt06.unwrap()).await;
    send(&mut s, &gt06_login(imei, 1)).await;
    assert_eq!(
        read_n(&mut s, 10, T).await.expect("login ACK"),
        gt06_ack(gt06::proto::LOGIN, 1)
    );
    assert_eq!(http(svc.addrs.osmand.unwrap(), &q, "").await, 200);
    assert_eq!(db.store.count_records(phone).await.unwrap(), 1);
    drop(s);
    svc.stop().await;
}

// ---------------------------------------------------------------------------------------
// MQTT subscriber path (real Mosquitto)
// ---------------------------------------------------------------------------------------

async fn mosquitto_available(url: &str) -> bool {
    let u = em_ingest::config::MqttUrl::parse(url).expect("MQTT_URL");
    let ok = matches!(
        tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect((u.host.as_str(), u.port)),
        )
        .await,
        Ok(Ok(_))
    );
    if !ok {
        let msg = format!("MQTT broker not reachable at {url}; set MQTT_URL");
        if in_ci() {
            panic!("CI=true and {msg}");
        }
        eprintln!("\n*** SKIPPED: {msg} ***\n");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn em_records_of_a_device_registered_under_another_protocol_are_refused() {
    use rumqttc::{AsyncClient, MqttOptions, QoS};
    metrics();
    let url = mqtt_url();
    if !mosquitto_available(&url).await {
        return;
    }
    let db = sqlite_db().await;
    let suffix = format!("{}-{}", std::process::id(), now_s().timestamp());
    // A GT06 tag's IMEI used on the EM topics, and a real EM device.
    let gt06_tag = format!("gt06-{suffix}");
    let em_dev = format!("em-{suffix}");
    register(&*db.store, &gt06_tag, Protocol::Gt06, None).await;
    register(
        &*db.store,
        &em_dev,
        Protocol::Em,
        Some("em-secret-0123456789abcdef"),
    )
    .await;
    let mut cfg = test_config(&db);
    cfg.mqtt.enabled = true;
    cfg.mqtt.url = url.clone();
    cfg.mqtt.client_id = format!("em-ingest-identity-{suffix}");
    let svc = start(cfg).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = rejected("em", "wrong_protocol");

    let u = em_ingest::config::MqttUrl::parse(&url).unwrap();
    let mut o = MqttOptions::new(format!("em-identity-device-{suffix}"), u.host, u.port);
    o.set_keep_alive(Duration::from_secs(10));
    let (client, mut el) = AsyncClient::new(o, 16);
    let poller = tokio::spawn(async move {
        loop {
            if el.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let t = now_s();
    // A future-dated fix, as in the finding: must not be stored at all.
    let forged = serde_json::json!({"seq": 1, "time": (t + ChronoDuration::days(365 * 70)).to_rfc3339(),
        "position": {"lat": 55.6, "lon": 12.5}});
    let good = serde_json::json!({"seq": 1, "time": t.to_rfc3339(), "position": {"lat": 55.6, "lon": 12.5}});
    client
        .publish(
            format!("em/v1/{gt06_tag}/telemetry"),
            QoS::AtLeastOnce,
            false,
            forged.to_string(),
        )
        .await
        .unwrap();
    client
        .publish(
            format!("em/v1/{em_dev}/telemetry"),
            QoS::AtLeastOnce,
            false,
            good.to_string(),
        )
        .await
        .unwrap();
    // Messages are handled in order: once the EM device's record is stored, the other one
    // has been judged.
    eventually("EM device's record stored", T, || async {
        db.store.count_records(&em_dev).await.unwrap() == 1
    })
    .await;
    eventually("refusal counted", T, || async {
        rejected("em", "wrong_protocol") > before
    })
    .await;
    assert_eq!(db.store.count_records(&gt06_tag).await.unwrap(), 0);
    poller.abort();
    svc.stop().await;
}

// ---------------------------------------------------------------------------------------
// The OsmAnd HTTP listener has the device listeners' limits (issue 13, finding 1)
// ---------------------------------------------------------------------------------------

/// One client opening unfinished requests cannot take the OsmAnd listener: beyond its
/// per-address share the connections are closed at once, the rest at the header deadline
/// (the login timeout), and a tag reporting from another address is served all along.
/// Loopback only; 60 connections; a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_osmand_requests_are_bounded_and_cut_off() {
    let db = sqlite_db().await;
    register(
        &*db.store,
        "osm-flood",
        Protocol::Osmand,
        Some("osm-token-0123456789"),
    )
    .await;
    let mut cfg = test_config(&db);
    cfg.listeners.max_connections_per_ip = 20;
    cfg.listeners.login_timeout_secs = 1;
    let svc = start(cfg).await;
    let addr = svc.addrs.osmand.expect("osmand");
    let mut held = Vec::new();
    for _ in 0..60 {
        let mut s = connect(addr).await;
        let _ = s
            .write_all(b"GET /?id=osm-flood HTTP/1.1\r\nHost: x\r\n")
            .await;
        held.push(s);
    }
    let mut closed_at_once = 0;
    for s in held.iter_mut().skip(20) {
        if closed_by_server(s, Duration::from_millis(500)).await {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= 38,
        "{closed_at_once} of 40 over the share closed"
    );
    // A tag on another address reports meanwhile.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.3:0".parse().expect("addr"))
        .expect("bind 127.0.0.3");
    let mut o = sock.connect(addr).await.expect("connect");
    let q = format!(
        "{}&token=osm-token-0123456789",
        osmand_query("osm-flood", 55.4)
    );
    o.write_all(format!("GET {q} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(T, o.read_to_end(&mut resp))
        .await
        .expect("answered")
        .expect("read");
    assert!(String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 200"));
    for s in held.iter_mut().take(20) {
        assert!(
            closed_by_server(s, Duration::from_secs(4)).await,
            "an unfinished request outlived the header deadline"
        );
    }
    drop(held);
    let q = format!(
        "{}&token=osm-token-0123456789",
        osmand_query("osm-flood", 55.5)
    );
    assert_eq!(http(addr, &q, "").await, 200, "the address is served again");
    svc.stop().await;
}
