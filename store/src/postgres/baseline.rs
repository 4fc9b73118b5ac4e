//! The write path of fix batches before issue #4, kept unchanged as the comparison baseline of
//! `examples/insert_bench.rs` (`--mode baseline`) and as a second writer in the format
//! compatibility test: every row goes through `INSERT … ON CONFLICT DO NOTHING`, the hot
//! non-column fields travel as one JSON text per row (`extra`, `position_extra`) that the server
//! parses into `jsonb`. [`super::PgStore`] reads rows written by either path.

use crate::common::*;
use crate::*;

use super::PgStore;

const RECORDS_INSERT: &str = "
INSERT INTO positions (device_id, device_time, seq, received_time, subject_id, protocol, lat, lon,
    accuracy_m, speed_kmh, valid, battery_pct, charging, beacon_in_range, extra)
SELECT d, t, s, rt, sub, p, la, lo, acc, spd, v, bat, chg, bcn, ex::jsonb
FROM UNNEST($1::text[], $2::timestamptz[], $3::int8[], $4::timestamptz[], $5::int8[], $6::text[],
    $7::float8[], $8::float8[], $9::float4[], $10::float4[], $11::bool[], $12::int2[], $13::bool[],
    $14::bool[], $15::text[])
    AS u(d, t, s, rt, sub, p, la, lo, acc, spd, v, bat, chg, bcn, ex)
ON CONFLICT (device_id, device_time, seq) DO NOTHING";

/// One statement for all subjects of a batch; each field only moves forward in device time.
const LATEST_UPSERT: &str = "
INSERT INTO latest_state AS ls (subject_id, device_id, last_contact, lat, lon, accuracy_m, speed_kmh,
    valid, position_extra, position_time, status_time, battery_pct, charging, beacon_in_range,
    strap_ok, case_ok)
SELECT sub, dev, lc, la, lo, acc, spd, v, px::jsonb, pt, st, bat, chg, bcn, strap, cse
FROM UNNEST($1::int8[], $2::text[], $3::timestamptz[], $4::float8[], $5::float8[], $6::float4[],
    $7::float4[], $8::bool[], $9::text[], $10::timestamptz[], $11::timestamptz[], $12::int2[],
    $13::bool[], $14::bool[], $15::bool[], $16::bool[])
    AS u(sub, dev, lc, la, lo, acc, spd, v, px, pt, st, bat, chg, bcn, strap, cse)
ON CONFLICT (subject_id) DO UPDATE SET
    device_id = CASE WHEN EXCLUDED.last_contact >= ls.last_contact THEN EXCLUDED.device_id ELSE ls.device_id END,
    last_contact = GREATEST(ls.last_contact, EXCLUDED.last_contact),
    lat = CASE WHEN EXCLUDED.position_time >= ls.position_time OR (ls.position_time IS NULL AND EXCLUDED.position_time IS NOT NULL)
               THEN EXCLUDED.lat ELSE ls.lat END,
    lon = CASE WHEN EXCLUDED.position_time >= ls.position_time OR (ls.position_time IS NULL AND EXCLUDED.position_time IS NOT NULL)
               THEN EXCLUDED.lon ELSE ls.lon END,
    accuracy_m = CASE WHEN EXCLUDED.position_time >= ls.position_time OR (ls.position_time IS NULL AND EXCLUDED.position_time IS NOT NULL)
               THEN EXCLUDED.accuracy_m ELSE ls.accuracy_m END,
    speed_kmh = CASE WHEN EXCLUDED.position_time >= ls.position_time OR (ls.position_time IS NULL AND EXCLUDED.position_time IS NOT NULL)
               THEN EXCLUDED.speed_kmh ELSE ls.speed_kmh END,
    valid = CASE WHEN EXCLUDED.position_time >= ls.position_time OR (ls.position_time IS NULL AND EXCLUDED.position_time IS NOT NULL)
               THEN EXCLUDED.valid ELSE ls.valid END,
    position_extra = CASE WHEN EXCLUDED.position_time >= ls.position_time OR (ls.position_time IS NULL AND EXCLUDED.position_time IS NOT NULL)
               THEN EXCLUDED.position_extra ELSE ls.position_extra END,
    position_time = CASE WHEN EXCLUDED.position_time >= ls.position_time OR (ls.position_time IS NULL AND EXCLUDED.position_time IS NOT NULL)
               THEN EXCLUDED.position_time ELSE ls.position_time END,
    battery_pct = CASE WHEN EXCLUDED.battery_pct IS NOT NULL AND (ls.status_time IS NULL OR EXCLUDED.status_time >= ls.status_time)
               THEN EXCLUDED.battery_pct ELSE ls.battery_pct END,
    charging = CASE WHEN EXCLUDED.charging IS NOT NULL AND (ls.status_time IS NULL OR EXCLUDED.status_time >= ls.status_time)
               THEN EXCLUDED.charging ELSE ls.charging END,
    beacon_in_range = CASE WHEN EXCLUDED.beacon_in_range IS NOT NULL AND (ls.status_time IS NULL OR EXCLUDED.status_time >= ls.status_time)
               THEN EXCLUDED.beacon_in_range ELSE ls.beacon_in_range END,
    strap_ok = CASE WHEN EXCLUDED.strap_ok IS NOT NULL AND (ls.status_time IS NULL OR EXCLUDED.status_time >= ls.status_time)
               THEN EXCLUDED.strap_ok ELSE ls.strap_ok END,
    case_ok = CASE WHEN EXCLUDED.case_ok IS NOT NULL AND (ls.status_time IS NULL OR EXCLUDED.status_time >= ls.status_time)
               THEN EXCLUDED.case_ok ELSE ls.case_ok END,
    status_time = CASE WHEN EXCLUDED.status_time IS NOT NULL AND (ls.status_time IS NULL OR EXCLUDED.status_time >= ls.status_time)
               THEN EXCLUDED.status_time ELSE ls.status_time END";

