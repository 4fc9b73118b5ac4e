//! End-to-end test in headless Chromium (Debian's `/usr/bin/chromium`, driven through
//! `/usr/bin/chromedriver` with fantoccini): log in, receive a curfew-violation alert live while
//! the page is open, acknowledge it from the page, check the state, save a screenshot to
//! `target/e2e-dashboard.png`.
//!
//! Without Chromium/chromedriver the test fails under `CI=true` and is skipped loudly otherwise.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use chrono::Utc;
use common::*;
use em_alerts::{Phase, Signal};
use em_model::{
    AlertKind, AlertState, Device, Position, Protocol, Record, ScheduleSpec, WeeklyWindow,
    ZoneGeometry, ZoneKind, ZoneSpec,
};
use em_store::StoredRecord;
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
        })
}

/// Seed a realistic caseload for officer A: home zone with curfew, an exclusion zone, a
/// device with a short trail.
async fn seed(app: &App) {
    let store = &app.store;
    let home = ZoneSpec {
        id: 0,
        subject_id: Some(app.subject_a),
        group: None,
        name: "Home".into(),
        kind: ZoneKind::Inclusion,
        geometry: ZoneGeometry::Circle {
            center: [12.5683, 55.6761],
            radius_m: 80.0,
        },
        schedule: Some(ScheduleSpec {
            windows: (1..=7)
                .map(|day| WeeklyWindow {
                    day,
                    start: "21:00".into(),
                    end: "07:00".into(),
                })
                .collect(),
            exceptions: vec![],
        }),
        is_curfew_home: true,
    };
    store.upsert_zone(&home).await.expect("home zone");
    let park = ZoneSpec {
        id: 0,
        subject_id: Some(app.subject_a),
        group: None,
        name: "School (exclusion)".into(),
        kind: ZoneKind::Exclusion,
        geometry: ZoneGeometry::Polygon {
            rings: vec![vec![
                [12.5750, 55.6800],
                [12.5800, 55.6800],
                [12.5800, 55.6825],
                [12.5750, 55.6825],
            ]],
        },
        schedule: None,
        is_curfew_home: false,
    };
    store.upsert_zone(&park).await.expect("exclusion zone");
    let device = Device {
        device_id: "359000000000042".into(),
        protocol: Protocol::Em,
        secret: None,
        active: true,
    };
    store.upsert_device(&device).await.expect("device");
    let now = Utc::now();
    store
        .assign_device(
            &device.device_id,
            app.subject_a,
            now - chrono::Duration::days(2),
        )
        .await
        .expect("assign");
    let mut records = Vec::new();
    for i in 0..12 {
        let t = now - chrono::Duration::minutes(5 * (12 - i));
        let mut r = Record::new(device.device_id.clone(), Protocol::Em, t);
        r.position = Some(Position {
            lat: 55.6761 + 0.0004 * f64::from(i as u32),
            lon: 12.5683 + 0.0005 * f64::from(i as u32),
            accuracy_m: Some(8.0),
            speed_kmh: Some(4.5),
            course_deg: Some(45.0),
            altitude_m: None,
            satellites: Some(9),
            valid: true,
            source: em_model::FixSource::Gnss,
        });
        r.battery_pct = Some(80 - i as u8);
        r.beacon_in_range = Some(false);
        records.push(StoredRecord {
            subject_id: Some(app.subject_a),
            record: r,
        });
    }
    store.insert_records(&records).await.expect("records");
    // An older, lower-severity alert so the queue shows ordering.
    app.alerts
        .handle(Signal::new(
            AlertKind::LowBattery,
            Phase::Started,
            app.subject_a,
            now - chrono::Duration::hours(1),
        ))
        .await
        .expect("low battery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_login_live_alert_acknowledge_screenshot() {
    for bin in [CHROMIUM, CHROMEDRIVER] {
        if !Path::new(bin).exists() {
            if in_ci() {
                panic!("{bin} is missing: install Debian's chromium and chromium-driver packages");
            }
            eprintln!("SKIPPED: end-to-end browser test: {bin} is not installed");
            return;
        }
    }

    let app = start(em_store::testing::sqlite_store().await, config()).await;
    seed(&app).await;

    let port = free_port();
    let driver = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let _driver = KillOnDrop(driver);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "chromedriver did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let profile = tempfile::tempdir().expect("profile dir");
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), json!("chrome"));
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1440,960",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        }),
    );
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .expect("start a Chromium session through chromedriver");

    let result = drive(&client, &app).await;
    if result.is_err() {
        // Keep what the page looked like when it failed.
        let _ = save_screenshot(&client, "e2e-dashboard-failure.png").await;
    }
    let _ = client.close().await;
    if let Err(e) = result {
        panic!("browser scenario failed: {e}");
    }
}

