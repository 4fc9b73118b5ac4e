//! H02 protocol: the text reports `*HQ,…#` and the binary reports `$…` (and `X…`).
//!
//! Text messages (fields separated by `,`; the maker tag is normally `HQ`, also `hq`, `TH`…):
//!
//! ```text
//! *HQ,IMEI,V1,hhmmss,A,ddmm.mmmm,N,dddmm.mmmm,E,speed,course,ddmmyy,status[,extra…]#   position
//! *HQ,IMEI,V2|V5|V6|V8|V19|VI1|SMS,…same position layout…#                           position variants
//! *HQ,IMEI,V4,<echo of a server command…>,hhmmss,A,…position…#                      command confirmation
//! *HQ,IMEI,XT#   *HQ,IMEI,HTBT[,battery]#   *HQ,IMEI,V0#                            heartbeats
//! *HQ,IMEI,LINK,hhmmss,rssi,satellites,battery,steps,turnovers,ddmmyy,status#        link status
//! *HQ,IMEI,NBR,hhmmss,mcc,mnc,delay,count,(lac,cid,rssi)×count,ddmmyy,status#        neighbour cells
//! *HQ,IMEI,V3,hhmmss,mccmnc,count,(lac,cid,rssi,rx)×count,battery,reboot,X,ddmmyy,status#
//! *hq,IMEI,VP1,V,mcc,mnc,lac,cid,rssi[Ylac,cid,rssi…]#  or  VP1,A,lat,N,lon,E,speed,course,ddmmyy#
//! *HQ,IMEI,BASE,hhmmss,mcc,mnc,(lac,cid)…,ddmmyy,status#                              cell (decimal)
//! *HQ,IMEI,BS,[hhmmss],mcc,mnc,(lac,cid,rssi)…,,status[,…]#                           cell (hex)
//! *HQ,IMEI,ALRM,type[,position…]#                                                     alarm
//! ```
//!
//! Sources: the H02 "GPRS communication protocol" document (message `V1`, the status word
//! table, the `V4` confirmation, the heartbeat); the layouts of the other variants were
//! learned from the open-source Traccar H02 decoder (read, not copied) and are marked
//! "layout: Traccar decoder" in [`STATUS_TABLE`] / the parsers below.
//!
//! Times are UTC, speed is in knots, course in degrees. Degree fields are not always
//! zero-padded (`954.9490,E` = 9° 54.9490′); the minutes are always the two digits before
//! the decimal point. `-dd-mm.mmmm` (dash form) is accepted too.
//!
//! `status` is 4 bytes as 8 hex digits with *negative logic* (a bit at 0 means the
//! condition is active); see [`STATUS_TABLE`] for every bit, its source and its event. Bits
//! whose meaning depends on how a device model is wired (the two low-level sensors, used as
//! strap / case loops by some tags) are mapped by a per-device [`H02Profile`]; unassigned,
//! an active sensor bit becomes `UnknownAlarm { code: bit }`, never silence and never a
//! guessed tamper.
//!
//! Binary report (`$`, 32 bytes with a 5-byte id; 42 bytes with an 8-byte id; 45/48 bytes
//! with extra data after the status), all BCD:
//!
//! ```text
//! '$' id(5|8) hhmmss(3) ddmmyy(3) lat ddmmmmmm(4) battery(1) lon dddmmmmmm+flags(5)
//!     speed(1.5) course(1.5) status(4) extra…
//! flags nibble: 0x2 = valid fix, 0x4 = north, 0x8 = east
//! ```
//!
//! The binary report carries no length: its length is a per-device setting
//! ([`H02Codec::with_binary_len`]); without it the codec picks the known length after
//! which the next frame starts (or the buffer ends). `X…` frames (32 bytes) are framed and
//! reported as an unknown type (their layout is not public).
//!
//! Replies (the H02 document's server confirmation `*HQ,IMEI,V4,<cmd>,yyyyMMddHHmmss#`):
//! `V1` and `NBR` are confirmed that way; `HTBT`/`V0` heartbeats are echoed
//! (`*HQ,IMEI,HTBT#`); nothing else is answered.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use em_model::{CellTower, DeviceEventKind, FixSource, Position, Protocol, Record};
use tokio_util::codec::{Decoder, Encoder};

use crate::util::{utc_from_fields, KNOTS_TO_KMH};
use crate::{CodecError, DecodeError, EncodeError};

const P: Protocol = Protocol::H02;

/// Default limit on a text frame's length (`*` to `#`).
pub const DEFAULT_MAX_FRAME_LEN: usize = 1024;
/// Binary report with a 5-byte (10-digit) id.
pub const BINARY_LEN_SHORT: usize = 32;
/// Binary report with an 8-byte (IMEI) id.
pub const BINARY_LEN_LONG_ID: usize = 42;
/// Binary report lengths the codec recognises without a per-device setting.
pub const BINARY_LENGTHS: [usize; 4] = [BINARY_LEN_SHORT, BINARY_LEN_LONG_ID, 45, 48];
/// Length of an `X` frame.
pub const X_FRAME_LEN: usize = 32;

/// Status bits (negative logic: a cleared bit means active). Bit `n` is bit `n % 8` of
/// document byte `4 - n / 8` (the document numbers the bytes from the first one sent).
pub mod status_bit {
    pub const THEFT: u32 = 0;
    pub const ROBBERY: u32 = 1;
    pub const NO_ENTRY_CROSS_BORDER: u32 = 4;
    pub const CROSS_BORDER: u32 = 7;
    pub const ACC_OFF: u32 = 10;
    pub const SOS: u32 = 18;
    pub const BACKUP_BATTERY: u32 = 19;
    pub const BATTERY_REMOVED: u32 = 20;
    pub const SENSOR2_LOW: u32 = 23;
    pub const BATTERY_REMOVAL_STATE: u32 = 28;
    pub const SENSOR1_LOW: u32 = 31;
}

/// What an active status bit means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusMeaning {
    /// An alarm with an exact model event.
    Event(DeviceEventKind),
    /// An alarm the model has no exact event for: `UnknownAlarm { code: bit }`.
    Alarm,
    /// Low-level sensor 1 / 2: meaning set per device by [`H02Profile`].
    Sensor1,
    Sensor2,
    /// A state, not an alarm (ACC, door, fortified…): no event.
    State,
}

use StatusMeaning::{Alarm, Event, Sensor1, Sensor2, State};

