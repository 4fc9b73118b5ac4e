//! Frames from public protocol documents, with the expected values worked out by hand
//! from the documents' field tables (not produced by our encoder).

use bytes::BytesMut;
use chrono::{TimeZone, Utc};
use em_model::{DeviceEventKind, FixSource, Protocol};
use em_protocols::gt06::{Gt06Cell, Gt06Codec, Gt06Message, Imei};
use em_protocols::h02::{self, H02Message};
use em_protocols::teltonika::{AvlCodec, IoElement, IoValue, TeltonikaCodec, TeltonikaFrame};
use em_protocols::{osmand, Decoder};

fn bytes(hex_str: &str) -> BytesMut {
    let compact: String = hex_str.split_whitespace().collect();
    BytesMut::from(&hex::decode(compact).unwrap()[..])
}

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap()
}

// GT06 GPS tracker communication protocol: login example (section "login message").
#[test]
fn gt06_login_example() {
    let mut codec = Gt06Codec::new();
    let mut buf = bytes("78 78 0D 01 01 23 45 67 89 01 23 45 00 01 8C DD 0D 0A");
    let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(frame.serial, 1);
    assert_eq!(
        frame.message,
        Gt06Message::Login {
            imei: Imei::new(123_456_789_012_345).unwrap(),
            type_id: None,
            timezone: None
        }
    );
    assert_eq!(codec.device_id(), Some("123456789012345"));
    // The document's server response to this login.
    assert_eq!(
        frame.response().unwrap().as_ref(),
        &hex::decode("787805010001D9DC0D0A").unwrap()[..]
    );
    let recs = frame.to_records(codec.device_id().unwrap(), now());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].events, vec![DeviceEventKind::Login]);
    assert_eq!(recs[0].seq, Some(1));
}

// GT06 protocol document: location data example (protocol 0x12).
#[test]
fn gt06_location_example() {
    let mut codec = Gt06Codec::with_imei(Imei::new(123_456_789_012_345).unwrap());
    let mut buf = bytes(
        "78 78 1F 12 0B 08 1D 11 2E 10 CF 02 7A C7 EB 0C 46 58 49 00 14 8F 01 CC 00 28 7D 00 1F B8 00 03 80 81 0D 0A",
    );
    let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    assert_eq!(frame.serial, 3);
    let Gt06Message::Location {
        protocol,
        gps,
        cell,
        ..
    } = &frame.message
    else {
        panic!("not a location: {frame:?}");
    };
    assert_eq!(*protocol, 0x12);
    // 0B 08 1D 11 2E 10 = 2011-08-29 17:46:16
    assert_eq!(
        gps.time,
        Utc.with_ymd_and_hms(2011, 8, 29, 17, 46, 16).unwrap()
    );
    // CF: GPS info length 12, 15 satellites
    assert_eq!((gps.info_len, gps.satellites), (12, 15));
    // 0x027AC7EB = 41601003 / 1 800 000 = 23.111668°; 0x0C465849 = 205936713 → 114.409285°
    assert!((gps.lat - 23.111_668_3).abs() < 1e-6);
    assert!((gps.lon - 114.409_285).abs() < 1e-6);
    // 0x148F: positioned, north, east, course 143°
    assert!(gps.positioned && !gps.differential);
    assert_eq!(gps.course, 143);
    assert_eq!(gps.speed_kmh, 0);
    assert_eq!(
        *cell,
        Some(Gt06Cell {
            mcc: 460,
            mnc: 0,
            lac: 0x287D,
            cell_id: 0x1FB8
        })
    );
    assert_eq!(frame.response(), None);
    let r = frame.to_record("123456789012345", now()).unwrap();
    let p = r.position.unwrap();
    assert!(p.valid);
    assert_eq!(p.source, FixSource::Gnss);
    assert_eq!(p.course_deg, Some(143.0));
    assert_eq!(r.device_time, gps.time);
    assert_eq!(r.received_time, now());
    // The serial is a transport counter, not the fix's identity: a re-upload of the same
    // fix with another serial must map to the same record key (device, device time, seq).
    assert_eq!(r.seq, None);
}

