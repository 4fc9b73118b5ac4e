#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // First line is the topic, the rest the payload.
    let (topic, payload) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(topic) = std::str::from_utf8(topic) else {
        return;
    };
    if let Ok(msg) = em_protocols::em::decode(topic, payload) {
        let _ = msg.to_records(Default::default());
        let again = em_protocols::em::decode(&msg.topic().unwrap(), &msg.payload().unwrap())
            .expect("re-decode");
        assert_eq!(again.payloads.len(), msg.payloads.len());
    }
});