/// Every status bit. Source of every row: H02 "GPRS communication protocol" document,
/// section "vehicle status" (4 bytes, negative logic); "doc byte.bit" is the document's
/// numbering. Rows mapped to `Alarm` are alarms the model has no exact event for (they
/// become `UnknownAlarm { code: bit }`): theft (a shock sensor on some models, not on all)
/// and robbery (hijack) are not read as vibration / SOS.
pub const STATUS_TABLE: [(u32, &str, StatusMeaning); 32] = [
    (0, "doc 4.0 theft alarm", Alarm),
    (1, "doc 4.1 robbery alarm", Alarm),
    (2, "doc 4.2 overspeed alarm", Alarm),
    (3, "doc 4.3 illegal ignition alarm", Alarm),
    (
        4,
        "doc 4.4 no-entry cross-border alarm (in)",
        Event(DeviceEventKind::DeviceGeofence),
    ),
    (5, "doc 4.5 GPS antenna open circuit alarm", Alarm),
    (6, "doc 4.6 GPS antenna short circuit alarm", Alarm),
    (
        7,
        "doc 4.7 no-entry cross-border alarm (out)",
        Event(DeviceEventKind::DeviceGeofence),
    ),
    (8, "doc 3.0 door open", State),
    (9, "doc 3.1 vehicle fortified", State),
    (10, "doc 3.2 ACC", State),
    (11, "doc 3.3 reserved", State),
    (12, "doc 3.4 reserved", State),
    (13, "doc 3.5 engine", State),
    (14, "doc 3.6 custom alarm", Alarm),
    (15, "doc 3.7 overspeed", Alarm),
    (16, "doc 2.0 GPS receiver fault alarm", Alarm),
    (17, "doc 2.1 analog quantity over-limit alarm", Alarm),
    (18, "doc 2.2 SOS alarm", Event(DeviceEventKind::Sos)),
    (
        19,
        "doc 2.3 host powered by backup battery",
        Event(DeviceEventKind::PowerCut),
    ),
    (
        20,
        "doc 2.4 storage battery removed",
        Event(DeviceEventKind::PowerCut),
    ),
    (21, "doc 2.5 GPS antenna open circuit", Alarm),
    (22, "doc 2.6 GPS antenna short circuit", Alarm),
    (
        23,
        "doc 2.7 low level sensor 2 (strap loop on some tags)",
        Sensor2,
    ),
    (24, "doc 1.0 temperature alarm", Alarm),
    (25, "doc 1.1 password entered wrongly three times", Alarm),
    (26, "doc 1.2 GPRS blocked alarm", Alarm),
    (27, "doc 1.3 oil and engine cut off", State),
    (
        28,
        "doc 1.4 storage battery removal state",
        Event(DeviceEventKind::PowerCut),
    ),
    (29, "doc 1.5 high level sensor 1", State),
    (30, "doc 1.6 high level sensor 2", State),
    (
        31,
        "doc 1.7 low level sensor 1 (strap loop on some tags)",
        Sensor1,
    ),
];

/// `ALRM` message types. Source: H02 document, `ALRM` message (types 1–3). Other types
/// become `UnknownAlarm { code: ALRM_CODE_BASE + type }`.
pub const ALRM_TABLE: [(u8, &str, DeviceEventKind); 3] = [
    (1, "SOS", DeviceEventKind::Sos),
    (2, "low battery", DeviceEventKind::LowBattery),
    (3, "geo-fence", DeviceEventKind::DeviceGeofence),
];

/// `UnknownAlarm` codes of `ALRM` types are offset by this (status bits use 0–31).
pub const ALRM_CODE_BASE: u32 = 1000;

/// What a low-level sensor input is wired to on a device model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SensorUse {
    /// Not known: an active sensor is reported as `UnknownAlarm { code: bit }`.
    #[default]
    Unassigned,
    /// The strap loop: active = `StrapTamper`.
    Strap,
    /// The case switch: active = `CaseTamper`.
    Case,
}

/// Per-device-model settings of the H02 decoding (a registry setting per device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct H02Profile {
    /// Status bit 31 (low-level sensor 1).
    pub sensor1: SensorUse,
    /// Status bit 23 (low-level sensor 2).
    pub sensor2: SensorUse,
}

fn push_event(events: &mut Vec<DeviceEventKind>, e: DeviceEventKind) {
    if !events.contains(&e) {
        events.push(e)
    }
}

/// Events implied by an H02 status word, with the default (unassigned sensors) profile.
pub fn status_events(status: u32) -> Vec<DeviceEventKind> {
    status_events_with(status, &H02Profile::default())
}

/// Events implied by an H02 status word for a device model's `profile`.
pub fn status_events_with(status: u32, profile: &H02Profile) -> Vec<DeviceEventKind> {
    let mut ev = Vec::new();
    push_status_events(&mut ev, status, profile);
    ev
}

fn push_status_events(ev: &mut Vec<DeviceEventKind>, status: u32, profile: &H02Profile) {
    // Fast path: nothing active but states.
    const STATE_MASK: u32 = (1 << 8)
        | (1 << 9)
        | (1 << 10)
        | (1 << 11)
        | (1 << 12)
        | (1 << 13)
        | (1 << 27)
        | (1 << 29)
        | (1 << 30);
    if !status & !STATE_MASK == 0 {
        return;
    }
    for (bit, _, meaning) in STATUS_TABLE {
        if status & (1 << bit) != 0 {
            continue;
        }
        let sensor = |u: SensorUse| match u {
            SensorUse::Unassigned => Some(DeviceEventKind::UnknownAlarm { code: bit }),
            SensorUse::Strap => Some(DeviceEventKind::StrapTamper),
            SensorUse::Case => Some(DeviceEventKind::CaseTamper),
        };
        let e = match meaning {
            Event(e) => Some(e),
            Alarm => Some(DeviceEventKind::UnknownAlarm { code: bit }),
            Sensor1 => sensor(profile.sensor1),
            Sensor2 => sensor(profile.sensor2),
            State => None,
        };
        if let Some(e) = e {
            push_event(ev, e);
        }
    }
}

/// Event of an `ALRM` type.
pub fn alrm_event(kind: u8) -> DeviceEventKind {
    ALRM_TABLE
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, _, e)| *e)
        .unwrap_or(DeviceEventKind::UnknownAlarm {
            code: ALRM_CODE_BASE + u32::from(kind),
        })
}

/// A position report.
#[derive(Debug, Clone, PartialEq)]
pub struct H02Location {
    pub time: DateTime<Utc>,
    /// `A` = valid GNSS fix.
    pub valid: bool,
    pub lat: f64,
    pub lon: f64,
    pub speed_knots: f64,
    pub course: u16,
    /// Raw status word (negative logic).
    pub status: u32,
    /// Battery 0..=100 % (the wire's `99` means 100 %).
    pub battery_pct: Option<u8>,
}

/// A report without a position: link status, cell towers, or a position report whose
/// coordinates / time are empty.
#[derive(Debug, Clone, PartialEq)]
pub struct H02Status {
    /// The message type (`LINK`, `NBR`, `V3`, `VP1`, `BASE`, `BS`, `V1`…).
    pub command: String,
    pub time: Option<DateTime<Utc>>,
    pub status: Option<u32>,
    pub battery_pct: Option<u8>,
    pub cells: Vec<CellTower>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum H02Message {
    /// `V1`: position report.
    Location(H02Location),
    /// Another position report type (`V2`, `V5`, `V6`, `V8`, `V19`, `VI1`, `VP1`, `SMS`…).
    Report {
        command: String,
        location: H02Location,
    },
    /// `XT`, `HTBT`, `V0` or a bare `LINK`: keep-alive, `HTBT` with a battery level.
    Heartbeat {
        command: String,
        battery_pct: Option<u8>,
    },
    /// Status / cells without a position.
    Status(H02Status),
    /// `ALRM`: see [`ALRM_TABLE`].
    Alarm {
        kind: u8,
        location: Option<H02Location>,
    },
    /// `V4`: the device confirms a server command (`command` is the echo), often followed
    /// by a full position.
    CommandAck {
        command: String,
        location: Option<H02Location>,
    },
    /// `SMS` without a position: a text the device forwards. No record.
    Text { command: String, text: String },
    /// Binary `$` report.
    Binary(H02Location),
}

/// One H02 frame.
#[derive(Debug, Clone, PartialEq)]
pub struct H02Frame {
    /// Manufacturer tag, normally `HQ` (`$` for binary reports).
    pub maker: String,
    pub imei: String,
    pub message: H02Message,
}

impl H02Frame {
    pub fn kind(&self) -> &'static str {
        match &self.message {
            H02Message::Location(_) => "location",
            H02Message::Report { .. } => "report",
            H02Message::Heartbeat { .. } => "heartbeat",
            H02Message::Status(s) => match s.command.as_str() {
                "LINK" => "link",
                "NBR" | "V3" | "VP1" | "BASE" | "BS" => "cells",
                _ => "status",
            },
            H02Message::Alarm { .. } => "alarm",
            H02Message::CommandAck { .. } => "command_ack",
            H02Message::Text { .. } => "text",
            H02Message::Binary(_) => "binary_location",
        }
    }

    /// Device id carried by the frame.
    pub fn device_id(&self) -> &str {
        &self.imei
    }

