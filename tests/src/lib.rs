//! `em-e2e` owns the top-level end-to-end tests of the EM platform (`tests/*.rs`): the whole
//! service started in-process (`em_ingest::service::Service`) on a fresh PostgreSQL schema,
//! driven by simulated devices over real sockets, with a real MQTT broker (Mosquitto) and a
//! real HTTP receiver standing in for the offender-management system.
//!
//! This library is the harness those tests share: server discovery with the skip/fail policy
//! (`SKIPPED` on stderr, or a panic under `CI=true`), a service configuration on ports the OS
//! picks, a handle to start and gracefully stop the service, polling helpers, and minimal
//! GT06 and Teltonika device clients built on the `em-protocols` encoders. Helpers panic with
//! a clear message on setup failures: they are test code, a panic is a failed test.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, SubsecRound, Utc};
use em_alerts::AlertService;
use em_ingest::config::Config;
use em_ingest::service::{BoundAddrs, Service};
use em_model::{Device, Protocol};
use em_protocols::{gt06, teltonika};
use em_store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Default time limit of one waiting step of a test.
pub const STEP: Duration = Duration::from_secs(15);

/// True under CI (`CI=true` or `CI=1`): missing servers fail the test instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Reports a missing server: panics under CI, otherwise prints a loud `SKIPPED` line. The
/// line goes straight to the process's stderr (not the test harness's captured output), so
/// it shows even for a passing run.
pub fn skip_or_fail(msg: &str) {
    if in_ci() {
        panic!("CI=true and {msg}");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {msg} ***\n");
}

/// `MQTT_URL`, or `mqtt://127.0.0.1:1883`.
pub fn mqtt_url() -> String {
    std::env::var("MQTT_URL")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "mqtt://127.0.0.1:1883".into())
}

/// Logs of the service under test, shown with `RUST_LOG=...` (captured per test).
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A fresh, migrated PostgreSQL schema: the test's own store handle and the schema name the
/// service is configured with. `None` (after `SKIPPED`, or a panic under CI) without a server.
pub async fn postgres() -> Option<(Arc<dyn Store>, String)> {
    init_logs();
    let found = em_store::testing::postgres_store_with_schema().await;
    if found.is_none() {
        // em-store has already panicked under CI; repeat its notice where it is seen.
        skip_or_fail(&format!(
            "PostgreSQL not reachable at {}; set DATABASE_URL",
            em_store::redact_url(&em_store::testing::database_url())
        ));
    }
    found
}

/// The MQTT broker's host and port when it accepts TCP connections; otherwise `None` after
/// `SKIPPED` (or a panic under CI).
pub async fn mosquitto() -> Option<(String, u16)> {
    let url = mqtt_url();
    let u = match em_ingest::config::MqttUrl::parse(&url) {
        Ok(u) => u,
        Err(e) => panic!("MQTT_URL is not usable: {e}"),
    };
    let reach = tokio::time::timeout(
        Duration::from_secs(3),
        TcpStream::connect((u.host.as_str(), u.port)),
    )
    .await;
    match reach {
        Ok(Ok(_)) => Some((u.host, u.port)),
        Ok(Err(e)) => {
            skip_or_fail(&format!(
                "MQTT broker not reachable at {url} ({e}); set MQTT_URL"
            ));
            None
        }
        Err(_) => {
            skip_or_fail(&format!(
                "MQTT broker at {url} did not answer in 3 s; set MQTT_URL"
            ));
            None
        }
    }
}

