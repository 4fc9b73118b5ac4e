//! H02 text protocol (`*HQ,…#`).
//!
//! ```text
//! *HQ,IMEI,V1,hhmmss,A,ddmm.mmmm,N,dddmm.mmmm,E,speed,course,ddmmyy,status[,battery,…]#
//! *HQ,IMEI,XT#                      heartbeat (also HTBT, LINK)
//! *HQ,IMEI,ALRM,type[,hhmmss,A,lat,N,lon,E,speed,course,ddmmyy,status,…]#
//! *HQ,IMEI,V4,cmd,…#                acknowledgement of a server command
//! ```
//!
//! Times are UTC, speed is in knots, course in degrees. `status` is 4 bytes as 8 hex
//! digits with *negative logic* (a bit at 0 means the condition is active). Bits below
//! are numbered in the 32-bit value, the first byte being the most significant:
//!
//! | bit | document meaning | model event |
//! |---|---|---|
//! | 0 | theft alarm | `Vibration` |
//! | 1 | robbery alarm | `Sos` |
//! | 4, 7 | no-entry / cross-border alarm | `DeviceGeofence` |
//! | 18 | SOS alarm | `Sos` |
//! | 19 | host powered by backup battery | `PowerCut` |
//! | 20, 28 | storage battery removed | `CaseTamper` |
//! | 31 | low-level sensor 1 (strap loop on tags) | `StrapTamper` |
//!
//! The optional field after `status` is the battery level (`00`–`99`, `99` = 100 %).
//! `ALRM` types: 1 SOS, 2 low battery, 3 geo-fence. The device expects no response to
//! any of these messages. Framing is by `*` … `#`; garbage is skipped to the next `*`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chrono::{DateTime, Datelike, Timelike, Utc};
use em_model::{DeviceEventKind, FixSource, Position, Protocol, Record};
use tokio_util::codec::{Decoder, Encoder};

use crate::util::{utc_from_fields, KNOTS_TO_KMH};
use crate::{CodecError, DecodeError, EncodeError};

const P: Protocol = Protocol::H02;

/// Default limit on a frame's length (`*` to `#`).
pub const DEFAULT_MAX_FRAME_LEN: usize = 1024;

/// Status bits (negative logic: a cleared bit means active).
pub mod status_bit {
    pub const THEFT: u32 = 0;
    pub const ROBBERY: u32 = 1;
    pub const NO_ENTRY_CROSS_BORDER: u32 = 4;
    pub const CROSS_BORDER: u32 = 7;
    pub const ACC_OFF: u32 = 10;
    pub const SOS: u32 = 18;
    pub const BACKUP_BATTERY: u32 = 19;
    pub const BATTERY_REMOVED: u32 = 20;
    pub const BATTERY_REMOVAL_STATE: u32 = 28;
    pub const SENSOR1_LOW: u32 = 31;
}

/// Events implied by an H02 status word.
pub fn status_events(status: u32) -> Vec<DeviceEventKind> {
    use status_bit::*;
    let active = |bit: u32| status & (1 << bit) == 0;
    let mut ev = Vec::new();
    let mut add = |e| {
        if !ev.contains(&e) {
            ev.push(e)
        }
    };
    if active(SOS) || active(ROBBERY) {
        add(DeviceEventKind::Sos);
    }
    if active(THEFT) {
        add(DeviceEventKind::Vibration);
    }
    if active(BACKUP_BATTERY) {
        add(DeviceEventKind::PowerCut);
    }
    if active(BATTERY_REMOVED) || active(BATTERY_REMOVAL_STATE) {
        add(DeviceEventKind::CaseTamper);
    }
    if active(SENSOR1_LOW) {
        add(DeviceEventKind::StrapTamper);
    }
    if active(NO_ENTRY_CROSS_BORDER) || active(CROSS_BORDER) {
        add(DeviceEventKind::DeviceGeofence);
    }
    ev
}

/// A position report of `V1` (or the position part of `ALRM`).
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

#[derive(Debug, Clone, PartialEq)]
pub enum H02Message {
    Location(H02Location),
    /// `XT`, `HTBT` or `LINK`: keep-alive.
    Heartbeat {
        command: String,
    },
    /// `ALRM`: 1 SOS, 2 low battery, 3 geo-fence.
    Alarm {
        kind: u8,
        location: Option<H02Location>,
    },
    /// `V4`: the device confirms a server command.
    CommandAck {
        command: String,
    },
}

/// One H02 frame.
#[derive(Debug, Clone, PartialEq)]
pub struct H02Frame {
    /// Manufacturer tag, normally `HQ`.
    pub maker: String,
    pub imei: String,
    pub message: H02Message,
}

