use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::stream::{Streams, Window};
use serde::{Deserialize, Serialize};

use crate::adding::{Adding, AddingConfig};
use crate::char_lm::{CharLm, CharLmConfig};
use crate::compression::{Compression, CompressionConfig};
use crate::copy_memory::{CopyMemory, CopyMemoryConfig};
use crate::in_context_recall::{FuzzyRecallConfig, NoisyRecallConfig, Recall};
use crate::induction_heads::{InductionHeads, InductionHeadsConfig};
use crate::memorization::{Memorization, MemorizationConfig};
use crate::modular_arithmetic::{ModularArithmetic, ModularArithmeticConfig};
use crate::mqar::{Mqar, MqarConfig};
use crate::parity::{Parity, ParityConfig};
use crate::selective_copying::{SelectiveCopying, SelectiveCopyingConfig};
use crate::time_series::{TimeSeries, TimeSeriesConfig};
use crate::word_problem::{WordProblem, WordProblemConfig};

/// The generator behind every task: ChaCha8 from `seed`, on its own `stream` so that training
/// batches (`stream = step`), the evaluation set ([`rng::EVAL_STREAM`]) and the test set
/// ([`rng::TEST_STREAM`]) never overlap.
pub mod rng {
    use super::*;

    pub const EVAL_STREAM: u64 = u64::MAX;
    pub const TEST_STREAM: u64 = u64::MAX - 1;
    /// Streams from here on hold the fixed training sets (a run takes fewer steps than this).
    pub const POOL_STREAM: u64 = 1 << 62;

    pub fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        rng
    }
}

macro_rules! tasks {
    ($($variant:ident($config:ty) = $kind:literal,)*) => {
        /// `[task]` in a config, selected by `kind`; each task's file owns its config and
        /// defaults. The list below names each task once: this enum, [`TaskConfig::KINDS`],
        /// [`TaskConfig::defaults`] (what the tests iterate), `kind` and `build` are generated
        /// from it, so a new task cannot be left out of them.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind", deny_unknown_fields)]
        pub enum TaskConfig {
            $(#[serde(rename = $kind)] $variant($config),)*
        }

        impl TaskConfig {
            /// Every task kind, as written in configs.
            pub const KINDS: &[&str] = &[$($kind),*];

            /// Every task with its default parameters, in the order `estafet list tasks`
            /// prints them.
            pub fn defaults() -> Vec<TaskConfig> {
                vec![$(TaskConfig::$variant(<$config>::default()),)*]
            }

            pub fn kind(&self) -> &'static str {
                match self {
                    $(TaskConfig::$variant(_) => $kind,)*
                }
            }

            pub fn build(&self) -> Result<Task, TaskError> {
                match self {
                    $(TaskConfig::$variant(c) => c.build().map(Task::$variant),)*
                }
            }
        }
    };
}

tasks! {
    CopyMemory(CopyMemoryConfig) = "copy_memory",
    Adding(AddingConfig) = "adding",
    SelectiveCopying(SelectiveCopyingConfig) = "selective_copying",
    Mqar(MqarConfig) = "mqar",
    InductionHeads(InductionHeadsConfig) = "induction_heads",
    Parity(ParityConfig) = "parity",
    WordProblem(WordProblemConfig) = "word_problem",
    ModularArithmetic(ModularArithmeticConfig) = "modular_arithmetic",
    FuzzyInContextRecall(FuzzyRecallConfig) = "fuzzy_in_context_recall",
    NoisyInContextRecall(NoisyRecallConfig) = "noisy_in_context_recall",
    Memorization(MemorizationConfig) = "memorization",
    Compression(CompressionConfig) = "compression",
    CharLm(CharLmConfig) = "char_lm",
    TimeSeries(TimeSeriesConfig) = "time_series",
}

/// A setting no generator can honour; names the field.
#[derive(Debug, thiserror::Error)]
#[error("task.{field}: {message}")]
pub struct TaskError {
    pub field: &'static str,
    pub message: String,
}

/// The entropy (nats) of the empirical distribution that `counts` describe: the cross-entropy
/// of always predicting it, the baseline of the tasks that measure theirs by counting.
pub(crate) fn entropy_of_counts(counts: &[usize]) -> f64 {
    let total = counts.iter().sum::<usize>() as f64;
    -counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| c as f64 / total * (c as f64 / total).ln())
        .sum::<f64>()
}

