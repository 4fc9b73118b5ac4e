//! Teltonika Codec 8, 8 Extended and 16 over TCP and UDP, and the GPRS command codecs
//! 12 / 13 / 14.
//!
//! A connection starts with the IMEI handshake (`len u16` + ASCII IMEI); the server
//! answers `0x01` (accept) or `0x00` (reject) — see [`imei_response`]. The codec only
//! exposes the IMEI ([`TeltonikaFrame::Imei`]); accepting is the service's decision.
//!
//! Then the device sends AVL data packets (big-endian):
//!
//! ```text
//! 00000000 | data length u32 | codec id u8 | count u8 | records … | count u8 | crc u32
//! ```
//!
//! The CRC is CRC-16/ARC over codec id … second count, in the low 16 bits of the last
//! field. Each record: timestamp (ms, u64), priority u8, GPS element (lon i32, lat i32
//! in 1e-7°, altitude i16 m, angle u16°, satellites u8, speed u16 km/h), then the IO
//! element: Codec 8 uses 1-byte ids and counts with groups of 1/2/4/8-byte values;
//! Codec 8E uses 2-byte ids and counts and adds a group of variable-length (NX) values;
//! Codec 16 uses 2-byte ids, 1-byte counts and a generation-type byte after the event id
//! (Teltonika wiki, "Codec 16"). The server acknowledges with the number of records as u32
//! ([`TeltonikaFrame::response`]).
//!
//! A record whose values are out of range (latitude beyond ±90°, a timestamp after 2100 or
//! not representable) is dropped and listed in [`AvlPartial::rejected`]; the packet's good
//! records are kept and the packet is acknowledged with its full count, so the device does
//! not resend it forever. The one-byte `0xFF` keep-alive ([`TeltonikaFrame::KeepAlive`])
//! needs no answer. Codec 12/13/14 messages (command responses) decode as
//! [`TeltonikaFrame::Command`]. UDP datagrams: see [`udp`].
//!
//! Teltonika has no start marker: a bad preamble, IMEI length or oversized data length
//! loses the framing and is reported as a fatal error. A bad CRC or an unknown codec
//! inside a well-delimited packet only drops that packet.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};
use em_model::{DeviceEventKind, FixSource, Position, Protocol, Record};
use tokio_util::codec::{Decoder, Encoder};

use crate::util::{crc16_arc, hdop_to_accuracy_m, Reader};
use crate::{CodecError, DecodeError, EncodeError};

const P: Protocol = Protocol::Teltonika;

pub mod udp;

/// Records timestamped at or after this instant (2100-01-01T00:00:00Z, ms) are out of range.
pub const MAX_TIMESTAMP_MS: u64 = 4_102_444_800_000;

/// Default limit on the AVL data length field.
pub const DEFAULT_MAX_PACKET_LEN: usize = 64 * 1024;
/// Longest IMEI handshake accepted.
pub const MAX_IMEI_LEN: usize = 32;

/// Well-known AVL IO element ids mapped into the model.
pub mod io {
    /// GSM signal 0..=5.
    pub const GSM_SIGNAL: u16 = 21;
    /// External (charger / vehicle) voltage, mV.
    pub const EXTERNAL_VOLTAGE: u16 = 66;
    /// Internal battery voltage, mV.
    pub const BATTERY_VOLTAGE: u16 = 67;
    /// GNSS status: 0 off, 1 on with fix, 2 on without fix, 3 sleep.
    pub const GNSS_STATUS: u16 = 69;
    /// Battery level, %.
    pub const BATTERY_LEVEL: u16 = 113;
    /// Charger connected: 0/1.
    pub const CHARGER_CONNECTED: u16 = 116;
    /// HDOP × 10.
    pub const HDOP: u16 = 182;
    pub const IGNITION: u16 = 239;
    pub const MOVEMENT: u16 = 240;
    /// GSM jamming detected: 0/1.
    pub const JAMMING: u16 = 249;
    /// Unplug (external power removed): 0/1.
    pub const UNPLUG: u16 = 252;
    /// GNSS jamming: 0 none, 1 warning, 2 critical.
    pub const GNSS_JAMMING: u16 = 318;
}

