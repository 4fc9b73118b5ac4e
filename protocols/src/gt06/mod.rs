//! GT06 / Concox binary protocol.
//!
//! Wire format (all integers big-endian):
//!
//! ```text
//! 78 78 | len u8  | proto u8 | content … | serial u16 | crc u16 | 0D 0A
//! 79 79 | len u16 | proto u8 | content … | serial u16 | crc u16 | 0D 0A
//! ```
//!
//! `len` counts the bytes from `proto` through `crc`; the CRC is CRC-16/X-25 ("CRC-ITU")
//! over the bytes from `len` through `serial`. Some devices send a wrong `len`: when the
//! declared end is not `0D 0A`, the codec accepts the first `0D 0A` whose CRC matches.
//!
//! Messages (see the table in `protocols/README.md`): login `0x01`; positions `0x10`,
//! `0x11`, `0x12`, `0x1E`, `0x22`, `0x2D`, `0x31`, `0x37`, `0xA0`; heartbeats `0x13`, `0x23`;
//! alarms with status `0x16`, `0x26`, `0x27`, `0x19` (LBS + status); fence alarms `0xA3`,
//! `0xA4`; alarm `0x95`; LBS `0x18`, `0x24`, `0x28`, `0x2E`, `0xA1`; Wi-Fi `0x17`, `0x69`,
//! `0xF3`, `0x2C`, `0x33`, `0xA2`; command replies `0x15`, `0x21`; information transfer
//! `0x94`; time request `0x8A` (answered with the server's UTC time); recognised types
//! without EM content (OBD, photos, pass-through, …) are acknowledged and yield no record
//! ([`Gt06Message::Other`]). The content-less acknowledgements the server sends decode as
//! [`Gt06Message::Ack`], so the simulator can use this codec too.
//!
//! Alarm and status codes become EM events only through the tables of [`alarm`] (each row
//! with its source); a code not in a table is `UnknownAlarm`. Status blocks are read after
//! the LBS block by its length byte, never at a fixed offset. A frame whose GPS date is all
//! zeros (no fix yet) keeps its alarm and status: a record with no position.
//!
//! Location frames carry no IMEI: [`Gt06Codec`] remembers the IMEI of the login on its
//! connection and refuses data before it with [`DecodeError::NotLoggedIn`].
//! Garbage between frames is skipped by scanning for the next `78 78` / `79 79`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chrono::{DateTime, Datelike, Timelike, Utc};
use em_model::{DeviceEventKind, FixSource, Position, Protocol, Record};
use tokio_util::codec::{Decoder, Encoder};

use crate::util::{crc16_x25, utc_from_fields, Reader};
use crate::{CodecError, DecodeError, EncodeError};

pub mod alarm;
mod report;

pub use alarm::{BatteryScale, Gt06Profile, TerminalBits111};
pub use report::{Gt06CellId, Gt06Report, Gt06Wifi};

const P: Protocol = Protocol::Gt06;

/// Protocol numbers.
pub mod proto {
    pub const LOGIN: u8 = 0x01;
    pub const LOCATION: u8 = 0x12;
    pub const STATUS: u8 = 0x13;
    pub const ALARM: u8 = 0x16;
    pub const LOCATION_4G: u8 = 0x22;
    pub const ALARM_MULTI_FENCE: u8 = 0x26;
    pub const LBS_MULTI: u8 = 0x28;
    pub const TIME_REQUEST: u8 = 0x8A;
}

/// Default limit on the length field of a `79 79` frame.
pub const DEFAULT_MAX_FRAME_LEN: usize = 1024;

/// A device IMEI (15 digits, 16 when the BCD field uses its first nibble).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Imei(u64);

impl Imei {
    /// Largest value 16 BCD digits can hold.
    pub const MAX: u64 = 9_999_999_999_999_999;

    pub fn new(value: u64) -> Option<Imei> {
        (value <= Self::MAX).then_some(Imei(value))
    }

    /// Parse 1 to 16 ASCII digits.
    pub fn parse(s: &str) -> Option<Imei> {
        if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok().and_then(Imei::new)
    }

    pub fn value(self) -> u64 {
        self.0
    }

    /// Decode 8 bytes of packed BCD; a nibble above 9 is an error.
    pub fn from_bcd(bcd: [u8; 8]) -> Result<Imei, DecodeError> {
        let mut v: u64 = 0;
        for b in bcd {
            for nib in [b >> 4, b & 0x0F] {
                if nib > 9 {
                    return Err(DecodeError::malformed(
                        P,
                        "imei",
                        format!("BCD nibble {nib:#x} in {}", hex::encode(bcd)),
                    ));
                }
                v = v * 10 + u64::from(nib);
            }
        }
        Ok(Imei(v))
    }

    pub fn to_bcd(self) -> [u8; 8] {
        let mut out = [0u8; 8];
        let mut v = self.0;
        for byte in out.iter_mut().rev() {
            let lo = (v % 10) as u8;
            v /= 10;
            let hi = (v % 10) as u8;
            v /= 10;
            *byte = (hi << 4) | lo;
        }
        out
    }
}

impl std::fmt::Display for Imei {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:015}", self.0)
    }
}