/// `Err` naming `task.field`: how every generator refuses an impossible setting.
pub(crate) fn invalid<T>(field: &'static str, message: impl Into<String>) -> Result<T, TaskError> {
    Err(TaskError {
        field,
        message: message.into(),
    })
}

impl TaskConfig {
    /// The same task with samples of `seq_len` positions, for length generalisation: the
    /// parameter that sets the length changes (copy memory: the lag), every other one stays.
    pub fn with_seq_len(&self, seq_len: usize) -> Result<TaskConfig, TaskError> {
        let mut config = self.clone();
        match &mut config {
            TaskConfig::CopyMemory(c) => {
                let fixed = 2 * c.n_symbols;
                if seq_len <= fixed {
                    return invalid(
                        "lag",
                        format!("a length of {seq_len} leaves no lag after 2·n_symbols = {fixed}"),
                    );
                }
                c.lag = seq_len - fixed;
            }
            TaskConfig::Adding(c) => c.seq_len = seq_len,
            TaskConfig::SelectiveCopying(c) => {
                if seq_len <= c.n_tokens {
                    return invalid(
                        "seq_len",
                        format!(
                            "a length of {seq_len} leaves no room before the {} recalls",
                            c.n_tokens
                        ),
                    );
                }
                c.seq_len = seq_len - c.n_tokens;
            }
            TaskConfig::Mqar(c) => c.seq_len = seq_len,
            TaskConfig::InductionHeads(c) => c.seq_len = seq_len,
            TaskConfig::Parity(c) => c.seq_len = seq_len,
            TaskConfig::WordProblem(c) => c.seq_len = seq_len,
            TaskConfig::ModularArithmetic(c) => c.seq_len = seq_len,
            TaskConfig::FuzzyInContextRecall(c) => c.seq_len = seq_len,
            TaskConfig::NoisyInContextRecall(c) => c.seq_len = seq_len,
            TaskConfig::Memorization(c) => c.seq_len = seq_len,
            TaskConfig::Compression(c) => c.seq_len = seq_len,
            TaskConfig::CharLm(c) => c.seq_len = seq_len,
            TaskConfig::TimeSeries(c) => c.seq_len = seq_len,
        }
        config.build()?;
        Ok(config)
    }
}

/// How a task scores a prediction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fraction of scored positions whose arg-max prediction is the target.
    TokenAccuracy,
    /// Mean squared error over scored positions and target dimensions.
    Mse,
    /// Mean cross-entropy over scored positions, in bits.
    BitsPerChar,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::TokenAccuracy => "accuracy",
            Metric::Mse => "mse",
            Metric::BitsPerChar => "bpc",
        }
    }

    pub fn higher_is_better(self) -> bool {
        self == Metric::TokenAccuracy
    }

    /// Whether `value` reaches the `solved` level.
    pub fn reaches(self, value: f64, solved: f64) -> bool {
        if self.higher_is_better() {
            value >= solved
        } else {
            value <= solved
        }
    }
}

/// Which positions the training loss averages over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossPositions {
    /// Every position (the copy task's convention, which its baseline assumes).
    All,
    /// Only the masked positions.
    Masked,
}

/// What one position of an input or a target holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Channel {
    /// A token id in `0..vocab` (as a target: one of `vocab` classes, scored by cross-entropy).
    Tokens { vocab: usize },
    /// `width` real numbers (as a target: scored by squared error).
    Reals { width: usize },
}

impl Channel {
    /// Vocabulary or width: the model's input or output size.
    pub fn size(self) -> usize {
        match self {
            Channel::Tokens { vocab } => vocab,
            Channel::Reals { width } => width,
        }
    }
}

impl std::fmt::Display for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Channel::Tokens { vocab } => write!(f, "tokens of {vocab}"),
            Channel::Reals { width } => write!(f, "{width} real(s)"),
        }
    }
}

