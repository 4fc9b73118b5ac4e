//! Property tests: encode → decode round trips for every protocol, arbitrary bytes never
//! panic nor consume more than given, and a stream split at random points yields the
//! same frames as the whole stream.

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use em_model::{CellTower, DeviceEventKind, FixSource, WifiAccessPoint};
use em_protocols::em::{self, EmMessage, EmPayload, EmPosition, EmTopic, TamperState};
use em_protocols::gt06::{
    Gt06Cell, Gt06Codec, Gt06Frame, Gt06Gps, Gt06Message, Gt06Neighbour, Gt06Status, Imei,
};
use em_protocols::h02::{H02Codec, H02Frame, H02Location, H02Message, H02Status};
use em_protocols::osmand::{self, OsmandReport};
use em_protocols::teltonika::{
    self, udp, AvlCodec, AvlGps, AvlPacket, AvlRecord, IoElement, IoValue, TeltonikaCodec,
    TeltonikaFrame,
};
use em_protocols::{CodecError, DecodeError, Decoder};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

// ---------------------------------------------------------------- helpers

/// Feed `chunks` one after the other, decoding as far as possible after each; checks
/// progress and that the buffer never grows by decoding.
fn drive<C, T>(codec: &mut C, chunks: &[&[u8]]) -> Vec<Result<T, DecodeError>>
where
    C: Decoder<Item = Result<T, DecodeError>, Error = CodecError>,
{
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    for (i, chunk) in chunks.iter().enumerate() {
        buf.extend_from_slice(chunk);
        let last = i + 1 == chunks.len();
        loop {
            let before = buf.len();
            let step = if last {
                codec.decode_eof(&mut buf)
            } else {
                codec.decode(&mut buf)
            };
            assert!(buf.len() <= before, "decoding grew the buffer");
            match step {
                Ok(Some(item)) => {
                    assert!(buf.len() < before, "item without consuming input");
                    out.push(item);
                }
                Ok(None) => break,
                Err(CodecError::Fatal(e)) => {
                    assert!(e.is_fatal(), "non-fatal error returned as fatal: {e}");
                    return out;
                }
                Err(CodecError::Io(e)) => panic!("I/O error from a pure codec: {e}"),
            }
        }
    }
    out
}

fn split_at_points<'a>(data: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = points.iter().map(|p| p % (data.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for c in cuts {
        out.push(&data[prev..c]);
        prev = c;
    }
    out.push(&data[prev..]);
    out
}

fn oks<T: Clone>(items: &[Result<T, DecodeError>]) -> Vec<T> {
    items
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect()
}

/// Garbage bytes skipped in total, and the other errors in order (garbage may be
/// reported in several pieces when the stream arrives in pieces).
fn error_summary<T>(items: &[Result<T, DecodeError>]) -> (usize, Vec<DecodeError>) {
    let mut skipped = 0;
    let mut others = Vec::new();
    for e in items.iter().filter_map(|r| r.as_ref().err()) {
        match e {
            DecodeError::Garbage { skipped: n, .. } => skipped += n,
            other => others.push(other.clone()),
        }
    }
    (skipped, others)
}

fn secs_2000_2099() -> impl Strategy<Value = DateTime<Utc>> {
    (946_684_800i64..4_102_444_799).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap())
}

// ---------------------------------------------------------------- GT06

fn gt06_gps() -> impl Strategy<Value = Gt06Gps> {
    (
        secs_2000_2099(),
        0u8..16,
        0u8..16,
        (0u32..=162_000_000, any::<bool>()),
        (0u32..=324_000_000, any::<bool>()),
        any::<u8>(),
        0u16..1024,
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(time, info_len, satellites, (la, s), (lo, w), speed, course, p, d)| {
                let lat = f64::from(la) / 1_800_000.0;
                let lon = f64::from(lo) / 1_800_000.0;
                Gt06Gps {
                    time,
                    info_len,
                    satellites,
                    lat: if s { -lat } else { lat },
                    lon: if w { -lon } else { lon },
                    speed_kmh: speed,
                    course,
                    positioned: p,
                    differential: d,
                }
            },
        )
}

