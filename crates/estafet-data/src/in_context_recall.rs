//! MAD's in-context recall family (Poli et al. 2024, "Mechanistic Design and Scaling of Hybrid
//! Architectures"; athms/mad-lab `mad/data/instances.py`), multi-query as in MAD's benchmark:
//! a stream of key-value pairs in which keys recur with the value they were first given; every
//! value of a key seen before is scored, and the sequence ends with a probe pair.
//!
//! - `fuzzy_in_context_recall`: keys and values span 1 to `k_motif_size` / `v_motif_size`
//!   adjacent tokens (ordered tuples of distinct tokens); held-out sequences present every key at
//!   the full `k_motif_size`, so the model must recall from the longest key form.
//! - `noisy_in_context_recall`: single-token keys and values, with a fraction `frac_noise` of the
//!   pair slots filled by noise tokens from a separate vocabulary of `noise_vocab_size`.
//!   MAD's plain in-context recall is this task with `frac_noise = 0`, `noise_vocab_size = 0`
//!   and `vocab = 16` (MAD generates it with the same function).
//!
//! Both follow MAD's fuzzy generator: one probe pair is placed at a random position (a key met
//! again later takes its value), pairs (or noise of the same size) are drawn until the next
//! would not fit, the probe pair ends the sequence, and the front is padded. The model reads
//! `x_0 … x_{T−1}` and predicts the next token at every position (MAD trains next-token
//! prediction everywhere, and so does the loss here); the metric scores only the positions
//! whose next token belongs to the value of a key presented before.
//!
//! Tokens, as MAD lays them out: the plain tokens split into keys (the lower half) and values
//! (the upper half), noise tokens follow them, then padding. Fuzzy recall reserves `vocab − 1`
//! for padding (`vocab − 1 − noise_vocab_size` plain tokens); MAD's noisy generator pads
//! nothing (`vocab − noise_vocab_size` plain tokens), and the one pad that a sequence of
//! `seq_len` positions and its final target need here is an extra token `vocab`. Worked
//! example, `noisy_in_context_recall` with `vocab = 8, noise_vocab_size = 2, frac_noise = 0.3,
//! seq_len = 10` (keys 0–2, values 3–5, noise 6–7, padding 8):
//!
//! ```text
//! position   0  1  2  3  4  5  6  7  8  9   (10)
//! input      8  0  4  6  7  1  5  0  4  1    5
//! target     0  4  6  7  1  5  0  4  1  5        the next token, everywhere
//! mask       .  .  .  .  .  .  .  x  .  x        values of keys met before: 0→4, the probe 1→5
//! ```
//!
//! Training draws from `train_examples` fixed sequences (MAD's training-set size, a difficulty
//! knob); held-out sequences are fresh. Baseline: a unigram model of the next token, measured
//! on 256 held-out sequences when the task is built (its accuracy at the scored positions is
//! that of always naming the most frequent value token).

use std::collections::HashMap;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::task::{
    Channel, LossPositions, Metric, Readout, Sample, Split, TaskError, TaskInfo, invalid,
};

/// `[task]` with `kind = "fuzzy_in_context_recall"` (MAD's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FuzzyRecallConfig {
    pub vocab: usize,
    pub seq_len: usize,
    /// Longest key, in tokens (keys span 1 to this many in training, this many held out).
    pub k_motif_size: usize,
    /// Longest value, in tokens.
    pub v_motif_size: usize,
    pub noise_vocab_size: usize,
    pub frac_noise: f64,
    /// Distinct training sequences.
    pub train_examples: usize,
}

impl Default for FuzzyRecallConfig {
    fn default() -> Self {
        Self {
            vocab: 16,
            seq_len: 128,
            k_motif_size: 3,
            v_motif_size: 3,
            noise_vocab_size: 0,
            frac_noise: 0.0,
            train_examples: 12_800,
        }
    }
}

/// `[task]` with `kind = "noisy_in_context_recall"` (MAD's defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoisyRecallConfig {
    pub vocab: usize,
    pub seq_len: usize,
    pub noise_vocab_size: usize,
    pub frac_noise: f64,
    pub train_examples: usize,
}