    /// Normalised records with the default (unassigned sensors) profile.
    pub fn to_records(&self, device_id: &str, received: DateTime<Utc>) -> Vec<Record> {
        self.to_records_with(device_id, received, &H02Profile::default())
    }

    /// Normalised records for a device model's `profile`.
    pub fn to_records_with(
        &self,
        device_id: &str,
        received: DateTime<Utc>,
        profile: &H02Profile,
    ) -> Vec<Record> {
        let mut r = Record::new(device_id, P, received);
        match &self.message {
            H02Message::Location(loc)
            | H02Message::Report { location: loc, .. }
            | H02Message::Binary(loc) => apply_location(&mut r, loc, profile),
            H02Message::Heartbeat { battery_pct, .. } => {
                r.events.push(DeviceEventKind::Heartbeat);
                r.battery_pct = *battery_pct;
            }
            H02Message::Status(s) => {
                if let Some(t) = s.time {
                    r.device_time = t;
                }
                if s.command == "LINK" {
                    r.events.push(DeviceEventKind::Heartbeat);
                }
                if let Some(st) = s.status {
                    push_status_events(&mut r.events, st, profile);
                }
                r.battery_pct = s.battery_pct;
                r.cells = s.cells.clone();
            }
            H02Message::Alarm { kind, location } => {
                if let Some(loc) = location {
                    apply_location(&mut r, loc, profile);
                }
                push_event(&mut r.events, alrm_event(*kind));
            }
            H02Message::CommandAck { location, .. } => match location {
                Some(loc) => apply_location(&mut r, loc, profile),
                None => return Vec::new(),
            },
            H02Message::Text { .. } => return Vec::new(),
        }
        vec![r]
    }

    /// The bytes the device expects, timed now.
    pub fn response(&self) -> Option<Bytes> {
        self.response_at(Utc::now())
    }

    /// The bytes the device expects: the `V4` confirmation of `V1` and `NBR`, the echo of
    /// `HTBT` / `V0`; `None` otherwise.
    pub fn response_at(&self, now: DateTime<Utc>) -> Option<Bytes> {
        let confirm = |cmd: &str| {
            Bytes::from(format!(
                "*{},{},V4,{cmd},{}#",
                self.maker,
                self.imei,
                now.format("%Y%m%d%H%M%S")
            ))
        };
        match &self.message {
            H02Message::Location(_) => Some(confirm("V1")),
            H02Message::Status(s) if s.command == "NBR" => Some(confirm("NBR")),
            H02Message::Heartbeat { command, .. } if command == "HTBT" || command == "V0" => Some(
                Bytes::from(format!("*{},{},{command}#", self.maker, self.imei)),
            ),
            _ => None,
        }
    }

    /// The wire form of a text frame (`*…#`).
    pub fn to_text(&self) -> Result<String, EncodeError> {
        for (f, v) in [("maker", &self.maker), ("imei", &self.imei)] {
            if v.is_empty()
                || v.bytes()
                    .any(|b| matches!(b, b',' | b'*' | b'#') || !b.is_ascii_graphic())
            {
                return Err(EncodeError::new(P, f, format!("{v:?}")));
            }
        }
        let plain = |v: &str, f: &'static str| {
            if v.is_empty()
                || v.bytes()
                    .any(|b| matches!(b, b',' | b'*' | b'#') || !b.is_ascii_graphic())
            {
                Err(EncodeError::new(P, f, format!("{v:?}")))
            } else {
                Ok(())
            }
        };
        let mut s = format!("*{},{},", self.maker, self.imei);
        match &self.message {
            H02Message::Location(loc) => {
                s.push_str("V1,");
                write_location(&mut s, loc)?;
            }
            H02Message::Report { command, location } => {
                plain(command, "command")?;
                if !is_position_command(command) || command == "VP1" {
                    return Err(EncodeError::new(P, "command", command.clone()));
                }
                s.push_str(command);
                s.push(',');
                write_location(&mut s, location)?;
            }
            H02Message::Heartbeat {
                command,
                battery_pct,
            } => {
                if !matches!(command.as_str(), "XT" | "HTBT" | "LINK" | "V0") {
                    return Err(EncodeError::new(P, "heartbeat", command.clone()));
                }
                s.push_str(command);
                if let Some(b) = battery_pct {
                    if command != "HTBT" || *b > 100 {
                        return Err(EncodeError::new(P, "battery", b.to_string()));
                    }
                    s.push_str(&format!(",{b}"));
                }
            }
            H02Message::Status(st) => write_status(&mut s, st)?,
            H02Message::Alarm { kind, location } => {
                s.push_str(&format!("ALRM,{kind}"));
                if let Some(loc) = location {
                    s.push(',');
                    write_location(&mut s, loc)?;
                }
            }
            H02Message::CommandAck { command, location } => {
                if command.is_empty() || command.contains(['*', '#']) {
                    return Err(EncodeError::new(P, "command", command.clone()));
                }
                s.push_str("V4,");
                s.push_str(command);
                if let Some(loc) = location {
                    s.push(',');
                    write_location(&mut s, loc)?;
                }
            }
            H02Message::Text { command, text } => {
                plain(command, "command")?;
                if text.contains(['*', '#']) {
                    return Err(EncodeError::new(P, "text", text.clone()));
                }
                s.push_str(command);
                s.push(',');
                s.push_str(text);
            }
            H02Message::Binary(_) => {
                return Err(EncodeError::new(P, "binary", "not a text frame"));
            }
        }
        s.push('#');
        Ok(s)
    }

    /// The wire form: text, or the 32-byte binary report for [`H02Message::Binary`].
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match &self.message {
            H02Message::Binary(loc) => encode_binary(&self.imei, loc, dst),
            _ => {
                dst.put_slice(self.to_text()?.as_bytes());
                Ok(())
            }
        }
    }
}

fn apply_location(r: &mut Record, loc: &H02Location, profile: &H02Profile) {
    r.device_time = loc.time;
    r.position = Some(Position {
        lat: loc.lat,
        lon: loc.lon,
        accuracy_m: None,
        speed_kmh: Some((loc.speed_knots * KNOTS_TO_KMH) as f32),
        course_deg: Some(f32::from(loc.course)),
        altitude_m: None,
        satellites: None,
        valid: loc.valid,
        source: FixSource::Gnss,
    });
    r.battery_pct = loc.battery_pct;
    push_status_events(&mut r.events, loc.status, profile);
}

// ------------------------------------------------------------------ text encoding

/// Ten-thousandths of a minute per degree.
const UNITS_PER_DEG: f64 = 600_000.0;

fn coord_units(v: f64, max: f64, field: &'static str) -> Result<u64, EncodeError> {
    if !v.is_finite() || v.abs() > max {
        return Err(EncodeError::new(P, field, format!("{v} out of range")));
    }
    Ok((v.abs() * UNITS_PER_DEG).round() as u64)
}

fn write_coord(
    s: &mut String,
    v: f64,
    deg_width: usize,
    max: f64,
    hemis: [char; 2],
    field: &'static str,
) -> Result<(), EncodeError> {
    let units = coord_units(v, max, field)?;
    let deg = units / 600_000;
    let min = units % 600_000;
    s.push_str(&format!(
        "{deg:0deg_width$}{:02}.{:04},{}",
        min / 10_000,
        min % 10_000,
        if v < 0.0 { hemis[1] } else { hemis[0] }
    ));
    Ok(())
}

fn check_year(t: DateTime<Utc>) -> Result<i32, EncodeError> {
    let year = t.year() - 2000;
    if !(0..=99).contains(&year) {
        return Err(EncodeError::new(
            P,
            "time",
            format!("year {} out of range", t.year()),
        ));
    }
    Ok(year)
}

