//! Copy memory (Hochreiter & Schmidhuber 1997, in the setting of Arjovsky et al. 2016).
//!
//! The model reads `n_symbols` random symbols, then a lag of blanks ending in a delimiter, and
//! must then reproduce the symbols in order. Everything before the recall is a blank target,
//! so the loss is taken over all `lag + 2·n_symbols` positions (Arjovsky's convention) and the
//! metric over the `n_symbols` recall positions only.
//!
//! Tokens: `0` blank, `1..=alphabet` symbols, `alphabet + 1` delimiter. Targets are `0..=alphabet`.
//!
//! Worked example, `lag = 5, n_symbols = 3, alphabet = 4` (`T = lag + 2·n_symbols = 11`):
//!
//! ```text
//! position  0 1 2 3 4 5 6 7 8 9 10
//! input     3 1 4 0 0 0 0 5 0 0 0     symbols, lag − 1 blanks, delimiter, n_symbols blanks
//! target    0 0 0 0 0 0 0 0 3 1 4     blanks, then the symbols
//! mask      . . . . . . . . x x x     the metric scores the recall
//! ```
//!
//! Memoryless baseline: predict a blank with certainty for the first `lag + n_symbols`
//! positions and a uniform symbol for the rest, a cross-entropy of
//! `n_symbols · ln(alphabet) / (lag + 2·n_symbols)` (`10 ln 8 / (T + 20)` in the paper's setting)
//! and a recall accuracy of `1 / alphabet`.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// `[task]` with `kind = "copy_memory"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CopyMemoryConfig {
    /// Steps from the last symbol to the delimiter (the paper's `T`).
    pub lag: usize,
    /// Symbols to remember.
    pub n_symbols: usize,
    /// Distinct symbols.
    pub alphabet: usize,
}

impl Default for CopyMemoryConfig {
    /// Arjovsky et al.'s setting at their shortest lag, T = 100.
    fn default() -> Self {
        Self {
            lag: 100,
            n_symbols: 10,
            alphabet: 8,
        }
    }
}

impl CopyMemoryConfig {
    pub fn build(&self) -> Result<CopyMemory, TaskError> {
        if self.lag == 0 {
            return invalid(
                "lag",
                "must be at least 1 (the delimiter takes the last lag step)",
            );
        }
        if self.n_symbols == 0 {
            return invalid("n_symbols", "must be at least 1");
        }
        if self.alphabet < 2 {
            return invalid(
                "alphabet",
                "must be at least 2 (one symbol carries no information)",
            );
        }
        Ok(CopyMemory {
            config: self.clone(),
        })
    }
}

/// A validated copy-memory generator.
#[derive(Clone, Debug)]
pub struct CopyMemory {
    config: CopyMemoryConfig,
}

impl CopyMemory {
    pub fn seq_len(&self) -> usize {
        self.config.lag + 2 * self.config.n_symbols
    }

    pub fn delimiter(&self) -> u32 {
        self.config.alphabet as u32 + 1
    }

