//! Geofence benchmarks (filled in below).
fn main() {}
