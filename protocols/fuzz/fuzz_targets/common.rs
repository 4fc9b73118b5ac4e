// Shared driver: feed `data` to a streaming codec in two chunks (split point taken from
// the first byte), checking that the codec never consumes more than it was given, that
// every step makes progress, and that the same frames come out as from one chunk.

use bytes::BytesMut;
use em_protocols::{CodecError, DecodeError, Decoder};

pub fn run<C, T, F>(mut make: F, data: &[u8])
where
    F: FnMut() -> C,
    C: Decoder<Item = Result<T, DecodeError>, Error = CodecError>,
    T: PartialEq + std::fmt::Debug,
{
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let whole = drive(&mut make(), &[rest]);
    let at = usize::from(split).min(rest.len());
    let parts = drive(&mut make(), &[&rest[..at], &rest[at..]]);
    // Frames that decode from the whole input also decode when it arrives in parts.
    let ok_whole: Vec<&T> = whole.iter().filter_map(|r| r.as_ref().ok()).collect();
    let ok_parts: Vec<&T> = parts.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(ok_whole, ok_parts);
}

fn drive<C, T>(codec: &mut C, chunks: &[&[u8]]) -> Vec<Result<T, DecodeError>>
where
    C: Decoder<Item = Result<T, DecodeError>, Error = CodecError>,
{
    let mut out = Vec::new();
    let mut buf = BytesMut::new();
    for (i, chunk) in chunks.iter().enumerate() {
        buf.extend_from_slice(chunk);
        let last = i + 1 == chunks.len();
        loop {
            let before = buf.len();
            let step = if last {
                codec.decode_eof(&mut buf)
            } else {
                codec.decode(&mut buf)
            };
            assert!(buf.len() <= before, "codec grew the buffer contents");
            match step {
                Ok(Some(item)) => {
                    assert!(buf.len() < before, "item without progress");
                    out.push(item);
                }
                Ok(None) => break,
                Err(CodecError::Fatal(e)) => {
                    assert!(e.is_fatal());
                    return out;
                }
                Err(CodecError::Io(e)) => panic!("io error from a pure codec: {e}"),
            }
        }
    }
    out
}
