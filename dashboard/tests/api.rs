//! API tests against a real store: SQLite always, PostgreSQL when reachable.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use em_alerts::{Phase, Signal};
use em_dashboard::DashboardConfig;
use em_model::Change;
use em_model::{
    Alert, AlertKind, AlertState, Role, ScheduleSpec, WeeklyWindow, ZoneGeometry, ZoneKind,
    ZoneSpec,
};
use em_store::Store;
use reqwest::header::{RETRY_AFTER, SET_COOKIE};
use reqwest::StatusCode;
use serde_json::json;

async fn postgres() -> Option<Arc<dyn Store>> {
    em_store::testing::postgres_store().await
}

// ------------------------------------------------------------------ roles and caseload

async fn scenario_roles_and_caseload(store: Arc<dyn Store>) {
    let app = start(store, config()).await;
    let a = app.login("officer.a").await;

    // Own caseload only in the list.
    let list = a.get("/api/subjects").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    let ids: Vec<i64> = list
        .json()
        .as_array()
        .expect("array")
        .iter()
        .map(|s| s["id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, vec![app.subject_a]);

    // Own subject: readable and audited.
    let own = a.get(&format!("/api/subjects/{}", app.subject_a)).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.text);
    assert_eq!(own.json()["subject"]["reference"], "CASE-A");

    // Another officer's subject: 403 on every read and change, each an access.denied record.
    let b_subject = app.subject_b;
    for path in [
        format!("/api/subjects/{b_subject}"),
        format!("/api/subjects/{b_subject}/trail"),
        format!("/api/subjects/{b_subject}/zones"),
        format!("/api/alerts?subject_id={b_subject}"),
        // An id that does not exist is also 403 for an officer (no probing).
        "/api/subjects/999999".to_string(),
    ] {
        let r = a.get(&path).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.text);
    }
    let zone_create = a
        .post(&format!("/api/subjects/{b_subject}/zones"), Some(json!({
            "name": "X", "kind": "exclusion", "shape": "circle", "center": [12.0, 55.0], "radius_m": 100
        })))
        .await;
    assert_eq!(zone_create.status, StatusCode::FORBIDDEN);

    let audit = app.audit_actions(app.officer_a).await;
    let denied: Vec<_> = audit
        .iter()
        .filter(|e| e.action == "access.denied")
        .collect();
    assert!(denied.len() >= 6, "denials recorded: {denied:?}");
    assert!(denied
        .iter()
        .any(|e| e.subject_id == Some(b_subject) && e.details["attempted"] == "subject.view"));
    assert!(audit
        .iter()
        .any(|e| e.action == "subject.view" && e.subject_id == Some(app.subject_a)));
    assert!(audit.iter().any(|e| e.action == "subject.list"));

    // An alert on B's subject cannot be acknowledged by officer A.
    let raised = raise(
        &app,
        b_subject,
        AlertKind::StrapTamper,
        None,
        chrono::Utc::now(),
    )
    .await;
    let ack = a
        .post(&format!("/api/alerts/{}/ack", raised.id), None)
        .await;
    assert_eq!(ack.status, StatusCode::FORBIDDEN);
    // And it is not in A's queue.
    let queue = a.get("/api/alerts").await;
    assert_eq!(queue.status, StatusCode::OK);
    assert!(
        queue.json().as_array().expect("array").is_empty(),
        "{}",
        queue.text
    );

    // Supervisor sees everything.
    let sup = app.login("super").await;
    let list = sup.get("/api/subjects").await;
    assert_eq!(list.json().as_array().map(Vec::len), Some(2));
    let b = sup.get(&format!("/api/subjects/{b_subject}")).await;
    assert_eq!(b.status, StatusCode::OK);
    let queue = sup.get("/api/alerts").await;
    assert_eq!(queue.json().as_array().map(Vec::len), Some(1));
    assert_eq!(
        sup.get("/api/subjects/999999").await.status,
        StatusCode::NOT_FOUND
    );
    let audit_view = sup.get("/api/audit?action=access.denied").await;
    assert_eq!(audit_view.status, StatusCode::OK);
    assert!(audit_view
        .json()
        .as_array()
        .expect("array")
        .iter()
        .all(|e| e["action"] == "access.denied"));
    assert!(!audit_view.json().as_array().expect("array").is_empty());

    // Officer B can acknowledge their own subject's alert; the store audits it.
    let bo = app.login("officer.b").await;
    let ack = bo
        .post(&format!("/api/alerts/{}/ack", raised.id), None)
        .await;
    assert_eq!(ack.status, StatusCode::OK, "{}", ack.text);
    assert_eq!(ack.json()["state"], "acknowledged");
    let alert_audit = app
        .store
        .list_audit(&em_store::AuditFilter {
            target_type: Some("alert".into()),
            limit: Some(100),
            ..Default::default()
        })
        .await
        .expect("audit");
    assert!(
        alert_audit.iter().any(|e| e.actor == "officer.b"),
        "{alert_audit:?}"
    );
}

#[tokio::test]
async fn roles_and_caseload_sqlite() {
    scenario_roles_and_caseload(em_store::testing::sqlite_store().await).await;
}

#[tokio::test]
async fn roles_and_caseload_postgres() {
    if let Some(store) = postgres().await {
        scenario_roles_and_caseload(store).await;
    }
}

