//! A lock-free, HDR-style latency histogram.
//!
//! Values (microseconds) are counted in log-linear buckets: every power-of-two range is split
//! into [`SUB_BUCKETS`] equal sub-buckets, so any recorded value is reported with a relative
//! error below `1 / SUB_BUCKETS` (< 0.8 %), over the whole `u64` range, in a fixed 58 KiB
//! table. Recording is a few atomic adds, so thousands of device tasks can share one
//! histogram without a lock.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// log2 of the number of sub-buckets per power of two.
const SUB_BITS: u32 = 7;
/// Sub-buckets per power-of-two range.
pub const SUB_BUCKETS: u64 = 1 << SUB_BITS;
/// Total bucket count: values below `2 * SUB_BUCKETS` are exact, then one block of
/// `SUB_BUCKETS` per further power of two up to bit 63.
const BUCKETS: usize = ((64 - SUB_BITS as usize) + 1) * SUB_BUCKETS as usize;

/// Concurrent histogram of `u64` values (the simulator records microseconds).
pub struct Histogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// Bucket index of a value.
fn index_of(v: u64) -> usize {
    if v < 2 * SUB_BUCKETS {
        return v as usize;
    }
    let msb = 63 - v.leading_zeros();
    let shift = msb - SUB_BITS;
    let mantissa = (v >> shift) & (SUB_BUCKETS - 1);
    ((u64::from(shift) + 1) * SUB_BUCKETS + mantissa) as usize
}

/// Lowest value and width of bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    let i = i as u64;
    if i < 2 * SUB_BUCKETS {
        return (i, 1);
    }
    let shift = i / SUB_BUCKETS - 1;
    let mantissa = i % SUB_BUCKETS;
    ((SUB_BUCKETS + mantissa) << shift, 1u64 << shift)
}

impl Histogram {
    pub fn new() -> Self {
        Histogram {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }

    /// Count one value.
    pub fn record(&self, v: u64) {
        self.record_n(v, 1);
    }

    /// Count the same value `n` times, with one set of atomic updates (all records of a
    /// batched packet share its send→ACK latency).
    pub fn record_n(&self, v: u64, n: u64) {
        if n == 0 {
            return;
        }
        // index_of is < BUCKETS for every u64 (checked by a test); get() keeps it panic-free.
        if let Some(b) = self.buckets.get(index_of(v)) {
            b.fetch_add(n, Ordering::Relaxed);
        }
        self.count.fetch_add(n, Ordering::Relaxed);
        self.sum.fetch_add(v.saturating_mul(n), Ordering::Relaxed);
        self.min.fetch_min(v, Ordering::Relaxed);
        self.max.fetch_max(v, Ordering::Relaxed);
    }

    /// Count a duration in microseconds (saturating).
    pub fn record_duration(&self, d: std::time::Duration) {
        self.record_duration_n(d, 1);
    }

    /// Count a duration in microseconds (saturating) `n` times.
    pub fn record_duration_n(&self, d: std::time::Duration, n: u64) {
        self.record_n(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), n);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn min(&self) -> Option<u64> {
        (self.count() > 0).then(|| self.min.load(Ordering::Relaxed))
    }

    pub fn max(&self) -> Option<u64> {
        (self.count() > 0).then(|| self.max.load(Ordering::Relaxed))
    }

    pub fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum.load(Ordering::Relaxed) as f64 / n as f64)
    }

    /// The value at quantile `q` (0.0..=1.0): the highest value equivalent to the bucket
    /// holding the `ceil(q·n)`-th smallest recording, clamped to the recorded min/max.
    /// None when empty.
    pub fn value_at_quantile(&self, q: f64) -> Option<u64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let (lo, hi) = (
            self.min.load(Ordering::Relaxed),
            self.max.load(Ordering::Relaxed),
        );
        let mut seen = 0u64;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                let (low, width) = bucket_range(i);
                let highest = low.saturating_add(width - 1);
                return Some(highest.clamp(lo, hi.max(lo)));
            }
        }
        Some(hi)
    }

    /// Percentile summary, values converted from microseconds to milliseconds.
    pub fn summary_ms(&self) -> LatencySummary {
        let ms = |v: Option<u64>| v.map(|us| us as f64 / 1000.0);
        LatencySummary {
            count: self.count(),
            min_ms: ms(self.min()),
            mean_ms: self.mean().map(|us| us / 1000.0),
            p50_ms: ms(self.value_at_quantile(0.50)),
            p90_ms: ms(self.value_at_quantile(0.90)),
            p99_ms: ms(self.value_at_quantile(0.99)),
            p999_ms: ms(self.value_at_quantile(0.999)),
            max_ms: ms(self.max()),
        }
    }
}

