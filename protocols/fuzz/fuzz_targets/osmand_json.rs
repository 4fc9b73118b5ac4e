#![no_main]

// Traccar Client JSON bodies: no panic; every decoded location is in range and maps to
// exactly one record of the body's device.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(reports) = em_protocols::osmand::decode_json(data) {
        assert!(!reports.is_empty());
        for r in &reports {
            assert_eq!(r.id, reports[0].id);
            let rec = r.to_record(chrono::DateTime::UNIX_EPOCH);
            if let Some(p) = rec.position {
                assert!((-90.0..=90.0).contains(&p.lat) && (-180.0..=180.0).contains(&p.lon));
            } else {
                assert!(!rec.cells.is_empty() || !rec.wifi.is_empty());
            }
            assert!(rec.battery_pct.map_or(true, |b| b <= 100));
        }
    }
});