#[tokio::test]
async fn admin_only_endpoints() {
    let app = start(em_store::testing::sqlite_store().await, config()).await;
    let officer = app.login("officer.a").await;
    let sup = app.login("super").await;
    let admin = app.login("admin").await;
    let new_user = json!({"username": "officer.c", "display_name": "Cleo", "role": "officer", "password": "long-enough-pw"});
    let device = json!({"device_id": "864000000000001", "protocol": "gt06"});

    for s in [&officer, &sup] {
        assert_eq!(
            s.post("/api/users", Some(new_user.clone())).await.status,
            StatusCode::FORBIDDEN
        );
        assert_eq!(s.get("/api/devices").await.status, StatusCode::FORBIDDEN);
        assert_eq!(
            s.post("/api/devices", Some(device.clone())).await.status,
            StatusCode::FORBIDDEN
        );
    }
    assert_eq!(
        officer.get("/api/users").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        officer.get("/api/audit").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        officer.get("/api/reports/curfew").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        officer
            .post(
                "/api/subjects",
                Some(json!({"reference": "X", "display_name": "X", "timezone": "UTC"}))
            )
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(sup.get("/api/users").await.status, StatusCode::OK);

    // Admin: users, devices, assignments.
    let created = admin.post("/api/users", Some(new_user.clone())).await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text);
    assert!(
        created.json().get("password_hash").is_none(),
        "hash must never be sent"
    );
    let dup = admin.post("/api/users", Some(new_user)).await;
    assert_eq!(dup.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(dup.json()["errors"]["username"].is_string());
    let bad = admin
        .post(
            "/api/users",
            Some(
                json!({"username": "X Y", "display_name": "", "role": "boss", "password": "short"}),
            ),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let errs = bad.json()["errors"].clone();
    for f in ["username", "display_name", "role", "password"] {
        assert!(errs[f].is_string(), "missing {f}: {errs}");
    }
    let mut changes = ChangeLog::new(&app.store).await;
    let dev = admin
        .post(
            "/api/devices",
            Some(json!({"device_id": "864000000000001", "protocol": "gt06"})),
        )
        .await;
    assert_eq!(dev.status, StatusCode::OK, "{}", dev.text);
    assert_eq!(dev.json()["has_secret"], false);
    let assign = admin
        .post(
            "/api/devices/864000000000001/assign",
            Some(json!({"subject_id": app.subject_a})),
        )
        .await;
    assert_eq!(assign.status, StatusCode::OK, "{}", assign.text);
    let list = admin.get("/api/devices").await;
    assert_eq!(list.json()[0]["subject_id"], app.subject_a);
    let un = admin
        .post("/api/devices/864000000000001/unassign", None)
        .await;
    assert_eq!(un.status, StatusCode::OK, "{}", un.text);
    // Create, assign and unassign each tell the ingest registry to re-read the device at once.
    for step in ["create", "assign", "unassign"] {
        assert!(
            matches!(changes.next().await, Some(Change::Device { device_id: d }) if d == "864000000000001"),
            "no registry change after {step}"
        );
    }

    // Admin cannot lock themselves out.
    let me = admin
        .put(
            &format!("/api/users/{}", app.admin),
            json!({"active": false}),
        )
        .await;
    assert_eq!(me.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Deactivating a user ends their sessions at once.
    let off = admin
        .put(
            &format!("/api/users/{}", app.officer_a),
            json!({"active": false}),
        )
        .await;
    assert_eq!(off.status, StatusCode::OK, "{}", off.text);
    assert_eq!(
        officer.get("/api/me").await.status,
        StatusCode::UNAUTHORIZED
    );
    let relogin = app.login_response("officer.a", PASSWORD).await;
    assert_eq!(relogin.status, StatusCode::UNAUTHORIZED);

    let audit = app.audit_actions(app.admin).await;
    for action in [
        "user.create",
        "device.create",
        "device.assign",
        "device.unassign",
        "user.update",
    ] {
        assert!(
            audit.iter().any(|e| e.action == action),
            "no {action} audit record"
        );
    }
    let denied = app.audit_actions(app.supervisor).await;
    assert!(denied
        .iter()
        .any(|e| e.action == "access.denied" && e.details["attempted"] == "user.create"));
}

// ------------------------------------------------------------------ login and sessions

#[tokio::test]
async fn login_failure_is_audited_delayed_and_throttled() {
    let app = start(em_store::testing::sqlite_store().await, config()).await;
    let wrong = app.login_response("officer.a", "wrong password").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.headers.get(SET_COOKIE).is_none());
    let unknown = app.login_response("nobody", "whatever-password").await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        wrong.json()["error"],
        unknown.json()["error"],
        "same answer for both"
    );

    let failed = app.audit_actions(app.officer_a).await;
    assert!(failed
        .iter()
        .any(|e| e.action == "auth.login_failed" && e.details["reason"] == "wrong password"));

    // Two more failures, then the username must wait (even with the right password).
    app.login_response("officer.a", "wrong again").await;
    app.login_response("officer.a", "and again").await;
    let throttled = app.login_response("officer.a", PASSWORD).await;
    assert_eq!(
        throttled.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        throttled.text
    );
    assert!(throttled.headers.get(RETRY_AFTER).is_some());
    // Other users are not affected.
    app.login("officer.b").await;
}

#[tokio::test]
async fn session_cookie_logout_expiry_and_csrf() {
    let cfg = DashboardConfig {
        session_ttl_secs: 1,
        ..config()
    };
    let app = start(em_store::testing::sqlite_store().await, cfg).await;

    let r = app.login_response("officer.a", PASSWORD).await;
    let set = r
        .headers
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("cookie")
        .to_string();
    assert!(set.starts_with("em_session="));
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let token = set
        .split(';')
        .next()
        .and_then(|p| p.split_once('='))
        .map(|p| p.1.to_string())
        .expect("token");
    assert_eq!(token.len(), 64, "256-bit token, hex");
    assert!(r.json().get("token").is_none(), "token only on request");

    // Logout ends the session.
    let s = app.login("officer.a").await;
    assert_eq!(s.get("/api/me").await.status, StatusCode::OK);
    // CSRF: a mutating request without JSON content type or X-Requested-With is refused.
    let forged = app
        .http
        .post(format!("{}/api/logout", app.base))
        .header("Cookie", &s.cookie)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("x=1")
        .send()
        .await
        .expect("send");
    assert_eq!(forged.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        s.get("/api/me").await.status,
        StatusCode::OK,
        "forged logout had no effect"
    );
    let out = s.post("/api/logout", None).await;
    assert_eq!(out.status, StatusCode::OK);
    assert!(out
        .headers
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.contains("Max-Age=0")));
    assert_eq!(s.get("/api/me").await.status, StatusCode::UNAUTHORIZED);

    // Expiry: idle longer than the TTL.
    let s = app.login("officer.a").await;
    assert_eq!(s.get("/api/me").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(s.get("/api/me").await.status, StatusCode::UNAUTHORIZED);

    // Bearer tokens work for API clients.
    let r = common::raw(
        &app.http,
        reqwest::Method::POST,
        &format!("{}/api/login", app.base),
        None,
        Some(json!({"username": "super", "password": PASSWORD, "bearer": true})),
    )
    .await;
    let token = r.json()["token"].as_str().expect("token").to_string();
    let me = app
        .http
        .get(format!("{}/api/me", app.base))
        .bearer_auth(&token)
        .send()
        .await
        .expect("me");
    assert_eq!(me.status(), StatusCode::OK);
    assert_eq!(
        app.http
            .get(format!("{}/api/me", app.base))
            .bearer_auth("0".repeat(64))
            .send()
            .await
            .expect("me")
            .status(),
        StatusCode::UNAUTHORIZED
    );

    let audit = app.audit_actions(app.officer_a).await;
    assert!(audit.iter().any(|e| e.action == "auth.login"));
    assert!(audit.iter().any(|e| e.action == "auth.logout"));
}

#[tokio::test]
async fn page_and_headers() {
    let app = start(em_store::testing::sqlite_store().await, config()).await;
    let page = app.http.get(&app.base).send().await.expect("page");
    assert_eq!(page.status(), StatusCode::OK);
    let csp = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(csp.contains("default-src 'self'"), "{csp}");
    let html = page.text().await.expect("html");
    assert!(
        html.contains("/assets/app.js") && !html.contains("http://") && !html.contains("https://"),
        "page must not load external resources"
    );
    let js = app
        .http
        .get(format!("{}/assets/app.js", app.base))
        .send()
        .await
        .expect("js");
    assert_eq!(js.status(), StatusCode::OK);
    assert!(
        !js.text().await.expect("js").contains("innerHTML"),
        "no innerHTML in the page script"
    );
    let health = app
        .http
        .get(format!("{}/api/health", app.base))
        .send()
        .await
        .expect("health");
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(
        app.http
            .get(format!("{}/api/me", app.base))
            .send()
            .await
            .expect("me")
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.http
            .get(format!("{}/api/nope", app.base))
            .send()
            .await
            .expect("404")
            .status(),
        StatusCode::NOT_FOUND
    );
}

// ------------------------------------------------------------------ zones and validation

async fn scenario_zone_editor(store: Arc<dyn Store>) {
    let app = start(store, config()).await;
    let mut changes = ChangeLog::new(&app.store).await;
    let a = app.login("officer.a").await;
    let path = format!("/api/subjects/{}/zones", app.subject_a);

    let bad = a.post(&path, Some(json!({
        "name": "Home", "kind": "inclusion", "shape": "circle", "center": [12.5, 55.6], "radius_m": 0
    }))).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(bad.json(), json!({"errors": {"radius_m": "must be > 0"}}));

    let bad = a.post(&path, Some(json!({
        "name": "", "kind": "inclusion", "shape": "polygon", "coordinates": "[[12.5,55.6],[12.6",
        "windows": [{"day": 9, "start": "25:00", "end": "07:00"}]
    }))).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let errs = bad.json()["errors"].clone();
    for f in ["name", "coordinates", "windows[0].day", "windows[0].start"] {
        assert!(errs[f].is_string(), "missing {f}: {errs}");
    }
    assert!(errs.get("windows[0].end").is_none());
    assert!(
        changes.next().await.is_none(),
        "invalid input sends no order change"
    );

    let ok = a.post(&path, Some(json!({
        "name": "Home", "kind": "inclusion", "is_curfew_home": true, "shape": "polygon",
        "coordinates": "[[12.50,55.60],[12.51,55.60],[12.51,55.61],[12.50,55.61]]",
        "windows": [{"day": 1, "start": "21:00", "end": "07:00"}],
        "exceptions": [{"kind": "absence", "start": "2024-05-01T18:00:00Z", "end": "2024-05-01T23:00:00Z", "note": "hospital"}]
    }))).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    let zone: ZoneSpec = serde_json::from_str(&ok.text).expect("zone");
    assert!(zone.id > 0);
    assert_eq!(zone.subject_id, Some(app.subject_a));
    match changes.next().await {
        Some(Change::Zone { zone: z }) => assert_eq!(z, zone),
        other => panic!("expected ZoneUpserted, got {other:?}"),
    }
    let stored = app
        .store
        .get_zone(zone.id)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!(stored, zone);

    let upd = a.put(&format!("/api/zones/{}", zone.id), json!({
        "name": "Home (circle)", "kind": "inclusion", "is_curfew_home": true, "shape": "circle",
        "center": [12.505, 55.605], "radius_m": 80, "windows": [{"day": 2, "start": "20:00", "end": "06:00"}]
    })).await;
    assert_eq!(upd.status, StatusCode::OK, "{}", upd.text);
    assert!(
        matches!(changes.next().await, Some(Change::Zone { zone: z }) if z.name == "Home (circle)")
    );

    // Officer B cannot change or delete it.
    let b = app.login("officer.b").await;
    assert_eq!(
        b.delete(&format!("/api/zones/{}", zone.id)).await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        b.get(&format!("/api/zones/{}", zone.id)).await.status,
        StatusCode::FORBIDDEN
    );

    let del = a.delete(&format!("/api/zones/{}", zone.id)).await;
    assert_eq!(del.status, StatusCode::OK, "{}", del.text);
    assert!(
        matches!(changes.next().await, Some(Change::ZoneDeleted { zone_id: id, .. }) if id == zone.id)
    );
    assert!(app.store.get_zone(zone.id).await.expect("get").is_none());

    let audit = app.audit_actions(app.officer_a).await;
    for action in ["zone.create", "zone.update", "zone.delete"] {
        assert!(
            audit
                .iter()
                .any(|e| e.action == action && e.subject_id == Some(app.subject_a)),
            "no {action} audit record"
        );
    }

    // Subject editing (supervisor) publishes SubjectUpserted and validates per field.
    let sup = app.login("super").await;
    let bad = sup.put(&format!("/api/subjects/{}", app.subject_a), json!({
        "reference": "CASE-A", "display_name": "Alex Andersen", "timezone": "Mars/Base", "officer_id": app.supervisor
    })).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    let errs = bad.json()["errors"].clone();
    assert!(
        errs["timezone"].is_string() && errs["officer_id"].is_string(),
        "{errs}"
    );
    let moved = sup.put(&format!("/api/subjects/{}", app.subject_a), json!({
        "reference": "CASE-A", "display_name": "Alex Andersen", "timezone": "Europe/Copenhagen", "officer_id": app.officer_b
    })).await;
    assert_eq!(moved.status, StatusCode::OK, "{}", moved.text);
    assert!(
        matches!(changes.next().await, Some(Change::Subject { subject: s }) if s.officer_id == Some(app.officer_b))
    );
    // The caseload change applies at once.
    assert_eq!(
        a.get(&format!("/api/subjects/{}", app.subject_a))
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        b.get(&format!("/api/subjects/{}", app.subject_a))
            .await
            .status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn zone_editor_validation_and_order_changes_sqlite() {
    scenario_zone_editor(em_store::testing::sqlite_store().await).await;
}

#[tokio::test]
async fn zone_editor_validation_and_order_changes_postgres() {
    if let Some(store) = postgres().await {
        scenario_zone_editor(store).await;
    }
}

// ------------------------------------------------------------------ alerts

#[tokio::test]
async fn resolve_requires_code_and_note_for_other() {
    let app = start(em_store::testing::sqlite_store().await, config()).await;
    let alert = app
        .alerts
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Started,
            app.subject_a,
            chrono::Utc::now(),
        ))
        .await
        .expect("handle")
        .expect("alert raised");
    let a = app.login("officer.a").await;
    let path = format!("/api/alerts/{}/resolve", alert.id);
    // The strap is still open: resolving would silence it.
    let live = a
        .post(&path, Some(json!({"code": "subject_contacted"})))
        .await;
    assert_eq!(live.status, StatusCode::CONFLICT, "{}", live.text);
    assert!(
        live.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("strap is still reported open")),
        "{}",
        live.text
    );
    app.alerts
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Ended,
            app.subject_a,
            chrono::Utc::now(),
        ))
        .await
        .expect("handle end");
    let r = a.post(&path, Some(json!({"code": ""}))).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.json()["errors"]["code"].is_string());
    let r = a.post(&path, Some(json!({"code": "made_up"}))).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.json()["errors"]["code"].is_string());
    let r = a
        .post(&path, Some(json!({"code": "other", "note": "  "})))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.json()["errors"]["note"].is_string());
    let r = a
        .post(
            &path,
            Some(json!({"code": "subject_contacted", "note": "Phoned; strap refitted"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["state"], "resolved");
    assert_eq!(r.json()["resolution_note"], "Phoned; strap refitted");
    let again = a
        .post(&path, Some(json!({"code": "subject_contacted"})))
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT, "{}", again.text);
    let stored = app
        .store
        .get_alert(alert.id)
        .await
        .expect("get")
        .expect("alert")
        .alert;
    assert_eq!(stored.state, AlertState::Resolved);
    assert_eq!(stored.resolved_by, Some(app.officer_a));
}

async fn scenario_sse(store: Arc<dyn Store>) {
    let app = start(store, config()).await;
    let a = app.login("officer.a").await;
    let b = app.login("officer.b").await;
    let sup = app.login("super").await;
    let mut feed_a = SseReader::open(&a).await;
    let mut feed_b = SseReader::open(&b).await;
    let mut feed_s = SseReader::open(&sup).await;
    for f in [&mut feed_a, &mut feed_b, &mut feed_s] {
        let (event, _) = f.next(Duration::from_secs(5)).await.expect("ready event");
        assert_eq!(event, "ready");
    }

    let mut signal = Signal::new(
        AlertKind::CurfewViolation,
        Phase::Started,
        app.subject_a,
        chrono::Utc::now(),
    );
    signal.evidence = json!({"zone_name": "Home", "window": "21:00–07:00"});
    let raised = app
        .alerts
        .handle(signal)
        .await
        .expect("handle")
        .expect("raised");

    let notice = feed_a
        .next_alert(Duration::from_secs(5))
        .await
        .expect("officer A gets the alert");
    assert_eq!(notice["alert"]["id"], raised.id);
    assert_eq!(notice["alert"]["subject_id"], app.subject_a);
    assert_eq!(notice["event"], "alert.created");
    let seen_by_sup = feed_s
        .next_alert(Duration::from_secs(5))
        .await
        .expect("supervisor gets it");
    assert_eq!(seen_by_sup["alert"]["id"], raised.id);

    // Officer B must not get it: the next alert B sees is the one on B's own subject.
    let other = app
        .alerts
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Started,
            app.subject_b,
            chrono::Utc::now(),
        ))
        .await
        .expect("handle")
        .expect("raised");
    let notice_b = feed_b
        .next_alert(Duration::from_secs(5))
        .await
        .expect("officer B gets own alert");
    assert_eq!(
        notice_b["alert"]["id"], other.id,
        "B saw A's alert: {notice_b}"
    );
    assert!(
        feed_a
            .next_alert(Duration::from_millis(500))
            .await
            .is_none(),
        "A must not see B's alert"
    );

    // Acknowledging is published too.
    let ack = a
        .post(&format!("/api/alerts/{}/ack", raised.id), None)
        .await;
    assert_eq!(ack.status, StatusCode::OK, "{}", ack.text);
    let notice = feed_a
        .next_alert(Duration::from_secs(5))
        .await
        .expect("ack notice");
    assert_eq!(notice["alert"]["state"], "acknowledged");

    // Logging out ends the stream (checked periodically).
    let _ = b.post("/api/logout", None).await;
}