// Heartbeat captured from a device and discussed against the GT06 document
// (terminal info 0x40, voltage level 5, GSM level 3, alarm 0x02 power cut, language 0x01).
#[test]
fn gt06_heartbeat_example() {
    let mut codec = Gt06Codec::with_imei(Imei::new(123_456_789_012_345).unwrap());
    let mut buf = bytes("78780a13400503020100741c3b0d0a");
    let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    assert_eq!(frame.serial, 0x74);
    let Gt06Message::Status(s) = frame.message else {
        panic!()
    };
    assert_eq!(s.terminal_info, 0x40);
    assert!(s.gps_tracking() && !s.charging() && !s.defence());
    assert_eq!(
        (s.voltage_level, s.gsm_level, s.alarm, s.language),
        (5, 3, 2, 1)
    );
    let r = frame.to_record("x", now()).unwrap();
    assert_eq!(r.battery_pct, Some(83)); // level 5 of 6
    assert_eq!(r.gsm_signal, Some(75)); // level 3 of 4
    assert_eq!(r.charging, Some(false));
    assert_eq!(
        r.events,
        vec![DeviceEventKind::Heartbeat, DeviceEventKind::PowerCut]
    );
    let resp = frame.response().unwrap();
    assert_eq!(&resp[..6], &[0x78, 0x78, 0x05, 0x13, 0x00, 0x74]);
    assert_eq!(&resp[8..], &[0x0D, 0x0A]);
}

// Teltonika wiki, "Codec 8" example (one record, no GPS fix, 5 IO elements).
#[test]
fn teltonika_codec8_example() {
    let mut codec = TeltonikaCodec::new();
    let mut buf = bytes("000F333536333037303432343431303133");
    let imei = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    assert_eq!(imei, TeltonikaFrame::Imei("356307042441013".into()));
    assert_eq!(imei.response(), None);
    let mut buf = bytes("000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF");
    let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    assert!(buf.is_empty());
    let TeltonikaFrame::Avl(p) = &frame else {
        panic!()
    };
    assert_eq!(p.codec, AvlCodec::Codec8);
    assert_eq!(p.records.len(), 1);
    let rec = &p.records[0];
    // 0x0000016B40D8EA30 = 1560161086000 ms = 2019-06-10 10:04:46 UTC
    assert_eq!(
        rec.timestamp,
        Utc.with_ymd_and_hms(2019, 6, 10, 10, 4, 46).unwrap()
    );
    assert_eq!(rec.priority, 1);
    assert_eq!(rec.gps.satellites, 0);
    assert_eq!(rec.event_io, 1);
    assert_eq!(
        rec.io,
        vec![
            IoElement {
                id: 21,
                value: IoValue::U8(3)
            },
            IoElement {
                id: 1,
                value: IoValue::U8(1)
            },
            IoElement {
                id: 66,
                value: IoValue::U16(0x5E0F)
            },
            IoElement {
                id: 241,
                value: IoValue::U32(0x601A)
            },
            IoElement {
                id: 78,
                value: IoValue::U64(0)
            },
        ]
    );
    assert_eq!(frame.response().unwrap().as_ref(), &[0, 0, 0, 1]);
    let recs = frame.to_records("356307042441013", now());
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].protocol, Protocol::Teltonika);
    assert_eq!(recs[0].position, None); // no fix ever: 0,0 with 0 satellites
    assert_eq!(recs[0].gsm_signal, Some(60)); // IO 21 = 3 of 5
}