/// The GNSS block shared by location and alarm messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gt06Gps {
    /// Device time (the protocol sends UTC).
    pub time: DateTime<Utc>,
    /// High nibble of the "GPS info" byte: length of the GPS block (normally 12).
    pub info_len: u8,
    pub satellites: u8,
    /// Degrees, negative south.
    pub lat: f64,
    /// Degrees, negative west.
    pub lon: f64,
    pub speed_kmh: u8,
    /// Degrees, 0..=1023 on the wire (0..360 in practice).
    pub course: u16,
    /// "GPS has been positioned" bit.
    pub positioned: bool,
    /// True for differential positioning, false for real-time GPS.
    pub differential: bool,
}

/// Serving cell (LBS) identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gt06Cell {
    pub mcc: u16,
    pub mnc: u8,
    pub lac: u16,
    /// 24-bit cell id.
    pub cell_id: u32,
}

/// Terminal information, battery and GSM levels of heartbeat and alarm messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gt06Status {
    /// Bit 0 defence (armed), bit 1 ACC high, bit 2 charging, bits 3-5 alarm
    /// (100 SOS, 011 low battery, 010 power cut, 001 shock/tamper), bit 6 GPS tracking
    /// on, bit 7 oil and electricity disconnected.
    pub terminal_info: u8,
    /// Battery byte: a 0–6 level in the GT06 document (0 no power, 1 extremely low, 2 very
    /// low = low-battery alarm, 3 low, 4 medium, 5 high, 6 very high); many devices send a
    /// percentage instead — see [`BatteryScale`].
    pub voltage_level: u8,
    /// 0 no signal, 1 extremely weak, 2 weak, 3 good, 4 strong.
    pub gsm_level: u8,
    /// Alarm code ("former byte" of Alarm/Language), mapped by [`alarm::ALARM_BYTE`].
    pub alarm: u8,
    pub language: u8,
}

impl Gt06Status {
    pub fn defence(&self) -> bool {
        self.terminal_info & 0x01 != 0
    }
    pub fn acc(&self) -> bool {
        self.terminal_info & 0x02 != 0
    }
    pub fn charging(&self) -> bool {
        self.terminal_info & 0x04 != 0
    }
    /// Alarm bits 3-5 of the terminal information byte.
    pub fn terminal_alarm(&self) -> u8 {
        (self.terminal_info >> 3) & 0x07
    }
    pub fn gps_tracking(&self) -> bool {
        self.terminal_info & 0x40 != 0
    }

    /// Battery percentage of the voltage byte read with the default [`BatteryScale`]
    /// (0–6 level per the GT06 document, above 6 a percentage).
    pub fn battery_pct(&self) -> Option<u8> {
        alarm::Battery::read(self.voltage_level, BatteryScale::Auto).pct()
    }

    /// GSM signal percentage from the 0..=4 level.
    pub fn gsm_pct(&self) -> Option<u8> {
        (self.gsm_level <= 4).then(|| self.gsm_level * 25)
    }

    pub(crate) fn parts(&self) -> report::StatusParts {
        report::StatusParts {
            terminal_info: Some(self.terminal_info),
            terminal_alarm_bits: true,
            voltage: Some(self.voltage_level),
            gsm_level: Some(self.gsm_level),
            alarm: Some(self.alarm),
        }
    }
}

/// EM event for an alarm-byte code (table [`alarm::ALARM_BYTE`]): `None` for documented
/// codes without EM meaning ("normal", driving alarms), `UnknownAlarm` for codes not in the table.
pub fn alarm_code_event(code: u8) -> Option<DeviceEventKind> {
    match alarm::alarm_byte(code) {
        alarm::AlarmMeaning::Event(e) => Some(e),
        alarm::AlarmMeaning::NoEvent(_) => None,
    }
}

/// One neighbour cell of an LBS message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gt06Neighbour {
    pub lac: u16,
    pub cell_id: u32,
    pub rssi: u8,
}

/// A decoded GT06 message.
#[derive(Debug, Clone, PartialEq)]
pub enum Gt06Message {
    /// `0x01`: the device names itself. `type_id`/`timezone` exist in the 12-byte variant.
    Login {
        imei: Imei,
        type_id: Option<u16>,
        timezone: Option<u16>,
    },
    /// `0x12` (GT06) or `0x22` (GT06N/4G): a GNSS fix with the serving cell.
    /// `0x22` adds ACC, upload mode, re-upload flag and optionally mileage.
    Location {
        protocol: u8,
        gps: Gt06Gps,
        cell: Option<Gt06Cell>,
        acc: Option<bool>,
        upload_mode: Option<u8>,
        reupload: Option<bool>,
        mileage: Option<u32>,
    },
    /// `0x13`: heartbeat with terminal status.
    Status(Gt06Status),
    /// `0x16` / `0x26`: alarm with position, cell and status.
    Alarm {
        protocol: u8,
        gps: Gt06Gps,
        /// Length byte of the LBS block as sent (normally 9).
        lbs_len: u8,
        cell: Gt06Cell,
        status: Gt06Status,
    },
    /// `0x28`: cell-only (LBS) report without GNSS position.
    Lbs {
        time: DateTime<Utc>,
        cell: Gt06Cell,
        rssi: u8,
        /// 0 or 6 neighbour cells.
        neighbours: Vec<Gt06Neighbour>,
        timing_advance: Option<u8>,
        language: Option<u16>,
    },
    /// A content-less frame: the server's acknowledgement of `protocol`.
    Ack { protocol: u8 },
    /// Every other decoded report (positions, alarms and heartbeats in non-base layouts,
    /// zero-date frames, LBS, Wi-Fi, command replies, information transfer): see [`Gt06Report`].
    Report(Box<Gt06Report>),
    /// `0x8A`: the device asks for the time and waits for the answer ([`Gt06Frame::response`]).
    TimeRequest,
    /// A recognised message type without EM content (OBD, photos, pass-through, …):
    /// acknowledged when the type expects it, no record.
    Other { protocol: u8, extended: bool },
}