#[tokio::test]
async fn sse_delivers_to_the_right_officer_sqlite() {
    scenario_sse(em_store::testing::sqlite_store().await).await;
}

#[tokio::test]
async fn sse_delivers_to_the_right_officer_postgres() {
    if let Some(store) = postgres().await {
        scenario_sse(store).await;
    }
}

// ------------------------------------------------------------------ curfew report

async fn scenario_curfew_report(store: Arc<dyn Store>) {
    let app = start(store, config()).await;
    // Curfew every night 20:00-06:00 UTC for subject A.
    let zone = ZoneSpec {
        id: 0,
        subject_id: Some(app.subject_a),
        group: None,
        name: "Home".into(),
        kind: ZoneKind::Inclusion,
        geometry: ZoneGeometry::Circle {
            center: [12.5, 55.6],
            radius_m: 60.0,
        },
        schedule: Some(ScheduleSpec {
            windows: (1..=7)
                .map(|day| WeeklyWindow {
                    day,
                    start: "20:00".into(),
                    end: "06:00".into(),
                })
                .collect(),
            exceptions: vec![],
        }),
        is_curfew_home: true,
    };
    let zone_id = app.store.upsert_zone(&zone).await.expect("zone");
    // A 2-hour violation on the first night (21:00-23:00), ended by evidence.
    let raised = raise(
        &app,
        app.subject_a,
        AlertKind::CurfewViolation,
        Some(zone_id),
        ts("2024-01-01T21:00:00Z"),
    )
    .await;
    app.alerts
        .handle(Signal {
            kind: AlertKind::CurfewViolation,
            phase: Phase::Ended,
            subject_id: app.subject_a,
            device_id: None,
            zone_id: Some(zone_id),
            at: ts("2024-01-01T23:00:00Z"),
            evidence: json!({}),
        })
        .await
        .expect("end");

    let sup = app.login("super").await;
    let q = "from=2024-01-01T12:00:00Z&to=2024-01-03T12:00:00Z";
    let json_report = sup.get(&format!("/api/reports/curfew?{q}")).await;
    assert_eq!(json_report.status, StatusCode::OK, "{}", json_report.text);
    let rep = json_report.json();
    let row = rep["subjects"]
        .as_array()
        .expect("subjects")
        .iter()
        .find(|s| s["subject_id"] == app.subject_a)
        .expect("subject a row")
        .clone();
    assert_eq!(row["required_secs"], 20 * 3600);
    assert_eq!(row["violation_secs"], 2 * 3600);
    assert_eq!(row["compliant_secs"], 18 * 3600);
    assert_eq!(row["compliance_pct"], 90.0);
    assert_eq!(row["officer_name"], "Anna Officer");

    let csv = sup
        .get(&format!("/api/reports/curfew?{q}&format=csv"))
        .await;
    assert_eq!(csv.status, StatusCode::OK);
    assert!(csv
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/csv")));
    assert!(csv
        .headers
        .get("content-disposition")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("curfew-20240101-20240103.csv")));
    // A week asked in local time is named by its local days (23–30 Nov), not the UTC dates.
    let week = sup
        .get("/api/reports/curfew?from=2026-11-23T00:00:00%2B01:00&to=2026-12-01T00:00:00%2B01:00&format=csv")
        .await;
    assert_eq!(week.status, StatusCode::OK, "{}", week.text);
    let name = week
        .headers
        .get("content-disposition")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(name.contains("curfew-20261123-20261130.csv"), "{name}");
    let lines: Vec<&str> = csv.text.lines().collect();
    assert_eq!(lines[0], "row_type,subject_id,reference,subject_name,officer,required_hours,compliant_hours,violation_hours,violation_count,compliance_pct,alert_id,alert_kind,violation_start,violation_end,note");
    let subject_line = format!(
        "subject,{},CASE-A,Alex Andersen,Anna Officer,20.00,18.00,2.00,1,90.0,,,,,",
        app.subject_a
    );
    assert!(lines.contains(&subject_line.as_str()), "{}", csv.text);
    let violation_line = format!(
        "violation,{},CASE-A,Alex Andersen,Anna Officer,,,2.00,,,{},curfew_violation,2024-01-01T21:00:00+00:00,2024-01-01T23:00:00+00:00,",
        app.subject_a, raised.id);
    assert!(lines.contains(&violation_line.as_str()), "{}", csv.text);
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("officer,,,,Anna Officer,20.00,18.00,2.00,1,90.0")),
        "{}",
        csv.text
    );
    // Subject B has no curfew: listed with zero required hours.
    assert!(lines.iter().any(|l| l.starts_with(&format!(
        "subject,{},CASE-B,Billie Berg,Bo Officer,0.00,0.00,0.00,0,",
        app.subject_b
    ))));

    let bad = sup
        .get("/api/reports/curfew?from=2024-01-03&to=2024-01-01")
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bad.json()["errors"]["to"].is_string());
    let bad = sup.get("/api/reports/curfew?from=yesterday").await;
    assert!(bad.json()["errors"]["from"].is_string());

    let audit = app.audit_actions(app.supervisor).await;
    assert!(audit
        .iter()
        .any(|e| e.action == "report.curfew" && e.details["format"] == "csv"));
}