/// The service configuration of the end-to-end tests: PostgreSQL in `schema`, GT06 and
/// Teltonika listeners on ports of 127.0.0.1 the OS picks (read back from [`Running::addrs`];
/// H02 and OsmAnd off), dashboard likewise, no metrics, no retention job, no demo, no embedded broker, no MQTT, OMS
/// webhook off, two pipeline workers and a 1 s tick, 1 s shutdown grace.
pub fn service_config(schema: &str) -> Config {
    let mut c = Config::default();
    c.database.url = em_store::testing::database_url();
    c.database.schema = Some(schema.to_owned());
    c.database.registry_refresh_secs = 1;
    c.listeners.bind = std::net::IpAddr::from([127, 0, 0, 1]);
    // Enabled (non-zero), bound to port 0.
    c.listeners.ephemeral_ports = true;
    c.listeners.gt06_port = 1;
    c.listeners.teltonika_port = 1;
    c.listeners.h02_port = 0;
    c.listeners.osmand_port = 0;
    c.listeners.idle_timeout_secs = 30;
    c.listeners.login_timeout_secs = 10;
    c.listeners.shutdown_grace_secs = 1;
    c.mqtt.enabled = false;
    c.mqtt.publish_alerts = false;
    c.mqtt.broker.enabled = false;
    c.metrics.enabled = false;
    c.retention.enabled = false;
    c.demo.enabled = false;
    c.demo.simulate = false;
    c.dashboard.bind = SocketAddr::from(([127, 0, 0, 1], 0));
    c.alerts.oms.enabled = false;
    c.pipeline.workers = 2;
    c.pipeline.tick_secs = 1;
    c
}

/// A service running in-process.
pub struct Running {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub addrs: BoundAddrs,
    /// The service's own store (its connection pool).
    pub store: Arc<dyn Store>,
    /// The service's alert engine (officer actions go through it, as from the dashboard).
    pub alerts: Arc<AlertService>,
}

impl Running {
    pub fn gt06(&self) -> SocketAddr {
        self.addrs.gt06.expect("GT06 listener configured")
    }

    pub fn teltonika(&self) -> SocketAddr {
        self.addrs.teltonika.expect("Teltonika listener configured")
    }

    /// Graceful stop: cancels the token and waits (at most 30 s) for the orderly shutdown.
    pub async fn stop(self) {
        self.shutdown.cancel();
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("service task failed: {e}"),
            Err(_) => panic!("service did not stop within 30 s of the shutdown signal"),
        }
    }
}

/// Validates `cfg` and starts the service (listeners bound to ports the OS picks).
pub async fn start(cfg: Config) -> Running {
    init_logs();
    if let Err(e) = cfg.validate() {
        panic!("test configuration is invalid: {e}");
    }
    let shutdown = CancellationToken::new();
    let svc = match Service::start(cfg, shutdown.clone()).await {
        Ok(svc) => svc,
        Err(e) => panic!("service does not start: {e:#}"),
    };
    let addrs = svc.addrs.clone();
    let store = svc.store.clone();
    let alerts = svc.alerts.clone();
    let task = tokio::spawn(svc.wait());
    Running {
        shutdown,
        task,
        addrs,
        store,
        alerts,
    }
}

/// Registers an active device.
pub async fn register(store: &dyn Store, id: &str, protocol: Protocol) {
    let device = Device {
        device_id: id.to_owned(),
        protocol,
        secret: None,
        active: true,
        class: em_model::DeviceClass::OffenderTag,
    };
    if let Err(e) = store.upsert_device(&device).await {
        panic!("registering device {id}: {e}");
    }
}

/// Polls `f` every 50 ms until it is true; panics naming `what` after `timeout`.
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
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Now, truncated to whole seconds (GT06 carries seconds).
pub fn now_s() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(0)
}

/// Reads exactly `n` bytes within `t`.
pub async fn read_n(s: &mut TcpStream, n: usize, t: Duration) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; n];
    match tokio::time::timeout(t, s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => Ok(buf),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no {n}-byte answer within {t:?}"),
        )),
    }
}

// ---------------------------------------------------------------------------------------
// GT06
// ---------------------------------------------------------------------------------------

/// Length of a GT06 server acknowledgement frame.
pub const GT06_ACK_LEN: usize = 10;

pub fn gt06_login(imei: &str, serial: u16) -> Bytes {
    let imei = gt06::Imei::parse(imei).unwrap_or_else(|| panic!("{imei:?} is not an IMEI"));
    gt06::Gt06Frame::new(
        serial,
        gt06::Gt06Message::Login {
            imei,
            type_id: None,
            timezone: None,
        },
    )
    .to_bytes()
    .expect("encode GT06 login")
}