/// One GT06 frame: its serial number and message.
#[derive(Debug, Clone, PartialEq)]
pub struct Gt06Frame {
    pub serial: u16,
    pub message: Gt06Message,
}

impl Gt06Frame {
    pub fn new(serial: u16, message: Gt06Message) -> Self {
        Gt06Frame { serial, message }
    }

    /// Protocol number on the wire.
    pub fn protocol_number(&self) -> u8 {
        match &self.message {
            Gt06Message::Login { .. } => proto::LOGIN,
            Gt06Message::Location { protocol, .. } | Gt06Message::Alarm { protocol, .. } => {
                *protocol
            }
            Gt06Message::Status(_) => proto::STATUS,
            Gt06Message::Lbs { .. } => proto::LBS_MULTI,
            Gt06Message::Ack { protocol } => *protocol,
            Gt06Message::Report(r) => r.protocol,
            Gt06Message::TimeRequest => proto::TIME_REQUEST,
            Gt06Message::Other { protocol, .. } => *protocol,
        }
    }

    /// Short name of the message kind.
    pub fn kind(&self) -> &'static str {
        match &self.message {
            Gt06Message::Login { .. } => "login",
            Gt06Message::Location { .. } => "location",
            Gt06Message::Status(_) => "status",
            Gt06Message::Alarm { .. } => "alarm",
            Gt06Message::Lbs { .. } => "lbs",
            Gt06Message::Ack { .. } => "ack",
            Gt06Message::Report(r) => r.kind(),
            Gt06Message::TimeRequest => "time_request",
            Gt06Message::Other { .. } => "other",
        }
    }

    /// The normalised record(s) of this frame (none for an `Ack`), read with the default
    /// [`Gt06Profile`].
    pub fn to_records(&self, device_id: &str, received: DateTime<Utc>) -> Vec<Record> {
        self.to_record(device_id, received).into_iter().collect()
    }

    /// The normalised record(s) read with the device's [`Gt06Profile`] (registry setting).
    pub fn to_records_with(
        &self,
        device_id: &str,
        received: DateTime<Utc>,
        profile: &Gt06Profile,
    ) -> Vec<Record> {
        self.to_record_with(device_id, received, profile)
            .into_iter()
            .collect()
    }

    /// The normalised record of this frame (GT06 frames hold at most one).
    pub fn to_record(&self, device_id: &str, received: DateTime<Utc>) -> Option<Record> {
        self.to_record_with(device_id, received, &Gt06Profile::default())
    }

    /// The normalised record of this frame, read with the device's [`Gt06Profile`].
    pub fn to_record_with(
        &self,
        device_id: &str,
        received: DateTime<Utc>,
        profile: &Gt06Profile,
    ) -> Option<Record> {
        let mut r = Record::new(device_id, P, received);
        r.received_time = received;
        r.seq = Some(u64::from(self.serial));
        match &self.message {
            Gt06Message::Login { .. } => r.events.push(DeviceEventKind::Login),
            Gt06Message::Location { gps, .. } => {
                r.device_time = gps.time;
                r.position = gps_position(gps);
                // The serial is a transport counter: a buffered fix re-uploaded after a lost
                // ACK comes with a new serial. The fix's identity is (device, GPS time), so
                // leave `seq` empty and let the store de-duplicate on the device time.
                r.seq = None;
            }
            Gt06Message::Status(status) => {
                status.parts().apply(&mut r, profile);
                r.events.insert(0, DeviceEventKind::Heartbeat);
            }
            Gt06Message::Alarm { gps, status, .. } => {
                r.device_time = gps.time;
                r.position = gps_position(gps);
                status.parts().apply(&mut r, profile);
                r.seq = None; // identity is (device, GPS time), as for locations
            }
            Gt06Message::Lbs { time, .. } => {
                // A cell-only report: no coordinates without a cell database.
                r.device_time = *time;
            }
            Gt06Message::Report(rep) => rep.fill(&mut r, profile),
            Gt06Message::Ack { .. } | Gt06Message::TimeRequest | Gt06Message::Other { .. } => {
                return None
            }
        }
        Some(r)
    }

    /// Bytes the server must send back for this frame, if any: login, heartbeats and
    /// alarms are acknowledged with a content-less frame of the same protocol number and
    /// serial; a time request gets the server's current UTC time.
    pub fn response(&self) -> Option<Bytes> {
        self.response_at(Utc::now())
    }

    /// [`Gt06Frame::response`] with the time to answer a time request with.
    pub fn response_at(&self, now: DateTime<Utc>) -> Option<Bytes> {
        match &self.message {
            Gt06Message::Login { .. } | Gt06Message::Status(_) | Gt06Message::Alarm { .. } => {
                Some(ack_frame(self.protocol_number(), self.serial))
            }
            Gt06Message::TimeRequest => Some(time_response(self.serial, now)),
            Gt06Message::Report(rep) => rep.response(self.serial),
            Gt06Message::Other { protocol, extended } => report::other_acknowledged(*protocol)
                .then(|| {
                    if *extended {
                        ack_frame_long(*protocol, self.serial)
                    } else {
                        ack_frame(*protocol, self.serial)
                    }
                }),
            _ => None,
        }
    }

    /// Append the wire form of this frame to `dst` (`78 78` when the length fits a
    /// byte, else `79 79`).
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        let mut content = BytesMut::with_capacity(64);
        self.encode_content(&mut content)?;
        let len = 1 + content.len() + 2 + 2;
        let start = dst.len();
        if len <= 0xFF {
            dst.reserve(len + 5);
            dst.put_slice(&[0x78, 0x78, len as u8]);
        } else if len <= 0xFFFF {
            dst.reserve(len + 6);
            dst.put_slice(&[0x79, 0x79]);
            dst.put_u16(len as u16);
        } else {
            return Err(EncodeError::new(
                P,
                "content",
                format!("{len} bytes is too long"),
            ));
        }
        dst.put_u8(self.protocol_number());
        dst.put_slice(&content);
        dst.put_u16(self.serial);
        let crc = crc16_x25(&dst[start + 2..]);
        dst.put_u16(crc);
        dst.put_slice(&[0x0D, 0x0A]);
        Ok(())
    }

    /// The wire form as a new buffer.
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::new();
        self.encode(&mut b)?;
        Ok(b.freeze())
    }

    fn encode_content(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        match &self.message {
            Gt06Message::Login {
                imei,
                type_id,
                timezone,
            } => {
                out.put_slice(&imei.to_bcd());
                match (type_id, timezone) {
                    (Some(t), Some(z)) => {
                        out.put_u16(*t);
                        out.put_u16(*z);
                    }
                    (None, None) => {}
                    _ => {
                        return Err(EncodeError::new(
                            P,
                            "login",
                            "type_id and timezone must both be set or both be None",
                        ))
                    }
                }
            }
            Gt06Message::Location {
                protocol,
                gps,
                cell,
                acc,
                upload_mode,
                reupload,
                mileage,
            } => {
                if *protocol != proto::LOCATION && *protocol != proto::LOCATION_4G {
                    return Err(EncodeError::new(
                        P,
                        "protocol",
                        format!("{protocol:#04x} is not a location protocol"),
                    ));
                }
                let extended = acc.is_some() || upload_mode.is_some() || reupload.is_some();
                if *protocol == proto::LOCATION && (extended || mileage.is_some()) {
                    return Err(EncodeError::new(
                        P,
                        "location",
                        "ACC, upload mode, re-upload and mileage exist only in 0x22",
                    ));
                }
                encode_gps(gps, out)?;
                match cell {
                    Some(c) => encode_cell(c, out),
                    None if extended || mileage.is_some() => {
                        return Err(EncodeError::new(P, "cell", "required before ACC/mileage"))
                    }
                    None => {}
                }
                match (acc, upload_mode, reupload) {
                    (Some(a), Some(m), Some(r)) => {
                        out.put_u8(u8::from(*a));
                        out.put_u8(*m);
                        out.put_u8(u8::from(*r));
                    }
                    (None, None, None) if mileage.is_none() => {}
                    _ => {
                        return Err(EncodeError::new(
                            P,
                            "location",
                            "acc, upload_mode and reupload go together (and before mileage)",
                        ))
                    }
                }
                if let Some(m) = mileage {
                    out.put_u32(*m);
                }
            }
            Gt06Message::Status(s) => {
                out.put_slice(&[
                    s.terminal_info,
                    s.voltage_level,
                    s.gsm_level,
                    s.alarm,
                    s.language,
                ]);
            }
            Gt06Message::Alarm {
                protocol,
                gps,
                lbs_len,
                cell,
                status,
            } => {
                if *protocol != proto::ALARM && *protocol != proto::ALARM_MULTI_FENCE {
                    return Err(EncodeError::new(
                        P,
                        "protocol",
                        format!("{protocol:#04x} is not an alarm protocol"),
                    ));
                }
                encode_gps(gps, out)?;
                out.put_u8(*lbs_len);
                encode_cell(cell, out);
                out.put_slice(&[
                    status.terminal_info,
                    status.voltage_level,
                    status.gsm_level,
                    status.alarm,
                    status.language,
                ]);
            }
            Gt06Message::Lbs {
                time,
                cell,
                rssi,
                neighbours,
                timing_advance,
                language,
            } => {
                encode_time(time, out)?;
                encode_cell(cell, out);
                out.put_u8(*rssi);
                if neighbours.is_empty() {
                    if timing_advance.is_some() || language.is_some() {
                        return Err(EncodeError::new(
                            P,
                            "lbs",
                            "timing advance needs neighbours",
                        ));
                    }
                } else if neighbours.len() == 6 {
                    for n in neighbours {
                        out.put_u16(n.lac);
                        put_u24(out, n.cell_id, "neighbour cell_id")?;
                        out.put_u8(n.rssi);
                    }
                    match (timing_advance, language) {
                        (Some(t), l) => {
                            out.put_u8(*t);
                            if let Some(l) = l {
                                out.put_u16(*l);
                            }
                        }
                        (None, None) => {}
                        (None, Some(_)) => {
                            return Err(EncodeError::new(P, "lbs", "language needs timing advance"))
                        }
                    }
                } else {
                    return Err(EncodeError::new(
                        P,
                        "neighbours",
                        format!("must be 0 or 6, got {}", neighbours.len()),
                    ));
                }
            }
            Gt06Message::Ack { .. } | Gt06Message::TimeRequest => {}
            Gt06Message::Report(_) | Gt06Message::Other { .. } => {
                return Err(EncodeError::new(
                    P,
                    "message",
                    "reports of this layout are decoded only",
                ))
            }
        }
        Ok(())
    }
}

