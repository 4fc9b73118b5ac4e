//! Bad input: truncated, oversized, wrong checksum, unknown type, garbage — each a typed
//! error (or `Ok(None)` for "need more data"), with resynchronisation where possible.

use bytes::BytesMut;
use em_protocols::gt06::{ack_frame, Gt06Codec, Imei};
use em_protocols::h02::H02Codec;
use em_protocols::teltonika::TeltonikaCodec;
use em_protocols::{em, osmand, CodecError, DecodeError, Decoder, Protocol};

const LOGIN: &str = "78780D01012345678901234500018CDD0D0A";
const LOCATION: &str = "78781F120B081D112E10CF027AC7EB0C46584900148F01CC00287D001FB8000380810D0A";
const AVL8: &str = "000000000000003608010000016B40D8EA30010000000000000000000000000000000105021503010101425E0F01F10000601A014E0000000000000000010000C7CF";

fn b(h: &str) -> Vec<u8> {
    hex::decode(h).unwrap()
}

fn gt06() -> Gt06Codec {
    Gt06Codec::with_imei(Imei::new(123_456_789_012_345).unwrap())
}

#[test]
fn gt06_truncated_needs_more_data_and_consumes_nothing() {
    let full = b(LOCATION);
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        let mut c = gt06();
        assert!(c.decode(&mut buf).unwrap().is_none(), "prefix {cut}");
        assert_eq!(buf.len(), cut);
    }
    // At end of stream the leftover is reported.
    let mut buf = BytesMut::from(&full[..10]);
    let e = gt06().decode_eof(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(e.reason(), "truncated");
}

#[test]
fn gt06_bad_crc_is_dropped_and_next_frame_decodes() {
    let mut bad = b(LOCATION);
    let n = bad.len();
    bad[n - 4] ^= 0xFF;
    let mut buf = BytesMut::from(&[bad, b(LOCATION)].concat()[..]);
    let mut c = gt06();
    let e = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::BadChecksum {
                protocol: Protocol::Gt06,
                ..
            }
        ),
        "{e}"
    );
    assert!(!e.is_fatal());
    assert!(c.decode(&mut buf).unwrap().unwrap().is_ok());
    assert!(buf.is_empty());
}

#[test]
fn gt06_garbage_between_frames_is_skipped() {
    let stream = [b(LOGIN), b"noise\x78\x00".to_vec(), b(LOCATION)].concat();
    let mut buf = BytesMut::from(&stream[..]);
    let mut c = Gt06Codec::new();
    let mut kinds = Vec::new();
    while let Some(item) = c.decode(&mut buf).unwrap() {
        kinds.push(match item {
            Ok(f) => f.kind().to_string(),
            Err(e) => e.reason().to_string(),
        });
    }
    assert_eq!(kinds, ["login", "garbage", "location"]);
    assert!(buf.is_empty());
}

#[test]
fn gt06_oversized_long_frame_is_refused_without_buffering() {
    let mut buf = BytesMut::from(&[&[0x79, 0x79, 0xFF, 0xFF, 0x01][..], &b(LOCATION)].concat()[..]);
    let mut c = gt06();
    let e = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert!(
        matches!(e, DecodeError::Oversized { len: 0xFFFF, .. }),
        "{e}"
    );
    // Resync: the garbage left of the real frame is skipped, then the frame decodes.
    let mut got_frame = false;
    while let Some(item) = c.decode(&mut buf).unwrap() {
        got_frame |= item.is_ok();
    }
    assert!(got_frame);
}