/// What a task asks and how it is judged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskInfo {
    pub kind: &'static str,
    pub input: Channel,
    pub output: Channel,
    /// Sequence length `T` of every sample.
    pub seq_len: usize,
    pub metric: Metric,
    pub loss_positions: LossPositions,
    /// Loss (cross-entropy in nats, or squared error) of the best predictor that ignores the
    /// past: chance, the memoryless level, a unigram model, or persistence.
    pub baseline_loss: f64,
    /// The metric of that predictor.
    pub baseline_metric: f64,
    /// The metric at which the task counts as solved (at or above it for accuracy, at or
    /// below it for errors and bits).
    pub solved_metric: f64,
    /// How the model must read its outputs.
    pub readout: Readout,
}

/// How a task wants the model's outputs read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Readout {
    /// Each position's output from what the model has read so far (every causal task).
    PerPosition,
    /// Every position's output from the last position's vector alone, a bottleneck
    /// (MAD's compression task, which MAD runs through an autoencoder).
    Bottleneck,
}

/// A sequence of `T` positions.
#[derive(Clone, Debug, PartialEq)]
pub enum Seq {
    Tokens(Vec<u32>),
    /// `values` holds `[T, width]` row-major.
    Reals {
        width: usize,
        values: Vec<f32>,
    },
}

