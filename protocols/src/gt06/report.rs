//! GT06 messages beyond the base document's layouts: positions, alarms and heartbeats of the
//! Concox 4G / wearable / vehicle families, zero-date frames, LBS and Wi-Fi reports, command
//! replies, information transfer. Each parser names the layout it reads; alarm and status
//! codes are mapped only through [`super::alarm`].
//!
//! Layout sources: "GT06 GPS Tracker Communication Protocol" (GT06N) and Concox "JM-VL01 /
//! X3 communication protocol" (section per message type, cited at each parser); for the
//! GK310 / JC100 / AZ735-family types the layouts other public decoders read.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use em_model::{DeviceEventKind, Record};

use super::alarm::{self, AlarmMeaning, Battery};
use super::{ack_frame, ack_frame_long, decode_gps_opt, decode_time_opt, gps_position};
use super::{Gt06Gps, Gt06Message, Gt06Profile, P};
use crate::util::Reader;
use crate::DecodeError;

/// A serving cell in any of the GT06 layouts (2-byte MNC, 4-byte LAC, up to 8-byte cell id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Gt06CellId {
    pub mcc: u16,
    pub mnc: u16,
    pub lac: u32,
    pub cell_id: u64,
}

/// One Wi-Fi access point seen by the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gt06Wifi {
    pub mac: [u8; 6],
    /// Signal as sent (devices send -dBm as a positive byte).
    pub rssi: Option<u8>,
}

/// The status fields a message carries (any of them may be missing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusParts {
    pub terminal_info: Option<u8>,
    /// Whether bits 3–5 of `terminal_info` are alarm bits in this message's layout.
    pub terminal_alarm_bits: bool,
    /// The voltage / battery byte (level or percent, see [`alarm::BatteryScale`]).
    pub voltage: Option<u8>,
    pub gsm_level: Option<u8>,
    /// Alarm byte (table [`alarm::ALARM_BYTE`]).
    pub alarm: Option<u8>,
}

impl StatusParts {
    /// Battery, GSM, charging and the alarm/status events into `r`.
    pub(crate) fn apply(&self, r: &mut Record, profile: &Gt06Profile) {
        let add = |e: DeviceEventKind, events: &mut Vec<DeviceEventKind>| {
            if !events.contains(&e) {
                events.push(e)
            }
        };
        if let Some(t) = self.terminal_info {
            r.charging = Some(t & 0x04 != 0);
            if self.terminal_alarm_bits {
                if let AlarmMeaning::Event(e) =
                    alarm::terminal_bits((t >> 3) & 0x07, profile.terminal_bits_111)
                {
                    add(e, &mut r.events);
                }
            }
        }
        if let Some(a) = self.alarm {
            if let AlarmMeaning::Event(e) = alarm::alarm_byte(a) {
                add(e, &mut r.events);
            }
        }
        if let Some(v) = self.voltage {
            let battery = Battery::read(v, profile.battery);
            r.battery_pct = battery.pct();
            if let Some(e) = battery.event() {
                add(e, &mut r.events);
            }
        }
        if let Some(g) = self.gsm_level {
            r.gsm_signal = (g <= 4).then(|| g * 25);
        }
    }
}

