//! Selective copying (Gu & Dao 2023, "Mamba", §4.1.1; Arjovsky et al.'s copy task with the data
//! scattered): `n_tokens` data tokens sit at random positions of a noise-filled stretch of
//! length `seq_len`; after it, `n_tokens` recall markers ask for the data tokens in order. A
//! model must select what to keep by content, not by position.
//!
//! Tokens: `0` noise, `1..=vocab` data, `vocab + 1` recall marker. Targets are `1..=vocab` at
//! the recall positions, which alone are scored (loss and metric).
//!
//! Worked example, `seq_len = 8, n_tokens = 3, vocab = 4` (`T = seq_len + n_tokens = 11`):
//!
//! ```text
//! position  0 1 2 3 4 5 6 7 8 9 10
//! input     0 2 0 0 4 0 1 0 5 5 5     data at random positions among noise, then markers
//! target    . . . . . . . . 2 4 1     the data tokens in order
//! mask      . . . . . . . . x x x
//! ```
//!
//! Baseline: a model that cannot recall guesses uniformly, cross-entropy `ln vocab`, accuracy
//! `1 / vocab`.
//!
//! MAD's selective copying (`vocab_size V, seq_len L, num_tokens_to_copy n`, defaults 16, 256,
//! 16) is this task with `vocab = V − 2` (MAD spends two tokens on blank and copy), `n_tokens =
//! n` and `seq_len = L − n − 1`; MAD asks for the tokens with one copy token and `n` blanks where
//! this task uses `n` recall markers.

use rand::Rng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// `[task]` with `kind = "selective_copying"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelectiveCopyingConfig {
    /// Length of the stretch holding data and noise.
    pub seq_len: usize,
    /// Data tokens to copy.
    pub n_tokens: usize,
    /// Distinct data tokens.
    pub vocab: usize,
}

impl Default for SelectiveCopyingConfig {
    /// The Mamba paper's setting: 16 tokens from a vocabulary of 16 in 4096 positions; we
    /// default to 256 positions, a length a CPU trains at.
    fn default() -> Self {
        Self {
            seq_len: 256,
            n_tokens: 16,
            vocab: 16,
        }
    }
}

impl SelectiveCopyingConfig {
    pub fn build(&self) -> Result<SelectiveCopying, TaskError> {
        if self.n_tokens == 0 {
            return invalid("n_tokens", "must be at least 1");
        }
        if self.n_tokens > self.seq_len {
            return invalid(
                "n_tokens",
                format!(
                    "{} data tokens do not fit in seq_len = {}",
                    self.n_tokens, self.seq_len
                ),
            );
        }
        if self.vocab < 2 {
            return invalid("vocab", "must be at least 2");
        }
        Ok(SelectiveCopying {
            config: self.clone(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct SelectiveCopying {
    config: SelectiveCopyingConfig,
}

impl SelectiveCopying {
    pub fn info(&self) -> TaskInfo {
        let c = &self.config;
        TaskInfo {
            kind: "selective_copying",
            input: Channel::Tokens { vocab: c.vocab + 2 },
            output: Channel::Tokens { vocab: c.vocab + 1 },
            seq_len: c.seq_len + c.n_tokens,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::Masked,
            baseline_loss: (c.vocab as f64).ln(),
            baseline_metric: 1.0 / c.vocab as f64,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let SelectiveCopyingConfig {
            seq_len,
            n_tokens,
            vocab,
        } = self.config;
        let mut positions = sample(rng, seq_len, n_tokens).into_vec();
        positions.sort_unstable();
        let data: Vec<u32> = (0..n_tokens)
            .map(|_| rng.random_range(1..=vocab as u32))
            .collect();
        let t = seq_len + n_tokens;
        let mut input = vec![0; t];
        let mut target = vec![0; t];
        for (&p, &d) in positions.iter().zip(&data) {
            input[p] = d;
        }
        input[seq_len..].fill(vocab as u32 + 1);
        target[seq_len..].copy_from_slice(&data);
        Sample::tokens(input, target, (0..t).map(|i| i >= seq_len).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_the_data_in_order() {
        let task = SelectiveCopyingConfig {
            seq_len: 30,
            n_tokens: 5,
            vocab: 4,
        }
        .build()
        .unwrap();
        for seed in 0..50 {
            let s = task.sample(&mut crate::rng::stream(seed, 0));
            let data: Vec<u32> = s.input.tokens()[..30]
                .iter()
                .copied()
                .filter(|&v| v != 0)
                .collect();
            assert_eq!(data.len(), 5);
            assert!(data.iter().all(|&v| (1..=4).contains(&v)));
            assert_eq!(&s.input.tokens()[30..], &[5; 5]);
            assert_eq!(&s.target.tokens()[30..], data.as_slice());
            assert_eq!(s.mask.iter().filter(|&&m| m).count(), 5);
        }
    }

    #[test]
    fn too_many_tokens_is_a_named_error() {
        let e = SelectiveCopyingConfig {
            seq_len: 4,
            n_tokens: 5,
            vocab: 4,
        }
        .build()
        .unwrap_err();
        assert!(e.to_string().starts_with("task.n_tokens:"), "{e}");
    }
}
