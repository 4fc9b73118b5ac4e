//! Crash test: the real `em` binary is killed with SIGKILL under load and restarted on the
//! same database; every fix a device got an ACK for must be stored.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use common::*;
use em_model::Protocol;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GT06_DEVICES: usize = 6;
const TELTONIKA_DEVICES: usize = 6;
const TELTONIKA_BATCH: usize = 3;

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    acked: Mutex<Vec<(String, DateTime<Utc>)>>,
}

/// Every listener on a port the OS picks; the binary writes what it bound to `addr_file`.
fn config_text(db: &TestDb, addr_file: &Path) -> String {
    let (url, schema) = match &db.backend {
        Backend::Sqlite(dir) => (
            format!("sqlite://{}", dir.path().join("em.db").display()),
            String::new(),
        ),
        Backend::Postgres(s) => (database_url(), format!("schema = \"{s}\"\n")),
    };
    format!(
        r#"
[database]
url = "{url}"
{schema}
[listeners]
bind = "127.0.0.1"
ephemeral_ports = true
addr_file = "{addr_file}"
gt06_port = 1
teltonika_port = 1
h02_port = 0
osmand_port = 0

[mqtt]
enabled = false
publish_alerts = false

[pipeline]
workers = 2
batch_max_wait_ms = 2

[metrics]
enabled = true
bind = "127.0.0.1:0"

[dashboard]
bind = "127.0.0.1:0"

[retention]
enabled = false

[log]
filter = "warn,em_ingest=info"
"#,
        addr_file = addr_file.display()
    )
}

/// Waits for the address file of a starting `em` and returns the addresses it bound.
async fn bound_addrs(file: &Path, child: &mut Child, log: &Path) -> serde_json::Value {
    for _ in 0..600 {
        if let Some(v) = std::fs::read_to_string(file)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        {
            return v;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "em exited early ({status}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("em wrote no address file");
}

fn addr_of(addrs: &serde_json::Value, key: &str) -> SocketAddr {
    addrs[key]
        .as_str()
        .unwrap_or_else(|| panic!("no {key} in {addrs}"))
        .parse()
        .expect("address")
}

/// Where a device connects: changes when the service restarts on other ports.
type Target = Arc<Mutex<SocketAddr>>;

fn spawn_em(config: &Path, log: &Path) -> Child {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    let err = out.try_clone().expect("log file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_em"));
    cmd.args(["run", "--config"]).arg(config);
    for (k, _) in em_ingest::config::ENV_OVERRIDES {
        cmd.env_remove(k);
    }
    cmd.env_remove("EM_CONFIG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn em")
}

async fn wait_listening(addr: SocketAddr, child: &mut Child, log: &Path) {
    for _ in 0..300 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "em exited early ({status}); log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("em did not listen on {addr}");
}

/// One GT06 device: login, then alarm frames (acknowledged by the protocol) one at a time,
/// reconnecting while the server is down, until `stop`.
async fn gt06_device(
    imei: String,
    target: Target,
    base: DateTime<Utc>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let addr = *target.lock().unwrap();
        let Ok(mut s) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if s.write_all(&gt06_login(&imei, 1)).await.is_err()
            || read_n(&mut s, 10, Duration::from_secs(5)).await.is_err()
        {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let serial = (n % 60000) as u16 + 2;
            let t = base + ChronoDuration::seconds(i64::from(n));
            tally.sent.fetch_add(1, Ordering::Relaxed);
            if s.write_all(&gt06_alarm(
                serial,
                t,
                55.6 + f64::from(n % 100) * 1e-4,
                12.5,
            ))
            .await
            .is_err()
            {
                break;
            }
            match read_n(&mut s, 10, Duration::from_secs(5)).await {
                Ok(ack) if ack == gt06_ack(em_protocols::gt06::proto::ALARM, serial) => {
                    tally.acked.lock().unwrap().push((imei.clone(), t));
                }
                _ => break,
            }
        }
    }
}

