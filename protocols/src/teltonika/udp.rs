//! Teltonika AVL data over UDP (Teltonika wiki, "Codec 8" / "Codec 8 Extended", section
//! "UDP channel"). One datagram carries one packet; there is no CRC (UDP has its own) and no
//! handshake: the IMEI is in every datagram.
//!
//! ```text
//! length u16 | packet id u16 | not usable u8 (0x01) | AVL packet id u8 | IMEI length u16 |
//! IMEI | codec id | count | records … | count
//! ```
//!
//! `length` counts the bytes after itself. The server answers
//! `00 05 | packet id u16 | 01 | AVL packet id u8 | accepted records u8` ([`udp_ack`]).

use bytes::{BufMut, Bytes, BytesMut};

use super::{parse_data, TeltonikaFrame, MAX_IMEI_LEN, P};
use crate::util::Reader;
use crate::{DecodeError, EncodeError};

/// One UDP datagram.
#[derive(Debug, Clone, PartialEq)]
pub struct UdpPacket {
    pub packet_id: u16,
    pub avl_packet_id: u8,
    pub imei: String,
    /// `Avl`, `AvlPartial` (records out of range dropped) or `Command`.
    pub frame: TeltonikaFrame,
}

impl UdpPacket {
    /// Records to acknowledge: the packet's full count (dropped out-of-range records
    /// included, so the device does not resend them forever).
    pub fn accepted(&self) -> u8 {
        match &self.frame {
            TeltonikaFrame::Avl(p) => p.records.len().min(255) as u8,
            TeltonikaFrame::AvlPartial(p) => p.declared,
            _ => 0,
        }
    }

    /// The server's answer to this datagram (after its records are stored).
    pub fn response(&self) -> Bytes {
        udp_ack(self.packet_id, self.avl_packet_id, self.accepted())
    }

    /// The wire form (simulator, tests).
    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        if !matches!(self.frame, TeltonikaFrame::Avl(_)) {
            return Err(EncodeError::new(
                P,
                "frame",
                "a UDP datagram carries an AVL packet",
            ));
        }
        let mut tcp = BytesMut::new();
        self.frame.encode(&mut tcp)?;
        if tcp.len() < 12 {
            return Err(EncodeError::new(P, "frame", "not an AVL packet"));
        }
        // The TCP form is preamble 4 + length 4 + data + crc 4: keep the data.
        let data = &tcp[8..tcp.len() - 4];
        if self.imei.is_empty() || self.imei.len() > MAX_IMEI_LEN {
            return Err(EncodeError::new(P, "imei", format!("{:?}", self.imei)));
        }
        let body_len = 2 + 1 + 1 + 2 + self.imei.len() + data.len();
        let len = u16::try_from(body_len)
            .map_err(|_| EncodeError::new(P, "datagram", "longer than 65535 bytes"))?;
        let mut out = BytesMut::with_capacity(body_len + 2);
        out.put_u16(len);
        out.put_u16(self.packet_id);
        out.put_u8(0x01);
        out.put_u8(self.avl_packet_id);
        out.put_u16(self.imei.len() as u16);
        out.put_slice(self.imei.as_bytes());
        out.put_slice(data);
        Ok(out.freeze())
    }
}

/// The server's acknowledgement of a UDP datagram.
pub fn udp_ack(packet_id: u16, avl_packet_id: u8, accepted: u8) -> Bytes {
    let mut b = BytesMut::with_capacity(7);
    b.put_u16(5);
    b.put_u16(packet_id);
    b.put_u8(0x01);
    b.put_u8(avl_packet_id);
    b.put_u8(accepted);
    b.freeze()
}

/// Parse one datagram.
pub fn parse_udp(datagram: &[u8]) -> Result<UdpPacket, DecodeError> {
    let mut r = Reader::new(datagram, P);
    let len = usize::from(r.u16("length")?);
    if len != r.remaining() {
        return Err(DecodeError::malformed(
            P,
            "length",
            format!("{len} announced, {} in the datagram", r.remaining()),
        ));
    }
    let packet_id = r.u16("packet id")?;
    let _not_usable = r.u8("packet type")?;
    let avl_packet_id = r.u8("avl packet id")?;
    let imei_len = usize::from(r.u16("imei length")?);
    if imei_len == 0 || imei_len > MAX_IMEI_LEN {
        return Err(DecodeError::malformed(
            P,
            "imei",
            format!("length {imei_len}"),
        ));
    }
    let raw = r.bytes(imei_len, "imei")?;
    let imei = match std::str::from_utf8(raw) {
        Ok(s) if s.bytes().all(|b| b.is_ascii_digit()) => s.to_owned(),
        _ => {
            return Err(DecodeError::malformed(
                P,
                "imei",
                format!("not ASCII digits: {}", hex::encode(raw)),
            ))
        }
    };
    let frame = parse_data(r.bytes(r.remaining(), "avl data")?)?;
    Ok(UdpPacket {
        packet_id,
        avl_packet_id,
        imei,
        frame,
    })
}