/// Codec id of an AVL packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AvlCodec {
    Codec8,
    Codec8Extended,
    /// Codec 16: 2-byte IO ids, 1-byte counts, generation type (decoded only).
    Codec16,
}

impl AvlCodec {
    pub fn id(self) -> u8 {
        match self {
            AvlCodec::Codec8 => 0x08,
            AvlCodec::Codec8Extended => 0x8E,
            AvlCodec::Codec16 => 0x10,
        }
    }
}

/// Value of one IO element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoValue {
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    /// Variable-length (NX) value, Codec 8 Extended only.
    Bytes(Vec<u8>),
}

impl IoValue {
    /// Numeric value (None for variable-length values).
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            IoValue::U8(v) => Some(u64::from(*v)),
            IoValue::U16(v) => Some(u64::from(*v)),
            IoValue::U32(v) => Some(u64::from(*v)),
            IoValue::U64(v) => Some(*v),
            IoValue::Bytes(_) => None,
        }
    }

    fn group(&self) -> usize {
        match self {
            IoValue::U8(_) => 0,
            IoValue::U16(_) => 1,
            IoValue::U32(_) => 2,
            IoValue::U64(_) => 3,
            IoValue::Bytes(_) => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoElement {
    pub id: u16,
    pub value: IoValue,
}

/// GPS element of an AVL record.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AvlGps {
    /// Degrees (1e-7 resolution on the wire).
    pub lon: f64,
    pub lat: f64,
    pub altitude_m: i16,
    pub angle_deg: u16,
    /// 0 when the record has no valid fix (then lat/lon are the last known fix).
    pub satellites: u8,
    pub speed_kmh: u16,
}

/// One AVL record.
#[derive(Debug, Clone, PartialEq)]
pub struct AvlRecord {
    pub timestamp: DateTime<Utc>,
    /// 0 low, 1 high, 2 panic.
    pub priority: u8,
    pub gps: AvlGps,
    /// Id of the IO element whose change generated the record (0 = periodic).
    pub event_io: u16,
    /// Elements in wire order (grouped 1, 2, 4, 8 bytes, then variable length).
    pub io: Vec<IoElement>,
}

impl AvlRecord {
    /// Numeric value of IO element `id`, if present.
    pub fn io_value(&self, id: u16) -> Option<u64> {
        self.io
            .iter()
            .find(|e| e.id == id)
            .and_then(|e| e.value.as_u64())
    }

    /// The normalised record.
    pub fn to_record(&self, device_id: &str, received: DateTime<Utc>) -> Record {
        let mut r = Record::new(device_id, P, received);
        r.device_time = self.timestamp;
        r.received_time = received;
        let g = &self.gps;
        if !(g.lat == 0.0 && g.lon == 0.0 && g.satellites == 0) {
            let valid = match self.io_value(io::GNSS_STATUS) {
                Some(status) => status == 1 && g.satellites > 0,
                None => g.satellites > 0,
            };
            r.position = Some(Position {
                lat: g.lat,
                lon: g.lon,
                accuracy_m: self
                    .io_value(io::HDOP)
                    .map(|h| hdop_to_accuracy_m(h as f32 / 10.0)),
                speed_kmh: Some(f32::from(g.speed_kmh)),
                course_deg: Some(f32::from(g.angle_deg)),
                altitude_m: Some(f32::from(g.altitude_m)),
                satellites: Some(g.satellites),
                valid,
                source: FixSource::Gnss,
            });
        }
        r.battery_pct = self.io_value(io::BATTERY_LEVEL).map(|v| v.min(100) as u8);
        r.gsm_signal = self.io_value(io::GSM_SIGNAL).map(|v| (v.min(5) * 20) as u8);
        r.charging = self.io_value(io::CHARGER_CONNECTED).map(|v| v != 0);
        if self.priority == 2 {
            r.events.push(DeviceEventKind::Sos);
        }
        if self.io_value(io::JAMMING).is_some_and(|v| v != 0)
            || self.io_value(io::GNSS_JAMMING).is_some_and(|v| v != 0)
        {
            r.events.push(DeviceEventKind::GpsJamming);
        }
        if self.io_value(io::UNPLUG).is_some_and(|v| v != 0) {
            r.events.push(DeviceEventKind::PowerCut);
        }
        if self.event_io == io::CHARGER_CONNECTED {
            match r.charging {
                Some(true) => r.events.push(DeviceEventKind::ChargerConnected),
                Some(false) => r.events.push(DeviceEventKind::ChargerDisconnected),
                None => {}
            }
        }
        r
    }
}

/// An AVL data packet.
#[derive(Debug, Clone, PartialEq)]
pub struct AvlPacket {
    pub codec: AvlCodec,
    pub records: Vec<AvlRecord>,
}

/// A record of an AVL packet that was dropped because a value is out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRecord {
    /// Position of the record in its packet (0-based).
    pub index: u8,
    pub error: DecodeError,
}

