//! Backend-specific guarantees: the audit log rejects UPDATE/DELETE at the database level,
//! data survives dropping and reopening a store (durability), the PostgreSQL positions layout.

use chrono::{Duration, DurationRound, Utc};
use em_model::*;
use em_store::*;

fn audit_entry() -> NewAudit {
    NewAudit {
        at: None,
        actor_id: Some(1),
        actor: "officer1".into(),
        action: "subject.view".into(),
        target_type: "subject".into(),
        target_id: Some("1".into()),
        subject_id: Some(1),
        details: serde_json::json!({}),
    }
}

fn record(device: &str, i: u64) -> StoredRecord {
    let t = Utc::now()
        .duration_trunc(Duration::seconds(1))
        .expect("trunc")
        - Duration::seconds(i as i64);
    let mut r = Record::new(device, Protocol::Em, t);
    r.seq = Some(i);
    r.battery_pct = Some(50);
    StoredRecord {
        subject_id: Some(1),
        record: r,
    }
}

#[tokio::test]
async fn sqlite_audit_is_append_only() {
    let s = SqliteStore::connect("sqlite::memory:").await.expect("open");
    let id = s.append_audit(&audit_entry()).await.expect("append");
    let upd = sqlx::query("UPDATE audit SET actor = 'mallory' WHERE id = ?")
        .bind(id)
        .execute(s.pool())
        .await;
    assert!(upd.is_err(), "UPDATE of audit must fail");
    let del = sqlx::query("DELETE FROM audit WHERE id = ?")
        .bind(id)
        .execute(s.pool())
        .await;
    assert!(del.is_err(), "DELETE of audit must fail");
    let all = s.list_audit(&AuditFilter::default()).await.expect("list");
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].actor, "officer1");
}

#[tokio::test]
async fn postgres_audit_is_append_only() {
    let Some((_, schema)) = testing::postgres_store_with_schema().await else {
        return;
    };
    let s = testing::postgres_pg_store_in_schema(&schema)
        .await
        .expect("reachable");
    let id = s.append_audit(&audit_entry()).await.expect("append");
    for sql in [
        "UPDATE audit SET actor = 'mallory' WHERE id = $1",
        "DELETE FROM audit WHERE id = $1",
    ] {
        let err = sqlx::query(sql)
            .bind(id)
            .execute(s.pool())
            .await
            .expect_err("must be rejected");
        assert!(err.to_string().contains("append-only"), "{err}");
    }
    let err = sqlx::query("TRUNCATE audit")
        .execute(s.pool())
        .await
        .expect_err("truncate rejected");
    assert!(err.to_string().contains("append-only"), "{err}");
    assert_eq!(
        s.list_audit(&AuditFilter::default())
            .await
            .expect("list")
            .len(),
        1
    );
}

