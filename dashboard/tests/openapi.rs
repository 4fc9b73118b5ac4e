//! The OpenAPI document describes every route of the router, and nothing that does not exist.

use serde_json::Value;

#[test]
fn every_route_is_documented() {
    let doc: Value =
        serde_json::from_str(em_dashboard::OPENAPI_JSON).expect("openapi.json is JSON");
    assert_eq!(
        doc["openapi"].as_str().map(|v| v.starts_with("3.")),
        Some(true)
    );
    let paths = doc["paths"].as_object().expect("paths");
    let routes = em_dashboard::api_routes();
    assert!(routes.len() > 20);
    for (path, method) in &routes {
        let m = method.as_str().to_ascii_lowercase();
        assert!(
            paths.get(*path).and_then(|p| p.get(&m)).is_some(),
            "{} {path} is not in openapi.json",
            method
        );
    }
    // And the document lists no route the router lacks.
    for (path, item) in paths {
        for m in item.as_object().expect("path item").keys() {
            assert!(
                routes
                    .iter()
                    .any(|(p, rm)| p == path && rm.as_str().eq_ignore_ascii_case(m)),
                "openapi.json documents {m} {path}, which the router does not serve"
            );
        }
    }
}

#[test]
fn schema_references_resolve() {
    let text = em_dashboard::OPENAPI_JSON;
    let doc: Value = serde_json::from_str(text).expect("JSON");
    let mut refs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(r)) = m.get("$ref") {
                    out.push(r.clone());
                }
                m.values().for_each(|x| walk(x, out));
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&doc, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let pointer = r.trim_start_matches('#');
        assert!(doc.pointer(pointer).is_some(), "dangling $ref {r}");
    }
}

// ------------------------------------------------------------------ schemas against real values

mod common;

use std::collections::BTreeSet;

use chrono::{TimeZone, Utc};
use em_model::{
    Alert, AlertKind, AlertState, AuditEntry, BreachRules, ExceptionKind, Role, ScheduleException,
    ScheduleSpec, Severity, Subject, User, WeeklyWindow, ZoneGeometry, ZoneKind, ZoneSpec,
};

fn doc() -> Value {
    serde_json::from_str(em_dashboard::OPENAPI_JSON).expect("openapi.json is JSON")
}

/// Follows `$ref`s to the schema they name.
fn resolve<'a>(doc: &'a Value, mut schema: &'a Value) -> &'a Value {
    while let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        schema = doc
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    schema
}

