//! Alert lifecycle, folding, automatic resolution, escalation and audit — against real stores
//! (SQLite, and PostgreSQL when reachable).

mod common;

use std::sync::Arc;
use std::time::Duration;

use chrono::{SubsecRound, Utc};
use em_alerts::*;
use em_model::*;
use em_store::{OutboxStatus, Store};
use serde_json::json;

use common::*;

async fn drain(rx: &mut NoticeLog) -> Vec<(String, AlertId)> {
    rx.drain()
        .await
        .into_iter()
        .map(|n| (n.event, n.alert.id))
        .collect()
}

fn oms_config() -> AlertConfig {
    let mut cfg = AlertConfig::default();
    cfg.oms.enabled = true;
    cfg.oms.url = Some("http://127.0.0.1:9/unused".into());
    cfg.oms.secret = Some("test-secret-0123456789".into());
    cfg
}

async fn lifecycle_on(name: &str, store: Arc<dyn Store>) {
    let f = fixture(&store).await;
    let service = AlertService::new(store.clone(), oms_config()).unwrap();
    let mut rx = NoticeLog::at(service.store()).await;

    // Started: one new alert with a plain-words message in the subject's time zone.
    let started = minutes_ago(3);
    let signal = Signal::new(
        AlertKind::CurfewViolation,
        Phase::Started,
        f.subject,
        started,
    )
    .with_device("359881234567890")
    .with_zone(f.home)
    .with_evidence(json!({"distance_m": 240.0, "window": "19:00–07:00"}));
    let a = service.handle(signal.clone()).await.unwrap().unwrap();
    assert_eq!(a.state, AlertState::Open, "{name}");
    assert_eq!(a.severity, Severity::High);
    assert_eq!(a.occurrences, 1);
    let local = started
        .with_timezone(&chrono_tz::Europe::Copenhagen)
        .format("%H:%M")
        .to_string();
    assert_eq!(
        a.message,
        format!(
            "Left home during curfew (Home, curfew 19:00–07:00). Last position 240 m outside the zone at {local}."
        ),
        "{name}"
    );

    // Repeats fold into the same alert, and do not add OMS messages.
    for i in 0..5 {
        let mut s = signal.clone();
        s.phase = Phase::Ongoing;
        s.at = started + chrono::Duration::seconds(30 * (i + 1));
        let r = service.handle(s).await.unwrap().unwrap();
        assert_eq!(r.id, a.id, "{name}: repeat opened a new alert");
    }
    let folded = store.get_alert(a.id).await.unwrap().unwrap().alert;
    assert_eq!(folded.occurrences, 6, "{name}");
    assert_eq!(
        folded.last_seen_at,
        (started + chrono::Duration::seconds(150)).trunc_subsecs(6)
    );
    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::Pending)
            .await
            .unwrap(),
        1,
        "{name}: repeats must not flood the OMS"
    );
    let notices = drain(&mut rx).await;
    assert_eq!(notices.first(), Some(&(events::CREATED.to_string(), a.id)));
    assert_eq!(notices.len(), 6);
    assert!(notices[1..].iter().all(|(e, _)| e == events::UPDATED));

    // Acknowledge: by whom and when; twice is a typed error.
    let acked = service.acknowledge(a.id, &f.officer).await.unwrap();
    assert_eq!(acked.state, AlertState::Acknowledged);
    assert_eq!(acked.acknowledged_by, Some(f.officer.id));
    assert!(acked.acknowledged_at.is_some());
    let again = service.acknowledge(a.id, &f.officer).await;
    assert!(
        matches!(again, Err(AlertError::InvalidTransition { id, .. }) if id == a.id),
        "{name}: {again:?}"
    );
    assert!(matches!(
        service.acknowledge(987_654, &f.officer).await,
        Err(AlertError::NotFound(987_654))
    ));

    // Resolve: only configured codes; note kept.
    let bad = service
        .resolve(a.id, &f.officer, "made_up", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&bad, AlertError::UnknownResolutionCode { code, allowed } if code == "made_up" && allowed.contains("false_alarm")),
        "{bad}"
    );
    let long_note = "x".repeat(5000);
    assert!(matches!(
        service
            .resolve(a.id, &f.officer, "subject_contacted", Some(long_note))
            .await,
        Err(AlertError::Invalid(_))
    ));
    let mut inactive = f.supervisor.clone();
    inactive.active = false;
    assert!(matches!(
        service.resolve(a.id, &inactive, "other", None).await,
        Err(AlertError::InactiveUser(_))
    ));
    // While the subject is still out, resolving would silence the condition: refused.
    let live = service
        .resolve(a.id, &f.supervisor, "subject_contacted", None)
        .await
        .unwrap_err();
    assert!(
        matches!(&live, AlertError::InvalidTransition { reason, .. } if reason.contains("still ongoing")),
        "{name}: {live}"
    );
    // The subject comes home: the end is recorded (curfew alerts are not auto-resolved) ...
    let mut back = signal.clone();
    back.phase = Phase::Ended;
    back.at = started + chrono::Duration::seconds(160);
    let ended = service.handle(back).await.unwrap().unwrap();
    assert_eq!(ended.state, AlertState::Acknowledged, "{name}");
    // ... and now a person closes it.
    let resolved = service
        .resolve(
            a.id,
            &f.supervisor,
            "subject_contacted",
            Some("  Phoned subject; back home at 23:40.  ".into()),
        )
        .await
        .unwrap();
    assert_eq!(resolved.state, AlertState::Resolved);
    assert_eq!(resolved.resolved_by, Some(f.supervisor.id));
    assert_eq!(
        resolved.resolution_code.as_deref(),
        Some("subject_contacted")
    );
    assert_eq!(
        resolved.resolution_note.as_deref(),
        Some("Phoned subject; back home at 23:40.")
    );
    assert!(matches!(
        service.acknowledge(a.id, &f.officer).await,
        Err(AlertError::InvalidTransition { .. })
    ));
    let notices = drain(&mut rx).await;
    assert_eq!(
        notices,
        vec![
            (events::ACKNOWLEDGED.to_string(), a.id),
            (events::UPDATED.to_string(), a.id),
            (events::RESOLVED.to_string(), a.id)
        ]
    );

    // The audit tells the whole story with meaningful actors.
    let audit = audit_of(&store, a.id).await;
    assert_eq!(
        audit.first(),
        Some(&("system:alerts".to_string(), "alert.create".to_string())),
        "{name}: {audit:?}"
    );
    assert!(audit.contains(&("officer.jensen".into(), "alert.acknowledge".into())));
    assert!(audit.contains(&("supervisor.berg".into(), "alert.resolve".into())));

    // created + acknowledged + condition ended + resolved = 4 OMS messages.
    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::Pending)
            .await
            .unwrap(),
        4
    );

    // The same condition after resolution is a new alert.
    let b = service.handle(signal).await.unwrap().unwrap();
    assert_ne!(b.id, a.id);
    assert_eq!(b.occurrences, 1);
}

