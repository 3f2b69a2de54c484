//! The training loop: AdamW with global-norm clipping on the autodiff device, periodic
//! evaluation on the fixed held-out set, metrics, checkpoints and the final summary.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use estafet_data::{Batch, Channel, LossPositions, Metric, Sample, SeqBatch, TaskInfo};
use estafet_models::{Init, Input, InputSpec, ModelIo, SequenceModel};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::config::ExperimentConfig;
use crate::run_dir::RunDir;
use crate::{Backend, Error};

/// How to run, beyond what the config says.
pub struct RunOptions {
    pub backend: Backend,
    pub out: PathBuf,
    /// Where the config came from (a path or `embedded:NAME`), recorded in `run.json`.
    pub config_source: String,
    /// The code version recorded in `run.json` (e.g. `git describe`).
    pub code_version: String,
    /// Show a progress bar (when the terminal allows one).
    pub progress: bool,
    /// Continue the run in `out` from its checkpoint, if it has one.
    pub resume: bool,
}

/// `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub model: &'static str,
    pub task: &'static str,
    pub params: usize,
    /// Floats of state per sequence at the task's length (attention: its KV cache).
    pub state_size: usize,
    /// Steps taken (fewer than `train.steps` when the run stopped early).
    pub steps: usize,
    pub stopped: StopReason,
    pub backend: Backend,
    pub seed: u64,
    pub code_version: String,
    pub train_seconds: f64,
    pub train_tokens_per_second: f64,
    /// Peak resident memory of the process, MB (Linux).
    pub peak_rss_mb: Option<f64>,
    pub metric: Metric,
    pub final_eval: EvalResult,
    /// The final model at `eval.lengths`.
    pub length_eval: Vec<EvalResult>,
    pub run_dir: PathBuf,
}

/// Why training ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// All `train.steps` were taken.
    Steps,
    /// An evaluation reached the task's solved level (`train.stop_when_solved`).
    Solved,
    /// `train.max_seconds` ran out.
    TimeBudget,
}

impl StopReason {
    fn describe(self) -> &'static str {
        match self {
            StopReason::Steps => "all steps taken",
            StopReason::Solved => "the task is solved",
            StopReason::TimeBudget => "train.max_seconds is spent",
        }
    }
}

/// Figures on the held-out set, beside the task's baselines.
#[derive(Clone, Debug, Serialize)]
pub struct EvalResult {
    pub seq_len: usize,
    /// Mean cross-entropy (nats) or squared error over the positions the task's loss covers.
    pub loss: f64,
    /// The task's metric (`TaskInfo::metric`) over the scored positions.
    pub metric: f64,
    pub baseline_loss: f64,
    pub baseline_metric: f64,
    pub solved_metric: f64,
    pub solved: bool,
}

#[derive(Serialize)]
struct RunInfo<'a> {
    seed: u64,
    backend: Backend,
    code_version: &'a str,
    config_source: &'a str,
    started_at: String,
    model: &'static str,
    task: &'a TaskInfo,
    /// The width, and the budget it was chosen for (`model.match_params`/`match_state`).
    d_model: usize,
    match_params: Option<usize>,
    match_state: Option<usize>,
    params: usize,
    state_size: usize,
}

#[derive(Serialize)]
#[serde(tag = "split", rename_all = "snake_case")]
enum MetricsLine {
    Train {
        step: usize,
        loss: f64,
        metric: f64,
        grad_norm: f64,
        lr: f64,
        tokens_per_second: f64,
        elapsed_seconds: f64,
    },
    Eval {
        step: usize,
        seq_len: usize,
        loss: f64,
        metric: f64,
    },
    Diagnostics {
        step: usize,
        #[serde(flatten)]
        figures: crate::diagnostics::Diagnostics,
    },
}