/// Checks `value` against an OpenAPI 3.0 `schema`, strictly: a `null` needs `nullable: true`,
/// an object may only have the properties its schema lists (unless it allows
/// `additionalProperties` or lists none), and every `required` property must be there.
/// Problems are pushed to `errors`, each with its JSON path.
fn check(doc: &Value, schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let schema = resolve(doc, schema);
    if let Some(parts) = schema.get("allOf").and_then(Value::as_array) {
        // Merge the parts into one object schema, so that "only listed properties" sees all.
        let mut merged = serde_json::Map::new();
        let mut props = serde_json::Map::new();
        let mut required = Vec::new();
        for part in parts {
            let part = resolve(doc, part);
            for (k, v) in part.as_object().expect("allOf part") {
                match k.as_str() {
                    "properties" => props.extend(v.as_object().expect("properties").clone()),
                    "required" => required.extend(v.as_array().expect("required").clone()),
                    _ => {
                        merged.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        if let Some(n) = schema.get("nullable") {
            merged.insert("nullable".into(), n.clone());
        }
        merged.insert("properties".into(), Value::Object(props));
        merged.insert("required".into(), Value::Array(required));
        return check(doc, &Value::Object(merged), value, path, errors);
    }
    if value.is_null() {
        if schema.get("nullable") != Some(&Value::Bool(true)) {
            errors.push(format!("{path}: null, but the schema is not nullable"));
        }
        return;
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(alternatives) = schema.get(key).and_then(Value::as_array) {
            let matching = alternatives
                .iter()
                .filter(|alt| {
                    let mut e = Vec::new();
                    check(doc, alt, value, path, &mut e);
                    e.is_empty()
                })
                .count();
            let ok = if key == "oneOf" {
                matching == 1
            } else {
                matching >= 1
            };
            if !ok {
                errors.push(format!(
                    "{path}: {matching} of the {key} alternatives match {value}"
                ));
            }
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            errors.push(format!("{path}: {value} is not in the enum {allowed:?}"));
        }
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let type_ok = match ty {
        None => true,
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("number") => value.is_number(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("array") => value.is_array(),
        Some("object") => value.is_object(),
        Some(other) => panic!("{path}: unknown type {other}"),
    };
    if !type_ok {
        errors.push(format!(
            "{path}: {value} is not of type {}",
            ty.unwrap_or("?")
        ));
        return;
    }
    if schema.get("format").and_then(Value::as_str) == Some("date-time") {
        if let Some(s) = value.as_str() {
            if chrono::DateTime::parse_from_rfc3339(s).is_err() {
                errors.push(format!("{path}: {s} is not an RFC 3339 date-time"));
            }
        }
    }
    if let Some(items) = value.as_array() {
        if let Some(item_schema) = schema.get("items") {
            for (i, item) in items.iter().enumerate() {
                check(doc, item_schema, item, &format!("{path}[{i}]"), errors);
            }
        }
    }
    if let Some(obj) = value.as_object() {
        let props = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        for (k, v) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(s) => check(doc, s, v, &format!("{path}.{k}"), errors),
                None => match additional {
                    Some(Value::Bool(false)) => {
                        errors.push(format!("{path}.{k}: not allowed by the schema"))
                    }
                    Some(Value::Bool(true)) => {}
                    Some(s) => check(doc, s, v, &format!("{path}.{k}"), errors),
                    // A free-form object (no properties listed) takes anything.
                    None if props.is_none() => {}
                    None => errors.push(format!("{path}.{k}: not in the schema's properties")),
                },
            }
        }
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().expect("required name");
            if !obj.contains_key(r) {
                errors.push(format!("{path}: required property {r} is missing"));
            }
        }
    }
}

/// Checks instances of one schema, and that its `required` list is exactly the properties
/// present in every instance (the fields serde always writes).
fn check_schema(doc: &Value, name: &str, instances: &[Value]) -> Vec<String> {
    let pointer = format!("/components/schemas/{name}");
    let schema = doc
        .pointer(&pointer)
        .unwrap_or_else(|| panic!("no schema {name}"));
    let mut errors = Vec::new();
    for (i, v) in instances.iter().enumerate() {
        check(doc, schema, v, &format!("{name}#{i}"), &mut errors);
    }
    let always: BTreeSet<String> = instances
        .iter()
        .map(|v| {
            v.as_object()
                .map(|o| o.keys().cloned().collect::<BTreeSet<_>>())
                .unwrap_or_default()
        })
        .reduce(|a, b| a.intersection(&b).cloned().collect())
        .unwrap_or_default();
    let schema = resolve(doc, schema);
    let mut required: BTreeSet<String> = BTreeSet::new();
    let parts: Vec<&Value> = match schema.get("allOf").and_then(Value::as_array) {
        Some(parts) => parts.iter().map(|p| resolve(doc, p)).collect(),
        None => vec![schema],
    };
    for part in parts {
        for r in part
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            required.insert(r.as_str().expect("name").to_string());
        }
    }
    if !always.is_empty() && required != always {
        errors.push(format!(
            "{name}: required is {required:?}, but the fields always present are {always:?}"
        ));
    }
    errors
}

fn json_of<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("serialise")
}

fn at(h: u32) -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, h, 0, 0).unwrap()
}