/// One Teltonika device: IMEI handshake, then packets of a few records; the 4-byte count
/// acknowledges the whole packet.
async fn teltonika_device(
    imei: String,
    target: Target,
    base: DateTime<Utc>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let addr = *target.lock().unwrap();
        let Ok(mut s) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if s.write_all(&teltonika_imei(&imei)).await.is_err() {
            continue;
        }
        match read_n(&mut s, 1, Duration::from_secs(5)).await {
            Ok(b) if b == [1] => {}
            _ => continue,
        }
        while !stop.load(Ordering::Relaxed) {
            let start = base + ChronoDuration::seconds(n * TELTONIKA_BATCH as i64);
            n += 1;
            tally
                .sent
                .fetch_add(TELTONIKA_BATCH as u64, Ordering::Relaxed);
            if s.write_all(&teltonika_packet(start, TELTONIKA_BATCH, 55.6, 12.5))
                .await
                .is_err()
            {
                break;
            }
            match read_n(&mut s, 4, Duration::from_secs(5)).await {
                Ok(ack) if ack == (TELTONIKA_BATCH as u32).to_be_bytes() => {
                    let mut a = tally.acked.lock().unwrap();
                    for i in 0..TELTONIKA_BATCH {
                        a.push((imei.clone(), start + ChronoDuration::seconds(i as i64)));
                    }
                }
                _ => break,
            }
        }
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect metrics");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
        .await
        .expect("metrics response")
        .expect("read");
    body
}

