//! Memorization (MAD; Poli et al. 2024, after athms/mad-lab): one fixed key-value map, the
//! same for every sequence, learned across training rather than read in context. A sequence
//! alternates a key and an insert token; at each insert token the model must produce the
//! value the map binds to the key just before. It measures how much a layer stores in its
//! weights (MAD varies `vocab` from 256 to 8192), not what its state carries.
//!
//! Tokens: `vocab − 1` is the insert token; of the rest, the lower half are keys and the upper
//! half values. The map pairs every key with a distinct value, both shuffled by `map_seed`
//! (MAD's `kv_map_seed`, 12345); with an even number of plain tokens one value is left over.
//! Worked example, `vocab = 8, seq_len = 6` (keys 0–2, values 3–6, insert 7; say the map is
//! 0→5, 1→3, 2→6):
//!
//! ```text
//! position   0  1  2  3  4  5
//! input      2  7  0  7  2  7
//! target     .  6  .  5  .  6
//! mask       .  x  .  x  .  x
//! ```
//!
//! Training draws from `train_examples` fixed sequences (MAD: 256); held-out sequences are
//! fresh draws over the same map. Baseline: without the key, a uniform guess among the map's
//! values: cross-entropy `ln(keys)`, accuracy `1/keys`.

use rand::Rng;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{Channel, LossPositions, Metric, Readout, Sample, TaskError, TaskInfo, invalid};

/// `[task]` with `kind = "memorization"` (MAD's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemorizationConfig {
    pub vocab: usize,
    /// Positions: `seq_len / 2` keys, each followed by the insert token (even).
    pub seq_len: usize,
    /// Distinct training sequences.
    pub train_examples: usize,
    /// Seeds the key-value map (fixed across runs, as MAD's).
    pub map_seed: u64,
}

impl Default for MemorizationConfig {
    fn default() -> Self {
        Self {
            vocab: 256,
            seq_len: 32,
            train_examples: 256,
            map_seed: 12345,
        }
    }
}

impl MemorizationConfig {
    pub fn build(&self) -> Result<Memorization, TaskError> {
        if self.vocab < 3 {
            return invalid("vocab", format!("must be at least 3, got {}", self.vocab));
        }
        if self.seq_len == 0 || !self.seq_len.is_multiple_of(2) {
            return invalid(
                "seq_len",
                format!("must be even and positive, got {}", self.seq_len),
            );
        }
        if self.train_examples == 0 {
            return invalid("train_examples", "must be at least 1");
        }
        let plain = self.vocab as u32 - 1;
        let mut keys: Vec<u32> = (0..plain / 2).collect();
        let mut values: Vec<u32> = (plain / 2..plain).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.map_seed);
        keys.shuffle(&mut rng);
        values.shuffle(&mut rng);
        let mut map = vec![0; keys.len()];
        for (&k, &v) in keys.iter().zip(&values) {
            map[k as usize] = v;
        }
        Ok(Memorization {
            config: self.clone(),
            map,
        })
    }
}

#[derive(Clone, Debug)]
pub struct Memorization {
    config: MemorizationConfig,
    /// `map[key]`: its value.
    map: Vec<u32>,
}

impl Memorization {
    pub fn info(&self) -> TaskInfo {
        let keys = self.map.len() as f64;
        TaskInfo {
            kind: "memorization",
            input: Channel::Tokens {
                vocab: self.config.vocab,
            },
            output: Channel::Tokens {
                vocab: self.config.vocab,
            },
            seq_len: self.config.seq_len,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::Masked,
            baseline_loss: keys.ln(),
            baseline_metric: 1.0 / keys,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    /// Distinct training sequences (MAD's `num_train_examples`).
    pub fn train_examples(&self) -> usize {
        self.config.train_examples
    }

    /// The value bound to `key`.
    pub fn value(&self, key: u32) -> u32 {
        self.map[key as usize]
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        let insert = self.config.vocab as u32 - 1;
        let (mut input, mut target, mut mask) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.config.seq_len / 2 {
            let key = rng.random_range(0..self.map.len() as u32);
            input.extend([key, insert]);
            target.extend([0, self.map[key as usize]]);
            mask.extend([false, true]);
        }
        Sample::tokens(input, target, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_insert_token_asks_for_the_fixed_value_of_its_key() {
        let task = MemorizationConfig::default().build().unwrap();
        assert_eq!(task.map.len(), 127);
        // A bijection from keys onto distinct values of the upper half.
        let mut values = task.map.clone();
        values.sort();
        values.dedup();
        assert_eq!(values.len(), 127);
        assert!(values.iter().all(|&v| (127..255).contains(&v)));
        let other = MemorizationConfig::default().build().unwrap();
        assert_eq!(task.map, other.map, "the map depends on map_seed alone");
        for seed in 0..5 {
            let s = task.sample(&mut crate::rng::stream(seed, 0));
            let (x, y) = (s.input.tokens(), s.target.tokens());
            for t in 0..32 {
                if t % 2 == 1 {
                    assert_eq!(x[t], 255);
                    assert!(s.mask[t]);
                    assert_eq!(y[t], task.value(x[t - 1]));
                } else {
                    assert!(x[t] < 127 && !s.mask[t]);
                }
            }
        }
        let shuffled = MemorizationConfig {
            map_seed: 1,
            ..MemorizationConfig::default()
        };
        assert_ne!(shuffled.build().unwrap().map, task.map);
        let odd = MemorizationConfig {
            seq_len: 7,
            ..MemorizationConfig::default()
        };
        assert_eq!(odd.build().unwrap_err().field, "seq_len");
    }
}
