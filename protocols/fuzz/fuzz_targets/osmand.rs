#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(mut rep) = em_protocols::osmand::decode(text) {
            let _ = rep.to_records(chrono::DateTime::UNIX_EPOCH);
            // Whatever decodes must encode and decode to the same report (`is_moving` of
            // a JSON body has no query parameter).
            rep.moving = None;
            if let Ok(q) = rep.to_query() {
                assert_eq!(em_protocols::osmand::decode(&q).expect("re-decode"), rep);
            } else {
                assert!(rep.wifi.iter().any(|w| w.signal_dbm.is_none()));
            }
        }
    }
});
