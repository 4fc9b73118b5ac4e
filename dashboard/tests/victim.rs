//! Victim data and dynamic (victim-protection) zones (issue 12, findings 3 and 4): only a
//! supervisor creates, changes or removes a dynamic zone (an officer gets 403, audited with
//! the reason); victim positions are read by supervisors and victim liaison officers only,
//! every read audited. SQLite always, PostgreSQL when reachable.

mod common;

use std::sync::Arc;

use chrono::{Duration, Utc};
use common::*;
use em_dashboard::ensure_user;
use em_model::{
    Device, DeviceClass, FixSource, Position, Protocol, Record, Role, ZoneGeometry, ZoneKind,
};
use em_store::{AuditFilter, Store};
use reqwest::StatusCode;
use serde_json::json;

async fn device(store: &dyn Store, id: &str, class: DeviceClass) {
    store
        .upsert_device(&Device {
            device_id: id.into(),
            protocol: Protocol::Em,
            secret: None,
            active: true,
            class,
        })
        .await
        .expect("device");
}

/// The `access.denied` records of `actor` for `attempted`.
async fn denials(app: &App, actor: i64, attempted: &str) -> Vec<em_model::AuditEntry> {
    app.audit_actions(actor)
        .await
        .into_iter()
        .filter(|e| e.action == "access.denied" && e.details["attempted"] == attempted)
        .collect()
}