fn write_location(s: &mut String, l: &H02Location) -> Result<(), EncodeError> {
    let t = l.time;
    s.push_str(&format!(
        "{:02}{:02}{:02},{},",
        t.hour(),
        t.minute(),
        t.second(),
        if l.valid { 'A' } else { 'V' }
    ));
    write_coord(s, l.lat, 2, 90.0, ['N', 'S'], "lat")?;
    s.push(',');
    write_coord(s, l.lon, 3, 180.0, ['E', 'W'], "lon")?;
    if !l.speed_knots.is_finite() || l.speed_knots < 0.0 {
        return Err(EncodeError::new(P, "speed", l.speed_knots.to_string()));
    }
    let year = check_year(t)?;
    s.push_str(&format!(
        ",{:.2},{},{:02}{:02}{:02},{:08X}",
        l.speed_knots,
        l.course,
        t.day(),
        t.month(),
        year,
        l.status
    ));
    if let Some(b) = l.battery_pct {
        if b > 100 {
            return Err(EncodeError::new(P, "battery", b.to_string()));
        }
        s.push_str(&format!(",{:02}", if b == 100 { 99 } else { b }));
    }
    Ok(())
}

/// `NBR` and `LINK` are encodable (simulator, property tests); other status forms are not.
fn write_status(s: &mut String, st: &H02Status) -> Result<(), EncodeError> {
    let (Some(t), Some(status)) = (st.time, st.status) else {
        return Err(EncodeError::new(P, "status", "time and status required"));
    };
    let year = check_year(t)?;
    let hms = format!("{:02}{:02}{:02}", t.hour(), t.minute(), t.second());
    let dmy = format!("{:02}{:02}{:02}", t.day(), t.month(), year);
    match st.command.as_str() {
        "NBR" => {
            let first = st
                .cells
                .first()
                .ok_or_else(|| EncodeError::new(P, "cells", "NBR needs a cell"))?;
            if st.battery_pct.is_some() {
                return Err(EncodeError::new(P, "battery", "not in NBR"));
            }
            s.push_str(&format!(
                "NBR,{hms},{},{},0,{}",
                first.mcc,
                first.mnc,
                st.cells.len()
            ));
            for c in &st.cells {
                if (c.mcc, c.mnc) != (first.mcc, first.mnc) {
                    return Err(EncodeError::new(P, "cells", "one network per NBR"));
                }
                s.push_str(&format!(
                    ",{},{},{}",
                    c.lac,
                    c.cell_id,
                    c.signal.unwrap_or(0)
                ));
            }
            s.push_str(&format!(",{dmy},{status:08X}"));
        }
        "LINK" => {
            if !st.cells.is_empty() {
                return Err(EncodeError::new(P, "cells", "not in LINK"));
            }
            let b = st.battery_pct.unwrap_or(0).min(100);
            s.push_str(&format!("LINK,{hms},0,0,{b},0,0,{dmy},{status:08X}"));
        }
        other => return Err(EncodeError::new(P, "status", other.to_owned())),
    }
    Ok(())
}

// ------------------------------------------------------------------ text decoding