pub(super) async fn insert_records(store: &PgStore, records: &[StoredRecord]) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let rows = RecordRow::all(records)?;
    let times: Vec<_> = rows.iter().map(|r| r.device_time).collect();
    store.ensure_partitions_for(&times).await;
    let n = rows.len();
    let mut device_id = Vec::with_capacity(n);
    let mut device_time = Vec::with_capacity(n);
    let mut seq = Vec::with_capacity(n);
    let mut received = Vec::with_capacity(n);
    let mut subject = Vec::with_capacity(n);
    let mut protocol = Vec::with_capacity(n);
    let mut lat = Vec::with_capacity(n);
    let mut lon = Vec::with_capacity(n);
    let mut acc = Vec::with_capacity(n);
    let mut speed = Vec::with_capacity(n);
    let mut valid = Vec::with_capacity(n);
    let mut battery = Vec::with_capacity(n);
    let mut charging = Vec::with_capacity(n);
    let mut beacon = Vec::with_capacity(n);
    let mut extra = Vec::with_capacity(n);
    for r in rows {
        device_id.push(r.device_id);
        device_time.push(r.device_time);
        seq.push(r.seq);
        received.push(r.received_time);
        subject.push(r.subject_id);
        protocol.push(r.protocol);
        lat.push(r.lat);
        lon.push(r.lon);
        acc.push(r.accuracy_m);
        speed.push(r.speed_kmh);
        valid.push(r.valid);
        battery.push(r.battery_pct);
        charging.push(r.charging);
        beacon.push(r.beacon_in_range);
        extra.push(r.extra);
    }
    let deltas = fold_latest(records);
    let mut tx = store.pool().begin().await?;
    sqlx::query(RECORDS_INSERT)
        .bind(&device_id)
        .bind(&device_time)
        .bind(&seq)
        .bind(&received)
        .bind(&subject)
        .bind(&protocol)
        .bind(&lat)
        .bind(&lon)
        .bind(&acc)
        .bind(&speed)
        .bind(&valid)
        .bind(&battery)
        .bind(&charging)
        .bind(&beacon)
        .bind(&extra)
        .execute(&mut *tx)
        .await?;
    if !deltas.is_empty() {
        let mut pos_extra: Vec<Option<String>> = Vec::with_capacity(deltas.len());
        for d in &deltas {
            pos_extra.push(
                d.position
                    .map(|p| {
                        serde_json::to_string(&RecordExtra {
                            course_deg: p.course_deg,
                            altitude_m: p.altitude_m,
                            satellites: p.satellites,
                            source: Some(p.source),
                            ..RecordExtra::default()
                        })
                        .map_err(|e| {
                            StoreError::Invalid(format!("cannot encode position extras: {e}"))
                        })
                    })
                    .transpose()?,
            );
        }
        sqlx::query(LATEST_UPSERT)
            .bind(deltas.iter().map(|d| d.subject_id).collect::<Vec<_>>())
            .bind(
                deltas
                    .iter()
                    .map(|d| d.device_id.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(deltas.iter().map(|d| d.last_contact).collect::<Vec<_>>())
            .bind(
                deltas
                    .iter()
                    .map(|d| d.position.map(|p| p.lat))
                    .collect::<Vec<_>>(),
            )
            .bind(
                deltas
                    .iter()
                    .map(|d| d.position.map(|p| p.lon))
                    .collect::<Vec<_>>(),
            )
            .bind(
                deltas
                    .iter()
                    .map(|d| d.position.and_then(|p| p.accuracy_m))
                    .collect::<Vec<_>>(),
            )
            .bind(
                deltas
                    .iter()
                    .map(|d| d.position.and_then(|p| p.speed_kmh))
                    .collect::<Vec<_>>(),
            )
            .bind(
                deltas
                    .iter()
                    .map(|d| d.position.map(|p| p.valid))
                    .collect::<Vec<_>>(),
            )
            .bind(pos_extra)
            .bind(deltas.iter().map(|d| d.position_time).collect::<Vec<_>>())
            .bind(deltas.iter().map(|d| d.status_time).collect::<Vec<_>>())
            .bind(
                deltas
                    .iter()
                    .map(|d| d.battery_pct.map(i16::from))
                    .collect::<Vec<_>>(),
            )
            .bind(deltas.iter().map(|d| d.charging).collect::<Vec<_>>())
            .bind(deltas.iter().map(|d| d.beacon_in_range).collect::<Vec<_>>())
            .bind(deltas.iter().map(|d| d.strap_ok).collect::<Vec<_>>())
            .bind(deltas.iter().map(|d| d.case_ok).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}
