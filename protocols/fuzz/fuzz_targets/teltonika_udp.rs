#![no_main]

// Teltonika UDP datagrams and the packet data parser (AVL 8/8E/16, Codec 12/13/14): never
// panic; a datagram that parses answers with an ACK and gives records.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = em_protocols::teltonika::parse_data(data);
    if let Ok(p) = em_protocols::teltonika::udp::parse_udp(data) {
        let _ = p.response();
        let _ = p.frame.to_records("x", chrono::DateTime::UNIX_EPOCH);
    }
});