/// An AVL packet some of whose records were out of range: the good ones are in `packet`,
/// the packet is acknowledged with `declared` (the full count), the bad ones are listed.
#[derive(Debug, Clone, PartialEq)]
pub struct AvlPartial {
    pub packet: AvlPacket,
    pub declared: u8,
    pub rejected: Vec<RejectedRecord>,
}

/// A GPRS command-codec message (Codec 12, 13 or 14): in practice the device's answer to a
/// command the server sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GprsMessage {
    /// 0x0C, 0x0D or 0x0E.
    pub codec: u8,
    /// 0x05 command, 0x06 response, 0x11 not acknowledged (Codec 14).
    pub kind: u8,
    /// Codec 13's timestamp.
    pub timestamp: Option<DateTime<Utc>>,
    /// Codec 14's IMEI (hex digits of its 8 bytes).
    pub imei: Option<String>,
    pub payload: Vec<u8>,
}

impl GprsMessage {
    /// The payload as text (command responses are ASCII).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// A decoded Teltonika message.
#[derive(Debug, Clone, PartialEq)]
pub enum TeltonikaFrame {
    /// The IMEI handshake; answer with [`imei_response`].
    Imei(String),
    Avl(AvlPacket),
    /// An AVL packet with out-of-range records dropped (acknowledged in full).
    AvlPartial(AvlPartial),
    /// The one-byte `0xFF` keep-alive: no answer, no record.
    KeepAlive,
    /// A Codec 12/13/14 message (command response): no answer, no record.
    Command(GprsMessage),
}

/// Server's answer to the IMEI handshake: `0x01` accept, `0x00` reject.
pub fn imei_response(accept: bool) -> Bytes {
    Bytes::from_static(if accept { &[0x01] } else { &[0x00] })
}

/// Server's acknowledgement of an AVL packet: the accepted record count as u32.
pub fn avl_ack(records: u32) -> Bytes {
    Bytes::copy_from_slice(&records.to_be_bytes())
}

impl TeltonikaFrame {
    pub fn kind(&self) -> &'static str {
        match self {
            TeltonikaFrame::Imei(_) => "imei",
            TeltonikaFrame::Avl(_) | TeltonikaFrame::AvlPartial(_) => "avl",
            TeltonikaFrame::KeepAlive => "keep_alive",
            TeltonikaFrame::Command(_) => "command",
        }
    }

