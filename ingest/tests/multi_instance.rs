//! Scale-out for real: three `em` processes on one PostgreSQL schema and one Mosquitto broker,
//! each on ports the OS picked (read back from its address file). The database is the one bus:
//!
//! * a zone edited through instance A is read by B and C within one second (each instance's
//!   `/api/health` reports how far it has read the change log) and enforced by C;
//! * the alert C raises appears on A's live feed (SSE);
//! * every OMS message is delivered once, by whichever instance holds the outbox lease, and
//!   every alert change is published on MQTT once, by the holder of the publisher lease;
//! * `kill -9` of the lease holder moves delivery to another instance, nothing lost or doubled;
//! * a device streaming to the killed instance reconnects to another and loses nothing that
//!   was acknowledged.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use common::*;
use em_model::*;
use em_store::OutboxStatus;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PASSWORD: &str = "multi-instance-password-1";
const HOME: [f64; 2] = [12.50, 55.60];
/// About 6 km east of HOME.
const NEW_HOME: [f64; 2] = [12.60, 55.60];

/// What the OMS stand-in received: (idempotency key, event) in arrival order.
type Received = Arc<Mutex<Vec<(String, String)>>>;

async fn oms_receiver(received: Received) -> SocketAddr {
    async fn take(State(r): State<Received>, headers: HeaderMap, body: String) -> StatusCode {
        let key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let event = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["event"].as_str().map(str::to_string))
            .unwrap_or_default();
        r.lock().unwrap().push((key, event));
        StatusCode::OK
    }
    let app = axum::Router::new()
        .route("/oms", axum::routing::post(take))
        .with_state(received);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    addr
}

struct Instance {
    name: &'static str,
    child: Child,
    log: PathBuf,
    gt06: SocketAddr,
    dashboard: SocketAddr,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // A failing test must not leave processes behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Instance {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn config_text(schema: &str, oms: SocketAddr, mqtt: &str, name: &str, dir: &Path) -> String {
    let url = database_url();
    let addr_file = dir.join(format!("{name}.addrs.json"));
    format!(
        r#"
[database]
url = "{url}"
schema = "{schema}"
registry_refresh_secs = 30

[listeners]
bind = "127.0.0.1"
ephemeral_ports = true
addr_file = "{addr_file}"
gt06_port = 1
teltonika_port = 0
h02_port = 0
osmand_port = 0
idle_timeout_secs = 60
login_timeout_secs = 10

[mqtt]
enabled = false
publish_alerts = true
url = "{mqtt}"
client_id = "em-multi-{name}-{pid}"

[pipeline]
workers = 1
batch_max_wait_ms = 2
tick_secs = 1

[metrics]
enabled = false

[dashboard]
bind = "127.0.0.1:0"
login_failure_delay_ms = 0

[retention]
enabled = false

[alerts.escalation]
check_interval_secs = 1

[alerts.oms]
enabled = true
url = "http://{oms}/oms"
secret = "multi-instance-oms-secret-0123"
poll_interval_ms = 200
backoff_base_ms = 100
backoff_max_ms = 1000

[log]
filter = "warn,em_ingest=info,em_alerts=info,em_store=info"
"#,
        addr_file = addr_file.display(),
        pid = std::process::id(),
    )
}

