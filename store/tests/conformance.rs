//! One conformance suite for every `Store` backend: each case is a generic async fn over
//! `Arc<dyn Store>`, instantiated for SQLite (always), PostgreSQL with natively partitioned
//! positions and PostgreSQL with a TimescaleDB hypertable (fresh schema per test; skipped with
//! a loud message when the server or TimescaleDB is missing, failing when `CI=true`).

use std::sync::Arc;

use chrono::{DateTime, Duration, DurationRound, Utc};
use em_model::*;
use em_store::*;

fn base() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(Duration::seconds(1))
        .expect("truncate")
        - Duration::hours(1)
}

/// The server clock at the precision both backends store (microseconds).
fn server_now() -> DateTime<Utc> {
    Utc::now()
        .duration_trunc(Duration::microseconds(1))
        .expect("truncate")
}

fn pos(lat: f64, lon: f64) -> Position {
    Position {
        lat,
        lon,
        accuracy_m: Some(12.5),
        speed_kmh: Some(3.0),
        course_deg: Some(90.0),
        altitude_m: Some(20.0),
        satellites: Some(9),
        valid: true,
        source: FixSource::Gnss,
    }
}

fn rec(device: &str, t: DateTime<Utc>, seq: Option<u64>, p: Option<Position>) -> Record {
    let mut r = Record::new(device, Protocol::Teltonika, t);
    r.received_time = t + Duration::seconds(2);
    r.seq = seq;
    r.position = p;
    r
}

fn stored(subject: Option<SubjectId>, r: Record) -> StoredRecord {
    StoredRecord {
        subject_id: subject,
        record: r,
    }
}

fn subject(reference: &str, officer: Option<UserId>) -> Subject {
    Subject {
        id: 0,
        reference: reference.into(),
        display_name: format!("Subject {reference}"),
        officer_id: officer,
        timezone: "Europe/Copenhagen".into(),
        order_start: Some(base() - Duration::days(10)),
        order_end: None,
        rules: BreachRules::default(),
    }
}

/// A new open alert as the alert engine would write it (the store applies what it is given).
fn alert_row(
    subject: SubjectId,
    kind: AlertKind,
    zone: Option<ZoneId>,
    at: DateTime<Utc>,
) -> Alert {
    Alert {
        id: 0,
        subject_id: subject,
        device_id: Some("dev-a".into()),
        kind,
        severity: Severity::High,
        state: AlertState::Open,
        zone_id: zone,
        message: "Left the home zone".into(),
        started_at: at,
        created_at: server_now(),
        last_seen_at: at,
        ended_at: None,
        escalated: false,
        acknowledged_by: None,
        acknowledged_at: None,
        resolved_by: None,
        resolved_at: None,
        resolution_code: None,
        resolution_note: None,
        evidence: serde_json::json!({"fixes": [[12.5, 55.6]]}),
        occurrences: 1,
    }
}

fn key(id: AlertId, version: i64) -> String {
    format!("alert-{id}-v{version}")
}

/// Writes an alert the way the engine does: audit, change-log entry and one outbox message
/// per channel, all built from the stored alert.
async fn write(
    s: &Arc<dyn Store>,
    expected_version: Option<i64>,
    alert: Alert,
    event: &str,
    channels: &[&str],
) -> em_store::Result<VersionedAlert> {
    let effects = |v: &VersionedAlert| -> em_store::Result<AlertEffects> {
        Ok(AlertEffects {
            audit: NewAudit {
                at: None,
                actor_id: None,
                actor: "test".into(),
                action: format!("test.{event}"),
                target_type: "alert".into(),
                target_id: Some(v.alert.id.to_string()),
                subject_id: Some(v.alert.subject_id),
                details: serde_json::json!({}),
            },
            change: Change::Alert {
                event: event.to_string(),
                alert: v.alert.clone(),
                version: v.version,
            },
            outbox: channels
                .iter()
                .map(|ch| NewOutbox {
                    channel: ch.to_string(),
                    ordering_key: format!("subject:{}", v.alert.subject_id),
                    idempotency_key: key(v.alert.id, v.version),
                    payload: serde_json::json!({
                        "event": event,
                        "idempotency_key": key(v.alert.id, v.version),
                        "alert": v.alert,
                    }),
                })
                .collect(),
        })
    };
    s.write_alert(
        &AlertWrite {
            expected_version,
            alert,
        },
        &effects,
    )
    .await
}

async fn raise(
    s: &Arc<dyn Store>,
    subject: SubjectId,
    kind: AlertKind,
    zone: Option<ZoneId>,
    at: DateTime<Utc>,
    channels: &[&str],
) -> VersionedAlert {
    write(
        s,
        None,
        alert_row(subject, kind, zone, at),
        "alert.created",
        channels,
    )
    .await
    .expect("raise")
}

async fn change(
    s: &Arc<dyn Store>,
    current: &VersionedAlert,
    f: impl FnOnce(&mut Alert),
    event: &str,
    channels: &[&str],
) -> VersionedAlert {
    let mut a = current.alert.clone();
    f(&mut a);
    write(s, Some(current.version), a, event, channels)
        .await
        .expect("change")
}