fn bad(field: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError::malformed(P, field, detail)
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

fn two(s: &str, at: usize) -> u32 {
    s.get(at..at + 2).and_then(|d| d.parse().ok()).unwrap_or(99)
}

/// `hhmmss` → seconds of day parts; `None` when empty.
fn parse_hms(s: &str) -> Result<Option<(u32, u32, u32)>, DecodeError> {
    if s.is_empty() {
        return Ok(None);
    }
    if !digits(s, 6) {
        return Err(bad("time", format!("{s:?} is not hhmmss")));
    }
    let (h, m, sec) = (two(s, 0), two(s, 2), two(s, 4));
    if h > 23 || m > 59 || sec > 59 {
        return Err(bad("time", format!("{s:?} is not a time of day")));
    }
    Ok(Some((h, m, sec)))
}

/// `ddmmyy` → date; `None` when empty or all zeros (no GNSS time yet).
fn parse_dmy(s: &str) -> Result<Option<NaiveDate>, DecodeError> {
    if s.is_empty() || s == "000000" {
        return Ok(None);
    }
    if !digits(s, 6) {
        return Err(bad("date", format!("{s:?} is not ddmmyy")));
    }
    NaiveDate::from_ymd_opt(2000 + two(s, 4) as i32, two(s, 2), two(s, 0))
        .map(Some)
        .ok_or_else(|| bad("date", format!("{s:?} is not a date")))
}

fn join_time(date: Option<NaiveDate>, hms: Option<(u32, u32, u32)>) -> Option<DateTime<Utc>> {
    let (d, (h, m, s)) = (date?, hms?);
    utc_from_fields(d.year(), d.month(), d.day(), h, m, s)
}

/// A coordinate: `(d)ddmm.mmmm` with any number of degree digits (the minutes are the two
/// digits before the point), digits only (`ddmmmmmm`: 4 implied decimals), or the dash
/// form `-dd-mm.mmmm`. `Ok(None)` when the field is empty.
fn parse_coord(
    v: &str,
    hemi: &str,
    pos: char,
    neg: char,
    max: f64,
    field: &'static str,
) -> Result<Option<f64>, DecodeError> {
    if v.is_empty() {
        return Ok(None);
    }
    let err = || bad(field, format!("{v:?} is not (d)ddmm.mmmm"));
    let (deg, min): (f64, f64) = if let Some(rest) = v.strip_prefix('-') {
        let (d, m) = rest.split_once('-').ok_or_else(err)?;
        if d.is_empty() || !d.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        (
            d.parse().map_err(|_| err())?,
            parse_minutes(m).ok_or_else(err)?,
        )
    } else {
        let int_len = v.find('.').unwrap_or(v.len());
        let min_start = if v.contains('.') {
            int_len.checked_sub(2)
        } else {
            v.len().checked_sub(6)
        }
        .ok_or_else(err)?;
        let (d, m) = v.split_at(min_start);
        if !d.bytes().all(|b| b.is_ascii_digit()) || d.len() > 3 {
            return Err(err());
        }
        let deg = if d.is_empty() {
            0.0
        } else {
            d.parse().map_err(|_| err())?
        };
        let min = if v.contains('.') {
            parse_minutes(m)
        } else {
            m.parse::<u32>().ok().map(|u| f64::from(u) / 10_000.0)
        }
        .ok_or_else(err)?;
        (deg, min)
    };
    if min >= 60.0 {
        return Err(bad(field, format!("{v:?}: minutes ≥ 60")));
    }
    let value = deg + min / 60.0;
    if value > max {
        return Err(bad(field, format!("{v:?} out of range")));
    }
    match hemi.chars().next() {
        Some(h) if h == neg && hemi.len() == 1 => Ok(Some(-value)),
        Some(h) if h == pos && hemi.len() == 1 => Ok(Some(value)),
        _ => Err(bad(field, format!("hemisphere {hemi:?}"))),
    }
}

fn parse_minutes(m: &str) -> Option<f64> {
    let ok = !m.is_empty()
        && m.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && m.bytes().filter(|&b| b == b'.').count() <= 1
        && !m.starts_with('.');
    ok.then(|| m.parse::<f64>().ok()).flatten()
}

fn is_hex8(s: &str) -> bool {
    s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn parse_status(s: &str) -> Result<u32, DecodeError> {
    if !is_hex8(s) && !(1..8).contains(&s.len()) {
        return Err(bad("status", format!("{s:?} is not 8 hex digits")));
    }
    u32::from_str_radix(s, 16).map_err(|_| bad("status", format!("{s:?} is not hex")))
}

fn battery_field(b: &str) -> Result<u8, DecodeError> {
    let v: u8 = b
        .parse()
        .map_err(|_| bad("battery", format!("{b:?} is not a level")))?;
    if v > 100 {
        return Err(bad("battery", format!("{v} is not a percentage")));
    }
    Ok(if v == 99 { 100 } else { v })
}

/// The fields of a position report, as far as they are present.
struct Fix {
    time: Option<DateTime<Utc>>,
    valid: bool,
    coords: Option<(f64, f64)>,
    speed_knots: f64,
    course: u16,
    status: Option<u32>,
    battery_pct: Option<u8>,
}

impl Fix {
    fn location(&self) -> Option<H02Location> {
        let (time, (lat, lon)) = (self.time?, self.coords?);
        Some(H02Location {
            time,
            valid: self.valid,
            lat,
            lon,
            speed_knots: self.speed_knots,
            course: self.course,
            status: self.status.unwrap_or(u32::MAX),
            battery_pct: self.battery_pct,
        })
    }

    fn status(self, command: &str) -> H02Status {
        H02Status {
            command: command.to_owned(),
            time: self.time,
            status: self.status,
            battery_pct: self.battery_pct,
            cells: Vec::new(),
        }
    }
}

/// Parse `hhmmss,A,lat,N,lon,E,speed,course,[battery,]ddmmyy[,sim,sim,sim],status[,battery|extra…]`.
fn parse_fix(f: &[&str]) -> Result<Fix, DecodeError> {
    if f.len() < 9 {
        return Err(bad(
            "location",
            format!("{} fields, need at least 9", f.len()),
        ));
    }
    let hms = parse_hms(f[0])?;
    // `A` valid; `V` not valid; `B` (differential, some firmware) valid; digits are a
    // "coding scheme" some models send instead (layout: Traccar decoder): treated as not
    // valid, since the document defines no digit value.
    let valid = matches!(f[1], "A" | "B");
    let lat = parse_coord(f[2], f[3], 'N', 'S', 90.0, "latitude")?;
    let lon = parse_coord(f[4], f[5], 'E', 'W', 180.0, "longitude")?;
    let speed_knots = if f[6].is_empty() {
        0.0
    } else {
        f[6].parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0 && *v < 10_000.0)
            .ok_or_else(|| bad("speed", format!("{:?}", f[6])))?
    };
    let course = if f[7].is_empty() {
        0
    } else {
        f[7].parse::<f64>()
            .ok()
            .filter(|v| (0.0..=360.0).contains(v))
            .map(|v| (v.round() as u16) % 360)
            .ok_or_else(|| bad("course", format!("{:?}", f[7])))?
    };
    // Some firmware puts a battery field between course and date.
    let mut i = 8;
    let mut battery_pct = None;
    if !digits(f[8], 6)
        && !f[8].is_empty()
        && f[8].len() <= 3
        && f.get(9).is_some_and(|d| digits(d, 6))
    {
        battery_pct = Some(battery_field(f[8])?);
        i = 9;
    }
    let date = parse_dmy(f[i])?;
    i += 1;
    // V19 and others: three SIM / network fields between date and status.
    if f.get(i).is_some_and(|s| !is_hex8(s)) && f.get(i + 3).is_some_and(|s| is_hex8(s)) {
        i += 3;
    }
    let status = match f.get(i) {
        Some(s) if !s.is_empty() => Some(parse_status(s)?),
        _ => None,
    };
    // Battery when the next field is a 1–2 digit level and not the start of a 4-field
    // cell block (mcc,mnc,lac,cid) that some firmware sends instead.
    let rest = f.get(i + 1..).unwrap_or_default();
    if battery_pct.is_none() {
        if let Some(b) = rest.first() {
            if rest.len() != 4
                && (1..=2).contains(&b.len())
                && b.bytes().all(|c| c.is_ascii_digit())
            {
                battery_pct = Some(battery_field(b)?);
            }
        }
    }
    let coords = match (lat, lon) {
        (Some(a), Some(b)) => Some((a, b)),
        (None, None) => None,
        _ => return Err(bad("location", "only one of latitude / longitude")),
    };
    Ok(Fix {
        time: join_time(date, hms),
        valid,
        coords,
        speed_knots,
        course,
        status,
        battery_pct,
    })
}

/// A position report (`V1`, `V2`…): a location, or a status when coordinates / time are empty.
fn position_message(command: &str, f: &[&str]) -> Result<H02Message, DecodeError> {
    let fix = parse_fix(f)?;
    Ok(match fix.location() {
        Some(loc) if command == "V1" => H02Message::Location(loc),
        Some(location) => H02Message::Report {
            command: command.to_owned(),
            location,
        },
        None => H02Message::Status(fix.status(command)),
    })
}

/// Position report commands: `V` followed by a digit or `I`/`P` and digits (V1, V2, V19,
/// VI1, VP1…), and `SMS`.
fn is_position_command(c: &str) -> bool {
    if c == "SMS" {
        return true;
    }
    let Some(rest) = c.strip_prefix('V') else {
        return false;
    };
    let rest = rest
        .strip_prefix('I')
        .or_else(|| rest.strip_prefix('P'))
        .unwrap_or(rest);
    !rest.is_empty() && rest.len() <= 3 && rest.bytes().all(|b| b.is_ascii_digit())
}

fn num<T: std::str::FromStr>(s: &str, field: &'static str) -> Result<T, DecodeError> {
    s.trim()
        .parse()
        .map_err(|_| bad(field, format!("{s:?} is not a number")))
}

fn hex_num<T: TryFrom<u64>>(s: &str, field: &'static str) -> Result<T, DecodeError> {
    u64::from_str_radix(s.trim(), 16)
        .ok()
        .and_then(|v| T::try_from(v).ok())
        .ok_or_else(|| bad(field, format!("{s:?} is not hex")))
}

fn cell(mcc: u16, mnc: u16, lac: u32, cell_id: u64, signal: Option<i32>) -> CellTower {
    CellTower {
        mcc,
        mnc,
        lac,
        cell_id,
        signal,
    }
}

/// `NBR,hhmmss,mcc,mnc,delay,count,(lac,cid,rssi)×count,ddmmyy,status[,…]`.
/// Layout: Traccar decoder (`NBR`).
fn parse_nbr(f: &[&str]) -> Result<H02Status, DecodeError> {
    if f.len() < 7 {
        return Err(bad("NBR", format!("{} fields", f.len())));
    }
    let hms = parse_hms(f[0])?;
    let (mcc, mnc): (u16, u16) = (num(f[1], "mcc")?, num(f[2], "mnc")?);
    let count: usize = num(f[4], "cell count")?;
    let end = 5 + count * 3;
    if f.len() < end + 2 {
        return Err(bad(
            "NBR",
            format!("{count} cells announced, fields missing"),
        ));
    }
    let mut cells = Vec::with_capacity(count.min(16));
    for c in f[5..end].chunks_exact(3) {
        cells.push(cell(
            mcc,
            mnc,
            num(c[0], "lac")?,
            num(c[1], "cell id")?,
            Some(num(c[2], "rssi")?),
        ));
    }
    Ok(H02Status {
        command: "NBR".into(),
        time: join_time(parse_dmy(f[end])?, hms),
        status: Some(parse_status(f[end + 1])?),
        battery_pct: None,
        cells,
    })
}

/// `V3,hhmmss,mccmnc,count,(lac,cid,rssi,rx)×count,battery(hex),reboot,X,ddmmyy,status`.
/// Layout: Traccar decoder (`V3`). The battery field is a voltage code, not a level: not read.
fn parse_v3(f: &[&str]) -> Result<H02Status, DecodeError> {
    if f.len() < 8 {
        return Err(bad("V3", format!("{} fields", f.len())));
    }
    let hms = parse_hms(f[0])?;
    let net = f[1];
    if net.len() < 4 || !net.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("V3", format!("{net:?} is not mcc+mnc")));
    }
    let (mcc, mnc): (u16, u16) = (num(&net[..3], "mcc")?, num(&net[3..], "mnc")?);
    let count: usize = num(f[2], "cell count")?;
    let end = 3 + count * 4;
    if f.len() != end + 5 || f[end + 2] != "X" {
        return Err(bad(
            "V3",
            format!("{count} cells announced, fields do not match"),
        ));
    }
    let mut cells = Vec::with_capacity(count.min(16));
    for c in f[3..end].chunks_exact(4) {
        let signal = match c[3] {
            "" => None,
            s => Some(num::<i32>(s, "rx level")?),
        };
        cells.push(cell(
            mcc,
            mnc,
            num(c[0], "lac")?,
            num(c[1], "cell id")?,
            signal,
        ));
    }
    Ok(H02Status {
        command: "V3".into(),
        time: join_time(parse_dmy(f[end + 3])?, hms),
        status: Some(parse_status(f[end + 4])?),
        battery_pct: None,
        cells,
    })
}

