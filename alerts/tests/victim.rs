//! A victim-proximity alert decided by the real geofence engine: the stored alert, the live
//! notice (what the SSE and MQTT feeds serialise) and the OMS outbox payload carry the distance
//! and bearing to the protected person, never the victim's coordinates. SQLite always,
//! PostgreSQL when reachable.

mod common;

use chrono::{Duration, SubsecRound, Utc};
use em_alerts::*;
use em_geofence::{SharedZoneIndex, SubjectMonitor, ZoneIndex};
use em_model::*;

use common::*;

const VICTIM: [f64; 2] = [12.571934, 55.683217];
const OFFENDER: [f64; 2] = [12.570410, 55.682150];

fn fix(device: &str, t: chrono::DateTime<Utc>, p: [f64; 2]) -> Record {
    let mut r = Record::new(device, Protocol::Em, t);
    r.position = Some(Position {
        lat: p[1],
        lon: p[0],
        accuracy_m: Some(5.0),
        speed_kmh: None,
        course_deg: None,
        altitude_m: None,
        satellites: Some(9),
        valid: true,
        source: FixSource::Gnss,
    });
    r
}

fn assert_clean(what: &str, raw: &str) {
    assert!(
        raw.contains("\"distance_m\"") && raw.contains("\"bearing_deg\""),
        "{what}: {raw}"
    );
    for c in VICTIM {
        let t = format!("{c:.6}");
        assert!(
            !raw.contains(&c.to_string()) && !raw.contains(&t[..t.len() - 1]),
            "{what}: victim coordinate {c} in {raw}"
        );
    }
}

#[tokio::test]
async fn victim_proximity_alert_has_distance_and_bearing_only() {
    for (name, store) in stores().await {
        let f = fixture(&store).await;
        let subject = store.get_subject(f.subject).await.unwrap().unwrap();
        let zone = ZoneSpec {
            id: 0,
            subject_id: Some(f.subject),
            group: None,
            name: "Victim protection".into(),
            kind: ZoneKind::Exclusion,
            geometry: ZoneGeometry::Dynamic {
                device_id: "victim-phone".into(),
                radius_m: 500.0,
            },
            schedule: None,
            is_curfew_home: false,
        };
        let zid = store.upsert_zone(&zone).await.unwrap();
        let index = SharedZoneIndex::new(ZoneIndex::new());
        index.write().upsert(&ZoneSpec { id: zid, ..zone }).unwrap();

        // The engine: the victim's position, then the offender's fixes ~150 m away.
        let t0 = (Utc::now() - Duration::minutes(2)).trunc_subsecs(0);
        let victim = fix("victim-phone", t0, VICTIM);
        let events = {
            let idx = index.read();
            idx.update_dynamic(&victim);
            let mut mon = SubjectMonitor::new(&subject).unwrap();
            let mut events = Vec::new();
            for i in 1..=4 {
                let r = fix("tag-1", t0 + Duration::seconds(10 * i), OFFENDER);
                events.extend(mon.on_record(&idx, &subject, &r));
            }
            events
        };
        let signals: Vec<Signal> = events.iter().flat_map(signals_from_compliance).collect();
        let signal = signals
            .into_iter()
            .find(|s| s.kind == AlertKind::VictimProximity)
            .unwrap_or_else(|| panic!("{name}: no victim proximity signal from {events:?}"));

        let mut cfg = AlertConfig::default();
        cfg.oms.enabled = true;
        cfg.oms.url = Some("http://127.0.0.1:9/unused".into());
        cfg.oms.secret = Some("test-secret-0123456789".into());
        let service = AlertService::new(store.clone(), cfg).unwrap();
        let mut rx = NoticeLog::at(service.store()).await;
        let alert = service
            .handle(signal.with_device("tag-1"))
            .await
            .unwrap()
            .expect("alert");
        assert_eq!(alert.kind, AlertKind::VictimProximity, "{name}");
        assert_eq!(alert.evidence["distance_m"], 150.0, "{name}");
        assert_eq!(alert.evidence["bearing_deg"], 220.0, "{name}");
        assert_clean("stored alert", &serde_json::to_string(&alert).unwrap());
        let notice = rx.drain().await.pop().expect("notice");
        assert_clean("alert notice", &serde_json::to_string(&notice).unwrap());
        let due = store
            .due_outbox("oms", Utc::now() + Duration::minutes(1), 10)
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "{name}");
        assert_clean("OMS outbox payload", &due[0].payload.to_string());
    }
}
