//! Decoding throughput of each protocol codec, in frames per second.
//!
//! Baselines in the same run make the figures comparable across machines:
//! `gt06/memcpy` copies the same bytes, `gt06/crc_only` only checks the CRC of each
//! frame, so `gt06/decode` minus `crc_only` is the cost of framing and field parsing.
//!
//! Run: `cargo bench -p em-benches --bench protocols -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use bytes::BytesMut;
use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use em_protocols::gt06::{Gt06Cell, Gt06Codec, Gt06Frame, Gt06Gps, Gt06Message, Imei};
use em_protocols::h02::{H02Codec, H02Frame, H02Location, H02Message};
use em_protocols::teltonika::{
    AvlCodec, AvlGps, AvlPacket, AvlRecord, IoElement, IoValue, TeltonikaCodec, TeltonikaFrame,
};
use em_protocols::Decoder;
use em_protocols::{crc16_x25, em, osmand};

const BATCH: usize = 1000;

fn gt06_stream() -> (Vec<u8>, usize) {
    let t0 = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
    let mut buf = BytesMut::new();
    for i in 0..BATCH {
        let frame = Gt06Frame::new(
            i as u16,
            Gt06Message::Location {
                protocol: 0x12,
                gps: Gt06Gps {
                    time: t0 + chrono::Duration::seconds(i as i64),
                    info_len: 12,
                    satellites: 9,
                    lat: 55.676 + i as f64 * 1e-5,
                    lon: 12.568,
                    speed_kmh: 4,
                    course: 180,
                    positioned: true,
                    differential: false,
                },
                cell: Some(Gt06Cell {
                    mcc: 238,
                    mnc: 1,
                    lac: 0x1234,
                    cell_id: 0x00ABCD,
                }),
                acc: None,
                upload_mode: None,
                reupload: None,
                mileage: None,
            },
        );
        frame.encode(&mut buf).unwrap();
    }
    let frame_len = buf.len() / BATCH;
    (buf.to_vec(), frame_len)
}

fn bench_gt06(c: &mut Criterion) {
    let (stream, frame_len) = gt06_stream();
    let mut g = c.benchmark_group("gt06");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("memcpy", |b| {
        b.iter(|| {
            let buf = BytesMut::from(black_box(&stream[..]));
            black_box(buf.len())
        })
    });
    g.bench_function("crc_only", |b| {
        b.iter(|| {
            let mut ok = 0usize;
            for f in black_box(&stream[..]).chunks_exact(frame_len) {
                let crc = u16::from_be_bytes([f[frame_len - 4], f[frame_len - 3]]);
                ok += usize::from(crc16_x25(&f[2..frame_len - 4]) == crc);
            }
            black_box(ok)
        })
    });
    g.bench_function("decode", |b| {
        let mut codec = Gt06Codec::with_imei(Imei::new(359_339_075_016_807).unwrap());
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(&stream[..]));
            let mut n = 0usize;
            while let Ok(Some(item)) = codec.decode(&mut buf) {
                n += usize::from(item.is_ok());
            }
            assert_eq!(n, BATCH);
            black_box(n)
        })
    });
    g.bench_function("decode_to_record", |b| {
        let mut codec = Gt06Codec::with_imei(Imei::new(359_339_075_016_807).unwrap());
        let received = Utc::now();
        b.iter(|| {
            let mut buf = BytesMut::from(black_box(&stream[..]));
            let mut n = 0usize;
            while let Ok(Some(Ok(frame))) = codec.decode(&mut buf) {
                let id = codec.device_id().unwrap_or_default();
                n += usize::from(frame.to_record(id, received).is_some());
            }
            black_box(n)
        })
    });
    g.finish();
}

fn bench_teltonika(c: &mut Criterion) {
    let t0 = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
    let record = |i: i64| AvlRecord {
        timestamp: t0 + chrono::Duration::seconds(i),
        priority: 0,
        gps: AvlGps {
            lon: 12.568,
            lat: 55.676,
            altitude_m: 12,
            angle_deg: 90,
            satellites: 8,
            speed_kmh: 3,
        },
        event_io: 0,
        io: vec![
            IoElement {
                id: 21,
                value: IoValue::U8(4),
            },
            IoElement {
                id: 113,
                value: IoValue::U8(80),
            },
            IoElement {
                id: 66,
                value: IoValue::U16(12_400),
            },
            IoElement {
                id: 182,
                value: IoValue::U16(9),
            },
        ],
    };
    let mut stream = BytesMut::new();
    for i in 0..BATCH as i64 {
        TeltonikaFrame::Avl(AvlPacket {
            codec: AvlCodec::Codec8,
            records: vec![record(i)],
        })
        .encode(&mut stream)
        .unwrap();
    }
    let mut g = c.benchmark_group("teltonika");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("decode_1_record_packets", |b| {
        let mut codec = TeltonikaCodec::with_imei("356307042441013");
        b.iter(|| {
            let mut buf = stream.clone();
            let mut n = 0usize;
            while let Ok(Some(item)) = codec.decode(&mut buf) {
                n += usize::from(item.is_ok());
            }
            assert_eq!(n, BATCH);
            black_box(n)
        })
    });
    g.finish();
}

fn bench_h02(c: &mut Criterion) {
    let t0 = Utc.with_ymd_and_hms(2024, 5, 1, 12, 0, 0).unwrap();
    let mut stream = BytesMut::new();
    for i in 0..BATCH as i64 {
        H02Frame {
            maker: "HQ".into(),
            imei: "353505910449999".into(),
            message: H02Message::Location(H02Location {
                time: t0 + chrono::Duration::seconds(i),
                valid: true,
                lat: 55.676,
                lon: 12.568,
                speed_knots: 1.5,
                course: 90,
                status: 0xFFFF_FFFF,
                battery_pct: Some(80),
            }),
        }
        .encode(&mut stream)
        .unwrap();
    }
    let mut g = c.benchmark_group("h02");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("decode", |b| {
        let mut codec = H02Codec::new();
        b.iter(|| {
            let mut buf = stream.clone();
            let mut n = 0usize;
            while let Ok(Some(item)) = codec.decode(&mut buf) {
                n += usize::from(item.is_ok());
            }
            assert_eq!(n, BATCH);
            black_box(n)
        })
    });
    g.finish();
}

fn bench_text(c: &mut Criterion) {
    let query = "id=123456&timestamp=1714564800&lat=55.676&lon=12.568&speed=1.5&bearing=90&altitude=12&accuracy=8&batt=77&charge=true";
    let topic = "em/v1/tag-0001/telemetry";
    let payload = serde_json::json!({
        "seq": 42, "time": "2024-05-01T12:00:00Z",
        "position": {"lat": 55.676, "lon": 12.568, "accuracy_m": 6.5, "source": "gnss"},
        "battery_pct": 81, "charging": false, "strap": "intact", "case": "intact",
        "beacon_in_range": false
    })
    .to_string();
    let mut g = c.benchmark_group("text");
    g.throughput(Throughput::Elements(1));
    g.bench_function("osmand_decode", |b| {
        b.iter(|| black_box(osmand::decode(black_box(query)).is_ok()))
    });
    g.bench_function("em_decode", |b| {
        b.iter(|| black_box(em::decode(black_box(topic), black_box(payload.as_bytes())).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, bench_gt06, bench_teltonika, bench_h02, bench_text);
criterion_main!(benches);