async fn scenario_dynamic_zones(store: Arc<dyn Store>) {
    let app = start(store.clone(), config()).await;
    device(&*store, "victim-phone-1", DeviceClass::OffenderTag).await;
    device(&*store, "tag-of-a", DeviceClass::OffenderTag).await;
    store
        .assign_device("tag-of-a", app.subject_a, Utc::now() - Duration::hours(1))
        .await
        .expect("assign");
    let sup = app.login("super").await;
    let officer = app.login("officer.a").await;
    let admin = app.login("admin").await;
    let zones = format!("/api/subjects/{}/zones", app.subject_a);
    let dynamic = |device: &str, radius: f64| {
        json!({"name": "Victim protection", "kind": "exclusion", "shape": "dynamic",
               "device_id": device, "radius_m": radius})
    };

    // Validation: the device must exist and be worn by nobody; the radius is bounded.
    for (body, field) in [
        (dynamic("no-such-device", 500.0), "device_id"),
        (dynamic("tag-of-a", 500.0), "device_id"),
        (dynamic("victim-phone-1", 10.0), "radius_m"),
        (dynamic("victim-phone-1", 100_000.0), "radius_m"),
    ] {
        let r = sup.post(&zones, Some(body)).await;
        assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
        assert!(
            r.json()["errors"].get(field).is_some(),
            "{field}: {}",
            r.text
        );
    }

    // An officer (own caseload) and an admin cannot create one: 403, audited with the reason.
    let r = officer
        .post(&zones, Some(dynamic("victim-phone-1", 500.0)))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let d = denials(&app, app.officer_a, "zone.create").await;
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].details["reason"]
        .as_str()
        .is_some_and(|r| r.contains("supervisors only")));
    let r = admin
        .post(&zones, Some(dynamic("victim-phone-1", 500.0)))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);

    // The supervisor creates it; the device becomes a victim device (audited).
    let r = sup
        .post(&zones, Some(dynamic("victim-phone-1", 500.0)))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let zone = r.json();
    let zid = zone["id"].as_i64().expect("zone id");
    assert_eq!(zone["geometry"]["type"], "dynamic");
    assert_eq!(
        store
            .get_device("victim-phone-1")
            .await
            .unwrap()
            .map(|d| d.class),
        Some(DeviceClass::Victim)
    );
    assert!(app
        .audit_actions(app.supervisor)
        .await
        .iter()
        .any(|e| e.action == "device.class" && e.target_id.as_deref() == Some("victim-phone-1")));

    // The officer can neither delete nor overwrite it, in any way: 403 each, audited, unchanged.
    let zpath = format!("/api/zones/{zid}");
    let r = officer.delete(&zpath).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    for body in [
        // Smaller radius, another device, a plain circle, an inclusion zone, an absence.
        dynamic("victim-phone-1", 50.0),
        dynamic("tag-of-a", 500.0),
        json!({"name": "Victim protection", "kind": "exclusion", "shape": "circle",
               "center": [12.5, 55.6], "radius_m": 50}),
        json!({"name": "Victim protection", "kind": "inclusion", "shape": "dynamic",
               "device_id": "victim-phone-1", "radius_m": 500}),
        json!({"name": "Victim protection", "kind": "exclusion", "shape": "dynamic",
               "device_id": "victim-phone-1", "radius_m": 500,
               "exceptions": [{"kind": "absence", "start": "2020-01-01T00:00:00Z",
                               "end": "2020-12-01T00:00:00Z"}]}),
    ] {
        let r = officer.put(&zpath, body).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    }
    assert_eq!(denials(&app, app.officer_a, "zone.delete").await.len(), 1);
    let d = denials(&app, app.officer_a, "zone.update").await;
    assert_eq!(d.len(), 5);
    assert!(d
        .iter()
        .all(|e| e.target_id.as_deref() == Some(&*zid.to_string())
            && e.details["reason"].as_str().is_some()));
    let kept = store.get_zone(zid).await.unwrap().expect("zone kept");
    assert_eq!(
        kept.geometry,
        ZoneGeometry::Dynamic {
            device_id: "victim-phone-1".into(),
            radius_m: 500.0
        }
    );
    assert_eq!((kept.kind, kept.schedule), (ZoneKind::Exclusion, None));

    // The officer's own ordinary zones are unaffected.
    let r = officer
        .post(
            &zones,
            Some(
                json!({"name": "Park", "kind": "exclusion", "shape": "circle",
                        "center": [12.5, 55.6], "radius_m": 80}),
            ),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);

    // A victim device cannot be assigned to a subject, nor go back to an offender tag while
    // the zone follows it.
    let r = admin
        .post(
            "/api/devices/victim-phone-1/assign",
            Some(json!({"subject_id": app.subject_b})),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let r = admin
        .put(
            "/api/devices/victim-phone-1/class",
            json!({"class": "offender_tag"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    let r = officer
        .put(
            "/api/devices/victim-phone-1/class",
            json!({"class": "offender_tag"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text);
    let r = sup
        .put("/api/devices/tag-of-a/class", json!({"class": "victim"}))
        .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);

    // The supervisor edits and removes it (audited).
    let r = sup.put(&zpath, dynamic("victim-phone-1", 800.0)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["geometry"]["radius_m"], 800.0);
    let r = sup.delete(&zpath).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let actions: Vec<String> = app
        .audit_actions(app.supervisor)
        .await
        .into_iter()
        .map(|e| e.action)
        .collect();
    for a in ["zone.create", "zone.update", "zone.delete"] {
        assert!(actions.iter().any(|x| x == a), "{a} not in {actions:?}");
    }
    // With no zone following it any more, the device may become a tag again.
    let r = admin
        .put(
            "/api/devices/victim-phone-1/class",
            json!({"class": "offender_tag"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

async fn scenario_victim_positions(store: Arc<dyn Store>) {
    let app = start(store.clone(), config()).await;
    let liaison_id = ensure_user(
        &*store,
        "liaison",
        "Liv Liaison",
        Role::VictimLiaison,
        PASSWORD,
    )
    .await
    .expect("liaison");
    device(&*store, "victim-phone-2", DeviceClass::Victim).await;
    device(&*store, "plain-tag", DeviceClass::OffenderTag).await;
    let t = Utc::now() - Duration::minutes(5);
    let mut r = Record::new("victim-phone-2", Protocol::Em, t);
    r.position = Some(Position {
        lat: 55.683217,
        lon: 12.571934,
        accuracy_m: Some(8.0),
        speed_kmh: None,
        course_deg: None,
        altitude_m: None,
        satellites: None,
        valid: true,
        source: FixSource::Gnss,
    });
    store
        .insert_victim_records(&[r])
        .await
        .expect("victim record");
    let path = "/api/victim-devices/victim-phone-2/positions";

    // The victim liaison officer and the supervisor read them; each read is audited.
    for (who, id) in [("liaison", liaison_id), ("super", app.supervisor)] {
        let s = app.login(who).await;
        let r = s.get(path).await;
        assert_eq!(r.status, StatusCode::OK, "{who}: {}", r.text);
        let body = r.json();
        assert_eq!(body["points"].as_array().map(Vec::len), Some(1));
        assert_eq!(body["points"][0]["position"]["lat"], 55.683217);
        assert!(app
            .audit_actions(id)
            .await
            .iter()
            .any(|e| e.action == "victim.positions.view"
                && e.target_id.as_deref() == Some("victim-phone-2")
                && e.details["points"] == 1));
    }
    // Officers and admins: 403 and an access.denied record.
    for (who, id) in [("officer.a", app.officer_a), ("admin", app.admin)] {
        let s = app.login(who).await;
        let r = s.get(path).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{who}: {}", r.text);
        assert!(!r.text.contains("55.683217"));
        assert_eq!(
            denials(&app, id, "victim.positions.view").await.len(),
            1,
            "{who}"
        );
    }
    let liaison = app.login("liaison").await;
    // Not a victim device: nothing to see here.
    let r = liaison.get("/api/victim-devices/plain-tag/positions").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "{}", r.text);
    // The liaison officer sees no subject's data.
    let r = liaison.get("/api/subjects").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!([]));
    let r = liaison
        .get(&format!("/api/subjects/{}", app.subject_a))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = liaison.get("/api/alerts").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json(), json!([]));
    // And the victim's record is in no subject's data.
    assert_eq!(store.count_records("victim-phone-2").await.unwrap(), 0);
    let audit = store
        .list_audit(&AuditFilter {
            target_type: Some("victim_device".into()),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert!(audit.len() >= 4);
}

#[tokio::test]
async fn dynamic_zones_supervisors_only_sqlite() {
    scenario_dynamic_zones(em_store::testing::sqlite_store().await).await;
}

#[tokio::test]
async fn dynamic_zones_supervisors_only_postgres() {
    if let Some(store) = em_store::testing::postgres_store().await {
        scenario_dynamic_zones(store).await;
    }
}

#[tokio::test]
async fn victim_positions_liaison_and_supervisor_only_sqlite() {
    scenario_victim_positions(em_store::testing::sqlite_store().await).await;
}

#[tokio::test]
async fn victim_positions_liaison_and_supervisor_only_postgres() {
    if let Some(store) = em_store::testing::postgres_store().await {
        scenario_victim_positions(store).await;
    }
}