// Teltonika wiki, "Codec 8 Extended" example.
#[test]
fn teltonika_codec8e_example() {
    let mut codec = TeltonikaCodec::with_imei("356307042441013");
    let mut buf = bytes("000000000000004A8E010000016B412CEE000100000000000000000000000000000000010005000100010100010011001D00010010015E2C880002000B000000003544C87A000E000000001DD7E06A00000100002994");
    let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    let TeltonikaFrame::Avl(p) = &frame else {
        panic!()
    };
    assert_eq!(p.codec, AvlCodec::Codec8Extended);
    let rec = &p.records[0];
    // 0x0000016B412CEE00 = 1560166592000 ms = 2019-06-10 11:36:32 UTC
    assert_eq!(
        rec.timestamp,
        Utc.with_ymd_and_hms(2019, 6, 10, 11, 36, 32).unwrap()
    );
    assert_eq!(rec.priority, 1);
    assert_eq!(rec.event_io, 1);
    assert_eq!(
        rec.io,
        vec![
            IoElement {
                id: 1,
                value: IoValue::U8(1)
            },
            IoElement {
                id: 17,
                value: IoValue::U16(0x1D)
            },
            IoElement {
                id: 16,
                value: IoValue::U32(0x015E2C88)
            },
            IoElement {
                id: 11,
                value: IoValue::U64(0x3544C87A)
            },
            IoElement {
                id: 14,
                value: IoValue::U64(0x1DD7E06A)
            },
        ]
    );
    assert_eq!(frame.response().unwrap().as_ref(), &[0, 0, 0, 1]);
}

// H02 platform protocol V1.0.5, "Real-time location" example.
#[test]
fn h02_location_example() {
    let text = "*HQ,353505910449999,V1,052825,A,2239.4210,N,11400.8825,E,0.00,348,180814,FFFFFFFF,90,3,460,0,9376,8532,9876,4357,0,0 #";
    let mut codec = h02::H02Codec::new();
    let mut buf = BytesMut::from(text.as_bytes());
    let frame = codec.decode(&mut buf).unwrap().unwrap().unwrap();
    assert!(buf.is_empty());
    assert_eq!(frame.imei, "353505910449999");
    let H02Message::Location(loc) = &frame.message else {
        panic!()
    };
    assert_eq!(
        loc.time,
        Utc.with_ymd_and_hms(2014, 8, 18, 5, 28, 25).unwrap()
    );
    assert!(loc.valid);
    // 22° 39.4210' = 22.657017°, 114° 0.8825' = 114.014708°
    assert!((loc.lat - 22.657_016_7).abs() < 1e-6);
    assert!((loc.lon - 114.014_708_3).abs() < 1e-6);
    assert_eq!(loc.speed_knots, 0.0);
    assert_eq!(loc.course, 348);
    assert_eq!(loc.status, 0xFFFF_FFFF);
    assert_eq!(loc.battery_pct, Some(90));
    let r = &frame.to_records(frame.device_id(), now())[0];
    assert!(r.events.is_empty());
    assert_eq!(r.battery_pct, Some(90));
    // The document's server confirmation of V1.
    let t = Utc.with_ymd_and_hms(2025, 3, 15, 10, 0, 0).unwrap();
    let reply = frame.response_at(t).unwrap();
    assert!(reply.ends_with(b",V4,V1,20250315100000#"), "{reply:?}");
}

#[test]
fn h02_heartbeat_and_alarm_examples() {
    let hb = h02::parse_frame("*HQ,353505910449999,XT#").unwrap();
    assert_eq!(
        hb.message,
        H02Message::Heartbeat {
            command: "XT".into(),
            battery_pct: None,
        }
    );
    assert_eq!(
        hb.to_records("x", now())[0].events,
        vec![DeviceEventKind::Heartbeat]
    );
    // Document's ALRM example: type 1 = SOS; "0" in the validity field = not a valid fix.
    let al = h02::parse_frame("*HQ,353505910449999,ALRM,1,052825,0,2239.4210,N,11400.8825,E,0.00,348,180814,FFFFFFFF,1CC,0,25FC,F48,90,  5FC-F48-10|  25FC-F48-6|25FC-F48-7#").unwrap();
    let H02Message::Alarm { kind, location } = &al.message else {
        panic!()
    };
    assert_eq!(*kind, 1);
    let loc = location.as_ref().unwrap();
    assert!(!loc.valid);
    assert_eq!(loc.battery_pct, None);
    let r = &al.to_records("x", now())[0];
    assert_eq!(r.events, vec![DeviceEventKind::Sos]);
}