/// A content-less acknowledgement frame (`78 78 05 proto serial crc 0D 0A`).
pub fn ack_frame(protocol: u8, serial: u16) -> Bytes {
    let mut b = BytesMut::with_capacity(10);
    b.put_slice(&[0x78, 0x78, 0x05, protocol]);
    b.put_u16(serial);
    let crc = crc16_x25(&b[2..]);
    b.put_u16(crc);
    b.put_slice(&[0x0D, 0x0A]);
    b.freeze()
}

/// A content-less acknowledgement in the `79 79` form (for messages that came that way).
pub fn ack_frame_long(protocol: u8, serial: u16) -> Bytes {
    let mut b = BytesMut::with_capacity(11);
    b.put_slice(&[0x79, 0x79, 0x00, 0x05, protocol]);
    b.put_u16(serial);
    let crc = crc16_x25(&b[2..]);
    b.put_u16(crc);
    b.put_slice(&[0x0D, 0x0A]);
    b.freeze()
}

/// Answer to a time request (`0x8A`): the server's UTC time as YY MM DD hh mm ss, with the
/// request's serial.
pub fn time_response(serial: u16, now: DateTime<Utc>) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_slice(&[0x78, 0x78, 0x0B, proto::TIME_REQUEST]);
    b.put_slice(&[
        (now.year() - 2000).clamp(0, 255) as u8,
        now.month() as u8,
        now.day() as u8,
        now.hour() as u8,
        now.minute() as u8,
        now.second() as u8,
    ]);
    b.put_u16(serial);
    let crc = crc16_x25(&b[2..]);
    b.put_u16(crc);
    b.put_slice(&[0x0D, 0x0A]);
    b.freeze()
}

