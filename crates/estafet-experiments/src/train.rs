//! The training loop: AdamW with global-norm clipping on the autodiff device, periodic
//! evaluation on the fixed held-out set, metrics, checkpoints and the final summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use estafet_data::{Batch, Channel, LossPositions, Metric, Readout, Sample, SeqBatch, TaskInfo};
use estafet_models::{Init, Input, InputSpec, ModelIo, Readout as ModelReadout, SequenceModel};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::config::{ConfigSource, ExperimentConfig};
use crate::interrupt::Signal;
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
    /// The command line that continues this run, told to the user when a signal stops it.
    pub resume_command: String,
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
    /// Where and why training diverged (`stopped = "diverged"`); the figures below are then
    /// those of the last good checkpoint.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diverged: Option<Divergence>,
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
    /// The loss became non-finite or stayed far above the baseline (`train.divergence_*`).
    Diverged,
}

impl StopReason {
    fn describe(self) -> &'static str {
        match self {
            StopReason::Steps => "all steps taken",
            StopReason::Solved => "the task is solved",
            StopReason::TimeBudget => "train.max_seconds is spent",
            StopReason::Diverged => "training diverged",
        }
    }
}

/// How a run diverged.
#[derive(Clone, Debug, Serialize)]
pub struct Divergence {
    /// The step at which the run stopped.
    pub step: usize,
    pub reason: String,
    /// The step of the checkpoint kept (0: none was written; the figures are the untrained
    /// model's).
    pub checkpoint_step: usize,
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
    /// Token accuracy only: `(accuracy − 1/V) / (1 − 1/V)` for `V` output classes, 0 at
    /// chance and 1 when perfect (the "scaled accuracy" of Grazzi et al. 2024).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaled_accuracy: Option<f64>,
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

/// `interrupted.json`: a run stopped by a signal, after its checkpoint was written.
#[derive(Serialize)]
struct Interrupted<'a> {
    signal: Signal,
    /// The last step taken, and the step of the checkpoint (the same).
    step: usize,
    train_seconds: f64,
    at: String,
    /// The latest evaluation before the signal, if any.
    last_eval: Option<&'a EvalResult>,
    resume_command: &'a str,
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

/// Whether `out` holds a complete run of `config` exactly (nothing to resume or extend).
pub fn is_complete_as(out: &Path, config: &ExperimentConfig) -> Result<bool, Error> {
    if !RunDir::is_complete(out) {
        return Ok(false);
    }
    let saved = saved_config(out)?;
    let (budget, other) = config.changes_from(&saved);
    Ok(budget.is_empty() && other.is_empty())
}

/// The run's resolved config, as it wrote it.
fn saved_config(out: &Path) -> Result<ExperimentConfig, Error> {
    crate::config::parse(&ConfigSource::read(&out.join("config.toml"))?, &[])
}

/// Trains `config` and writes its run directory; returns the summary also written there.
///
/// With `options.resume`, continues the run in `options.out` from its checkpoint. The config
/// may then differ from the run's only in [`crate::config::BUDGET_FIELDS`] (more steps, a
/// larger time budget, ...); each such extension is recorded in `run.json`. Steps after the
/// checkpoint follow the new config, so under `schedule = "cosine"` they follow the cosine of
/// the new `train.steps` (the learning rate rises from the old schedule's to the new one's).
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
    let fresh_model = || -> Result<SequenceModel, Error> {
        let model = config.model.init(io, &mut Init::new(seed, &ad_device));
        match &config.train.init_from {
            Some(path) => crate::weights::load_torch_rnn(model, path, &ad_device),
            None => Ok(model),
        }
    };
    let mut model = fresh_model()?;
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
    let (dir, mut state) = if resumable {
        let (dir, checkpoint) = reopen(config, options)?;
        let state = match checkpoint {
            Some(checkpoint) => {
                let state = read_checkpoint_state(&checkpoint)?;
                model = model
                    .try_load_file(checkpoint.join("model.bpk"))
                    .map_err(|e| checkpoint_error(&checkpoint, "model.bpk", e))?;
                optimizer = optimizer
                    .load(checkpoint.join("optimizer.bpk"))
                    .map_err(|e| checkpoint_error(&checkpoint, "optimizer.bpk", e))?;
                state
            }
            None => CheckpointState::default(),
        };
        dir.truncate_jsonl("metrics.jsonl", state.step)?;
        (dir, state)
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
                started_at: now(),
                model: model_kind,
                task: &info,
                d_model: config.model.d_model,
                match_params: config.model.match_params,
                match_state: config.model.match_state,
                params,
                state_size,
            },
        )?;
        (dir, CheckpointState::default())
    };
    let start = state.step;

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
    let earlier_seconds = state.train_seconds;
    let elapsed = || earlier_seconds + started.elapsed().as_secs_f64();
    let tokens_per_step = (train.batch_size * info.seq_len) as f64;
    let mut last_checkpoint = Instant::now();
    let mut last_eval = None;
    let mut stopped = StopReason::Steps;
    let mut diverged = None;
    let mut last_step = start;
    for step in start + 1..=train.steps {
        last_step = step;
        let samples = task.train_batch(seed, step as u64, train.batch_size);
        let batch = Batch::new(&samples, &ad_device);
        let (outputs, _) = model.forward(model_input(&batch), None);
        let scores = score(outputs, &batch, &info);
        let loss_value: f64 = scores.loss.clone().into_scalar::<f32>() as f64;
        if !loss_value.is_finite() {
            diverged = Some((
                step,
                format!("the training loss at step {step} is {loss_value}"),
            ));
            break;
        }
        if step == 1 {
            state.initial_loss = Some(loss_value);
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
        state.watch.add(loss_value);
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
            if let Some(reason) = state.watch.close_window(
                step,
                train.divergence_factor,
                train.divergence_patience,
                info.baseline_loss,
                state.initial_loss,
            ) {
                diverged = Some((step, reason));
                break;
            }
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
        let signal = crate::interrupt::requested();
        // A checkpoint by count or by the clock waits while the loss is above the divergence
        // threshold, so that the one kept is a good one.
        let due = (train.checkpoint_every > 0 && step % train.checkpoint_every == 0)
            || (train.checkpoint_minutes > 0.0
                && last_checkpoint.elapsed().as_secs_f64() >= 60.0 * train.checkpoint_minutes);
        if stop || signal.is_some() || (due && state.watch.streak == 0) {
            state.step = step;
            state.train_seconds = elapsed();
            write_checkpoint(&dir, &model, &optimizer, &state)?;
            last_checkpoint = Instant::now();
        }
        if signal.is_some() {
            break;
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

    // Diverged: the figures are the last good checkpoint's (or the untrained model's).
    let divergence = match diverged {
        Some((step, reason)) => {
            let checkpoint_step = match dir.recover_checkpoint()? {
                Some(checkpoint) => {
                    let kept = read_checkpoint_state(&checkpoint)?;
                    model = fresh_model()?
                        .try_load_file(checkpoint.join("model.bpk"))
                        .map_err(|e| checkpoint_error(&checkpoint, "model.bpk", e))?;
                    kept.step
                }
                None => {
                    model = fresh_model()?;
                    0
                }
            };
            report(format!(
                "step {step:>6}: stopping (training diverged: {reason})"
            ));
            stopped = StopReason::Diverged;
            last_eval = None;
            Some(Divergence {
                step,
                reason,
                checkpoint_step,
            })
        }
        None => None,
    };
    // A signal during the loop (its checkpoint is written) or after it, before the summary; a
    // diverged run writes its summary regardless.
    if let Some(signal) = crate::interrupt::requested().filter(|_| divergence.is_none()) {
        bar.finish_and_clear();
        return Err(interrupted(
            &dir,
            options,
            signal,
            &state,
            last_eval.as_ref(),
        )?);
    }
    let last_eval = match last_eval {
        Some(e) => e,
        // Resumed from the final checkpoint of a run killed before its summary, or diverged:
        // evaluate the model at hand.
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
        diverged: divergence.clone(),
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
    if let Some(d) = divergence {
        let kept = if d.checkpoint_step > 0 {
            format!(
                "the summary holds the figures of the last good checkpoint (step {}), kept in {}",
                d.checkpoint_step,
                dir.path().join("checkpoint").display()
            )
        } else {
            "no checkpoint was written before the loss rose, so the summary holds the untrained \
             model's figures"
                .to_string()
        };
        return Err(Error::Diverged(format!(
            "training diverged at step {}: {}; {kept}; lower optim.lr or optim.grad_clip, or \
             tune train.divergence_factor",
            d.step, d.reason
        )));
    }
    Ok(summary)
}

/// Opens the run in `options.out` to continue it: checks that `config` differs from the run's
/// only in budget fields, records an extension in `run.json`, and returns the checkpoint to
/// start from (none if the run was stopped before its first).
fn reopen(
    config: &ExperimentConfig,
    options: &RunOptions,
) -> Result<(RunDir, Option<PathBuf>), Error> {
    let out = &options.out;
    let dir = RunDir::open(out)?;
    let saved = saved_config(out)?;
    let (budget, other) = config.changes_from(&saved);
    if !other.is_empty() {
        let listed: Vec<String> = other.iter().take(4).map(ToString::to_string).collect();
        return Err(Error::Config(format!(
            "--resume: {} holds a run of a different config ({}{}); only the fields that budget \
             a run may change on resume ({}); its resolved config is {}",
            out.display(),
            listed.join(", "),
            if other.len() > 4 { ", ..." } else { "" },
            crate::config::BUDGET_FIELDS.join(", "),
            out.join("config.toml").display()
        )));
    }
    let checkpoint = dir.recover_checkpoint()?;
    let at_step = match &checkpoint {
        Some(c) => read_checkpoint_state(c)?.step,
        None => 0,
    };
    if at_step > config.train.steps {
        return Err(Error::Config(format!(
            "--resume: train.steps = {} is below the step of the run's checkpoint ({at_step}); a \
             run can be extended, not shortened",
            config.train.steps
        )));
    }
    if !budget.is_empty() {
        let mut info: serde_json::Value = std::fs::read(out.join("run.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}: missing or corrupt",
                    out.join("run.json").display()
                ))
            })?;
        // A complete run that is extended stops being complete; its summary moves into the
        // record of the extension, so no result is lost.
        let previous_summary = std::fs::read(out.join("summary.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
        let extension = serde_json::json!({
            "at_step": at_step,
            "at": now(),
            "changes": budget,
            "previous_summary": previous_summary,
        });
        match info.get_mut("extensions").and_then(|e| e.as_array_mut()) {
            Some(list) => list.push(extension),
            None => info["extensions"] = serde_json::json!([extension]),
        }
        dir.write_json("run.json", &info)?;
        dir.write_atomic("config.toml", config.to_toml().as_bytes())?;
        dir.remove("summary.json")?;
    }
    dir.remove("interrupted.json")?;
    Ok((dir, checkpoint))
}

/// Writes `interrupted.json` and returns the error that tells the user how to continue.
fn interrupted(
    dir: &RunDir,
    options: &RunOptions,
    signal: Signal,
    state: &CheckpointState,
    last_eval: Option<&EvalResult>,
) -> Result<Error, Error> {
    dir.write_json(
        "interrupted.json",
        &Interrupted {
            signal,
            step: state.step,
            train_seconds: state.train_seconds,
            at: now(),
            last_eval,
            resume_command: &options.resume_command,
        },
    )?;
    Ok(Error::Interrupted {
        signal,
        message: format!(
            "{} after step {}: checkpoint written to {}; continue with: {}",
            signal.name(),
            state.step,
            dir.path().join("checkpoint").display(),
            options.resume_command
        ),
    })
}

fn now() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// The divergence check's running figures, kept in the checkpoint so that a resumed run
/// decides exactly as an uninterrupted one.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub(crate) struct DivergenceWatch {
    /// Sum and count of the training losses of the logging window under way.
    window_sum: f64,
    window_steps: usize,
    /// Successive windows whose mean loss exceeded the threshold.
    streak: usize,
}

impl DivergenceWatch {
    fn add(&mut self, loss: f64) {
        self.window_sum += loss;
        self.window_steps += 1;
    }

    /// Closes the window at a logging step; returns why the run diverged, if it now has. The
    /// threshold is `factor` × the larger of the task's `baseline` loss and the `initial` one
    /// (`factor = 0`: no check).
    fn close_window(
        &mut self,
        step: usize,
        factor: f64,
        patience: usize,
        baseline: f64,
        initial: Option<f64>,
    ) -> Option<String> {
        let mean = self.window_sum / self.window_steps.max(1) as f64;
        let first = step + 1 - self.window_steps;
        self.window_sum = 0.0;
        self.window_steps = 0;
        if factor <= 0.0 {
            return None;
        }
        let reference = baseline.max(initial.unwrap_or(0.0));
        let threshold = factor * reference;
        if mean > threshold {
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        (self.streak >= patience).then(|| {
            format!(
                "the mean training loss of steps {first}–{step} is {mean:.4e}, and {patience} \
                 logging windows in a row stayed above {factor} × {reference:.4} = \
                 {threshold:.4} (train.divergence_factor × the larger of the task's baseline \
                 loss {baseline:.4} and the initial loss {})",
                initial.map_or("–".into(), |l| format!("{l:.4}"))
            )
        })
    }
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
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(crate) struct CheckpointState {
    pub step: usize,
    pub train_seconds: f64,
    /// The loss at step 1 (the untrained model's), the divergence check's reference.
    #[serde(default)]
    pub initial_loss: Option<f64>,
    #[serde(default)]
    pub watch: DivergenceWatch,
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
    state: &CheckpointState,
) -> Result<(), Error> {
    let model_bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .context("cannot serialise the model")?;
    let optim_bytes = optimizer
        .into_bytes()
        .context("cannot serialise the optimizer")?;
    let state =
        serde_json::to_vec_pretty(state).context("cannot serialise the checkpoint state")?;
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

#[cfg(test)]
mod tests {
    use super::DivergenceWatch;

    /// Feeds windows of 5 losses each; returns the step at which the watch fired. With the
    /// baseline 1 and the initial loss 2, the threshold is `2 · factor`.
    fn fire(windows: &[f64], factor: f64, patience: usize) -> Option<usize> {
        let mut watch = DivergenceWatch::default();
        let mut step = 0;
        for &loss in windows {
            for _ in 0..5 {
                step += 1;
                watch.add(loss);
            }
            if watch
                .close_window(step, factor, patience, 1.0, Some(2.0))
                .is_some()
            {
                return Some(step);
            }
        }
        None
    }

    #[test]
    fn divergence_needs_patience_windows_in_a_row_above_the_threshold() {
        assert_eq!(fire(&[50.0, 50.0, 50.0], 10.0, 3), Some(15));
        // A window back below the threshold starts the count again.
        assert_eq!(fire(&[50.0, 50.0, 1.0, 50.0, 50.0], 10.0, 3), None);
        assert_eq!(fire(&[50.0, 1.0, 50.0, 50.0, 50.0], 10.0, 3), Some(25));
        // At the threshold is not above it; factor 0: never.
        assert_eq!(fire(&[20.0; 4], 10.0, 1), None);
        assert_eq!(fire(&[1e30; 4], 0.0, 1), None);
        let mut watch = DivergenceWatch::default();
        for _ in 0..5 {
            watch.add(100.0);
        }
        let why = watch.close_window(5, 10.0, 1, 1.0, Some(2.0)).unwrap();
        assert!(
            why.contains("steps 1–5") && why.contains("1.0000e2"),
            "{why}"
        );
    }
}
