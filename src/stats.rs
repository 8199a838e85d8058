//! Statistics and the seeded random number generator that results, assignment and the CollabLLM
//! core share: plain functions of numbers, so they sit below every other module and depend on
//! none of them.

/// Bootstrap resamples per interval.
const BOOTSTRAP_RESAMPLES: usize = 2000;
/// Seed of the bootstrap, fixed so results are reproducible.
const BOOTSTRAP_SEED: u64 = 2025;

/// SplitMix64: a tiny generator with a published, stable definition.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A mean with its 95% percentile-bootstrap interval.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub n: usize,
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

/// Median and quartiles.
#[derive(Debug, Clone, PartialEq)]
pub struct Spread {
    pub min: f64,
    pub q1: f64,
    pub median: f64,
    pub q3: f64,
    pub max: f64,
}

pub fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Mean and 95% percentile-bootstrap interval of `values`.
pub fn estimate(values: &[f64]) -> Option<Estimate> {
    let center = mean(values)?;
    let mut rng = SplitMix64::new(BOOTSTRAP_SEED);
    let mut means: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            (0..values.len())
                .map(|_| values[rng.below(values.len())])
                .sum::<f64>()
                / values.len() as f64
        })
        .collect();
    means.sort_by(f64::total_cmp);
    Some(Estimate {
        n: values.len(),
        mean: center,
        low: quantile(&means, 0.025),
        high: quantile(&means, 0.975),
    })
}

/// Linear-interpolated quantile of sorted values.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    let at = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (at - lo as f64)
}

pub fn spread(values: &[f64]) -> Option<Spread> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(Spread {
        min: v[0],
        q1: quantile(&v, 0.25),
        median: quantile(&v, 0.5),
        q3: quantile(&v, 0.75),
        max: v[v.len() - 1],
    })
}

/// The 95% Wilson score interval of `k` successes in `n`.
pub fn wilson(k: usize, n: usize) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (k, n, z) = (k as f64, n as f64, 1.959_964);
    let p = k / n;
    let denominator = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denominator;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denominator;
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_its_reference_values() {
        // First outputs for seed 1234567 from the reference implementation.
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
    }

    #[test]
    fn the_bootstrap_interval_contains_the_mean_and_is_reproducible() {
        let values = [6.0, 7.0, 8.0, 9.0, 5.0, 7.0, 8.0, 6.0];
        let e = estimate(&values).unwrap();
        assert_eq!(e.mean, 7.0);
        assert!(
            e.low < 7.0 && e.high > 7.0 && e.low >= 5.0 && e.high <= 9.0,
            "{e:?}"
        );
        assert_eq!(estimate(&values), Some(e));
        let same = estimate(&[4.0, 4.0, 4.0]).unwrap();
        assert_eq!((same.low, same.high), (4.0, 4.0));
        assert!(estimate(&[]).is_none());
    }

    #[test]
    fn spread_gives_quartiles() {
        let s = spread(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(
            (s.min, s.q1, s.median, s.q3, s.max),
            (1.0, 2.0, 3.0, 4.0, 5.0)
        );
    }
}
