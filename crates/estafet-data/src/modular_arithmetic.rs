//! Modular arithmetic, with and without brackets (Delétang et al. 2023, "Neural Networks and
//! the Chomsky Hierarchy"; the state-tracking rows of Grazzi et al. 2024, "Unlocking
//! State-Tracking in Linear RNNs Through Negative Eigenvalues", Table 3): read an expression
//! over the numbers `0 … m−1` and `+ − ×`, then `=`, and output its value modulo `m`.
//! Without brackets it is a regular language (a finite automaton of `m` states reads it);
//! with brackets it is context-free (the reader needs a stack).
//!
//! An expression is a chain of atoms joined by operators, `A op A op … op A`, evaluated left
//! to right without precedence (`2 + 3 × 4 = (2 + 3) × 4`); an atom is a number or, with
//! `brackets = true`, a bracketed expression `( … )`, evaluated first. Its length in tokens is
//! odd, drawn uniformly from the odd lengths in `[min_len, seq_len − 1]`; the sample is the
//! expression, then `=`, left-padded to `seq_len` with a padding token. Only the `=` position
//! is scored, its target the value. For length generalisation, train at one `seq_len` and
//! evaluate at longer ones (`min_len` stays, so a longer test set also holds short
//! expressions).
//!
//! Tokens: `0 … m−1` the numbers, then `+ − × ( ) =` and the padding, `m + 7` in all; the
//! output is one of the `m` values. Worked example, `modulus = 5`, `brackets = true`,
//! `seq_len = 10` (`P` padding):
//!
//! ```text
//! position   0  1  2  3  4  5  6  7  8  9
//! input      P  P  (  3  +  4  )  ×  2  =      (3 + 4) × 2 = 14 ≡ 4 (mod 5)
//! target     .  .  .  .  .  .  .  .  .  4
//! mask       .  .  .  .  .  .  .  .  .  x
//! ```
//!
//! Baseline: the most frequent value, measured on 4096 held-out expressions when the task is
//! built (× makes 0 more frequent than 1/m). Grazzi et al. report the *scaled* accuracy
//! `(acc − 1/m) / (1 − 1/m)` (0 is chance, 1 perfect); estafet prints it for every accuracy
//! task beside the accuracy.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// `[task]` with `kind = "modular_arithmetic"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModularArithmeticConfig {
    /// The modulus `m` (Grazzi et al. and Delétang et al.: 5).
    pub modulus: u32,
    /// Bracketed sub-expressions (context-free) or a flat chain (regular).
    pub brackets: bool,
    /// Positions per sample: the longest expression is `seq_len − 1` tokens (then `=`).
    pub seq_len: usize,
    /// The shortest expression, in tokens.
    pub min_len: usize,
}

impl Default for ModularArithmeticConfig {
    /// Grazzi et al.'s training lengths, 3 to 40 tokens.
    fn default() -> Self {
        Self {
            modulus: 5,
            brackets: false,
            seq_len: 41,
            min_len: 3,
        }
    }
}

/// Held-out expressions the majority-value baseline is measured on.
const BASELINE_SAMPLES: usize = 4096;

impl ModularArithmeticConfig {
    pub fn build(&self) -> Result<ModularArithmetic, TaskError> {
        if self.modulus < 2 {
            return invalid(
                "modulus",
                format!("must be at least 2, got {}", self.modulus),
            );
        }
        if self.min_len == 0 {
            return invalid("min_len", "must be at least 1");
        }
        let longest = self.seq_len.saturating_sub(1);
        let shortest = self.min_len | 1; // the first odd length ≥ min_len
        if shortest > longest {
            return invalid(
                "seq_len",
                format!(
                    "expressions of odd length in [min_len = {}, seq_len − 1 = {longest}]: there \
                     is none",
                    self.min_len
                ),
            );
        }
        // The odd lengths an expression may take: from the first odd one ≥ min_len to the last
        // odd one ≤ seq_len − 1.
        let lengths = (shortest, longest - (1 - longest % 2));
        let mut task = ModularArithmetic {
            config: self.clone(),
            lengths,
            baseline: (0.0, 0.0),
        };
        let mut counts = vec![0usize; self.modulus as usize];
        let mut rng = crate::rng::stream(0, crate::rng::EVAL_STREAM);
        for _ in 0..BASELINE_SAMPLES {
            counts[*task.sample(&mut rng).target.tokens().last().expect("T ≥ 2") as usize] += 1;
        }
        let entropy = crate::task::entropy_of_counts(&counts);
        let majority = *counts.iter().max().expect("m ≥ 2") as f64 / BASELINE_SAMPLES as f64;
        task.baseline = (entropy, majority);
        Ok(task)
    }
}