pub(crate) fn gps_position(g: &Gt06Gps) -> Option<Position> {
    if !g.positioned && g.lat == 0.0 && g.lon == 0.0 {
        return None;
    }
    Some(Position {
        lat: g.lat,
        lon: g.lon,
        accuracy_m: None,
        speed_kmh: Some(f32::from(g.speed_kmh)),
        course_deg: Some(f32::from(g.course)),
        altitude_m: None,
        satellites: Some(g.satellites),
        valid: g.positioned,
        source: FixSource::Gnss,
    })
}

const COORD_SCALE: f64 = 1_800_000.0; // 30000 × 60: units of 1/500 second of arc

fn encode_time(t: &DateTime<Utc>, out: &mut BytesMut) -> Result<(), EncodeError> {
    let year = t.year() - 2000;
    if !(0..=255).contains(&year) {
        return Err(EncodeError::new(
            P,
            "time",
            format!("year {} out of range", t.year()),
        ));
    }
    out.put_slice(&[
        year as u8,
        t.month() as u8,
        t.day() as u8,
        t.hour() as u8,
        t.minute() as u8,
        t.second() as u8,
    ]);
    Ok(())
}

fn encode_coord(v: f64, max: f64, field: &'static str) -> Result<u32, EncodeError> {
    if !v.is_finite() || v.abs() > max {
        return Err(EncodeError::new(P, field, format!("{v} out of range")));
    }
    Ok((v.abs() * COORD_SCALE).round() as u32)
}

fn encode_gps(g: &Gt06Gps, out: &mut BytesMut) -> Result<(), EncodeError> {
    encode_time(&g.time, out)?;
    if g.info_len > 15 || g.satellites > 15 {
        return Err(EncodeError::new(
            P,
            "gps info",
            "info_len and satellites are nibbles",
        ));
    }
    if g.course > 0x3FF {
        return Err(EncodeError::new(
            P,
            "course",
            format!("{} > 1023", g.course),
        ));
    }
    out.put_u8((g.info_len << 4) | g.satellites);
    out.put_u32(encode_coord(g.lat, 90.0, "lat")?);
    out.put_u32(encode_coord(g.lon, 180.0, "lon")?);
    out.put_u8(g.speed_kmh);
    let mut cs = g.course;
    if g.differential {
        cs |= 0x2000;
    }
    if g.positioned {
        cs |= 0x1000;
    }
    if g.lon < 0.0 {
        cs |= 0x0800;
    }
    if g.lat >= 0.0 {
        cs |= 0x0400;
    }
    out.put_u16(cs);
    Ok(())
}