impl Default for NoisyRecallConfig {
    fn default() -> Self {
        Self {
            vocab: 32,
            seq_len: 128,
            noise_vocab_size: 16,
            frac_noise: 0.2,
            train_examples: 12_800,
        }
    }
}

impl FuzzyRecallConfig {
    pub fn build(&self) -> Result<Recall, TaskError> {
        Recall::new(
            "fuzzy_in_context_recall",
            Settings {
                vocab: self.vocab,
                seq_len: self.seq_len,
                k_motif: self.k_motif_size,
                v_motif: self.v_motif_size,
                noise_vocab: self.noise_vocab_size,
                frac_noise: self.frac_noise,
                train_examples: self.train_examples,
                pad_reserved: true,
            },
        )
    }
}

impl NoisyRecallConfig {
    pub fn build(&self) -> Result<Recall, TaskError> {
        Recall::new(
            "noisy_in_context_recall",
            Settings {
                vocab: self.vocab,
                seq_len: self.seq_len,
                k_motif: 1,
                v_motif: 1,
                noise_vocab: self.noise_vocab_size,
                frac_noise: self.frac_noise,
                train_examples: self.train_examples,
                pad_reserved: false,
            },
        )
    }
}

#[derive(Clone, Debug)]
struct Settings {
    vocab: usize,
    seq_len: usize,
    k_motif: usize,
    v_motif: usize,
    noise_vocab: usize,
    frac_noise: f64,
    train_examples: usize,
    /// Padding is `vocab − 1` (fuzzy, as MAD), else the extra token `vocab` (noisy).
    pad_reserved: bool,
}

type Motif = Vec<u32>;

#[derive(Clone, Debug)]
pub struct Recall {
    kind: &'static str,
    s: Settings,
    /// Keys by size (index = size − 1), values likewise: every ordered tuple of distinct tokens.
    keys: Vec<Vec<Motif>>,
    values: Vec<Vec<Motif>>,
    /// First value token and number of value tokens.
    value_tokens: (u32, usize),
    baseline: (f64, f64),
}

/// Every ordered tuple of `size` distinct tokens of `tokens`.
fn tuples(tokens: &[u32], size: usize) -> Vec<Motif> {
    if size == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for shorter in tuples(tokens, size - 1) {
        for &t in tokens {
            if !shorter.contains(&t) {
                let mut m = shorter.clone();
                m.push(t);
                out.push(m);
            }
        }
    }
    out
}

/// Held-out sequences the unigram baseline is measured on.
const BASELINE_SAMPLES: usize = 256;

impl Recall {
    fn new(kind: &'static str, s: Settings) -> Result<Self, TaskError> {
        if !(s.frac_noise >= 0.0 && s.frac_noise < 1.0) {
            return invalid(
                "frac_noise",
                format!("must lie in [0, 1), got {}", s.frac_noise),
            );
        }
        if s.frac_noise > 0.0 && s.noise_vocab == 0 {
            return invalid("noise_vocab_size", "must be positive when frac_noise is");
        }
        let plain = s
            .vocab
            .saturating_sub(s.pad_reserved as usize + s.noise_vocab);
        let (n_keys, n_values) = (plain / 2, plain - plain / 2);
        if s.k_motif == 0 || s.v_motif == 0 {
            return invalid("k_motif_size", "motif sizes must be at least 1");
        }
        if n_keys < s.k_motif.max(2) || n_values < s.v_motif {
            return invalid(
                "vocab",
                format!(
                    "{} tokens less padding and {} noise tokens leave {n_keys} key and {n_values} \
                     value tokens: too few for motifs of {} and {}",
                    s.vocab, s.noise_vocab, s.k_motif, s.v_motif
                ),
            );
        }
        let probe = 2 * (s.k_motif + s.v_motif);
        if s.seq_len < 2 * probe {
            return invalid(
                "seq_len",
                format!(
                    "must be at least {} for pairs of up to {probe} tokens",
                    2 * probe
                ),
            );
        }
        if s.train_examples == 0 {
            return invalid("train_examples", "must be at least 1");
        }
        let key_tokens: Vec<u32> = (0..n_keys as u32).collect();
        let value_tokens: Vec<u32> = (n_keys as u32..plain as u32).collect();
        let mut task = Self {
            kind,
            keys: (1..=s.k_motif).map(|n| tuples(&key_tokens, n)).collect(),
            values: (1..=s.v_motif).map(|n| tuples(&value_tokens, n)).collect(),
            value_tokens: (n_keys as u32, n_values),
            s,
            baseline: (0.0, 0.0),
        };
        task.baseline = task.unigram_baseline();
        Ok(task)
    }