/// `LINK,hhmmss,rssi,satellites,battery,steps,turnovers,ddmmyy,status`. Layout: Traccar decoder.
fn parse_link(f: &[&str]) -> Result<H02Status, DecodeError> {
    if f.len() < 8 {
        return Err(bad("LINK", format!("{} fields", f.len())));
    }
    Ok(H02Status {
        command: "LINK".into(),
        time: join_time(parse_dmy(f[6])?, parse_hms(f[0])?),
        status: Some(parse_status(f[7])?),
        battery_pct: Some(battery_field(f[3])?),
        cells: Vec::new(),
    })
}

/// `VP1,V,mcc,mnc,lac,cid,rssi[Ylac,cid,rssi…]` or `VP1,A,lat,N,lon,E,speed,course,ddmmyy`.
/// Layout: Traccar decoder. The position form has a date but no time of day: the device
/// time is the received time on that date, or midnight UTC of another date.
fn parse_vp1(f: &[&str], received: DateTime<Utc>) -> Result<H02Message, DecodeError> {
    match f.first().copied() {
        Some("V") => {
            if f.len() < 4 {
                return Err(bad("VP1", "cell fields missing"));
            }
            let (mcc, mnc): (u16, u16) = (num(f[1], "mcc")?, num(f[2], "mnc")?);
            let joined = f[3..].join(",");
            let mut cells = Vec::new();
            for c in joined.split('Y') {
                let v: Vec<&str> = c.split(',').collect();
                if v.len() != 3 {
                    return Err(bad("VP1", format!("cell {c:?} is not lac,cid,rssi")));
                }
                cells.push(cell(
                    mcc,
                    mnc,
                    num(v[0], "lac")?,
                    num(v[1], "cell id")?,
                    Some(num(v[2], "rssi")?),
                ));
            }
            Ok(H02Message::Status(H02Status {
                command: "VP1".into(),
                time: None,
                status: None,
                battery_pct: None,
                cells,
            }))
        }
        Some(v @ ("A" | "B")) => {
            if f.len() < 8 {
                return Err(bad("VP1", format!("{} fields", f.len())));
            }
            let _ = v;
            let lat = parse_coord(f[1], f[2], 'N', 'S', 90.0, "latitude")?;
            let lon = parse_coord(f[3], f[4], 'E', 'W', 180.0, "longitude")?;
            let (Some(lat), Some(lon)) = (lat, lon) else {
                return Err(bad("VP1", "empty coordinates"));
            };
            let speed_knots: f64 = num(f[5], "speed")?;
            let course: f64 = num(f[6], "course")?;
            if !(0.0..10_000.0).contains(&speed_knots) || !(0.0..=360.0).contains(&course) {
                return Err(bad("VP1", "speed / course out of range"));
            }
            let date = parse_dmy(f[7])?.ok_or_else(|| bad("date", "VP1 without a date"))?;
            let time = if date == received.date_naive() {
                received
            } else {
                date.and_hms_opt(0, 0, 0)
                    .map(|t| t.and_utc())
                    .unwrap_or(received)
            };
            Ok(H02Message::Report {
                command: "VP1".into(),
                location: H02Location {
                    time,
                    valid: true,
                    lat,
                    lon,
                    speed_knots,
                    course: (course.round() as u16) % 360,
                    status: u32::MAX,
                    battery_pct: None,
                },
            })
        }
        other => Err(bad("VP1", format!("mode {other:?}"))),
    }
}

/// `BASE,hhmmss,mcc,mnc,(lac,cid)…,ddmmyy,status` (decimal; all-zero cells = none).
/// Layout: Traccar decoder's test traffic (no public document).
fn parse_base(f: &[&str]) -> Result<H02Status, DecodeError> {
    if f.len() < 7 || !(f.len() - 5).is_multiple_of(2) {
        return Err(bad("BASE", format!("{} fields", f.len())));
    }
    let n = f.len();
    let hms = parse_hms(f[0])?;
    let (mcc, mnc): (u16, u16) = (num(f[1], "mcc")?, num(f[2], "mnc")?);
    let mut cells = Vec::new();
    for c in f[3..n - 2].chunks_exact(2) {
        let (lac, cid): (u32, u64) = (num(c[0], "lac")?, num(c[1], "cell id")?);
        if lac != 0 || cid != 0 {
            cells.push(cell(mcc, mnc, lac, cid, None));
        }
    }
    Ok(H02Status {
        command: "BASE".into(),
        time: join_time(parse_dmy(f[n - 2])?, hms),
        status: Some(parse_status(f[n - 1])?),
        battery_pct: None,
        cells,
    })
}

/// `BS,[hhmmss],mcc,mnc,(lac,cid,rssi)…,,status[,…]` (hex mcc/mnc/lac/cid).
/// Layout: Traccar decoder's test traffic (no public document).
fn parse_bs(f: &[&str]) -> Result<H02Status, DecodeError> {
    let blank = f
        .iter()
        .skip(3)
        .position(|s| s.is_empty())
        .map(|p| p + 3)
        .ok_or_else(|| bad("BS", "no end of the cell list"))?;
    if f.len() < 4 || !(blank - 3).is_multiple_of(3) {
        return Err(bad("BS", format!("{} fields", f.len())));
    }
    parse_hms(f[0])?; // a time of day without a date: not usable as the device time
    let (mcc, mnc): (u16, u16) = (hex_num(f[1], "mcc")?, hex_num(f[2], "mnc")?);
    let mut cells = Vec::new();
    for c in f[3..blank].chunks_exact(3) {
        let (lac, cid): (u32, u64) = (hex_num(c[0], "lac")?, hex_num(c[1], "cell id")?);
        if lac != 0 || cid != 0 {
            cells.push(cell(mcc, mnc, lac, cid, Some(num(c[2], "rssi")?)));
        }
    }
    let status = match f.get(blank + 1) {
        Some(s) if !s.is_empty() => Some(parse_status(s)?),
        _ => None,
    };
    Ok(H02Status {
        command: "BS".into(),
        time: None,
        status,
        battery_pct: None,
        cells,
    })
}

/// `V4,<echo…>[,position]`: the position starts at the first `hhmmss,A|V|B` pair that
/// parses as one; everything before it is the echoed command.
fn parse_v4(f: &[&str]) -> Result<H02Message, DecodeError> {
    for i in 1..f.len().saturating_sub(8) {
        if digits(f[i], 6) && matches!(f[i + 1], "A" | "V" | "B") {
            if let Ok(fix) = parse_fix(&f[i..]) {
                if let Some(loc) = fix.location() {
                    return Ok(H02Message::CommandAck {
                        command: f[..i].join(","),
                        location: Some(loc),
                    });
                }
            }
        }
    }
    Ok(H02Message::CommandAck {
        command: f.join(","),
        location: None,
    })
}

/// Parse one text frame, with or without the `*` and `#` delimiters. `VP1` position
/// reports (no time of day) are timed now; see [`parse_frame_at`].
pub fn parse_frame(text: &str) -> Result<H02Frame, DecodeError> {
    parse_frame_at(text, Utc::now())
}

