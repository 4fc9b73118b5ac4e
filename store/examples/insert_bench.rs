//! Batched insert throughput into PostgreSQL (or SQLite).
//!
//! ```text
//! cargo run --release -p em-store --example insert_bench -- [TOTAL BATCH WRITERS] \
//!     [--mode fast|baseline|both] [--rounds N] [--dup-pct P] [--devices D]
//! ```
//!
//! Defaults: 200000 records, batches of 1000, 1 writer, `--mode fast`, 1 round, no duplicates,
//! 1000 devices per writer.
//! Every run writes into a fresh PostgreSQL schema (dropped afterwards) at `DATABASE_URL`
//! (default postgres://postgres@127.0.0.1:5432/test), so runs do not see each other's data.
//!
//! * `fast` — [`Store::insert_records`] (plain insert, typed columns; see `em_store::postgres::fixes`).
//! * `baseline` — [`PgStore::insert_records_baseline`], the write path before issue #4.
//! * `both` — baseline then fast, `--rounds` times, in the same process (same machine state).
//!
//! Each writer owns D devices (one subject each) and writes them in turn, one fix per device
//! every 10 s of device time, as the ingest pipeline's shards do: a batch of B records holds
//! B / D fixes per device (so `latest_state` gets min(B, D) rows per batch). `--dup-pct P` makes P % of every batch after the
//! first re-sends of the writer's previous batch (devices re-sending un-ACKed records).
//! `BENCH_URL=sqlite://…` measures SQLite through [`Store::insert_records`] instead.

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, Utc};
use em_model::*;
use em_store::{testing, PgStore, Store, StoredRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Fast,
    Baseline,
}

struct Args {
    total: usize,
    size: usize,
    writers: usize,
    modes: Vec<Mode>,
    rounds: usize,
    dup_pct: usize,
    devices: usize,
}

impl Args {
    fn shape(&self) -> Shape {
        Shape {
            size: self.size,
            dup_pct: self.dup_pct,
            devices: self.devices,
        }
    }
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let mut modes = vec![Mode::Fast];
    let mut rounds = 1;
    let mut dup_pct = 0;
    let mut devices = 1000;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--mode" => {
                modes = match it.next().as_deref() {
                    Some("fast") => vec![Mode::Fast],
                    Some("baseline") => vec![Mode::Baseline],
                    Some("both") => vec![Mode::Baseline, Mode::Fast],
                    other => return Err(format!("--mode fast|baseline|both, not {other:?}")),
                }
            }
            "--rounds" => rounds = number(it.next(), "--rounds")?,
            "--dup-pct" => dup_pct = number(it.next(), "--dup-pct")?.min(100),
            "--devices" => devices = number(it.next(), "--devices")?.max(1),
            _ => positional.push(number(Some(a), "TOTAL BATCH WRITERS")?),
        }
    }
    let pos = |i: usize, d: usize| positional.get(i).copied().filter(|&v| v > 0).unwrap_or(d);
    Ok(Args {
        total: pos(0, 200_000),
        size: pos(1, 1_000),
        writers: pos(2, 1),
        modes,
        rounds: rounds.max(1),
        dup_pct,
        devices,
    })
}

fn number(s: Option<String>, what: &str) -> Result<usize, String> {
    s.as_deref()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{what}: expected a number, got {s:?}"))
}