    pub fn info(&self) -> TaskInfo {
        let CopyMemoryConfig {
            lag,
            n_symbols,
            alphabet,
        } = self.config;
        TaskInfo {
            kind: "copy_memory",
            input: Channel::Tokens {
                vocab: alphabet + 2,
            },
            output: Channel::Tokens {
                vocab: alphabet + 1,
            },
            seq_len: self.seq_len(),
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::All,
            baseline_loss: n_symbols as f64 * (alphabet as f64).ln() / (lag + 2 * n_symbols) as f64,
            baseline_metric: 1.0 / alphabet as f64,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let CopyMemoryConfig {
            lag,
            n_symbols,
            alphabet,
        } = self.config;
        let t = self.seq_len();
        let symbols: Vec<u32> = (0..n_symbols)
            .map(|_| rng.random_range(1..=alphabet as u32))
            .collect();
        let mut input = vec![0; t];
        let mut target = vec![0; t];
        input[..n_symbols].copy_from_slice(&symbols);
        input[n_symbols + lag - 1] = self.delimiter();
        target[n_symbols + lag..].copy_from_slice(&symbols);
        let mask = (0..t).map(|i| i >= n_symbols + lag).collect();
        Sample::tokens(input, target, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Task, TaskConfig};

    fn task(lag: usize) -> Task {
        TaskConfig::CopyMemory(CopyMemoryConfig {
            lag,
            n_symbols: 10,
            alphabet: 8,
        })
        .build()
        .unwrap()
    }

    #[test]
    fn worked_example_layout() {
        let task = CopyMemoryConfig {
            lag: 5,
            n_symbols: 3,
            alphabet: 4,
        }
        .build()
        .unwrap();
        let s = task.sample(&mut crate::rng::stream(7, 0));
        assert_eq!(s.input.len(), 11);
        assert_eq!(&s.input.tokens()[3..7], &[0, 0, 0, 0]);
        assert_eq!(s.input.tokens()[7], 5);
        assert_eq!(&s.input.tokens()[8..], &[0, 0, 0]);
        assert_eq!(&s.target.tokens()[..8], &[0; 8]);
        assert_eq!(&s.target.tokens()[8..], &s.input.tokens()[..3]);
        assert_eq!(s.mask, [[false; 8].as_slice(), &[true; 3]].concat());
    }

    #[test]
    fn labels_follow_from_inputs() {
        let task = task(20);
        for s in task.train_batch(3, 11, 64) {
            assert_eq!(s.input.len(), 40);
            let symbols = &s.input.tokens()[..10];
            assert!(symbols.iter().all(|&v| (1..=8).contains(&v)));
            assert!(s.input.tokens()[10..29].iter().all(|&v| v == 0));
            assert_eq!(s.input.tokens()[29], 9, "delimiter ends the lag");
            assert!(s.input.tokens()[30..].iter().all(|&v| v == 0));
            assert!(s.target.tokens()[..30].iter().all(|&v| v == 0));
            assert_eq!(&s.target.tokens()[30..], symbols);
            assert_eq!(s.mask.iter().filter(|&&m| m).count(), 10);
        }
    }

    #[test]
    fn deterministic_by_seed_and_step() {
        let task = task(20);
        assert_eq!(task.train_batch(5, 3, 8), task.train_batch(5, 3, 8));
        assert_ne!(task.train_batch(5, 3, 8), task.train_batch(5, 4, 8));
        assert_ne!(task.train_batch(5, 3, 8), task.train_batch(6, 3, 8));
        assert_eq!(task.eval_set(5, 16), task.eval_set(5, 16));
        assert_ne!(task.eval_set(5, 16), task.train_batch(5, 0, 16));
    }

    #[test]
    fn symbols_are_uniform() {
        let mut counts = [0usize; 9];
        for s in task(1).train_batch(0, 0, 4000) {
            s.input.tokens()[..10]
                .iter()
                .for_each(|&v| counts[v as usize] += 1);
        }
        assert_eq!(counts[0], 0);
        // 40 000 draws over 8 symbols: 5 000 each, σ ≈ 66.
        assert!(
            counts[1..].iter().all(|&c| (4700..5300).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn baseline_is_the_papers() {
        let info = task(100).info();
        assert!((info.baseline_loss - 10.0 * 8f64.ln() / 120.0).abs() < 1e-12);
        assert_eq!(info.baseline_metric, 0.125);
        assert_eq!(
            (info.input.size(), info.output.size(), info.seq_len),
            (10, 9, 120)
        );
    }

    #[test]
    fn impossible_settings_name_the_field() {
        let err = CopyMemoryConfig {
            lag: 0,
            n_symbols: 10,
            alphabet: 8,
        }
        .build()
        .unwrap_err();
        assert!(err.to_string().starts_with("task.lag:"), "{err}");
        let err = CopyMemoryConfig {
            lag: 3,
            n_symbols: 10,
            alphabet: 1,
        }
        .build()
        .unwrap_err();
        assert!(err.to_string().starts_with("task.alphabet:"), "{err}");
    }
}