/// A decoded GT06 report in a layout other than the base document's (see the module doc).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Gt06Report {
    pub protocol: u8,
    /// The frame came as `79 79`.
    pub extended: bool,
    /// Device time when the message has one (`None`: all-zero date or no time field).
    pub time: Option<DateTime<Utc>>,
    /// GNSS fix, when the message has one with a date.
    pub gps: Option<Gt06Gps>,
    pub cell: Option<Gt06CellId>,
    /// Further cells of LBS / Wi-Fi messages.
    pub neighbours: Vec<Gt06CellId>,
    pub wifi: Vec<Gt06Wifi>,
    pub status: StatusParts,
    /// Events the message type itself carries (fence alarms, `0x95` alarm types).
    pub events: Vec<DeviceEventKind>,
    /// Heartbeat messages.
    pub heartbeat: bool,
    /// Internal battery voltage, mV (messages that send volts instead of a level).
    pub battery_mv: Option<u32>,
    /// External (supply) voltage, mV.
    pub external_mv: Option<u32>,
    /// Command reply or information text.
    pub text: Option<String>,
    /// Sub-type of an information transfer (`0x94`).
    pub info_type: Option<u8>,
    pub iccid: Option<String>,
    /// The device waits for the standard acknowledgement.
    pub ack: bool,
    /// Wi-Fi location request answered with `78 78 00 proto time 0D 0A` (`0x17`, `0x69`).
    pub wifi_time_reply: Option<[u8; 6]>,
}

impl Gt06Report {
    pub fn kind(&self) -> &'static str {
        match self.protocol {
            0x15 | 0x21 => "command_reply",
            0x94 => "info",
            0x13 | 0x23 => "status",
            _ if self.heartbeat => "status",
            _ if self.gps.is_some() => {
                if self.has_alarm() {
                    "alarm"
                } else {
                    "location"
                }
            }
            _ if !self.wifi.is_empty() || matches!(self.protocol, 0x17 | 0x69 | 0xF3 | 0x2C) => {
                "wifi"
            }
            _ if self.has_alarm() => "alarm",
            _ if self.cell.is_some() => "lbs",
            _ => "report",
        }
    }

    fn has_alarm(&self) -> bool {
        self.status.alarm.is_some() || !self.events.is_empty()
    }

    /// Fill the record (device time, position, status, events).
    pub(crate) fn fill(&self, r: &mut Record, profile: &Gt06Profile) {
        if let Some(t) = self.time.or(self.gps.map(|g| g.time)) {
            r.device_time = t;
        }
        if let Some(g) = &self.gps {
            r.position = gps_position(g);
            // Identity of a fix is (device, GPS time), as for base locations.
            r.seq = None;
        }
        if self.heartbeat {
            r.events.push(DeviceEventKind::Heartbeat);
        }
        self.status.apply(r, profile);
        for e in &self.events {
            if !r.events.contains(e) {
                r.events.push(*e);
            }
        }
    }

    pub(crate) fn response(&self, serial: u16) -> Option<Bytes> {
        if let Some(time) = self.wifi_time_reply {
            let mut b = Vec::with_capacity(12);
            b.extend_from_slice(&[0x78, 0x78, 0x00, self.protocol]);
            b.extend_from_slice(&time);
            b.extend_from_slice(&[0x0D, 0x0A]);
            return Some(Bytes::from(b));
        }
        self.ack.then(|| {
            if self.extended {
                ack_frame_long(self.protocol, serial)
            } else {
                ack_frame(self.protocol, serial)
            }
        })
    }
}

/// Recognised message types with no EM content, and whether the device expects the
/// standard acknowledgement (command messages `0x80`–`0x82` are server-to-device).
pub(crate) fn other_acknowledged(protocol: u8) -> bool {
    !matches!(protocol, 0x80..=0x82 | 0x8C | 0x9B)
}

/// Types recognised but carrying nothing for EM: OBD (`0x8C`), DTC/PID (`0x65`, `0x66`),
/// photos (`0x35`, `0x36`), pass-through (`0x9B`), address requests (`0x1A`, `0x2A`),
/// module/extended data (`0x25`, `0x34`, `0x38`, `0x61`, `0x70`, `0xA6`, `0xA7`, `0xF1`,
/// `0xF2`, `0xFD`), command `0x81`.
const OTHER: &[u8] = &[
    0x1A, 0x25, 0x2A, 0x34, 0x35, 0x36, 0x38, 0x61, 0x65, 0x66, 0x70, 0x81, 0x8C, 0x9B, 0xA6, 0xA7,
    0xF1, 0xF2, 0xFD,
];

