#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // Text and binary reports with the binary length set per device (the split-invariance
    // check needs a length that does not depend on where the bytes are cut).
    common::run(
        || {
            em_protocols::h02::H02Codec::new()
                .with_max_frame_len(256)
                .with_binary_len(32)
        },
        data,
    );
});