fn alerts() -> Vec<Alert> {
    let bare = Alert {
        id: 1,
        subject_id: 2,
        device_id: None,
        kind: AlertKind::LostCommunication,
        severity: Severity::High,
        state: AlertState::Open,
        zone_id: None,
        message: "no contact".into(),
        started_at: at(1),
        created_at: at(1),
        last_seen_at: at(2),
        ended_at: None,
        escalated: false,
        acknowledged_by: None,
        acknowledged_at: None,
        resolved_by: None,
        resolved_at: None,
        resolution_code: None,
        resolution_note: None,
        evidence: serde_json::json!({}),
        occurrences: 1,
    };
    let full = Alert {
        device_id: Some("tag-1".into()),
        zone_id: Some(3),
        state: AlertState::Resolved,
        ended_at: Some(at(3)),
        acknowledged_by: Some(4),
        acknowledged_at: Some(at(4)),
        resolved_by: Some(4),
        resolved_at: Some(at(5)),
        resolution_code: Some("other".into()),
        resolution_note: Some("note".into()),
        evidence: serde_json::json!({"fixes": []}),
        ..bare.clone()
    };
    vec![bare, full]
}

fn subjects() -> Vec<Subject> {
    let bare = Subject {
        id: 1,
        reference: "CASE-1".into(),
        display_name: "A".into(),
        officer_id: None,
        timezone: "UTC".into(),
        order_start: None,
        order_end: None,
        rules: BreachRules::default(),
    };
    let full = Subject {
        officer_id: Some(2),
        order_start: Some(at(1)),
        order_end: Some(at(2)),
        ..bare.clone()
    };
    vec![bare, full]
}

fn zones() -> Vec<ZoneSpec> {
    let bare = ZoneSpec {
        id: 1,
        subject_id: None,
        group: None,
        name: "School".into(),
        kind: ZoneKind::Exclusion,
        geometry: ZoneGeometry::Polygon {
            rings: vec![vec![[10.0, 59.0], [10.1, 59.0], [10.1, 59.1]]],
        },
        schedule: None,
        is_curfew_home: false,
    };
    let mut out = vec![bare.clone()];
    out.push(ZoneSpec {
        subject_id: Some(2),
        group: Some("schools".into()),
        kind: ZoneKind::Inclusion,
        geometry: ZoneGeometry::Circle {
            center: [10.0, 59.0],
            radius_m: 100.0,
        },
        schedule: Some(ScheduleSpec {
            windows: vec![WeeklyWindow {
                day: 1,
                start: "21:00".into(),
                end: "07:00".into(),
            }],
            exceptions: vec![ScheduleException {
                kind: ExceptionKind::Absence,
                start: at(1),
                end: at(2),
                note: None,
            }],
        }),
        is_curfew_home: true,
        ..bare.clone()
    });
    out.push(ZoneSpec {
        geometry: ZoneGeometry::Dynamic {
            device_id: "victim-1".into(),
            radius_m: 500.0,
        },
        ..bare.clone()
    });
    out.push(ZoneSpec {
        geometry: ZoneGeometry::MultiPolygon {
            polygons: vec![vec![vec![[10.0, 59.0], [10.1, 59.0], [10.1, 59.1]]]],
        },
        ..bare.clone()
    });
    out
}

fn users() -> Vec<User> {
    vec![User {
        id: 1,
        username: "anna".into(),
        display_name: "Anna".into(),
        role: Role::Officer,
        password_hash: "secret".into(),
        active: true,
    }]
}

fn audit() -> Vec<AuditEntry> {
    let bare = AuditEntry {
        id: 1,
        at: at(1),
        actor_id: None,
        actor: "system".into(),
        action: "auth.login_failed".into(),
        target_type: "user".into(),
        target_id: None,
        subject_id: None,
        details: serde_json::json!({}),
    };
    let full = AuditEntry {
        actor_id: Some(2),
        target_id: Some("3".into()),
        subject_id: Some(3),
        ..bare.clone()
    };
    vec![bare, full]
}