async fn spawn_instance(name: &'static str, config: String, dir: &Path) -> Instance {
    let cfg_path = dir.join(format!("{name}.toml"));
    std::fs::write(&cfg_path, config).expect("config");
    let log = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).expect("log");
    let err = out.try_clone().expect("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_em"));
    cmd.args(["run", "--config"]).arg(&cfg_path);
    for (k, _) in em_ingest::config::ENV_OVERRIDES {
        cmd.env_remove(k);
    }
    let mut child = cmd
        .env_remove("EM_CONFIG")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("spawn em");
    let addr_file = dir.join(format!("{name}.addrs.json"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let addrs: Value = loop {
        if let Ok(text) = std::fs::read_to_string(&addr_file) {
            if let Ok(v) = serde_json::from_str(&text) {
                break v;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{name} exited early ({status}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{name} wrote no address file");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let addr = |k: &str| -> SocketAddr {
        addrs[k]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no {k} address in {addrs}"))
            .parse()
            .expect("address")
    };
    Instance {
        name,
        gt06: addr("gt06"),
        dashboard: addr("dashboard"),
        child,
        log,
    }
}

async fn login(http: &reqwest::Client, dashboard: SocketAddr) -> String {
    let r = http
        .post(format!("http://{dashboard}/api/login"))
        .json(&json!({"username": "sup", "password": PASSWORD, "bearer": true}))
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200, "login on {dashboard}");
    r.json::<Value>().await.expect("json")["token"]
        .as_str()
        .expect("token")
        .to_string()
}

async fn change_log_read(http: &reqwest::Client, dashboard: SocketAddr) -> i64 {
    http.get(format!("http://{dashboard}/api/health"))
        .send()
        .await
        .expect("health")
        .json::<Value>()
        .await
        .expect("json")["change_log"]
        .as_i64()
        .unwrap_or(-1)
}

/// Reads server-sent events into a channel of (event, data).
fn sse_events(
    http: reqwest::Client,
    dashboard: SocketAddr,
    token: String,
) -> tokio::sync::mpsc::UnboundedReceiver<(String, String)> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut res = http
            .get(format!("http://{dashboard}/api/alerts/stream"))
            .bearer_auth(token)
            .send()
            .await
            .expect("stream");
        assert_eq!(res.status(), 200);
        let mut buf = String::new();
        while let Ok(Some(chunk)) = res.chunk().await {
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(pos) = buf.find("\n\n") {
                let block: String = buf.drain(..pos + 2).collect();
                let (mut event, mut data) = (String::from("message"), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if tx.send((event, data)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The OS pid of the process holding `lease` in `schema`: the session holding the advisory
/// lock (key as the store computes it) names its process in `application_name`.
async fn lease_holder_pid(pool: &sqlx::PgPool, schema: &str, lease: &str) -> Option<u32> {
    let name: Option<String> = sqlx::query_scalar(
        "WITH k AS (SELECT hashtextextended($1 || '.em_lease.' || $2, 0) AS key)
         SELECT a.application_name FROM pg_locks l
           JOIN pg_stat_activity a ON a.pid = l.pid, k
         WHERE l.locktype = 'advisory' AND l.granted
           AND l.classid = ((k.key >> 32) & 4294967295)::oid
           AND l.objid = (k.key & 4294967295)::oid
         LIMIT 1",
    )
    .bind(schema)
    .bind(lease)
    .fetch_optional(pool)
    .await
    .expect("pg_locks");
    let name = name?;
    name.split(" pid ").nth(1)?.split(' ').next()?.parse().ok()
}

/// A GT06 tag streaming alarm frames (acknowledged by the protocol) to `addrs[0]`, moving to
/// the next address whenever the connection fails; records each acknowledged device time.
async fn streaming_tag(
    imei: String,
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    acked: Arc<Mutex<Vec<DateTime<Utc>>>>,
    stop: Arc<AtomicBool>,
) {
    let base = now_s() - chrono::Duration::hours(3);
    let mut n: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let addr = addrs.lock().unwrap()[0];
        let Ok(mut s) = TcpStream::connect(addr).await else {
            addrs.lock().unwrap().rotate_left(1);
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if s.write_all(&gt06_login(&imei, 1)).await.is_err()
            || read_n(&mut s, 10, Duration::from_secs(5)).await.is_err()
        {
            addrs.lock().unwrap().rotate_left(1);
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let serial = (n % 60000) as u16 + 2;
            let t = base + chrono::Duration::seconds(n);
            if s.write_all(&gt06_alarm(serial, t, 55.0, 10.0))
                .await
                .is_err()
            {
                break;
            }
            match read_n(&mut s, 10, Duration::from_secs(5)).await {
                Ok(ack) if ack == gt06_ack(em_protocols::gt06::proto::ALARM, serial) => {
                    acked.lock().unwrap().push(t);
                }
                _ => break,
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The connection failed: the tag's next try goes to another instance.
        addrs.lock().unwrap().rotate_left(1);
    }
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_share_one_bus() {
    let Some(db) = postgres_db().await else {
        return;
    };
    let Backend::Postgres(schema) = db.backend.clone() else {
        unreachable!()
    };
    let mqtt = mqtt_url();
    let broker = mqtt
        .trim_start_matches("mqtt://")
        .trim_end_matches('/')
        .to_string();
    if TcpStream::connect(&broker).await.is_err() {
        assert!(!in_ci(), "CI=true and no MQTT broker at {mqtt}");
        eprintln!("\n*** SKIPPED: no MQTT broker at {mqtt} ***\n");
        return;
    }
    let store = db.store.clone();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&database_url())
        .await
        .expect("pool");
    // Subject ids nobody else on the shared broker uses (alert topics carry them).
    let first_id: i64 = 1_000_000 + i64::from(std::process::id() % 100_000) * 10;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT setval('\"{schema}\".subjects_id_seq', {first_id})"
    )))
    .execute(&pool)
    .await
    .expect("setval");

    // --- orders ------------------------------------------------------------------------
    store
        .upsert_user(&User {
            id: 0,
            username: "sup".into(),
            display_name: "Sam Supervisor".into(),
            role: Role::Supervisor,
            password_hash: em_dashboard::hash_password(PASSWORD).expect("hash"),
            active: true,
        })
        .await
        .expect("user");
    let rules = BreachRules {
        buffer_m: 0.0,
        consecutive_fixes: 1,
        persist_secs: 0,
        no_fix_secs: 900,
    };
    let sid = store
        .upsert_subject(&Subject {
            id: 0,
            reference: "MULTI-1".into(),
            display_name: "Multi Instance".into(),
            officer_id: None,
            timezone: "Europe/Copenhagen".into(),
            order_start: Some(Utc::now() - chrono::Duration::days(1)),
            order_end: None,
            rules,
        })
        .await
        .expect("subject");
    let tag = "359710049000017";
    // The streaming tag is registered but worn by nobody: its records are stored and
    // acknowledged, and raise no alerts (none may be in flight when an instance is killed).
    let streamer = "359710049000025";
    register(&*store, tag, Protocol::Gt06, None).await;
    register(&*store, streamer, Protocol::Gt06, None).await;
    store
        .assign_device(tag, sid, Utc::now() - chrono::Duration::hours(2))
        .await
        .expect("assign");
    let zone_id = store
        .upsert_zone(&ZoneSpec {
            id: 0,
            subject_id: Some(sid),
            group: None,
            name: "Home".into(),
            kind: ZoneKind::Inclusion,
            geometry: ZoneGeometry::Circle {
                center: HOME,
                radius_m: 300.0,
            },
            schedule: None,
            is_curfew_home: false,
        })
        .await
        .expect("zone");

    // MQTT subscriber for the alert feed of our subject, before any instance runs.
    let mut opts = rumqttc::MqttOptions::new(
        format!("em-multi-sub-{}", std::process::id()),
        broker.split(':').next().unwrap_or("127.0.0.1"),
        broker
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(1883),
    );
    opts.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
    client
        .subscribe(format!("em/v1/alerts/{sid}/#"), rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let published: Arc<Mutex<Vec<Value>>> = Arc::default();
    let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel::<()>();
    {
        let published = published.clone();
        let mut subscribed_tx = Some(subscribed_tx);
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        if let Ok(v) = serde_json::from_slice::<Value>(&p.payload) {
                            published.lock().unwrap().push(v);
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        });
    }
    tokio::time::timeout(Duration::from_secs(10), subscribed)
        .await
        .expect("SUBACK within 10 s")
        .expect("subscriber alive");

    // --- three instances ------------------------------------------------------------------
    let received: Received = Arc::default();
    let oms = oms_receiver(received.clone()).await;
    let dir = tempfile::tempdir().expect("dir");
    let mut instances = Vec::new();
    for name in ["a", "b", "c"] {
        let cfg = config_text(&schema, oms, &mqtt, name, dir.path());
        instances.push(spawn_instance(name, cfg, dir.path()).await);
    }
    let http = reqwest::Client::new();
    let (a_dash, b_dash, c_dash) = (
        instances[0].dashboard,
        instances[1].dashboard,
        instances[2].dashboard,
    );

    // A's live feed. Sessions are shared: a login on A is valid on B and C.
    let token_a = login(&http, a_dash).await;
    for dash in [b_dash, c_dash] {
        let me = http
            .get(format!("http://{dash}/api/me"))
            .bearer_auth(&token_a)
            .send()
            .await
            .expect("me");
        assert_eq!(me.status(), 200, "a session from A is valid on {dash}");
    }
    let mut feed_a = sse_events(http.clone(), a_dash, token_a.clone());
    let first = tokio::time::timeout(Duration::from_secs(10), feed_a.recv())
        .await
        .expect("feed greets")
        .expect("event");
    assert_eq!(first.0, "ready");

    // The streaming tag starts on the instance that will be killed (chosen below); until
    // then on A.
    let stream_addrs = Arc::new(Mutex::new(vec![
        instances[0].gt06,
        instances[1].gt06,
        instances[2].gt06,
    ]));
    let acked: Arc<Mutex<Vec<DateTime<Utc>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));

    // --- 1. a zone edited through A is read by B and C within one second -----------------
    let edit = http
        .put(format!("http://{a_dash}/api/zones/{zone_id}"))
        .bearer_auth(&token_a)
        .json(&json!({
            "name": "Home (moved)", "kind": "inclusion", "shape": "circle",
            "center": NEW_HOME, "radius_m": 300
        }))
        .send()
        .await
        .expect("edit zone");
    let edited_at = Instant::now();
    assert_eq!(
        edit.status(),
        200,
        "{}",
        edit.text().await.unwrap_or_default()
    );
    let edit_id = store.last_change_id().await.expect("last change");
    let mut reach = BTreeMap::new();
    for (name, dash) in [("b", b_dash), ("c", c_dash)] {
        wait_for(
            &format!("{name} reads the zone edit"),
            Duration::from_secs(5),
            || async { change_log_read(&http, dash).await >= edit_id },
        )
        .await;
        reach.insert(name, edited_at.elapsed());
    }
    eprintln!("zone edit through A read by: {reach:?}");
    for (name, t) in &reach {
        assert!(
            *t < Duration::from_secs(1),
            "instance {name} read the edit after {t:?}"
        );
    }

    // --- 2. C enforces it; the alert C raises appears on A's feed ------------------------
    // A fix at the OLD home: inside the old zone, 6 km outside the edited one.
    let mut s = connect(instances[2].gt06).await;
    send(&mut s, &gt06_login(tag, 1)).await;
    read_n(&mut s, 10, Duration::from_secs(5))
        .await
        .expect("login ack");
    send(&mut s, &gt06_alarm(2, now_s(), HOME[1], HOME[0])).await;
    read_n(&mut s, 10, Duration::from_secs(5))
        .await
        .expect("fix ack");
    let alert: Alert = loop {
        let (event, data) = tokio::time::timeout(Duration::from_secs(15), feed_a.recv())
            .await
            .expect("the alert raised on C reaches A's feed within 15 s")
            .expect("event");
        if event != "alert" {
            continue;
        }
        let v: Value = serde_json::from_str(&data).expect("json");
        let a: Alert = serde_json::from_value(v["alert"].clone()).expect("alert");
        if a.subject_id == sid && a.kind == AlertKind::InclusionZoneExit {
            break a;
        }
    };
    assert_eq!(alert.zone_id, Some(zone_id));
    // C raised it (its log says so once the write returned; A's feed may be quicker).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !instances[2].log_text().contains("alert raised") {
        assert!(
            Instant::now() < deadline,
            "C raised it:\n{}",
            instances[2].log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(s);

    // --- 3. OMS: delivered once; MQTT: published once ------------------------------------
    let pending = || async {
        store
            .count_outbox("oms", OutboxStatus::Pending)
            .await
            .expect("count")
    };
    wait_for(
        "OMS delivers the raise",
        Duration::from_secs(15),
        || async { pending().await == 0 && !received.lock().unwrap().is_empty() },
    )
    .await;

    // --- 4. kill -9 the OMS lease holder while a tag streams to it -----------------------
    let holder = lease_holder_pid(&pool, &schema, "oms-outbox")
        .await
        .expect("some instance holds the OMS lease");
    let victim = instances
        .iter()
        .position(|i| i.child.id() == holder)
        .expect("the holder is one of ours");
    eprintln!("OMS lease held by {}", instances[victim].name);
    {
        let mut a = stream_addrs.lock().unwrap();
        let pos = a
            .iter()
            .position(|x| *x == instances[victim].gt06)
            .unwrap_or(0);
        a.rotate_left(pos);
    }
    let streaming = tokio::spawn(streaming_tag(
        streamer.to_string(),
        stream_addrs.clone(),
        acked.clone(),
        stop.clone(),
    ));
    wait_for("the tag streams", Duration::from_secs(10), || async {
        acked.lock().unwrap().len() >= 20
    })
    .await;
    let st = Command::new("kill")
        .args(["-9", &holder.to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let _ = instances[victim].child.wait();
    let killed_at = Instant::now();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != victim).collect();

    // Another instance takes the lease over.
    wait_for(
        "another instance takes the OMS lease",
        Duration::from_secs(10),
        || async {
            lease_holder_pid(&pool, &schema, "oms-outbox")
                .await
                .is_some_and(|p| p != holder)
        },
    )
    .await;
    eprintln!("OMS lease taken over after {:?}", killed_at.elapsed());

    // New alert changes through a survivor are delivered by the new holder.
    let survivor = &instances[survivors[0]];
    let token_s = login(&http, survivor.dashboard).await;
    let ack = http
        .post(format!(
            "http://{}/api/alerts/{}/ack",
            survivor.dashboard, alert.id
        ))
        .bearer_auth(&token_s)
        .header("X-Requested-With", "test")
        .send()
        .await
        .expect("ack");
    assert_eq!(
        ack.status(),
        200,
        "{}",
        ack.text().await.unwrap_or_default()
    );
    wait_for(
        "OMS delivers the acknowledgement",
        Duration::from_secs(15),
        || async {
            pending().await == 0
                && received
                    .lock()
                    .unwrap()
                    .iter()
                    .any(|(_, e)| e == "alert.acknowledged")
        },
    )
    .await;

    // The tag moved on and keeps being acknowledged by a survivor.
    let before = acked.lock().unwrap().len();
    wait_for(
        "the tag streams to a survivor",
        Duration::from_secs(20),
        || async { acked.lock().unwrap().len() >= before + 20 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), streaming).await;

    // Nothing acknowledged is lost.
    let stored: std::collections::HashSet<DateTime<Utc>> = store
        .device_records(streamer, 100_000)
        .await
        .expect("records")
        .into_iter()
        .map(|r| r.device_time)
        .collect();
    let acked = acked.lock().unwrap().clone();
    let lost: Vec<_> = acked.iter().filter(|t| !stored.contains(t)).collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged records lost: {lost:?}",
        lost.len(),
        acked.len()
    );

    // Each OMS message exactly once, all of them delivered.
    let got = received.lock().unwrap().clone();
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for (k, _) in &got {
        *per_key.entry(k.clone()).or_default() += 1;
    }
    let doubled: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "delivered more than once: {doubled:?}");
    let delivered = store
        .count_outbox("oms", OutboxStatus::Delivered)
        .await
        .expect("count");
    assert_eq!(delivered as usize, per_key.len(), "{got:?}");
    assert_eq!(pending().await, 0);

    // Each alert change of the subject published on MQTT exactly once.
    let changes = store.changes_after(0, 10_000).await.expect("log");
    let expected: Vec<(i64, String)> = changes
        .iter()
        .filter_map(|e| match &e.change {
            Change::Alert { event, alert, .. } if alert.subject_id == sid => {
                Some((alert.id, event.clone()))
            }
            _ => None,
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while published.lock().unwrap().len() < expected.len() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got: Vec<(i64, String)> = published
        .lock()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["alert"]["id"].as_i64().unwrap_or(0),
                v["event"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let kinds: Vec<String> = changes
        .iter()
        .filter_map(|e| match &e.change {
            Change::Alert { event, alert, .. } => Some(format!(
                "{} {} {} subject {}",
                alert.id,
                alert.kind.as_str(),
                event,
                alert.subject_id
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        got, expected,
        "every alert change published once, in order; alert changes: {kinds:#?}"
    );

    drop(instances);
}
