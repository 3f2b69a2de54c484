//! Scoring and evaluation: a batch's loss and metric, the held-out evaluation, and the one
//! evaluation at other lengths that training (`eval.lengths`), `estafet eval` and the
//! benchmark's callers share.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor};
use estafet_data::{Batch, Channel, LossPositions, Metric, Readout, Sample, SeqBatch, TaskInfo};
use estafet_models::fused;
use estafet_models::total::{mean_all, sum_all};
use estafet_models::{Input, InputSpec, ModelIo, Readout as ModelReadout, SequenceModel};

use crate::Error;
use crate::config::ExperimentConfig;
use crate::results::EvalResult;

/// Loss and metric of one batch.
pub(crate) struct Scores {
    /// The training loss, a scalar `[1]`: mean cross-entropy (nats) or mean squared error over
    /// the task's loss positions.
    pub loss: Tensor<1>,
    /// The metric as `total / count`, `[1]` each: correct predictions, summed nats or summed
    /// squared errors over the scored positions, and how many were summed.
    pub total: Tensor<1>,
    pub count: Tensor<1>,
}

/// The metric's value from its sums.
pub(crate) fn metric_value(metric: Metric, total: f64, count: f64) -> f64 {
    match metric {
        Metric::TokenAccuracy | Metric::Mse => total / count,
        Metric::BitsPerChar => total / count / std::f64::consts::LN_2,
    }
}

/// Scores `outputs [B, T, O]` (logits, or values for a real-valued target) against the batch.
pub(crate) fn score(outputs: Tensor<3>, batch: &Batch, info: &TaskInfo) -> Scores {
    let mask = batch.mask.clone();
    let (per_position, total, count) = match &batch.target {
        SeqBatch::Tokens(targets) => {
            let nll = token_nll(outputs.clone(), targets.clone());
            let total = match info.metric {
                Metric::BitsPerChar => sum_all(nll.clone().detach() * mask.clone()),
                _ => {
                    let predictions = outputs.argmax(2).squeeze_dim::<2>(2);
                    (predictions.equal(targets.clone()).float() * mask.clone()).sum()
                }
            };
            (nll, total, mask.clone().sum())
        }
        SeqBatch::Reals(targets) => {
            let width = targets.dims()[2];
            let squared = (outputs - targets.clone()).powf_scalar(2.0);
            let per_position = squared.mean_dim(2).squeeze_dim::<2>(2);
            let total = sum_all(per_position.clone().detach() * mask.clone()) * width as f32;
            (per_position, total, mask.clone().sum() * width as f32)
        }
    };
    let loss = match info.loss_positions {
        LossPositions::All => mean_all(per_position),
        LossPositions::Masked => sum_all(per_position * mask.clone()) / mask.sum(),
    };
    Scores { loss, total, count }
}

/// `−log p(target)` per position, `[B, T]`, from logits `[B, T, V]`: one fused op on the CPU
/// backends, elsewhere the definition's tensor ops.
pub(crate) fn token_nll(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let [b, t, v] = logits.dims();
    if fused::has_kernel(&logits.device()) {
        return fused::token_nll(logits.reshape([b * t, v]), targets.reshape([b * t]))
            .reshape([b, t]);
    }
    -log_softmax(logits, 2)
        .gather(2, targets.unsqueeze_dim(2))
        .squeeze_dim::<2>(2)
}

pub(crate) fn model_input(batch: &Batch) -> Input {
    match &batch.input {
        SeqBatch::Tokens(x) => Input::Tokens(x.clone()),
        SeqBatch::Reals(x) => Input::Features(x.clone()),
    }
}

/// What the model reads and writes for a task.
pub fn model_io(info: &TaskInfo) -> ModelIo {
    ModelIo {
        input: match info.input {
            Channel::Tokens { vocab } => InputSpec::Tokens { vocab },
            Channel::Reals { width } => InputSpec::Features { dim: width },
        },
        d_output: info.output.size(),
        readout: match info.readout {
            Readout::PerPosition => ModelReadout::PerPosition,
            Readout::Bottleneck => ModelReadout::Bottleneck,
        },
    }
}

/// Evaluates on the whole held-out set (no autodiff).
pub fn evaluate(
    model: &SequenceModel,
    samples: &[Sample],
    info: &TaskInfo,
    batch_size: usize,
    device: &Device,
) -> EvalResult {
    let (mut loss_sum, mut loss_count, mut total, mut count) = (0.0, 0.0, 0.0, 0.0);
    for chunk in samples.chunks(batch_size) {
        let batch = Batch::new(chunk, device);
        let (outputs, _) = model.forward(model_input(&batch), None);
        let s = score(outputs, &batch, info);
        let weight = match info.loss_positions {
            LossPositions::All => (chunk.len() * info.seq_len) as f64,
            LossPositions::Masked => batch.mask.clone().sum().into_scalar::<f32>() as f64,
        };
        loss_sum += s.loss.into_scalar::<f32>() as f64 * weight;
        loss_count += weight;
        total += s.total.into_scalar::<f32>() as f64;
        count += s.count.into_scalar::<f32>() as f64;
    }
    let metric = metric_value(info.metric, total, count);
    EvalResult {
        seq_len: info.seq_len,
        loss: loss_sum / loss_count,
        metric,
        baseline_loss: info.baseline_loss,
        baseline_metric: info.baseline_metric,
        solved_metric: info.solved_metric,
        solved: info.metric.reaches(metric, info.solved_metric),
        scaled_accuracy: match (info.metric, info.output) {
            (Metric::TokenAccuracy, Channel::Tokens { vocab }) if vocab > 1 => {
                let chance = 1.0 / vocab as f64;
                Some((metric - chance) / (1.0 - chance))
            }
            _ => None,
        },
    }
}

/// The model trained on `config` evaluated at each of `lengths`: the task with that length (the
/// parameter that sets it changes, every other one stays), on `samples` held-out sequences of
/// the run's seed. `what` names where the lengths came from in an error (`eval.lengths`,
/// `--seq-len`).
pub fn at_lengths(
    model: &SequenceModel,
    config: &ExperimentConfig,
    lengths: &[usize],
    samples: usize,
    what: &str,
    device: &Device,
) -> Result<Vec<EvalResult>, Error> {
    lengths
        .iter()
        .map(|&length| {
            if let Some(max) = config.model.max_seq_len().filter(|&m| m < length) {
                return Err(Error::Config(format!(
                    "{what} {length}: the model's {max} learned positions cannot read it"
                )));
            }
            let task = config
                .task
                .with_seq_len(length)
                .and_then(|c| c.build())
                .map_err(|e| Error::Config(format!("{what} {length}: {e}")))?;
            let info = task.info();
            Ok(evaluate(
                model,
                &task.eval_set(config.run.seed, samples),
                &info,
                config.eval.batch_size,
                device,
            ))
        })
        .collect()
}
