//! Summary statistics of repeated measurements.

use std::time::Duration;

/// min / p50 / p90 / p99 / max of a set of durations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Smallest.
    pub min: Duration,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        let mut sorted = samples.to_vec();
        sorted.sort();
        let last = sorted.len().checked_sub(1)?;
        // Nearest-rank percentile on the sorted samples.
        let rank = |p: usize| sorted[(last * p).div_ceil(100)];
        Some(Summary {
            min: sorted[0],
            p50: rank(50),
            p90: rank(90),
            p99: rank(99),
            max: sorted[last],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn percentiles_of_a_hundred_samples() {
        let samples: Vec<Duration> = (1..=100).rev().map(ms).collect();
        let s = Summary::of(&samples).unwrap();
        assert_eq!(
            (s.min, s.p50, s.p90, s.p99, s.max),
            (ms(1), ms(51), ms(91), ms(100), ms(100))
        );
    }

    #[test]
    fn one_sample_is_every_percentile_and_none_is_nothing() {
        let s = Summary::of(&[ms(7)]).unwrap();
        assert_eq!((s.min, s.p50, s.max), (ms(7), ms(7), ms(7)));
        assert_eq!(Summary::of(&[]), None);
    }
}
