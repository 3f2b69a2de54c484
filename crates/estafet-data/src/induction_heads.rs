//! Induction heads (Olsson et al. 2022; the Mamba paper's synthetic setting, §4.1.2): a random
//! sequence contains a trigger token followed by some token `X`; the sequence ends with the
//! trigger again, and the model must answer `X`. A model has to find the earlier trigger and
//! copy what came after it, at any distance.
//!
//! Tokens: `0..vocab` random content, `vocab` the trigger. Only the last position is scored.
//!
//! Worked example, `vocab = 4, seq_len = 10`:
//!
//! ```text
//! position  0 1 2 3 4 5 6 7 8 9
//! input     2 0 4 3 1 1 2 0 3 4     trigger (4) at 2, X = 3 after it, trigger again at the end
//! target    . . . . . . . . . 3
//! mask      . . . . . . . . . x
//! ```
//!
//! Baseline: a uniform guess, cross-entropy `ln vocab`, accuracy `1 / vocab`.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// `[task]` with `kind = "induction_heads"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InductionHeadsConfig {
    pub seq_len: usize,
    /// Content tokens (the trigger is one more).
    pub vocab: usize,
}

impl Default for InductionHeadsConfig {
    /// The Mamba paper's setting: vocabulary 16, trained at length 256.
    fn default() -> Self {
        Self {
            seq_len: 256,
            vocab: 16,
        }
    }
}

impl InductionHeadsConfig {
    pub fn build(&self) -> Result<InductionHeads, TaskError> {
        if self.seq_len < 3 {
            return invalid("seq_len", "must be at least 3 (trigger, token, trigger)");
        }
        if self.vocab < 2 {
            return invalid("vocab", "must be at least 2");
        }
        Ok(InductionHeads {
            config: self.clone(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct InductionHeads {
    config: InductionHeadsConfig,
}

impl InductionHeads {
    pub fn info(&self) -> TaskInfo {
        let c = &self.config;
        TaskInfo {
            kind: "induction_heads",
            input: Channel::Tokens { vocab: c.vocab + 1 },
            output: Channel::Tokens { vocab: c.vocab },
            seq_len: c.seq_len,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::Masked,
            baseline_loss: (c.vocab as f64).ln(),
            baseline_metric: 1.0 / c.vocab as f64,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let InductionHeadsConfig { seq_len, vocab } = self.config;
        let trigger = vocab as u32;
        let mut input: Vec<u32> = (0..seq_len).map(|_| rng.random_range(0..trigger)).collect();
        let at = rng.random_range(0..seq_len - 2);
        input[at] = trigger;
        input[seq_len - 1] = trigger;
        let answer = input[at + 1];
        let mut target = vec![0; seq_len];
        target[seq_len - 1] = answer;
        let mut mask = vec![false; seq_len];
        mask[seq_len - 1] = true;
        Sample::tokens(input, target, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_follows_the_only_earlier_trigger() {
        let task = InductionHeadsConfig {
            seq_len: 20,
            vocab: 4,
        }
        .build()
        .unwrap();
        for seed in 0..100 {
            let s = task.sample(&mut crate::rng::stream(seed, 0));
            let triggers: Vec<usize> = (0..20).filter(|&i| s.input.tokens()[i] == 4).collect();
            assert_eq!(triggers.len(), 2);
            assert_eq!(triggers[1], 19);
            assert_eq!(s.target.tokens()[19], s.input.tokens()[triggers[0] + 1]);
            assert_eq!(s.mask.iter().filter(|&&m| m).count(), 1);
        }
    }
}