fn gt06_cell() -> impl Strategy<Value = Gt06Cell> {
    // MCC bit 15 flags a two-byte MNC in the Concox 4G sheets: the one-byte-MNC layout
    // encoded here keeps it clear.
    (0u16..0x8000, any::<u8>(), any::<u16>(), 0u32..=0xFF_FFFF).prop_map(
        |(mcc, mnc, lac, cell_id)| Gt06Cell {
            mcc,
            mnc,
            lac,
            cell_id,
        },
    )
}

fn gt06_status() -> impl Strategy<Value = Gt06Status> {
    any::<[u8; 5]>().prop_map(|[a, b, c, d, e]| Gt06Status {
        terminal_info: a,
        voltage_level: b,
        gsm_level: c,
        alarm: d,
        language: e,
    })
}

fn gt06_message() -> impl Strategy<Value = Gt06Message> {
    let login =
        (0..=Imei::MAX, option::of(any::<(u16, u16)>())).prop_map(|(i, tz)| Gt06Message::Login {
            imei: Imei::new(i).unwrap(),
            type_id: tz.map(|t| t.0),
            timezone: tz.map(|t| t.1),
        });
    let loc12 =
        (gt06_gps(), option::of(gt06_cell())).prop_map(|(gps, cell)| Gt06Message::Location {
            protocol: 0x12,
            gps,
            cell,
            acc: None,
            upload_mode: None,
            reupload: None,
            mileage: None,
        });
    let loc22 = (
        gt06_gps(),
        gt06_cell(),
        option::of((
            any::<bool>(),
            any::<u8>(),
            any::<bool>(),
            option::of(any::<u32>()),
        )),
    )
        .prop_map(|(gps, cell, ext)| Gt06Message::Location {
            protocol: 0x22,
            gps,
            cell: Some(cell),
            acc: ext.map(|e| e.0),
            upload_mode: ext.map(|e| e.1),
            reupload: ext.map(|e| e.2),
            mileage: ext.and_then(|e| e.3),
        });
    let alarm = (
        prop_oneof![Just(0x16u8), Just(0x26u8)],
        gt06_gps(),
        // The LBS length byte drives the parse (it counts itself: 9 for the 8-byte cell).
        Just(9u8),
        gt06_cell(),
        gt06_status(),
    )
        .prop_map(
            |(protocol, gps, lbs_len, cell, status)| Gt06Message::Alarm {
                protocol,
                gps,
                lbs_len,
                cell,
                status,
            },
        );
    let neighbour = (any::<u16>(), 0u32..=0xFF_FFFF, any::<u8>())
        .prop_map(|(lac, cell_id, rssi)| Gt06Neighbour { lac, cell_id, rssi });
    let lbs = (
        secs_2000_2099(),
        gt06_cell(),
        any::<u8>(),
        option::of((
            vec(neighbour, 6),
            option::of((any::<u8>(), option::of(any::<u16>()))),
        )),
    )
        .prop_map(|(time, cell, rssi, n)| {
            let (neighbours, ta) = n.unwrap_or_default();
            Gt06Message::Lbs {
                time,
                cell,
                rssi,
                neighbours,
                timing_advance: ta.map(|t| t.0),
                language: ta.and_then(|t| t.1),
            }
        });
    prop_oneof![
        login,
        loc12,
        loc22,
        gt06_status().prop_map(Gt06Message::Status),
        alarm,
        lbs,
        // An empty 0x8A frame is a time request, not an acknowledgement.
        any::<u8>()
            .prop_filter("0x8A is a time request", |p| *p
                != em_protocols::gt06::proto::TIME_REQUEST)
            .prop_map(|protocol| Gt06Message::Ack { protocol }),
        Just(Gt06Message::TimeRequest),
    ]
}

