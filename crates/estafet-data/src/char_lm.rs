//! Character-level language modelling: predict each next character of a UTF-8 text. The text
//! is a file the user names, or, by default, the short corpus written for estafet and shipped
//! in the repository (`crates/estafet-data/corpus/relay.txt`, prose about relay races and
//! recurrent networks), so that nothing is downloaded.
//!
//! The first `1 − valid_fraction` of the text trains and the rest validates (a split by
//! position, so no validation sentence is seen in training). A sample is a window of
//! `seq_len + 1` characters at a random offset inside one split: the first `seq_len` are the
//! input, the last `seq_len` the target. The vocabulary is every character of the whole file,
//! in code-point order.
//!
//! Worked example, text `"the relay"`, `seq_len = 4`, a window at offset 2:
//!
//! ```text
//! input     e _ r e       (_ a space; ids index the sorted vocabulary " aehlrty")
//! target    _ r e l
//! mask      x x x x       every position is scored
//! ```
//!
//! Metric: bits per character on the validation split. Baseline: a unigram model of the
//! training split (add-one smoothed) scored on the validation split. Solved at `solved_bpc`.

use std::path::PathBuf;
use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::stream::Streams;
use crate::task::{
    Channel, LossPositions, Metric, Readout, Sample, Split, TaskError, TaskInfo, invalid,
};

/// The corpus used when `path` is unset.
pub const EMBEDDED_CORPUS: &str = include_str!("../corpus/relay.txt");

/// `[task]` with `kind = "char_lm"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CharLmConfig {
    /// A UTF-8 text file (relative to the working directory); unset: the embedded corpus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Characters of context per sample.
    pub seq_len: usize,
    /// Fraction of the text, at its end, held out for validation.
    pub valid_fraction: f64,
    /// Validation bits per character at or below which the task counts as solved.
    pub solved_bpc: f64,
}

impl Default for CharLmConfig {
    fn default() -> Self {
        Self {
            path: None,
            seq_len: 128,
            valid_fraction: 0.1,
            // Around 2 bits per character a small model's samples turn into recognisable words.
            solved_bpc: 2.0,
        }
    }
}

impl CharLmConfig {
    pub fn build(&self) -> Result<CharLm, TaskError> {
        let text = match &self.path {
            None => EMBEDDED_CORPUS.to_owned(),
            Some(path) => {
                let bytes = std::fs::read(path)
                    .or_else(|e| invalid("path", format!("cannot read {}: {e}", path.display())))?;
                String::from_utf8(bytes).or_else(|e| {
                    invalid(
                        "path",
                        format!(
                            "{} is not UTF-8 text (byte {})",
                            path.display(),
                            e.utf8_error().valid_up_to()
                        ),
                    )
                })?
            }
        };
        if self.seq_len == 0 {
            return invalid("seq_len", "must be at least 1");
        }
        if !(self.valid_fraction > 0.0 && self.valid_fraction < 1.0) {
            return invalid("valid_fraction", "must lie strictly between 0 and 1");
        }
        if self.solved_bpc.is_nan() || self.solved_bpc <= 0.0 {
            return invalid("solved_bpc", "must be positive");
        }
        let mut vocab: Vec<char> = text.chars().collect();
        vocab.sort_unstable();
        vocab.dedup();
        let ids: Vec<u32> = text
            .chars()
            .map(|c| {
                vocab
                    .binary_search(&c)
                    .expect("every character is in the vocabulary") as u32
            })
            .collect();
        let n = ids.len();
        let split = ((1.0 - self.valid_fraction) * n as f64).round() as usize;
        let window = self.seq_len + 1;
        if split < window || n - split < window {
            return invalid(
                "seq_len",
                format!(
                    "windows of {window} characters do not fit both splits of a {n}-character text \
                     ({split} train, {} validation)",
                    n - split
                ),
            );
        }
        let baseline = unigram_cross_entropy(&ids[..split], &ids[split..], vocab.len());
        Ok(CharLm {
            config: self.clone(),
            ids: ids.into(),
            vocab: vocab.into(),
            split,
            baseline,
        })
    }
}

/// Cross-entropy (nats per character) of `eval` under the add-one smoothed unigram model of
/// `train`.
fn unigram_cross_entropy(train: &[u32], eval: &[u32], vocab: usize) -> f64 {
    let mut counts = vec![1.0f64; vocab];
    for &c in train {
        counts[c as usize] += 1.0;
    }
    let total: f64 = counts.iter().sum();
    -eval
        .iter()
        .map(|&c| (counts[c as usize] / total).ln())
        .sum::<f64>()
        / eval.len() as f64
}

#[derive(Clone, Debug)]
pub struct CharLm {
    config: CharLmConfig,
    ids: Arc<[u32]>,
    vocab: Arc<[char]>,
    /// Index of the first validation character.
    split: usize,
    baseline: f64,
}

impl CharLm {
    pub fn info(&self) -> TaskInfo {
        let vocab = self.vocab.len();
        TaskInfo {
            kind: "char_lm",
            input: Channel::Tokens { vocab },
            output: Channel::Tokens { vocab },
            seq_len: self.config.seq_len,
            metric: Metric::BitsPerChar,
            loss_positions: LossPositions::All,
            baseline_loss: self.baseline,
            baseline_metric: self.baseline / std::f64::consts::LN_2,
            solved_metric: self.config.solved_bpc,
            readout: Readout::PerPosition,
        }
    }

    /// The characters the token ids index.
    pub fn vocab(&self) -> &[char] {
        &self.vocab
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng, split: Split) -> Sample {
        let (lo, hi) = self.range(split);
        self.window_at(rng.random_range(lo..=hi - (self.config.seq_len + 1)))
    }