    /// Records of an AVL packet; the IMEI handshake gives one `Login` record.
    pub fn to_records(&self, device_id: &str, received: DateTime<Utc>) -> Vec<Record> {
        match self {
            TeltonikaFrame::Imei(_) => {
                let mut r = Record::new(device_id, P, received);
                r.events.push(DeviceEventKind::Login);
                vec![r]
            }
            TeltonikaFrame::Avl(p) | TeltonikaFrame::AvlPartial(AvlPartial { packet: p, .. }) => p
                .records
                .iter()
                .map(|rec| rec.to_record(device_id, received))
                .collect(),
            TeltonikaFrame::KeepAlive | TeltonikaFrame::Command(_) => Vec::new(),
        }
    }

    /// The acknowledgement for an AVL packet (all records accepted). `None` for the
    /// IMEI handshake: the service decides and sends [`imei_response`].
    pub fn response(&self) -> Option<Bytes> {
        match self {
            TeltonikaFrame::Imei(_) => None,
            TeltonikaFrame::Avl(p) => Some(avl_ack(p.records.len() as u32)),
            TeltonikaFrame::AvlPartial(p) => Some(avl_ack(u32::from(p.declared))),
            TeltonikaFrame::KeepAlive | TeltonikaFrame::Command(_) => None,
        }
    }

    /// Append the wire form to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            TeltonikaFrame::Imei(imei) => {
                if imei.is_empty() || imei.len() > MAX_IMEI_LEN || !imei.is_ascii() {
                    return Err(EncodeError::new(P, "imei", format!("{imei:?}")));
                }
                dst.put_u16(imei.len() as u16);
                dst.put_slice(imei.as_bytes());
            }
            TeltonikaFrame::KeepAlive => dst.put_u8(0xFF),
            TeltonikaFrame::AvlPartial(_) => {
                return Err(EncodeError::new(
                    P,
                    "frame",
                    "partial packets are decoded only",
                ))
            }
            TeltonikaFrame::Command(m) => {
                let mut data = BytesMut::with_capacity(m.payload.len() + 12);
                data.put_u8(m.codec);
                data.put_u8(1);
                data.put_u8(m.kind);
                let extra = match m.codec {
                    0x0D => 4,
                    0x0E => 8,
                    _ => 0,
                };
                data.put_u32((m.payload.len() + extra) as u32);
                if m.codec == 0x0D {
                    let secs = m.timestamp.map_or(0, |t| t.timestamp()) as u32;
                    data.put_u32(secs);
                }
                if m.codec == 0x0E {
                    let imei = m.imei.as_deref().unwrap_or("");
                    let bytes = hex::decode(format!("{imei:0>16}"))
                        .map_err(|_| EncodeError::new(P, "imei", "not 16 hex digits"))?;
                    data.put_slice(&bytes);
                }
                data.put_slice(&m.payload);
                data.put_u8(1);
                dst.put_u32(0);
                dst.put_u32(data.len() as u32);
                dst.put_slice(&data);
                dst.put_u32(u32::from(crc16_arc(&data)));
            }
            TeltonikaFrame::Avl(p) => {
                if p.codec == AvlCodec::Codec16 {
                    return Err(EncodeError::new(P, "codec", "Codec 16 is decoded only"));
                }
                let n = u8::try_from(p.records.len()).map_err(|_| {
                    EncodeError::new(P, "records", format!("{} > 255", p.records.len()))
                })?;
                let mut data = BytesMut::with_capacity(64 * p.records.len() + 3);
                data.put_u8(p.codec.id());
                data.put_u8(n);
                for rec in &p.records {
                    encode_record(p.codec, rec, &mut data)?;
                }
                data.put_u8(n);
                dst.reserve(data.len() + 12);
                dst.put_u32(0);
                dst.put_u32(data.len() as u32);
                dst.put_slice(&data);
                dst.put_u32(u32::from(crc16_arc(&data)));
            }
        }
        Ok(())
    }

    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut b = BytesMut::new();
        self.encode(&mut b)?;
        Ok(b.freeze())
    }
}

fn encode_coord(v: f64, max: f64, field: &'static str) -> Result<i32, EncodeError> {
    if !v.is_finite() || v.abs() > max {
        return Err(EncodeError::new(P, field, format!("{v} out of range")));
    }
    Ok((v * 1e7).round() as i32)
}

