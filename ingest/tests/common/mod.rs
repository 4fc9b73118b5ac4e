//! Shared helpers of the ingest integration tests: stores, a service on free ports, and
//! minimal device clients built on the protocol encoders.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Duration as ChronoDuration, SubsecRound, Utc};
use em_ingest::config::Config;
use em_ingest::service::Service;
use em_model::{Device, Protocol};
use em_protocols::{gt06, teltonika};
use em_store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Which backend a test runs on.
#[derive(Debug, Clone)]
pub enum Backend {
    /// SQLite file in a temp dir (kept alive by the guard).
    Sqlite(Arc<tempfile::TempDir>),
    /// PostgreSQL schema.
    Postgres(String),
}

/// A store for a test plus the configuration that reaches the same database.
pub struct TestDb {
    pub store: Arc<dyn Store>,
    pub backend: Backend,
}

pub async fn sqlite_db() -> TestDb {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let path = dir.path().join("em.db");
    let store = em_store::testing::sqlite_file_store(&path).await;
    TestDb {
        store,
        backend: Backend::Sqlite(dir),
    }
}

/// None (after a loud SKIPPED line, or a panic under CI=true) without PostgreSQL.
pub async fn postgres_db() -> Option<TestDb> {
    let (store, schema) = em_store::testing::postgres_store_with_schema().await?;
    Some(TestDb {
        store,
        backend: Backend::Postgres(schema),
    })
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn mqtt_url() -> String {
    std::env::var("MQTT_URL")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into())
}

/// True under CI (services must be there).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A port that was free a moment ago.
/// A configuration for tests: every listener enabled on a port the OS picks (read them back
/// from [`Running::addrs`]), MQTT and metrics off.
pub fn test_config(db: &TestDb) -> Config {
    let mut c = Config::default();
    match &db.backend {
        Backend::Sqlite(dir) => {
            c.database.url = format!("sqlite://{}", dir.path().join("em.db").display());
        }
        Backend::Postgres(schema) => {
            c.database.url = database_url();
            c.database.schema = Some(schema.clone());
        }
    }
    c.listeners.bind = "127.0.0.1".parse().expect("ip");
    // Enabled (non-zero), each bound to port 0.
    c.listeners.ephemeral_ports = true;
    c.listeners.gt06_port = 1;
    c.listeners.teltonika_port = 1;
    c.listeners.h02_port = 1;
    c.listeners.osmand_port = 1;
    c.listeners.idle_timeout_secs = 30;
    c.listeners.login_timeout_secs = 10;
    c.mqtt.enabled = false;
    c.mqtt.publish_alerts = false;
    c.metrics.enabled = false;
    c.retention.enabled = false;
    c.dashboard.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    c.pipeline.workers = 2;
    c.pipeline.tick_secs = 1;
    c
}

/// A running in-process service; dropped = shut down (call [`Running::stop`] to wait).
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub addrs: em_ingest::service::BoundAddrs,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("service stops within 30 s")
            .expect("service task");
    }
}

pub async fn start(cfg: Config) -> Running {
    // Logs with RUST_LOG=... (captured per test).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    cfg.validate().expect("test config is valid");
    let shutdown = CancellationToken::new();
    let svc = Service::start(cfg, shutdown.clone())
        .await
        .expect("service starts");
    let addrs = svc.addrs.clone();
    let task = tokio::spawn(svc.wait());
    Running {
        shutdown,
        task,
        addrs,
    }
}

pub async fn register(store: &dyn Store, id: &str, protocol: Protocol, secret: Option<&str>) {
    store
        .upsert_device(&Device {
            device_id: id.to_owned(),
            protocol,
            secret: secret.map(str::to_owned),
            active: true,
            class: em_model::DeviceClass::OffenderTag,
        })
        .await
        .expect("upsert device");
}

/// Waits until `f` is true (polling), or panics with `what`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A time with whole seconds (GT06 and Teltonika carry seconds / milliseconds).
pub fn now_s() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0)
}

// ---------------------------------------------------------------------------------------
// Device clients
// ---------------------------------------------------------------------------------------