/// Record `k` of a writer: device `k % devices` of the writer, one fix per device every 10 s.
fn record(base: DateTime<Utc>, writer: usize, devices: usize, k: usize) -> StoredRecord {
    let device = devices * writer + k % devices;
    let mut r = Record::new(
        format!("35630704{device:07}"),
        Protocol::Teltonika,
        base + Duration::milliseconds((k / devices) as i64 * 10_000),
    );
    r.received_time = r.device_time + Duration::milliseconds(300);
    r.seq = Some(k as u64);
    r.battery_pct = Some(80 - (k % 50) as u8);
    r.gsm_signal = Some(40 + (k % 60) as u8);
    if k % 500 == 250 {
        r.events.push(DeviceEventKind::ChargerConnected);
    }
    r.position = Some(Position {
        lat: 55.6 + (k % 97) as f64 * 1.3e-4,
        lon: 12.5 + (k % 89) as f64 * 1.7e-4,
        accuracy_m: Some(4.0 + (k % 13) as f32),
        speed_kmh: Some((k % 7) as f32 * 1.5),
        course_deg: Some((k * 37 % 3600) as f32 / 10.0),
        altitude_m: Some(10.0 + (k % 31) as f32 * 0.5),
        satellites: Some(6 + (k % 8) as u8),
        valid: true,
        source: FixSource::Gnss,
    });
    StoredRecord {
        subject_id: Some(device as i64),
        record: r,
    }
}

/// What every batch looks like.
#[derive(Debug, Clone, Copy)]
struct Shape {
    size: usize,
    dup_pct: usize,
    devices: usize,
}

/// Batch `n` of a writer; with `dup_pct`, its first records are the previous batch's again.
fn batch(base: DateTime<Utc>, writer: usize, n: usize, shape: Shape) -> Vec<StoredRecord> {
    let Shape {
        size,
        dup_pct,
        devices,
    } = shape;
    let dups = if n == 0 { 0 } else { size * dup_pct / 100 };
    let resent = (0..dups).map(|i| record(base, writer, devices, (n - 1) * size + i));
    let fresh = (dups..size).map(|i| record(base, writer, devices, n * size + i));
    resent.chain(fresh).collect()
}

async fn run(args: &Args, mode: Mode) -> Result<f64, Box<dyn std::error::Error>> {
    let schema = testing::unique_schema_name();
    let Some(store) = testing::postgres_pg_store_in_schema(&schema).await else {
        return Err("PostgreSQL not reachable".into());
    };
    let store = Arc::new(store);
    let batches = args.total / args.size / args.writers;
    let base = Utc::now() - Duration::days(2);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let store = store.clone();
        let shape = args.shape();
        tasks.push(tokio::spawn(async move {
            for n in 0..batches {
                let b = batch(base, w, n, shape);
                match mode {
                    Mode::Fast => store.insert_records(&b).await?,
                    Mode::Baseline => store.insert_records_baseline(&b).await?,
                }
            }
            Ok::<_, em_store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let written = batches * args.writers * args.size;
    let rate = written as f64 / secs;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM positions")
        .fetch_one(store.pool())
        .await?;
    println!(
        "{:<8} writers {} batch {:>5} devices/writer {:>5} dup {:>2}%: {written} records in {secs:.2} s = {rate:>7.0} records/s ({stored} rows stored)",
        format!("{mode:?}").to_lowercase(),
        args.writers,
        args.size,
        args.devices,
        args.dup_pct,
    );
    drop_schema(store, &schema).await?;
    Ok(rate)
}

async fn drop_schema(store: Arc<PgStore>, schema: &str) -> Result<(), Box<dyn std::error::Error>> {
    let pool = store.pool().clone();
    drop(store);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}

async fn run_other(url: &str, args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let store = em_store::connect(url).await?;
    let batches = args.total / args.size / args.writers;
    let base = Utc::now() - Duration::days(2);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let store = store.clone();
        let shape = args.shape();
        tasks.push(tokio::spawn(async move {
            for n in 0..batches {
                store.insert_records(&batch(base, w, n, shape)).await?;
            }
            Ok::<_, em_store::StoreError>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = start.elapsed().as_secs_f64();
    let written = batches * args.writers * args.size;
    println!(
        "{}: {written} records in {secs:.2} s = {:.0} records/s",
        store.backend(),
        written as f64 / secs
    );
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    if let Ok(url) = std::env::var("BENCH_URL") {
        return run_other(&url, &args).await;
    }
    for _ in 0..args.rounds {
        for &mode in &args.modes {
            run(&args, mode).await?;
        }
    }
    Ok(())
}