    pub fn info(&self) -> TaskInfo {
        TaskInfo {
            kind: self.kind,
            input: Channel::Tokens {
                vocab: self.tokens(),
            },
            output: Channel::Tokens {
                vocab: self.tokens(),
            },
            seq_len: self.s.seq_len,
            metric: Metric::TokenAccuracy,
            loss_positions: LossPositions::All,
            baseline_loss: self.baseline.0,
            baseline_metric: self.baseline.1,
            solved_metric: 0.99,
            readout: Readout::PerPosition,
        }
    }

    /// Distinct training sequences (MAD's `num_train_examples`).
    pub fn train_examples(&self) -> usize {
        self.s.train_examples
    }

    fn pad(&self) -> u32 {
        self.tokens() as u32 - 1
    }

    /// Input and output vocabulary, padding included.
    fn tokens(&self) -> usize {
        self.s.vocab + !self.s.pad_reserved as usize
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng, split: Split) -> Sample {
        let s = &self.s;
        let t = s.seq_len;
        let noise_first = self.value_tokens.0 + self.value_tokens.1 as u32;
        // Held out, every key has the full motif size.
        let key_size = |rng: &mut ChaCha8Rng| match split {
            Split::Train => rng.random_range(1..=s.k_motif),
            Split::Valid => s.k_motif,
        };
        let pick = |rng: &mut ChaCha8Rng, set: &Vec<Vec<Motif>>, size: usize| -> Motif {
            set[size - 1][rng.random_range(0..set[size - 1].len())].clone()
        };
        let kp_size = key_size(rng);
        let vp_size = rng.random_range(1..=s.v_motif);
        let k_probe = pick(rng, &self.keys, kp_size);
        let v_probe = pick(rng, &self.values, vp_size);
        let probe_len = kp_size + vp_size;
        let probe_at = rng.random_range(0..t - 2 * probe_len);

        // (token, scored) pairs: `scored` marks value tokens of keys presented before.
        let mut tokens: Vec<(u32, bool)> = Vec::with_capacity(t + 1);
        let mut map: HashMap<Motif, Motif> = HashMap::new();
        let mut probe_added = false;
        while tokens.len() < t - probe_len - (s.k_motif + s.v_motif) {
            let k_size = key_size(rng);
            let v_size = rng.random_range(1..=s.v_motif);
            if tokens.len() >= probe_at && !probe_added {
                let seen = map.contains_key(&k_probe);
                tokens.extend(k_probe.iter().map(|&k| (k, false)));
                tokens.extend(v_probe.iter().map(|&v| (v, seen)));
                map.insert(k_probe.clone(), v_probe.clone());
                probe_added = true;
                continue;
            }
            if s.frac_noise > 0.0 && rng.random::<f64>() < s.frac_noise {
                for _ in 0..k_size + v_size {
                    let n = noise_first + rng.random_range(0..s.noise_vocab as u32);
                    tokens.push((n, false));
                }
                continue;
            }
            let key = pick(rng, &self.keys, k_size);
            let value = if key == k_probe {
                probe_added = true;
                v_probe.clone()
            } else {
                match map.get(&key) {
                    Some(v) => v.clone(),
                    None => pick(rng, &self.values, v_size),
                }
            };
            let seen = map.contains_key(&key);
            tokens.extend(key.iter().map(|&k| (k, false)));
            tokens.extend(value.iter().map(|&v| (v, seen)));
            map.insert(key, value);
        }
        tokens.extend(k_probe.iter().map(|&k| (k, false)));
        tokens.extend(v_probe.iter().map(|&v| (v, true)));
        let mut padded = vec![(self.pad(), false); (t + 1).saturating_sub(tokens.len())];
        padded.extend(tokens);

        let input = padded[..t].iter().map(|&(x, _)| x).collect();
        let target = padded[1..].iter().map(|&(x, _)| x).collect();
        let mask = padded[1..].iter().map(|&(_, scored)| scored).collect();
        Sample::tokens(input, target, mask)
    }

