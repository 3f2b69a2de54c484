//! Compression (MAD; Poli et al. 2024, after athms/mad-lab): read a random sequence ending in a
//! compression token and reproduce all of it from a single vector. MAD runs it through an
//! autoencoder: the model's output at the last position is the code, and a small decoder reads
//! every position back from that code plus a position signal. The task declares
//! [`Readout::Bottleneck`], which builds exactly that readout (see `estafet-models`' `model.rs`),
//! so the width of the model is the size of the bottleneck.
//!
//! Tokens: `vocab − 1` is the compression token; the first `seq_len − 1` positions hold
//! uniform draws from the other `vocab − 1`. Every position is scored, its target the input
//! token there (the compression token included, as MAD does). Worked example, `vocab = 5,
//! seq_len = 6`:
//!
//! ```text
//! position   0  1  2  3  4  5
//! input      2  0  3  3  1  4      4: the compression token
//! target     2  0  3  3  1  4      read back from the code of position 5
//! mask       x  x  x  x  x  x
//! ```
//!
//! Training draws from `train_examples` fixed sequences (MAD: 12,800); held-out sequences are
//! fresh. Baseline: a decoder that knows the position but not the code gets the last position
//! right and guesses the others uniformly: accuracy `(1 + (T−1)/(vocab−1)) / T`, cross-entropy
//! `(T−1)/T · ln(vocab−1)`.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// `[task]` with `kind = "compression"` (MAD's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub vocab: usize,
    pub seq_len: usize,
    /// Distinct training sequences.
    pub train_examples: usize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        Self {
            vocab: 16,
            seq_len: 32,
            train_examples: 12_800,
        }
    }
}

impl CompressionConfig {
    pub fn build(&self) -> Result<Compression, TaskError> {
        if self.vocab < 3 {
            return invalid("vocab", format!("must be at least 3, got {}", self.vocab));
        }
        if self.seq_len < 2 {
            return invalid(
                "seq_len",
                "must be at least 2 (tokens, then the compression token)",
            );
        }
        if self.train_examples == 0 {
            return invalid("train_examples", "must be at least 1");
        }
        Ok(Compression {
            config: self.clone(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Compression {
    config: CompressionConfig,
}

impl Compression {
    pub fn info(&self) -> TaskInfo {
        let (v, t) = (self.config.vocab as f64 - 1.0, self.config.seq_len as f64);
        TaskInfo {
            kind: "compression",
            input: Channel::Tokens {
                vocab: self.config.vocab,
            },
            output: Channel::Tokens {
                vocab: self.config.vocab,
            },
            seq_len: self.config.seq_len,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::All,
            baseline_loss: (t - 1.0) / t * v.ln(),
            baseline_metric: (1.0 + (t - 1.0) / v) / t,
            solved_metric: 0.99,
            readout: Readout::Bottleneck,
        }
    }

    /// Distinct training sequences (MAD's `num_train_examples`).
    pub fn train_examples(&self) -> usize {
        self.config.train_examples
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let marker = self.config.vocab as u32 - 1;
        let mut input: Vec<u32> = (0..self.config.seq_len - 1)
            .map(|_| rng.random_range(0..marker))
            .collect();
        input.push(marker);
        let n = input.len();
        Sample::tokens(input.clone(), input, vec![true; n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_input_and_the_readout_a_bottleneck() {
        let task = CompressionConfig::default().build().unwrap();
        let info = task.info();
        assert_eq!(info.readout, Readout::Bottleneck);
        assert!((info.baseline_metric - (1.0 + 31.0 / 15.0) / 32.0).abs() < 1e-12);
        for seed in 0..5 {
            let s = task.sample(&mut crate::rng::stream(seed, 0));
            assert_eq!(s.input, s.target);
            let x = s.input.tokens();
            assert_eq!(x.len(), 32);
            assert_eq!(x[31], 15);
            assert!(x[..31].iter().all(|&t| t < 15));
            assert!(s.mask.iter().all(|&m| m));
        }
        let short = CompressionConfig {
            seq_len: 1,
            ..CompressionConfig::default()
        };
        assert_eq!(short.build().unwrap_err().field, "seq_len");
    }
}