// Status word per the document's table: second byte bit 2 (SOS) cleared, bit 3 (host on
// backup battery) cleared → 0xFFF3FFFF.
#[test]
fn h02_status_bits() {
    use em_protocols::h02::{H02Profile, SensorUse};
    assert_eq!(
        h02::status_events(0xFFF3_FFFF),
        vec![DeviceEventKind::Sos, DeviceEventKind::PowerCut]
    );
    // Low-level sensor 1 (first byte bit 7) is a strap loop only on some models: without
    // a device profile it is an unknown alarm, never a guessed tamper (the earlier mapping
    // read it as StrapTamper and "storage battery removed" as CaseTamper).
    assert_eq!(
        h02::status_events(0x7FFF_FFFF),
        vec![DeviceEventKind::UnknownAlarm { code: 31 }]
    );
    let tag = H02Profile {
        sensor1: SensorUse::Strap,
        sensor2: SensorUse::Case,
    };
    assert_eq!(
        h02::status_events_with(0x7F7F_FFFF, &tag),
        vec![DeviceEventKind::CaseTamper, DeviceEventKind::StrapTamper]
    );
    // Second byte bit 4: storage battery removed = power removed.
    assert_eq!(
        h02::status_events(0xFFEF_FFFF),
        vec![DeviceEventKind::PowerCut]
    );
    // Theft (4.0) and robbery (4.1) are not read as vibration / SOS.
    assert_eq!(
        h02::status_events(0xFFFF_FFFC),
        vec![
            DeviceEventKind::UnknownAlarm { code: 0 },
            DeviceEventKind::UnknownAlarm { code: 1 }
        ]
    );
    // States (ACC on, door open, fortified, engine, oil cut, high-level sensors) are no alarms.
    assert!(h02::status_events(0x97FF_C0FF).is_empty());
    assert!(h02::status_events(0xFFFF_FFFF).is_empty());
    // Every one of the 32 bits is in the table exactly once.
    let bits: Vec<u32> = h02::STATUS_TABLE.iter().map(|r| r.0).collect();
    assert_eq!(bits, (0..32).collect::<Vec<_>>());
}

// Traccar Client style request.
#[test]
fn osmand_request_example() {
    let rep = osmand::decode("GET /?id=123456&timestamp=1700000000&lat=55.6761&lon=12.5683&speed=10&bearing=270.5&altitude=14&accuracy=9.5&batt=76.0&charge=true HTTP/1.1").unwrap();
    assert_eq!(rep.id, "123456");
    assert_eq!(
        rep.time,
        Some(Utc.with_ymd_and_hms(2023, 11, 14, 22, 13, 20).unwrap())
    );
    let r = rep.to_record(now());
    let p = r.position.unwrap();
    assert_eq!((p.lat, p.lon), (55.6761, 12.5683));
    assert!((p.speed_kmh.unwrap() - 18.52).abs() < 1e-3); // 10 knots
    assert_eq!(p.course_deg, Some(270.5));
    assert_eq!(p.accuracy_m, Some(9.5));
    assert_eq!(r.battery_pct, Some(76));
    assert_eq!(r.charging, Some(true));
    // ISO time and milliseconds
    let iso = osmand::decode("id=a&lat=1&lon=2&timestamp=2024-02-03T04:05:06Z").unwrap();
    assert_eq!(
        iso.time,
        Some(Utc.with_ymd_and_hms(2024, 2, 3, 4, 5, 6).unwrap())
    );
    let ms = osmand::decode("id=a&lat=1&lon=2&timestamp=1706933106000").unwrap();
    assert_eq!(ms.time, iso.time);
    let loc = osmand::decode("deviceid=b&location=1.5,-2.25&hdop=2").unwrap();
    assert_eq!((loc.lat, loc.lon), (Some(1.5), Some(-2.25)));
    assert_eq!(
        loc.to_record(now()).position.unwrap().accuracy_m,
        Some(10.0)
    );
}