#[test]
fn gt06_unknown_type_and_bad_terminator() {
    // Well-formed frame with protocol 0x99.
    let mut unknown = Vec::new();
    unknown.extend_from_slice(&[0x78, 0x78, 0x06, 0x99, 0xAB, 0x00, 0x07]);
    let crc = em_protocols::crc16_x25(&unknown[2..]);
    unknown.extend_from_slice(&crc.to_be_bytes());
    unknown.extend_from_slice(&[0x0D, 0x0A]);
    let mut buf = BytesMut::from(&unknown[..]);
    let e = gt06().decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(
        e,
        DecodeError::UnknownType {
            protocol: Protocol::Gt06,
            kind: "0x99".into()
        }
    );
    assert!(buf.is_empty());

    let mut bad_stop = b(LOCATION);
    let n = bad_stop.len();
    bad_stop[n - 1] = 0x00;
    let mut buf = BytesMut::from(&bad_stop[..]);
    // A wrong terminator may be a wrong length field: the codec waits for the bytes a
    // longer frame could take before it gives up (at once at the end of the stream).
    assert!(gt06().decode(&mut buf).unwrap().is_none());
    let e = gt06().decode_eof(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(e.reason(), "bad_terminator");
    let mut buf = BytesMut::from(&[&bad_stop[..], &[0u8; 64][..]].concat()[..]);
    let e = gt06().decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(e.reason(), "bad_terminator");
}

#[test]
fn gt06_data_before_login_is_refused() {
    let mut buf = BytesMut::from(&b(LOCATION)[..]);
    let mut c = Gt06Codec::new();
    let e = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(
        e,
        DecodeError::NotLoggedIn {
            protocol: Protocol::Gt06
        }
    );
    assert!(!e.is_fatal());
    // Server acknowledgements need no login (the simulator decodes them).
    let mut buf = BytesMut::from(&ack_frame(0x01, 1)[..]);
    assert_eq!(c.decode(&mut buf).unwrap().unwrap().unwrap().kind(), "ack");
    // Bad BCD in a login.
    let mut login = b(LOGIN);
    login[4] = 0xAB;
    let crc = em_protocols::crc16_x25(&login[2..login.len() - 4]);
    let n = login.len();
    login[n - 4..n - 2].copy_from_slice(&crc.to_be_bytes());
    let mut buf = BytesMut::from(&login[..]);
    let e = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(e.reason(), "malformed");
}

#[test]
fn teltonika_errors() {
    // Data before the IMEI handshake: dropped, non-fatal.
    let mut buf = BytesMut::from(&b(AVL8)[..]);
    let mut c = TeltonikaCodec::new();
    let e = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(
        e,
        DecodeError::NotLoggedIn {
            protocol: Protocol::Teltonika
        }
    );
    assert!(buf.is_empty());

    // Truncated: need more data, nothing consumed.
    let full = b(AVL8);
    for cut in 0..full.len() {
        let mut buf = BytesMut::from(&full[..cut]);
        assert!(TeltonikaCodec::with_imei("1")
            .decode(&mut buf)
            .unwrap()
            .is_none());
        assert_eq!(buf.len(), cut);
    }

    // Wrong CRC: dropped, non-fatal, next packet decodes.
    let mut bad = b(AVL8);
    let n = bad.len();
    bad[n - 1] ^= 1;
    let mut buf = BytesMut::from(&[bad, b(AVL8)].concat()[..]);
    let mut c = TeltonikaCodec::with_imei("356307042441013");
    let e = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert!(
        matches!(
            e,
            DecodeError::BadChecksum {
                expected: 0xC7CE,
                computed: 0xC7CF,
                ..
            }
        ),
        "{e}"
    );
    assert!(c.decode(&mut buf).unwrap().unwrap().is_ok());

    // Oversized data length: fatal (no marker to resync on), nothing buffered.
    let mut buf = BytesMut::from(&[0, 0, 0, 0, 0x7F, 0xFF, 0xFF, 0xFF][..]);
    match c.decode(&mut buf) {
        Err(CodecError::Fatal(e)) => {
            assert!(e.is_fatal());
            assert_eq!(e.reason(), "oversized");
        }
        other => panic!("{other:?}"),
    }
    // Bad preamble: fatal.
    let mut buf = BytesMut::from(&[0, 0, 0, 1, 0, 0, 0, 3][..]);
    assert!(matches!(
        c.decode(&mut buf),
        Err(CodecError::Fatal(DecodeError::Framing { .. }))
    ));
    // Huge IMEI length: fatal.
    let mut buf = BytesMut::from(&[0x12, 0x34, 0x35][..]);
    assert!(matches!(c.decode(&mut buf), Err(CodecError::Fatal(_))));
    // Non-digit IMEI: malformed, consumed.
    let mut buf = BytesMut::from(&b"\x00\x03a1b"[..]);
    assert_eq!(
        c.decode(&mut buf).unwrap().unwrap().unwrap_err().reason(),
        "malformed"
    );
    assert!(buf.is_empty());

    // An empty Codec 12 command response decodes (no record, no answer).
    let data = [0x0C, 0x01, 0x06, 0, 0, 0, 0, 0x01];
    let mut pkt = vec![0, 0, 0, 0, 0, 0, 0, data.len() as u8];
    pkt.extend_from_slice(&data);
    pkt.extend_from_slice(&u32::from(em_protocols::crc16_arc(&data)).to_be_bytes());
    let mut buf = BytesMut::from(&pkt[..]);
    let f = c.decode(&mut buf).unwrap().unwrap().unwrap();
    assert_eq!((f.kind(), f.response()), ("command", None));
    assert!(buf.is_empty());

    // Unknown codec (0x07, GH3000) with a valid CRC: skipped, not fatal.
    let data = [0x07, 0x00, 0x00];
    let mut pkt = vec![0, 0, 0, 0, 0, 0, 0, data.len() as u8];
    pkt.extend_from_slice(&data);
    pkt.extend_from_slice(&u32::from(em_protocols::crc16_arc(&data)).to_be_bytes());
    let mut buf = BytesMut::from(&pkt[..]);
    let e = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(e.reason(), "unknown_type");
    assert!(buf.is_empty());

    // Record count larger than the data can hold: malformed, not a panic.
    let data = [0x08, 0xFF, 0xFF];
    let mut pkt = vec![0, 0, 0, 0, 0, 0, 0, 3];
    pkt.extend_from_slice(&data);
    pkt.extend_from_slice(&u32::from(em_protocols::crc16_arc(&data)).to_be_bytes());
    let mut buf = BytesMut::from(&pkt[..]);
    assert_eq!(
        c.decode(&mut buf).unwrap().unwrap().unwrap_err().reason(),
        "malformed"
    );
}

#[test]
fn h02_errors_and_resync() {
    let good = "*HQ,353505910449999,XT#";
    let stream = format!("junk*HQ,1,V1,broken*HQ,1,ZZ#{good}");
    let mut buf = BytesMut::from(stream.as_bytes());
    let mut c = H02Codec::new();
    let mut reasons = Vec::new();
    while let Some(item) = c.decode(&mut buf).unwrap() {
        reasons.push(match item {
            Ok(f) => f.kind().to_string(),
            Err(e) => e.reason().to_string(),
        });
    }
    assert_eq!(
        reasons,
        ["garbage", "malformed", "unknown_type", "heartbeat"]
    );

    // No '#' within the limit: oversized, and the buffer does not grow without bound.
    let mut c = H02Codec::new().with_max_frame_len(64);
    let mut buf = BytesMut::from(format!("*HQ,{}", "9".repeat(100)).as_bytes());
    let e = c.decode(&mut buf).unwrap().unwrap().unwrap_err();
    assert_eq!(e.reason(), "oversized");
    // Truncated: need more data.
    let mut buf = BytesMut::from(&b"*HQ,353505910449999,X"[..]);
    assert!(H02Codec::new().decode(&mut buf).unwrap().is_none());
    // Bad fields.
    for bad in [
        "*HQ,1,V1,052825,A,9939.4210,N,11400.8825,E,0.00,348,180814,FFFFFFFF#",
        "*HQ,1,V1,052825,A,2239.4210,N,11400.8825,E,0.00,348,320814,FFFFFFFF#",
        "*HQ,1,V1,052825,A,2239.4210,N,11400.8825,E,0.00,348,180814,XYZ#",
        "*HQ,1,V1,052825#",
    ] {
        let e = em_protocols::h02::parse_frame(bad).unwrap_err();
        assert_eq!(e.reason(), "malformed", "{bad}: {e}");
    }
}

#[test]
fn osmand_errors() {
    for (q, reason) in [
        ("lat=1&lon=2", "malformed"),
        ("id=1&lat=91&lon=2", "malformed"),
        ("id=1&lat=x&lon=2", "malformed"),
        ("id=1&lon=2", "malformed"),
        ("id=1&lat=1&lon=2&timestamp=yesterday", "malformed"),
        ("id=1&lat=1&lon=2&batt=200", "malformed"),
        ("id=1&lat=1&lon=2&charge=maybe", "malformed"),
        // Found by cargo fuzz: year 14690 decoded but could not be re-encoded.
        ("id=1&lat=1&lon=2&timestamp=401410000000000", "malformed"),
        (
            "id=1&lat=1&lon=2&timestamp=1969-12-31T23:59:59Z",
            "malformed",
        ),
    ] {
        assert_eq!(osmand::decode(q).unwrap_err().reason(), reason, "{q}");
    }
    let long = format!("id=1&lat=1&lon=2&x={}", "a".repeat(5000));
    assert_eq!(osmand::decode(&long).unwrap_err().reason(), "oversized");
}

#[test]
fn em_errors() {
    let ok = br#"{"seq":1,"time":"2024-01-01T00:00:00Z"}"#;
    assert!(em::decode("em/v1/tag-1/telemetry", ok).is_ok());
    let cases: [(&str, &[u8], &str); 9] = [
        ("em/v2/tag-1/telemetry", ok, "unknown_type"),
        ("em/v1/tag-1/weather", ok, "unknown_type"),
        ("em/v1/tag+1/telemetry", ok, "malformed"),
        ("em/v1/tag-1/telemetry", b"{not json", "malformed"),
        (
            "em/v1/tag-1/telemetry",
            br#"{"time":"2024-01-01T00:00:00Z"}"#,
            "malformed",
        ),
        ("em/v1/tag-1/event", ok, "malformed"),
        (
            "em/v1/tag-1/telemetry",
            br#"{"seq":1,"time":"2024-01-01T00:00:00Z","position":{"lat":95,"lon":0}}"#,
            "malformed",
        ),
        (
            "em/v1/tag-1/telemetry",
            br#"{"seq":1,"time":"2024-01-01T00:00:00Z","battery_pct":101}"#,
            "malformed",
        ),
        ("em/v1/tag-1/telemetry", b"[]", "malformed"),
    ];
    for (topic, payload, reason) in cases {
        let e = em::decode(topic, payload).unwrap_err();
        assert_eq!(
            e.reason(),
            reason,
            "{topic} {}: {e}",
            String::from_utf8_lossy(payload)
        );
    }
    let big = vec![b' '; em::MAX_PAYLOAD_LEN + 1];
    assert_eq!(
        em::decode("em/v1/a/status", &big).unwrap_err().reason(),
        "oversized"
    );
}
