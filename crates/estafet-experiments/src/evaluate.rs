//! Scoring and evaluation: a batch's loss and metric, the held-out evaluation, and the one
//! evaluation at other lengths that training (`eval.lengths`), `estafet eval` and the
//! benchmark's callers share.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor};
use estafet_data::stream::{Streams, Window};
use estafet_data::{
    Batch, Channel, LossPositions, Metric, Readout, Sample, SeqBatch, Split, Task, TaskInfo,
};
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

/// Sequences longer than this are evaluated in windows of this many positions, the state
/// carried from one window to the next: the activations held at once are one window's, so a
/// recurrent model's memory stays O(state) at any length (attention's state, its KV cache,
/// still grows with T).
pub const STREAM_WINDOW: usize = 4096;

/// `batch`'s positions `start..start + len`.
pub(crate) fn window(batch: &Batch, start: usize, len: usize) -> Batch {
    let cut = |s: &SeqBatch| match s {
        SeqBatch::Tokens(x) => SeqBatch::Tokens(x.clone().narrow(1, start, len)),
        SeqBatch::Reals(x) => SeqBatch::Reals(x.clone().narrow(1, start, len)),
    };
    Batch {
        input: cut(&batch.input),
        target: cut(&batch.target),
        mask: batch.mask.clone().narrow(1, start, len),
    }
}

/// Evaluates on the whole held-out set (no autodiff); sequences longer than `window` are
/// streamed through the model `window` positions at a time (a bottleneck readout, which reads
/// the last position only, takes the whole sequence at once).
pub fn evaluate(
    model: &SequenceModel,
    samples: &[Sample],
    info: &TaskInfo,
    batch_size: usize,
    device: &Device,
) -> EvalResult {
    evaluate_in_windows(model, samples, info, batch_size, STREAM_WINDOW, device)
}

/// [`evaluate`] with windows of `window` positions.
pub fn evaluate_in_windows(
    model: &SequenceModel,
    samples: &[Sample],
    info: &TaskInfo,
    batch_size: usize,
    window_len: usize,
    device: &Device,
) -> EvalResult {
    windows(model, samples, info, batch_size, window_len, false, device)
}

/// [`evaluate_in_windows`]; with `interruptible`, a signal ([`crate::interrupt`]) ends it at
/// its next window, so that a run stops promptly during a long length evaluation (a million
/// tokens can take an hour), and what it returns is partial: the run, which asks
/// [`crate::interrupt::requested`] after its length evaluations, records none of it. The
/// evaluations inside the training loop are short and run to their end, so that every
/// checkpointed step has its figures.
fn windows(
    model: &SequenceModel,
    samples: &[Sample],
    info: &TaskInfo,
    batch_size: usize,
    window_len: usize,
    interruptible: bool,
    device: &Device,
) -> EvalResult {
    let mut sums = Sums::default();
    let window_len = match info.readout {
        Readout::Bottleneck => info.seq_len,
        _ => window_len.max(1),
    };
    for chunk in samples.chunks(batch_size) {
        let whole = Batch::new(chunk, device);
        let mut state = None;
        for start in (0..info.seq_len).step_by(window_len) {
            if interruptible && crate::interrupt::requested().is_some() {
                return sums.result(info);
            }
            let len = window_len.min(info.seq_len - start);
            let batch = if len == info.seq_len {
                whole.clone()
            } else {
                window(&whole, start, len)
            };
            let (outputs, next) = model.forward(model_input(&batch), state);
            state = Some(next);
            sums.add(outputs, &batch, info);
        }
    }
    sums.result(info)
}

/// Evaluates on `task`'s validation split read as `streams` ([`Task::streams`]), window after
/// window, each starting from the state the one before it ended in: what a run with
/// `train.carry_state` reports, every position scored with all the context before it in its
/// stream.
pub fn evaluate_streams(
    model: &SequenceModel,
    task: &Task,
    streams: &Streams,
    device: &Device,
) -> EvalResult {
    let info = task.info();
    let mut sums = Sums::default();
    let mut state = None;
    for index in 0..streams.windows() {
        let batch = Batch::new(
            &task.stream_batch(streams, Window { pass: 0, index }),
            device,
        );
        let (outputs, next) = model.forward(model_input(&batch), state);
        state = Some(next);
        sums.add(outputs, &batch, &info);
    }
    sums.result(&info)
}

/// An evaluation's running sums: the loss weighted by the positions it averages over, and
/// the metric's total and count.
#[derive(Default)]
struct Sums {
    loss: f64,
    loss_weight: f64,
    total: f64,
    count: f64,
}

impl Sums {
    fn add(&mut self, outputs: Tensor<3>, batch: &Batch, info: &TaskInfo) {
        let [b, len, _] = outputs.dims();
        let weight = match info.loss_positions {
            LossPositions::All => (b * len) as f64,
            LossPositions::Masked => batch.mask.clone().sum().into_scalar::<f32>() as f64,
        };
        let s = score(outputs, batch, info);
        if weight > 0.0 {
            self.loss += s.loss.into_scalar::<f32>() as f64 * weight;
            self.loss_weight += weight;
        }
        self.total += s.total.into_scalar::<f32>() as f64;
        self.count += s.count.into_scalar::<f32>() as f64;
    }