fn cell_from(b: &[u8]) -> Option<Gt06CellId> {
    if b.len() < 7 {
        return None;
    }
    let mcc_raw = u16::from_be_bytes([b[0], b[1]]);
    let (mnc, rest) = if mcc_raw & 0x8000 != 0 {
        (u16::from_be_bytes([b[2], b[3]]), &b[4..])
    } else {
        (u16::from(b[2]), &b[3..])
    };
    let (lac, cid): (&[u8], &[u8]) = match rest.len() {
        5 | 6 => rest.split_at(2),
        12 => rest.split_at(4),
        _ => return None,
    };
    let be = |x: &[u8]| x.iter().fold(0u64, |a, &v| (a << 8) | u64::from(v));
    Some(Gt06CellId {
        mcc: mcc_raw & 0x7FFF,
        mnc,
        lac: be(lac) as u32,
        cell_id: be(cid),
    })
}

/// An LBS block led by its length byte (which counts itself, GT06 "Alarm packet": 9 for
/// MCC 2 + MNC 1 + LAC 2 + cell 3). The status that follows starts after `length` bytes
/// whatever the cell layout (a 4-byte cell id, a 2-byte MNC or an empty block).
fn lbs_with_length(r: &mut Reader<'_>) -> Result<Option<Gt06CellId>, DecodeError> {
    let len = usize::from(r.u8("lbs length")?);
    let block = r.bytes(len.saturating_sub(1), "lbs")?;
    Ok(cell_from(block))
}

/// The cell without a length byte: 8 bytes, or 9 with a 2-byte MNC (MCC bit 15).
fn lbs_plain(r: &mut Reader<'_>, cid_len: usize) -> Result<Option<Gt06CellId>, DecodeError> {
    if r.remaining() < 7 + cid_len - 2 {
        return Ok(None);
    }
    let head = r.bytes(2, "mcc")?;
    let two = head[0] & 0x80 != 0;
    let rest = r.bytes(if two { 2 } else { 1 } + 2 + cid_len, "lbs")?;
    let mut b = head.to_vec();
    b.extend_from_slice(rest);
    Ok(cell_from(&b))
}

/// Status after an alarm's LBS block: terminal info, battery, GSM, alarm [, language].
fn status_block(r: &mut Reader<'_>) -> Result<StatusParts, DecodeError> {
    if r.remaining() < 4 {
        return Err(DecodeError::malformed(
            P,
            "status",
            format!("needs 4 bytes, {} left", r.remaining()),
        ));
    }
    let [t, v, g, a] = r.array::<4>("status")?;
    Ok(StatusParts {
        terminal_info: Some(t),
        terminal_alarm_bits: true,
        voltage: Some(v),
        gsm_level: Some(g),
        alarm: Some(a),
    })
}

fn bcd(b: u8) -> Option<u32> {
    let (h, l) = (b >> 4, b & 0x0F);
    (h <= 9 && l <= 9).then(|| u32::from(h) * 10 + u32::from(l))
}

fn bcd_time(t: [u8; 6]) -> Option<DateTime<Utc>> {
    let f: Option<Vec<u32>> = t.iter().map(|&b| bcd(b)).collect();
    let f = f?;
    crate::util::utc_from_fields(2000 + f[0] as i32, f[1], f[2], f[3], f[4], f[5])
}

