#![no_main]

use bytes::BytesMut;
use em_protocols::h02::{parse_binary, H02Codec, H02Profile, SensorUse};
use em_protocols::{CodecError, Decoder};

// Binary `$` reports with the length recognised from the stream, and the record mapping:
// no panic, progress on every step, every decoded frame maps to records and re-encodes.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let now = chrono::DateTime::UNIX_EPOCH;
    let profile = H02Profile {
        sensor1: SensorUse::Strap,
        sensor2: SensorUse::Case,
    };
    if let Ok(frame) = parse_binary(data) {
        let _ = frame.to_records_with(frame.device_id(), now, &profile);
    }
    let mut codec = H02Codec::new().with_clock(now);
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match codec.decode_eof(&mut buf) {
            Ok(Some(item)) => {
                assert!(buf.len() < before, "item without progress");
                if let Ok(frame) = item {
                    let _ = frame.to_records_with(frame.device_id(), now, &profile);
                    let _ = frame.response_at(now);
                    let mut out = BytesMut::new();
                    let _ = frame.encode(&mut out);
                }
            }
            Ok(None) => break,
            Err(CodecError::Fatal(e)) => panic!("H02 has no fatal errors: {e}"),
            Err(CodecError::Io(e)) => panic!("io error from a pure codec: {e}"),
        }
    }
});
