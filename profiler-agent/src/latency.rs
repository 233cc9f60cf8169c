//! Percentiles from the kernel's log2 latency histograms.

use profiler_common::offcpu::{hist_bucket_floor, Histogram, HIST_BUCKETS};

/// Summary statistics of one histogram, in nanoseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: u64,
}

/// Total number of values in a histogram.
pub fn count(h: &Histogram) -> u64 {
    h.buckets.iter().sum()
}

/// The value below which a fraction `q` of values lie, interpolated
/// linearly inside the log2 bucket that holds it (so the error is at most
/// the bucket's width, a factor of 2), and never above the recorded max.
pub fn quantile(h: &Histogram, q: f64) -> f64 {
    let total = count(h);
    if total == 0 {
        return 0.0;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut seen = 0u64;
    for (b, &n) in h.buckets.iter().enumerate() {
        if n == 0 {
            continue;
        }
        if (seen + n) as f64 >= rank {
            let lo = hist_bucket_floor(b) as f64;
            let hi = if b + 1 < HIST_BUCKETS { hist_bucket_floor(b + 1) as f64 } else { u64::MAX as f64 };
            let within = ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
            return (lo + within * (hi - lo)).min(h.max_ns as f64);
        }
        seen += n;
    }
    h.max_ns as f64
}

pub fn percentiles(h: &Histogram) -> Percentiles {
    Percentiles {
        count: count(h),
        p50: quantile(h, 0.50),
        p95: quantile(h, 0.95),
        p99: quantile(h, 0.99),
        max: h.max_ns,
    }
}

/// Adds `other` into `into` (histograms of threads of one process, or of
/// several intervals).
pub fn merge(into: &mut Histogram, other: &Histogram) {
    for (a, b) in into.buckets.iter_mut().zip(other.buckets.iter()) {
        *a += b;
    }
    into.max_ns = into.max_ns.max(other.max_ns);
}

/// An empty histogram.
pub fn empty() -> Histogram {
    Histogram { buckets: [0; HIST_BUCKETS], max_ns: 0 }
}

/// Formats nanoseconds with a readable unit: `850ns`, `12.3us`, `4.56ms`, `1.20s`.
pub fn human_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.1}us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use profiler_common::offcpu::hist_bucket;
    use proptest::prelude::*;

    fn hist(values: &[u64]) -> Histogram {
        let mut h = empty();
        for &v in values {
            h.buckets[hist_bucket(v)] += 1;
            h.max_ns = h.max_ns.max(v);
        }
        h
    }

    #[test]
    fn quantiles_land_in_the_right_bucket() {
        // 90 values of ~1 us and 10 of ~1 ms.
        let mut values = vec![1_000; 90];
        values.extend([1_000_000; 10]);
        let p = percentiles(&hist(&values));
        assert_eq!(p.count, 100);
        assert!((512.0..=1024.0).contains(&p.p50), "{p:?}");
        assert!((524_288.0..=1_000_000.0).contains(&p.p95), "{p:?}");
        assert_eq!(p.max, 1_000_000);
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(percentiles(&empty()), Percentiles::default());
    }

    #[test]
    fn merge_adds_counts_and_keeps_max() {
        let mut a = hist(&[10, 20]);
        merge(&mut a, &hist(&[5_000]));
        assert_eq!(count(&a), 3);
        assert_eq!(a.max_ns, 5_000);
    }

    #[test]
    fn human_units() {
        assert_eq!(human_ns(850.0), "850ns");
        assert_eq!(human_ns(12_345.0), "12.3us");
        assert_eq!(human_ns(4_560_000.0), "4.56ms");
        assert_eq!(human_ns(1.2e9), "1.20s");
    }

    proptest! {
        #[test]
        fn quantiles_are_ordered_and_bounded(values in proptest::collection::vec(0u64..10_000_000_000, 1..200)) {
            let h = hist(&values);
            let p = percentiles(&h);
            let max = *values.iter().max().unwrap() as f64;
            let min = *values.iter().min().unwrap() as f64;
            prop_assert!(p.p50 <= p.p95 && p.p95 <= p.p99 && p.p99 <= max);
            // Within a factor of 2 of the smallest value at worst (bucket width).
            prop_assert!(p.p50 >= (min / 2.0).floor());
        }
    }
}