#[tokio::test]
async fn curfew_report_json_and_csv_sqlite() {
    scenario_curfew_report(em_store::testing::sqlite_store().await).await;
}

#[tokio::test]
async fn curfew_report_json_and_csv_postgres() {
    if let Some(store) = postgres().await {
        scenario_curfew_report(store).await;
    }
}

#[tokio::test]
async fn ensure_user_is_idempotent_and_hashes() {
    let store = em_store::testing::sqlite_store().await;
    let id = em_dashboard::ensure_user(
        store.as_ref(),
        "demo",
        "Demo",
        Role::Officer,
        "first-password-1",
    )
    .await
    .expect("create");
    let again = em_dashboard::ensure_user(
        store.as_ref(),
        "demo",
        "Demo Two",
        Role::Supervisor,
        "second-password-2",
    )
    .await
    .expect("update");
    assert_eq!(id, again);
    let u = store.get_user(id).await.expect("get").expect("user");
    assert_eq!(u.role, Role::Supervisor);
    assert!(em_dashboard::verify_password(
        "second-password-2",
        &u.password_hash
    ));
    assert!(!em_dashboard::verify_password(
        "first-password-1",
        &u.password_hash
    ));
    assert!(
        em_dashboard::ensure_user(store.as_ref(), "x", "X", Role::Officer, "short")
            .await
            .is_err()
    );
}