async fn registry(s: Arc<dyn Store>) {
    // Devices.
    let d = Device {
        device_id: "356307042441013".into(),
        protocol: Protocol::Gt06,
        secret: None,
        active: true,
        class: DeviceClass::OffenderTag,
    };
    s.upsert_device(&d).await.expect("device");
    let d2 = Device {
        secret: Some("s3cret".into()),
        active: false,
        ..d.clone()
    };
    s.upsert_device(&d2).await.expect("device update");
    // The secret is kept only as its hash, which verifies the secret.
    let stored = s
        .get_device(&d.device_id)
        .await
        .expect("get")
        .expect("found");
    let hashed = stored.secret.clone().expect("secret kept");
    assert_eq!(hashed, em_store::device_secret::hash("s3cret"));
    assert!(em_store::device_secret::verify(&hashed, "s3cret"));
    let d2 = Device {
        secret: Some(hashed.clone()),
        ..d2
    };
    assert_eq!(stored, d2);
    // Writing back what was read keeps the same hash (not a hash of the hash).
    s.upsert_device(&stored).await.expect("device rewrite");
    assert_eq!(
        s.get_device(&d.device_id).await.expect("get"),
        Some(d2.clone())
    );
    assert_eq!(s.get_device("nope").await.expect("get none"), None);
    assert_eq!(s.list_devices().await.expect("list"), vec![d2]);
    assert!(matches!(
        s.upsert_device(&Device {
            device_id: String::new(),
            ..d
        })
        .await,
        Err(StoreError::Invalid(_))
    ));

    // Users.
    let u = User {
        id: 0,
        username: "officer1".into(),
        display_name: "Officer One".into(),
        role: Role::Officer,
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        active: true,
    };
    let uid = s.upsert_user(&u).await.expect("user");
    assert!(uid > 0);
    let got = s.get_user(uid).await.expect("get user").expect("exists");
    assert_eq!(got.password_hash, u.password_hash);
    assert_eq!(got.role, Role::Officer);
    assert!(matches!(
        s.upsert_user(&u).await,
        Err(StoreError::Conflict(_))
    ));
    s.upsert_user(&User {
        id: uid,
        role: Role::Supervisor,
        ..u.clone()
    })
    .await
    .expect("update user");
    assert_eq!(
        s.get_user_by_name("officer1")
            .await
            .expect("by name")
            .expect("exists")
            .role,
        Role::Supervisor
    );
    assert!(matches!(
        s.upsert_user(&User {
            id: 9999,
            ..u.clone()
        })
        .await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.list_users().await.expect("users").len(), 1);

    // Subjects.
    let s1 = s
        .upsert_subject(&subject("C-1", Some(uid)))
        .await
        .expect("s1");
    let s2 = s.upsert_subject(&subject("C-2", None)).await.expect("s2");
    assert_ne!(s1, s2);
    let mut sub = s.get_subject(s1).await.expect("get").expect("exists");
    assert_eq!(sub.reference, "C-1");
    assert_eq!(sub.rules, BreachRules::default());
    sub.rules.buffer_m = 40.0;
    sub.display_name = "Renamed".into();
    assert_eq!(s.upsert_subject(&sub).await.expect("update"), s1);
    assert_eq!(s.get_subject(s1).await.expect("get").expect("exists"), sub);
    assert_eq!(
        s.list_subjects(Some(uid)).await.expect("caseload"),
        vec![sub]
    );
    assert_eq!(s.list_subjects(None).await.expect("all").len(), 2);
    assert!(matches!(
        s.upsert_subject(&Subject {
            id: 424242,
            ..subject("x", None)
        })
        .await,
        Err(StoreError::NotFound(_))
    ));

    // Zones, including group zones bound through zone groups.
    let home = ZoneSpec {
        id: 0,
        subject_id: Some(s1),
        group: None,
        name: "Home".into(),
        kind: ZoneKind::Inclusion,
        geometry: ZoneGeometry::Circle {
            center: [12.5, 55.6],
            radius_m: 150.0,
        },
        schedule: Some(ScheduleSpec {
            windows: vec![WeeklyWindow {
                day: 1,
                start: "22:00".into(),
                end: "06:00".into(),
            }],
            exceptions: vec![],
        }),
        is_curfew_home: true,
    };
    let school = ZoneSpec {
        id: 0,
        subject_id: None,
        group: Some("schools".into()),
        name: "School".into(),
        kind: ZoneKind::Exclusion,
        geometry: ZoneGeometry::Polygon {
            rings: vec![vec![[12.0, 55.0], [12.1, 55.0], [12.1, 55.1]]],
        },
        schedule: None,
        is_curfew_home: false,
    };
    let hid = s.upsert_zone(&home).await.expect("home");
    let sid = s.upsert_zone(&school).await.expect("school");
    assert_eq!(
        s.get_zone(hid).await.expect("get").expect("exists"),
        ZoneSpec {
            id: hid,
            ..home.clone()
        }
    );
    assert_eq!(s.list_zones(Some(s1)).await.expect("zones").len(), 1);
    s.set_subject_zone_groups(s1, &["schools".to_string()])
        .await
        .expect("bind");
    assert_eq!(
        s.subject_zone_groups(s1).await.expect("groups"),
        vec!["schools".to_string()]
    );
    let ids: Vec<ZoneId> = s
        .list_zones(Some(s1))
        .await
        .expect("zones")
        .iter()
        .map(|z| z.id)
        .collect();
    assert_eq!(ids, vec![hid, sid]);
    assert_eq!(s.list_zones(Some(s2)).await.expect("none").len(), 0);
    assert_eq!(s.list_zones(None).await.expect("all").len(), 2);
    let renamed = ZoneSpec {
        id: hid,
        name: "Home 2".into(),
        ..home.clone()
    };
    s.upsert_zone(&renamed).await.expect("update zone");
    assert_eq!(
        s.get_zone(hid).await.expect("get").expect("exists").name,
        "Home 2"
    );
    s.delete_zone(hid).await.expect("delete");
    assert!(matches!(
        s.delete_zone(hid).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.upsert_zone(&ZoneSpec {
            subject_id: None,
            group: None,
            ..home
        })
        .await,
        Err(StoreError::Invalid(_))
    ));
}

async fn assignment_history(s: Arc<dyn Store>) {
    let t0 = base();
    let dev = "dev-moved";
    s.assign_device(dev, 1, t0).await.expect("assign 1");
    s.assign_device(dev, 2, t0 + Duration::minutes(10))
        .await
        .expect("assign 2");
    assert_eq!(
        s.subject_for_device_at(dev, t0 - Duration::seconds(1))
            .await
            .expect("before"),
        None
    );
    assert_eq!(s.subject_for_device_at(dev, t0).await.expect("t0"), Some(1));
    assert_eq!(
        s.subject_for_device_at(dev, t0 + Duration::minutes(9))
            .await
            .expect("t9"),
        Some(1)
    );
    assert_eq!(
        s.subject_for_device_at(dev, t0 + Duration::minutes(10))
            .await
            .expect("t10"),
        Some(2)
    );
    let hist = s.assignments(dev).await.expect("history");
    assert_eq!(hist.len(), 2);
    assert_eq!(hist[0].subject_id, 1);
    assert_eq!(hist[0].to, Some(t0 + Duration::minutes(10)));
    assert_eq!(hist[1].to, None);
    assert!(matches!(
        s.assign_device(dev, 3, t0).await,
        Err(StoreError::Invalid(_))
    ));
    let cur = s.current_assignments().await.expect("current");
    assert_eq!(cur.len(), 1);
    assert_eq!(cur[0].subject_id, 2);

    // Data attributed through the history stays with the subject wearing the tag at the time.
    let mut batch = Vec::new();
    for i in 0..20 {
        let t = t0 + Duration::minutes(i);
        let subj = s.subject_for_device_at(dev, t).await.expect("resolve");
        batch.push(stored(
            subj,
            rec(
                dev,
                t,
                Some(i as u64),
                Some(pos(55.0, 12.0 + i as f64 / 100.0)),
            ),
        ));
    }
    s.insert_records(&batch).await.expect("insert");
    let old = s
        .trail(1, t0 - Duration::hours(1), t0 + Duration::hours(1), 100)
        .await
        .expect("trail 1");
    let new = s
        .trail(2, t0 - Duration::hours(1), t0 + Duration::hours(1), 100)
        .await
        .expect("trail 2");
    assert_eq!(old.len(), 10);
    assert_eq!(new.len(), 10);
    assert!(old
        .iter()
        .all(|p| p.device_time < t0 + Duration::minutes(10)));
    let latest = s.latest_states(None).await.expect("latest");
    assert_eq!(latest.len(), 2);
    assert_eq!(latest[0].position_time, Some(t0 + Duration::minutes(9)));
    assert_eq!(latest[1].position_time, Some(t0 + Duration::minutes(19)));

    s.unassign_device(dev, t0 + Duration::minutes(30))
        .await
        .expect("unassign");
    assert_eq!(
        s.subject_for_device_at(dev, t0 + Duration::minutes(31))
            .await
            .expect("after"),
        None
    );
    assert!(s.current_assignments().await.expect("current").is_empty());
    assert!(matches!(
        s.unassign_device(dev, t0 + Duration::minutes(40)).await,
        Err(StoreError::NotFound(_))
    ));
}

async fn records_idempotent_and_trail(s: Arc<dyn Store>) {
    let t0 = base();
    let mut batch = Vec::new();
    for i in 0..50u64 {
        let mut r = rec(
            "dev-a",
            t0 + Duration::seconds(i as i64 * 10),
            Some(i),
            Some(pos(55.6, 12.5)),
        );
        r.battery_pct = Some(90 - i as u8);
        r.gsm_signal = Some(70);
        r.events = if i == 3 {
            vec![DeviceEventKind::Sos]
        } else {
            vec![]
        };
        batch.push(stored(Some(7), r));
    }
    // A heartbeat without position and without sequence number.
    let mut hb = rec("dev-a", t0 + Duration::seconds(5), None, None);
    hb.events = vec![DeviceEventKind::Heartbeat];
    batch.push(stored(Some(7), hb.clone()));
    // Shuffle the order a little: storage order must not matter.
    batch.swap(0, 40);
    s.insert_records(&batch).await.expect("insert");
    assert_eq!(s.count_records("dev-a").await.expect("count"), 51);
    // The device re-sends un-ACKed data (same keys, even with a later receive time).
    let resent: Vec<StoredRecord> = batch
        .iter()
        .map(|sr| {
            let mut r = sr.clone();
            r.record.received_time += Duration::minutes(5);
            r
        })
        .collect();
    s.insert_records(&resent).await.expect("re-insert");
    s.insert_records(&batch[..10])
        .await
        .expect("partial re-insert");
    assert_eq!(s.count_records("dev-a").await.expect("count"), 51);
    s.insert_records(&[]).await.expect("empty batch");

    // Round trip of full records, oldest first.
    let recs = s.device_records("dev-a", 1000).await.expect("records");
    assert_eq!(recs.len(), 51);
    assert!(recs
        .windows(2)
        .all(|w| w[0].device_time <= w[1].device_time));
    assert_eq!(recs[1], hb);
    let mut expected0 = batch
        .iter()
        .find(|b| b.record.seq == Some(0))
        .expect("seq0")
        .record
        .clone();
    expected0.received_time = recs[0].received_time;
    assert_eq!(recs[0], expected0);
    assert_eq!(
        recs.iter().find(|r| r.seq == Some(3)).expect("sos").events,
        vec![DeviceEventKind::Sos]
    );
    assert_eq!(
        s.device_records("dev-a", 5).await.expect("limited").len(),
        5
    );

    // Trail: only positions, ordered, inclusive bounds, limit.
    let from = t0 + Duration::seconds(100);
    let to = t0 + Duration::seconds(200);
    let trail = s.trail(7, from, to, 1000).await.expect("trail");
    assert_eq!(trail.len(), 11);
    assert_eq!(trail[0].device_time, from);
    assert_eq!(trail[10].device_time, to);
    assert!(trail
        .windows(2)
        .all(|w| w[0].device_time < w[1].device_time));
    assert_eq!(trail[0].position, pos(55.6, 12.5));
    assert_eq!(trail[0].battery_pct, Some(80));
    assert_eq!(s.trail(7, from, to, 3).await.expect("limited").len(), 3);
    assert!(s
        .trail(8, from, to, 100)
        .await
        .expect("other subject")
        .is_empty());
    assert!(matches!(
        s.trail(7, from, to, -1).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(s
        .trail(7, to, from, 100)
        .await
        .expect("inverted")
        .is_empty());

    // Bad input is rejected with a reason, nothing is written.
    let bad = stored(Some(7), rec("dev-bad", t0, Some(1), Some(pos(123.0, 12.0))));
    assert!(matches!(
        s.insert_records(&[bad]).await,
        Err(StoreError::Invalid(_))
    ));
    let bad_seq = stored(Some(7), rec("dev-bad", t0, Some(u64::MAX), None));
    assert!(matches!(
        s.insert_records(&[bad_seq]).await,
        Err(StoreError::Invalid(_))
    ));
    assert_eq!(s.count_records("dev-bad").await.expect("count"), 0);
}

async fn latest_state(s: Arc<dyn Store>) {
    let t0 = base();
    let mut a = rec(
        "dev-l",
        t0 + Duration::minutes(10),
        Some(10),
        Some(pos(55.0, 12.0)),
    );
    a.battery_pct = Some(40);
    a.charging = Some(false);
    a.beacon_in_range = Some(true);
    s.insert_records(&[stored(Some(3), a)])
        .await
        .expect("newer");
    // Buffered older data arrives later: must not roll the state back.
    let mut old = rec("dev-l", t0, Some(1), Some(pos(56.0, 13.0)));
    old.battery_pct = Some(99);
    s.insert_records(&[stored(Some(3), old)])
        .await
        .expect("older");
    let st = s.latest_states(Some(&[3])).await.expect("latest");
    assert_eq!(st.len(), 1);
    let st = &st[0];
    assert_eq!(st.subject_id, 3);
    assert_eq!(st.device_id, "dev-l");
    assert_eq!(st.position, Some(pos(55.0, 12.0)));
    assert_eq!(st.position_time, Some(t0 + Duration::minutes(10)));
    assert_eq!(st.battery_pct, Some(40));
    assert_eq!(st.beacon_in_range, Some(true));
    assert_eq!(st.strap_ok, None);
    assert_eq!(
        st.last_contact,
        t0 + Duration::minutes(10) + Duration::seconds(2)
    );

    // A newer tamper event without position keeps the position, updates the status.
    let mut tamper = rec("dev-l", t0 + Duration::minutes(20), Some(20), None);
    tamper.events = vec![DeviceEventKind::StrapTamper];
    s.insert_records(&[stored(Some(3), tamper)])
        .await
        .expect("tamper");
    let st = &s.latest_states(None).await.expect("latest")[0];
    assert_eq!(st.strap_ok, Some(false));
    assert_eq!(st.battery_pct, Some(40));
    assert_eq!(st.position_time, Some(t0 + Duration::minutes(10)));
    assert_eq!(
        st.last_contact,
        t0 + Duration::minutes(20) + Duration::seconds(2)
    );

    // Unattributed records never create subject state; restriction filters.
    s.insert_records(&[stored(None, rec("dev-x", t0, None, Some(pos(1.0, 1.0))))])
        .await
        .expect("unassigned");
    assert_eq!(s.latest_states(None).await.expect("all").len(), 1);
    assert!(s.latest_states(Some(&[99])).await.expect("none").is_empty());
    assert!(s.latest_states(Some(&[])).await.expect("empty").is_empty());
}

/// A record whose device time the policy does not trust is stored with its flag and counts as
/// contact, but moves neither the position nor the status of the latest state.
async fn untrusted_time_is_flagged_and_moves_no_latest_state(s: Arc<dyn Store>) {
    let t0 = base();
    let mut good = rec("dev-u", t0, Some(1), Some(pos(55.0, 12.0)));
    good.time_status = TimeStatus::Trusted;
    good.battery_pct = Some(70);
    s.insert_records(&[stored(Some(7), good)])
        .await
        .expect("good");
    let year_2099 = "2099-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap();
    let mut future = rec("dev-u", year_2099, Some(2), Some(pos(40.0, -3.0)));
    future.received_time = t0 + Duration::seconds(30);
    future.time_status = TimeStatus::Future;
    future.battery_pct = Some(5);
    future.events = vec![DeviceEventKind::StrapRestored];
    let mut past = rec(
        "dev-u",
        t0 - Duration::days(7000),
        Some(3),
        Some(pos(41.0, -4.0)),
    );
    past.received_time = t0 + Duration::seconds(40);
    past.time_status = TimeStatus::FarPast;
    s.insert_records(&[stored(Some(7), future), stored(Some(7), past)])
        .await
        .expect("untrusted");
    let st = &s.latest_states(Some(&[7])).await.expect("latest")[0];
    assert_eq!(st.position, Some(pos(55.0, 12.0)));
    assert_eq!(st.position_time, Some(t0));
    assert_eq!(st.battery_pct, Some(70));
    assert_eq!(st.strap_ok, None);
    assert_eq!(
        st.last_contact,
        t0 + Duration::seconds(40),
        "contact is server time"
    );
    // A later trusted fix still moves it (nothing was frozen in 2099).
    let mut later = rec(
        "dev-u",
        t0 + Duration::minutes(5),
        Some(4),
        Some(pos(55.1, 12.1)),
    );
    later.time_status = TimeStatus::Trusted;
    s.insert_records(&[stored(Some(7), later)])
        .await
        .expect("later");
    let st = &s.latest_states(Some(&[7])).await.expect("latest")[0];
    assert_eq!(st.position, Some(pos(55.1, 12.1)));
    // The flags are stored with the records.
    let mut flags: Vec<(i32, TimeStatus)> = s
        .device_records("dev-u", 10)
        .await
        .expect("records")
        .iter()
        .map(|r| (chrono::Datelike::year(&r.device_time), r.time_status))
        .collect();
    flags.sort_by_key(|f| f.0);
    let this_year = chrono::Datelike::year(&t0);
    assert!(flags.contains(&(2099, TimeStatus::Future)), "{flags:?}");
    assert!(
        flags
            .iter()
            .any(|f| f.1 == TimeStatus::FarPast && f.0 < this_year - 10),
        "{flags:?}"
    );
    assert!(
        flags
            .iter()
            .filter(|f| f.0 == this_year || f.0 == this_year - 1)
            .all(|f| f.1 == TimeStatus::Unchecked),
        "{flags:?}"
    );
}

async fn alert_writes_are_versioned_and_atomic(s: Arc<dyn Store>) {
    let t0 = base();
    let before = s.last_change_id().await.expect("last");
    let r1 = raise(&s, 1, AlertKind::InclusionZoneExit, Some(5), t0, &["oms"]).await;
    assert!(r1.alert.id > 0);
    assert_eq!(r1.version, 1);
    assert_eq!(r1.alert.started_at, t0);
    assert_eq!(r1.alert.occurrences, 1);
    // Stored as given, to the microsecond.
    let mut expect = alert_row(1, AlertKind::InclusionZoneExit, Some(5), t0);
    expect.id = r1.alert.id;
    expect.created_at = r1.alert.created_at;
    assert_eq!(r1.alert, expect);
    assert_eq!(
        s.get_alert(r1.alert.id).await.expect("get"),
        Some(r1.clone())
    );
    assert_eq!(
        s.ongoing_alert(1, AlertKind::InclusionZoneExit, Some(5))
            .await
            .expect("ongoing"),
        Some(r1.clone())
    );
    assert_eq!(
        s.ongoing_alert(1, AlertKind::InclusionZoneExit, Some(6))
            .await
            .expect("other zone"),
        None
    );

    // At most one ongoing alert per subject, kind and zone: a second one is a conflict.
    assert!(matches!(
        write(
            &s,
            None,
            alert_row(1, AlertKind::InclusionZoneExit, Some(5), t0),
            "alert.created",
            &["oms"]
        )
        .await,
        Err(StoreError::Conflict(_))
    ));
    // Another zone or kind is another condition.
    raise(&s, 1, AlertKind::InclusionZoneExit, Some(6), t0, &[]).await;
    raise(&s, 1, AlertKind::StrapTamper, None, t0, &[]).await;

    // An update names the version it was decided on.
    let r2 = change(
        &s,
        &r1,
        |a| {
            a.occurrences = 2;
            a.last_seen_at = t0 + Duration::minutes(1);
            a.severity = Severity::Critical;
        },
        "alert.updated",
        &[],
    )
    .await;
    assert_eq!(r2.version, 2);
    assert_eq!(r2.alert.occurrences, 2);
    assert_eq!(r2.alert.severity, Severity::Critical);
    // Identity fields are not rewritten by an update.
    let mut sneaky = r2.alert.clone();
    sneaky.subject_id = 99;
    sneaky.started_at = t0 - Duration::days(1);
    let r3 = write(&s, Some(2), sneaky, "alert.updated", &[])
        .await
        .expect("update");
    assert_eq!(r3.alert.subject_id, 1);
    assert_eq!(r3.alert.started_at, t0);
    // A write decided on an old version is refused, and changes nothing.
    let mut stale = r2.alert.clone();
    stale.state = AlertState::Resolved;
    assert!(matches!(
        write(&s, Some(2), stale, "alert.resolved", &["oms"]).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(
        s.get_alert(r1.alert.id)
            .await
            .expect("get")
            .map(|v| (v.version, v.alert.state)),
        Some((3, AlertState::Open))
    );
    let mut gone = r2.alert.clone();
    gone.id = 987_654;
    assert!(matches!(
        write(&s, Some(1), gone, "alert.updated", &[]).await,
        Err(StoreError::NotFound(_))
    ));

    // Resolving ends the condition's alert: a new one may then be raised.
    let resolved = change(
        &s,
        &r3,
        |a| {
            a.state = AlertState::Resolved;
            a.resolved_at = Some(t0 + Duration::minutes(5));
            a.resolution_code = Some("false_alarm".into());
        },
        "alert.resolved",
        &["oms"],
    )
    .await;
    assert_eq!(
        s.ongoing_alert(1, AlertKind::InclusionZoneExit, Some(5))
            .await
            .expect("ongoing"),
        None
    );
    let again = raise(
        &s,
        1,
        AlertKind::InclusionZoneExit,
        Some(5),
        t0 + Duration::minutes(9),
        &[],
    )
    .await;
    assert_ne!(again.alert.id, resolved.alert.id);

    // What went with each write is in the store: audit, change log, outbox.
    let changes = s.changes_after(before, 100).await.expect("changes");
    let events: Vec<(String, AlertId, i64)> = changes
        .iter()
        .filter_map(|e| match &e.change {
            Change::Alert {
                event,
                alert,
                version,
            } => Some((event.clone(), alert.id, *version)),
            _ => None,
        })
        .collect();
    let id1 = r1.alert.id;
    assert_eq!(
        events
            .iter()
            .filter(|(_, id, _)| *id == id1)
            .cloned()
            .collect::<Vec<_>>(),
        vec![
            ("alert.created".to_string(), id1, 1),
            ("alert.updated".to_string(), id1, 2),
            ("alert.updated".to_string(), id1, 3),
            ("alert.resolved".to_string(), id1, 4),
        ]
    );
    assert!(changes.windows(2).all(|w| w[0].id < w[1].id));
    let audit = s
        .list_audit(&AuditFilter {
            target_type: Some("alert".into()),
            ..AuditFilter::default()
        })
        .await
        .expect("audit");
    assert_eq!(
        audit
            .iter()
            .filter(|e| e.target_id.as_deref() == Some(&id1.to_string()))
            .count(),
        4
    );
    let due = s
        .due_outbox("oms", Utc::now() + Duration::days(1), 10)
        .await
        .expect("due");
    assert_eq!(due.len(), 1, "one per subject: the oldest");
    assert_eq!(due[0].idempotency_key, key(id1, 1));

    // A write whose effects cannot be built leaves nothing behind.
    let last = s.last_change_id().await.expect("last");
    let fail = |_: &VersionedAlert| -> em_store::Result<AlertEffects> {
        Err(StoreError::Invalid("no effects".into()))
    };
    assert!(s
        .write_alert(
            &AlertWrite {
                expected_version: None,
                alert: alert_row(2, AlertKind::LowBattery, None, t0),
            },
            &fail,
        )
        .await
        .is_err());
    assert_eq!(
        s.ongoing_alert(2, AlertKind::LowBattery, None)
            .await
            .expect("ongoing"),
        None
    );
    assert_eq!(s.last_change_id().await.expect("last"), last);
}

async fn change_log_and_cursors(s: Arc<dyn Store>) {
    let mut wake = s.change_wakeups();
    let start = s.last_change_id().await.expect("last");
    assert!(s.changes_after(start, 10).await.expect("none").is_empty());
    let officer = s
        .upsert_user(&User {
            id: 0,
            username: "log.officer".into(),
            display_name: "Log Officer".into(),
            role: Role::Officer,
            password_hash: "x".into(),
            active: true,
        })
        .await
        .expect("user");
    // One spec (base() reads the clock: calling it twice may straddle a second).
    let spec = subject("LOG-1", Some(officer));
    let sid = s.upsert_subject(&spec).await.expect("subject");
    s.upsert_device(&Device {
        device_id: "log-dev".into(),
        protocol: Protocol::Gt06,
        secret: None,
        active: true,
        class: DeviceClass::OffenderTag,
    })
    .await
    .expect("device");
    s.assign_device("log-dev", sid, base())
        .await
        .expect("assign");
    let zone = ZoneSpec {
        id: 0,
        subject_id: Some(sid),
        group: None,
        name: "Home".into(),
        kind: ZoneKind::Inclusion,
        geometry: ZoneGeometry::Circle {
            center: [12.5, 55.6],
            radius_m: 100.0,
        },
        schedule: None,
        is_curfew_home: true,
    };
    let zid = s.upsert_zone(&zone).await.expect("zone");
    s.set_subject_zone_groups(sid, &["schools".into(), "parks".into()])
        .await
        .expect("groups");
    s.unassign_device("log-dev", base() + Duration::hours(1))
        .await
        .expect("unassign");
    s.delete_zone(zid).await.expect("delete");
    // Failed writes write no change.
    assert!(s.delete_zone(zid).await.is_err());

    let log = s.changes_after(start, 100).await.expect("log");
    let kinds: Vec<Change> = log.iter().map(|e| e.change.clone()).collect();
    let subj = Subject { id: sid, ..spec };
    assert_eq!(
        kinds,
        vec![
            Change::Subject { subject: subj },
            Change::Device {
                device_id: "log-dev".into()
            },
            Change::Device {
                device_id: "log-dev".into()
            },
            Change::Zone {
                zone: ZoneSpec {
                    id: zid,
                    ..zone.clone()
                }
            },
            Change::SubjectZoneGroups {
                subject_id: sid,
                groups: vec!["parks".into(), "schools".into()]
            },
            Change::Device {
                device_id: "log-dev".into()
            },
            Change::ZoneDeleted {
                zone_id: zid,
                subject_id: Some(sid)
            },
        ]
    );
    assert!(log.windows(2).all(|w| w[0].id < w[1].id), "ids grow");
    assert!(log
        .iter()
        .all(|e| (e.at - Utc::now()).num_seconds().abs() < 60));
    assert_eq!(s.last_change_id().await.expect("last"), log[6].id);
    // Paging from any id.
    let page = s.changes_after(log[1].id, 2).await.expect("page");
    assert_eq!(
        page.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![log[2].id, log[3].id]
    );
    assert!(matches!(
        s.changes_after(0, -1).await,
        Err(StoreError::Invalid(_))
    ));
    // Readers are woken (this process's writes on SQLite; NOTIFY on PostgreSQL).
    tokio::time::timeout(std::time::Duration::from_secs(5), wake.changed())
        .await
        .expect("woken within 5 s")
        .expect("notifier alive");

    // Cursors of single consumers.
    assert_eq!(s.read_cursor("test-consumer").await.expect("cursor"), None);
    s.write_cursor("test-consumer", log[3].id)
        .await
        .expect("write");
    s.write_cursor("test-consumer", log[5].id)
        .await
        .expect("move");
    assert_eq!(
        s.read_cursor("test-consumer").await.expect("cursor"),
        Some(log[5].id)
    );
    assert_eq!(s.read_cursor("other").await.expect("cursor"), None);

    // The feed follows the log from any point, then live.
    let stop = tokio_util::sync::CancellationToken::new();
    let feed = ChangeFeed::start(s.clone(), stop.clone())
        .await
        .expect("feed");
    assert_eq!(feed.position(), log[6].id);
    let mut from_start = feed.follow(log[4].id);
    let mut live = feed.follow_live();
    assert_eq!(from_start.next().await.expect("5").id, log[5].id);
    assert_eq!(from_start.next().await.expect("6").id, log[6].id);
    let z2 = s.upsert_zone(&zone).await.expect("zone again");
    let t = std::time::Duration::from_secs(5);
    let e = tokio::time::timeout(t, live.next())
        .await
        .expect("live within 5 s")
        .expect("entry");
    assert!(matches!(e.change, Change::Zone { zone } if zone.id == z2));
    let e2 = tokio::time::timeout(t, from_start.next())
        .await
        .expect("within 5 s")
        .expect("entry");
    assert_eq!(e2.id, e.id);
    assert!(feed.reached(e.id, t).await);
    stop.cancel();
}

async fn sessions(s: Arc<dyn Store>) {
    let now = Utc::now();
    let new = |hash: &str, user: UserId, idle: i64, end: i64| NewSession {
        token_hash: hash.into(),
        user_id: user,
        created_at: now,
        expires_at: now + Duration::seconds(idle),
        ends_at: now + Duration::seconds(end),
    };
    s.create_session(&new("a", 1, 60, 3600)).await.expect("a");
    s.create_session(&new("b", 1, 60, 3600)).await.expect("b");
    s.create_session(&new("c", 2, 60, 3600)).await.expect("c");
    s.create_session(&new("short", 3, 3600, 30))
        .await
        .expect("short");
    assert!(matches!(
        s.create_session(&new("a", 9, 60, 60)).await,
        Err(StoreError::Conflict(_))
    ));
    // A touch moves the idle expiry, never past the end.
    assert_eq!(
        s.touch_session("a", now, now + Duration::seconds(600))
            .await
            .expect("touch"),
        Some(1)
    );
    assert!(s
        .session_live("a", now + Duration::seconds(300))
        .await
        .expect("live"));
    assert!(!s
        .session_live("b", now + Duration::seconds(300))
        .await
        .expect("idle"));
    assert_eq!(
        s.touch_session("short", now, now + Duration::seconds(600))
            .await
            .expect("touch"),
        Some(3)
    );
    assert!(!s
        .session_live("short", now + Duration::seconds(60))
        .await
        .expect("ended"));
    assert_eq!(
        s.touch_session(
            "short",
            now + Duration::seconds(31),
            now + Duration::seconds(900)
        )
        .await
        .expect("after the end"),
        None
    );
    assert_eq!(
        s.touch_session("nope", now, now).await.expect("unknown"),
        None
    );
    // Ending a user's sessions, keeping one.
    assert_eq!(
        s.delete_user_sessions(1, Some("a")).await.expect("others"),
        1
    );
    assert!(s.session_live("a", now).await.expect("kept"));
    assert!(!s.session_live("b", now).await.expect("gone"));
    assert!(s.session_live("c", now).await.expect("other user"));
    s.delete_session("c").await.expect("logout");
    assert!(!s.session_live("c", now).await.expect("logged out"));
    assert_eq!(
        s.purge_sessions(now + Duration::seconds(4000))
            .await
            .expect("purge"),
        2
    );
}

async fn leases(s: Arc<dyn Store>) {
    let mut a = s
        .acquire_lease("job-x", "holder-a")
        .await
        .expect("a")
        .expect("a takes it");
    assert_eq!(a.name(), "job-x");
    assert!(
        s.acquire_lease("job-x", "holder-b")
            .await
            .expect("b")
            .is_none(),
        "held by a"
    );
    let other = s
        .acquire_lease("job-y", "holder-b")
        .await
        .expect("b")
        .expect("another job");
    assert!(a.still_held().await);
    a.release().await;
    let mut b = s
        .acquire_lease("job-x", "holder-b")
        .await
        .expect("b")
        .expect("free again");
    assert!(b.still_held().await);
    assert!(s
        .acquire_lease("job-x", "holder-a")
        .await
        .expect("a")
        .is_none());
    b.release().await;
    other.release().await;

    // run_leased: exactly one of two runners runs the job; when it stops, the other takes over.
    let runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let max_running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let job = |runs: Arc<std::sync::atomic::AtomicUsize>,
               running: Arc<std::sync::atomic::AtomicUsize>,
               max_running: Arc<std::sync::atomic::AtomicUsize>| {
        move |token: tokio_util::sync::CancellationToken| {
            let (runs, running, max_running) = (runs.clone(), running.clone(), max_running.clone());
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                runs.fetch_add(1, SeqCst);
                let now = running.fetch_add(1, SeqCst) + 1;
                max_running.fetch_max(now, SeqCst);
                token.cancelled().await;
                running.fetch_sub(1, SeqCst);
            }
        }
    };
    let stop1 = tokio_util::sync::CancellationToken::new();
    let stop2 = tokio_util::sync::CancellationToken::new();
    let r1 = tokio::spawn(run_leased(
        s.clone(),
        "job-z",
        "runner-1".into(),
        stop1.clone(),
        job(runs.clone(), running.clone(), max_running.clone()),
    ));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let r2 = tokio::spawn(run_leased(
        s.clone(),
        "job-z",
        "runner-2".into(),
        stop2.clone(),
        job(runs.clone(), running.clone(), max_running.clone()),
    ));
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    use std::sync::atomic::Ordering::SeqCst;
    assert_eq!(runs.load(SeqCst), 1, "one runner has the job");
    stop1.cancel();
    r1.await.expect("runner 1 stops");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while runs.load(SeqCst) < 2 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        runs.load(SeqCst),
        2,
        "the other runner took over within 5 s"
    );
    assert_eq!(max_running.load(SeqCst), 1, "never two at once");
    stop2.cancel();
    r2.await.expect("runner 2 stops");
}

async fn outbox(s: Arc<dyn Store>) {
    let t0 = base();
    let a1 = raise(&s, 1, AlertKind::StrapTamper, None, t0, &["oms", "mqtt"]).await;
    change(
        &s,
        &a1,
        |a| {
            a.state = AlertState::Acknowledged;
            a.acknowledged_by = Some(1);
            a.acknowledged_at = Some(t0);
        },
        "alert.acknowledged",
        &["oms"],
    )
    .await;
    let a2 = raise(&s, 2, AlertKind::LowBattery, None, t0, &["oms"]).await;
    assert_eq!(
        s.count_outbox("oms", OutboxStatus::Pending)
            .await
            .expect("count"),
        3
    );
    assert_eq!(
        s.count_outbox("mqtt", OutboxStatus::Pending)
            .await
            .expect("count"),
        1
    );

    let far = Utc::now() + Duration::days(1);
    let due = s.due_outbox("oms", far, 10).await.expect("due");
    // Only the oldest pending message of each subject.
    assert_eq!(due.len(), 2);
    assert_eq!(due[0].ordering_key, "subject:1");
    assert_eq!(due[1].ordering_key, "subject:2");
    assert_eq!(due[0].payload["event"], "alert.created");
    assert_eq!(due[0].payload["alert"]["id"], a1.alert.id);
    assert_eq!(due[0].idempotency_key, key(a1.alert.id, 1));
    assert_eq!(due[0].payload["idempotency_key"], due[0].idempotency_key);
    assert_eq!(due[0].attempts, 0);
    assert_eq!(s.due_outbox("oms", far, 1).await.expect("limit").len(), 1);
    assert!(s
        .due_outbox("oms", t0 - Duration::days(1), 10)
        .await
        .expect("not yet")
        .is_empty());
    assert!(s
        .due_outbox("nope", far, 10)
        .await
        .expect("other channel")
        .is_empty());

    // Failure with back-off: subject 1 is blocked (its later message must not overtake).
    let first = due[0].clone();
    let retry_at = Utc::now() + Duration::hours(1);
    s.mark_outbox_failed(first.id, "HTTP 503", retry_at, false)
        .await
        .expect("fail");
    let now_due = s.due_outbox("oms", Utc::now(), 10).await.expect("due");
    assert_eq!(
        now_due.iter().map(|m| m.id).collect::<Vec<_>>(),
        vec![due[1].id]
    );
    let later = s.due_outbox("oms", retry_at, 10).await.expect("due later");
    let retried = later.iter().find(|m| m.id == first.id).expect("retried");
    assert_eq!(retried.attempts, 1);
    assert_eq!(retried.last_error.as_deref(), Some("HTTP 503"));

    // Delivery of subject 2's only message.
    s.mark_outbox_delivered(due[1].id, Utc::now())
        .await
        .expect("delivered");
    assert_eq!(
        s.outbox_status(due[1].id).await.expect("status"),
        Some(OutboxStatus::Delivered)
    );
    s.mark_outbox_delivered(due[1].id, Utc::now())
        .await
        .expect("idempotent delivered");
    assert!(matches!(
        s.mark_outbox_failed(due[1].id, "x", Utc::now(), false)
            .await,
        Err(StoreError::Conflict(_))
    ));

    // Dead letter unblocks the next message of subject 1.
    s.mark_outbox_failed(first.id, "HTTP 400: rejected", Utc::now(), true)
        .await
        .expect("dead");
    assert_eq!(
        s.outbox_status(first.id).await.expect("status"),
        Some(OutboxStatus::DeadLetter)
    );
    assert_eq!(
        s.count_outbox("oms", OutboxStatus::DeadLetter)
            .await
            .expect("dead"),
        1
    );
    let next = s.due_outbox("oms", far, 10).await.expect("next");
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].payload["event"], "alert.acknowledged");
    assert_eq!(next[0].payload["alert"]["state"], "acknowledged");
    assert_eq!(next[0].idempotency_key, key(a1.alert.id, 2));
    assert!(matches!(
        s.mark_outbox_delivered(first.id, Utc::now()).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.mark_outbox_delivered(123456, Utc::now()).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(s.outbox_status(123456).await.expect("none"), None);
    assert_eq!(
        s.count_outbox("oms", OutboxStatus::Delivered)
            .await
            .expect("delivered"),
        1
    );
    let _ = a2;
}

async fn audit_log(s: Arc<dyn Store>) {
    let t0 = base();
    let mut ids = Vec::new();
    for (i, action) in ["subject.view", "zone.update", "access.denied"]
        .iter()
        .enumerate()
    {
        ids.push(
            s.append_audit(&NewAudit {
                at: Some(t0 + Duration::seconds(i as i64)),
                actor_id: Some(if i == 2 { 2 } else { 1 }),
                actor: "officer1".into(),
                action: (*action).into(),
                target_type: if i == 1 {
                    "zone".into()
                } else {
                    "subject".into()
                },
                target_id: Some("5".into()),
                subject_id: Some(5),
                details: serde_json::json!({"i": i}),
            })
            .await
            .expect("append"),
        );
    }
    let defaulted = s
        .append_audit(&NewAudit {
            at: None,
            actor_id: None,
            actor: "system:ingest".into(),
            action: "device.unknown".into(),
            target_type: "device".into(),
            target_id: None,
            subject_id: None,
            details: serde_json::Value::Null,
        })
        .await
        .expect("append now");
    assert!(ids.windows(2).all(|w| w[0] < w[1]) && defaulted > ids[2]);
    let all = s.list_audit(&AuditFilter::default()).await.expect("all");
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].id, defaulted, "newest first");
    assert!(all[0].at > t0);
    assert_eq!(
        s.list_audit(&AuditFilter {
            actor_id: Some(1),
            ..Default::default()
        })
        .await
        .expect("actor")
        .len(),
        2
    );
    assert_eq!(
        s.list_audit(&AuditFilter {
            subject_id: Some(5),
            target_type: Some("zone".into()),
            ..Default::default()
        })
        .await
        .expect("subject+type")[0]
            .action,
        "zone.update"
    );
    let window = s
        .list_audit(&AuditFilter {
            since: Some(t0 + Duration::seconds(1)),
            until: Some(t0 + Duration::seconds(2)),
            ..Default::default()
        })
        .await
        .expect("window");
    assert_eq!(window.len(), 1);
    assert_eq!(window[0].details, serde_json::json!({"i": 1}));
    assert_eq!(
        s.list_audit(&AuditFilter {
            limit: Some(2),
            ..Default::default()
        })
        .await
        .expect("limit")
        .len(),
        2
    );
    // The action filter runs in the database (a prefix), before the limit: a flood of other
    // rows cannot hide the rows asked for.
    for i in 0..30 {
        s.append_audit(&NewAudit {
            at: None,
            actor_id: Some(3),
            actor: "flood".into(),
            action: "subject.list".into(),
            target_type: "subject".into(),
            target_id: None,
            subject_id: None,
            details: serde_json::json!({ "n": i }),
        })
        .await
        .expect("flood");
    }
    let denied = s
        .list_audit(&AuditFilter {
            action: Some("access.denied".into()),
            limit: Some(5),
            ..Default::default()
        })
        .await
        .expect("action");
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0].action, "access.denied");
    let subject_actions = s
        .list_audit(&AuditFilter {
            action: Some("subject.".into()),
            ..Default::default()
        })
        .await
        .expect("prefix");
    assert_eq!(subject_actions.len(), 31);
    assert!(s
        .list_audit(&AuditFilter {
            action: Some("subject.%".into()),
            ..Default::default()
        })
        .await
        .expect("no wildcard")
        .is_empty());
    // Paging: newest first, pages do not overlap.
    let page = |offset| AuditFilter {
        limit: Some(10),
        offset: Some(offset),
        ..Default::default()
    };
    let p1 = s.list_audit(&page(0)).await.expect("page 1");
    let p2 = s.list_audit(&page(10)).await.expect("page 2");
    assert_eq!(p1.len(), 10);
    assert_eq!(p2.len(), 10);
    assert!(p1.last().expect("p1").id > p2[0].id);
    let tail = s
        .list_audit(&AuditFilter {
            offset: Some(30),
            ..Default::default()
        })
        .await
        .expect("offset only");
    assert_eq!(tail.len(), 4);
}