fn put_u24(out: &mut BytesMut, v: u32, field: &'static str) -> Result<(), EncodeError> {
    if v > 0xFF_FFFF {
        return Err(EncodeError::new(
            P,
            field,
            format!("{v} does not fit 24 bits"),
        ));
    }
    out.put_slice(&v.to_be_bytes()[1..]);
    Ok(())
}

fn encode_cell(c: &Gt06Cell, out: &mut BytesMut) {
    out.put_u16(c.mcc);
    out.put_u8(c.mnc);
    out.put_u16(c.lac);
    // Cell id is 24 bits on the wire; higher bits are dropped.
    out.put_slice(&(c.cell_id & 0xFF_FFFF).to_be_bytes()[1..]);
}

/// Device time; `None` when all six bytes are zero (no fix and no clock yet).
pub(crate) fn decode_time_opt(r: &mut Reader<'_>) -> Result<Option<DateTime<Utc>>, DecodeError> {
    let [y, mo, d, h, mi, s] = r.array::<6>("date-time")?;
    if [y, mo, d, h, mi, s] == [0; 6] {
        return Ok(None);
    }
    utc_from_fields(
        2000 + i32::from(y),
        u32::from(mo),
        u32::from(d),
        u32::from(h),
        u32::from(mi),
        u32::from(s),
    )
    .map(Some)
    .ok_or_else(|| {
        DecodeError::malformed(
            P,
            "date-time",
            format!("{y:02}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} is not a valid time"),
        )
    })
}

fn decode_time(r: &mut Reader<'_>) -> Result<DateTime<Utc>, DecodeError> {
    decode_time_opt(r)?.ok_or_else(|| DecodeError::malformed(P, "date-time", "all zeros"))
}

/// The GPS block; `None` when its date is all zeros (the device has no fix yet: the
/// coordinates are not a position).
pub(crate) fn decode_gps_opt(r: &mut Reader<'_>) -> Result<Option<Gt06Gps>, DecodeError> {
    let time = decode_time_opt(r)?;
    let info = r.u8("gps info")?;
    let lat_raw = r.u32("latitude")?;
    let lon_raw = r.u32("longitude")?;
    let speed = r.u8("speed")?;
    let cs = r.u16("course/status")?;
    let Some(time) = time else {
        return Ok(None);
    };
    let mut lat = f64::from(lat_raw) / COORD_SCALE;
    let mut lon = f64::from(lon_raw) / COORD_SCALE;
    if lat > 90.0 || lon > 180.0 {
        return Err(DecodeError::malformed(
            P,
            "coordinates",
            format!("lat {lat} / lon {lon} out of range"),
        ));
    }
    if cs & 0x0400 == 0 {
        lat = -lat;
    }
    if cs & 0x0800 != 0 {
        lon = -lon;
    }
    Ok(Some(Gt06Gps {
        time,
        info_len: info >> 4,
        satellites: info & 0x0F,
        lat,
        lon,
        speed_kmh: speed,
        course: cs & 0x03FF,
        positioned: cs & 0x1000 != 0,
        differential: cs & 0x2000 != 0,
    }))
}

fn decode_cell(r: &mut Reader<'_>) -> Result<Gt06Cell, DecodeError> {
    Ok(Gt06Cell {
        mcc: r.u16("mcc")?,
        mnc: r.u8("mnc")?,
        lac: r.u16("lac")?,
        cell_id: r.u24("cell id")?,
    })
}

fn decode_status(r: &mut Reader<'_>) -> Result<Gt06Status, DecodeError> {
    let [terminal_info, voltage_level, gsm_level, alarm, language] = r.array::<5>("status")?;
    Ok(Gt06Status {
        terminal_info,
        voltage_level,
        gsm_level,
        alarm,
        language,
    })
}

fn zero_date(content: &[u8]) -> bool {
    content.len() >= 6 && content[..6] == [0; 6]
}

/// Parse the content of one frame (between protocol number and serial) of a `78 78` frame.
pub fn parse_message(protocol: u8, content: &[u8]) -> Result<Gt06Message, DecodeError> {
    parse_message_ext(protocol, content, false)
}

