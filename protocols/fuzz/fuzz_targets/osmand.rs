#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(rep) = em_protocols::osmand::decode(text) {
            // Whatever decodes must encode and decode to the same report.
            let q = rep.to_query().expect("decoded report encodes");
            assert_eq!(em_protocols::osmand::decode(&q).expect("re-decode"), rep);
        }
    }
});