#[test]
fn model_types_match_their_schemas() {
    let doc = doc();
    let mut errors = Vec::new();
    errors.extend(check_schema(
        &doc,
        "Alert",
        &alerts().iter().map(json_of).collect::<Vec<_>>(),
    ));
    errors.extend(check_schema(
        &doc,
        "Subject",
        &subjects().iter().map(json_of).collect::<Vec<_>>(),
    ));
    errors.extend(check_schema(
        &doc,
        "ZoneSpec",
        &zones().iter().map(json_of).collect::<Vec<_>>(),
    ));
    errors.extend(check_schema(
        &doc,
        "User",
        &users().iter().map(json_of).collect::<Vec<_>>(),
    ));
    errors.extend(check_schema(
        &doc,
        "AuditEntry",
        &audit().iter().map(json_of).collect::<Vec<_>>(),
    ));
    assert!(errors.is_empty(), "openapi.json:\n{}", errors.join("\n"));
}

/// The schema of `method path`'s `status` JSON response in the document.
fn response_schema<'a>(doc: &'a Value, path: &str, method: &str, status: u16) -> &'a Value {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let response = op["responses"]
        .get(status.to_string())
        .map(|r| resolve(doc, r))
        .unwrap_or_else(|| panic!("{method} {path}: status {status} is not documented"));
    response
        .pointer("/content/application~1json/schema")
        .unwrap_or_else(|| panic!("{method} {path} {status}: no application/json schema"))
}

/// Real responses of the live router, with seeded data whose optional fields are both set and
/// unset, match the documented schemas exactly (nullability, properties, required).
#[tokio::test]
async fn live_responses_match_their_schemas() {
    let doc = doc();
    let app = common::start(em_store::testing::sqlite_store().await, common::config()).await;
    common::seed_variety(&app).await;
    let sup = app.login("super").await;
    let admin = app.login("admin").await;
    let subject = app.subject_a;
    let zone = app
        .store
        .list_zones(Some(subject))
        .await
        .expect("zones")
        .first()
        .expect("a zone")
        .id;
    let calls: Vec<(&common::Session, &str, String)> = vec![
        (&sup, "/api/health", "/api/health".into()),
        (&sup, "/api/me", "/api/me".into()),
        (&sup, "/api/subjects", "/api/subjects".into()),
        (
            &sup,
            "/api/subjects/{id}",
            format!("/api/subjects/{subject}"),
        ),
        (
            &sup,
            "/api/subjects/{id}",
            format!("/api/subjects/{}", app.subject_b),
        ),
        (
            &sup,
            "/api/subjects/{id}/trail",
            format!("/api/subjects/{subject}/trail"),
        ),
        (
            &sup,
            "/api/subjects/{id}/zones",
            format!("/api/subjects/{subject}/zones"),
        ),
        (&sup, "/api/zones/{id}", format!("/api/zones/{zone}")),
        (&sup, "/api/map", "/api/map".into()),
        (&sup, "/api/alerts", "/api/alerts".into()),
        (&sup, "/api/alerts", "/api/alerts?state=resolved".into()),
        (&sup, "/api/reports/curfew", "/api/reports/curfew".into()),
        (&sup, "/api/audit", "/api/audit".into()),
        (&admin, "/api/users", "/api/users".into()),
        (&admin, "/api/devices", "/api/devices".into()),
        (
            &sup,
            "/api/victim-devices/{id}/positions",
            "/api/victim-devices/victim-1/positions".into(),
        ),
    ];
    let mut errors = Vec::new();
    for (session, template, url) in calls {
        let r = session.get(&url).await;
        if r.status != reqwest::StatusCode::OK {
            errors.push(format!("GET {url}: {} {}", r.status, r.text));
            continue;
        }
        let schema = response_schema(&doc, template, "get", 200);
        check(&doc, schema, &r.json(), &format!("GET {url}"), &mut errors);
    }
    assert!(errors.is_empty(), "openapi.json:\n{}", errors.join("\n"));
}

