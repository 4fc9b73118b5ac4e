//! `em-protocols` owns the device wire protocols of the EM platform: pure codecs (no
//! I/O) that turn bytes from tags and trackers into the one normalised
//! [`em_model::Record`], and encode the same protocols for the fleet simulator and tests.
//!
//! | protocol | module | transport | framing / state |
//! |---|---|---|---|
//! | GT06 / Concox | [`gt06`] | TCP | `78 78`/`79 79` … `0D 0A`, CRC-16/X-25; IMEI from login |
//! | Teltonika Codec 8 / 8E | [`teltonika`] | TCP | IMEI handshake, length-prefixed AVL, CRC-16/ARC |
//! | H02 | [`h02`] | TCP | text `*…#` |
//! | OsmAnd | [`osmand`] | HTTP query | one report per request |
//! | Open EM protocol v1 | [`em`] | MQTT, JSON | topic `em/v1/{device_id}/{kind}` |
//!
//! Streaming codecs implement `tokio_util::codec::{Decoder, Encoder}` with
//! `Decoder::Item = Result<Frame, DecodeError>`: an `Err` item is a non-fatal error the
//! codec has already resynchronised past (count it by [`DecodeError::reason`], keep the
//! connection); `Decoder::Error` is [`CodecError`], whose `Fatal` variant means the
//! stream cannot be framed any more. Every frame type has `to_records(device_id,
//! received_time)` and `response()` (the bytes the device expects, `None` when none).
//! [`detect`] guesses the protocol from the first bytes of a connection or message.

pub mod cli;
pub mod em;
mod error;
pub mod gt06;
pub mod h02;
pub mod osmand;
pub mod teltonika;
mod util;

pub use em_model::{Protocol, Record};
pub use error::{CodecError, DecodeError, EncodeError};
/// Re-exported so users (benchmarks, the simulator) need no direct `tokio-util` dependency.
pub use tokio_util::codec::{Decoder, Encoder};
pub use util::{crc16_arc, crc16_x25, hdop_to_accuracy_m};

/// Guess the protocol from the first bytes of a TCP stream, an HTTP request or an MQTT
/// topic. `None` when the bytes fit no protocol (or are too few to tell).
pub fn detect(first_bytes: &[u8]) -> Option<Protocol> {
    match first_bytes {
        [0x78, 0x78, ..] | [0x79, 0x79, ..] => return Some(Protocol::Gt06),
        [b'*', ..] | [b'$', ..] => return Some(Protocol::H02),
        [0, 0, 0, 0, ..] => return Some(Protocol::Teltonika),
        [0, n, rest @ ..]
            if (1..=teltonika::MAX_IMEI_LEN).contains(&usize::from(*n))
                && !rest.is_empty()
                && rest.iter().take(usize::from(*n)).all(u8::is_ascii_digit) =>
        {
            return Some(Protocol::Teltonika)
        }
        _ => {}
    }
    if first_bytes.starts_with(em::TOPIC_PREFIX.as_bytes()) {
        return Some(Protocol::Em);
    }
    let text = std::str::from_utf8(first_bytes).ok()?;
    let t = text.trim_start();
    let http = ["GET ", "POST ", "http://", "https://", "/?", "?"]
        .iter()
        .any(|p| t.starts_with(p));
    let query = t.starts_with("id=") || t.starts_with("deviceid=");
    if (http || query) && (t.contains("id=")) {
        return Some(Protocol::Osmand);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_each_protocol() {
        assert_eq!(detect(&[0x78, 0x78, 0x0D, 0x01]), Some(Protocol::Gt06));
        assert_eq!(detect(&[0x79, 0x79, 0x00]), Some(Protocol::Gt06));
        assert_eq!(
            detect(b"\x00\x0f356307042441013"),
            Some(Protocol::Teltonika)
        );
        assert_eq!(
            detect(&[0, 0, 0, 0, 0, 0, 0, 0x36]),
            Some(Protocol::Teltonika)
        );
        assert_eq!(detect(b"*HQ,865205030330012,V1,"), Some(Protocol::H02));
        assert_eq!(
            detect(b"GET /?id=1&lat=1&lon=2 HTTP/1.1"),
            Some(Protocol::Osmand)
        );
        assert_eq!(detect(b"id=1&lat=1&lon=2"), Some(Protocol::Osmand));
        assert_eq!(detect(b"em/v1/tag-1/telemetry {}"), Some(Protocol::Em));
        assert_eq!(detect(b"hello"), None);
        assert_eq!(detect(&[0x78]), None);
        assert_eq!(detect(&[]), None);
        assert_eq!(detect(&[0, 0x0F, b'x']), None);
    }
}