    /// (cross-entropy of the targets' unigram over every position, its accuracy at the scored
    /// positions).
    fn unigram_baseline(&self) -> (f64, f64) {
        let mut rng = crate::rng::stream(0, crate::rng::EVAL_STREAM);
        let mut counts = vec![0usize; self.tokens()];
        let mut samples = Vec::with_capacity(BASELINE_SAMPLES);
        for _ in 0..BASELINE_SAMPLES {
            let s = self.sample(&mut rng, Split::Valid);
            for &x in s.target.tokens() {
                counts[x as usize] += 1;
            }
            samples.push(s);
        }
        let entropy = crate::task::entropy_of_counts(&counts);
        let (first, n) = self.value_tokens;
        let guess = (first..first + n as u32)
            .max_by_key(|&v| counts[v as usize])
            .expect("at least one value token");
        let (mut right, mut scored) = (0usize, 0usize);
        for s in &samples {
            for (x, &m) in s.target.tokens().iter().zip(&s.mask) {
                if m {
                    scored += 1;
                    right += (*x == guess) as usize;
                }
            }
        }
        (entropy, right as f64 / scored.max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::stream;

    /// An independent solver: read the sequence left to right, remember each key's value, and
    /// predict it where the key recurs. For single-token motifs this is exact: every scored
    /// target is the value of the token before it.
    #[test]
    fn scored_targets_are_the_values_of_earlier_keys() {
        let task = NoisyRecallConfig::default().build().unwrap();
        let info = task.info();
        assert_eq!(info.seq_len, 128);
        // MAD's layout: keys 0–7, values 8–15, noise 16–31; the pad is an extra token.
        assert_eq!((task.value_tokens, task.pad()), ((8, 8), 32));
        for seed in 0..20 {
            let s = task.sample(&mut stream(seed, 0), Split::Train);
            let (x, y) = (s.input.tokens(), s.target.tokens());
            assert_eq!(x.len(), 128);
            assert_eq!(&x[1..], &y[..127], "the target is the next token");
            let mut memory: HashMap<u32, u32> = HashMap::new();
            let (keys, values) = (0..8u32, 8..16u32);
            let mut scored = 0;
            for t in 0..128 {
                let next = y[t];
                if values.contains(&next) && keys.contains(&x[t]) {
                    match memory.get(&x[t]) {
                        Some(&v) => {
                            assert!(s.mask[t], "seed {seed} t {t}: a recurring key is scored");
                            assert_eq!(next, v, "seed {seed} t {t}: its first value");
                            scored += 1;
                        }
                        None => assert!(!s.mask[t] || t == 127, "seed {seed} t {t}"),
                    }
                    memory.insert(x[t], next);
                } else {
                    assert!(!s.mask[t], "only values are scored");
                }
            }
            assert!(s.mask[127], "the final probe value is scored");
            assert!(scored >= 10, "multi-query: many recurring keys ({scored})");
            // Noise tokens come from their own vocabulary, about frac_noise of the slots.
            let noise = x.iter().filter(|&&t| (16..32).contains(&t)).count();
            assert!((10..60).contains(&noise), "{noise}");
        }
    }

    #[test]
    fn fuzzy_keys_span_several_tokens_and_are_full_size_held_out() {
        let task = FuzzyRecallConfig::default().build().unwrap();
        assert_eq!(task.keys[2].len(), 7 * 6 * 5);
        for split in [Split::Train, Split::Valid] {
            let s = task.sample(&mut stream(1, 0), split);
            let (x, y) = (s.input.tokens(), s.target.tokens());
            assert_eq!(&x[1..], &y[..127]);
            // Runs of key tokens (0..7) between values (7..15): all of length 3 held out.
            let mut runs = Vec::new();
            let mut run = 0;
            for &t in x.iter().chain(&[y[127]]) {
                if t < 7 {
                    run += 1;
                } else if run > 0 {
                    runs.push(run);
                    run = 0;
                }
            }
            match split {
                Split::Valid => assert!(runs.iter().all(|&r| r == 3), "{runs:?}"),
                Split::Train => assert!(runs.iter().any(|&r| r < 3), "{runs:?}"),
            }
            assert!(s.mask[127], "the probe value closes every sequence");
            // Every scored value token is a value token.
            for (t, &m) in s.mask.iter().enumerate() {
                if m {
                    assert!((7..15).contains(&y[t]), "t {t}");
                }
            }
        }
    }

    /// An independent solver for multi-token motifs: key tokens (0–6) and value tokens (7–14)
    /// do not overlap, so maximal runs split the sequence into key-value pairs; a key met
    /// again must bring back its first value, and exactly those value tokens are scored.
    #[test]
    fn fuzzy_recall_is_solved_by_remembering_each_key_as_a_run() {
        let task = FuzzyRecallConfig::default().build().unwrap();
        for split in [Split::Train, Split::Valid] {
            for seed in 0..20 {
                let s = task.sample(&mut stream(seed, 0), split);
                let (x, y) = (s.input.tokens(), s.target.tokens());
                // The whole sequence x_0 … x_T, and which of its positions a target scores.
                let mut all = x.to_vec();
                all.push(y[127]);
                let scored: Vec<bool> = std::iter::once(false).chain(s.mask.clone()).collect();
                let is_key = |t: u32| t < 7;
                let mut memory: HashMap<Vec<u32>, Vec<u32>> = HashMap::new();
                let mut i = all.iter().position(|&t| t != 15).unwrap();
                assert!(all[..i].iter().all(|&t| t == 15), "padding only in front");
                let mut expected = vec![false; 129];
                while i < all.len() {
                    let k_end = i + all[i..].iter().take_while(|&&t| is_key(t)).count();
                    let v_end = k_end + all[k_end..].iter().take_while(|&&t| !is_key(t)).count();
                    let (key, value) = (all[i..k_end].to_vec(), all[k_end..v_end].to_vec());
                    assert!(!key.is_empty() && !value.is_empty(), "seed {seed}: pairs");
                    assert!(key.len() <= 3 && value.len() <= 3);
                    if split == Split::Valid {
                        assert_eq!(key.len(), 3);
                    }
                    match memory.get(&key) {
                        Some(v) => {
                            assert_eq!(&value, v, "seed {seed}: a key keeps its value");
                            expected[k_end..v_end].iter_mut().for_each(|e| *e = true);
                        }
                        None => {
                            memory.insert(key, value);
                        }
                    }
                    i = v_end;
                }
                assert_eq!(scored, expected, "seed {seed} {split:?}");
            }
        }
    }

    #[test]
    fn the_worked_example_is_a_valid_instance_and_settings_are_checked() {
        let task = NoisyRecallConfig {
            vocab: 8,
            seq_len: 10,
            noise_vocab_size: 2,
            frac_noise: 0.3,
            train_examples: 1,
        }
        .build()
        .unwrap();
        assert_eq!(task.value_tokens, (3, 3));
        assert_eq!(task.pad(), 8);
        let info = task.info();
        assert!(info.baseline_metric < 0.7, "{info:?}");
        for (field, bad) in [
            (
                "frac_noise",
                NoisyRecallConfig {
                    frac_noise: 1.0,
                    ..Default::default()
                },
            ),
            (
                "noise_vocab_size",
                NoisyRecallConfig {
                    noise_vocab_size: 0,
                    ..Default::default()
                },
            ),
            (
                "vocab",
                NoisyRecallConfig {
                    vocab: 18,
                    ..Default::default()
                },
            ),
            (
                "seq_len",
                NoisyRecallConfig {
                    seq_len: 6,
                    ..Default::default()
                },
            ),
        ] {
            assert_eq!(bad.build().unwrap_err().field, field);
        }
    }
}
