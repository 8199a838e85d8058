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
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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

/// How often something happened, with its 95% Wilson interval.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rate {
    pub n: usize,
    pub k: usize,
    pub rate: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Rate {
    /// The share of `flags` that are true.
    pub fn of(flags: &[bool]) -> Self {
        let (n, k) = (flags.len(), flags.iter().filter(|&&f| f).count());
        let (lo, hi) = wilson(k, n);
        Rate {
            n,
            k,
            rate: if n == 0 { 0.0 } else { k as f64 / n as f64 },
            lo,
            hi,
        }
    }
}

/// Random sign patterns of the permutation test above [`EXACT_SIGN_FLIPS`] differences.
const SIGN_FLIP_SAMPLES: usize = 20_000;
/// Up to this many differences every sign pattern is enumerated (2^16 of them).
const EXACT_SIGN_FLIPS: usize = 16;

/// Two-sided p-value of the paired sign-flip permutation test that `diffs` (one difference per
/// user, arm − baseline) are centred on 0: the share of sign patterns whose mean is at least as
/// far from 0 as the one observed. Exact up to 16 differences; above, 20,000 seeded random
/// patterns with the observed one counted in (so never 0). Assumes only that a difference's sign
/// is exchangeable under the null, not normality.
pub fn sign_flip_p(diffs: &[f64]) -> Option<f64> {
    if diffs.is_empty() {
        return None;
    }
    let observed = diffs.iter().sum::<f64>().abs();
    // A tolerance, so patterns that tie with the observed sum in exact arithmetic count as ties.
    let at_least = |sum: f64| sum.abs() >= observed - 1e-9 * (1.0 + observed);
    let flipped = |bits: u64| {
        diffs
            .iter()
            .enumerate()
            .map(|(i, d)| if bits >> i & 1 == 1 { -d } else { *d })
            .sum::<f64>()
    };
    if diffs.len() <= EXACT_SIGN_FLIPS {
        let patterns = 1u64 << diffs.len();
        let extreme = (0..patterns).filter(|&b| at_least(flipped(b))).count();
        return Some(extreme as f64 / patterns as f64);
    }
    let mut rng = SplitMix64::new(BOOTSTRAP_SEED);
    let extreme = (0..SIGN_FLIP_SAMPLES)
        .filter(|_| {
            let sum: f64 = diffs
                .iter()
                .map(|d| if rng.next_u64() & 1 == 1 { -d } else { *d })
                .sum();
            at_least(sum)
        })
        .count();
    Some((extreme + 1) as f64 / (SIGN_FLIP_SAMPLES + 1) as f64)
}

/// The paired effect size d_z: the mean difference over the differences' standard deviation
/// (n − 1); None for fewer than two differences or no spread.
pub fn paired_effect_size(diffs: &[f64]) -> Option<f64> {
    let m = mean(diffs)?;
    if diffs.len() < 2 {
        return None;
    }
    let var = diffs.iter().map(|d| (d - m).powi(2)).sum::<f64>() / (diffs.len() - 1) as f64;
    (var > 0.0).then(|| m / var.sqrt())
}

/// Holm's step-down adjustment of a family of p-values (in the order given): the smallest is
/// multiplied by the family's size, the next by one less, each at least the one before, at most 1.
pub fn holm(ps: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..ps.len()).collect();
    order.sort_by(|&a, &b| ps[a].total_cmp(&ps[b]));
    let mut adjusted = vec![0.0; ps.len()];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        running = running.max((ps[i] * (ps.len() - rank) as f64).min(1.0));
        adjusted[i] = running;
    }
    adjusted
}

/// Users a paired comparison needs to find an effect of size `d_z` with a two-sided test at
/// α = 0.05 and power 0.8: ((z₀.₉₇₅ + z₀.₈) / d_z)² by the normal approximation, plus one for the
/// t distribution's heavier tails at small n.
pub fn paired_users_needed(d_z: f64) -> Option<usize> {
    if !d_z.is_finite() || d_z == 0.0 {
        return None;
    }
    let n = ((1.959_964 + 0.841_621) / d_z.abs()).powi(2);
    Some(n.ceil() as usize + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sign_flip_test_matches_its_enumeration_by_hand() {
        // Three positive differences: of the 8 sign patterns only all-plus and all-minus are as
        // extreme, so p = 2/8.
        assert_eq!(sign_flip_p(&[1.0, 2.0, 3.0]), Some(0.25));
        // Differences of both signs that cancel: every pattern is as extreme as 0.
        assert_eq!(sign_flip_p(&[1.0, -1.0]), Some(1.0));
        // Twenty equal differences: the sampled p is near 2 / 2^20, i.e. the smallest possible.
        let p = sign_flip_p(&[0.5; 20]).unwrap();
        assert!(p < 0.001, "{p}");
        assert_eq!(sign_flip_p(&[]), None);
    }

    #[test]
    fn holm_adjusts_step_down_and_keeps_the_order() {
        let adjusted = holm(&[0.01, 0.04, 0.03]);
        // Sorted 0.01, 0.03, 0.04 → ×3, ×2, ×1, each at least the one before: 0.03, 0.06, 0.06.
        let expected = [0.03, 0.06, 0.06];
        for (a, e) in adjusted.iter().zip(expected) {
            assert!((a - e).abs() < 1e-12, "{adjusted:?}");
        }
    }

    #[test]
    fn effect_size_and_users_needed_follow_their_formulas() {
        // Differences 1, 2, 3: mean 2, sd 1, d_z 2.
        assert_eq!(paired_effect_size(&[1.0, 2.0, 3.0]), Some(2.0));
        assert_eq!(paired_effect_size(&[1.0, 1.0]), None);
        // d_z = 0.5: (2.8016 / 0.5)^2 = 31.4 → 32, + 1.
        assert_eq!(paired_users_needed(0.5), Some(33));
        assert_eq!(paired_users_needed(0.0), None);
    }

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