fn encode_record(codec: AvlCodec, rec: &AvlRecord, out: &mut BytesMut) -> Result<(), EncodeError> {
    let ms = u64::try_from(rec.timestamp.timestamp_millis())
        .map_err(|_| EncodeError::new(P, "timestamp", "before 1970"))?;
    out.put_u64(ms);
    out.put_u8(rec.priority);
    out.put_i32(encode_coord(rec.gps.lon, 180.0, "lon")?);
    out.put_i32(encode_coord(rec.gps.lat, 90.0, "lat")?);
    out.put_i16(rec.gps.altitude_m);
    out.put_u16(rec.gps.angle_deg);
    out.put_u8(rec.gps.satellites);
    out.put_u16(rec.gps.speed_kmh);
    let ext = codec == AvlCodec::Codec8Extended;
    let put_n = |out: &mut BytesMut, n: usize, field: &'static str| -> Result<(), EncodeError> {
        if ext {
            let n = u16::try_from(n).map_err(|_| EncodeError::new(P, field, "too many"))?;
            out.put_u16(n);
        } else {
            let n = u8::try_from(n).map_err(|_| EncodeError::new(P, field, "too many"))?;
            out.put_u8(n);
        }
        Ok(())
    };
    let put_id = |out: &mut BytesMut, id: u16| -> Result<(), EncodeError> {
        if ext {
            out.put_u16(id);
        } else {
            let id = u8::try_from(id)
                .map_err(|_| EncodeError::new(P, "io id", format!("{id} > 255 in Codec 8")))?;
            out.put_u8(id);
        }
        Ok(())
    };
    put_id(out, rec.event_io)?;
    put_n(out, rec.io.len(), "io count")?;
    for group in 0..5 {
        if group == 4 && !ext {
            if rec.io.iter().any(|e| e.value.group() == 4) {
                return Err(EncodeError::new(
                    P,
                    "io",
                    "variable-length values need Codec 8E",
                ));
            }
            break;
        }
        let members: Vec<&IoElement> = rec.io.iter().filter(|e| e.value.group() == group).collect();
        put_n(out, members.len(), "io group count")?;
        for e in members {
            put_id(out, e.id)?;
            match &e.value {
                IoValue::U8(v) => out.put_u8(*v),
                IoValue::U16(v) => out.put_u16(*v),
                IoValue::U32(v) => out.put_u32(*v),
                IoValue::U64(v) => out.put_u64(*v),
                IoValue::Bytes(b) => {
                    let len = u16::try_from(b.len())
                        .map_err(|_| EncodeError::new(P, "io value", "longer than 65535"))?;
                    out.put_u16(len);
                    out.put_slice(b);
                }
            }
        }
    }
    Ok(())
}

