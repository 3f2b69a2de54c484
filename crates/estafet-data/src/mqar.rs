//! Multi-query associative recall, MQAR (Arora et al. 2023, "Zoology"), as zoology's
//! `multiquery_ar` generates it: `n_pairs` key-value pairs, then the keys asked again in random
//! order at power-law distributed distances, with random tokens in between. At each query the
//! model must produce the value bound to that key earlier in the sequence.
//!
//! Keys come from `1..vocab/2` and values from `vocab/2..vocab`, each without repetition within
//! a sequence. The query slots are even offsets `2g` into the region after the pairs, the gaps
//! `g` drawn without replacement with `P(g) ∝ a·(g+1)^(a−1)` (`power_a = a`; small `a` puts most
//! queries near the pairs). Every other position holds a random token. Only the query positions
//! are scored, their target being the value bound to the key.
//!
//! Worked example, `vocab = 16, seq_len = 12, n_pairs = 2` (`T = seq_len = 12`):
//!
//! ```text
//! position  0  1  2  3  4  5  6  7  8  9 10 11
//! input     3 12  5  9  5  r  3  r  r  r  r  r     pairs (3→12, 5→9), queries 5 and 3; r random
//! target    .  .  .  .  9  . 12  .  .  .  .  .     the value of each query's key
//! mask      .  .  .  .  x  .  x  .  .  .  .  .
//! ```
//!
//! Baseline: without the context a value is a uniform guess among the `vocab − vocab/2`
//! values, cross-entropy `ln(vocab − vocab/2)`.

use rand::Rng;
use rand::seq::index::sample;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// `[task]` with `kind = "mqar"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqarConfig {
    /// Sequence length `T` (even).
    pub seq_len: usize,
    /// Key-value pairs, each queried once.
    pub n_pairs: usize,
    /// Tokens: keys are the lower half, values the upper half.
    pub vocab: usize,
    /// Exponent `a` of the power law placing the queries.
    pub power_a: f64,
}

impl Default for MqarConfig {
    /// Zoology's defaults but a vocabulary a CPU trains quickly (zoology uses 8192).
    fn default() -> Self {
        Self {
            seq_len: 64,
            n_pairs: 8,
            vocab: 256,
            power_a: 0.01,
        }
    }
}

impl MqarConfig {
    pub fn build(&self) -> Result<Mqar, TaskError> {
        if self.seq_len == 0 || !self.seq_len.is_multiple_of(2) {
            return invalid(
                "seq_len",
                format!("must be even and positive, got {}", self.seq_len),
            );
        }
        if self.n_pairs == 0 || 4 * self.n_pairs > self.seq_len {
            return invalid(
                "n_pairs",
                format!(
                    "{} pairs and their queries need 4·n_pairs ≤ seq_len = {}",
                    self.n_pairs, self.seq_len
                ),
            );
        }
        if self.vocab / 2 <= self.n_pairs {
            return invalid(
                "vocab",
                format!(
                    "{} tokens hold fewer than {} distinct keys",
                    self.vocab, self.n_pairs
                ),
            );
        }
        if !(self.power_a > 0.0 && self.power_a <= 1.0) {
            return invalid(
                "power_a",
                format!("must lie in (0, 1], got {}", self.power_a),
            );
        }
        Ok(Mqar {
            config: self.clone(),
        })
    }
}

#[derive(Clone, Debug)]
pub struct Mqar {
    config: MqarConfig,
}