fn text(bytes: &[u8], utf16: bool) -> String {
    if utf16 {
        let units: Vec<u16> = bytes
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16_lossy(&units)
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// Parse a message that is not in the base layouts (see [`super::parse_message_ext`]).
pub(crate) fn parse(
    protocol: u8,
    content: &[u8],
    extended: bool,
) -> Result<Gt06Message, DecodeError> {
    let mut r = Reader::new(content, P);
    let mut rep = Gt06Report {
        protocol,
        extended,
        ..Gt06Report::default()
    };
    match protocol {
        // GPS-only (0x10) and GPS + cell positions (0x12/0x22 in non-base form: zero date or
        // 2-byte MNC — GT06 "Location packet", VL01 "Positioning packet (0x22)"); 0x11 has a
        // 2-byte MNC and 4-byte cell id; 0x1E, 0x2D, 0x31, 0x37, 0xA0 as 0x12.
        0x10 | 0x11 | 0x12 | 0x1E | 0x22 | 0x2D | 0x31 | 0x37 | 0xA0 => {
            rep.gps = decode_gps_opt(&mut r)?;
            rep.cell = match protocol {
                0x10 | 0x1E => None,
                0x11 => {
                    if r.remaining() >= 10 {
                        let b = r.bytes(10, "lbs")?;
                        Some(Gt06CellId {
                            mcc: u16::from_be_bytes([b[0], b[1]]) & 0x7FFF,
                            mnc: u16::from_be_bytes([b[2], b[3]]),
                            lac: u32::from(u16::from_be_bytes([b[4], b[5]])),
                            cell_id: u64::from(u32::from_be_bytes([b[6], b[7], b[8], b[9]])),
                        })
                    } else {
                        None
                    }
                }
                _ => lbs_plain(&mut r, 3)?,
            };
        }
        // Heartbeat with terminal info only (GT06 "Heartbeat packet" with fewer bytes).
        0x13 => {
            rep.heartbeat = true;
            rep.ack = true;
            let t = r.u8("terminal info")?;
            rep.status = StatusParts {
                terminal_info: Some(t),
                terminal_alarm_bits: true,
                voltage: r.u8("voltage").ok(),
                gsm_level: r.u8("gsm").ok(),
                alarm: r.u8("alarm").ok(),
            };
        }
        // Alarm with position, LBS (by its length byte) and status: GT06 "Alarm packet"
        // (0x16), VL01 "Alarm packet" (0x26) and "multi-fence alarm" (0x27, + fence number),
        // 0x32 (AZ735 family). A zero date keeps the status.
        0x16 | 0x26 | 0x27 | 0x32 => {
            rep.ack = true;
            rep.gps = decode_gps_opt(&mut r)?;
            rep.cell = lbs_with_length(&mut r)?;
            rep.status = status_block(&mut r)?;
        }
        // LBS + status, no GPS (VL01 "LBS alarm packet" 0x19).
        0x19 => {
            rep.ack = true;
            rep.cell = lbs_with_length(&mut r)?;
            rep.status = status_block(&mut r)?;
        }
        // Fence alarms with position and cell (GK310 family: single 0xA3, multi 0xA4).
        0xA3 | 0xA4 => {
            rep.ack = true;
            rep.gps = decode_gps_opt(&mut r)?;
            rep.cell = lbs_plain(&mut r, 3)?;
            rep.events.push(DeviceEventKind::DeviceGeofence);
        }
        // LBS alarm without position (GK310 family 0xA5): time, cell (4-byte LAC, 8-byte
        // cell id), then status as in 0x16.
        0xA5 => {
            rep.ack = true;
            rep.time = decode_time_opt(&mut r)?;
            let b = r.bytes(3, "lbs")?.to_vec();
            let rest = r.bytes(12, "lbs")?;
            let mut all = b;
            all.extend_from_slice(rest);
            rep.cell = cell_from(&all);
            rep.status = status_block(&mut r)?;
        }
        // GK310 heartbeat: terminal info, battery voltage (0.01 V), GSM level, language.
        0x23 => {
            rep.heartbeat = true;
            rep.ack = true;
            let t = r.u8("terminal info")?;
            rep.status.terminal_info = Some(t);
            if r.remaining() >= 2 {
                rep.battery_mv = Some(u32::from(r.u16("battery voltage")?) * 10);
            }
            if r.remaining() >= 1 {
                rep.status.gsm_level = Some(r.u8("gsm")?);
            }
        }
        // Multi-cell LBS reports: time, MCC, MNC, 7 × (LAC 2, cell 3, RSSI 1), TA
        // (VL01 "LBS multiple base station" 0x28 with zero date; 0x18, 0x24, 0x2E); 0xA1 with
        // 4-byte LAC and 8-byte cell id.
        0x18 | 0x24 | 0x28 | 0x2E | 0xA1 => {
            rep.time = decode_time_opt(&mut r)?;
            let long = protocol == 0xA1;
            let mcc_raw = r.u16("mcc")?;
            let mnc = if mcc_raw & 0x8000 != 0 {
                r.u16("mnc")?
            } else {
                u16::from(r.u8("mnc")?)
            };
            let per = if long { 13 } else { 6 };
            let mut cells = Vec::new();
            while r.remaining() >= per && cells.len() < 7 {
                let (lac, cid) = if long {
                    (r.u32("lac")?, r.u64("cell id")?)
                } else {
                    (u32::from(r.u16("lac")?), u64::from(r.u24("cell id")?))
                };
                r.u8("rssi")?;
                if lac != 0 {
                    cells.push(Gt06CellId {
                        mcc: mcc_raw & 0x7FFF,
                        mnc,
                        lac,
                        cell_id: cid,
                    });
                }
            }
            let mut it = cells.into_iter();
            rep.cell = it.next();
            rep.neighbours = it.collect();
        }
        // Wi-Fi location requests (0x17, 0x69): BCD time, then the access points; the device
        // waits for the `78 78 00 proto time 0D 0A` reply. 0xF3: BCD time, count, APs.
        0x17 | 0x69 | 0xF3 => {
            let t = r.array::<6>("time")?;
            rep.time = bcd_time(t);
            if protocol == 0xF3 {
                let n = usize::from(r.u8("wifi count")?);
                for _ in 0..n {
                    if r.remaining() < 8 {
                        break;
                    }
                    r.u16("reserved")?;
                    rep.wifi.push(Gt06Wifi {
                        mac: r.array::<6>("mac")?,
                        rssi: None,
                    });
                }
            } else {
                rep.wifi_time_reply = Some(t);
                // Access points are 7 bytes (MAC 6, RSSI 1); cells may follow.
                while r.remaining() >= 7 && rep.wifi.len() < 16 {
                    let mac = r.array::<6>("mac")?;
                    let rssi = r.u8("rssi")?;
                    rep.wifi.push(Gt06Wifi {
                        mac,
                        rssi: Some(rssi),
                    });
                }
            }
        }
        // LBS + Wi-Fi (VL01 "WiFi information packet" 0x2C; 0x33, 0xA2): time, MCC, MNC,
        // 7 (6 for 0x33) × (LAC, cell, RSSI), TA, Wi-Fi count, n × (MAC 6, RSSI 1).
        0x2C | 0x33 | 0xA2 => {
            rep.time = decode_time_opt(&mut r)?;
            let long = protocol == 0xA2;
            let mcc_raw = r.u16("mcc")?;
            let mnc = if mcc_raw & 0x8000 != 0 {
                r.u16("mnc")?
            } else {
                u16::from(r.u8("mnc")?)
            };
            let n_cells = if protocol == 0x33 { 6 } else { 7 };
            let mut cells = Vec::new();
            for _ in 0..n_cells {
                let (lac, cid) = if long {
                    (r.u32("lac")?, r.u64("cell id")?)
                } else {
                    (u32::from(r.u16("lac")?), u64::from(r.u24("cell id")?))
                };
                r.u8("rssi")?;
                if lac != 0 {
                    cells.push(Gt06CellId {
                        mcc: mcc_raw & 0x7FFF,
                        mnc,
                        lac,
                        cell_id: cid,
                    });
                }
            }
            r.u8("timing advance")?;
            let n = usize::from(r.u8("wifi count")?);
            for _ in 0..n {
                let mac = r.array::<6>("mac")?;
                let rssi = r.u8("rssi")?;
                rep.wifi.push(Gt06Wifi {
                    mac,
                    rssi: Some(rssi),
                });
            }
            let mut it = cells.into_iter();
            rep.cell = it.next();
            rep.neighbours = it.collect();
        }
        // Command reply (GT06 "Server command reply" 0x15): length, server flag (4), text,
        // [language 2]; acknowledged.
        0x15 => {
            rep.ack = true;
            let len = usize::from(r.u8("command length")?);
            if len >= 4 {
                r.u32("server flag")?;
                let body = r.bytes((len - 4).min(r.remaining()), "command")?;
                rep.text = Some(text(body, false));
            }
        }
        // Command reply (VL01 "Online command reply" 0x21): server flag (4), encoding (1 ASCII,
        // 2 UTF-16BE), text.
        0x21 => {
            r.u32("server flag")?;
            let enc = r.u8("encoding")?;
            let body = r.bytes(r.remaining(), "command")?;
            rep.text = Some(text(body, enc == 2));
        }
        // Information transfer (VL01 "Information transmission packet" 0x94): sub-type and
        // content; 0x00 external voltage (0.01 V), 0x0A IMEI/IMSI/ICCID (BCD), text types.
        0x94 => {
            let sub = r.u8("info type")?;
            rep.info_type = Some(sub);
            match sub {
                0x00 if r.remaining() >= 2 => {
                    rep.external_mv = Some(u32::from(r.u16("external voltage")?) * 10)
                }
                0x0A if r.remaining() >= 26 => {
                    r.bytes(16, "imei/imsi")?;
                    let iccid = r.bytes(10, "iccid")?;
                    rep.iccid = Some(hex::encode(iccid).replace('f', ""));
                }
                _ => {
                    let body = r.bytes(r.remaining(), "info")?;
                    if !body.is_empty() && body.iter().all(|b| b.is_ascii() && *b >= 0x09) {
                        rep.text = Some(text(body, false));
                    }
                }
            }
        }
        // Alarm 0x95 (JC100 family): time + alarm type, or (content > 7 bytes) time, lat,
        // lon, course/status, alarm type.
        0x95 => {
            rep.ack = true;
            let ext = content.len() > 7;
            if ext {
                let time = decode_time_opt(&mut r)?;
                let lat = r.u32("latitude")?;
                let lon = r.u32("longitude")?;
                let cs = r.u16("course/status")?;
                if let Some(time) = time {
                    let mut g = Gt06Gps {
                        time,
                        info_len: 0,
                        satellites: 0,
                        lat: f64::from(lat) / super::COORD_SCALE,
                        lon: f64::from(lon) / super::COORD_SCALE,
                        speed_kmh: 0,
                        course: cs & 0x03FF,
                        positioned: cs & 0x1000 != 0,
                        differential: cs & 0x2000 != 0,
                    };
                    if g.lat > 90.0 || g.lon > 180.0 {
                        return Err(DecodeError::malformed(P, "coordinates", "out of range"));
                    }
                    if cs & 0x0400 == 0 {
                        g.lat = -g.lat;
                    }
                    if cs & 0x0800 != 0 {
                        g.lon = -g.lon;
                    }
                    rep.gps = Some(g);
                }
            } else {
                rep.time = decode_time_opt(&mut r)?;
            }
            let code = r.u8("alarm type")?;
            if let AlarmMeaning::Event(e) = alarm::msg95_alarm(code, ext) {
                rep.events.push(e);
            }
        }
        p if OTHER.contains(&p) => return Ok(Gt06Message::Other { protocol, extended }),
        other => {
            return Err(DecodeError::UnknownType {
                protocol: P,
                kind: format!("{other:#04x}"),
            })
        }
    }
    Ok(Gt06Message::Report(Box::new(rep)))
}