// ------------------------------------------------------------------ serve(): TLS and shutdown

#[tokio::test]
async fn serve_https_sets_secure_cookie_and_shuts_down() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let dir = tempfile::tempdir().expect("tmp");
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");

    let store = em_store::testing::sqlite_store().await;
    em_dashboard::ensure_user(store.as_ref(), "super", "Sara", Role::Supervisor, PASSWORD)
        .await
        .expect("user");
    let alerts = Arc::new(
        em_alerts::AlertService::new(store.clone(), em_alerts::AlertConfig::default())
            .expect("alerts"),
    );
    let state = em_dashboard::AppState::new(store, alerts);
    let cfg = DashboardConfig {
        bind: ([127, 0, 0, 1], 0).into(),
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        ..config()
    };
    // Bound here (port 0), the address read back, then served.
    let listener = em_dashboard::bind(&cfg).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(em_dashboard::serve_on(
        listener,
        cfg,
        state.clone(),
        shutdown.clone(),
    ));

    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let base = format!("https://127.0.0.1:{port}");
    let mut up = false;
    for _ in 0..100 {
        if http
            .get(format!("{base}/api/health"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "HTTPS server did not come up");
    let login = http
        .post(format!("{base}/api/login"))
        .json(&json!({"username": "super", "password": PASSWORD}))
        .send()
        .await
        .expect("login");
    assert_eq!(login.status(), StatusCode::OK);
    let cookie = login
        .headers()
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(cookie.contains("; Secure"), "{cookie}");
    // Plain HTTP is not served on the TLS port.
    let plain = reqwest::get(format!("http://127.0.0.1:{port}/api/health")).await;
    assert!(!plain.is_ok_and(|r| r.status().is_success()));

    shutdown.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(15), server)
        .await
        .expect("server stops");
    assert!(stopped.expect("join").is_ok());

    // Misconfiguration is an error, not a panic.
    let half = DashboardConfig {
        tls_cert: Some(cert),
        tls_key: None,
        bind: ([127, 0, 0, 1], 0).into(),
        ..config()
    };
    assert!(em_dashboard::serve(
        half,
        state.clone(),
        tokio_util::sync::CancellationToken::new()
    )
    .await
    .is_err());
    let missing = DashboardConfig {
        tls_cert: Some(dir.path().join("nope.pem")),
        tls_key: Some(key),
        bind: ([127, 0, 0, 1], 0).into(),
        ..config()
    };
    let err = em_dashboard::serve(missing, state, tokio_util::sync::CancellationToken::new()).await;
    assert!(err.is_err());
}