impl H02Frame {
    pub fn kind(&self) -> &'static str {
        match self.message {
            H02Message::Location(_) => "location",
            H02Message::Heartbeat { .. } => "heartbeat",
            H02Message::Alarm { .. } => "alarm",
            H02Message::CommandAck { .. } => "command_ack",
        }
    }

    /// Device id carried by the frame.
    pub fn device_id(&self) -> &str {
        &self.imei
    }

    /// Normalised records; `device_id` is normally [`H02Frame::device_id`].
    pub fn to_records(&self, device_id: &str, received: DateTime<Utc>) -> Vec<Record> {
        let mut r = Record::new(device_id, P, received);
        match &self.message {
            H02Message::Location(loc) => apply_location(&mut r, loc),
            H02Message::Heartbeat { .. } => r.events.push(DeviceEventKind::Heartbeat),
            H02Message::Alarm { kind, location } => {
                if let Some(loc) = location {
                    apply_location(&mut r, loc);
                }
                let e = match kind {
                    1 => Some(DeviceEventKind::Sos),
                    2 => Some(DeviceEventKind::LowBattery),
                    3 => Some(DeviceEventKind::DeviceGeofence),
                    _ => None,
                };
                if let Some(e) = e {
                    if !r.events.contains(&e) {
                        r.events.push(e);
                    }
                }
            }
            H02Message::CommandAck { .. } => return Vec::new(),
        }
        vec![r]
    }

    /// H02 devices expect no response to the messages decoded here.
    pub fn response(&self) -> Option<Bytes> {
        None
    }

    /// The wire form (`*…#`).
    pub fn to_text(&self) -> Result<String, EncodeError> {
        for (f, v) in [("maker", &self.maker), ("imei", &self.imei)] {
            if v.is_empty()
                || v.bytes()
                    .any(|b| matches!(b, b',' | b'*' | b'#') || !b.is_ascii_graphic())
            {
                return Err(EncodeError::new(P, f, format!("{v:?}")));
            }
        }
        let mut s = format!("*{},{},", self.maker, self.imei);
        match &self.message {
            H02Message::Location(loc) => {
                s.push_str("V1,");
                write_location(&mut s, loc)?;
            }
            H02Message::Heartbeat { command } => {
                if !matches!(command.as_str(), "XT" | "HTBT" | "LINK") {
                    return Err(EncodeError::new(P, "heartbeat", command.clone()));
                }
                s.push_str(command);
            }
            H02Message::Alarm { kind, location } => {
                s.push_str(&format!("ALRM,{kind}"));
                if let Some(loc) = location {
                    s.push(',');
                    write_location(&mut s, loc)?;
                }
            }
            H02Message::CommandAck { command } => {
                if command.is_empty() || command.contains([',', '*', '#']) {
                    return Err(EncodeError::new(P, "command", command.clone()));
                }
                s.push_str("V4,");
                s.push_str(command);
            }
        }
        s.push('#');
        Ok(s)
    }

    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        dst.put_slice(self.to_text()?.as_bytes());
        Ok(())
    }
}

fn apply_location(r: &mut Record, loc: &H02Location) {
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
    for e in status_events(loc.status) {
        if !r.events.contains(&e) {
            r.events.push(e);
        }
    }
}

/// Ten-thousandths of a minute per degree.
const UNITS_PER_DEG: f64 = 600_000.0;