/// Parse the content of one frame; `extended` is true for a `79 79` frame.
pub fn parse_message_ext(
    protocol: u8,
    content: &[u8],
    extended: bool,
) -> Result<Gt06Message, DecodeError> {
    if content.is_empty() {
        if protocol == proto::TIME_REQUEST {
            return Ok(Gt06Message::TimeRequest);
        }
        return Ok(Gt06Message::Ack { protocol });
    }
    let mut r = Reader::new(content, P);
    let msg = match protocol {
        proto::LOGIN => {
            let imei = Imei::from_bcd(r.array::<8>("imei")?)?;
            let (type_id, timezone) = if r.remaining() >= 4 {
                (Some(r.u16("type id")?), Some(r.u16("timezone")?))
            } else {
                (None, None)
            };
            Gt06Message::Login {
                imei,
                type_id,
                timezone,
            }
        }
        // Base layout (GT06 document): GPS with a date, the 8-byte cell with a one-byte MNC.
        proto::LOCATION | proto::LOCATION_4G
            if !zero_date(content) && (content.len() < 20 || content[18] & 0x80 == 0) =>
        {
            let gps = decode_gps_opt(&mut r)?
                .ok_or_else(|| DecodeError::malformed(P, "date-time", "all zeros"))?;
            let cell = if r.remaining() >= 8 {
                Some(decode_cell(&mut r)?)
            } else {
                None
            };
            let (mut acc, mut upload_mode, mut reupload, mut mileage) = (None, None, None, None);
            if protocol == proto::LOCATION_4G && r.remaining() >= 3 {
                acc = Some(r.u8("acc")? != 0);
                upload_mode = Some(r.u8("upload mode")?);
                reupload = Some(r.u8("re-upload")? != 0);
                if r.remaining() >= 4 {
                    mileage = Some(r.u32("mileage")?);
                }
            }
            Gt06Message::Location {
                protocol,
                gps,
                cell,
                acc,
                upload_mode,
                reupload,
                mileage,
            }
        }
        proto::STATUS if content.len() >= 5 => Gt06Message::Status(decode_status(&mut r)?),
        // Base alarm layout (GT06 document "Alarm packet"): GPS with a date, LBS length 9
        // with a one-byte MNC, then the 5-byte status. Any other LBS length, a two-byte MNC
        // or a zero date is read by `report` (by the LBS length, never at a fixed offset).
        proto::ALARM | proto::ALARM_MULTI_FENCE
            if content.len() >= 32
                && !zero_date(content)
                && content[18] == 9
                && content[19] & 0x80 == 0 =>
        {
            let gps = decode_gps_opt(&mut r)?
                .ok_or_else(|| DecodeError::malformed(P, "date-time", "all zeros"))?;
            let lbs_len = r.u8("lbs length")?;
            let cell = decode_cell(&mut r)?;
            let status = decode_status(&mut r)?;
            Gt06Message::Alarm {
                protocol,
                gps,
                lbs_len,
                cell,
                status,
            }
        }
        proto::LBS_MULTI if !zero_date(content) => {
            let time = decode_time(&mut r)?;
            let cell = decode_cell(&mut r)?;
            let rssi = r.u8("rssi")?;
            let mut neighbours = Vec::new();
            let (mut timing_advance, mut language) = (None, None);
            if r.remaining() >= 36 {
                for _ in 0..6 {
                    neighbours.push(Gt06Neighbour {
                        lac: r.u16("neighbour lac")?,
                        cell_id: r.u24("neighbour cell id")?,
                        rssi: r.u8("neighbour rssi")?,
                    });
                }
                if r.remaining() >= 1 {
                    timing_advance = Some(r.u8("timing advance")?);
                }
                if r.remaining() >= 2 {
                    language = Some(r.u16("language")?);
                }
            }
            Gt06Message::Lbs {
                time,
                cell,
                rssi,
                neighbours,
                timing_advance,
                language,
            }
        }
        other => return report::parse(other, content, extended),
    };
    Ok(msg)
}

/// How far past its declared end a frame with a wrong length field may end.
const LENGTH_SLACK: usize = 64;

/// End (exclusive) of the first `0D 0A` in `src[..limit]` whose preceding CRC matches —
/// the frame as sent when its length field is wrong.
fn find_valid_end(src: &[u8], header: usize, limit: usize) -> Option<usize> {
    let mut from = header + 5; // protocol + serial + crc, at least
    while from + 2 <= limit {
        let at = from + memchr::memchr(0x0D, &src[from..limit])?;
        if at + 2 > limit {
            return None;
        }
        if src[at + 1] == 0x0A {
            let end = at + 2;
            let expected = u16::from_be_bytes([src[end - 4], src[end - 3]]);
            if crc16_x25(&src[2..end - 4]) == expected {
                return Some(end);
            }
        }
        from = at + 1;
    }
    None
}

fn find_start(buf: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = memchr::memchr2(0x78, 0x79, buf.get(from..)?) {
        let at = from + i;
        match buf.get(at + 1) {
            Some(&n) if n == buf[at] => return Some(at),
            Some(_) => from = at + 1,
            None => return None,
        }
    }
    None
}

/// Stateful per-connection GT06 codec.
///
/// `Decoder::Item` is `Result<Gt06Frame, DecodeError>`: an `Err` item is a non-fatal,
/// already-resynchronised error (count it by [`DecodeError::reason`] and go on). GT06 can
/// always resynchronise, so `Decoder::Error` only carries I/O errors.
#[derive(Debug, Clone)]
pub struct Gt06Codec {
    imei: Option<Imei>,
    device_id: Option<String>,
    max_frame_len: usize,
}

impl Default for Gt06Codec {
    fn default() -> Self {
        Self::new()
    }
}