impl Seq {
    pub fn len(&self) -> usize {
        match self {
            Seq::Tokens(v) => v.len(),
            Seq::Reals { width, values } => values.len() / width,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The token ids; panics on reals (a caller that knows its task asks for tokens).
    pub fn tokens(&self) -> &[u32] {
        match self {
            Seq::Tokens(v) => v,
            Seq::Reals { .. } => panic!("a real-valued sequence has no tokens"),
        }
    }

    /// The values of position `t`; panics on tokens.
    pub fn reals_at(&self, t: usize) -> &[f32] {
        match self {
            Seq::Reals { width, values } => &values[t * width..(t + 1) * width],
            Seq::Tokens(_) => panic!("a token sequence has no real values"),
        }
    }
}

/// One example: `input` and `target` of length `T`; `mask[t]` says whether position `t` counts
/// for the metric.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub input: Seq,
    pub target: Seq,
    pub mask: Vec<bool>,
}

impl Sample {
    /// A sample of a token task.
    pub fn tokens(input: Vec<u32>, target: Vec<u32>, mask: Vec<bool>) -> Self {
        Self {
            input: Seq::Tokens(input),
            target: Seq::Tokens(target),
            mask,
        }
    }
}

/// A built task, ready to generate.
#[derive(Clone, Debug)]
pub enum Task {
    CopyMemory(CopyMemory),
    Adding(Adding),
    SelectiveCopying(SelectiveCopying),
    Mqar(Mqar),
    InductionHeads(InductionHeads),
    Parity(Parity),
    WordProblem(WordProblem),
    ModularArithmetic(ModularArithmetic),
    FuzzyInContextRecall(Recall),
    NoisyInContextRecall(Recall),
    Memorization(Memorization),
    Compression(Compression),
    CharLm(CharLm),
    TimeSeries(TimeSeries),
}

impl Task {
    pub fn info(&self) -> TaskInfo {
        match self {
            Task::CopyMemory(t) => t.info(),
            Task::Adding(t) => t.info(),
            Task::SelectiveCopying(t) => t.info(),
            Task::Mqar(t) => t.info(),
            Task::InductionHeads(t) => t.info(),
            Task::Parity(t) => t.info(),
            Task::WordProblem(t) => t.info(),
            Task::ModularArithmetic(t) => t.info(),
            Task::FuzzyInContextRecall(t) | Task::NoisyInContextRecall(t) => t.info(),
            Task::Memorization(t) => t.info(),
            Task::Compression(t) => t.info(),
            Task::CharLm(t) => t.info(),
            Task::TimeSeries(t) => t.info(),
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        match self {
            Task::CopyMemory(t) => t.sample(rng),
            Task::Adding(t) => t.sample(rng),
            Task::SelectiveCopying(t) => t.sample(rng),
            Task::Mqar(t) => t.sample(rng),
            Task::InductionHeads(t) => t.sample(rng),
            Task::Parity(t) => t.sample(rng),
            Task::WordProblem(t) => t.sample(rng),
            Task::ModularArithmetic(t) => t.sample(rng),
            Task::FuzzyInContextRecall(t) | Task::NoisyInContextRecall(t) => {
                t.sample(rng, Split::Train)
            }
            Task::Memorization(t) => t.sample(rng),
            Task::Compression(t) => t.sample(rng),
            Task::CharLm(t) => t.sample(rng, Split::Train),
            Task::TimeSeries(t) => t.sample(rng, Split::Train),
        }
    }

    /// Training batch number `step` of the stream of `seed`. A task with a finite training set
    /// (MAD's `train_examples`) draws each sample uniformly from that many fixed sequences,
    /// example `i` being the first sample of stream `rng::POOL_STREAM + i`.
    pub fn train_batch(&self, seed: u64, step: u64, batch_size: usize) -> Vec<Sample> {
        let mut rng = rng::stream(seed, step);
        match self.train_examples() {
            None => (0..batch_size).map(|_| self.sample(&mut rng)).collect(),
            Some(n) => (0..batch_size)
                .map(|_| {
                    let i = rng.random_range(0..n as u64);
                    self.sample(&mut rng::stream(seed, rng::POOL_STREAM + i))
                })
                .collect(),
        }
    }

    /// The parallel streams through `split` of a task that is one long sequence (`char_lm`, a
    /// `time_series` read from a CSV file), `count` of them, windows of the task's length
    /// (`stream.rs`); `Ok(None)` for a task that draws independent sequences, `Err` (a
    /// sentence) when the split is too short for one window per stream.
    pub fn streams(&self, split: Split, count: usize) -> Result<Option<Streams>, String> {
        match self {
            Task::CharLm(t) => t.streams(split, count).map(Some),
            Task::TimeSeries(t) => t.streams(split, count),
            _ => Ok(None),
        }
    }

    /// Window `window` of each of `streams` (from [`Task::streams`]), stream `b` as sample `b`.
    pub fn stream_batch(&self, streams: &Streams, window: Window) -> Vec<Sample> {
        (0..streams.count())
            .map(|b| {
                let start = streams.start(b, window);
                match self {
                    Task::CharLm(t) => t.window_at(start),
                    Task::TimeSeries(t) => t.window_at(start),
                    _ => unreachable!("only stream tasks have streams"),
                }
            })
            .collect()
    }

    /// The number of distinct training sequences, for tasks that have a finite training set.
    pub fn train_examples(&self) -> Option<usize> {
        match self {
            Task::FuzzyInContextRecall(t) | Task::NoisyInContextRecall(t) => {
                Some(t.train_examples())
            }
            Task::Memorization(t) => Some(t.train_examples()),
            Task::Compression(t) => Some(t.train_examples()),
            _ => None,
        }
    }

    /// The fixed held-out set of `seed`: the same `n` samples every time. Tasks read from data
    /// draw it from their validation split; generated tasks from a stream training never uses.
    pub fn eval_set(&self, seed: u64, n: usize) -> Vec<Sample> {
        self.held_out(rng::stream(seed, rng::EVAL_STREAM), n)
    }

    /// A second fixed held-out set of `seed`, from the same distribution as [`Task::eval_set`]
    /// but disjoint from it: what a search that picked its setting on the evaluation set
    /// reports. `None` for tasks read from a data file, whose held-out part is one split.
    pub fn test_set(&self, seed: u64, n: usize) -> Option<Vec<Sample>> {
        match self {
            Task::CharLm(_) | Task::TimeSeries(_) => None,
            _ => Some(self.held_out(rng::stream(seed, rng::TEST_STREAM), n)),
        }
    }

    fn held_out(&self, mut rng: ChaCha8Rng, n: usize) -> Vec<Sample> {
        (0..n)
            .map(|_| match self {
                Task::CharLm(t) => t.sample(&mut rng, Split::Valid),
                Task::TimeSeries(t) => t.sample(&mut rng, Split::Valid),
                Task::FuzzyInContextRecall(t) | Task::NoisyInContextRecall(t) => {
                    t.sample(&mut rng, Split::Valid)
                }
                _ => self.sample(&mut rng),
            })
            .collect()
    }
}

/// Which part of a data set a window is drawn from: the first part trains, the last validates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Valid,
}

/// A batch of sequences on a device.
#[derive(Clone, Debug)]
pub enum SeqBatch {
    /// `[B, T]` token ids.
    Tokens(Tensor<2, Int>),
    /// `[B, T, W]` values.
    Reals(Tensor<3>),
}

/// Samples stacked on a device.
#[derive(Clone, Debug)]
pub struct Batch {
    pub input: SeqBatch,
    pub target: SeqBatch,
    /// `[B, T]`, 1.0 where the metric scores the position.
    pub mask: Tensor<2>,
}

impl Batch {
    /// Stacks samples of one length and kind; panics on an empty slice or ragged lengths.
    pub fn new(samples: &[Sample], device: &Device) -> Self {
        let b = samples.len();
        let t = samples[0].input.len();
        assert!(
            samples
                .iter()
                .all(|s| s.input.len() == t && s.target.len() == t && s.mask.len() == t),
            "samples of one batch share a length"
        );
        let stack = |f: fn(&Sample) -> &Seq| match f(&samples[0]) {
            Seq::Tokens(_) => {
                let values: Vec<i64> = samples
                    .iter()
                    .flat_map(|s| f(s).tokens().iter().map(|&v| v as i64))
                    .collect();
                SeqBatch::Tokens(Tensor::from_data(TensorData::new(values, [b, t]), device))
            }
            Seq::Reals { width, .. } => {
                let width = *width;
                let values: Vec<f32> = samples
                    .iter()
                    .flat_map(|s| match f(s) {
                        Seq::Reals { values, .. } => values.iter().copied(),
                        Seq::Tokens(_) => panic!("samples of one batch share a kind"),
                    })
                    .collect();
                SeqBatch::Reals(Tensor::from_data(
                    TensorData::new(values, [b, t, width]),
                    device,
                ))
            }
        };
        let mask: Vec<f32> = samples
            .iter()
            .flat_map(|s| s.mask.iter().map(|&m| if m { 1.0 } else { 0.0 }))
            .collect();
        Self {
            input: stack(|s| &s.input),
            target: stack(|s| &s.target),
            mask: Tensor::from_data(TensorData::new(mask, [b, t]), device),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(deprecated)] // Device::ndarray: burn 0.22 deprecates it; it is our reference CPU backend

    use super::*;

    fn check_sample(s: &Sample, info: &TaskInfo) {
        assert_eq!(s.input.len(), info.seq_len, "{}", info.kind);
        assert_eq!(s.target.len(), info.seq_len, "{}", info.kind);
        assert_eq!(s.mask.len(), info.seq_len, "{}", info.kind);
        assert!(s.mask.contains(&true), "{}: nothing scored", info.kind);
        for (seq, channel) in [(&s.input, info.input), (&s.target, info.output)] {
            match (seq, channel) {
                (Seq::Tokens(v), Channel::Tokens { vocab }) => {
                    assert!(v.iter().all(|&t| (t as usize) < vocab), "{}", info.kind)
                }
                (Seq::Reals { width, values }, Channel::Reals { width: w }) => {
                    assert_eq!(*width, w);
                    assert!(values.iter().all(|v| v.is_finite()));
                }
                _ => panic!("{}: sample and info disagree on the channel", info.kind),
            }
        }
    }

    #[test]
    fn every_task_is_deterministic_by_seed_and_shaped_as_it_declares() {
        for config in TaskConfig::defaults() {
            let task = config.build().unwrap();
            let info = task.info();
            assert_eq!(info.kind, config.kind());
            let batch = task.train_batch(7, 3, 4);
            assert_eq!(batch, task.train_batch(7, 3, 4), "{}", info.kind);
            assert_ne!(batch, task.train_batch(8, 3, 4), "{}", info.kind);
            assert_ne!(batch, task.train_batch(7, 4, 4), "{}", info.kind);
            let eval = task.eval_set(7, 4);
            assert_eq!(eval, task.eval_set(7, 4));
            assert_ne!(eval, batch);
            batch
                .iter()
                .chain(&eval)
                .for_each(|s| check_sample(s, &info));
            assert!(info.metric.reaches(info.solved_metric, info.solved_metric));
            assert!(
                !info
                    .metric
                    .reaches(info.baseline_metric, info.solved_metric),
                "{}: the baseline already counts as solved",
                info.kind
            );

            let device = Device::ndarray();
            let b = Batch::new(&batch, &device);
            assert_eq!(b.mask.dims(), [4, info.seq_len]);
            match (&b.input, info.input) {
                (SeqBatch::Tokens(x), Channel::Tokens { .. }) => {
                    assert_eq!(x.dims(), [4, info.seq_len])
                }
                (SeqBatch::Reals(x), Channel::Reals { width }) => {
                    assert_eq!(x.dims(), [4, info.seq_len, width])
                }
                _ => panic!("{}: batch and info disagree", info.kind),
            }
        }
    }

    /// A finite training set: every training sample is one of `train_examples` fixed
    /// sequences, different seeds hold different sets, and held-out samples are new.
    #[test]
    fn a_finite_training_set_repeats_its_sequences() {
        let config = TaskConfig::Memorization(crate::memorization::MemorizationConfig {
            train_examples: 3,
            ..Default::default()
        });
        let task = config.build().unwrap();
        assert_eq!(task.train_examples(), Some(3));
        let seen = |seed| {
            let mut seen: Vec<Vec<u32>> = (0..20)
                .flat_map(|step| task.train_batch(seed, step, 4))
                .map(|s| s.input.tokens().to_vec())
                .collect();
            seen.sort();
            seen.dedup();
            seen
        };
        let (a, b) = (seen(0), seen(1));
        assert_eq!((a.len(), b.len()), (3, 3));
        assert_ne!(a, b);
        let held_out = task.eval_set(0, 8);
        assert!(
            held_out
                .iter()
                .all(|s| !a.contains(&s.input.tokens().to_vec()))
        );
        assert_eq!(
            TaskConfig::defaults()[0].build().unwrap().train_examples(),
            None
        );
    }

    /// The test set is fixed by the seed, differs from the evaluation set and from training
    /// (every generated task), and tasks read from a data file have none.
    #[test]
    fn the_test_set_is_a_second_disjoint_held_out_set() {
        let tokens = |set: &[Sample]| -> Vec<Vec<u32>> {
            set.iter().map(|s| s.input.tokens().to_vec()).collect()
        };
        for config in TaskConfig::defaults() {
            let Ok(task) = config.build() else { continue };
            let kind = task.info().kind;
            let Some(test) = task.test_set(0, 16) else {
                assert!(
                    matches!(task, Task::CharLm(_) | Task::TimeSeries(_)),
                    "{kind}"
                );
                continue;
            };
            assert_eq!(test.len(), 16);
            if matches!(task.info().input, Channel::Reals { .. }) {
                continue;
            }
            let test = tokens(&test);
            assert_eq!(test, tokens(&task.test_set(0, 16).unwrap()), "{kind}");
            assert_ne!(test, tokens(&task.eval_set(0, 16)), "{kind}");
            assert_ne!(test, tokens(&task.train_batch(0, 0, 16)), "{kind}");
        }
    }

    #[test]
    fn every_task_stretches_to_longer_lengths() {
        for config in TaskConfig::defaults() {
            let base = config.build().unwrap().info().seq_len;
            for factor in [2, 16] {
                let longer = config.with_seq_len(base * factor);
                if let (TaskConfig::CharLm(_), 16) = (&config, factor) {
                    // 2048 characters do not fit the embedded corpus's validation split.
                    assert_eq!(longer.unwrap_err().field, "seq_len");
                    continue;
                }
                let task = longer.unwrap().build().unwrap();
                let info = task.info();
                assert_eq!(info.seq_len, base * factor, "{}", info.kind);
                check_sample(&task.train_batch(0, 0, 1)[0], &info);
            }
        }
        let copy = TaskConfig::CopyMemory(Default::default());
        assert_eq!(copy.with_seq_len(20).unwrap_err().field, "lag");
    }

    /// `defaults` lists every kind once, in `KINDS` order, and each default survives a round
    /// trip through TOML as a config file would hold it.
    #[test]
    fn defaults_cover_every_kind_and_round_trip() {
        let defaults = TaskConfig::defaults();
        let kinds: Vec<&str> = defaults.iter().map(TaskConfig::kind).collect();
        assert_eq!(kinds, TaskConfig::KINDS);
        for config in defaults {
            #[derive(Serialize, Deserialize)]
            struct Doc {
                task: TaskConfig,
            }
            let text = toml::to_string(&Doc {
                task: config.clone(),
            })
            .unwrap();
            let back: Doc = toml::from_str(&text).unwrap();
            assert_eq!(back.task, config, "{text}");
        }
    }
}