#[tokio::test]
async fn lifecycle_raise_fold_acknowledge_resolve() {
    for (name, store) in stores().await {
        lifecycle_on(name, store).await;
    }
}

async fn auto_resolution_on(name: &str, store: Arc<dyn Store>) {
    let f = fixture(&store).await;
    let service = AlertService::new(store.clone(), AlertConfig::default()).unwrap();
    let mut rx = NoticeLog::at(service.store()).await;

    // Low battery resolves itself when the condition ends; the history is kept.
    let t0 = minutes_ago(30);
    let low = Signal::new(AlertKind::LowBattery, Phase::Started, f.subject, t0)
        .with_device("dev-1")
        .with_evidence(json!({"battery_pct": 9}));
    let a = service.handle(low.clone()).await.unwrap().unwrap();
    assert!(a.message.contains("(9 %)"), "{}", a.message);
    let end_at = minutes_ago(5);
    let mut end = low.clone();
    end.phase = Phase::Ended;
    end.at = end_at;
    let r = service.handle(end.clone()).await.unwrap().unwrap();
    assert_eq!(r.id, a.id);
    assert_eq!(r.state, AlertState::Resolved, "{name}");
    assert_eq!(r.ended_at, Some(end_at.trunc_subsecs(6)));
    assert_eq!(r.resolved_by, None);
    assert_eq!(r.resolution_code.as_deref(), Some("condition_ended"));
    assert!(r
        .resolution_note
        .as_deref()
        .is_some_and(|n| n.contains("resolved automatically")));
    let audit = audit_of(&store, a.id).await;
    assert_eq!(
        audit,
        vec![
            ("system:alerts".into(), "alert.create".into()),
            ("system:alerts".into(), "alert.condition_ended".into()),
            ("system:alerts".into(), "alert.resolve".into()),
        ],
        "{name}"
    );
    // An end without an ongoing alert is nothing.
    assert!(service.handle(end).await.unwrap().is_none());
    assert_eq!(
        drain(&mut rx).await,
        vec![
            (events::CREATED.to_string(), a.id),
            (events::UPDATED.to_string(), a.id),
            (events::RESOLVED.to_string(), a.id),
        ]
    );

    // Tamper needs a human: the end is recorded, the alert stays open.
    let tamper = Signal::new(AlertKind::StrapTamper, Phase::Started, f.subject, t0);
    let t = service.handle(tamper.clone()).await.unwrap().unwrap();
    assert_eq!(t.severity, Severity::Critical);
    let mut restored = tamper.clone();
    restored.phase = Phase::Ended;
    restored.at = end_at;
    let t2 = service.handle(restored.clone()).await.unwrap().unwrap();
    assert_eq!(t2.state, AlertState::Open, "{name}");
    assert_eq!(t2.ended_at, Some(end_at.trunc_subsecs(6)));
    // A repeated end changes nothing (no second audit record).
    service.handle(restored).await.unwrap().unwrap();
    let audit = audit_of(&store, t.id).await;
    assert_eq!(audit.len(), 2, "{name}: {audit:?}");
    // No OMS configured: no outbox rows at all.
    assert_eq!(
        store
            .count_outbox("oms", OutboxStatus::Pending)
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn condition_end_is_recorded_and_auto_resolves_per_kind() {
    for (name, store) in stores().await {
        auto_resolution_on(name, store).await;
    }
}

async fn escalation_on(name: &str, store: Arc<dyn Store>) {
    let f = fixture(&store).await;
    let cfg: AlertConfig = toml::from_str(
        r#"
        [escalation]
        critical_secs = 300
        high_secs = 900
        [kinds.gps_jamming_suspected]
        escalate_after_secs = 60
        [kinds.lost_communication]
        escalate = false
        "#,
    )
    .unwrap();
    let service = Arc::new(AlertService::new(store.clone(), cfg).unwrap());
    let raise = |kind, at| {
        let service = service.clone();
        async move {
            service
                .handle(Signal::new(kind, Phase::Started, f.subject, at))
                .await
                .unwrap()
                .unwrap()
        }
    };
    // Times count from the raise (created_at), whatever the device time of the evidence.
    let tamper = raise(AlertKind::StrapTamper, minutes_ago(10)).await; // critical, 6 min > 5
    let curfew = raise(AlertKind::CurfewViolation, minutes_ago(10)).await; // high, 6 min < 15
    let jam = raise(AlertKind::GpsJammingSuspected, minutes_ago(2)).await; // override 60 s
    let battery = raise(AlertKind::LowBattery, minutes_ago(60 * 24 * 3)).await; // low: never
    let silent = raise(AlertKind::LostCommunication, minutes_ago(120)).await; // disabled
    let acked = raise(AlertKind::CaseTamper, minutes_ago(120)).await; // high, but acknowledged
    service.acknowledge(acked.id, &f.officer).await.unwrap();

    let mut rx = NoticeLog::at(service.store()).await;
    // Nothing is due right after the raise, although every condition started long ago.
    assert!(
        service.escalate_due(Utc::now()).await.unwrap().is_empty(),
        "{name}"
    );
    let now = Utc::now() + chrono::Duration::minutes(6);
    let mut got: Vec<AlertId> = service
        .escalate_due(now)
        .await
        .unwrap()
        .iter()
        .map(|a| a.id)
        .collect();
    got.sort();
    let mut want = vec![tamper.id, jam.id];
    want.sort();
    assert_eq!(got, want, "{name}");
    for id in [tamper.id, jam.id] {
        let a = store.get_alert(id).await.unwrap().unwrap().alert;
        assert!(a.escalated);
        assert_eq!(a.state, AlertState::Open);
        assert!(audit_of(&store, id)
            .await
            .contains(&("system:alerts".into(), "alert.escalate".into())));
    }
    for id in [curfew.id, battery.id, silent.id, acked.id] {
        assert!(
            !store.get_alert(id).await.unwrap().unwrap().alert.escalated,
            "{name}: {id}"
        );
    }
    let notices = drain(&mut rx).await;
    assert_eq!(notices.len(), 2);
    assert!(notices.iter().all(|(e, _)| e == events::ESCALATED));
    // Escalation happens once.
    assert!(service.escalate_due(now).await.unwrap().is_empty());
    // 20 minutes later (26 after the raise) the high curfew alert is due too.
    let later = now + chrono::Duration::minutes(20);
    let got: Vec<AlertId> = service
        .escalate_due(later)
        .await
        .unwrap()
        .iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(got, vec![curfew.id], "{name}");
    // An escalated alert can still be acknowledged.
    let a = service.acknowledge(tamper.id, &f.supervisor).await.unwrap();
    assert!(a.escalated && a.state == AlertState::Acknowledged);
}

#[tokio::test]
async fn unacknowledged_alerts_escalate_by_configured_times() {
    for (name, store) in stores().await {
        escalation_on(name, store).await;
    }
}

/// A tag that was offline uploads its backlog: the alert's evidence is two hours old, but no
/// officer has had the alert yet. It is escalated only once its time has passed since the raise.
async fn late_data_escalation_on(name: &str, store: Arc<dyn Store>) {
    let f = fixture(&store).await;
    let service = AlertService::new(store.clone(), AlertConfig::default()).unwrap();
    let limit = service
        .escalate_after(AlertKind::StrapTamper, Severity::Critical)
        .expect("critical alerts escalate by default");
    let limit = chrono::Duration::from_std(limit).unwrap();
    let started = minutes_ago(120);
    let before_raise = Utc::now();
    let a = service
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Started,
            f.subject,
            started,
        ))
        .await
        .unwrap()
        .unwrap();
    let after_raise = Utc::now();
    assert_eq!(a.severity, Severity::Critical, "{name}");
    assert_eq!(a.started_at, started.trunc_subsecs(6), "{name}");
    assert!(
        a.created_at >= before_raise.trunc_subsecs(6) && a.created_at <= after_raise,
        "{name}: created_at {} is not the time of the raise",
        a.created_at
    );
    // started_at + limit is long past, but the alert was just raised: not due.
    assert!(
        service.escalate_due(Utc::now()).await.unwrap().is_empty(),
        "{name}: escalated from the device time of buffered evidence"
    );
    // Just before created_at + limit: still not due.
    let almost = a.created_at + limit - chrono::Duration::seconds(1);
    assert!(
        service.escalate_due(almost).await.unwrap().is_empty(),
        "{name}"
    );
    assert!(
        !store
            .get_alert(a.id)
            .await
            .unwrap()
            .unwrap()
            .alert
            .escalated
    );
    // Once created_at + limit has passed it is escalated.
    let due = a.created_at + limit + chrono::Duration::seconds(1);
    let got: Vec<AlertId> = service
        .escalate_due(due)
        .await
        .unwrap()
        .iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(got, vec![a.id], "{name}");
    let stored = store.get_alert(a.id).await.unwrap().unwrap().alert;
    assert!(stored.escalated, "{name}");
    assert_eq!(stored.created_at, a.created_at, "{name}");
}