/// One record. The outer error is structural (the packet cannot be read further); the inner
/// one is a value out of range (the record is dropped, the packet goes on).
fn decode_record(
    codec: AvlCodec,
    r: &mut Reader<'_>,
) -> Result<Result<AvlRecord, DecodeError>, DecodeError> {
    let ms = r.u64("timestamp")?;
    let timestamp = i64::try_from(ms)
        .ok()
        .filter(|_| ms < MAX_TIMESTAMP_MS)
        .and_then(DateTime::from_timestamp_millis)
        .ok_or_else(|| DecodeError::malformed(P, "timestamp", format!("{ms} ms out of range")));
    let priority = r.u8("priority")?;
    let lon = f64::from(r.u32("longitude")? as i32) / 1e7;
    let lat = f64::from(r.u32("latitude")? as i32) / 1e7;
    let coords = if lat.abs() > 90.0 || lon.abs() > 180.0 {
        Err(DecodeError::malformed(
            P,
            "coordinates",
            format!("lat {lat} / lon {lon} out of range"),
        ))
    } else {
        Ok(())
    };
    let gps = AvlGps {
        lon,
        lat,
        altitude_m: r.u16("altitude")? as i16,
        angle_deg: r.u16("angle")?,
        satellites: r.u8("satellites")?,
        speed_kmh: r.u16("speed")?,
    };
    // Codec 8: 1-byte ids and counts. 8E: 2-byte ids and counts, NX group. 16: 2-byte ids,
    // 1-byte counts, generation type after the event id.
    let wide_ids = codec != AvlCodec::Codec8;
    let wide_counts = codec == AvlCodec::Codec8Extended;
    let read_n = |r: &mut Reader<'_>, f| -> Result<usize, DecodeError> {
        Ok(if wide_counts {
            usize::from(r.u16(f)?)
        } else {
            usize::from(r.u8(f)?)
        })
    };
    let read_id = |r: &mut Reader<'_>| -> Result<u16, DecodeError> {
        Ok(if wide_ids {
            r.u16("io id")?
        } else {
            u16::from(r.u8("io id")?)
        })
    };
    let event_io = read_id(r)?;
    if codec == AvlCodec::Codec16 {
        let _generation_type = r.u8("generation type")?;
    }
    let _total = read_n(r, "io total count")?;
    let mut io = Vec::new();
    for group in 0..5 {
        if group == 4 && !wide_counts {
            break;
        }
        let n = read_n(r, "io group count")?;
        // Each element takes at least 2 bytes: refuse counts the packet cannot hold
        // before allocating anything.
        if n > r.remaining() / 2 {
            return Err(DecodeError::malformed(
                P,
                "io group count",
                format!("{n} elements cannot fit in {} bytes", r.remaining()),
            ));
        }
        io.reserve(n);
        for _ in 0..n {
            let id = read_id(r)?;
            let value = match group {
                0 => IoValue::U8(r.u8("io value")?),
                1 => IoValue::U16(r.u16("io value")?),
                2 => IoValue::U32(r.u32("io value")?),
                3 => IoValue::U64(r.u64("io value")?),
                _ => {
                    let len = usize::from(r.u16("io value length")?);
                    IoValue::Bytes(r.bytes(len, "io value")?.to_vec())
                }
            };
            io.push(IoElement { id, value });
        }
    }
    Ok(timestamp.and_then(|timestamp| {
        coords.map(|()| AvlRecord {
            timestamp,
            priority,
            gps,
            event_io,
            io,
        })
    }))
}

/// Parse the AVL data field (codec id … second record count) of an all-good packet: a
/// record out of range is an error here (see [`parse_data`] for the tolerant form).
pub fn parse_avl_data(data: &[u8]) -> Result<AvlPacket, DecodeError> {
    match parse_data(data)? {
        TeltonikaFrame::Avl(p) => Ok(p),
        TeltonikaFrame::AvlPartial(p) => Err(p.rejected[0].error.clone()),
        _ => Err(DecodeError::UnknownType {
            protocol: P,
            kind: format!("codec {:#04x}", data.first().copied().unwrap_or(0)),
        }),
    }
}

/// Parse the data field of a packet (codec id … second count): AVL (Codec 8, 8E, 16; records
/// out of range dropped and listed) or a Codec 12/13/14 message.
pub fn parse_data(data: &[u8]) -> Result<TeltonikaFrame, DecodeError> {
    let mut r = Reader::new(data, P);
    let codec = match r.u8("codec id")? {
        0x08 => AvlCodec::Codec8,
        0x8E => AvlCodec::Codec8Extended,
        0x10 => AvlCodec::Codec16,
        c @ (0x0C..=0x0E) => return parse_gprs(c, &mut r).map(TeltonikaFrame::Command),
        other => {
            return Err(DecodeError::UnknownType {
                protocol: P,
                kind: format!("codec {other:#04x}"),
            })
        }
    };
    let n1 = r.u8("record count")?;
    // A record is at least 24 bytes: do not trust the count for allocation.
    let mut records = Vec::with_capacity(usize::from(n1).min(r.remaining() / 24));
    let mut rejected = Vec::new();
    for index in 0..n1 {
        match decode_record(codec, &mut r)? {
            Ok(rec) => records.push(rec),
            Err(error) => rejected.push(RejectedRecord { index, error }),
        }
    }
    let n2 = r.u8("second record count")?;
    if n1 != n2 {
        return Err(DecodeError::malformed(
            P,
            "record count",
            format!("first count {n1} differs from second count {n2}"),
        ));
    }
    if r.remaining() != 0 {
        return Err(DecodeError::malformed(
            P,
            "data length",
            format!("{} bytes after the last record", r.remaining()),
        ));
    }
    let packet = AvlPacket { codec, records };
    Ok(if rejected.is_empty() {
        TeltonikaFrame::Avl(packet)
    } else {
        TeltonikaFrame::AvlPartial(AvlPartial {
            packet,
            declared: n1,
            rejected,
        })
    })
}