fn gt06_frame() -> impl Strategy<Value = Gt06Frame> {
    (any::<u16>(), gt06_message()).prop_map(|(serial, message)| Gt06Frame { serial, message })
}

fn gt06_codec() -> Gt06Codec {
    Gt06Codec::with_imei(Imei::new(359_339_075_016_807).unwrap())
}

// ---------------------------------------------------------------- Teltonika

fn avl_record(ext: bool) -> impl Strategy<Value = AvlRecord> {
    let id = if ext {
        any::<u16>().boxed()
    } else {
        (0u16..256).boxed()
    };
    let groups = (
        vec((id.clone(), any::<u8>()), 0..4),
        vec((id.clone(), any::<u16>()), 0..4),
        vec((id.clone(), any::<u32>()), 0..4),
        vec((id.clone(), any::<u64>()), 0..3),
        if ext {
            vec((id.clone(), vec(any::<u8>(), 0..12)), 0..3).boxed()
        } else {
            Just(vec![]).boxed()
        },
    );
    (
        0i64..(1 << 41),
        0u8..3,
        (
            -1_800_000_000i32..=1_800_000_000,
            -900_000_000i32..=900_000_000,
        ),
        any::<(i16, u16, u8, u16)>(),
        id,
        groups,
    )
        .prop_map(
            |(ms, priority, (lo, la), (alt, angle, sats, speed), event_io, g)| {
                let mut io = Vec::new();
                io.extend(g.0.into_iter().map(|(id, v)| IoElement {
                    id,
                    value: IoValue::U8(v),
                }));
                io.extend(g.1.into_iter().map(|(id, v)| IoElement {
                    id,
                    value: IoValue::U16(v),
                }));
                io.extend(g.2.into_iter().map(|(id, v)| IoElement {
                    id,
                    value: IoValue::U32(v),
                }));
                io.extend(g.3.into_iter().map(|(id, v)| IoElement {
                    id,
                    value: IoValue::U64(v),
                }));
                io.extend(g.4.into_iter().map(|(id, v)| IoElement {
                    id,
                    value: IoValue::Bytes(v),
                }));
                AvlRecord {
                    timestamp: DateTime::from_timestamp_millis(ms).unwrap(),
                    priority,
                    gps: AvlGps {
                        lon: f64::from(lo) / 1e7,
                        lat: f64::from(la) / 1e7,
                        altitude_m: alt,
                        angle_deg: angle,
                        satellites: sats,
                        speed_kmh: speed,
                    },
                    event_io,
                    io,
                }
            },
        )
}

fn teltonika_frame() -> impl Strategy<Value = TeltonikaFrame> {
    prop_oneof![
        "[0-9]{15}".prop_map(TeltonikaFrame::Imei),
        vec(avl_record(false), 0..4).prop_map(|records| TeltonikaFrame::Avl(AvlPacket {
            codec: AvlCodec::Codec8,
            records
        })),
        vec(avl_record(true), 0..4).prop_map(|records| TeltonikaFrame::Avl(AvlPacket {
            codec: AvlCodec::Codec8Extended,
            records
        })),
    ]
}

// ---------------------------------------------------------------- H02

fn h02_location() -> impl Strategy<Value = H02Location> {
    (
        secs_2000_2099(),
        any::<bool>(),
        (0u64..=54_000_000, any::<bool>()),
        (0u64..=108_000_000, any::<bool>()),
        0u32..100_000,
        0u16..360,
        any::<u32>(),
        option::of(prop_oneof![0u8..=98, Just(100u8)]),
    )
        .prop_map(
            |(time, valid, (la, s), (lo, w), speed, course, status, battery_pct)| {
                // Same arithmetic as the decoder: degrees + minutes / 60.
                let coord = |units: u64| {
                    (units / 600_000) as f64 + ((units % 600_000) as f64 / 10_000.0) / 60.0
                };
                let lat = coord(la);
                let lon = coord(lo);
                H02Location {
                    time,
                    valid,
                    lat: if s && la != 0 { -lat } else { lat },
                    lon: if w && lo != 0 { -lon } else { lon },
                    speed_knots: f64::from(speed) / 100.0,
                    course,
                    status,
                    battery_pct,
                }
            },
        )
}