    /// `count` parallel streams through `split` ([`Streams`]).
    pub fn streams(&self, split: Split, count: usize) -> Result<Streams, String> {
        let (lo, hi) = self.range(split);
        Streams::new(lo, hi, count, self.config.seq_len, 1)
    }

    /// The window whose first input is character `start`.
    pub fn window_at(&self, start: usize) -> Sample {
        let window = self.config.seq_len + 1;
        let w = &self.ids[start..start + window];
        Sample::tokens(
            w[..window - 1].to_vec(),
            w[1..].to_vec(),
            vec![true; window - 1],
        )
    }

    fn range(&self, split: Split) -> (usize, usize) {
        match split {
            Split::Train => (0, self.split),
            Split::Valid => (self.split, self.ids.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::stream;
    use crate::stream::Window;

    fn file(text: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text).unwrap();
        f
    }

    fn config(path: &std::path::Path, seq_len: usize) -> CharLmConfig {
        CharLmConfig {
            path: Some(path.into()),
            seq_len,
            ..CharLmConfig::default()
        }
    }

    #[test]
    fn targets_are_the_next_characters_of_the_text() {
        let text = "the relay: each runner whispers to the next. ".repeat(20);
        let f = file(text.as_bytes());
        let task = config(f.path(), 16).build().unwrap();
        let decode =
            |ids: &[u32]| -> String { ids.iter().map(|&i| task.vocab()[i as usize]).collect() };
        let split_char = task.split;
        for (split, range) in [
            (Split::Train, 0..split_char),
            (Split::Valid, split_char..text.len()),
        ] {
            for seed in 0..10 {
                let s = task.sample(&mut stream(seed, 0), split);
                let input = decode(s.input.tokens());
                let target = decode(s.target.tokens());
                // An independent solver: find the window in the text and read on by one.
                let at = (range.start..range.end - 16)
                    .find(|&i| text[i..i + 16] == input && text[i + 1..i + 17] == target);
                assert!(at.is_some(), "{split:?} {input:?} → {target:?}");
                assert!(s.mask.iter().all(|&m| m));
            }
        }
    }

    /// Streams read each part of a split in order: a stream's windows, joined, are one stretch
    /// of the text, and each window's last target is the next window's first input.
    #[test]
    fn streams_read_contiguous_stretches_of_each_split() {
        let text: String = (0..600)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        let f = file(text.as_bytes());
        let task = config(f.path(), 5).build().unwrap();
        let decode =
            |ids: &[u32]| -> String { ids.iter().map(|&i| task.vocab()[i as usize]).collect() };
        for split in [Split::Train, Split::Valid] {
            let streams = task.streams(split, 3).unwrap();
            let (lo, hi) = task.range(split);
            assert_eq!(streams.windows(), ((hi - lo) / 3 - 1) / 5);
            for b in 0..3 {
                let windows: Vec<Sample> = (0..streams.windows())
                    .map(|index| task.window_at(streams.start(b, Window { pass: 0, index })))
                    .collect();
                let joined: String = windows.iter().map(|w| decode(w.input.tokens())).collect();
                let from = lo + b * ((hi - lo) / 3);
                assert_eq!(
                    joined,
                    text[from..from + joined.len()],
                    "{split:?} stream {b}"
                );
                for pair in windows.windows(2) {
                    assert_eq!(
                        pair[0].target.tokens().last(),
                        pair[1].input.tokens().first()
                    );
                }
            }
        }
        let e = task.streams(Split::Valid, 40).unwrap_err();
        assert!(e.contains("fewer than one window of 6"), "{e}");
    }

    #[test]
    fn vocabulary_is_sorted_and_covers_multibyte_characters() {
        let f = file("ça va, déjà vu — ünïcödé ".repeat(10).as_bytes());
        let task = config(f.path(), 8).build().unwrap();
        assert!(task.vocab().windows(2).all(|w| w[0] < w[1]));
        assert!(task.vocab().contains(&'—'));
    }

    #[test]
    fn baseline_is_the_unigram_cross_entropy() {
        // Train "aaab" ×, validation "ab": p(a) = (3k+1)/(4k+2), p(b) = (k+1)/(4k+2).
        let p = unigram_cross_entropy(&[0, 0, 0, 1], &[0, 1], 2);
        let expected = -((4.0f64 / 6.0).ln() + (2.0f64 / 6.0).ln()) / 2.0;
        assert!((p - expected).abs() < 1e-12);
        let task = CharLmConfig::default().build().unwrap();
        let info = task.info();
        assert!(
            info.baseline_metric > 3.0 && info.baseline_metric < 5.0,
            "{info:?}"
        );
    }

    #[test]
    fn impossible_settings_name_the_field() {
        let f = file(b"short text");
        assert_eq!(config(f.path(), 8).build().unwrap_err().field, "seq_len");
        assert_eq!(config(f.path(), 0).build().unwrap_err().field, "seq_len");
        let missing = config(std::path::Path::new("/no/such/file.txt"), 8)
            .build()
            .unwrap_err();
        assert_eq!(missing.field, "path");
        assert!(missing.message.contains("/no/such/file.txt"));
        let latin1 = file(b"caf\xe9 ".repeat(100).as_slice());
        let e = config(latin1.path(), 8).build().unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{e}");
        // The smallest legal window: one input character, in a two-split text.
        let tiny = file(b"abcdefghijklmnopqrst");
        let task = config(tiny.path(), 1).build().unwrap();
        assert_eq!(task.sample(&mut stream(0, 0), Split::Valid).input.len(), 1);
    }
}
