use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::copy_memory::{CopyMemory, CopyMemoryConfig};
use crate::induction_heads::{InductionHeads, InductionHeadsConfig};
use crate::mqar::{Mqar, MqarConfig};
use crate::parity::{Parity, ParityConfig};
use crate::selective_copying::{SelectiveCopying, SelectiveCopyingConfig};

/// The generator behind every task: ChaCha8 from `seed`, on its own `stream` so that training
/// batches (`stream = step`) and the evaluation set ([`rng::EVAL_STREAM`]) never overlap.
pub mod rng {
    use super::*;

    pub const EVAL_STREAM: u64 = u64::MAX;

    pub fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        rng
    }
}

/// `[task]` in a config, selected by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TaskConfig {
    CopyMemory(CopyMemoryConfig),
    SelectiveCopying(SelectiveCopyingConfig),
    Mqar(MqarConfig),
    InductionHeads(InductionHeadsConfig),
    Parity(ParityConfig),
}

/// A setting no generator can honour; names the field.
#[derive(Debug, thiserror::Error)]
#[error("task.{field}: {message}")]
pub struct TaskError {
    pub field: &'static str,
    pub message: String,
}

/// `Err` naming `task.field`: how every generator refuses an impossible setting.
pub(crate) fn invalid<T>(field: &'static str, message: impl Into<String>) -> Result<T, TaskError> {
    Err(TaskError {
        field,
        message: message.into(),
    })
}

impl TaskConfig {
    /// Every task with its default parameters, in the order `estafet list tasks` prints them.
    pub fn defaults() -> Vec<TaskConfig> {
        vec![
            TaskConfig::CopyMemory(CopyMemoryConfig::default()),
            TaskConfig::SelectiveCopying(SelectiveCopyingConfig::default()),
            TaskConfig::Mqar(MqarConfig::default()),
            TaskConfig::InductionHeads(InductionHeadsConfig::default()),
            TaskConfig::Parity(ParityConfig::default()),
        ]
    }

    pub fn build(&self) -> Result<Task, TaskError> {
        match self {
            TaskConfig::CopyMemory(c) => c.build().map(Task::CopyMemory),
            TaskConfig::SelectiveCopying(c) => c.build().map(Task::SelectiveCopying),
            TaskConfig::Mqar(c) => c.build().map(Task::Mqar),
            TaskConfig::InductionHeads(c) => c.build().map(Task::InductionHeads),
            TaskConfig::Parity(c) => c.build().map(Task::Parity),
        }
    }
}

/// How a task scores a prediction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Fraction of masked positions whose arg-max prediction is the target.
    TokenAccuracy,
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

/// What a task asks and how it is judged.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskInfo {
    pub kind: &'static str,
    /// Input vocabulary `V`.
    pub vocab: usize,
    /// Output classes `O`.
    pub n_classes: usize,
    /// Sequence length `T` of every sample.
    pub seq_len: usize,
    pub metric: Metric,
    pub loss_positions: LossPositions,
    /// Cross-entropy (nats per scored position) of the best predictor that ignores the past.
    pub baseline_loss: f64,
    /// The metric of that predictor.
    pub baseline_metric: f64,
    /// The metric at or above which the task counts as solved.
    pub solved_metric: f64,
}

/// One example: `input` and `target` of length `T`; `mask[t]` says whether position `t` counts
/// for the metric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub input: Vec<u32>,
    pub target: Vec<u32>,
    pub mask: Vec<bool>,
}

/// A built task, ready to generate.
#[derive(Clone, Debug)]
pub enum Task {
    CopyMemory(CopyMemory),
    SelectiveCopying(SelectiveCopying),
    Mqar(Mqar),
    InductionHeads(InductionHeads),
    Parity(Parity),
}

impl Task {
    pub fn info(&self) -> TaskInfo {
        match self {
            Task::CopyMemory(t) => t.info(),
            Task::SelectiveCopying(t) => t.info(),
            Task::Mqar(t) => t.info(),
            Task::InductionHeads(t) => t.info(),
            Task::Parity(t) => t.info(),
        }
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng) -> Sample {
        match self {
            Task::CopyMemory(t) => t.sample(rng),
            Task::SelectiveCopying(t) => t.sample(rng),
            Task::Mqar(t) => t.sample(rng),
            Task::InductionHeads(t) => t.sample(rng),
            Task::Parity(t) => t.sample(rng),
        }
    }

    /// `n` samples drawn from `rng`.
    pub fn samples(&self, rng: &mut ChaCha8Rng, n: usize) -> Vec<Sample> {
        (0..n).map(|_| self.sample(rng)).collect()
    }

    /// Training batch number `step` of the stream of `seed`.
    pub fn train_batch(&self, seed: u64, step: u64, batch_size: usize) -> Vec<Sample> {
        self.samples(&mut rng::stream(seed, step), batch_size)
    }

    /// The fixed held-out set of `seed`: the same `n` samples every time.
    pub fn eval_set(&self, seed: u64, n: usize) -> Vec<Sample> {
        self.samples(&mut rng::stream(seed, rng::EVAL_STREAM), n)
    }
}

/// Samples stacked on a device.
#[derive(Clone, Debug)]
pub struct Batch {
    /// `[B, T]` input token ids.
    pub inputs: Tensor<2, Int>,
    /// `[B, T]` target class ids.
    pub targets: Tensor<2, Int>,
    /// `[B, T]`, 1.0 where the metric scores the position.
    pub mask: Tensor<2>,
}

impl Batch {
    /// Stacks samples of one length; panics on an empty slice or ragged lengths.
    pub fn new(samples: &[Sample], device: &Device) -> Self {
        let b = samples.len();
        let t = samples[0].input.len();
        assert!(
            samples.iter().all(|s| s.input.len() == t),
            "samples of one batch share a length"
        );
        let ints = |f: fn(&Sample) -> &Vec<u32>| {
            let values: Vec<i64> = samples.iter().flat_map(f).map(|&v| v as i64).collect();
            Tensor::from_data(TensorData::new(values, [b, t]), device)
        };
        let mask: Vec<f32> = samples
            .iter()
            .flat_map(|s| s.mask.iter().map(|&m| if m { 1.0 } else { 0.0 }))
            .collect();
        Self {
            inputs: ints(|s| &s.input),
            targets: ints(|s| &s.target),
            mask: Tensor::from_data(TensorData::new(mask, [b, t]), device),
        }
    }
}