#[tokio::test]
async fn late_buffered_data_escalates_from_the_raise_not_the_device_time() {
    for (name, store) in stores().await {
        late_data_escalation_on(name, store).await;
    }
}

#[tokio::test]
async fn escalation_task_runs_and_stops() {
    let store = em_store::testing::sqlite_store().await;
    let f = fixture(&store).await;
    let cfg: AlertConfig =
        toml::from_str("[kinds.victim_proximity]\nescalate_after_secs = 1").unwrap();
    let service = Arc::new(AlertService::new(store.clone(), cfg).unwrap());
    let a = service
        .handle(Signal::new(
            AlertKind::VictimProximity,
            Phase::Started,
            f.subject,
            minutes_ago(30),
        ))
        .await
        .unwrap()
        .unwrap();
    let mut rx = NoticeLog::at(service.store()).await;
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(run_escalation(
        service.clone(),
        Duration::from_millis(20),
        token.clone(),
    ));
    let notice = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("escalation notice within 10 s")
        .unwrap();
    assert_eq!(notice.event, events::ESCALATED);
    assert_eq!(notice.alert.id, a.id);
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("escalation task stops on shutdown")
        .unwrap();
}

#[tokio::test]
async fn disabled_kinds_unknown_subjects_and_oversized_evidence() {
    let store = em_store::testing::sqlite_store().await;
    let f = fixture(&store).await;
    let cfg: AlertConfig = toml::from_str("[kinds.device_clock_wrong]\nenabled = false").unwrap();
    let service = AlertService::new(store.clone(), cfg).unwrap();
    let now = Utc::now();
    assert!(service
        .handle(Signal::new(
            AlertKind::DeviceClockWrong,
            Phase::Started,
            f.subject,
            now
        ))
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        service
            .handle(Signal::new(
                AlertKind::StrapTamper,
                Phase::Started,
                424_242,
                now
            ))
            .await,
        Err(AlertError::UnknownSubject(424_242))
    ));
    let big = json!({"blob": "x".repeat(70 * 1024)});
    assert!(matches!(
        service
            .handle(
                Signal::new(AlertKind::StrapTamper, Phase::Started, f.subject, now)
                    .with_evidence(big)
            )
            .await,
        Err(AlertError::Invalid(_))
    ));
    // Bad configuration is refused at construction.
    let mut bad = AlertConfig::default();
    bad.escalation.high_secs = Some(0);
    assert!(AlertService::new(store, bad).is_err());
}