/// Parse one text frame received at `received`.
pub fn parse_frame_at(text: &str, received: DateTime<Utc>) -> Result<H02Frame, DecodeError> {
    parse_text(text, Some(received))
}

/// `clock` = received time; `None` = now, read only when a message needs it.
fn parse_text(text: &str, clock: Option<DateTime<Utc>>) -> Result<H02Frame, DecodeError> {
    let body = text.trim();
    let body = body.strip_prefix('*').unwrap_or(body);
    let body = body.strip_suffix('#').unwrap_or(body);
    let f: Vec<&str> = body.split(',').map(str::trim).collect();
    if f.len() < 3 {
        return Err(bad(
            "frame",
            format!("{} fields, need maker,id,command", f.len()),
        ));
    }
    let (maker, imei, cmd) = (f[0], f[1], f[2]);
    if maker.is_empty() || imei.is_empty() || !imei.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(bad("device id", format!("{imei:?}")));
    }
    let args = &f[3..];
    let message = match cmd {
        "V1" => position_message(cmd, args)?,
        "XT" | "V0" => H02Message::Heartbeat {
            command: cmd.to_owned(),
            battery_pct: None,
        },
        "HTBT" => H02Message::Heartbeat {
            command: cmd.to_owned(),
            battery_pct: match args.first() {
                Some(b) if !b.is_empty() => Some(battery_field(b)?),
                _ => None,
            },
        },
        "LINK" if args.is_empty() => H02Message::Heartbeat {
            command: cmd.to_owned(),
            battery_pct: None,
        },
        "LINK" => H02Message::Status(parse_link(args)?),
        "NBR" => H02Message::Status(parse_nbr(args)?),
        "V3" => H02Message::Status(parse_v3(args)?),
        "VP1" => parse_vp1(args, clock.unwrap_or_else(Utc::now))?,
        "BASE" => H02Message::Status(parse_base(args)?),
        "BS" => H02Message::Status(parse_bs(args)?),
        "ALRM" => {
            let kind = args
                .first()
                .and_then(|k| k.parse::<u8>().ok())
                .ok_or_else(|| bad("alarm type", format!("{:?}", args.first())))?;
            let location = if args.len() >= 10 {
                let fix = parse_fix(&args[1..])?;
                fix.location()
            } else {
                None
            };
            H02Message::Alarm { kind, location }
        }
        "V4" => parse_v4(args)?,
        "SMS" => match parse_fix(args).ok().and_then(|fix| fix.location()) {
            Some(location) => H02Message::Report {
                command: cmd.to_owned(),
                location,
            },
            None => H02Message::Text {
                command: cmd.to_owned(),
                text: args.join(","),
            },
        },
        c if is_position_command(c) && args.len() >= 9 => position_message(c, args)?,
        other => {
            return Err(DecodeError::UnknownType {
                protocol: P,
                kind: other.chars().take(16).collect(),
            })
        }
    };
    Ok(H02Frame {
        maker: maker.to_owned(),
        imei: imei.to_owned(),
        message,
    })
}

// ------------------------------------------------------------------ binary

fn bcd_digit(n: u8) -> Result<u32, DecodeError> {
    if n > 9 {
        return Err(bad("binary", format!("nibble {n:#x} is not a BCD digit")));
    }
    Ok(u32::from(n))
}

/// Nibbles of `bytes`, high first.
fn nibbles(bytes: &[u8]) -> impl Iterator<Item = u8> + '_ {
    bytes.iter().flat_map(|b| [b >> 4, b & 0x0F])
}

fn bcd_value(nibs: &[u8]) -> Result<u32, DecodeError> {
    nibs.iter()
        .try_fold(0u32, |acc, &n| Ok(acc * 10 + bcd_digit(n)?))
}

/// Battery byte of the binary report: 0 = not reported; 1–6 = level (as GT06's 0–6
/// voltage level); 7–100 = percent; anything else = not a level. Source: observed
/// device behaviour (the public document does not define the byte); per-model differences
/// belong in [`H02Profile`] when they are known.
fn binary_battery(b: u8) -> Option<u8> {
    match b {
        0 => None,
        1..=6 => Some(((u16::from(b) * 100 + 3) / 6) as u8),
        7..=100 => Some(b),
        _ => None,
    }
}

/// Decode one binary `$` report of `frame.len()` bytes (see the module docs).
pub fn parse_binary(frame: &[u8]) -> Result<H02Frame, DecodeError> {
    if frame.first() != Some(&b'$') || frame.len() < BINARY_LEN_SHORT {
        return Err(bad("binary", format!("{} bytes, need 32", frame.len())));
    }
    let long_id = frame.len() == BINARY_LEN_LONG_ID;
    let id_len = if long_id { 8 } else { 5 };
    let id_nibs: Vec<u8> = nibbles(&frame[1..1 + id_len]).collect();
    let id_digits = if long_id {
        &id_nibs[..15]
    } else {
        &id_nibs[..]
    };
    let mut imei = String::with_capacity(16);
    for &n in id_digits {
        imei.push(char::from(b'0' + bcd_digit(n)? as u8));
    }
    let b = &frame[1 + id_len..];
    let n: Vec<u8> = nibbles(&b[..19]).collect();
    // n: hhmmss(0..6) ddmmyy(6..12) lat(12..20) battery(20..22) lon(22..31) flags(31)
    //    speed(32..35) course(35..38); then the status word (4 bytes)
    let t = |i: usize| bcd_value(&n[i..i + 2]);
    let (hh, mm, ss, dd, mo, yy) = (t(0)?, t(2)?, t(4)?, t(6)?, t(8)?, t(10)?);
    let time = utc_from_fields(2000 + yy as i32, mo, dd, hh, mm, ss)
        .ok_or_else(|| bad("time", "binary report: not a valid date / time"))?;
    let lat_deg = f64::from(bcd_value(&n[12..14])?);
    let lat_min = f64::from(bcd_value(&n[14..20])?) / 10_000.0;
    let lon_deg = f64::from(bcd_value(&n[22..25])?);
    let lon_min = f64::from(bcd_value(&n[25..31])?) / 10_000.0;
    if lat_min >= 60.0 || lon_min >= 60.0 {
        return Err(bad("binary", "minutes ≥ 60"));
    }
    let (mut lat, mut lon) = (lat_deg + lat_min / 60.0, lon_deg + lon_min / 60.0);
    if lat > 90.0 || lon > 180.0 {
        return Err(bad("binary", "coordinates out of range"));
    }
    let flags = n[31];
    if flags & 0x4 == 0 {
        lat = -lat;
    }
    if flags & 0x8 == 0 {
        lon = -lon;
    }
    let speed = bcd_value(&n[32..35])?;
    let course = bcd_value(&n[35..38])?;
    if course > 360 {
        return Err(bad("course", format!("{course}")));
    }
    let status = u32::from_be_bytes([b[19], b[20], b[21], b[22]]);
    Ok(H02Frame {
        maker: "$".into(),
        imei,
        message: H02Message::Binary(H02Location {
            time,
            valid: flags & 0x2 != 0,
            lat,
            lon,
            speed_knots: f64::from(speed),
            course: (course % 360) as u16,
            status,
            battery_pct: binary_battery(b[10]),
        }),
    })
}

fn push_bcd(nibs: &mut Vec<u8>, v: u64, width: usize) {
    let s = format!("{v:0width$}");
    nibs.extend(s.bytes().map(|c| c - b'0'));
}

