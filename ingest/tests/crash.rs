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

fn config_text(db: &TestDb, gt06: u16, telt: u16, metrics: u16, dashboard: u16) -> String {
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
gt06_port = {gt06}
teltonika_port = {telt}
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
bind = "127.0.0.1:{metrics}"

[dashboard]
bind = "127.0.0.1:{dashboard}"

[retention]
enabled = false

[log]
filter = "warn,em_ingest=info"
"#
    )
}

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
    addr: SocketAddr,
    base: DateTime<Utc>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
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
    addr: SocketAddr,
    base: DateTime<Utc>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
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
    let (gt06_port, telt_port, metrics_port) = (free_port(), free_port(), free_port());
    let cfg_path = dir.path().join("em.toml");
    std::fs::write(
        &cfg_path,
        config_text(&db, gt06_port, telt_port, metrics_port, free_port()),
    )
    .unwrap();
    let log = dir.path().join("em.log");
    let gt06_addr = SocketAddr::from(([127, 0, 0, 1], gt06_port));
    let telt_addr = SocketAddr::from(([127, 0, 0, 1], telt_port));

    let mut child = spawn_em(&cfg_path, &log);
    wait_listening(gt06_addr, &mut child, &log).await;

    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let base = now_s() - ChronoDuration::days(1);
    let mut tasks = Vec::new();
    for (p, id) in &devices {
        let (t, s) = (tally.clone(), stop.clone());
        tasks.push(match p {
            Protocol::Gt06 => tokio::spawn(gt06_device(id.clone(), gt06_addr, base, t, s)),
            _ => tokio::spawn(teltonika_device(id.clone(), telt_addr, base, t, s)),
        });
    }

    // Load, then SIGKILL in the middle of it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let acked_before_kill = tally.acked.lock().unwrap().len();
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Restart on the same database; the devices reconnect and go on.
    let mut child = spawn_em(&cfg_path, &log);
    wait_listening(gt06_addr, &mut child, &log).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }

    let metrics = http_get(SocketAddr::from(([127, 0, 0, 1], metrics_port)), "/metrics").await;
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
