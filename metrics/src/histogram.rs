//! A histogram cheap enough for the block I/O path: fixed buckets, one
//! atomic counter each, the sum kept in integer nanoseconds. Observing is
//! a binary search and two relaxed `fetch_add`s; there is no lock, so a
//! scrape never stalls a write.
//!
//! A scrape racing with observations may see the sum and the buckets of
//! slightly different moments; the count is always the sum of the buckets
//! it reports, so `_count` and `_bucket{le="+Inf"}` agree.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Bucket bounds (seconds) for the tracker's write latency: 50 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// Bucket bounds (seconds) for replication lag (the RPO achieved): 1 ms
/// to one day. Dense from 100 ms to 2.5 s, no bound more than 1.5× the one
/// below it there, so a quantile near one second (the figure a replica
/// that keeps up is judged by) reads to within a quarter of a second; a
/// replica on loopback lags by milliseconds, hence the low end.
pub const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.25, 1.5,
    2.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0,
];

/// A lock-free histogram of durations.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds in seconds, ascending (for the exposition).
    bounds: Box<[f64]>,
    /// The same bounds in nanoseconds (for observing).
    bounds_ns: Box<[u64]>,
    /// One counter per bound, plus the +Inf bucket last.
    counts: Box<[AtomicU64]>,
    sum_ns: AtomicU64,
}

/// What a histogram held at one moment, in the shape the exposition wants.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Sum of the observations, seconds.
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
    /// (upper bound in seconds, observations in this bucket alone), the
    /// last bound `+Inf`. Not cumulative: the encoders accumulate.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// A histogram with these upper bounds in seconds. Bounds that are not
    /// finite and positive are dropped, the rest sorted and deduplicated;
    /// the `+Inf` bucket is always there.
    pub fn new(bounds: &[f64]) -> Histogram {
        let mut b: Vec<f64> = bounds
            .iter()
            .copied()
            .filter(|x| x.is_finite() && *x > 0.0)
            .collect();
        b.sort_by(f64::total_cmp);
        b.dedup();
        let bounds_ns = b.iter().map(|s| seconds_to_ns(*s)).collect();
        let counts = (0..=b.len()).map(|_| AtomicU64::new(0)).collect();
        Histogram {
            bounds: b.into_boxed_slice(),
            bounds_ns,
            counts,
            sum_ns: AtomicU64::new(0),
        }
    }

    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        self.observe_ns(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Records one value in seconds; negative or NaN counts as 0.
    pub fn observe_seconds(&self, seconds: f64) {
        self.observe_ns(seconds_to_ns(seconds));
    }

    /// Records one value in nanoseconds.
    pub fn observe_ns(&self, ns: u64) {
        // Prometheus buckets are "less than or equal": the first bound that
        // is >= the value.
        let i = self.bounds_ns.partition_point(|&b| b < ns);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// The histogram now.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(self.counts.len());
        let mut count = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count = count.saturating_add(n);
            let bound = self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((bound, n));
        }
        HistogramSnapshot {
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            count,
            buckets,
        }
    }
}

/// Seconds to nanoseconds, saturating; negative and NaN give 0.
fn seconds_to_ns(s: f64) -> u64 {
    if s.is_nan() || s <= 0.0 {
        0
    } else {
        // `as` saturates at u64::MAX for large values.
        (s * 1e9) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_that_holds_them() {
        let h = Histogram::new(&[0.001, 0.01, 0.1]);
        h.observe(Duration::from_micros(1000)); // exactly on a bound: "le"
        h.observe(Duration::from_micros(1001));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(3));
        h.observe(Duration::ZERO);
        let s = h.snapshot();
        assert_eq!(
            s.buckets,
            vec![(0.001, 2), (0.01, 1), (0.1, 1), (f64::INFINITY, 1)]
        );
        assert_eq!(s.count, 5);
        assert!(
            (s.sum - (0.001 + 0.001001 + 0.05 + 3.0)).abs() < 1e-9,
            "{s:?}"
        );
    }

    #[test]
    fn lag_buckets_resolve_milliseconds_and_the_second_around_one() {
        assert!(LAG_BUCKETS.windows(2).all(|w| w[0] < w[1]), "ascending");
        assert!(LAG_BUCKETS[0] <= 0.001, "a loopback replica lags by ms");
        assert_eq!(LAG_BUCKETS.last(), Some(&86400.0), "up to a day");
        for w in LAG_BUCKETS.windows(2) {
            let (lo, hi) = (w[0], w[1]);
            if hi <= 0.1 {
                assert!(hi / lo <= 2.5, "{lo}..{hi} too coarse below 100 ms");
            } else if hi <= 2.5 {
                assert!(hi / lo <= 1.5, "{lo}..{hi} too coarse around 1 s");
            }
        }
        assert!(LAG_BUCKETS.contains(&1.0), "p99 < 1 s is read at a bound");
    }

    #[test]
    fn bad_bounds_are_dropped_and_sorted() {
        let h = Histogram::new(&[1.0, f64::NAN, -2.0, 0.5, 1.0, f64::INFINITY, 0.0]);
        let s = h.snapshot();
        let bounds: Vec<f64> = s.buckets.iter().map(|b| b.0).collect();
        assert_eq!(bounds, vec![0.5, 1.0, f64::INFINITY]);
        assert_eq!(s.count, 0);
        assert_eq!(s.sum, 0.0);
    }

    #[test]
    fn strange_values_never_panic() {
        let h = Histogram::new(&[]);
        h.observe_seconds(f64::NAN);
        h.observe_seconds(-1.0);
        h.observe_seconds(f64::INFINITY);
        h.observe(Duration::MAX);
        let s = h.snapshot();
        assert_eq!(s.buckets.len(), 1);
        assert_eq!(s.count, 4);
    }

    #[test]
    fn concurrent_observers_lose_nothing() {
        let h = std::sync::Arc::new(Histogram::new(LATENCY_BUCKETS));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u64 {
                        h.observe_ns((i * 7919 + t) % 20_000_000_000);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = h.snapshot();
        assert_eq!(s.count, 40_000);
        assert_eq!(s.buckets.iter().map(|b| b.1).sum::<u64>(), 40_000);
    }
}
