//! Backend-specific guarantees: the audit log rejects UPDATE/DELETE at the database level,
//! data survives dropping and reopening a store (durability), the PostgreSQL positions layouts
//! (native partitions; TimescaleDB hypertable with compression, retention and a continuous
//! aggregate).

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
        .expect("legacy alert kept")
        .alert;
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
        let now = Utc::now();
        let alert = Alert {
            id: 0,
            subject_id: 1,
            device_id: None,
            kind: AlertKind::StrapTamper,
            severity: Severity::Critical,
            state: AlertState::Open,
            zone_id: None,
            message: "strap".into(),
            started_at: now,
            created_at: now,
            last_seen_at: now,
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
        let effects = |v: &VersionedAlert| -> em_store::Result<AlertEffects> {
            Ok(AlertEffects {
                audit: NewAudit {
                    at: None,
                    actor_id: None,
                    actor: "test".into(),
                    action: "test.raise".into(),
                    target_type: "alert".into(),
                    target_id: Some(v.alert.id.to_string()),
                    subject_id: Some(1),
                    details: serde_json::json!({}),
                },
                change: Change::Alert {
                    event: "alert.created".into(),
                    alert: v.alert.clone(),
                    version: v.version,
                },
                outbox: vec![NewOutbox {
                    channel: "oms".into(),
                    ordering_key: "subject:1".into(),
                    idempotency_key: format!("alert-{}-v1", v.alert.id),
                    payload: serde_json::json!({}),
                }],
            })
        };
        s.write_alert(
            &AlertWrite {
                expected_version: None,
                alert,
            },
            &effects,
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
    let Some((s, _)) = testing::postgres_pg_store_with_layout(LayoutRequest::Native).await else {
        return;
    };
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

async fn scalar_i64(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The TimescaleDB layout for real: hypertable, compression configured and applied, the three
/// policies registered as jobs, the continuous aggregate refreshed, writes (including re-sent
/// records) and reads on compressed chunks, retention through `drop_chunks`, a restart on a
/// schema with compressed chunks, and a dropped schema leaving the shared extension alone.
#[tokio::test]
async fn timescale_hypertable() {
    let Some((s, schema)) = testing::postgres_pg_store_with_layout(LayoutRequest::Timescale).await
    else {
        return;
    };
    assert_eq!(s.layout(), PositionsLayout::Timescale);
    assert_eq!(s.backend(), "timescaledb");
    let pool = s.pool().clone();
    let ext_schema: String = sqlx::query_scalar(
        "SELECT n.nspname::text FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
          WHERE e.extname = 'timescaledb'",
    )
    .fetch_one(&pool)
    .await
    .expect("extension");
    assert_eq!(
        ext_schema, "public",
        "the extension is per database, not per schema"
    );
    let compression: bool = sqlx::query_scalar(
        "SELECT compression_enabled FROM timescaledb_information.hypertables
          WHERE hypertable_schema = current_schema() AND hypertable_name = 'positions'",
    )
    .fetch_one(&pool)
    .await
    .expect("hypertable");
    assert!(compression);
    let jobs: Vec<String> = sqlx::query_scalar(
        "SELECT proc_name::text FROM timescaledb_information.jobs
          WHERE hypertable_schema = current_schema()
            AND hypertable_name IN ('positions', 'positions_hourly')
          ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("jobs");
    assert_eq!(
        jobs,
        vec![
            "policy_compression",
            "policy_refresh_continuous_aggregate",
            "policy_retention"
        ]
    );

    // Two hours of fixes ten days ago (its chunk is old enough to compress) and one now.
    let subject = 7;
    let old = Utc::now()
        .duration_trunc(Duration::hours(1))
        .expect("trunc")
        - Duration::days(10);
    let batch: Vec<StoredRecord> = (0..120)
        .map(|i| {
            let mut r = Record::new("dev-ts", Protocol::Em, old + Duration::minutes(i));
            r.seq = Some(i as u64);
            r.position = Some(Position {
                lat: 55.0 + i as f64 / 1000.0,
                lon: 12.0,
                accuracy_m: None,
                speed_kmh: None,
                course_deg: None,
                altitude_m: None,
                satellites: None,
                valid: true,
                source: FixSource::Gnss,
            });
            StoredRecord {
                subject_id: Some(subject),
                record: r,
            }
        })
        .collect();
    s.insert_records(&batch).await.expect("insert");
    s.insert_records(&[record("dev-ts", 0)]).await.expect("now");
    let chunks = scalar_i64(
        &pool,
        "SELECT count(*) FROM timescaledb_information.chunks
          WHERE hypertable_schema = current_schema() AND hypertable_name = 'positions'",
    )
    .await;
    assert!(chunks >= 2, "one chunk per day: {chunks}");

    // The continuous aggregate: per subject and hour, the count and the last position.
    sqlx::raw_sql("CALL refresh_continuous_aggregate('positions_hourly', NULL, NULL)")
        .execute(&pool)
        .await
        .expect("refresh");
    let hourly: Vec<(i64, f64)> = sqlx::query_as::<_, (i64, f64)>(
        "SELECT records, last_lat FROM positions_hourly WHERE subject_id = $1 AND bucket < $2
          ORDER BY bucket",
    )
    .bind(subject)
    .bind(old + Duration::days(1))
    .fetch_all(&pool)
    .await
    .expect("hourly");
    let counts: Vec<i64> = hourly.iter().map(|h| h.0).collect();
    assert_eq!(counts, vec![60, 60]);
    assert!((hourly[0].1 - 55.059).abs() < 1e-9, "{hourly:?}");
    assert!((hourly[1].1 - 55.119).abs() < 1e-9, "{hourly:?}");

    // Compress the old chunk(s) as the policy will, then write and read through them.
    let compressed = scalar_i64(
        &pool,
        "SELECT count(compress_chunk(c)) FROM show_chunks('positions', older_than => now() - INTERVAL '7 days') c",
    )
    .await;
    assert!(compressed >= 1);
    assert_eq!(
        scalar_i64(
            &pool,
            "SELECT count(*) FROM timescaledb_information.chunks
              WHERE hypertable_schema = current_schema() AND hypertable_name = 'positions'
                AND is_compressed"
        )
        .await,
        compressed
    );
    assert_eq!(s.count_records("dev-ts").await.expect("count"), 121);
    // A device re-sending old records: nothing doubled, nothing rejected.
    s.insert_records(&batch[..10])
        .await
        .expect("re-send into compressed");
    assert_eq!(s.count_records("dev-ts").await.expect("count"), 121);
    let trail = s
        .trail(subject, old, old + Duration::hours(3), 1000)
        .await
        .expect("trail");
    assert_eq!(trail.len(), 120);
    // A back-filled record into the compressed chunk.
    let mut late = Record::new("dev-ts", Protocol::Em, old + Duration::seconds(30));
    late.seq = Some(1000);
    s.insert_records(&[StoredRecord {
        subject_id: Some(subject),
        record: late,
    }])
    .await
    .expect("backfill into compressed");
    assert_eq!(s.count_records("dev-ts").await.expect("count"), 122);

    // A restart on a schema with compressed chunks re-runs the layout step without error.
    drop(s);
    let s = testing::postgres_pg_store_in_schema(&schema)
        .await
        .expect("reachable");
    assert_eq!(s.layout(), PositionsLayout::Timescale);
    assert_eq!(s.count_records("dev-ts").await.expect("count"), 122);

    // Retention through drop_chunks (and row deletes in the chunk straddling the cut-off).
    let report = s
        .apply_retention(Utc::now() - Duration::days(5), None, None)
        .await
        .expect("retention");
    assert_eq!(report.positions_deleted, 121);
    assert_eq!(s.count_records("dev-ts").await.expect("count"), 1);
    assert_eq!(
        scalar_i64(
            &pool,
            "SELECT count(*) FROM timescaledb_information.chunks
              WHERE hypertable_schema = current_schema() AND hypertable_name = 'positions'
                AND range_end < now() - INTERVAL '5 days'"
        )
        .await,
        0,
        "old chunks dropped"
    );

    // The extension is shared by every schema of the database: dropping this one keeps it.
    drop(s);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await
    .expect("drop schema");
    assert_eq!(
        scalar_i64(
            &pool,
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn connect_rejects_unknown_scheme() {
    assert!(matches!(
        connect("mysql://u:pw@host/db").await,
        Err(StoreError::Invalid(m)) if m.contains("u:***@host") && !m.contains("pw")
    ));
}