/// Reads exactly `n` bytes or fails after `t`.
pub async fn read_n(s: &mut TcpStream, n: usize, t: Duration) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(t, s.read_exact(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read timed out"))??;
    Ok(buf)
}

/// True when the server closes the connection within `t` (EOF or reset).
/// Whether the server closes the connection within `t` (replies it sent before closing, e.g.
/// H02 acknowledgements, are read and discarded).
pub async fn closed_by_server(s: &mut TcpStream, t: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + t;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

pub fn gt06_login(imei: &str, serial: u16) -> Bytes {
    let imei = gt06::Imei::parse(imei).expect("valid IMEI");
    gt06::Gt06Frame::new(
        serial,
        gt06::Gt06Message::Login {
            imei,
            type_id: None,
            timezone: None,
        },
    )
    .to_bytes()
    .expect("encode login")
}

pub fn gt06_gps(time: DateTime<Utc>, lat: f64, lon: f64) -> gt06::Gt06Gps {
    gt06::Gt06Gps {
        time,
        info_len: 12,
        satellites: 9,
        lat,
        lon,
        speed_kmh: 3,
        course: 90,
        positioned: true,
        differential: false,
    }
}

/// An alarm frame (position + status): GT06 acknowledges alarms.
pub fn gt06_alarm(serial: u16, time: DateTime<Utc>, lat: f64, lon: f64) -> Bytes {
    gt06::Gt06Frame::new(
        serial,
        gt06::Gt06Message::Alarm {
            protocol: gt06::proto::ALARM,
            gps: gt06_gps(time, lat, lon),
            lbs_len: 9,
            cell: gt06::Gt06Cell {
                mcc: 238,
                mnc: 1,
                lac: 100,
                cell_id: 2000,
            },
            status: gt06::Gt06Status {
                terminal_info: 0x40,
                voltage_level: 5,
                gsm_level: 4,
                alarm: 0,
                language: 2,
            },
        },
    )
    .to_bytes()
    .expect("encode alarm")
}

/// A plain location frame (GT06 does not acknowledge those).
pub fn gt06_location(serial: u16, time: DateTime<Utc>, lat: f64, lon: f64) -> Bytes {
    gt06::Gt06Frame::new(
        serial,
        gt06::Gt06Message::Location {
            protocol: gt06::proto::LOCATION,
            gps: gt06_gps(time, lat, lon),
            cell: Some(gt06::Gt06Cell {
                mcc: 238,
                mnc: 1,
                lac: 100,
                cell_id: 2000,
            }),
            acc: None,
            upload_mode: None,
            reupload: None,
            mileage: None,
        },
    )
    .to_bytes()
    .expect("encode location")
}

/// The server's ACK of a GT06 frame.
pub fn gt06_ack(protocol: u8, serial: u16) -> Vec<u8> {
    gt06::ack_frame(protocol, serial).to_vec()
}

pub fn teltonika_imei(imei: &str) -> Bytes {
    teltonika::TeltonikaFrame::Imei(imei.to_owned())
        .to_bytes()
        .expect("encode imei")
}

pub fn teltonika_record(time: DateTime<Utc>, lat: f64, lon: f64) -> teltonika::AvlRecord {
    teltonika::AvlRecord {
        timestamp: time,
        priority: 0,
        gps: teltonika::AvlGps {
            lon,
            lat,
            altitude_m: 10,
            angle_deg: 0,
            satellites: 8,
            speed_kmh: 4,
        },
        event_io: 0,
        io: vec![teltonika::IoElement {
            id: teltonika::io::BATTERY_LEVEL,
            value: teltonika::IoValue::U8(80),
        }],
    }
}

/// An AVL packet of `n` records one second apart from `start`.
pub fn teltonika_packet(start: DateTime<Utc>, n: usize, lat: f64, lon: f64) -> Bytes {
    let records = (0..n)
        .map(|i| {
            teltonika_record(
                start + ChronoDuration::seconds(i as i64),
                lat + i as f64 * 1e-5,
                lon,
            )
        })
        .collect();
    teltonika::TeltonikaFrame::Avl(teltonika::AvlPacket {
        codec: teltonika::AvlCodec::Codec8,
        records,
    })
    .to_bytes()
    .expect("encode avl")
}

pub async fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).ok();
    s
}

pub async fn send(s: &mut TcpStream, b: &[u8]) {
    s.write_all(b).await.expect("write");
}

/// Home of the test subjects (lon, lat).
pub const HOME: [f64; 2] = [12.5683, 55.6761];

/// A subject with a 150 m curfew-home circle at [`HOME`] (Europe/Copenhagen, breach after 2
/// fixes), wearing GT06 `device` since two hours ago. Returns the subject id.
pub async fn subject_with_curfew_home(store: &dyn Store, device: &str, no_fix_secs: u32) -> i64 {
    use em_model::{BreachRules, Subject, ZoneGeometry, ZoneKind, ZoneSpec};
    let sid = store
        .upsert_subject(&Subject {
            id: 0,
            reference: format!("CASE-{device}"),
            display_name: "Test Subject".into(),
            officer_id: None,
            timezone: "Europe/Copenhagen".into(),
            order_start: None,
            order_end: None,
            rules: BreachRules {
                buffer_m: 10.0,
                consecutive_fixes: 2,
                persist_secs: 3600,
                no_fix_secs,
            },
        })
        .await
        .expect("subject");
    store
        .upsert_zone(&ZoneSpec {
            id: 0,
            subject_id: Some(sid),
            group: None,
            name: "Home".into(),
            kind: ZoneKind::Inclusion,
            geometry: ZoneGeometry::Circle {
                center: HOME,
                radius_m: 150.0,
            },
            schedule: None,
            is_curfew_home: true,
        })
        .await
        .expect("zone");
    register(store, device, Protocol::Gt06, None).await;
    store
        .assign_device(device, sid, Utc::now() - ChronoDuration::hours(2))
        .await
        .expect("assignment");
    sid
}