/// Finding: resolving an alert whose condition was still true silenced it. Now a live
/// condition cannot be resolved (tamper, exclusion, curfew), and a condition that comes back
/// after its end is live again.
async fn resolve_while_ongoing_on(name: &str, store: Arc<dyn Store>) {
    let f = fixture(&store).await;
    let exclusion = store
        .upsert_zone(&ZoneSpec {
            id: 0,
            subject_id: Some(f.subject),
            group: None,
            name: "Victim's street".into(),
            kind: ZoneKind::Exclusion,
            geometry: ZoneGeometry::Circle {
                center: [12.6, 55.7],
                radius_m: 150.0,
            },
            schedule: None,
            is_curfew_home: false,
        })
        .await
        .unwrap();
    let service = AlertService::new(store.clone(), AlertConfig::default()).unwrap();
    let cases = [
        (AlertKind::StrapTamper, None, "strap is still reported open"),
        (
            AlertKind::ExclusionZoneEntry,
            Some(exclusion),
            "still inside the exclusion zone",
        ),
        (
            AlertKind::CurfewViolation,
            Some(f.home),
            "still away from the curfew address",
        ),
    ];
    for (kind, zone, words) in cases {
        let t0 = minutes_ago(20);
        let mut start =
            Signal::new(kind, Phase::Started, f.subject, t0).with_device("359881234567890");
        if let Some(z) = zone {
            start = start.with_zone(z);
        }
        let a = service.handle(start.clone()).await.unwrap().unwrap();
        let err = service
            .resolve(a.id, &f.officer, "false_alarm", None)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, AlertError::InvalidTransition { reason, .. } if reason.contains(words)),
            "{name} {kind:?}: {err}"
        );
        assert_eq!(
            store.get_alert(a.id).await.unwrap().unwrap().alert.state,
            AlertState::Open,
            "{name} {kind:?}: a refused resolution changes nothing"
        );
        // Acknowledging is how an officer takes a live alert.
        service.acknowledge(a.id, &f.officer).await.unwrap();
        // The condition ends ...
        let mut end = start.clone();
        end.phase = Phase::Ended;
        end.at = t0 + chrono::Duration::seconds(300);
        service.handle(end).await.unwrap();
        // ... and comes back before anyone closed the alert: live again, refused again.
        let mut again = start.clone();
        again.phase = Phase::Started;
        again.at = t0 + chrono::Duration::seconds(600);
        let folded = service.handle(again).await.unwrap().unwrap();
        assert_eq!(folded.id, a.id, "{name} {kind:?}");
        assert!(condition_ongoing(&folded), "{name} {kind:?}");
        assert!(
            service
                .resolve(a.id, &f.officer, "false_alarm", None)
                .await
                .is_err(),
            "{name} {kind:?}: resumed condition resolved"
        );
        // It ends for good: now it can be resolved.
        let mut end = start.clone();
        end.phase = Phase::Ended;
        end.at = t0 + chrono::Duration::seconds(900);
        service.handle(end).await.unwrap();
        let done = service
            .resolve(a.id, &f.officer, "subject_contacted", None)
            .await
            .unwrap();
        assert_eq!(done.state, AlertState::Resolved, "{name} {kind:?}");
    }
}