/// Devices of protocols that carry a secret get one generated at creation, returned in that
/// response only; the store keeps its hash; IMEI-only protocols refuse a secret.
#[tokio::test]
async fn device_secrets_are_generated_once_and_stored_hashed() {
    let app = start(em_store::testing::sqlite_store().await, config()).await;
    let admin = app.login("admin").await;

    // GT06 cannot carry a secret: a given one is refused, not stored for show.
    let gt = admin
        .post(
            "/api/devices",
            Some(json!({"device_id": "864000000000009", "protocol": "gt06", "secret": "0123456789abcdef-x"})),
        )
        .await;
    assert_eq!(gt.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", gt.text);
    assert!(gt.json()["errors"]["secret"].is_string());

    // OsmAnd without a secret: one is generated and shown once.
    let created = admin
        .post(
            "/api/devices",
            Some(json!({"device_id": "phone-7", "protocol": "osmand"})),
        )
        .await;
    assert_eq!(created.status, StatusCode::OK, "{}", created.text);
    assert_eq!(created.json()["has_secret"], true);
    let secret = created.json()["secret"]
        .as_str()
        .expect("generated secret returned at creation")
        .to_owned();
    assert!(secret.len() >= 32, "{secret}");
    let row = app.store.get_device("phone-7").await.unwrap().unwrap();
    let stored = row.secret.clone().expect("stored");
    assert!(em_store::device_secret::verify(&stored, &secret));
    assert!(
        !stored.contains(&secret),
        "the row never holds the plaintext"
    );

    // Never again: not on update, not in the list, not in the audit.
    let updated = admin
        .post(
            "/api/devices",
            Some(json!({"device_id": "phone-7", "protocol": "osmand", "active": true})),
        )
        .await;
    assert_eq!(updated.status, StatusCode::OK, "{}", updated.text);
    assert!(updated.json().get("secret").is_none(), "{}", updated.text);
    assert_eq!(
        app.store
            .get_device("phone-7")
            .await
            .unwrap()
            .unwrap()
            .secret,
        Some(stored.clone()),
        "an update keeps the secret"
    );
    let list = admin.get("/api/devices").await;
    assert!(!list.text.contains(&secret) && !list.text.contains(&stored));
    let audit = admin.get("/api/audit").await;
    assert!(!audit.text.contains(&secret) && !audit.text.contains(&stored));

    // Rotation: a new secret, shown once; the old one no longer verifies.
    let rotated = admin
        .post(
            "/api/devices",
            Some(json!({"device_id": "phone-7", "protocol": "osmand", "rotate_secret": true})),
        )
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{}", rotated.text);
    let new_secret = rotated.json()["secret"]
        .as_str()
        .expect("new secret")
        .to_owned();
    assert_ne!(new_secret, secret);
    let stored = app
        .store
        .get_device("phone-7")
        .await
        .unwrap()
        .unwrap()
        .secret
        .unwrap();
    assert!(em_store::device_secret::verify(&stored, &new_secret));
    assert!(!em_store::device_secret::verify(&stored, &secret));

    // A secret given by the operator is stored hashed and not echoed.
    let given = "operator-chosen-secret-0001";
    let em = admin
        .post(
            "/api/devices",
            Some(json!({"device_id": "em-7", "protocol": "em", "secret": given})),
        )
        .await;
    assert_eq!(em.status, StatusCode::OK, "{}", em.text);
    assert!(!em.text.contains(given) && em.json().get("secret").is_none());
    let stored = app
        .store
        .get_device("em-7")
        .await
        .unwrap()
        .unwrap()
        .secret
        .unwrap();
    assert_eq!(stored, em_store::device_secret::hash(given));
    // Too short for a device secret.
    let short = admin
        .post(
            "/api/devices",
            Some(json!({"device_id": "em-8", "protocol": "em", "secret": "short-pw"})),
        )
        .await;
    assert_eq!(
        short.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        short.text
    );
}

/// Reads the store's change log from where the test started: the changes an API call wrote.
struct ChangeLog {
    store: Arc<dyn Store>,
    last: em_model::ChangeId,
}

impl ChangeLog {
    async fn new(store: &Arc<dyn Store>) -> Self {
        ChangeLog {
            store: store.clone(),
            last: store.last_change_id().await.expect("last change id"),
        }
    }

    /// The next order or registry change (alert changes are skipped), if there is one.
    async fn next(&mut self) -> Option<Change> {
        loop {
            let e = self
                .store
                .changes_after(self.last, 1)
                .await
                .expect("read the change log")
                .pop()?;
            self.last = e.id;
            if !matches!(e.change, Change::Alert { .. }) {
                return Some(e.change);
            }
        }
    }
}

/// Raises an alert through the alert engine (as ingest does) and returns it.
async fn raise(
    app: &App,
    subject: em_model::SubjectId,
    kind: AlertKind,
    zone_id: Option<em_model::ZoneId>,
    at: chrono::DateTime<chrono::Utc>,
) -> Alert {
    app.alerts
        .handle(Signal {
            kind,
            phase: Phase::Started,
            subject_id: subject,
            device_id: None,
            zone_id,
            at,
            evidence: json!({}),
        })
        .await
        .expect("raise")
        .expect("kind enabled")
}

/// Issue 14, finding 7: a case reference names one subject, and a device id must be one its
/// protocol can send.
#[tokio::test]
async fn duplicate_references_and_malformed_device_ids_are_refused() {
    let app = start(em_store::testing::sqlite_store().await, config()).await;
    let sup = app.login("super").await;
    let dup = sup
        .post(
            "/api/subjects",
            Some(
                json!({"reference": "case-a", "display_name": "Someone Else",
                        "timezone": "Europe/Copenhagen", "officer_id": app.officer_a}),
            ),
        )
        .await;
    assert_eq!(dup.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", dup.text);
    assert!(dup.json()["errors"]["reference"].is_string());
    // Saving a subject under its own reference is fine.
    let same = sup
        .put(
            &format!("/api/subjects/{}", app.subject_a),
            json!({"reference": "CASE-A", "display_name": "Alex Andersen",
                   "timezone": "Europe/Copenhagen", "officer_id": app.officer_a}),
        )
        .await;
    assert_eq!(same.status, StatusCode::OK, "{}", same.text);

    let admin = app.login("admin").await;
    for (id, protocol) in [
        ("12ab", "gt06"),
        ("35830710000000", "gt06"),
        ("3520940000000155", "teltonika"),
        ("12345", "h02"),
    ] {
        let r = admin
            .post(
                "/api/devices",
                Some(json!({"device_id": id, "protocol": protocol})),
            )
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{id} {protocol}: {}",
            r.text
        );
        assert!(r.json()["errors"]["device_id"].is_string());
    }
    for (id, protocol) in [
        ("358307100000006", "gt06"),
        ("352094000000015", "teltonika"),
        ("8800000012", "h02"),
        ("phone-7", "osmand"),
    ] {
        let r = admin
            .post(
                "/api/devices",
                Some(json!({"device_id": id, "protocol": protocol})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{id} {protocol}: {}", r.text);
    }
}

/// Issue 14, finding 6: an exclusion zone over the subject's own curfew home is refused, as
/// are empty and overlapping weekly windows.
#[tokio::test]
async fn exclusion_over_the_curfew_home_and_bad_windows_are_refused() {
    let app = start(em_store::testing::sqlite_store().await, config()).await;
    let a = app.login("officer.a").await;
    let path = format!("/api/subjects/{}/zones", app.subject_a);
    let home = a
        .post(
            &path,
            Some(json!({
                "name": "Home", "kind": "inclusion", "is_curfew_home": true, "shape": "circle",
                "center": [12.50, 55.60], "radius_m": 60,
                "windows": [{"day": 1, "start": "21:00", "end": "07:00"}]
            })),
        )
        .await;
    assert_eq!(home.status, StatusCode::OK, "{}", home.text);
    let over = a
        .post(
            &path,
            Some(json!({
                "name": "Park", "kind": "exclusion", "shape": "circle",
                "center": [12.5004, 55.6002], "radius_m": 150
            })),
        )
        .await;
    assert_eq!(
        over.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        over.text
    );
    assert!(over.json()["errors"]["kind"].is_string());
    let elsewhere = a
        .post(
            &path,
            Some(json!({
                "name": "School", "kind": "exclusion", "shape": "circle",
                "center": [12.55, 55.62], "radius_m": 150
            })),
        )
        .await;
    assert_eq!(elsewhere.status, StatusCode::OK, "{}", elsewhere.text);
    let bad = a
        .post(
            &path,
            Some(json!({
                "name": "Work", "kind": "inclusion", "shape": "circle", "center": [12.52, 55.61],
                "radius_m": 100, "windows": [{"day": 2, "start": "22:00", "end": "22:00"},
                                              {"day": 3, "start": "08:00", "end": "12:00"},
                                              {"day": 3, "start": "11:00", "end": "13:00"}]
            })),
        )
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.text);
    let errs = bad.json()["errors"].clone();
    assert!(
        errs["windows[0].end"].is_string() && errs["windows[2].start"].is_string(),
        "{errs}"
    );
}