fn h02_frame() -> impl Strategy<Value = H02Frame> {
    let msg = prop_oneof![
        h02_location().prop_map(H02Message::Location),
        prop_oneof![Just("XT"), Just("HTBT"), Just("LINK"), Just("V0")].prop_map(|c| {
            H02Message::Heartbeat {
                command: c.into(),
                battery_pct: None,
            }
        }),
        (0u8..=98).prop_map(|b| H02Message::Heartbeat {
            command: "HTBT".into(),
            battery_pct: Some(b),
        }),
        (any::<u8>(), option::of(h02_location()))
            .prop_map(|(kind, location)| H02Message::Alarm { kind, location }),
        (
            "[A-Z][A-Z0-9]{0,4}(,[A-Z0-9]{1,5}){0,2}",
            option::of(h02_location())
        )
            .prop_map(|(command, location)| H02Message::CommandAck { command, location }),
        (
            prop_oneof![
                Just("V2"),
                Just("V5"),
                Just("V6"),
                Just("V8"),
                Just("V19"),
                Just("VI1"),
                Just("SMS")
            ],
            h02_location()
        )
            .prop_map(|(c, location)| H02Message::Report {
                command: c.into(),
                location
            }),
        h02_nbr().prop_map(H02Message::Status),
    ];
    ("[0-9]{10,15}", msg).prop_map(|(imei, message)| H02Frame {
        maker: "HQ".into(),
        imei,
        message,
    })
}

fn h02_nbr() -> impl Strategy<Value = H02Status> {
    (
        secs_2000_2099(),
        any::<u32>(),
        0u16..1000,
        0u16..1000,
        vec((0u32..65_536, 0u64..268_435_456, 0i32..64), 1..7),
    )
        .prop_map(|(time, status, mcc, mnc, cells)| H02Status {
            command: "NBR".into(),
            time: Some(time),
            status: Some(status),
            battery_pct: None,
            cells: cells
                .into_iter()
                .map(|(lac, cell_id, s)| CellTower {
                    mcc,
                    mnc,
                    lac,
                    cell_id,
                    signal: Some(s),
                })
                .collect(),
        })
}

/// Binary reports: 10-digit id, whole knots, battery absent or a percentage above 6.
fn h02_binary() -> impl Strategy<Value = H02Frame> {
    (
        "[0-9]{10}",
        h02_location(),
        0u16..1000,
        option::of(7u8..=100),
    )
        .prop_map(|(imei, mut loc, speed, battery)| {
            loc.speed_knots = f64::from(speed);
            loc.battery_pct = battery;
            H02Frame {
                maker: "$".into(),
                imei,
                message: H02Message::Binary(loc),
            }
        })
}

// ---------------------------------------------------------------- OsmAnd / EM

/// Reports with cells / Wi-Fi, some without a position.
fn osmand_report() -> impl Strategy<Value = OsmandReport> {
    (
        osmand_base(),
        vec(
            (
                0u16..1000,
                0u16..1000,
                any::<u32>(),
                any::<u64>(),
                option::of(-120i32..0),
            ),
            0..3,
        ),
        vec((any::<[u8; 6]>(), -100i32..0), 0..3),
        any::<bool>(),
    )
        .prop_map(|(mut r, cells, wifi, drop_position)| {
            r.cells = cells
                .into_iter()
                .map(|(mcc, mnc, lac, cell_id, signal)| CellTower {
                    mcc,
                    mnc,
                    lac,
                    cell_id,
                    signal,
                })
                .collect();
            r.wifi = wifi
                .into_iter()
                .map(|(m, s)| WifiAccessPoint {
                    mac: m
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                    signal_dbm: Some(s),
                })
                .collect();
            if drop_position && !(r.cells.is_empty() && r.wifi.is_empty()) {
                r.lat = None;
                r.lon = None;
            }
            r
        })
}

