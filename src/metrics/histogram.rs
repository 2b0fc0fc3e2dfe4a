//! A histogram that records with atomics only.
//!
//! prometheus-client's own `Histogram` takes a lock for every observation.
//! Observations here happen once per message, downstream command or delivery
//! transaction, on many tasks at once, so this one keeps a count per bucket
//! in an `AtomicU64` and the sum as the bits of an `f64` updated with
//! compare-and-swap. A scrape that runs during an observation may see the
//! bucket counted but not yet the sum; the next scrape is consistent again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Upper bounds for latencies, in seconds: from 5 ms to 2 minutes.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Upper bounds for message sizes, in octets: 1 KiB to 256 MiB, by fours.
pub const SIZE_BUCKETS: &[f64] = &[
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
];

#[derive(Debug)]
struct Inner {
    bounds: &'static [f64],
    /// One count per bound, then the count above the last bound.
    buckets: Vec<AtomicU64>,
    sum_bits: AtomicU64,
}

/// A histogram with fixed bucket bounds; clones share their counts.
#[derive(Clone, Debug)]
pub struct AtomicHistogram {
    inner: Arc<Inner>,
}

impl AtomicHistogram {
    /// Creates a histogram with the given ascending upper bounds.
    pub fn new(bounds: &'static [f64]) -> AtomicHistogram {
        AtomicHistogram {
            inner: Arc::new(Inner {
                bounds,
                buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_bits: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// Creates a histogram with [`LATENCY_BUCKETS`].
    pub fn latency() -> AtomicHistogram {
        AtomicHistogram::new(LATENCY_BUCKETS)
    }

    /// Creates a histogram with [`SIZE_BUCKETS`].
    pub fn size() -> AtomicHistogram {
        AtomicHistogram::new(SIZE_BUCKETS)
    }

    pub fn observe(&self, value: f64) {
        let index = self
            .inner
            .bounds
            .iter()
            .position(|bound| value <= *bound)
            .unwrap_or(self.inner.bounds.len());
        self.inner.buckets[index].fetch_add(1, Ordering::Relaxed);
        let mut current = self.inner.sum_bits.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + value).to_bits();
            match self.inner.sum_bits.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
    }

    /// Observes a duration in seconds.
    pub fn observe_duration(&self, duration: std::time::Duration) {
        self.observe(duration.as_secs_f64());
    }

    /// Returns the sum, the count and the count of each bucket (not
    /// cumulative), the last bucket at `+Inf`.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.inner.buckets.len());
        for (index, count) in self.inner.buckets.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            total += count;
            let bound = self
                .inner
                .bounds
                .get(index)
                .copied()
                .unwrap_or(f64::INFINITY);
            buckets.push((bound, count));
        }
        let sum = f64::from_bits(self.inner.sum_bits.load(Ordering::Relaxed));
        (sum, total, buckets)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // The encoder adds the bucket counts up into cumulative ones.
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_fall_into_buckets() {
        let histogram = AtomicHistogram::new(&[1.0, 10.0]);
        histogram.observe(0.5);
        histogram.observe(1.0);
        histogram.observe(7.0);
        histogram.observe(50.0);
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 58.5).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (1.0, 2));
        assert_eq!(buckets[1], (10.0, 1));
        assert_eq!(buckets[2].1, 1);
        assert!(buckets[2].0.is_infinite());
    }
}