async fn drive(client: &fantoccini::Client, app: &App) -> Result<(), String> {
    let wait = |secs| client.wait().at_most(Duration::from_secs(secs));
    client
        .goto(&app.base)
        .await
        .map_err(|e| format!("open page: {e}"))?;
    let user = wait(15)
        .for_element(Locator::Css("#login-username"))
        .await
        .map_err(|e| format!("login form: {e}"))?;
    user.send_keys("officer.a")
        .await
        .map_err(|e| e.to_string())?;
    client
        .find(Locator::Css("#login-password"))
        .await
        .map_err(|e| e.to_string())?
        .send_keys(PASSWORD)
        .await
        .map_err(|e| e.to_string())?;
    client
        .find(Locator::Css("#login-submit"))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;

    // Logged in, queue loaded, live feed connected.
    wait(20)
        .for_element(Locator::Css("#live.on"))
        .await
        .map_err(|e| format!("live feed never connected: {e}"))?;
    let who = client
        .find(Locator::Css("#who-name"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    if who != "Anna Officer" {
        return Err(format!("unexpected user shown: {who:?}"));
    }
    wait(10)
        .for_element(Locator::Css("li.alert"))
        .await
        .map_err(|e| format!("seeded alert not listed: {e}"))?;

    // Raise a curfew violation while the page is open.
    let mut signal = Signal::new(
        AlertKind::CurfewViolation,
        Phase::Started,
        app.subject_a,
        Utc::now(),
    );
    signal.evidence = json!({ "zone_name": "Home", "window": "21:00–07:00", "distance_m": 420 });
    let alert = app
        .alerts
        .handle(signal)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("curfew violation not raised")?;
    let item_css = format!("li.alert[data-alert-id=\"{}\"]", alert.id);
    let item = wait(10)
        .for_element(Locator::Css(&item_css))
        .await
        .map_err(|e| format!("alert {} did not arrive live: {e}", alert.id))?;
    let text = item.text().await.map_err(|e| e.to_string())?;
    if !text.contains("Alex Andersen") || !text.contains("Curfew violation") {
        return Err(format!("alert item text: {text:?}"));
    }
    // Most severe first: the new high-severity alert is above the low-battery one.
    let first = client
        .find(Locator::Css("#alert-list li.alert"))
        .await
        .map_err(|e| e.to_string())?
        .attr("data-alert-id")
        .await
        .map_err(|e| e.to_string())?;
    if first.as_deref() != Some(alert.id.to_string().as_str()) {
        return Err(format!(
            "queue order: first is {first:?}, expected {}",
            alert.id
        ));
    }

    // Acknowledge from the page.
    client
        .find(Locator::Css(&format!("{item_css} button.ack")))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    wait(10)
        .for_element(Locator::Css(&format!(
            "{item_css}[data-state=\"acknowledged\"]"
        )))
        .await
        .map_err(|e| format!("alert not shown acknowledged: {e}"))?;
    let stored = app
        .store
        .get_alert(alert.id)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("alert vanished")?;
    if stored.state != AlertState::Acknowledged || stored.acknowledged_by != Some(app.officer_a) {
        return Err(format!(
            "stored alert: {:?} by {:?}",
            stored.state, stored.acknowledged_by
        ));
    }
    // The map has drawn the zones and the last position.
    wait(10)
        .for_element(Locator::Css("#overview-map path"))
        .await
        .map_err(|e| format!("map zones: {e}"))?;
    wait(10)
        .for_element(Locator::Css("#overview-map circle"))
        .await
        .map_err(|e| format!("map position: {e}"))?;
    // Let the toast and highlight settle for the screenshot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    save_screenshot(client, "e2e-dashboard.png").await?;

    // Subject page: details, device state and trail playback.
    client
        .find(Locator::Css(&format!("{item_css} button.link")))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    wait(10)
        .for_element(Locator::Css("#subject-detail:not(.hidden) #sd-device dd"))
        .await
        .map_err(|e| format!("subject page: {e}"))?;
    client
        .find(Locator::Css("#pb-load"))
        .await
        .map_err(|e| e.to_string())?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    wait(10)
        .for_element(Locator::Css("#trail-map polyline"))
        .await
        .map_err(|e| format!("trail: {e}"))?;
    let status = client
        .find(Locator::Css("#pb-status"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    if !status.contains("Point 12 of 12") {
        return Err(format!("playback status: {status:?}"));
    }
    client.execute(
        "const s = document.getElementById('pb-slider'); s.value = 5; s.dispatchEvent(new Event('input'));",
        vec![],
    ).await.map_err(|e| e.to_string())?;
    let status = client
        .find(Locator::Css("#pb-status"))
        .await
        .map_err(|e| e.to_string())?
        .text()
        .await
        .map_err(|e| e.to_string())?;
    if !status.contains("Point 6 of 12") {
        return Err(format!(
            "playback status after moving the slider: {status:?}"
        ));
    }
    save_screenshot(client, "e2e-dashboard-subject.png").await?;
    Ok(())
}

async fn save_screenshot(client: &fantoccini::Client, name: &str) -> Result<(), String> {
    let png = client
        .screenshot()
        .await
        .map_err(|e| format!("screenshot: {e}"))?;
    let path = target_dir().join(name);
    std::fs::write(&path, png).map_err(|e| format!("write {}: {e}", path.display()))?;
    eprintln!("screenshot: {}", path.display());
    Ok(())
}
