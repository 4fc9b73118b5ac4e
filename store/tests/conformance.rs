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

fn new_alert(
    subject: SubjectId,
    kind: AlertKind,
    zone: Option<ZoneId>,
    at: DateTime<Utc>,
) -> NewAlert {
    NewAlert {
        subject_id: subject,
        device_id: Some("dev-a".into()),
        kind,
        severity: Severity::High,
        zone_id: zone,
        message: "Left the home zone".into(),
        at,
        evidence: serde_json::json!({"fixes": [[12.5, 55.6]]}),
    }
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

async fn alerts_fold_and_lifecycle(s: Arc<dyn Store>) {
    let t0 = base();
    let raised_from = server_now();
    let r1 = s
        .raise_alert(
            &new_alert(1, AlertKind::InclusionZoneExit, Some(5), t0),
            &["oms"],
        )
        .await
        .expect("raise");
    assert!(r1.created);
    assert_eq!(r1.alert.state, AlertState::Open);
    assert_eq!(r1.alert.occurrences, 1);
    assert_eq!(r1.alert.started_at, t0);
    // A repeat folds into the ongoing alert.
    let mut repeat = new_alert(
        1,
        AlertKind::InclusionZoneExit,
        Some(5),
        t0 + Duration::minutes(1),
    );
    repeat.severity = Severity::Critical;
    let r2 = s.raise_alert(&repeat, &["oms"]).await.expect("repeat");
    assert!(!r2.created);
    assert_eq!(r2.alert.id, r1.alert.id);
    assert_eq!(r2.alert.occurrences, 2);
    assert_eq!(r2.alert.started_at, t0);
    assert_eq!(r2.alert.last_seen_at, t0 + Duration::minutes(1));
    assert_eq!(r2.alert.severity, Severity::Critical);
    // Other zone / other kind → separate alerts.
    let other_zone = s
        .raise_alert(
            &new_alert(1, AlertKind::InclusionZoneExit, Some(6), t0),
            &[],
        )
        .await
        .expect("zone 6");
    assert!(other_zone.created);
    let tamper = s
        .raise_alert(
            &new_alert(1, AlertKind::StrapTamper, None, t0 + Duration::minutes(2)),
            &[],
        )
        .await
        .expect("tamper");
    assert!(tamper.created);
    assert_eq!(
        s.ongoing_alert(1, AlertKind::StrapTamper, None)
            .await
            .expect("ongoing"),
        Some(tamper.alert.clone())
    );
    assert_eq!(
        s.ongoing_alert(1, AlertKind::InclusionZoneExit, Some(5))
            .await
            .expect("ongoing")
            .map(|a| a.id),
        Some(r1.alert.id)
    );
    assert_eq!(
        s.ongoing_alert(1, AlertKind::StrapTamper, Some(5))
            .await
            .expect("none"),
        None
    );

    // Lifecycle.
    let id = r1.alert.id;
    let acked = s
        .update_alert(
            id,
            &AlertUpdate::Acknowledge {
                by: 11,
                at: t0 + Duration::minutes(3),
            },
            "officer1",
            &["oms"],
        )
        .await
        .expect("ack");
    assert_eq!(acked.state, AlertState::Acknowledged);
    assert_eq!(acked.acknowledged_by, Some(11));
    assert!(matches!(
        s.update_alert(
            id,
            &AlertUpdate::Acknowledge { by: 11, at: t0 },
            "officer1",
            &[]
        )
        .await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        s.update_alert(
            id,
            &AlertUpdate::Escalate { at: t0 },
            "system:escalation",
            &[]
        )
        .await,
        Err(StoreError::Conflict(_))
    ));
    let ended = s
        .update_alert(
            id,
            &AlertUpdate::ConditionEnded {
                at: t0 + Duration::minutes(4),
            },
            "system:alerts",
            &[],
        )
        .await
        .expect("ended");
    assert_eq!(ended.ended_at, Some(t0 + Duration::minutes(4)));
    assert_eq!(ended.state, AlertState::Acknowledged);
    let resolved = s
        .update_alert(
            id,
            &AlertUpdate::Resolve {
                by: Some(11),
                at: t0 + Duration::minutes(5),
                code: "returned_home".into(),
                note: Some("called subject".into()),
            },
            "officer1",
            &["oms"],
        )
        .await
        .expect("resolve");
    assert_eq!(resolved.state, AlertState::Resolved);
    assert_eq!(resolved.resolution_code.as_deref(), Some("returned_home"));
    assert_eq!(s.get_alert(id).await.expect("get"), Some(resolved.clone()));
    for u in [
        AlertUpdate::Acknowledge { by: 1, at: t0 },
        AlertUpdate::ConditionEnded { at: t0 },
        AlertUpdate::Resolve {
            by: None,
            at: t0,
            code: "x".into(),
            note: None,
        },
    ] {
        assert!(matches!(
            s.update_alert(id, &u, "officer1", &["oms"]).await,
            Err(StoreError::Conflict(_))
        ));
    }
    assert!(matches!(
        s.update_alert(987654, &AlertUpdate::Escalate { at: t0 }, "x", &[])
            .await,
        Err(StoreError::NotFound(_))
    ));
    // After resolution a new raise opens a new alert.
    let again = s
        .raise_alert(
            &new_alert(
                1,
                AlertKind::InclusionZoneExit,
                Some(5),
                t0 + Duration::minutes(30),
            ),
            &[],
        )
        .await
        .expect("again");
    assert!(again.created);
    assert_ne!(again.alert.id, id);

    // Escalation input counts from created_at (server time of the raise), not from started_at
    // (device time): these alerts started up to an hour ago on the tags but were raised just now.
    assert!(s
        .unacknowledged_alerts(t0 + Duration::minutes(10))
        .await
        .expect("unacked")
        .is_empty());
    assert!(s
        .unacknowledged_alerts(raised_from)
        .await
        .expect("unacked")
        .is_empty());
    let unacked = s
        .unacknowledged_alerts(Utc::now() + Duration::seconds(1))
        .await
        .expect("unacked");
    let ids: Vec<AlertId> = unacked.iter().map(|a| a.id).collect();
    assert_eq!(
        ids,
        vec![other_zone.alert.id, tamper.alert.id, again.alert.id]
    );
    let esc = s
        .update_alert(
            tamper.alert.id,
            &AlertUpdate::Escalate {
                at: t0 + Duration::minutes(10),
            },
            "system:escalation",
            &["oms"],
        )
        .await
        .expect("escalate");
    assert!(esc.escalated);
    assert_eq!(esc.state, AlertState::Open);
    assert_eq!(
        s.unacknowledged_alerts(Utc::now() + Duration::seconds(1))
            .await
            .expect("unacked")
            .iter()
            .map(|a| a.id)
            .collect::<Vec<_>>(),
        vec![other_zone.alert.id, again.alert.id]
    );

    // Listing: newest first, filters.
    let all = s.list_alerts(&AlertFilter::default()).await.expect("all");
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].started_at >= w[1].started_at));
    assert_eq!(all[0].id, again.alert.id);
    let open = s
        .list_alerts(&AlertFilter {
            states: Some(vec![AlertState::Open]),
            ..Default::default()
        })
        .await
        .expect("open");
    assert_eq!(open.len(), 3);
    assert!(s
        .list_alerts(&AlertFilter {
            subject_ids: Some(vec![2]),
            ..Default::default()
        })
        .await
        .expect("caseload")
        .is_empty());
    assert_eq!(
        s.list_alerts(&AlertFilter {
            since: Some(t0 + Duration::minutes(1)),
            limit: Some(10),
            ..Default::default()
        })
        .await
        .expect("since")
        .len(),
        2
    );
    assert_eq!(
        s.list_alerts(&AlertFilter {
            limit: Some(1),
            ..Default::default()
        })
        .await
        .expect("limit")
        .len(),
        1
    );

    // Every change is audited, with the previous state.
    let audit = s
        .list_audit(&AuditFilter {
            target_type: Some("alert".into()),
            ..Default::default()
        })
        .await
        .expect("audit");
    let actions: Vec<&str> = audit
        .iter()
        .filter(|e| e.target_id == Some(id.to_string()))
        .map(|e| e.action.as_str())
        .collect();
    assert_eq!(
        actions,
        vec![
            "alert.resolve",
            "alert.condition_ended",
            "alert.acknowledge",
            "alert.repeat",
            "alert.create"
        ]
    );
    let resolve_entry = audit
        .iter()
        .find(|e| e.action == "alert.resolve")
        .expect("resolve audit");
    assert_eq!(resolve_entry.actor, "officer1");
    assert_eq!(resolve_entry.actor_id, Some(11));
    assert_eq!(resolve_entry.subject_id, Some(1));
    assert_eq!(resolve_entry.details["previous"]["state"], "acknowledged");
}