/// A GT06 fix the device expects an acknowledgement for: an alarm frame (0x16) with alarm
/// code 0 (no alarm), GNSS position, serving cell, battery "high" and GSM "strong".
pub fn gt06_fix(serial: u16, time: DateTime<Utc>, lat: f64, lon: f64) -> Bytes {
    gt06::Gt06Frame::new(
        serial,
        gt06::Gt06Message::Alarm {
            protocol: gt06::proto::ALARM,
            gps: gt06::Gt06Gps {
                time,
                info_len: 12,
                satellites: 9,
                lat,
                lon,
                speed_kmh: 3,
                course: 90,
                positioned: true,
                differential: false,
            },
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
    .expect("encode GT06 alarm")
}

/// The acknowledgement the server owes for a frame of `protocol` with `serial`.
pub fn gt06_ack(protocol: u8, serial: u16) -> Vec<u8> {
    gt06::ack_frame(protocol, serial).to_vec()
}

/// A GT06 tag connected and logged in; it sends one fix at a time and waits for its ACK.
pub struct Gt06Tag {
    pub stream: TcpStream,
    pub imei: String,
    serial: u16,
}

impl Gt06Tag {
    /// Connects and logs in; the login must be acknowledged.
    pub async fn login(addr: SocketAddr, imei: &str) -> std::io::Result<Gt06Tag> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&gt06_login(imei, 1)).await?;
        let ack = read_n(&mut stream, GT06_ACK_LEN, STEP).await?;
        if ack != gt06_ack(gt06::proto::LOGIN, 1) {
            return Err(std::io::Error::other(format!(
                "unexpected login answer {ack:02x?}"
            )));
        }
        Ok(Gt06Tag {
            stream,
            imei: imei.to_owned(),
            serial: 1,
        })
    }

    /// Sends one fix and waits for its acknowledgement.
    pub async fn fix(&mut self, time: DateTime<Utc>, lat: f64, lon: f64) -> std::io::Result<()> {
        self.serial = self.serial.wrapping_add(1).max(2);
        let serial = self.serial;
        self.stream
            .write_all(&gt06_fix(serial, time, lat, lon))
            .await?;
        let ack = read_n(&mut self.stream, GT06_ACK_LEN, STEP).await?;
        if ack != gt06_ack(gt06::proto::ALARM, serial) {
            return Err(std::io::Error::other(format!(
                "fix {serial} answered with {ack:02x?}"
            )));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Teltonika
// ---------------------------------------------------------------------------------------

pub fn teltonika_imei(imei: &str) -> Bytes {
    teltonika::TeltonikaFrame::Imei(imei.to_owned())
        .to_bytes()
        .expect("encode Teltonika IMEI")
}

/// One AVL record: a GNSS fix with battery level 80 %.
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

/// A Codec 8 packet of one record per entry of `times`.
pub fn teltonika_packet(times: &[DateTime<Utc>], lat: f64, lon: f64) -> Bytes {
    let records = times
        .iter()
        .enumerate()
        .map(|(i, t)| teltonika_record(*t, lat + i as f64 * 1e-5, lon))
        .collect();
    teltonika::TeltonikaFrame::Avl(teltonika::AvlPacket {
        codec: teltonika::AvlCodec::Codec8,
        records,
    })
    .to_bytes()
    .expect("encode AVL packet")
}

/// A Teltonika tracker after an accepted IMEI handshake.
pub struct TeltonikaTag {
    pub stream: TcpStream,
}

impl TeltonikaTag {
    pub async fn connect(addr: SocketAddr, imei: &str) -> std::io::Result<TeltonikaTag> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&teltonika_imei(imei)).await?;
        let answer = read_n(&mut stream, 1, STEP).await?;
        if answer != [1] {
            return Err(std::io::Error::other(format!(
                "IMEI {imei} refused ({answer:02x?})"
            )));
        }
        Ok(TeltonikaTag { stream })
    }

    /// Sends one packet and returns the accepted-record count of the server's ACK.
    pub async fn send(&mut self, packet: &[u8]) -> std::io::Result<u32> {
        self.stream.write_all(packet).await?;
        let ack = read_n(&mut self.stream, 4, STEP).await?;
        let mut n = [0u8; 4];
        n.copy_from_slice(&ack);
        Ok(u32::from_be_bytes(n))
    }
}