/// Alerts of subject `sid`, newest first (every state).
pub async fn alerts_of(store: &dyn Store, sid: i64) -> Vec<em_model::Alert> {
    store
        .list_alerts(&em_store::AlertFilter {
            subject_ids: Some(vec![sid]),
            ..em_store::AlertFilter::default()
        })
        .await
        .expect("list alerts")
}

/// A minimal MQTT 3.1.1 client on the `rumqttc` packet codec, for tests that must see exactly
/// which packet the server sends when (CONNACK codes, each PUBACK).
pub struct RawMqtt {
    pub stream: TcpStream,
    buf: bytes::BytesMut,
}

impl RawMqtt {
    /// Connects and sends CONNECT; returns the client and the CONNACK's return code.
    pub async fn connect(
        addr: SocketAddr,
        client_id: &str,
        login: Option<(&str, &str)>,
    ) -> std::io::Result<(RawMqtt, rumqttc::ConnectReturnCode)> {
        let stream = TcpStream::connect(addr).await?;
        let mut c = RawMqtt {
            stream,
            buf: bytes::BytesMut::new(),
        };
        let mut connect = rumqttc::mqttbytes::v4::Connect::new(client_id);
        connect.keep_alive = 30;
        if let Some((u, p)) = login {
            connect.set_login(u, p);
        }
        c.send(|b| connect.write(b)).await?;
        match c.next(Duration::from_secs(5)).await? {
            Some(rumqttc::mqttbytes::v4::Packet::ConnAck(a)) => Ok((c, a.code)),
            other => Err(std::io::Error::other(format!(
                "expected CONNACK, got {other:?}"
            ))),
        }
    }

    pub async fn send(
        &mut self,
        encode: impl FnOnce(&mut bytes::BytesMut) -> Result<usize, rumqttc::mqttbytes::Error>,
    ) -> std::io::Result<()> {
        let mut out = bytes::BytesMut::new();
        encode(&mut out).map_err(std::io::Error::other)?;
        self.stream.write_all(&out).await
    }

    /// Publishes `payload` on `topic` (QoS 1 with packet id `pkid`, or QoS 0 when it is 0).
    pub async fn publish(&mut self, topic: &str, payload: &[u8], pkid: u16) -> std::io::Result<()> {
        use rumqttc::mqttbytes::{v4::Publish, QoS};
        let qos = if pkid == 0 {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        let mut p = Publish::new(topic, qos, payload.to_vec());
        p.pkid = pkid;
        self.send(|b| p.write(b)).await
    }

    pub async fn subscribe(&mut self, filter: &str, pkid: u16) -> std::io::Result<()> {
        let mut s = rumqttc::mqttbytes::v4::Subscribe::new(filter, rumqttc::QoS::AtLeastOnce);
        s.pkid = pkid;
        self.send(|b| s.write(b)).await
    }

    /// The next packet from the server; `Ok(None)` when none came within `t`, an error when
    /// the server closed the connection.
    pub async fn next(
        &mut self,
        t: Duration,
    ) -> std::io::Result<Option<rumqttc::mqttbytes::v4::Packet>> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            match rumqttc::mqttbytes::v4::Packet::read(&mut self.buf, 1 << 20) {
                Ok(p) => return Ok(Some(p)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(std::io::Error::other(e)),
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => return Ok(None),
                Ok(Ok(0)) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "closed by the server",
                    ))
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Waits for the PUBACK of `pkid` (other packets are skipped); false on timeout.
    pub async fn puback(&mut self, pkid: u16, t: Duration) -> std::io::Result<bool> {
        let deadline = tokio::time::Instant::now() + t;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await? {
                None => return Ok(false),
                Some(rumqttc::mqttbytes::v4::Packet::PubAck(a)) if a.pkid == pkid => {
                    return Ok(true)
                }
                Some(_) => {}
            }
        }
    }
}

/// An EM telemetry payload (one report with a position).
pub fn em_telemetry(seq: u64, time: DateTime<Utc>, lat: f64, lon: f64) -> Vec<u8> {
    serde_json::json!({
        "seq": seq,
        "time": time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "position": {"lat": lat, "lon": lon, "accuracy_m": 5.0}
    })
    .to_string()
    .into_bytes()
}