/// Errors are JSON with the documented error body and status, also when axum itself rejects
/// the request (a path parameter that does not parse, an unknown route, a wrong method).
#[tokio::test]
async fn errors_are_json_and_documented() {
    let doc = doc();
    let app = common::start(em_store::testing::sqlite_store().await, common::config()).await;
    let sup = app.login("super").await;
    // (documented path, method, URL, body, expected status)
    type Case = (&'static str, reqwest::Method, String, Option<Value>, u16);
    let cases: Vec<Case> = vec![
        (
            "/api/subjects/{id}",
            reqwest::Method::GET,
            "/api/subjects/not-a-number".into(),
            None,
            400,
        ),
        (
            "/api/subjects/{id}",
            reqwest::Method::GET,
            "/api/subjects/99999".into(),
            None,
            404,
        ),
        (
            "/api/alerts/{id}/ack",
            reqwest::Method::POST,
            "/api/alerts/x/ack".into(),
            None,
            400,
        ),
        (
            "/api/login",
            reqwest::Method::POST,
            "/api/login".into(),
            Some(serde_json::json!({"username": 5})),
            400,
        ),
        (
            "/api/subjects",
            reqwest::Method::POST,
            "/api/subjects".into(),
            Some(serde_json::json!({"reference": 5})),
            422,
        ),
        (
            "/api/alerts",
            reqwest::Method::GET,
            "/api/alerts?limit=abc".into(),
            None,
            422,
        ),
        (
            "/api/devices",
            reqwest::Method::GET,
            "/api/devices".into(),
            None,
            403,
        ),
    ];
    let mut errors = Vec::new();
    for (template, m, url, body, status) in cases {
        let method = m.as_str().to_ascii_lowercase();
        let r = common::raw(
            &app.http,
            m,
            &format!("{}{url}", app.base),
            Some(&sup.cookie),
            body,
        )
        .await;
        assert_eq!(r.status.as_u16(), status, "{url}: {}", r.text);
        let ct = r
            .headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        assert!(ct.starts_with("application/json"), "{url}: {ct} {}", r.text);
        let schema = response_schema(&doc, template, &method, status);
        check(
            &doc,
            schema,
            &r.json(),
            &format!("{method} {url}"),
            &mut errors,
        );
    }
    // Not routes of the document, but JSON all the same.
    for (m, url, status) in [
        (reqwest::Method::GET, "/api/no-such-route", 404),
        (reqwest::Method::DELETE, "/api/subjects", 405),
    ] {
        let r = common::raw(
            &app.http,
            m,
            &format!("{}{url}", app.base),
            Some(&sup.cookie),
            None,
        )
        .await;
        assert_eq!(r.status.as_u16(), status, "{url}: {}", r.text);
        assert!(
            r.json()["error"].is_string(),
            "{url}: not the JSON error body: {}",
            r.text
        );
    }
    assert!(errors.is_empty(), "openapi.json:\n{}", errors.join("\n"));
}

/// Every operation the document marks as authenticated answers 401 (JSON, documented) without
/// credentials, and with a wrong cookie or bearer token.
#[tokio::test]
async fn unauthenticated_requests_are_refused() {
    let doc = doc();
    let app = common::start(em_store::testing::sqlite_store().await, common::config()).await;
    let paths = doc["paths"].as_object().expect("paths");
    let mut errors = Vec::new();
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("path item") {
            if op.get("security") == Some(&Value::Array(vec![])) {
                continue;
            }
            let url = format!("{}{}", app.base, path.replace("{id}", "1"));
            let m = reqwest::Method::from_bytes(method.to_ascii_uppercase().as_bytes())
                .expect("method");
            for auth in [
                None,
                Some(("cookie", "em_session=forged")),
                Some(("authorization", "Bearer forged")),
            ] {
                let mut req = app
                    .http
                    .request(m.clone(), &url)
                    .header("X-Requested-With", "test");
                if let Some((name, value)) = auth {
                    req = req.header(name, value);
                }
                let r = req.send().await.expect("request");
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                if status != 401 {
                    errors.push(format!("{method} {path} ({auth:?}): {status}, not 401"));
                    continue;
                }
                check(
                    &doc,
                    response_schema(&doc, path, method, 401),
                    &body,
                    &format!("{method} {path} 401"),
                    &mut errors,
                );
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