/// Trains `config` and writes its run directory; returns the summary also written there.
pub fn run(config: &ExperimentConfig, options: &RunOptions) -> Result<Summary, Error> {
    let task = config
        .task
        .build()
        .map_err(|e| Error::Config(e.to_string()))?;
    let info = task.info();
    let device = options.backend.device()?;
    let seed = config.run.seed;
    let io = model_io(&info);
    let ad_device = device.clone().autodiff();
    let mut model = config.model.init(io, &mut Init::new(seed, &ad_device));
    if let Some(path) = &config.train.init_from {
        model = crate::weights::load_torch_rnn(model, path, &ad_device)?;
    }
    let params = model.num_params();
    let state_size = model.state_size(info.seq_len);
    let model_kind = config.model.mixer.kind();

    let train = &config.train;
    let mut optimizer = AdamWConfig::new()
        .with_beta_1(config.optim.beta1 as f32)
        .with_beta_2(config.optim.beta2 as f32)
        .with_epsilon(config.optim.eps as f32)
        .with_weight_decay(config.optim.weight_decay as f32)
        .init();
    let resumable = options.resume && options.out.join("config.toml").is_file();
    let (dir, start, earlier_seconds) = if resumable {
        let dir = RunDir::open(&options.out)?;
        let saved = std::fs::read_to_string(options.out.join("config.toml"))
            .context("cannot read the run's config.toml")?;
        if saved != config.to_toml() {
            return Err(Error::Config(format!(
                "--resume: {} holds a run of a different config; resume it with the same config \
                 and overrides (its resolved config is {}/config.toml)",
                options.out.display(),
                options.out.display()
            )));
        }
        match dir.recover_checkpoint()? {
            Some(checkpoint) => {
                let state = read_checkpoint_state(&checkpoint)?;
                model = model
                    .try_load_file(checkpoint.join("model.bpk"))
                    .map_err(|e| checkpoint_error(&checkpoint, "model.bpk", e))?;
                optimizer = optimizer
                    .load(checkpoint.join("optimizer.bpk"))
                    .map_err(|e| checkpoint_error(&checkpoint, "optimizer.bpk", e))?;
                dir.truncate_jsonl("metrics.jsonl", state.step)?;
                (dir, state.step, state.train_seconds)
            }
            None => {
                dir.truncate_jsonl("metrics.jsonl", 0)?;
                (dir, 0, 0.0)
            }
        }
    } else {
        let dir = RunDir::create(&options.out)?;
        dir.write_atomic("config.toml", config.to_toml().as_bytes())?;
        dir.write_json(
            "run.json",
            &RunInfo {
                seed,
                backend: options.backend,
                code_version: &options.code_version,
                config_source: &options.config_source,
                started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                model: model_kind,
                task: &info,
                d_model: config.model.d_model,
                match_params: config.model.match_params,
                match_state: config.model.match_state,
                params,
                state_size,
            },
        )?;
        (dir, 0, 0.0)
    };

    let eval_set = task.eval_set(seed, config.eval.samples);
    let bar = progress_bar(train.steps, options.progress);
    bar.set_position(start as u64);
    let report = |line: String| {
        if bar.is_hidden() {
            eprintln!("{line}");
        } else {
            bar.println(line);
        }
    };
    report(format!(
        "{model_kind} ({params} parameters, {state_size} floats of state) on {} (T = {}), {} on {}, seed {seed} → {}{}",
        info.kind,
        info.seq_len,
        train.steps,
        options.backend,
        options.out.display(),
        if start > 0 {
            format!(", resumed after step {start}")
        } else {
            String::new()
        }
    ));

    // One evaluation: a metrics line, and a line on the terminal.
    let log_eval = |label: &str, step: usize, result: &EvalResult| -> Result<(), Error> {
        dir.append_jsonl(
            "metrics.jsonl",
            &MetricsLine::Eval {
                step,
                seq_len: result.seq_len,
                loss: result.loss,
                metric: result.metric,
            },
        )?;
        report(format!(
            "{label}: eval loss {:.4} (baseline {:.4}), {} {:.4} (baseline {:.4})",
            result.loss,
            result.baseline_loss,
            info.metric.name(),
            result.metric,
            result.baseline_metric
        ));
        Ok(())
    };

    let started = Instant::now();
    let elapsed = || earlier_seconds + started.elapsed().as_secs_f64();
    let tokens_per_step = (train.batch_size * info.seq_len) as f64;
    let mut last_eval = None;
    let mut stopped = StopReason::Steps;
    let mut last_step = start;
    for step in start + 1..=train.steps {
        last_step = step;
        let samples = task.train_batch(seed, step as u64, train.batch_size);
        let batch = Batch::new(&samples, &ad_device);
        let (outputs, _) = model.forward(model_input(&batch), None);
        let scores = score(outputs, &batch, &info);
        let loss_value: f64 = scores.loss.clone().into_scalar::<f32>() as f64;
        if !loss_value.is_finite() {
            return Err(anyhow::anyhow!(
                "training diverged: the loss at step {step} is {loss_value}; lower optim.lr or \
                 optim.grad_clip (the last checkpoint in {} is kept)",
                options.out.display()
            )
            .into());
        }
        let mut grads = GradientsParams::from_grads(scores.loss.backward(), &model);
        let grad_norm = clip_global_norm(&model, &mut grads, config.optim.grad_clip);
        let lr = config.optim.lr_at(step, train.steps);
        model = optimizer.step(lr, model, grads);

        let metric = metric_value(
            info.metric,
            scores.total.into_scalar::<f32>() as f64,
            scores.count.into_scalar::<f32>() as f64,
        );
        bar.set_position(step as u64);
        bar.set_message(format!(
            "loss {loss_value:.4} {} {metric:.3}",
            info.metric.name()
        ));
        let out_of_time = train.max_seconds > 0.0 && elapsed() >= train.max_seconds;
        let last = step == train.steps || out_of_time;
        if step % train.log_every == 0 || last {
            let elapsed = elapsed();
            dir.append_jsonl(
                "metrics.jsonl",
                &MetricsLine::Train {
                    step,
                    loss: loss_value,
                    metric,
                    grad_norm,
                    lr,
                    tokens_per_second: tokens_per_step * (step - start) as f64
                        / started.elapsed().as_secs_f64(),
                    elapsed_seconds: elapsed,
                },
            )?;
        }
        let eval_now = train.eval_every > 0 && step % train.eval_every == 0;
        let mut solved = false;
        if eval_now || last {
            let result = evaluate(
                &model.valid(),
                &eval_set,
                &info,
                config.eval.batch_size,
                &device,
            );
            log_eval(&format!("step {step:>6}"), step, &result)?;
            solved = result.solved;
            last_eval = Some(result);
            if train.diagnostics {
                let figures = crate::diagnostics::measure(&model.valid(), &eval_set, &device);
                report(format!(
                    "step {step:>6}: state norm {}; saturated gates {}; spectral radius {:?}",
                    figures
                        .state_norm
                        .iter()
                        .map(|(t, n)| format!("{n:.3} at t {t}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    figures
                        .saturated_gates
                        .map_or("-".into(), |f| format!("{:.1}%", 100.0 * f)),
                    figures.spectral_radius
                ));
                dir.append_jsonl("metrics.jsonl", &MetricsLine::Diagnostics { step, figures })?;
            }
        }
        let stop_solved = solved && train.stop_when_solved;
        let stop = last || stop_solved;
        if (train.checkpoint_every > 0 && step % train.checkpoint_every == 0) || stop {
            write_checkpoint(&dir, &model, &optimizer, step, elapsed())?;
        }
        if stop {
            stopped = if stop_solved {
                StopReason::Solved
            } else if step < train.steps {
                StopReason::TimeBudget
            } else {
                StopReason::Steps
            };
            if stopped != StopReason::Steps {
                report(format!("step {step:>6}: stopping ({})", stopped.describe()));
            }
            break;
        }
    }
    let train_seconds = elapsed();
    let last_eval = match last_eval {
        Some(e) => e,
        // Resumed from the final checkpoint of a run killed before its summary: evaluate again.
        None => evaluate(
            &model.valid(),
            &eval_set,
            &info,
            config.eval.batch_size,
            &device,
        ),
    };

    let mut length_eval = Vec::with_capacity(config.eval.lengths.len());
    for &length in &config.eval.lengths {
        let longer = config
            .task
            .with_seq_len(length)
            .and_then(|c| c.build())
            .map_err(|e| Error::Config(format!("eval.lengths: {length}: {e}")))?;
        let info = longer.info();
        let result = evaluate(
            &model.valid(),
            &longer.eval_set(seed, config.eval.samples),
            &info,
            config.eval.batch_size,
            &device,
        );
        log_eval(&format!("length {length:>6}"), last_step, &result)?;
        length_eval.push(result);
    }
    bar.finish_and_clear();

    let summary = Summary {
        model: model_kind,
        task: info.kind,
        params,
        state_size,
        steps: last_step,
        stopped,
        backend: options.backend,
        seed,
        code_version: options.code_version.clone(),
        train_seconds,
        train_tokens_per_second: tokens_per_step * last_step as f64 / train_seconds,
        peak_rss_mb: crate::bench::peak_rss_mb(),
        metric: info.metric,
        final_eval: last_eval,
        length_eval,
        run_dir: options.out.clone(),
    };
    dir.write_json("summary.json", &summary)?;
    Ok(summary)
}

/// Loss and metric of one batch.
struct Scores {
    /// The training loss, a scalar `[1]`: mean cross-entropy (nats) or mean squared error over
    /// the task's loss positions.
    loss: Tensor<1>,
    /// The metric as `total / count`, `[1]` each: correct predictions, summed nats or summed
    /// squared errors over the scored positions, and how many were summed.
    total: Tensor<1>,
    count: Tensor<1>,
}

/// The metric's value from its sums.
fn metric_value(metric: Metric, total: f64, count: f64) -> f64 {
    match metric {
        Metric::TokenAccuracy | Metric::Mse => total / count,
        Metric::BitsPerChar => total / count / std::f64::consts::LN_2,
    }
}

/// Scores `outputs [B, T, O]` (logits, or values for a real-valued target) against the batch.
fn score(outputs: Tensor<3>, batch: &Batch, info: &TaskInfo) -> Scores {
    let mask = batch.mask.clone();
    let (per_position, total, count) = match &batch.target {
        SeqBatch::Tokens(targets) => {
            let nll = -log_softmax(outputs.clone(), 2)
                .gather(2, targets.clone().unsqueeze_dim(2))
                .squeeze_dim::<2>(2);
            let total = match info.metric {
                Metric::BitsPerChar => (nll.clone().detach() * mask.clone()).sum(),
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
            let total = (per_position.clone().detach() * mask.clone()).sum() * width as f32;
            (per_position, total, mask.clone().sum() * width as f32)
        }
    };
    let loss = match info.loss_positions {
        LossPositions::All => per_position.mean(),
        LossPositions::Masked => (per_position * mask.clone()).sum() / mask.sum(),
    };
    Scores { loss, total, count }
}

fn model_input(batch: &Batch) -> Input {
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
    }
}

/// Scales all gradients together so that their joint L2 norm is at most `max_norm` (0: no
/// clipping), as `torch.nn.utils.clip_grad_norm_` does; burn's own clipping is per tensor.
/// Returns the norm before clipping.
fn clip_global_norm(model: &SequenceModel, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct SquaredNorm<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredNorm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                let s = g.powf_scalar(2.0).sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }

    let mut visitor = SquaredNorm { grads, sum: None };
    model.visit(&mut visitor);
    let norm = visitor
        .sum
        .map_or(0.0, |s| (s.into_scalar::<f32>() as f64).sqrt());
    if max_norm > 0.0 && norm > max_norm {
        model.visit(&mut Scale {
            grads,
            factor: max_norm / (norm + 1e-6),
        });
    }
    norm
}

/// `checkpoint/state.json`: where the run stands. The data stream needs nothing more: batch
/// `k` is a function of `(seed, k)`.
#[derive(Serialize, serde::Deserialize)]
pub(crate) struct CheckpointState {
    pub step: usize,
    pub train_seconds: f64,
}

pub(crate) fn read_checkpoint_state(
    checkpoint: &std::path::Path,
) -> Result<CheckpointState, Error> {
    let path = checkpoint.join("state.json");
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: missing or corrupt checkpoint state",
                path.display()
            ))
        })
}

fn checkpoint_error(checkpoint: &std::path::Path, file: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!(
        "{}: cannot load: {}",
        checkpoint.join(file).display(),
        e.to_string().replace('\n', " ")
    ))
}

fn write_checkpoint(
    dir: &RunDir,
    model: &SequenceModel,
    optimizer: &burn::optim::ModuleOptimizer,
    step: usize,
    train_seconds: f64,
) -> Result<(), Error> {
    let model_bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .context("cannot serialise the model")?;
    let optim_bytes = optimizer
        .into_bytes()
        .context("cannot serialise the optimizer")?;
    let state = serde_json::to_vec_pretty(&CheckpointState {
        step,
        train_seconds,
    })
    .context("cannot serialise the checkpoint state")?;
    dir.write_checkpoint(&[
        ("model.bpk", &model_bytes),
        ("optimizer.bpk", &optim_bytes),
        ("state.json", &state),
    ])?;
    Ok(())
}

fn progress_bar(steps: usize, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  {per_sec}  ETA {eta}")
            .expect("the template is valid"),
    );
    bar
}