#[derive(Clone, Debug)]
pub struct ModularArithmetic {
    config: ModularArithmeticConfig,
    /// The shortest and the longest expression (both odd).
    lengths: (usize, usize),
    /// (cross-entropy, accuracy) of always answering the most frequent value.
    baseline: (f64, f64),
}

/// The token of each symbol, after the `m` numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Symbol {
    Plus,
    Minus,
    Times,
    Open,
    Close,
    Equals,
    Pad,
}

impl ModularArithmetic {
    pub fn token(&self, symbol: Symbol) -> u32 {
        self.config.modulus + symbol as u32
    }

    /// How a token reads: its number, or `+ − × ( ) =`, or `_` for the padding.
    pub fn show(&self, token: u32) -> String {
        let m = self.config.modulus;
        match token.checked_sub(m) {
            None => token.to_string(),
            Some(s) => ["+", "−", "×", "(", ")", "=", "_"]
                .get(s as usize)
                .map_or("?".into(), |s| s.to_string()),
        }
    }

    pub fn info(&self) -> TaskInfo {
        let m = self.config.modulus as usize;
        TaskInfo {
            kind: "modular_arithmetic",
            input: Channel::Tokens { vocab: m + 7 },
            output: Channel::Tokens { vocab: m },
            seq_len: self.config.seq_len,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::Masked,
            baseline_loss: self.baseline.0,
            baseline_metric: self.baseline.1,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let c = &self.config;
        let (shortest, longest) = self.lengths;
        let len = shortest + 2 * rng.random_range(0..=(longest - shortest) / 2);
        let mut expression = Vec::with_capacity(len);
        let value = self.chain(rng, len, &mut expression);
        let pad = c.seq_len - 1 - len;
        let mut input = vec![self.token(Symbol::Pad); pad];
        input.extend(expression);
        input.push(self.token(Symbol::Equals));
        let mut target = vec![0; c.seq_len];
        target[c.seq_len - 1] = value;
        let mut mask = vec![false; c.seq_len];
        mask[c.seq_len - 1] = true;
        Sample::tokens(input, target, mask)
    }

    /// Appends a chain of `len` tokens (odd) to `out`; returns its value.
    fn chain(&self, rng: &mut ChaCha8Rng, len: usize, out: &mut Vec<u32>) -> u32 {
        let m = self.config.modulus;
        let mut left = len;
        let mut value: Option<u32> = None;
        let mut op = Symbol::Plus;
        loop {
            // An atom of odd length: a number, or (half the time, with brackets) a bracket
            // of any odd length that fits.
            let atom = if self.config.brackets && left >= 3 && rng.random_bool(0.5) {
                3 + 2 * rng.random_range(0..=(left - 3) / 2)
            } else {
                1
            };
            let v = if atom == 1 {
                let n = rng.random_range(0..m);
                out.push(n);
                n
            } else {
                out.push(self.token(Symbol::Open));
                let inner = self.chain(rng, atom - 2, out);
                out.push(self.token(Symbol::Close));
                inner
            };
            let acc = match value {
                None => v,
                Some(acc) => apply(op, acc, v, m),
            };
            value = Some(acc);
            left -= atom;
            if left == 0 {
                return acc;
            }
            op = [Symbol::Plus, Symbol::Minus, Symbol::Times][rng.random_range(0..3)];
            out.push(self.token(op));
            left -= 1;
        }
    }
}

/// `a op b (mod m)`.
fn apply(op: Symbol, a: u32, b: u32, m: u32) -> u32 {
    match op {
        Symbol::Plus => (a + b) % m,
        Symbol::Minus => (a + m - b) % m,
        Symbol::Times => (a * b) % m,
        _ => unreachable!("only + − × join atoms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent solver: a recursive-descent reader of the tokens.
    fn evaluate(tokens: &[u32], m: u32) -> u32 {
        fn chain(t: &[u32], i: &mut usize, m: u32) -> u32 {
            let mut acc = atom(t, i, m);
            while *i < t.len() && (m..m + 3).contains(&t[*i]) {
                let op = t[*i] - m;
                *i += 1;
                let b = atom(t, i, m);
                acc = match op {
                    0 => (acc + b) % m,
                    1 => (acc + m - b) % m,
                    _ => (acc * b) % m,
                };
            }
            acc
        }
        fn atom(t: &[u32], i: &mut usize, m: u32) -> u32 {
            let v = if t[*i] == m + 3 {
                *i += 1;
                let v = chain(t, i, m);
                assert_eq!(t[*i], m + 4, "a closing bracket");
                v
            } else {
                assert!(t[*i] < m, "a number");
                t[*i]
            };
            *i += 1;
            v
        }
        let mut i = 0;
        let v = chain(tokens, &mut i, m);
        assert_eq!(i, tokens.len(), "the whole expression is read");
        v
    }

    #[test]
    fn targets_are_the_values_of_the_expressions() {
        for brackets in [false, true] {
            let config = ModularArithmeticConfig {
                brackets,
                seq_len: 64,
                ..ModularArithmeticConfig::default()
            };
            let task = config.build().unwrap();
            let mut lengths = std::collections::BTreeSet::new();
            let mut bracketed = 0;
            for seed in 0..200 {
                let s = task.sample(&mut crate::rng::stream(seed, 0));
                let tokens = s.input.tokens();
                assert_eq!(tokens.len(), 64);
                assert_eq!(tokens[63], task.token(Symbol::Equals));
                let body: Vec<u32> = tokens[..63]
                    .iter()
                    .copied()
                    .skip_while(|&t| t == task.token(Symbol::Pad))
                    .collect();
                assert!(body.len() % 2 == 1 && (3..=63).contains(&body.len()));
                lengths.insert(body.len());
                bracketed += body.contains(&task.token(Symbol::Open)) as usize;
                assert_eq!(s.target.tokens()[63], evaluate(&body, 5));
                assert_eq!(s.mask.iter().filter(|&&m| m).count(), 1);
                assert!(s.mask[63]);
            }
            assert!(lengths.len() > 20, "lengths vary: {lengths:?}");
            assert_eq!(bracketed > 100, brackets, "{bracketed}");
        }
    }

    #[test]
    fn the_worked_example_and_the_baseline() {
        let task = ModularArithmeticConfig {
            brackets: true,
            seq_len: 10,
            ..ModularArithmeticConfig::default()
        }
        .build()
        .unwrap();
        let (open, close, plus, times) = (
            task.token(Symbol::Open),
            task.token(Symbol::Close),
            task.token(Symbol::Plus),
            task.token(Symbol::Times),
        );
        assert_eq!(evaluate(&[open, 3, plus, 4, close, times, 2], 5), 4);
        // Left to right, no precedence.
        assert_eq!(evaluate(&[2, plus, 3, times, 4], 5), 0);
        let info = task.info();
        assert!(
            info.baseline_metric > 0.2 && info.baseline_metric < 0.5,
            "{info:?}"
        );
        assert!(info.baseline_loss < 5f64.ln());
        for (field, bad) in [
            (
                "modulus",
                ModularArithmeticConfig {
                    modulus: 1,
                    ..Default::default()
                },
            ),
            (
                "seq_len",
                ModularArithmeticConfig {
                    seq_len: 3,
                    min_len: 3,
                    ..Default::default()
                },
            ),
            (
                "min_len",
                ModularArithmeticConfig {
                    min_len: 0,
                    ..Default::default()
                },
            ),
        ] {
            assert_eq!(bad.build().unwrap_err().field, field);
        }
    }
}
