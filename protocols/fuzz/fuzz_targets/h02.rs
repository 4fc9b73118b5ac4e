#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::run(
        || em_protocols::h02::H02Codec::new().with_max_frame_len(256),
        data,
    );
});