async fn retention(s: Arc<dyn Store>) {
    let now = Utc::now()
        .duration_trunc(Duration::seconds(1))
        .expect("trunc");
    // Old data in a month that has its own partition (native layout), very old data in the
    // default partition, and fresh data.
    let mut batch = Vec::new();
    for i in 0..5 {
        batch.push(stored(
            Some(1),
            rec(
                "dev-r",
                now - Duration::days(200) + Duration::minutes(i),
                Some(i as u64),
                Some(pos(1.0, 1.0)),
            ),
        ));
        batch.push(stored(
            Some(1),
            rec(
                "dev-r",
                now - Duration::days(1500) + Duration::minutes(i),
                Some(i as u64),
                Some(pos(1.0, 1.0)),
            ),
        ));
        batch.push(stored(
            Some(1),
            rec(
                "dev-r",
                now - Duration::minutes(i),
                Some(100 + i as u64),
                Some(pos(1.0, 1.0)),
            ),
        ));
    }
    s.insert_records(&batch).await.expect("insert");
    assert_eq!(s.count_records("dev-r").await.expect("count"), 15);

    let old_alert = raise(
        &s,
        1,
        AlertKind::LowBattery,
        None,
        now - Duration::days(400),
        &[],
    )
    .await;
    change(
        &s,
        &old_alert,
        |a| {
            a.state = AlertState::Resolved;
            a.resolved_at = Some(now - Duration::days(399));
            a.resolution_code = Some("auto".into());
        },
        "alert.resolved",
        &[],
    )
    .await;
    let open_old = raise(
        &s,
        1,
        AlertKind::StrapTamper,
        None,
        now - Duration::days(400),
        &[],
    )
    .await;
    s.append_audit(&NewAudit {
        at: Some(now - Duration::days(3000)),
        actor_id: None,
        actor: "system:test".into(),
        action: "old".into(),
        target_type: "test".into(),
        target_id: None,
        subject_id: None,
        details: serde_json::json!({}),
    })
    .await
    .expect("old audit");
    let audit_before = s
        .list_audit(&AuditFilter::default())
        .await
        .expect("audit")
        .len();

    let report = s
        .apply_retention(
            now - Duration::days(30),
            Some(now - Duration::days(365)),
            Some(now - Duration::days(2000)),
        )
        .await
        .expect("retention");
    assert_eq!(
        report,
        RetentionReport {
            positions_deleted: 10,
            alerts_deleted: 1,
            audit_deleted: 1,
            changes_deleted: 0,
        }
    );
    assert_eq!(s.count_records("dev-r").await.expect("count"), 5);
    assert_eq!(s.get_alert(old_alert.alert.id).await.expect("gone"), None);
    assert!(
        s.get_alert(open_old.alert.id)
            .await
            .expect("kept")
            .is_some(),
        "unresolved alerts are kept"
    );
    assert_eq!(
        s.list_audit(&AuditFilter::default())
            .await
            .expect("audit")
            .len(),
        audit_before - 1
    );
    // Idempotent.
    assert_eq!(
        s.apply_retention(now - Duration::days(30), None, None)
            .await
            .expect("again"),
        RetentionReport::default()
    );
    // New data for a month whose partition was dropped can still be stored.
    s.insert_records(&[stored(
        Some(1),
        rec("dev-r", now - Duration::days(200), Some(9), None),
    )])
    .await
    .expect("insert into dropped month");
    assert_eq!(s.count_records("dev-r").await.expect("count"), 6);
}