fn decimal(lo: i64, hi: i64, scale: f64) -> impl Strategy<Value = f64> {
    (lo..=hi).prop_map(move |v| v as f64 / scale)
}

fn osmand_base() -> impl Strategy<Value = OsmandReport> {
    (
        "[A-Za-z0-9_-]{1,20}",
        option::of(prop_oneof![
            (0i64..4_000_000_000).prop_map(|s| DateTime::from_timestamp(s, 0).unwrap()),
            (0i64..4_000_000_000_000).prop_map(|ms| DateTime::from_timestamp_millis(ms).unwrap()),
        ]),
        any::<f64>().prop_map(|f| (f.fract() * 90.0).clamp(-90.0, 90.0)),
        any::<f64>().prop_map(|f| (f.fract() * 180.0).clamp(-180.0, 180.0)),
        option::of(decimal(0, 100_000, 100.0)),
        option::of(decimal(0, 3600, 10.0)),
        option::of(decimal(-500, 9000, 1.0)),
        option::of(decimal(0, 10_000, 10.0)),
        (
            option::of(decimal(0, 100, 1.0)),
            option::of(any::<bool>()),
            option::of(any::<bool>()),
        ),
    )
        .prop_map(
            |(id, time, lat, lon, speed, bearing, alt, acc, (batt, charge, valid))| {
                let mut r = OsmandReport::new(id, lat, lon);
                r.time = time;
                r.speed_knots = speed;
                r.bearing = bearing;
                r.altitude = alt;
                r.accuracy = acc;
                r.battery = batt;
                r.charge = charge;
                r.valid = valid;
                r
            },
        )
}

const EVENTS: [DeviceEventKind; 17] = [
    DeviceEventKind::StrapTamper,
    DeviceEventKind::StrapRestored,
    DeviceEventKind::CaseTamper,
    DeviceEventKind::CaseRestored,
    DeviceEventKind::LowBattery,
    DeviceEventKind::BatteryDead,
    DeviceEventKind::ChargerConnected,
    DeviceEventKind::ChargerDisconnected,
    DeviceEventKind::PowerCut,
    DeviceEventKind::Sos,
    DeviceEventKind::Vibration,
    DeviceEventKind::GpsJamming,
    DeviceEventKind::BeaconInRange,
    DeviceEventKind::BeaconOutOfRange,
    DeviceEventKind::DeviceGeofence,
    DeviceEventKind::Heartbeat,
    DeviceEventKind::Login,
];

fn f32_tenths(hi: i32) -> impl Strategy<Value = f32> {
    (0..=hi).prop_map(|v| v as f32 / 10.0)
}

fn em_payload() -> impl Strategy<Value = EmPayload> {
    let position = (
        decimal(-90_000_000, 90_000_000, 1e6),
        decimal(-180_000_000, 180_000_000, 1e6),
        option::of(f32_tenths(50_000)),
        option::of(f32_tenths(500)),
        prop_oneof![
            Just(FixSource::Gnss),
            Just(FixSource::Lbs),
            Just(FixSource::Wifi),
            Just(FixSource::Beacon)
        ],
        any::<bool>(),
        (
            option::of(f32_tenths(3000)),
            option::of(f32_tenths(3600)),
            option::of(f32_tenths(90000)),
            option::of(any::<u8>()),
        ),
    )
        .prop_map(
            |(lat, lon, accuracy_m, hdop, source, valid, (speed, course, alt, sats))| EmPosition {
                lat,
                lon,
                accuracy_m,
                hdop,
                source,
                valid,
                speed_kmh: speed,
                course_deg: course,
                altitude_m: alt,
                satellites: sats,
            },
        );
    let tamper = option::of(prop_oneof![
        Just(TamperState::Intact),
        Just(TamperState::Tampered)
    ]);
    (
        any::<u64>(),
        (0i64..4_000_000_000, 0u32..1_000_000_000)
            .prop_map(|(s, n)| DateTime::from_timestamp(s, n).unwrap()),
        option::of(position),
        (
            option::of(0u8..=100),
            option::of(any::<bool>()),
            option::of(0u8..=100),
        ),
        (tamper.clone(), tamper, option::of(any::<bool>())),
        proptest::sample::subsequence(EVENTS.to_vec(), 1..4),
    )
        .prop_map(
            |(seq, time, position, (batt, chg, gsm), (strap, case, beacon), events)| {
                let mut p = EmPayload::new(seq, time);
                p.position = position;
                p.battery_pct = batt;
                p.charging = chg;
                p.gsm_signal = gsm;
                p.strap = strap;
                p.case = case;
                p.beacon_in_range = beacon;
                p.events = events;
                p
            },
        )
}

