//! `em-benches` owns the criterion benchmarks of the EM platform (`benches/benches/`):
//! `protocols` measures frames decoded per second per device protocol against a CRC-only and a
//! memcpy baseline; `geofence` measures fixes evaluated per second with 100,000 subjects and
//! 100 to 100,000 zones, against a brute-force zone scan. Run them with
//! `cargo bench -p em-benches --bench protocols` or `--bench geofence`.
