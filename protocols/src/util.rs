//! Small helpers shared by the binary codecs: a bounds-checked big-endian reader,
//! checksum tables and time conversion.

use chrono::{DateTime, NaiveDate, Utc};
use crc::{Crc, Table, CRC_16_ARC, CRC_16_IBM_SDLC};
use em_model::Protocol;

use crate::DecodeError;

/// CRC-16/X-25 (a.k.a. CRC-ITU / IBM-SDLC), used by GT06.
pub(crate) static CRC_X25: Crc<u16, Table<16>> = Crc::<u16, Table<16>>::new(&CRC_16_IBM_SDLC);
/// CRC-16/ARC (a.k.a. CRC-16/IBM), used by Teltonika.
pub(crate) static CRC_ARC: Crc<u16, Table<16>> = Crc::<u16, Table<16>>::new(&CRC_16_ARC);

/// CRC-16/X-25 of `data` (GT06 "CRC-ITU").
pub fn crc16_x25(data: &[u8]) -> u16 {
    CRC_X25.checksum(data)
}

/// CRC-16/ARC of `data` (Teltonika "CRC-16/IBM").
pub fn crc16_arc(data: &[u8]) -> u16 {
    CRC_ARC.checksum(data)
}

/// Bounds-checked big-endian reader over one already-framed message. Every read that
/// would go past the end yields a `Malformed` error naming the field.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    protocol: Protocol,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], protocol: Protocol) -> Self {
        Reader {
            buf,
            pos: 0,
            protocol,
        }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(DecodeError::malformed(
                self.protocol,
                field,
                format!(
                    "needs {n} bytes at offset {}, only {} left",
                    self.pos,
                    self.remaining()
                ),
            )),
        }
    }

    pub(crate) fn array<const N: usize>(
        &mut self,
        field: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        let s = self.bytes(N, field)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u24(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let [a, b, c] = self.array(field)?;
        Ok(u32::from_be_bytes([0, a, b, c]))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }
}

/// UTC date-time from calendar fields; `None` when they do not form a valid instant.
pub(crate) fn utc_from_fields(
    year: i32,
    month: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
) -> Option<DateTime<Utc>> {
    NaiveDate::from_ymd_opt(year, month, day)?
        .and_hms_opt(hour, min, sec)
        .map(|t| t.and_utc())
}

/// Horizontal accuracy in metres from HDOP (HDOP × a typical UERE of 5 m).
pub fn hdop_to_accuracy_m(hdop: f32) -> f32 {
    hdop * 5.0
}

/// Knots to km/h.
pub(crate) const KNOTS_TO_KMH: f64 = 1.852;

/// End of stream for the streaming codecs: a frame still decodable from `src` is returned;
/// leftover bytes that do not form a frame are dropped and reported as `Truncated`.
pub(crate) fn at_eof<T>(
    protocol: em_model::Protocol,
    decoded: Option<Result<T, crate::DecodeError>>,
    src: &mut bytes::BytesMut,
) -> Option<Result<T, crate::DecodeError>> {
    match decoded {
        Some(item) => Some(item),
        None if src.is_empty() => None,
        None => {
            let remaining = src.len();
            src.clear();
            Some(Err(crate::DecodeError::Truncated {
                protocol,
                remaining,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_catalogue_check_values() {
        // The standard check input "123456789" and the catalogue check values.
        assert_eq!(crc16_x25(b"123456789"), 0x906E);
        assert_eq!(crc16_arc(b"123456789"), 0xBB3D);
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[1, 2, 3], Protocol::Gt06);
        assert_eq!(r.u16("a").unwrap(), 0x0102);
        assert!(r.u16("b").is_err());
        assert_eq!(r.u8("c").unwrap(), 3);
        assert!(r.u8("d").is_err());
        assert!(r.bytes(usize::MAX, "e").is_err());
    }
}