fn write_coord(
    s: &mut String,
    v: f64,
    deg_width: usize,
    max: f64,
    hemis: [char; 2],
    field: &'static str,
) -> Result<(), EncodeError> {
    if !v.is_finite() || v.abs() > max {
        return Err(EncodeError::new(P, field, format!("{v} out of range")));
    }
    let units = (v.abs() * UNITS_PER_DEG).round() as u64;
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
    let year = t.year() - 2000;
    if !(0..=99).contains(&year) {
        return Err(EncodeError::new(
            P,
            "time",
            format!("year {} out of range", t.year()),
        ));
    }
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

fn bad(field: &'static str, detail: impl Into<String>) -> DecodeError {
    DecodeError::malformed(P, field, detail)
}

fn two_digits(s: &str, at: usize) -> Option<u32> {
    s.get(at..at + 2)?.parse().ok()
}

fn parse_coord(
    v: &str,
    hemi: &str,
    deg_len: usize,
    neg: &str,
    max: f64,
    field: &'static str,
) -> Result<f64, DecodeError> {
    let valid_chars = v.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let deg: Option<f64> = v
        .get(..deg_len)
        .filter(|_| valid_chars)
        .and_then(|d| d.parse().ok());
    let min: Option<f64> = v.get(deg_len..).and_then(|m| m.parse().ok());
    let (Some(deg), Some(min)) = (deg, min) else {
        return Err(bad(field, format!("{v:?} is not (d)ddmm.mmmm")));
    };
    if min >= 60.0 {
        return Err(bad(field, format!("{v:?}: minutes ≥ 60")));
    }
    let mut value = deg + min / 60.0;
    if value > max {
        return Err(bad(field, format!("{v:?} out of range")));
    }
    match hemi {
        h if h == neg => value = -value,
        "N" | "S" | "E" | "W" => {}
        other => return Err(bad(field, format!("hemisphere {other:?}"))),
    }
    Ok(value)
}

/// Parse the fields `hhmmss,A,lat,N,lon,E,speed,course,ddmmyy,status[,battery…]`.
fn parse_location(f: &[&str]) -> Result<H02Location, DecodeError> {
    if f.len() < 10 {
        return Err(bad(
            "location",
            format!("{} fields, need at least 10", f.len()),
        ));
    }
    let (hms, dmy) = (f[0], f[8]);
    let fields = |s: &str| s.len() == 6 && s.bytes().all(|b| b.is_ascii_digit());
    if !fields(hms) || !fields(dmy) {
        return Err(bad(
            "time",
            format!("{hms:?} / {dmy:?} are not hhmmss / ddmmyy"),
        ));
    }
    let num = |s: &str, at| two_digits(s, at).unwrap_or(99);
    let time = utc_from_fields(
        2000 + num(dmy, 4) as i32,
        num(dmy, 2),
        num(dmy, 0),
        num(hms, 0),
        num(hms, 2),
        num(hms, 4),
    )
    .ok_or_else(|| bad("time", format!("{dmy} {hms} is not a valid time")))?;
    let valid = f[1] == "A";
    let lat = parse_coord(f[2], f[3], 2, "S", 90.0, "latitude")?;
    let lon = parse_coord(f[4], f[5], 3, "W", 180.0, "longitude")?;
    let speed_knots = if f[6].is_empty() {
        0.0
    } else {
        f[6].parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| bad("speed", format!("{:?}", f[6])))?
    };
    let course = if f[7].is_empty() {
        0
    } else {
        f[7].parse::<f64>()
            .ok()
            .filter(|v| (0.0..=360.0).contains(v))
            .map(|v| v.round() as u16)
            .ok_or_else(|| bad("course", format!("{:?}", f[7])))?
    };
    let st = f[9];
    if st.is_empty() || st.len() > 8 {
        return Err(bad("status", format!("{st:?} is not 8 hex digits")));
    }
    let status =
        u32::from_str_radix(st, 16).map_err(|_| bad("status", format!("{st:?} is not hex")))?;
    // Battery when the next field is a 1–2 digit level and not the start of a 4-field
    // cell block (mcc,mnc,lac,cid) that some firmware sends instead.
    let rest = &f[10..];
    let battery_pct = match rest.first() {
        Some(b)
            if rest.len() != 4
                && (1..=2).contains(&b.len())
                && b.bytes().all(|c| c.is_ascii_digit()) =>
        {
            let v: u8 = b.parse().map_err(|_| bad("battery", *b))?;
            Some(if v >= 99 { 100 } else { v })
        }
        _ => None,
    };
    Ok(H02Location {
        time,
        valid,
        lat,
        lon,
        speed_knots,
        course,
        status,
        battery_pct,
    })
}

/// Parse one frame's text, with or without the `*` and `#` delimiters.
pub fn parse_frame(text: &str) -> Result<H02Frame, DecodeError> {
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
    let message = match cmd {
        "V1" => H02Message::Location(parse_location(&f[3..])?),
        "XT" | "HTBT" | "LINK" => H02Message::Heartbeat {
            command: cmd.to_owned(),
        },
        "ALRM" => {
            let kind = f
                .get(3)
                .and_then(|k| k.parse::<u8>().ok())
                .ok_or_else(|| bad("alarm type", format!("{:?}", f.get(3))))?;
            let location = if f.len() >= 14 {
                Some(parse_location(&f[4..])?)
            } else {
                None
            };
            H02Message::Alarm { kind, location }
        }
        "V4" => H02Message::CommandAck {
            command: f.get(3).copied().unwrap_or_default().to_owned(),
        },
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

/// Streaming H02 codec: frames delimited by `*` and `#`.
#[derive(Debug, Clone)]
pub struct H02Codec {
    max_frame_len: usize,
}

impl Default for H02Codec {
    fn default() -> Self {
        H02Codec {
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }
}

impl H02Codec {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_max_frame_len(mut self, max: usize) -> Self {
        self.max_frame_len = max.max(2);
        self
    }

    fn decode_one(&mut self, src: &mut BytesMut) -> Option<Result<H02Frame, DecodeError>> {
        match memchr::memchr(b'*', src) {
            Some(0) => {}
            Some(skipped) => {
                src.advance(skipped);
                return Some(Err(DecodeError::Garbage {
                    protocol: P,
                    skipped,
                }));
            }
            None if src.is_empty() => return None,
            None => {
                let skipped = src.len();
                src.clear();
                return Some(Err(DecodeError::Garbage {
                    protocol: P,
                    skipped,
                }));
            }
        }
        let window = &src[1..src.len().min(self.max_frame_len)];
        let end = memchr::memchr(b'#', window);
        let next_start = memchr::memchr(b'*', window);
        match (end, next_start) {
            (Some(e), s) if !matches!(s, Some(s) if s < e) => {
                let total = e + 2;
                let parsed = match std::str::from_utf8(&src[..total]) {
                    Ok(text) => parse_frame(text),
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