impl Mqar {
    pub fn info(&self) -> TaskInfo {
        let c = &self.config;
        let values = c.vocab - c.vocab / 2;
        TaskInfo {
            kind: "mqar",
            input: Channel::Tokens { vocab: c.vocab },
            output: Channel::Tokens { vocab: c.vocab },
            seq_len: c.seq_len,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::Masked,
            baseline_loss: (values as f64).ln(),
            baseline_metric: 1.0 / values as f64,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let MqarConfig {
            seq_len,
            n_pairs,
            vocab,
            power_a,
        } = self.config;
        let half = vocab / 2;
        let keys: Vec<u32> = sample(rng, half - 1, n_pairs)
            .into_iter()
            .map(|k| k as u32 + 1)
            .collect();
        let values: Vec<u32> = sample(rng, vocab - half, n_pairs)
            .into_iter()
            .map(|v| (v + half) as u32)
            .collect();
        let context = 2 * n_pairs;
        let space = (seq_len - context) / 2;
        let mut weights: Vec<f64> = (1..=space)
            .map(|x| power_a * (x as f64).powf(power_a - 1.0))
            .collect();
        let mut tokens: Vec<Option<u32>> = vec![None; seq_len];
        let mut target = vec![0; seq_len];
        let mut mask = vec![false; seq_len];
        for (i, (&k, &v)) in keys.iter().zip(&values).enumerate() {
            tokens[2 * i] = Some(k);
            tokens[2 * i + 1] = Some(v);
        }
        // As in zoology, only the key is repeated: the token after a query is noise, and the
        // value is the query position's target.
        for (&k, &v) in keys.iter().zip(&values) {
            let at = context + 2 * draw(rng, &mut weights);
            tokens[at] = Some(k);
            target[at] = v;
            mask[at] = true;
        }
        let input = tokens
            .into_iter()
            .map(|t| t.unwrap_or_else(|| rng.random_range(0..vocab as u32)))
            .collect();
        Sample::tokens(input, target, mask)
    }
}

/// An index drawn with probability proportional to `weights`, which is then zeroed (sampling
/// without replacement, as `numpy.random.choice(replace=False, p=...)`).
fn draw(rng: &mut ChaCha8Rng, weights: &mut [f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    let mut pick = weights
        .iter()
        .rposition(|&w| w > 0.0)
        .expect("a slot is left");
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 && u < w {
            pick = i;
            break;
        }
        u -= w;
    }
    weights[pick] = 0.0;
    pick
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn every_query_asks_for_its_pairs_value() {
        let task = MqarConfig::default().build().unwrap();
        for seed in 0..100 {
            let s = task.sample(&mut crate::rng::stream(seed, 0));
            assert_eq!(s.input.len(), 64);
            let pairs: HashMap<u32, u32> = s.input.tokens()[..16]
                .chunks(2)
                .map(|kv| (kv[0], kv[1]))
                .collect();
            assert_eq!(pairs.len(), 8, "distinct keys");
            assert!(pairs.keys().all(|&k| (1..128).contains(&k)));
            assert!(pairs.values().all(|&v| (128..256).contains(&v)));
            let queries: Vec<usize> = (0..64).filter(|&i| s.mask[i]).collect();
            assert_eq!(queries.len(), 8);
            for &q in &queries {
                assert!(q >= 16 && (q - 16) % 2 == 0);
                assert_eq!(
                    s.target.tokens()[q],
                    pairs[&s.input.tokens()[q]],
                    "seed {seed} position {q}"
                );
            }
        }
    }

    /// With a small exponent most queries land near the pairs.
    #[test]
    fn queries_follow_the_power_law() {
        let task = MqarConfig::default().build().unwrap();
        let (mut near, mut far) = (0, 0);
        for seed in 0..200 {
            let s = task.sample(&mut crate::rng::stream(seed, 1));
            for i in (16..64).filter(|&i| s.mask[i]) {
                if i < 40 { near += 1 } else { far += 1 }
            }
        }
        assert!(near > far, "near {near}, far {far}");
    }

    #[test]
    fn impossible_settings_name_the_field() {
        let bad = |c: MqarConfig| c.build().unwrap_err().to_string();
        assert!(
            bad(MqarConfig {
                seq_len: 63,
                ..Default::default()
            })
            .starts_with("task.seq_len:")
        );
        assert!(
            bad(MqarConfig {
                n_pairs: 17,
                ..Default::default()
            })
            .starts_with("task.n_pairs:")
        );
        assert!(
            bad(MqarConfig {
                vocab: 16,
                ..Default::default()
            })
            .starts_with("task.vocab:")
        );
    }
}