fn em_message() -> impl Strategy<Value = EmMessage> {
    (
        "[A-Za-z0-9._-]{1,64}",
        prop_oneof![
            Just(EmTopic::Telemetry),
            Just(EmTopic::Event),
            Just(EmTopic::Status)
        ],
        vec(em_payload(), 1..4),
        any::<bool>(),
    )
        .prop_map(|(device_id, topic, mut payloads, batch)| {
            if !batch {
                payloads.truncate(1);
            }
            EmMessage {
                device_id,
                topic,
                payloads,
                batch,
            }
        })
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn gt06_round_trip(frame in gt06_frame()) {
        let bytes = frame.to_bytes().unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let got = gt06_codec().decode(&mut buf).unwrap().unwrap().unwrap();
        prop_assert_eq!(got, frame);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn teltonika_round_trip(frame in teltonika_frame()) {
        let bytes = frame.to_bytes().unwrap();
        let mut buf = BytesMut::from(&bytes[..]);
        let got = TeltonikaCodec::with_imei("1").decode(&mut buf).unwrap().unwrap().unwrap();
        prop_assert_eq!(got, frame);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn h02_round_trip(frame in h02_frame()) {
        let text = frame.to_text().unwrap();
        let mut buf = BytesMut::from(text.as_bytes());
        let got = H02Codec::new().decode(&mut buf).unwrap().unwrap().unwrap();
        prop_assert_eq!(got, frame);
    }

    #[test]
    fn h02_binary_round_trip(frame in h02_binary(), text in h02_frame()) {
        let mut buf = BytesMut::new();
        frame.encode(&mut buf).unwrap();
        prop_assert_eq!(buf.len(), 32);
        // Binary and text reports interleaved on one connection.
        buf.extend_from_slice(text.to_text().unwrap().as_bytes());
        frame.encode(&mut buf).unwrap();
        let out = drive(&mut H02Codec::new(), &[&buf]);
        prop_assert_eq!(oks(&out), vec![frame.clone(), text, frame]);
    }

    #[test]
    fn h02_unpadded_degrees_read_as_padded(loc in h02_location()) {
        // The same frame with the degree fields' leading zeros removed decodes the same.
        let frame = H02Frame { maker: "HQ".into(), imei: "4209917123".into(), message: H02Message::Location(loc) };
        let text = frame.to_text().unwrap();
        let mut f: Vec<String> = text.split(',').map(str::to_owned).collect();
        for i in [5, 7] {
            // Drop the degrees' leading zeros only: the minutes keep their two digits.
            let (int, frac) = f[i].split_once('.').unwrap();
            let t = int.trim_start_matches('0');
            let t = format!("{t:0>2}");
            f[i] = format!("{t}.{frac}");
        }
        let unpadded = f.join(",");
        let mut buf = BytesMut::from(unpadded.as_bytes());
        let got = H02Codec::new().decode(&mut buf).unwrap().unwrap().unwrap();
        prop_assert_eq!(got, frame);
    }

    #[test]
    fn osmand_json_position_matches_query(report in osmand_report()) {
        // The same report as a Traccar Client JSON body gives the same record position.
        let (Some(lat), Some(lon)) = (report.lat, report.lon) else { return Ok(()) };
        let body = serde_json::json!({
            "device_id": report.id,
            "location": {
                "timestamp": report.time.map(|t| t.to_rfc3339()),
                "coords": {"latitude": lat, "longitude": lon, "accuracy": report.accuracy,
                           "heading": report.bearing, "altitude": report.altitude},
                "battery": {"level": report.battery.map(|b| b / 100.0), "is_charging": report.charge},
            }
        }).to_string();
        let got = osmand::decode(&body).unwrap();
        let (r1, r2) = (got.to_record(DateTime::UNIX_EPOCH), report.to_record(DateTime::UNIX_EPOCH));
        prop_assert_eq!(r1.position.map(|p| (p.lat, p.lon, p.accuracy_m, p.course_deg)),
                        r2.position.map(|p| (p.lat, p.lon, p.accuracy_m, p.course_deg)));
        prop_assert_eq!(r1.device_time, r2.device_time);
        prop_assert_eq!(r1.battery_pct, r2.battery_pct);
        prop_assert_eq!(r1.charging, r2.charging);
    }

    #[test]
    fn osmand_round_trip(report in osmand_report()) {
        let q = report.to_query().unwrap();
        prop_assert_eq!(osmand::decode(&q).unwrap(), report.clone());
        prop_assert_eq!(osmand::decode(&format!("GET /?{q} HTTP/1.1")).unwrap(), report);
    }

    #[test]
    fn em_round_trip(msg in em_message()) {
        let topic = msg.topic().unwrap();
        let payload = msg.payload().unwrap();
        let got = em::decode(&topic, &payload).unwrap();
        prop_assert_eq!(got.to_records(DateTime::UNIX_EPOCH).len(), msg.payloads.len());
        prop_assert_eq!(got, msg);
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..600), cuts in vec(any::<usize>(), 0..4)) {
        let chunks = split_at_points(&data, &cuts);
        drive(&mut Gt06Codec::new(), &chunks);
        drive(&mut gt06_codec(), &chunks);
        drive(&mut TeltonikaCodec::new(), &chunks);
        drive(&mut TeltonikaCodec::with_imei("1"), &chunks);
        drive(&mut H02Codec::new().with_max_frame_len(128), &chunks);
        drive(&mut H02Codec::new().with_binary_len(42), &chunks);
        let text = String::from_utf8_lossy(&data);
        let _ = osmand::decode(&text);
        let _ = osmand::decode_all(&text);
        let _ = osmand::decode_json(&data);
        let _ = em_protocols::h02::parse_binary(&data);
        let _ = em::decode(&text, &data);
        let _ = em::decode("em/v1/x/telemetry", &data);
    }

    #[test]
    fn gt06_any_type_and_content_never_panics(proto in any::<u8>(), content in vec(any::<u8>(), 0..160), ext in any::<bool>()) {
        let now = DateTime::UNIX_EPOCH;
        if let Ok(message) = em_protocols::gt06::parse_message_ext(proto, &content, ext) {
            let frame = Gt06Frame::new(7, message);
            let _ = frame.to_records("x", now);
            let _ = frame.response_at(now);
            let _ = frame.kind();
        }
    }

    #[test]
    fn gt06_wrong_length_byte_still_decodes(frame in gt06_frame(), wrong in 5u8..=255) {
        let mut f = frame.to_bytes().unwrap().to_vec();
        prop_assume!(f[0] == 0x78 && f[2] != wrong && usize::from(wrong) + 60 >= usize::from(f[2]));
        f[2] = wrong;
        let n = f.len();
        let crc = em_protocols::crc16_x25(&f[2..n - 4]);
        f[n - 4..n - 2].copy_from_slice(&crc.to_be_bytes());
        let mut buf = BytesMut::from(&f[..]);
        let got = gt06_codec().decode_eof(&mut buf).unwrap().unwrap().unwrap();
        prop_assert_eq!(got, frame);
    }

    #[test]
    fn teltonika_data_and_udp_never_panic(data in vec(any::<u8>(), 0..400)) {
        let _ = teltonika::parse_data(&data);
        if let Ok(p) = udp::parse_udp(&data) {
            let _ = p.response();
            let _ = p.frame.to_records("x", DateTime::UNIX_EPOCH);
        }
    }

    #[test]
    fn teltonika_udp_round_trip(frame in teltonika_frame(), packet_id in any::<u16>(), avl_id in any::<u8>()) {
        prop_assume!(matches!(frame, TeltonikaFrame::Avl(_)));
        let p = udp::UdpPacket { packet_id, avl_packet_id: avl_id, imei: "356307042441013".into(), frame };
        let bytes = p.encode().unwrap();
        let got = udp::parse_udp(&bytes).unwrap();
        prop_assert_eq!(got.response(), udp::udp_ack(packet_id, avl_id, p.accepted()));
        prop_assert_eq!(got, p);
    }

    #[test]
    fn arbitrary_bytes_after_valid_prefix(frame in gt06_frame(), tframe in teltonika_frame(), noise in vec(any::<u8>(), 0..200)) {
        let mut g = frame.to_bytes().unwrap().to_vec();
        g.extend_from_slice(&noise);
        let out = drive(&mut gt06_codec(), &[&g]);
        prop_assert_eq!(out.first().cloned().unwrap().unwrap(), frame);
        let mut t = tframe.to_bytes().unwrap().to_vec();
        t.extend_from_slice(&noise);
        let out = drive(&mut TeltonikaCodec::with_imei("1"), &[&t]);
        prop_assert_eq!(out.first().cloned().unwrap().unwrap(), tframe);
    }

    #[test]
    fn gt06_split_stream_same_frames(
        frames in vec(gt06_frame(), 1..8),
        noise in vec(vec(any::<u8>().prop_filter("no marker", |b| *b != 0x78 && *b != 0x79), 0..6), 8),
        cuts in vec(any::<usize>(), 0..10),
    ) {
        let mut stream = Vec::new();
        for (f, n) in frames.iter().zip(&noise) {
            stream.extend_from_slice(n);
            stream.extend_from_slice(&f.to_bytes().unwrap());
        }
        let whole = drive(&mut gt06_codec(), &[&stream]);
        let parts = drive(&mut gt06_codec(), &split_at_points(&stream, &cuts));
        prop_assert_eq!(oks(&whole), frames.clone());
        prop_assert_eq!(oks(&parts), frames);
        prop_assert_eq!(error_summary(&whole), error_summary(&parts));
    }

    #[test]
    fn teltonika_split_stream_same_frames(frames in vec(teltonika_frame(), 1..5), cuts in vec(any::<usize>(), 0..10)) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&f.to_bytes().unwrap());
        }
        let whole = drive(&mut TeltonikaCodec::with_imei("1"), &[&stream]);
        let parts = drive(&mut TeltonikaCodec::with_imei("1"), &split_at_points(&stream, &cuts));
        prop_assert_eq!(oks(&whole), frames.clone());
        prop_assert_eq!(oks(&parts), frames);
    }

    #[test]
    fn h02_split_stream_same_frames(
        frames in vec(h02_frame(), 1..6),
        noise in vec("[a-z \r\n]{0,5}", 6),
        cuts in vec(any::<usize>(), 0..10),
    ) {
        let mut stream = String::new();
        for (f, n) in frames.iter().zip(&noise) {
            stream.push_str(n);
            stream.push_str(&f.to_text().unwrap());
        }
        let whole = drive(&mut H02Codec::new(), &[stream.as_bytes()]);
        let parts = drive(&mut H02Codec::new(), &split_at_points(stream.as_bytes(), &cuts));
        prop_assert_eq!(oks(&whole), frames.clone());
        prop_assert_eq!(oks(&parts), frames);
        prop_assert_eq!(error_summary(&whole), error_summary(&parts));
    }
}