/// Alerts written before `created_at` existed get `started_at` as their creation time when the
/// store is upgraded, and escalation then finds them by it.
#[tokio::test]
async fn sqlite_upgrade_backfills_alert_created_at() {
    let stamp = format!(
        "{}-{}",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    let dir = std::env::temp_dir().join(format!("em-store-upgrade-{stamp}"));
    std::fs::create_dir_all(&dir).expect("migration dir");
    let first = "0001_init.sql";
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations/sqlite")
            .join(first),
        dir.join(first),
    )
    .expect("copy the first migration");
    let path = dir.join("store.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let started = Utc::now().duration_trunc(Duration::seconds(1)).expect("t") - Duration::hours(2);
    {
        // The schema as it was before the created_at migration, with one open alert.
        let pool = sqlx::SqlitePool::connect(&url).await.expect("open");
        sqlx::migrate::Migrator::new(dir.as_path())
            .await
            .expect("old migrations")
            .run(&pool)
            .await
            .expect("old schema");
        sqlx::query(
            "INSERT INTO alerts (subject_id, kind, severity, state, zone_key, message, started_at,
                 last_seen_at, evidence)
             VALUES (1, 'strap_tamper', 3, 'open', 0, 'strap', ?, ?, '{}')",
        )
        .bind(started.timestamp_micros())
        .bind(started.timestamp_micros())
        .execute(&pool)
        .await
        .expect("legacy alert");
        pool.close().await;
    }
    let s = connect(&url).await.expect("upgrade");
    let a = s
        .get_alert(1)
        .await
        .expect("get")
        .expect("legacy alert kept");
    assert_eq!(a.started_at, started);
    assert_eq!(a.created_at, started);
    let due = s
        .unacknowledged_alerts(started + Duration::seconds(1))
        .await
        .expect("unacked");
    assert_eq!(due.iter().map(|a| a.id).collect::<Vec<_>>(), vec![1]);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sqlite_data_survives_reopen() {
    let path = std::env::temp_dir().join(format!(
        "em-store-durability-{}-{}.db",
        std::process::id(),
        Utc::now().timestamp_nanos_opt().unwrap_or(0)
    ));
    let url = format!("sqlite://{}?mode=rwc", path.display());
    {
        let s = connect(&url).await.expect("open");
        let batch: Vec<StoredRecord> = (0..100).map(|i| record("dev-d", i)).collect();
        s.insert_records(&batch).await.expect("insert");
        s.raise_alert(
            &NewAlert {
                subject_id: 1,
                device_id: None,
                kind: AlertKind::StrapTamper,
                severity: Severity::Critical,
                zone_id: None,
                message: "strap".into(),
                at: Utc::now(),
                evidence: serde_json::json!({}),
            },
            &["oms"],
        )
        .await
        .expect("alert");
        // Dropped here without any explicit close: every acknowledged write must be on disk.
    }
    let s = connect(&url).await.expect("reopen");
    assert_eq!(s.count_records("dev-d").await.expect("count"), 100);
    assert_eq!(
        s.count_outbox("oms", OutboxStatus::Pending)
            .await
            .expect("outbox"),
        1
    );
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(SqliteStore::connect(&url).await.expect("open").pool())
        .await
        .expect("pragma");
    assert_eq!(mode, "wal");
    drop(s);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

#[tokio::test]
async fn postgres_data_survives_reconnect() {
    let Some((s, schema)) = testing::postgres_store_with_schema().await else {
        return;
    };
    let batch: Vec<StoredRecord> = (0..100).map(|i| record("dev-d", i)).collect();
    s.insert_records(&batch).await.expect("insert");
    drop(s);
    let s = testing::postgres_store_in_schema(&schema)
        .await
        .expect("reachable");
    assert_eq!(s.count_records("dev-d").await.expect("count"), 100);
    // Re-running the migrations and layout step on an existing schema is a no-op.
    s.insert_records(&batch).await.expect("re-insert");
    assert_eq!(s.count_records("dev-d").await.expect("count"), 100);
}

#[tokio::test]
async fn postgres_native_partitions() {
    let Some((_, schema)) = testing::postgres_store_with_schema().await else {
        return;
    };
    let s = testing::postgres_pg_store_in_schema(&schema)
        .await
        .expect("reachable");
    let ts_available: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb')",
    )
    .fetch_one(s.pool())
    .await
    .expect("query");
    if ts_available {
        assert_eq!(s.layout(), PositionsLayout::Timescale);
        assert_eq!(s.backend(), "timescaledb");
        return;
    }
    assert_eq!(s.layout(), PositionsLayout::NativePartitions);
    assert_eq!(s.backend(), "postgres");
    let parts = |pool: sqlx::PgPool| async move {
        let v: Vec<String> = sqlx::query_scalar(
            "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'positions'::regclass ORDER BY 1",
        )
        .fetch_all(&pool)
        .await
        .expect("partitions");
        v
    };
    let before = parts(s.pool().clone()).await;
    assert!(before.contains(&"positions_default".to_string()));
    let this_month = format!("positions_p{}", Utc::now().format("%Y%m"));
    assert!(before.contains(&this_month), "{before:?}");
    assert!(before.len() >= 4, "{before:?}");

    // A record far in the past goes to the default partition; one a year ago creates its month.
    let old = Utc::now() - Duration::days(3650);
    let year_ago = Utc::now() - Duration::days(365);
    let mut a = Record::new("dev-p", Protocol::Em, old);
    a.seq = Some(1);
    let mut b = Record::new("dev-p", Protocol::Em, year_ago);
    b.seq = Some(2);
    s.insert_records(&[
        StoredRecord {
            subject_id: None,
            record: a,
        },
        StoredRecord {
            subject_id: None,
            record: b,
        },
    ])
    .await
    .expect("insert");
    let after = parts(s.pool().clone()).await;
    assert!(
        after.contains(&format!("positions_p{}", year_ago.format("%Y%m"))),
        "{after:?}"
    );
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM positions_default")
        .fetch_one(s.pool())
        .await
        .expect("count");
    assert_eq!(in_default, 1);

    // Creating a partition for a month already holding rows in the default moves them.
    let moved: bool = sqlx::query_scalar("SELECT em_create_position_partition($1)")
        .bind(old.date_naive())
        .fetch_one(s.pool())
        .await
        .expect("create");
    assert!(moved);
    let in_default: i64 = sqlx::query_scalar("SELECT count(*) FROM positions_default")
        .fetch_one(s.pool())
        .await
        .expect("count");
    assert_eq!(in_default, 0);
    assert_eq!(s.count_records("dev-p").await.expect("count"), 2);

    // Retention drops whole partitions.
    let report = s
        .apply_retention(Utc::now() - Duration::days(100), None, None)
        .await
        .expect("retention");
    assert_eq!(report.positions_deleted, 2);
    let left = parts(s.pool().clone()).await;
    assert!(!left.contains(&format!("positions_p{}", year_ago.format("%Y%m"))));
    assert!(!left.contains(&format!("positions_p{}", old.format("%Y%m"))));
}

#[tokio::test]
async fn connect_rejects_unknown_scheme() {
    assert!(matches!(
        connect("mysql://u:pw@host/db").await,
        Err(StoreError::Invalid(m)) if m.contains("u:***@host") && !m.contains("pw")
    ));
}
