//! Subject resolution of the registry against a REAL SQLite store: records of a device are
//! attributed to whoever wore it at the record's time — the current wearer from the cache,
//! earlier wearers (back-filled records) and "nobody" (unassigned periods) from the device's
//! assignment history — and the history is cached (one store query per device and refresh
//! period, not one per record in the pipeline worker).

mod common;

use chrono::{DateTime, Duration, Utc};
use common::register;
use em_ingest::registry::Registry;
use em_model::{BreachRules, Protocol, Subject};
use em_store::Store;

async fn subject(store: &dyn Store, name: &str) -> i64 {
    store
        .upsert_subject(&Subject {
            id: 0,
            reference: format!("CASE-{name}"),
            display_name: name.into(),
            officer_id: None,
            timezone: "Europe/London".into(),
            order_start: None,
            order_end: None,
            rules: BreachRules::default(),
        })
        .await
        .expect("subject")
}

#[tokio::test]
async fn records_go_to_the_wearer_at_their_time() {
    let store = em_store::testing::sqlite_store().await;
    let t0: DateTime<Utc> = Utc::now() - Duration::hours(10);
    let (t1, t2) = (t0 + Duration::hours(2), t0 + Duration::hours(4));
    let (a, b) = (subject(&*store, "a").await, subject(&*store, "b").await);
    register(&*store, "tag-1", Protocol::Teltonika, None).await;
    register(&*store, "tag-free", Protocol::Teltonika, None).await;
    // tag-1: worn by A from t0 to t1, nobody from t1 to t2, B from t2 on.
    store.assign_device("tag-1", a, t0).await.unwrap();
    store.unassign_device("tag-1", t1).await.unwrap();
    store.assign_device("tag-1", b, t2).await.unwrap();
    let reg = Registry::load(store.clone()).await.unwrap();

    let at = |h: i64| t0 + Duration::minutes(h * 30);
    assert_eq!(
        reg.subject_for("tag-1", at(9)).await.unwrap(),
        Some(b),
        "current wearer"
    );
    assert_eq!(
        reg.subject_for("tag-1", at(1)).await.unwrap(),
        Some(a),
        "back-filled record"
    );
    assert_eq!(
        reg.subject_for("tag-1", at(5)).await.unwrap(),
        None,
        "unassigned period"
    );
    assert_eq!(
        reg.subject_for("tag-1", at(-1)).await.unwrap(),
        None,
        "before any wearer"
    );
    assert_eq!(
        reg.subject_for("tag-free", at(3)).await.unwrap(),
        None,
        "never assigned"
    );
    // Same answers as the store's own rule.
    for h in -1..12 {
        assert_eq!(
            reg.subject_for("tag-1", at(h)).await.unwrap(),
            store.subject_for_device_at("tag-1", at(h)).await.unwrap(),
            "hour {h}"
        );
    }
}

#[tokio::test]
async fn an_unassigned_device_is_answered_from_the_cache_until_a_refresh() {
    let store = em_store::testing::sqlite_store().await;
    register(&*store, "quiet", Protocol::Gt06, None).await;
    let reg = Registry::load(store.clone()).await.unwrap();
    let start = Utc::now() - Duration::minutes(5);
    assert_eq!(reg.subject_for("quiet", Utc::now()).await.unwrap(), None);
    // Assigned behind the registry's back (no refresh, no change notice): the records that
    // follow are answered from the cached history, without a store query each...
    let s = subject(&*store, "late").await;
    store.assign_device("quiet", s, start).await.unwrap();
    for i in 0..100 {
        let at = Utc::now() - Duration::seconds(i);
        assert_eq!(reg.subject_for("quiet", at).await.unwrap(), None);
    }
    // ... until the registry refreshes (every `registry_refresh_secs`, or at once on a change
    // made through the dashboard).
    reg.refresh().await.unwrap();
    assert_eq!(reg.subject_for("quiet", Utc::now()).await.unwrap(), Some(s));
}
