//! GT06 alarm and battery reading: per-device profiles, and the status block read after the
//! LBS block by its length (frames built here field by field, from the GT06 document's
//! "Alarm packet" layout).

use bytes::BytesMut;
use chrono::{TimeZone, Utc};
use em_model::DeviceEventKind as E;
use em_protocols::gt06::{BatteryScale, Gt06Codec, Gt06Frame, Gt06Profile, Imei, TerminalBits111};
use em_protocols::{crc16_x25, Decoder};

fn frame(proto: u8, content: &[u8], serial: u16) -> Vec<u8> {
    let mut f = vec![0x78, 0x78, (1 + content.len() + 4) as u8, proto];
    f.extend_from_slice(content);
    f.extend_from_slice(&serial.to_be_bytes());
    let crc = crc16_x25(&f[2..]);
    f.extend_from_slice(&crc.to_be_bytes());
    f.extend_from_slice(&[0x0D, 0x0A]);
    f
}

/// 2026-03-01 09:58:30, 9 satellites, 55.676 N 12.568 E, 4 km/h, course 90, positioned.
fn gps() -> Vec<u8> {
    let mut g = vec![26, 3, 1, 9, 58, 30, 0xC9];
    g.extend_from_slice(&((55.676f64 * 1_800_000.0).round() as u32).to_be_bytes());
    g.extend_from_slice(&((12.568f64 * 1_800_000.0).round() as u32).to_be_bytes());
    g.push(4);
    g.extend_from_slice(&(0x1400u16 | 90).to_be_bytes());
    g
}

fn decode(bytes: &[u8]) -> Gt06Frame {
    let mut c = Gt06Codec::with_imei(Imei::new(123_456_789_012_345).unwrap());
    let mut buf = BytesMut::from(bytes);
    c.decode(&mut buf).unwrap().unwrap().unwrap()
}

fn now() -> chrono::DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 10, 0, 0).unwrap()
}

/// An alarm with a 4-byte cell id (LBS length 10). Read at the old fixed offset, the status
/// bytes were the cell id's last byte and the next ones: 0x9C as terminal info (alarm bits
/// 011 → a false low-battery alarm) and the real terminal info 0x40 as battery (unknown
/// instead of 93 %).
#[test]
fn status_after_a_long_lbs_block_is_read_by_length() {
    let mut c = gps();
    c.push(10);
    c.extend_from_slice(&[0x00, 0xEE, 0x01, 0x12, 0x34, 0x01, 0x02, 0xAB, 0x9C]);
    c.extend_from_slice(&[0x40, 93, 3, 0x00, 0x02]);
    let r = decode(&frame(0x16, &c, 7)).to_record("x", now()).unwrap();
    assert_eq!(r.events, Vec::<E>::new(), "no false SOS");
    assert_eq!(r.battery_pct, Some(93));
    assert_eq!(r.gsm_signal, Some(75));
}

/// A real SOS behind an empty LBS block (length byte 0) is not missed.
#[test]
fn sos_behind_an_empty_lbs_block_is_read() {
    let mut c = gps();
    c.push(0);
    c.extend_from_slice(&[0x20 | 0x40, 5, 4, 0x01, 0x02]);
    let r = decode(&frame(0x16, &c, 8)).to_record("x", now()).unwrap();
    assert_eq!(r.events, vec![E::Sos]);
    assert_eq!(r.battery_pct, Some(83));
}

#[test]
fn battery_and_terminal_bits_follow_the_device_profile() {
    // Heartbeat: terminal 0x78 (alarm bits 111), battery byte 5, GSM 3, alarm 0.
    let f = decode(&frame(0x13, &[0x78, 5, 3, 0x00, 0x02], 9));
    let default = f.to_record("x", now()).unwrap();
    assert_eq!(default.battery_pct, Some(83)); // level 5 of 6
    assert!(default.events.contains(&E::StrapTamper)); // 111 = removal
    let vehicle = Gt06Profile {
        battery: BatteryScale::Percent,
        terminal_bits_111: TerminalBits111::OverSpeed,
    };
    let r = f.to_record_with("x", now(), &vehicle).unwrap();
    assert_eq!(r.battery_pct, Some(5)); // a percent device at 5 %
    assert!(!r.events.contains(&E::StrapTamper));
    assert_eq!(r.events, vec![E::Heartbeat]);
}

#[test]
fn every_unknown_alarm_code_is_reported_as_unknown() {
    use em_protocols::gt06::alarm::{alarm_byte, AlarmMeaning, ALARM_BYTE};
    for code in 0..=255u8 {
        let known = ALARM_BYTE.iter().any(|(c, _, _)| *c == code);
        let mut c = gps();
        c.push(9);
        c.extend_from_slice(&[0x00, 0xEE, 0x01, 0x12, 0x34, 0x00, 0xAB, 0xCD]);
        c.extend_from_slice(&[0x40, 5, 3, code, 0x02]);
        let r = decode(&frame(0x16, &c, 1)).to_record("x", now()).unwrap();
        let unknown = r.events.contains(&E::UnknownAlarm {
            code: u32::from(code),
        });
        assert_eq!(unknown, !known, "code {code:#04x}: {:?}", r.events);
        if let AlarmMeaning::Event(e) = alarm_byte(code) {
            assert!(r.events.contains(&e), "code {code:#04x}");
        }
    }
}