impl Gt06Codec {
    /// A codec for a new connection (no device known yet).
    pub fn new() -> Self {
        Gt06Codec {
            imei: None,
            device_id: None,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }

    /// A codec that already knows its device (tests, the CLI's `--imei`).
    pub fn with_imei(imei: Imei) -> Self {
        let mut c = Self::new();
        c.set_imei(imei);
        c
    }

    /// Limit on the `79 79` length field (default [`DEFAULT_MAX_FRAME_LEN`]).
    pub fn with_max_frame_len(mut self, max: usize) -> Self {
        self.max_frame_len = max;
        self
    }

    pub fn imei(&self) -> Option<Imei> {
        self.imei
    }

    /// Device id (IMEI as text) learned from the login of this connection.
    pub fn device_id(&self) -> Option<&str> {
        self.device_id.as_deref()
    }

    fn set_imei(&mut self, imei: Imei) {
        if self.imei != Some(imei) {
            self.imei = Some(imei);
            self.device_id = Some(imei.to_string());
        }
    }

    fn decode_one(
        &mut self,
        src: &mut BytesMut,
        eof: bool,
    ) -> Option<Result<Gt06Frame, DecodeError>> {
        match find_start(src) {
            Some(0) => {}
            Some(skipped) => {
                src.advance(skipped);
                return Some(Err(DecodeError::Garbage {
                    protocol: P,
                    skipped,
                }));
            }
            None => {
                let keep = usize::from(matches!(src.last(), Some(0x78 | 0x79)));
                let skipped = src.len() - keep;
                if skipped == 0 {
                    return None;
                }
                src.advance(skipped);
                return Some(Err(DecodeError::Garbage {
                    protocol: P,
                    skipped,
                }));
            }
        }
        let long = src[0] == 0x79;
        let header = if long { 4 } else { 3 };
        if src.len() < header {
            return None;
        }
        let len = if long {
            usize::from(u16::from_be_bytes([src[2], src[3]]))
        } else {
            usize::from(src[2])
        };
        if len < 5 {
            src.advance(2);
            return Some(Err(DecodeError::malformed(
                P,
                "length",
                format!("{len} is shorter than protocol + serial + crc"),
            )));
        }
        if len > self.max_frame_len {
            src.advance(2);
            return Some(Err(DecodeError::Oversized {
                protocol: P,
                len,
                max: self.max_frame_len,
            }));
        }
        let total = header + len + 2;
        // A frame whose length field is wrong still ends at a CRC-valid `0D 0A` within
        // `LENGTH_SLACK` bytes of the declared end: the first such end is the frame. The
        // search depends only on bytes up to `total + LENGTH_SLACK` (it waits for them), so a
        // stream split anywhere decodes the same frames.
        let window = total + LENGTH_SLACK;
        if src.len() < total {
            if eof {
                if let Some(end) = find_valid_end(src, header, src.len()) {
                    return Some(self.take_frame(src, header, end));
                }
            }
            src.reserve(total - src.len());
            return None;
        }
        if src[total - 2..total] != [0x0D, 0x0A] {
            if let Some(end) = find_valid_end(src, header, src.len().min(window)) {
                return Some(self.take_frame(src, header, end));
            }
            if src.len() < window && !eof {
                return None;
            }
            src.advance(2);
            return Some(Err(DecodeError::BadTerminator { protocol: P }));
        }
        let expected = u16::from_be_bytes([src[total - 4], src[total - 3]]);
        let computed = crc16_x25(&src[2..total - 4]);
        if expected != computed {
            src.advance(total);
            return Some(Err(DecodeError::BadChecksum {
                protocol: P,
                expected: u32::from(expected),
                computed: u32::from(computed),
            }));
        }
        Some(self.take_frame(src, header, total))
    }

    /// Consume the CRC-checked frame `src[..end]` and parse it.
    fn take_frame(
        &mut self,
        src: &mut BytesMut,
        header: usize,
        end: usize,
    ) -> Result<Gt06Frame, DecodeError> {
        let extended = src[0] == 0x79;
        let protocol = src[header];
        let serial = u16::from_be_bytes([src[end - 6], src[end - 5]]);
        let parsed = parse_message_ext(protocol, &src[header + 1..end - 6], extended);
        src.advance(end);
        let message = parsed?;
        match &message {
            Gt06Message::Login { imei, .. } => self.set_imei(*imei),
            Gt06Message::Ack { .. } => {}
            _ if self.imei.is_none() => return Err(DecodeError::NotLoggedIn { protocol: P }),
            _ => {}
        }
        Ok(Gt06Frame { serial, message })
    }
}

impl Decoder for Gt06Codec {
    type Item = Result<Gt06Frame, DecodeError>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        Ok(self.decode_one(src, false))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let decoded = self.decode_one(src, true);
        Ok(crate::util::at_eof(P, decoded, src))
    }
}

impl Encoder<Gt06Frame> for Gt06Codec {
    type Error = std::io::Error;
    fn encode(&mut self, item: Gt06Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.encode(dst).map_err(Into::into)
    }
}

impl Encoder<&Gt06Frame> for Gt06Codec {
    type Error = std::io::Error;
    fn encode(&mut self, item: &Gt06Frame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.encode(dst).map_err(Into::into)
    }
}