/// `created_at` is the server time of the raise, whatever the device time of the evidence, and
/// neither repeats nor lifecycle changes move it.
async fn alert_created_at_is_server_time(s: Arc<dyn Store>) {
    // A tag that was offline uploads a backlog: the first evidence is two hours old.
    let started = base() - Duration::hours(1);
    let before = server_now();
    let r1 = s
        .raise_alert(
            &new_alert(3, AlertKind::StrapTamper, None, started),
            &["oms"],
        )
        .await
        .expect("raise");
    let after = Utc::now();
    assert!(r1.created);
    assert_eq!(r1.alert.started_at, started);
    let created = r1.alert.created_at;
    assert!(
        created >= before && created <= after,
        "created_at {created} is not the server time of the raise ({before}..{after})"
    );
    // The outbox payload carries it too.
    let due = s
        .due_outbox("oms", after + Duration::seconds(1), 10)
        .await
        .expect("due");
    let payload_created = due
        .iter()
        .find_map(|m| m.payload.pointer("/alert/created_at").cloned())
        .expect("outbox payload has alert.created_at");
    assert_eq!(
        serde_json::from_value::<DateTime<Utc>>(payload_created).expect("time"),
        created
    );
    // Not due for escalation before it was raised, even though it started long ago.
    assert!(s
        .unacknowledged_alerts(before)
        .await
        .expect("unacked")
        .is_empty());
    assert!(s
        .unacknowledged_alerts(started + Duration::hours(1))
        .await
        .expect("unacked")
        .is_empty());
    assert_eq!(
        s.unacknowledged_alerts(after + Duration::milliseconds(1))
            .await
            .expect("unacked")
            .iter()
            .map(|a| a.id)
            .collect::<Vec<_>>(),
        vec![r1.alert.id]
    );

    // A repeat, raised later by the server clock, folds in and keeps created_at.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let r2 = s
        .raise_alert(
            &new_alert(
                3,
                AlertKind::StrapTamper,
                None,
                started + Duration::minutes(1),
            ),
            &["oms"],
        )
        .await
        .expect("repeat");
    assert!(!r2.created);
    assert_eq!(r2.alert.id, r1.alert.id);
    assert_eq!(r2.alert.occurrences, 2);
    assert_eq!(r2.alert.created_at, created);
    assert_eq!(r2.alert.started_at, started);

    // Lifecycle changes keep it as well.
    let acked = s
        .update_alert(
            r1.alert.id,
            &AlertUpdate::Acknowledge {
                by: 11,
                at: Utc::now(),
            },
            "officer1",
            &[],
        )
        .await
        .expect("ack");
    assert_eq!(acked.created_at, created);
    assert_eq!(
        s.get_alert(r1.alert.id)
            .await
            .expect("get")
            .map(|a| a.created_at),
        Some(created)
    );
}