/// Codec 12 / 13 / 14 (Teltonika wiki "Codec 12", "Codec 13", "Codec 14"): quantity 1,
/// type, size u32, [timestamp u32 (13) | IMEI 8 bytes (14)], payload, quantity 2.
fn parse_gprs(codec: u8, r: &mut Reader<'_>) -> Result<GprsMessage, DecodeError> {
    let q1 = r.u8("quantity")?;
    let kind = r.u8("type")?;
    let size = r.u32("size")? as usize;
    if size > r.remaining() {
        return Err(DecodeError::malformed(
            P,
            "size",
            format!("{size} bytes announced, {} left", r.remaining()),
        ));
    }
    let mut body = Reader::new(r.bytes(size, "payload")?, P);
    let (mut timestamp, mut imei) = (None, None);
    if codec == 0x0D {
        let secs = body.u32("timestamp")?;
        timestamp = DateTime::from_timestamp(i64::from(secs), 0);
    }
    if codec == 0x0E {
        imei = Some(hex::encode(body.array::<8>("imei")?));
    }
    let payload = body.bytes(body.remaining(), "payload")?.to_vec();
    let q2 = r.u8("quantity 2")?;
    if q1 != q2 || r.remaining() != 0 {
        return Err(DecodeError::malformed(
            P,
            "quantity",
            format!("first {q1}, second {q2}, {} bytes after", r.remaining()),
        ));
    }
    Ok(GprsMessage {
        codec,
        kind,
        timestamp,
        imei,
        payload,
    })
}

/// Stateful per-connection Teltonika codec (IMEI handshake, then AVL packets).
///
/// `Decoder::Item` is `Result<TeltonikaFrame, DecodeError>` for non-fatal errors; lost
/// framing is `Err(CodecError::Fatal(_))`, after which the connection must be closed.
#[derive(Debug, Clone)]
pub struct TeltonikaCodec {
    imei: Option<String>,
    max_packet_len: usize,
}

impl Default for TeltonikaCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl TeltonikaCodec {
    pub fn new() -> Self {
        TeltonikaCodec {
            imei: None,
            max_packet_len: DEFAULT_MAX_PACKET_LEN,
        }
    }

    /// A codec whose handshake already happened (tests, the CLI's `--imei`).
    pub fn with_imei(imei: impl Into<String>) -> Self {
        TeltonikaCodec {
            imei: Some(imei.into()),
            max_packet_len: DEFAULT_MAX_PACKET_LEN,
        }
    }

    /// Limit on the AVL data length field (default [`DEFAULT_MAX_PACKET_LEN`]).
    pub fn with_max_packet_len(mut self, max: usize) -> Self {
        self.max_packet_len = max;
        self
    }

    /// IMEI from the handshake of this connection.
    pub fn imei(&self) -> Option<&str> {
        self.imei.as_deref()
    }