/// Victim data is its own class: victim records go to the victim store, never to positions or
/// latest state (no trail, map or export shows them); the device class and the victim liaison
/// role round-trip; retention covers victim positions too.
async fn victim_data_apart(s: Arc<dyn Store>) {
    let victim = Device {
        device_id: "victim-1".into(),
        protocol: Protocol::Em,
        secret: None,
        active: true,
        class: DeviceClass::Victim,
    };
    s.upsert_device(&victim).await.expect("victim device");
    assert_eq!(
        s.get_device("victim-1")
            .await
            .expect("get")
            .map(|d| d.class),
        Some(DeviceClass::Victim)
    );
    s.upsert_device(&Device {
        class: DeviceClass::OffenderTag,
        ..victim.clone()
    })
    .await
    .expect("class change");
    assert_eq!(
        s.get_device("victim-1")
            .await
            .expect("get")
            .map(|d| d.class),
        Some(DeviceClass::OffenderTag)
    );
    s.upsert_device(&victim).await.expect("victim again");

    let t = base();
    let mut recs: Vec<Record> = (0..3)
        .map(|i| {
            rec(
                "victim-1",
                t + Duration::seconds(i),
                Some(i as u64),
                Some(pos(55.6801 + i as f64 * 1e-4, 12.5702)),
            )
        })
        .collect();
    recs[2].battery_pct = Some(77);
    // A status-only record is kept too (not a trail point).
    recs.push(rec("victim-1", t + Duration::seconds(10), None, None));
    s.insert_victim_records(&recs).await.expect("victim insert");
    // Idempotent like positions: a re-sent batch adds nothing.
    s.insert_victim_records(&recs)
        .await
        .expect("victim re-insert");
    assert_eq!(s.count_victim_records("victim-1").await.expect("count"), 4);
    assert_eq!(s.count_records("victim-1").await.expect("positions"), 0);
    assert!(s
        .device_records("victim-1", 100)
        .await
        .expect("records")
        .is_empty());
    assert!(
        s.latest_states(None).await.expect("latest").is_empty(),
        "victim records never reach latest_state"
    );

    let got = s
        .victim_positions(
            "victim-1",
            t - Duration::hours(1),
            t + Duration::hours(1),
            100,
        )
        .await
        .expect("victim positions");
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].position, pos(55.6801, 12.5702));
    assert_eq!(got[2].battery_pct, Some(77));
    assert_eq!(got[1].device_time, t + Duration::seconds(1));
    assert!(s
        .victim_positions(
            "victim-1",
            t + Duration::hours(1),
            t + Duration::hours(2),
            100
        )
        .await
        .expect("window")
        .is_empty());
    assert!(matches!(
        s.victim_positions("victim-1", t, t, -1).await,
        Err(StoreError::Invalid(_))
    ));
    let mut bad = rec("victim-1", t, Some(99), Some(pos(123.0, 0.0)));
    bad.device_id = "victim-1".into();
    assert!(matches!(
        s.insert_victim_records(&[bad]).await,
        Err(StoreError::Invalid(_))
    ));

    // The victim liaison role is accepted by the users table of both backends.
    let uid = s
        .upsert_user(&User {
            id: 0,
            username: "liaison".into(),
            display_name: "Liv Liaison".into(),
            role: Role::VictimLiaison,
            password_hash: "x".into(),
            active: true,
        })
        .await
        .expect("liaison user");
    assert_eq!(
        s.get_user(uid).await.expect("get").map(|u| u.role),
        Some(Role::VictimLiaison)
    );

    // Retention deletes old victim positions as well.
    s.insert_victim_records(&[rec(
        "victim-1",
        t - Duration::days(400),
        Some(1),
        Some(pos(55.0, 12.0)),
    )])
    .await
    .expect("old victim record");
    let report = s
        .apply_retention(t - Duration::days(30), None, None)
        .await
        .expect("retention");
    assert_eq!(report.positions_deleted, 1);
    assert_eq!(s.count_victim_records("victim-1").await.expect("count"), 4);
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(em_store::testing::sqlite_store().await).await;
                }
            )*
        }
        /// PostgreSQL, positions natively partitioned.
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    let layout = em_store::LayoutRequest::Native;
                    if let Some((s, _)) = em_store::testing::postgres_store_with_layout(layout).await {
                        assert_eq!(s.backend(), "postgres");
                        super::$name(s).await;
                    }
                }
            )*
        }
        /// PostgreSQL, positions in a TimescaleDB hypertable (skipped without TimescaleDB,
        /// failing under CI=true).
        mod timescale {
            $(
                #[tokio::test]
                async fn $name() {
                    let layout = em_store::LayoutRequest::Timescale;
                    if let Some((s, _)) = em_store::testing::postgres_store_with_layout(layout).await {
                        assert_eq!(s.backend(), "timescaledb");
                        super::$name(s).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    registry,
    assignment_history,
    records_idempotent_and_trail,
    latest_state,
    untrusted_time_is_flagged_and_moves_no_latest_state,
    alert_writes_are_versioned_and_atomic,
    change_log_and_cursors,
    sessions,
    leases,
    outbox,
    audit_log,
    retention,
    victim_data_apart,
);
