//! Running parity (state tracking; the xLSTM and "Were RNNs All We Needed?" settings): read a
//! random bit string and output, at every position, the parity of the bits so far. Trivial for
//! a recurrent state that flips, impossible for a model that cannot count; trained at one length
//! and evaluated at longer ones it separates state tracking from pattern matching.
//!
//! Worked example, `seq_len = 8`:
//!
//! ```text
//! position  0 1 2 3 4 5 6 7
//! input     1 0 1 1 0 0 1 0
//! target    1 1 0 1 1 1 0 0     x_0 ⊕ … ⊕ x_t
//! mask      x x x x x x x x
//! ```
//!
//! Baseline: a coin flip, cross-entropy `ln 2`, accuracy ½.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// `[task]` with `kind = "parity"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParityConfig {
    pub seq_len: usize,
}

impl Default for ParityConfig {
    fn default() -> Self {
        Self { seq_len: 64 }
    }
}

impl ParityConfig {
    pub fn build(&self) -> Result<Parity, TaskError> {
        if self.seq_len == 0 {
            return invalid("seq_len", "must be at least 1");
        }
        Ok(Parity {
            config: self.clone(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Parity {
    config: ParityConfig,
}

impl Parity {
    pub fn info(&self) -> TaskInfo {
        TaskInfo {
            kind: "parity",
            input: Channel::Tokens { vocab: 2 },
            output: Channel::Tokens { vocab: 2 },
            seq_len: self.config.seq_len,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::All,
            baseline_loss: 2f64.ln(),
            baseline_metric: 0.5,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let input: Vec<u32> = (0..self.config.seq_len)
            .map(|_| rng.random_range(0..2))
            .collect();
        let target = input
            .iter()
            .scan(0, |parity, &bit| {
                *parity ^= bit;
                Some(*parity)
            })
            .collect();
        Sample::tokens(input, target, vec![true; self.config.seq_len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_prefix_parities() {
        let task = ParityConfig { seq_len: 33 }.build().unwrap();
        let s = task.sample(&mut crate::rng::stream(3, 0));
        for t in 0..33 {
            let ones = s.input.tokens()[..=t].iter().filter(|&&b| b == 1).count();
            assert_eq!(s.target.tokens()[t] as usize, ones % 2);
        }
    }
}