async fn outbox(s: Arc<dyn Store>) {
    let t0 = base();
    let a1 = s
        .raise_alert(
            &new_alert(1, AlertKind::StrapTamper, None, t0),
            &["oms", "mqtt"],
        )
        .await
        .expect("a1");
    s.update_alert(
        a1.alert.id,
        &AlertUpdate::Acknowledge { by: 1, at: t0 },
        "o",
        &["oms"],
    )
    .await
    .expect("ack");
    let a2 = s
        .raise_alert(&new_alert(2, AlertKind::LowBattery, None, t0), &["oms"])
        .await
        .expect("a2");
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
    assert_eq!(due[0].ordering_key, subject_ordering_key(1));
    assert_eq!(due[1].ordering_key, subject_ordering_key(2));
    assert_eq!(due[0].payload["event"], "alert.created");
    assert_eq!(due[0].payload["alert"]["id"], a1.alert.id);
    assert_eq!(
        due[0].idempotency_key,
        alert_idempotency_key(a1.alert.id, 1)
    );
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
    assert_eq!(
        next[0].idempotency_key,
        alert_idempotency_key(a1.alert.id, 2)
    );
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

    let old_alert = s
        .raise_alert(
            &new_alert(1, AlertKind::LowBattery, None, now - Duration::days(400)),
            &[],
        )
        .await
        .expect("old alert");
    s.update_alert(
        old_alert.alert.id,
        &AlertUpdate::Resolve {
            by: None,
            at: now - Duration::days(399),
            code: "auto".into(),
            note: None,
        },
        "system:alerts",
        &[],
    )
    .await
    .expect("resolve");
    let open_old = s
        .raise_alert(
            &new_alert(1, AlertKind::StrapTamper, None, now - Duration::days(400)),
            &[],
        )
        .await
        .expect("open old alert");
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
            audit_deleted: 1
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
    alerts_fold_and_lifecycle,
    alert_created_at_is_server_time,
    outbox,
    audit_log,
    retention,
    victim_data_apart,
);
