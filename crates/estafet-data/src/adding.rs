//! The adding problem (Hochreiter & Schmidhuber 1997, in the setting of Le et al. 2015): each
//! position carries a value drawn from U(0, 1) and a marker; exactly two positions are marked,
//! one in each half of the sequence, and at the last position the model must output the sum of
//! the two marked values. A regression over one position, so the answer needs a memory that
//! spans up to the whole sequence.
//!
//! Worked example, `seq_len = 6`:
//!
//! ```text
//! position   0    1    2    3    4    5
//! value     0.41 0.93 0.12 0.77 0.05 0.60
//! marker     0    1    0    0    1    0
//! target     .    .    .    .    .   0.98     0.93 + 0.05, scored at the last position only
//! ```
//!
//! Input width 2 (value, marker), target width 1. Baseline: always answering 1, the mean of the
//! sum, has a squared error of Var(U₁ + U₂) = 1/6 ≈ 0.167. Solved below an MSE of 0.01 (a
//! twentieth of the baseline error, about where Le et al.'s curves level off).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{
    Channel, LossPositions, Metric, Readout, Sample, Seq, TaskError, TaskInfo, invalid,
};

/// `[task]` with `kind = "adding"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AddingConfig {
    pub seq_len: usize,
}

impl Default for AddingConfig {
    /// Le et al.'s shortest setting.
    fn default() -> Self {
        Self { seq_len: 150 }
    }
}

impl AddingConfig {
    pub fn build(&self) -> Result<Adding, TaskError> {
        if self.seq_len < 2 {
            return invalid("seq_len", "must be at least 2 (one marker in each half)");
        }
        Ok(Adding {
            config: self.clone(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Adding {
    config: AddingConfig,
}

impl Adding {
    pub fn info(&self) -> TaskInfo {
        TaskInfo {
            kind: "adding",
            input: Channel::Reals { width: 2 },
            output: Channel::Reals { width: 1 },
            seq_len: self.config.seq_len,
            metric: Metric::Mse,
            loss_positions: LossPositions::Masked,
            baseline_loss: 1.0 / 6.0,
            baseline_metric: 1.0 / 6.0,
            solved_metric: 0.01,
            readout: Readout::PerPosition,
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let t = self.config.seq_len;
        let half = t / 2;
        let first = rng.random_range(0..half);
        let second = rng.random_range(half..t);
        let mut input = Vec::with_capacity(2 * t);
        for i in 0..t {
            input.push(rng.random::<f32>());
            input.push(if i == first || i == second { 1.0 } else { 0.0 });
        }
        let mut target = vec![0.0; t];
        target[t - 1] = input[2 * first] + input[2 * second];
        Sample {
            input: Seq::Reals {
                width: 2,
                values: input,
            },
            target: Seq::Reals {
                width: 1,
                values: target,
            },
            mask: (0..t).map(|i| i == t - 1).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the markers and adds their values, knowing nothing of how samples are drawn.
    fn solve(s: &Sample) -> f32 {
        (0..s.input.len())
            .map(|t| s.input.reals_at(t))
            .filter(|p| p[1] == 1.0)
            .map(|p| p[0])
            .sum()
    }

    #[test]
    fn target_is_the_sum_of_the_two_marked_values() {
        for t in [2, 3, 7, 150] {
            let task = AddingConfig { seq_len: t }.build().unwrap();
            for seed in 0..20 {
                let s = task.sample(&mut crate::rng::stream(seed, 0));
                assert_eq!(s.input.len(), t);
                let markers: Vec<usize> =
                    (0..t).filter(|&i| s.input.reals_at(i)[1] == 1.0).collect();
                assert_eq!(markers.len(), 2, "T {t} seed {seed}");
                assert!(markers[0] < t / 2 && markers[1] >= t / 2);
                assert_eq!(s.target.reals_at(t - 1)[0], solve(&s));
                assert_eq!(s.mask.iter().filter(|&&m| m).count(), 1);
                assert!(s.mask[t - 1]);
            }
        }
    }

    #[test]
    fn predicting_one_scores_the_documented_baseline() {
        let task = AddingConfig { seq_len: 10 }.build().unwrap();
        let mut rng = crate::rng::stream(0, 0);
        let n = 20_000;
        let mse: f64 = (0..n)
            .map(|_| (task.sample(&mut rng).target.reals_at(9)[0] as f64 - 1.0).powi(2))
            .sum::<f64>()
            / n as f64;
        assert!((mse - task.info().baseline_metric).abs() < 0.005, "{mse}");
    }

    #[test]
    fn a_sequence_of_one_is_refused() {
        let e = AddingConfig { seq_len: 1 }.build().unwrap_err();
        assert_eq!(e.field, "seq_len");
    }
}