async fn kill9_loses_no_acknowledged_fix(db: TestDb, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut devices = Vec::new();
    for i in 0..GT06_DEVICES {
        let id = format!("3583071000{:05}", 70000 + i);
        register(&*db.store, &id, Protocol::Gt06, None).await;
        devices.push((Protocol::Gt06, id));
    }
    for i in 0..TELTONIKA_DEVICES {
        let id = format!("3520940000{:05}", 70000 + i);
        register(&*db.store, &id, Protocol::Teltonika, None).await;
        devices.push((Protocol::Teltonika, id));
    }
    let cfg_path = dir.path().join("em.toml");
    let addr_file = dir.path().join("addrs.json");
    std::fs::write(&cfg_path, config_text(&db, &addr_file)).unwrap();
    let log = dir.path().join("em.log");

    let mut child = spawn_em(&cfg_path, &log);
    let addrs = bound_addrs(&addr_file, &mut child, &log).await;
    let gt06_addr: Target = Arc::new(Mutex::new(addr_of(&addrs, "gt06")));
    let telt_addr: Target = Arc::new(Mutex::new(addr_of(&addrs, "teltonika")));

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let base = now_s() - ChronoDuration::days(1);
    let mut tasks = Vec::new();
    for (p, id) in &devices {
        let (t, s) = (tally.clone(), stop.clone());
        tasks.push(match p {
            Protocol::Gt06 => tokio::spawn(gt06_device(id.clone(), gt06_addr.clone(), base, t, s)),
            _ => tokio::spawn(teltonika_device(id.clone(), telt_addr.clone(), base, t, s)),
        });
    }

    // Load, then SIGKILL in the middle of it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let acked_before_kill = tally.acked.lock().unwrap().len();
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Restart on the same database (on new ports: the devices are told, as a balancer
    // would); they reconnect and go on.
    std::fs::remove_file(&addr_file).expect("old address file");
    let mut child = spawn_em(&cfg_path, &log);
    let addrs = bound_addrs(&addr_file, &mut child, &log).await;
    *gt06_addr.lock().unwrap() = addr_of(&addrs, "gt06");
    *telt_addr.lock().unwrap() = addr_of(&addrs, "teltonika");
    let metrics_addr = addr_of(&addrs, "metrics");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }

    let metrics = http_get(metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("em_records_stored_total"),
        "metrics exposed:\n{metrics}"
    );
    assert!(
        metrics.contains("em_store_batch_seconds"),
        "metrics exposed:\n{metrics}"
    );

    // Graceful stop: SIGTERM drains and exits 0.
    let pid = child.id().to_string();
    let st = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(st.success());
    let mut exited = None;
    for _ in 0..300 {
        if let Some(s) = child.try_wait().unwrap() {
            exited = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = exited.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("em did not stop within 30 s of SIGTERM");
    });
    assert!(
        status.success(),
        "em exit status {status}; log:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );

    let acked = tally.acked.lock().unwrap().clone();
    let sent = tally.sent.load(Ordering::Relaxed);
    let mut stored_total = 0usize;
    let mut missing = Vec::new();
    for (_, id) in &devices {
        let times: HashSet<DateTime<Utc>> = db
            .store
            .device_records(id, 1_000_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.position.is_some())
            .map(|r| r.device_time)
            .collect();
        stored_total += times.len();
        for (d, t) in acked.iter().filter(|(d, _)| d == id) {
            if !times.contains(t) {
                missing.push((d.clone(), *t));
            }
        }
    }
    println!(
        "CRASH TEST ({label}): fixes sent {sent}, acknowledged {} ({acked_before_kill} before kill -9), stored {stored_total}, acknowledged-but-missing {}",
        acked.len(),
        missing.len()
    );
    assert!(acked_before_kill > 0, "load before the kill");
    assert!(
        acked.len() > acked_before_kill,
        "devices resumed after the restart"
    );
    assert!(
        missing.is_empty(),
        "acknowledged fixes lost: {:?}",
        &missing[..missing.len().min(10)]
    );
    assert!(stored_total >= acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_kill9_loses_no_acknowledged_fix() {
    kill9_loses_no_acknowledged_fix(sqlite_db().await, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_kill9_loses_no_acknowledged_fix() {
    let Some(db) = postgres_db().await else {
        return;
    };
    kill9_loses_no_acknowledged_fix(db, "postgres").await;
}

// ---------------------------------------------------------------------------------------------
// Over MQTT: the embedded endpoint (PUBACK after the store) and Mosquitto (PUBACK by the broker,
// which keeps what em has not acknowledged in em's persistent session).
// ---------------------------------------------------------------------------------------------

const MQTT_DEVICES: usize = 4;

fn mqtt_config_text(db: &TestDb, mqtt: &str) -> String {
    let (url, schema) = match &db.backend {
        Backend::Sqlite(dir) => (
            format!("sqlite://{}", dir.path().join("em.db").display()),
            String::new(),
        ),
        Backend::Postgres(s) => (database_url(), format!("schema = \"{s}\"\n")),
    };
    format!(
        r#"
[database]
url = "{url}"
{schema}
[listeners]
bind = "127.0.0.1"
gt06_port = 0
teltonika_port = 0
teltonika_udp_port = 0
h02_port = 0
osmand_port = 0

{mqtt}

[pipeline]
workers = 2
batch_max_wait_ms = 2

[metrics]
enabled = false

[dashboard]
bind = "127.0.0.1:0"

[retention]
enabled = false

[log]
filter = "warn,em_ingest=info"
"#
    )
}

/// The address the embedded endpoint reported in the log (it was bound to port 0).
async fn endpoint_addr_from_log(child: &mut Child, log: &Path) -> SocketAddr {
    const MARK: &str = "embedded MQTT endpoint listening";
    for _ in 0..300 {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().rev().find(|l| l.contains(MARK)) {
            let after = &line[line.find(MARK).unwrap_or(0)..];
            if let Some(i) = after.find("127.0.0.1:") {
                let port: String = after[i + 10..]
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect();
                return SocketAddr::from(([127, 0, 0, 1], port.parse().expect("port")));
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("em exited early ({status}); log:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("em did not report its MQTT endpoint");
}

/// One EM device: connects (with its secret, if any), then publishes QoS 1 telemetry one
/// message at a time, counting each PUBACK; reconnects while the server is down.
async fn mqtt_device(
    id: String,
    secret: Option<String>,
    addr: SocketAddr,
    base: DateTime<Utc>,
    pace: Duration,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let topic = format!("em/v1/{id}/telemetry");
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        let login = secret.as_deref().map(|s| (id.as_str(), s));
        let mut c = match RawMqtt::connect(addr, &format!("{id}-c"), login).await {
            Ok((c, rumqttc::ConnectReturnCode::Success)) => c,
            _ => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let mut pkid: u16 = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            pkid = pkid % 60_000 + 1;
            let t = base + ChronoDuration::seconds(i64::from(n));
            tally.sent.fetch_add(1, Ordering::Relaxed);
            let payload = em_telemetry(u64::from(n), t, 55.6 + f64::from(n % 100) * 1e-4, 12.5);
            if c.publish(&topic, &payload, pkid).await.is_err() {
                break;
            }
            match c.puback(pkid, Duration::from_secs(5)).await {
                Ok(true) => tally.acked.lock().unwrap().push((id.clone(), t)),
                _ => break,
            }
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
    }
}

/// Acknowledged records of `devices` that are not in the store.
async fn missing_acked(
    db: &TestDb,
    devices: &[String],
    acked: &[(String, DateTime<Utc>)],
) -> (usize, Vec<(String, DateTime<Utc>)>) {
    let mut stored_total = 0;
    let mut missing = Vec::new();
    for id in devices {
        let times: HashSet<DateTime<Utc>> = db
            .store
            .device_records(id, 1_000_000)
            .await
            .unwrap()
            .into_iter()
            .filter(|r| r.position.is_some())
            .map(|r| r.device_time)
            .collect();
        stored_total += times.len();
        for (d, t) in acked.iter().filter(|(d, _)| d == id) {
            if !times.contains(t) {
                missing.push((d.clone(), *t));
            }
        }
    }
    (stored_total, missing)
}

async fn sigterm_and_wait(mut child: Child, log: &Path) {
    let pid = child.id().to_string();
    let st = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill -TERM");
    assert!(st.success());
    for _ in 0..300 {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(
                status.success(),
                "em exit status {status}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = child.kill();
    panic!("em did not stop within 30 s of SIGTERM");
}

/// Embedded default: devices publish to em's own MQTT endpoint; em is killed with SIGKILL in
/// the middle and restarted; every record a device got a PUBACK for is stored.
async fn kill9_over_embedded_mqtt(db: TestDb, label: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut devices = Vec::new();
    for i in 0..MQTT_DEVICES {
        let id = format!("em-crash-{label}-{i}");
        register(
            &*db.store,
            &id,
            Protocol::Em,
            Some(&format!("{id}-secret-0123456789")),
        )
        .await;
        devices.push(id);
    }
    let cfg_path = dir.path().join("em.toml");
    let log = dir.path().join("em.log");
    let section = |port: u16| {
        format!(
            "[mqtt]\nenabled = false\npublish_alerts = false\n\n[mqtt.broker]\nenabled = true\nbind = \"127.0.0.1:{port}\"\n"
        )
    };
    std::fs::write(&cfg_path, mqtt_config_text(&db, &section(0))).unwrap();
    let mut child = spawn_em(&cfg_path, &log);
    let addr = endpoint_addr_from_log(&mut child, &log).await;
    wait_listening(addr, &mut child, &log).await;
    // The restart listens on the same port.
    std::fs::write(&cfg_path, mqtt_config_text(&db, &section(addr.port()))).unwrap();

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let base = now_s() - ChronoDuration::days(1);
    let tasks: Vec<_> = devices
        .iter()
        .map(|id| {
            tokio::spawn(mqtt_device(
                id.clone(),
                Some(format!("{id}-secret-0123456789")),
                addr,
                base,
                Duration::ZERO,
                tally.clone(),
                stop.clone(),
            ))
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(2500)).await;
    let acked_before_kill = tally.acked.lock().unwrap().len();
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let acked_at_kill = tally.acked.lock().unwrap().clone();
    let (_, lost_at_kill) = missing_acked(&db, &devices, &acked_at_kill).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut child = spawn_em(&cfg_path, &log);
    wait_listening(addr, &mut child, &log).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    sigterm_and_wait(child, &log).await;

    let acked = tally.acked.lock().unwrap().clone();
    let (stored_total, missing) = missing_acked(&db, &devices, &acked).await;
    println!(
        "MQTT CRASH TEST (embedded endpoint, {label}): records sent {}, PUBACKed {} ({acked_before_kill} before kill -9; {} of those not in the store right after the kill), stored {stored_total}, PUBACKed-but-missing {}",
        tally.sent.load(Ordering::Relaxed),
        acked.len(),
        lost_at_kill.len(),
        missing.len()
    );
    assert!(acked_before_kill > 0, "load before the kill");
    assert!(
        lost_at_kill.is_empty(),
        "PUBACKed but not stored at the kill: {:?}",
        &lost_at_kill[..lost_at_kill.len().min(10)]
    );
    assert!(
        acked.len() > acked_before_kill,
        "devices resumed after the restart"
    );
    assert!(
        missing.is_empty(),
        "PUBACKed records lost: {:?}",
        &missing[..missing.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_kill9_over_embedded_mqtt_loses_no_acknowledged_record() {
    kill9_over_embedded_mqtt(sqlite_db().await, "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_kill9_over_embedded_mqtt_loses_no_acknowledged_record() {
    let Some(db) = postgres_db().await else {
        return;
    };
    kill9_over_embedded_mqtt(db, "postgres").await;
}

/// Mosquitto: devices publish to Mosquitto, em subscribes on a persistent session with manual
/// PUBACKs. em is killed with SIGKILL and restarted with the same client id; Mosquitto keeps
/// (and redelivers) every message em had not acknowledged, so everything Mosquitto PUBACKed to
/// a device ends up stored. (Mosquitto itself keeps running: what it holds for em is in its
/// memory, see the README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mosquitto_kill9_loses_no_acknowledged_record() {
    let url = mqtt_url();
    let u = em_ingest::config::MqttUrl::parse(&url).expect("MQTT_URL");
    let Some(broker) = tokio::net::lookup_host((u.host.as_str(), u.port))
        .await
        .ok()
        .and_then(|mut a| a.next())
    else {
        panic!("cannot resolve {url}");
    };
    if TcpStream::connect(broker).await.is_err() {
        let msg = format!("MQTT broker not reachable at {url}; set MQTT_URL");
        if in_ci() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED mosquitto_kill9_loses_no_acknowledged_record: {msg}");
        return;
    }
    let db = sqlite_db().await;
    let run = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let mut devices = Vec::new();
    for i in 0..MQTT_DEVICES {
        let id = format!("em-crash-mosq-{run}-{i}");
        register(&*db.store, &id, Protocol::Em, None).await;
        devices.push(id);
    }
    let client_id = format!("em-crash-ingest-{run}");
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = dir.path().join("em.toml");
    let log = dir.path().join("em.log");
    std::fs::write(
        &cfg_path,
        mqtt_config_text(
            &db,
            &format!(
                "[mqtt]\nenabled = true\npublish_alerts = false\nurl = \"{url}\"\nclient_id = \"{client_id}\"\n"
            ),
        ),
    )
    .unwrap();
    let mut child = spawn_em(&cfg_path, &log);

    // em's persistent session exists once it has subscribed: a probe record gets through.
    let probe_dev = devices[0].clone();
    let probe_time = now_s() - ChronoDuration::days(2);
    let mut subscribed = false;
    for _ in 0..60 {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "em exited early ({status}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if let Ok((mut c, _)) = RawMqtt::connect(broker, &format!("{probe_dev}-probe"), None).await
        {
            let _ = c
                .publish(
                    &format!("em/v1/{probe_dev}/telemetry"),
                    &em_telemetry(0, probe_time, 55.0, 12.0),
                    1,
                )
                .await;
            let _ = c.puback(1, Duration::from_secs(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if db.store.count_records(&probe_dev).await.unwrap_or(0) > 0 {
            subscribed = true;
            break;
        }
    }
    assert!(subscribed, "em did not subscribe on Mosquitto");

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let base = now_s() - ChronoDuration::days(1);
    // Paced: Mosquitto queues at most max_queued_messages (default 1000) for em while it is down.
    let tasks: Vec<_> = devices
        .iter()
        .map(|id| {
            tokio::spawn(mqtt_device(
                id.clone(),
                None,
                broker,
                base,
                Duration::from_millis(25),
                tally.clone(),
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let acked_before_kill = tally.acked.lock().unwrap().len();
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let acked_at_kill = tally.acked.lock().unwrap().clone();
    let (_, not_yet_stored) = missing_acked(&db, &devices, &acked_at_kill).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let child = spawn_em(&cfg_path, &log);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let acked = tally.acked.lock().unwrap().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let (stored_total, missing) = loop {
        let (stored, missing) = missing_acked(&db, &devices, &acked).await;
        if missing.is_empty() || tokio::time::Instant::now() > deadline {
            break (stored, missing);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    sigterm_and_wait(child, &log).await;
    // Leave no persistent session behind on the shared broker.
    let _ = RawMqtt::connect(broker, &client_id, None).await;

    println!(
        "MQTT CRASH TEST (Mosquitto): records sent {}, PUBACKed by Mosquitto {} ({acked_before_kill} before kill -9; {} of those not yet stored at the kill, redelivered after the restart), stored {stored_total}, PUBACKed-but-missing {}",
        tally.sent.load(Ordering::Relaxed),
        acked.len(),
        not_yet_stored.len(),
        missing.len()
    );
    assert!(acked_before_kill > 0, "load before the kill");
    assert!(acked.len() > acked_before_kill);
    assert!(
        missing.is_empty(),
        "PUBACKed records lost: {:?}",
        &missing[..missing.len().min(10)]
    );
}