    fn result(&self, info: &TaskInfo) -> EvalResult {
        let metric = metric_value(info.metric, self.total, self.count);
        EvalResult {
            seq_len: info.seq_len,
            loss: self.loss / self.loss_weight,
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
}

/// Refuses, before anything is evaluated, a length of `lengths` whose evaluation on `samples`
/// sequences would not fit in the memory available or would take more than [`EVAL_FLOPS`] (the
/// estimates: [`crate::memory::for_evaluation`]); training checks its `eval.lengths` this way before its
/// first step, so that no trained run is lost to its final evaluation.
pub fn check_lengths(
    config: &ExperimentConfig,
    lengths: &[usize],
    samples: usize,
    what: &str,
    device: &Device,
) -> Result<(), Error> {
    if !fused::has_kernel(device) || lengths.is_empty() {
        return Ok(());
    }
    let io = model_io(
        &config
            .task
            .build()
            .map_err(|e| Error::Config(e.to_string()))?
            .info(),
    );
    let Some(free) = crate::memory::available() else {
        return Ok(());
    };
    for &length in lengths {
        let (needs, state, flops) = crate::memory::for_evaluation(
            &config.model,
            io,
            samples,
            config.eval.batch_size,
            length,
            device,
        );
        if needs > free {
            return Err(Error::Config(format!(
                "{what} {length}: evaluating {samples} sequences ({} at a time) needs about {} \
                 ({}'s state at this length: {state} floats per sequence), but {} is available; \
                 evaluate fewer sequences or a shorter length",
                config.eval.batch_size.min(samples),
                crate::memory::human(needs),
                config.model.label(),
                crate::memory::human(free)
            )));
        }
        if flops > EVAL_FLOPS {
            return Err(Error::Config(format!(
                "{what} {length}: evaluating {samples} sequences costs about {flops:.1e} FLOPs \
                 ({} per token at this length{}), more than the {EVAL_FLOPS:.0e} an evaluation \
                 may take on a CPU (about an hour); evaluate fewer sequences or a shorter length",
                format_args!("{:.1e}", flops / (samples * length) as f64),
                if config.model.has("attention") {
                    ": attention's scores grow with the length"
                } else {
                    ""
                },
            )));
        }
    }
    Ok(())
}

/// The most FLOPs an evaluation may take on the CPU backends (about an hour at the ~50 GFLOP/s
/// this machine's kernels reach): what stops attention's quadratic cost at a million tokens
/// (2.3e15 for 16 sequences of 2^20 at width 32, two layers) from running for a day, while a
/// recurrence at the same length (under 1e12 for that Mamba) passes.
const EVAL_FLOPS: f64 = 2e14;

/// The model trained on `config` evaluated at each of `lengths`: the task with that length (the
/// parameter that sets it changes, every other one stays), on `samples` held-out sequences of
/// the run's seed. `what` names where the lengths came from in an error (`eval.lengths`,
/// `--seq-len`). A signal cuts each short (see [`windows`]).
pub fn at_lengths(
    model: &SequenceModel,
    config: &ExperimentConfig,
    lengths: &[usize],
    samples: usize,
    what: &str,
    device: &Device,
) -> Result<Vec<EvalResult>, Error> {
    check_lengths(config, lengths, samples, what, device)?;
    lengths
        .iter()
        .map(|&length| {
            let task = task_at(config, length, what)?;
            let info = task.info();
            Ok(windows(
                model,
                &task.eval_set(config.run.seed, samples),
                &info,
                config.eval.batch_size,
                STREAM_WINDOW,
                true,
                device,
            ))
        })
        .collect()
}

/// `config`'s task at `length` (the parameter that sets it changes, every other one stays);
/// errors name `what` and the length, and a length the model's learned positions cannot read.
fn task_at(config: &ExperimentConfig, length: usize, what: &str) -> Result<Task, Error> {
    if let Some(max) = config.model.max_seq_len().filter(|&m| m < length) {
        return Err(Error::Config(format!(
            "{what} {length}: the model's {max} learned positions cannot read it"
        )));
    }
    config
        .task
        .with_seq_len(length)
        .and_then(|c| c.build())
        .map_err(|e| Error::Config(format!("{what} {length}: {e}")))
}

/// The model trained on `config` evaluated at each of `lengths` (the window length) on the
/// validation split of its stream task read as `streams` streams, the state carried from window
/// to window ([`evaluate_streams`]); errors name `what` and the length.
pub fn streamed_at_lengths(
    model: &SequenceModel,
    config: &ExperimentConfig,
    lengths: &[usize],
    streams: usize,
    what: &str,
    device: &Device,
) -> Result<Vec<EvalResult>, Error> {
    if config.model.has("attention") {
        return Err(Error::Config(format!(
            "--streams {streams}: attention's state is its KV cache, which would grow over the \
             whole split; score {} as windows (--streams 0)",
            config.model.label()
        )));
    }
    lengths
        .iter()
        .map(|&length| {
            let task = task_at(config, length, what)?;
            match task.streams(Split::Valid, streams) {
                Ok(Some(s)) => Ok(evaluate_streams(model, &task, &s, device)),
                Ok(None) => Err(Error::Config(format!(
                    "--streams: task.kind = \"{}\" draws independent sequences; streams need one \
                     long sequence (char_lm, or time_series with series = \"csv\")",
                    config.task.kind()
                ))),
                Err(e) => Err(Error::Config(format!(
                    "--streams {streams} at {what} {length}: {e}"
                ))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use estafet_data::TaskConfig;
    use estafet_models::{Init, Layout, MixerConfig, ModelConfig};

    /// A million-token evaluation passes for a recurrence and is refused for attention, whose
    /// scores make it cost thousands of times more, before anything is evaluated, the FLOPs
    /// named; a shorter one passes for both.
    #[test]
    fn attentions_quadratic_cost_is_refused_at_a_million_tokens() {
        let device = crate::Backend::default_compiled()
            .unwrap()
            .device()
            .unwrap();
        let config = |kind: &str| {
            crate::config::parse(
                &crate::config::ConfigSource {
                    name: "test".into(),
                    text: format!(
                        "[model]\nd_model = 32\nn_layers = 2\nlayout = \"residual\"\n\
                         [model.mixer]\nkind = \"{kind}\"\n\
                         [task]\nkind = \"induction_heads\"\nseq_len = 64\nvocab = 16\n\
                         [train]\nsteps = 1\n"
                    ),
                },
                &[],
            )
            .unwrap()
        };
        let million = [1 << 20];
        check_lengths(&config("mamba"), &million, 16, "eval.lengths", &device).unwrap();
        let e = check_lengths(&config("attention"), &million, 16, "eval.lengths", &device)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("eval.lengths 1048576: evaluating 16 sequences costs about")
                && e.contains("attention's scores grow with the length"),
            "{e}"
        );
        check_lengths(&config("attention"), &[4096], 16, "eval.lengths", &device).unwrap();
    }

    /// Attention's KV cache would grow over a whole split read as streams: refused by name,
    /// in a hybrid too, before anything is evaluated.
    #[test]
    fn streams_are_refused_for_attention() {
        let device = crate::Backend::default_compiled()
            .unwrap()
            .device()
            .unwrap();
        for model in [
            "[model.mixer]\nkind = \"attention\"",
            "pattern = [{ kind = \"lstm\" }, { kind = \"attention\" }]",
        ] {
            let config = crate::config::parse(
                &crate::config::ConfigSource {
                    name: "test".into(),
                    text: format!(
                        "[model]\nd_model = 8\nn_layers = 2\n{model}\n\
                         [task]\nkind = \"char_lm\"\nseq_len = 16\n[train]\nsteps = 1\n"
                    ),
                },
                &[],
            )
            .unwrap();
            let info = config.task.build().unwrap().info();
            let built = config
                .model
                .init(model_io(&info), &mut Init::new(0, &device));
            let e = streamed_at_lengths(&built, &config, &[16], 2, "eval.lengths", &device)
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.starts_with("--streams 2: attention's state is its KV cache"),
                "{e}"
            );
        }
    }

    /// Streaming a sequence through the model in windows, the state carried, scores exactly
    /// what one forward over the whole sequence does, for every mixer, at windows that do and
    /// do not divide the length, on a task scored at every position (running parity) and one
    /// scored at a few (multi-query recall).
    #[test]
    fn windows_score_as_one_forward_for_every_model() {
        let device = crate::Backend::default_compiled()
            .unwrap()
            .device()
            .unwrap();
        for task in [
            r#"{ "kind": "parity", "seq_len": 37 }"#,
            r#"{ "kind": "mqar", "seq_len": 40, "n_pairs": 4, "vocab": 32 }"#,
        ] {
            let task: TaskConfig = serde_json::from_str(task).unwrap();
            let task = task.build().unwrap();
            let info = task.info();
            let samples = task.eval_set(1, 6);
            for mixer in MixerConfig::all() {
                let config = ModelConfig {
                    mixer: Some(mixer.clone()),
                    pattern: Vec::new(),
                    d_model: 8,
                    n_layers: 2,
                    layout: Layout::Residual,
                    mlp_expand: 0,
                    match_params: None,
                    match_state: None,
                };
                let model = config.init(model_io(&info), &mut Init::new(5, &device));
                let whole = evaluate_in_windows(&model, &samples, &info, 4, info.seq_len, &device);
                for window in [1, 5, 16] {
                    let streamed = evaluate_in_windows(&model, &samples, &info, 4, window, &device);
                    let what = format!("{} on {}, window {window}", mixer.kind(), info.kind);
                    assert_eq!(streamed.metric, whole.metric, "{what}");
                    assert!(
                        (streamed.loss - whole.loss).abs() < 1e-5 * whole.loss.abs().max(1.0),
                        "{what}: loss {} vs {}",
                        streamed.loss,
                        whole.loss
                    );
                }
            }
        }
    }
}