/// Percentiles of a latency histogram, in milliseconds (None when nothing was recorded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl std::fmt::Display for LatencySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.2}"));
        write!(
            f,
            "n={} p50={} p90={} p99={} p99.9={} max={} (ms)",
            self.count,
            v(self.p50_ms),
            v(self.p90_ms),
            v(self.p99_ms),
            v(self.p999_ms),
            v(self.max_ms)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_cover_u64_and_ranges_contain_values() {
        for v in [
            0u64,
            1,
            127,
            128,
            255,
            256,
            257,
            1000,
            65_535,
            1 << 40,
            u64::MAX,
        ] {
            let i = index_of(v);
            assert!(i < BUCKETS, "index {i} for {v}");
            let (low, width) = bucket_range(i);
            assert!(low <= v && v - low < width, "{v} not in [{low}, +{width})");
            // Relative width stays under 1/SUB_BUCKETS once buckets are wider than 1.
            if width > 1 {
                assert!((width as f64) / (low as f64) <= 1.0 / SUB_BUCKETS as f64);
            }
        }
        assert_eq!(index_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn percentiles_of_a_uniform_range() {
        let h = Histogram::new();
        for v in 1..=10_000u64 {
            h.record(v);
        }
        assert_eq!(h.count(), 10_000);
        assert_eq!(h.min(), Some(1));
        assert_eq!(h.max(), Some(10_000));
        let close = |got: u64, want: f64| (got as f64 - want).abs() / want < 0.01;
        let p50 = h.value_at_quantile(0.5).unwrap();
        let p90 = h.value_at_quantile(0.9).unwrap();
        let p99 = h.value_at_quantile(0.99).unwrap();
        assert!(close(p50, 5000.0), "p50 {p50}");
        assert!(close(p90, 9000.0), "p90 {p90}");
        assert!(close(p99, 9900.0), "p99 {p99}");
        assert_eq!(h.value_at_quantile(1.0), Some(10_000));
        assert_eq!(h.value_at_quantile(0.0), Some(1));
        assert!((h.mean().unwrap() - 5000.5).abs() < 1e-9);
    }

    #[test]
    fn skewed_distribution_tail() {
        let h = Histogram::new();
        for _ in 0..990 {
            h.record(1_000);
        }
        for _ in 0..10 {
            h.record(250_000);
        }
        let s = h.summary_ms();
        assert!((s.p50_ms.unwrap() - 1.0).abs() < 0.01);
        assert!((s.p90_ms.unwrap() - 1.0).abs() < 0.01);
        // 99th percentile is the 990th value: still in the fast mode.
        assert!((s.p99_ms.unwrap() - 1.0).abs() < 0.01);
        let p999 = s.p999_ms.unwrap();
        assert!((p999 - 250.0).abs() / 250.0 < 0.01, "p99.9 {p999}");
        assert_eq!(s.max_ms, Some(250.0));
    }

    #[test]
    fn record_n_equals_n_single_records() {
        let a = Histogram::new();
        let b = Histogram::new();
        for (v, n) in [(700u64, 10u64), (3_000, 1), (45_000, 25), (9, 0)] {
            a.record_n(v, n);
            for _ in 0..n {
                b.record(v);
            }
        }
        assert_eq!(a.summary_ms(), b.summary_ms());
        assert_eq!(a.count(), 36);
        assert_eq!(a.min(), Some(700));
    }

    #[test]
    fn empty_histogram_has_no_percentiles() {
        let h = Histogram::new();
        assert_eq!(h.value_at_quantile(0.5), None);
        let s = h.summary_ms();
        assert_eq!(s.count, 0);
        assert_eq!(s.p99_ms, None);
    }

    #[test]
    fn concurrent_recording_counts_everything() {
        let h = std::sync::Arc::new(Histogram::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for v in 0..1000u64 {
                        h.record(v * (t + 1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.count(), 4000);
        assert_eq!(h.max(), Some(3996));
    }
}