/// Encode the 32-byte binary report (5-byte id of ten digits).
fn encode_binary(imei: &str, l: &H02Location, dst: &mut BytesMut) -> Result<(), EncodeError> {
    if imei.len() != 10 || !imei.bytes().all(|b| b.is_ascii_digit()) {
        return Err(EncodeError::new(
            P,
            "imei",
            "binary report needs a 10-digit id",
        ));
    }
    let year = check_year(l.time)?;
    let battery = match l.battery_pct {
        None => 0,
        Some(b @ 7..=100) => b,
        Some(b) => return Err(EncodeError::new(P, "battery", b.to_string())),
    };
    let speed = l.speed_knots;
    if !speed.is_finite() || !(0.0..1000.0).contains(&speed) || speed.fract() != 0.0 {
        return Err(EncodeError::new(P, "speed", speed.to_string()));
    }
    let lat_u = coord_units(l.lat, 90.0, "lat")?;
    let lon_u = coord_units(l.lon, 180.0, "lon")?;
    let mut n: Vec<u8> = Vec::with_capacity(64);
    push_bcd(&mut n, imei.parse().unwrap_or(0), 10);
    let t = l.time;
    for v in [
        t.hour(),
        t.minute(),
        t.second(),
        t.day(),
        t.month(),
        year as u32,
    ] {
        push_bcd(&mut n, u64::from(v), 2);
    }
    push_bcd(&mut n, lat_u / 600_000, 2);
    push_bcd(&mut n, lat_u % 600_000, 6);
    // The battery byte is binary, not BCD.
    n.extend([battery >> 4, battery & 0x0F]);
    push_bcd(&mut n, lon_u / 600_000, 3);
    push_bcd(&mut n, lon_u % 600_000, 6);
    let flags =
        u8::from(l.valid) * 0x2 + u8::from(l.lat >= 0.0) * 0x4 + u8::from(l.lon >= 0.0) * 0x8;
    n.push(flags);
    push_bcd(&mut n, speed as u64, 3);
    push_bcd(&mut n, u64::from(l.course % 360), 3);
    dst.put_u8(b'$');
    for pair in n.chunks_exact(2) {
        dst.put_u8(pair[0] << 4 | pair[1]);
    }
    dst.put_u32(l.status);
    dst.put_slice(&[0xFF, 0x00, 0x00]);
    Ok(())
}

// ------------------------------------------------------------------ streaming codec

/// Streaming H02 codec: text frames `*…#`, binary `$` reports and `X` frames.
#[derive(Debug, Clone)]
pub struct H02Codec {
    max_frame_len: usize,
    /// Per-device binary report length (0 = recognise from the stream).
    binary_len: usize,
    profile: H02Profile,
    /// Time used for reports without a time of day (`VP1`); `None` = now.
    clock: Option<DateTime<Utc>>,
}

impl Default for H02Codec {
    fn default() -> Self {
        H02Codec {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            binary_len: 0,
            profile: H02Profile::default(),
            clock: None,
        }
    }
}

fn is_bcd(b: u8) -> bool {
    b >> 4 <= 9 && b & 0x0F <= 9
}

/// A binary report starts with `$` and BCD id, time and date (11 bytes; what is buffered).
fn looks_binary(rest: &[u8]) -> bool {
    rest.first() == Some(&b'$') && rest[1..].iter().take(11).all(|&b| is_bcd(b))
}

/// True when a frame starts at `rest[0]` (used to find where a binary report ends).
fn is_frame_start(rest: &[u8]) -> bool {
    rest.first() == Some(&b'*') || looks_binary(rest)
}

/// Skip what is not a frame start at the head of `src`: line ends silently, anything else
/// as garbage (line ends inside it are not counted).
fn skip_to_frame(src: &mut BytesMut) -> Option<DecodeError> {
    let mut at = 0;
    let mut garbage = 0;
    while at < src.len() {
        match src[at] {
            b'*' => break,
            b'$' if looks_binary(&src[at..]) => break,
            b'X' if !src[at + 1..]
                .iter()
                .take(X_FRAME_LEN - 1)
                .any(|&b| b == b'*') =>
            {
                break
            }
            b'\r' | b'\n' => {}
            _ => garbage += 1,
        }
        at += 1;
    }
    src.advance(at);
    (garbage > 0).then_some(DecodeError::Garbage {
        protocol: P,
        skipped: garbage,
    })
}

impl H02Codec {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_max_frame_len(mut self, max: usize) -> Self {
        self.max_frame_len = max.max(2);
        self
    }

    /// Per-device setting: the binary report length of this device model (32, 42, 45…).
    pub fn with_binary_len(mut self, len: usize) -> Self {
        self.binary_len = if len == 0 {
            0
        } else {
            len.max(BINARY_LEN_SHORT)
        };
        self
    }

    /// Per-device setting: how this model's sensor inputs are wired.
    pub fn with_profile(mut self, profile: H02Profile) -> Self {
        self.profile = profile;
        self
    }

    pub fn profile(&self) -> &H02Profile {
        &self.profile
    }

    /// Fixed received time for reports without a time of day (tests, `em-decode`).
    pub fn with_clock(mut self, now: DateTime<Utc>) -> Self {
        self.clock = Some(now);
        self
    }

    /// Length of the binary report at the start of `src`; `None` = more bytes needed.
    fn binary_frame_len(&self, src: &[u8]) -> Option<usize> {
        if self.binary_len > 0 {
            return (src.len() >= self.binary_len).then_some(self.binary_len);
        }
        for n in BINARY_LENGTHS {
            if src.len() == n || (src.len() > n && is_frame_start(&src[n..])) {
                return Some(n);
            }
        }
        // No known length fits: the document's length, and resynchronise after it.
        (src.len() > BINARY_LENGTHS[BINARY_LENGTHS.len() - 1]).then_some(BINARY_LEN_SHORT)
    }

    fn decode_one(&mut self, src: &mut BytesMut) -> Option<Result<H02Frame, DecodeError>> {
        if let Some(e) = skip_to_frame(src) {
            return Some(Err(e));
        }
        if src.is_empty() {
            return None;
        }
        match src[0] {
            b'$' => {
                let n = self.binary_frame_len(src)?;
                let frame = src.split_to(n);
                return Some(parse_binary(&frame));
            }
            b'X' => {
                if src.len() < X_FRAME_LEN {
                    return None;
                }
                src.advance(X_FRAME_LEN);
                return Some(Err(DecodeError::UnknownType {
                    protocol: P,
                    kind: "X (binary)".into(),
                }));
            }
            _ => {}
        }
        let window = &src[1..src.len().min(self.max_frame_len)];
        let end = memchr::memchr(b'#', window);
        let next_start = memchr::memchr(b'*', window);
        match (end, next_start) {
            (Some(e), s) if !matches!(s, Some(s) if s < e) => {
                let total = e + 2;
                let parsed = match std::str::from_utf8(&src[..total]) {
                    Ok(text) => parse_text(text, self.clock),
                    Err(_) => Err(bad("frame", "not valid UTF-8 text")),
                };
                src.advance(total);
                Some(parsed)
            }
            (_, Some(s)) => {
                // A new frame starts before this one ended: drop the broken one.
                src.advance(s + 1);
                Some(Err(bad(
                    "frame",
                    format!("{} bytes without '#' before the next '*'", s + 1),
                )))
            }
            (None, None) if src.len() >= self.max_frame_len => {
                src.advance(1);
                Some(Err(DecodeError::Oversized {
                    protocol: P,
                    len: src.len() + 1,
                    max: self.max_frame_len,
                }))
            }
            _ => None,
        }
    }
}

impl Decoder for H02Codec {
    type Item = Result<H02Frame, DecodeError>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        Ok(self.decode_one(src))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let decoded = self.decode_one(src);
        Ok(crate::util::at_eof(P, decoded, src))
    }
}

impl Encoder<H02Frame> for H02Codec {
    type Error = std::io::Error;
    fn encode(&mut self, item: H02Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.encode(dst).map_err(Into::into)
    }
}

impl Encoder<&H02Frame> for H02Codec {
    type Error = std::io::Error;
    fn encode(&mut self, item: &H02Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.encode(dst).map_err(Into::into)
    }
}
