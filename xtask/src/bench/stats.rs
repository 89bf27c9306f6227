//! Medians, percentiles and spreads.

use serde::Serialize;

/// The `p`-th percentile (0–100) of `values`, nearest-rank on a sorted copy;
/// `NaN` when empty.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// A figure measured in several runs: its median and range.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Spread {
    pub fn of(values: &[f64]) -> Spread {
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        if finite.is_empty() {
            return Spread { median: f64::NAN, min: f64::NAN, max: f64::NAN, runs: 0 };
        }
        let mut sorted = finite.clone();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = if n % 2 == 1 { sorted[n / 2] } else { (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0 };
        Spread { median, min: sorted[0], max: sorted[n - 1], runs: n }
    }

    pub fn is_valid(&self) -> bool {
        self.runs > 0 && self.median.is_finite()
    }

    /// The spread as ± percent of the median (half the range).
    pub fn spread_pct(&self) -> f64 {
        if !self.is_valid() || self.median == 0.0 {
            return f64::NAN;
        }
        (self.max - self.min) / 2.0 / self.median * 100.0
    }
}

/// Median of the per-run ratios `a[i] / b[i]` (runs are paired: measured
/// back to back), with their range.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> Spread {
    let ratios: Vec<f64> = a.iter().zip(b).filter(|(_, b)| **b != 0.0).map(|(a, b)| a / b).collect();
    Spread::of(&ratios)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_medians() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        let s = Spread::of(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max, s.runs), (2.5, 1.0, 10.0, 4));
        assert!(percentile(&[], 50.0).is_nan());
        let r = paired_ratio(&[2.0, 4.0, 9.0], &[1.0, 4.0, 3.0]);
        assert_eq!(r.median, 2.0);
    }
}