    fn decode_one(
        &mut self,
        src: &mut BytesMut,
    ) -> Result<Option<Result<TeltonikaFrame, DecodeError>>, DecodeError> {
        if src.first() == Some(&0xFF) {
            // Keep-alive ping (one byte, no answer).
            src.advance(1);
            return Ok(Some(Ok(TeltonikaFrame::KeepAlive)));
        }
        if src.len() < 2 {
            return Ok(None);
        }
        if src[0] == 0 && src[1] == 0 {
            // AVL packet (a zero IMEI length is not a valid handshake).
            if src.len() < 8 {
                if src[..src.len().min(4)].iter().any(|&b| b != 0) {
                    return Err(DecodeError::Framing {
                        protocol: P,
                        detail: format!("bad preamble {}", hex::encode(&src[..4.min(src.len())])),
                    });
                }
                return Ok(None);
            }
            if src[..4] != [0, 0, 0, 0] {
                return Err(DecodeError::Framing {
                    protocol: P,
                    detail: format!("bad preamble {}", hex::encode(&src[..4])),
                });
            }
            let len = u32::from_be_bytes([src[4], src[5], src[6], src[7]]) as usize;
            if len > self.max_packet_len {
                return Err(DecodeError::Oversized {
                    protocol: P,
                    len,
                    max: self.max_packet_len,
                });
            }
            if len < 3 {
                return Err(DecodeError::Framing {
                    protocol: P,
                    detail: format!("data length {len} too short"),
                });
            }
            let total = 8 + len + 4;
            if src.len() < total {
                src.reserve(total - src.len());
                return Ok(None);
            }
            let expected = u32::from_be_bytes([
                src[total - 4],
                src[total - 3],
                src[total - 2],
                src[total - 1],
            ]);
            let computed = u32::from(crc16_arc(&src[8..8 + len]));
            if expected != computed {
                src.advance(total);
                return Ok(Some(Err(DecodeError::BadChecksum {
                    protocol: P,
                    expected,
                    computed,
                })));
            }
            if self.imei.is_none() {
                src.advance(total);
                return Ok(Some(Err(DecodeError::NotLoggedIn { protocol: P })));
            }
            let parsed = parse_data(&src[8..8 + len]);
            src.advance(total);
            Ok(Some(parsed))
        } else {
            let len = usize::from(u16::from_be_bytes([src[0], src[1]]));
            if len > MAX_IMEI_LEN {
                return Err(DecodeError::Framing {
                    protocol: P,
                    detail: format!(
                        "expected an IMEI handshake (length ≤ {MAX_IMEI_LEN}) or an AVL preamble, got {}",
                        hex::encode(&src[..2])
                    ),
                });
            }
            if src.len() < 2 + len {
                return Ok(None);
            }
            let raw = &src[2..2 + len];
            let result = match std::str::from_utf8(raw) {
                Ok(s) if s.bytes().all(|b| b.is_ascii_digit()) => {
                    let imei = s.to_owned();
                    self.imei = Some(imei.clone());
                    Ok(TeltonikaFrame::Imei(imei))
                }
                _ => Err(DecodeError::malformed(
                    P,
                    "imei",
                    format!("not ASCII digits: {}", hex::encode(raw)),
                )),
            };
            src.advance(2 + len);
            Ok(Some(result))
        }
    }
}

impl Decoder for TeltonikaCodec {
    type Item = Result<TeltonikaFrame, DecodeError>;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        self.decode_one(src).map_err(CodecError::Fatal)
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let decoded = self.decode(src)?;
        Ok(crate::util::at_eof(P, decoded, src))
    }
}

impl Encoder<TeltonikaFrame> for TeltonikaCodec {
    type Error = std::io::Error;
    fn encode(&mut self, item: TeltonikaFrame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.encode(dst).map_err(Into::into)
    }
}

impl Encoder<&TeltonikaFrame> for TeltonikaCodec {
    type Error = std::io::Error;
    fn encode(&mut self, item: &TeltonikaFrame, dst: &mut BytesMut) -> Result<(), Self::Error> {
        item.encode(dst).map_err(Into::into)
    }
}
