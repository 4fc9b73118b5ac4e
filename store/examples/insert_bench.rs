//! Batched insert throughput into PostgreSQL (or SQLite).
//!
//! `cargo run -p em-store --example insert_bench [-- TOTAL BATCH WRITERS]`
//! (defaults 200000 1000 1). Uses `DATABASE_URL` (default postgres://postgres@127.0.0.1:5432/test)
//! in a fresh schema that is dropped afterwards; `BENCH_URL=sqlite://…` measures SQLite instead.

use std::sync::Arc;
use std::time::Instant;

use chrono::{Duration, Utc};
use em_model::*;
use em_store::{testing, Store, StoredRecord};

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|s| s.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

fn batch(writer: usize, n: usize, size: usize) -> Vec<StoredRecord> {
    let base = Utc::now() - Duration::days(2);
    (0..size)
        .map(|i| {
            let k = n * size + i;
            let device = 1000 * writer + k % 1000;
            let mut r = Record::new(
                format!("35630704{device:07}"),
                Protocol::Teltonika,
                base + Duration::milliseconds((k / 1000) as i64 * 10_000),
            );
            r.seq = Some(k as u64);
            r.battery_pct = Some(80);
            r.gsm_signal = Some(60);
            r.position = Some(Position {
                lat: 55.6 + (k % 97) as f64 * 1e-4,
                lon: 12.5 + (k % 89) as f64 * 1e-4,
                accuracy_m: Some(8.0),
                speed_kmh: Some(4.0),
                course_deg: Some(180.0),
                altitude_m: Some(12.0),
                satellites: Some(10),
                valid: true,
                source: FixSource::Gnss,
            });
            StoredRecord {
                subject_id: Some(device as i64),
                record: r,
            }
        })
        .collect()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total = arg(1, 200_000);
    let size = arg(2, 1_000);
    let writers = arg(3, 1);
    let (store, schema): (Arc<dyn Store>, Option<String>) = match std::env::var("BENCH_URL") {
        Ok(url) => (em_store::connect(&url).await?, None),
        Err(_) => match testing::postgres_store_with_schema().await {
            Some((s, schema)) => (s, Some(schema)),
            None => return Err("PostgreSQL not reachable".into()),
        },
    };
    let batches = total / size / writers;
    println!(
        "backend {}: {writers} writer(s) × {batches} batches × {size} records",
        store.backend()
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for n in 0..batches {
                store.insert_records(&batch(w, n, size)).await?;
            }
            Ok::<_, em_store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let written = batches * writers * size;
    println!(
        "{written} records in {secs:.2} s = {:.0} records/s",
        written as f64 / secs
    );
    if let Some(schema) = schema {
        drop(store);
        let pool = sqlx::PgPool::connect(&testing::database_url()).await?;
        sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(&pool)
            .await?;
    }
    Ok(())
}