#[tokio::test]
async fn a_live_condition_cannot_be_resolved_into_silence() {
    for (name, store) in stores().await {
        resolve_while_ongoing_on(name, store).await;
    }
}

/// A signal dated in the future (a device clock years ahead) neither dates the alert in the
/// future nor ends one; escalation still counts from the server's raise.
async fn future_signal_on(name: &str, store: Arc<dyn Store>) {
    let f = fixture(&store).await;
    let service = AlertService::new(store.clone(), AlertConfig::default()).unwrap();
    let year_2099 = chrono::TimeZone::with_ymd_and_hms(&Utc, 2099, 1, 1, 0, 0, 0).unwrap();
    let before = Utc::now();
    let a = service
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Started,
            f.subject,
            year_2099,
        ))
        .await
        .unwrap()
        .unwrap();
    assert!(
        a.started_at >= before.trunc_subsecs(6) && a.started_at <= Utc::now(),
        "{name}: started_at {} must be the server's time",
        a.started_at
    );
    // An end claimed for 2099 is not an end.
    let ended = service
        .handle(Signal::new(
            AlertKind::StrapTamper,
            Phase::Ended,
            f.subject,
            year_2099,
        ))
        .await
        .unwrap();
    assert!(ended.is_none(), "{name}");
    let stored = store.get_alert(a.id).await.unwrap().unwrap().alert;
    assert_eq!(stored.ended_at, None, "{name}");
    assert_eq!(stored.state, AlertState::Open, "{name}");
    // Escalation counts from the raise.
    let limit = chrono::Duration::from_std(
        service
            .escalate_after(AlertKind::StrapTamper, Severity::Critical)
            .unwrap(),
    )
    .unwrap();
    assert!(
        service.escalate_due(Utc::now()).await.unwrap().is_empty(),
        "{name}"
    );
    let due = stored.created_at + limit + chrono::Duration::seconds(1);
    let got: Vec<AlertId> = service
        .escalate_due(due)
        .await
        .unwrap()
        .iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(got, vec![a.id], "{name}");
}

#[tokio::test]
async fn future_dated_signals_neither_date_nor_end_an_alert() {
    for (name, store) in stores().await {
        future_signal_on(name, store).await;
    }
}
