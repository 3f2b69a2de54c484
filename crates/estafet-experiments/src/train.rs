//! The training loop: AdamW with global-norm clipping on the autodiff device, periodic
//! evaluation on the fixed held-out set, metrics, checkpoints and the final summary.
//!
//! [`run`] is three steps: [`Run::open`] creates the run directory or reopens it to resume,
//! [`Run::train`] is the loop, and [`Run::finish`] evaluates, writes `summary.json` and turns a
//! divergence or a signal into its error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use estafet_data::stream::Streams;
use estafet_data::{Batch, Sample, Task, TaskInfo};
use estafet_models::torch::HostTensor;
use estafet_models::total::sum_all;
use estafet_models::{Init, ModelState, SequenceModel};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::checkpoint;
use crate::config::{ConfigSource, ExperimentConfig};
use crate::evaluate::{evaluate, evaluate_streams, metric_value, model_input, model_io, score};
use crate::interrupt::Signal;
use crate::results::{Divergence, EvalResult, StopReason, Summary};
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
    /// Train even if [`crate::memory::check`] estimates that the run does not fit.
    pub skip_memory_check: bool,
    /// The command line that continues this run, told to the user when a signal stops it.
    pub resume_command: String,
}

#[derive(Serialize)]
struct RunInfo<'a> {
    seed: u64,
    backend: Backend,
    code_version: &'a str,
    config_source: &'a str,
    started_at: String,
    model: String,
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
    let (mut run, model, optimizer) = Run::open(config, options)?;
    let (outcome, model) = run.train(model, optimizer)?;
    run.finish(outcome, model)
}

/// A run under way: what it trains on, where it writes, and where it stands. The model and
/// its optimizer travel beside it by value, so the optimizer updates them in place.
struct Run<'a> {
    config: &'a ExperimentConfig,
    options: &'a RunOptions,
    task: Task,
    /// The task at each length of `train.length_mixture`, in its order (empty without one).
    mixture: Vec<Task>,
    info: TaskInfo,
    device: Device,
    ad_device: Device,
    dir: RunDir,
    state: checkpoint::State,
    params: usize,
    state_size: usize,
    eval_set: Vec<Sample>,
    /// With `train.carry_state`: the streams training and evaluation read.
    carry: Option<Carry>,
    bar: ProgressBar,
}

/// The streams of a `train.carry_state` run, and the state a resumed run starts from.
struct Carry {
    train: Streams,
    valid: Streams,
    /// The checkpoint's carried state, until the first step after a resume takes it.
    saved: Option<Vec<HostTensor>>,
}

/// How the loop ended.
struct Outcome {
    last_step: usize,
    stopped: StopReason,
    /// The step and the reason, if the run diverged.
    diverged: Option<(usize, String)>,
    last_eval: Option<EvalResult>,
    train_seconds: f64,
}

impl<'a> Run<'a> {
    /// Builds the task and the model, and creates the run directory or, with
    /// `options.resume`, reopens it and loads its checkpoint.
    fn open(
        config: &'a ExperimentConfig,
        options: &'a RunOptions,
    ) -> Result<(Self, SequenceModel, ModuleOptimizer), Error> {
        let task = config
            .task
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        let info = task.info();
        let device = options.backend.device()?;
        config
            .model
            .check_device(&device)
            .map_err(|e| Error::Config(format!("{}: {e}", options.backend)))?;
        if !options.skip_memory_check {
            crate::memory::check(config, &info, &device).map_err(Error::Config)?;
            crate::evaluate::check_lengths(
                config,
                &config.eval.lengths,
                config.eval.samples,
                "eval.lengths",
                &device,
            )?;
        }
        let ad_device = device.clone().autodiff();
        // The directory (and its lock) first: a second process is refused before it builds
        // anything.
        let resuming = options.resume && options.out.join("config.toml").is_file();
        let (dir, saved) = if resuming {
            reopen(config, options)?
        } else {
            (RunDir::create(&options.out)?, None)
        };
        let mut model = match fresh_model(config, &info, &ad_device) {
            Ok(model) => model,
            Err(e) => {
                if !resuming {
                    dir.abandon();
                }
                return Err(e);
            }
        };
        let params = model.num_params();
        let state_size = model.state_size(info.seq_len);
        let mut optimizer = AdamWConfig::new()
            .with_beta_1(config.optim.beta1 as f32)
            .with_beta_2(config.optim.beta2 as f32)
            .with_epsilon(config.optim.eps as f32)
            .with_weight_decay(config.optim.weight_decay as f32)
            .init();
        let mut carried = None;
        let state = if resuming {
            let state = match saved {
                Some(saved) => {
                    model = checkpoint::load_model(&saved, model)?;
                    optimizer = checkpoint::load_optimizer(&saved, optimizer)?;
                    carried = checkpoint::read_carried(&saved)?;
                    checkpoint::read_state(&saved)?
                }
                None => checkpoint::State::default(),
            };
            dir.truncate_jsonl("metrics.jsonl", state.step)?;
            state
        } else {
            dir.write_atomic("config.toml", config.to_toml().as_bytes())?;
            dir.write_json(
                "run.json",
                &RunInfo {
                    seed: config.run.seed,
                    backend: options.backend,
                    code_version: &options.code_version,
                    config_source: &options.config_source,
                    started_at: now(),
                    model: config.model.label(),
                    task: &info,
                    d_model: config.model.d_model,
                    match_params: config.model.match_params,
                    match_state: config.model.match_state,
                    params,
                    state_size,
                },
            )?;
            checkpoint::State::default()
        };
        let mixture = match &config.train.length_mixture {
            Some(m) => m
                .lengths
                .iter()
                .map(|&l| config.task.with_seq_len(l).and_then(|c| c.build()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Config(format!("train.length_mixture: {e}")))?,
            None => Vec::new(),
        };
        let carry = config
            .carry_streams(&task)
            .map_err(Error::Config)?
            .map(|(train, valid)| Carry {
                train,
                valid,
                saved: carried,
            });
        let run = Run {
            config,
            options,
            carry,
            mixture,
            eval_set: task.eval_set(config.run.seed, config.eval.samples),
            task,
            info,
            device,
            ad_device,
            dir,
            state,
            params,
            state_size,
            bar: progress_bar(config.train.steps, options.progress),
        };
        let start = run.state.step;
        run.bar.set_position(start as u64);
        run.report(format!(
            "{} ({} parameters, {} floats of state) on {} (T = {}), {} on {}, seed {} → {}{}",
            config.model.label(),
            run.params,
            run.state_size,
            run.info.kind,
            run.info.seq_len,
            config.train.steps,
            options.backend,
            config.run.seed,
            options.out.display(),
            if start > 0 {
                format!(", resumed after step {start}")
            } else {
                String::new()
            }
        ));
        Ok((run, model, optimizer))
    }

    /// The task step `step` trains on: the task's own length, or the length mixture's pick.
    fn train_task(&self, step: usize) -> &Task {
        match &self.config.train.length_mixture {
            Some(m) => &self.mixture[m.pick(self.config.run.seed, step, self.config.train.steps)],
            None => &self.task,
        }
    }

    /// The mean length of a training batch.
    fn mean_len(&self) -> f64 {
        self.config
            .train
            .length_mixture
            .as_ref()
            .map_or(self.info.seq_len as f64, |m| m.mean())
    }

    fn fresh_model(&self) -> Result<SequenceModel, Error> {
        fresh_model(self.config, &self.info, &self.ad_device)
    }

    /// A line on the terminal, above the progress bar if there is one.
    fn report(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// One evaluation: a metrics line, and a line on the terminal.
    fn log_eval(&self, label: &str, step: usize, result: &EvalResult) -> Result<(), Error> {
        self.dir.append_jsonl(
            "metrics.jsonl",
            &MetricsLine::Eval {
                step,
                seq_len: result.seq_len,
                loss: result.loss,
                metric: result.metric,
            },
        )?;
        self.report(format!(
            "{label}: eval loss {:.4} (baseline {:.4}), {} {:.4} (baseline {:.4})",
            result.loss,
            result.baseline_loss,
            self.info.metric.name(),
            result.metric,
            result.baseline_metric
        ));
        Ok(())
    }

    /// The held-out evaluation: `samples`, or with `train.carry_state` the validation streams.
    fn evaluate(&self, model: &SequenceModel, samples: &[Sample]) -> EvalResult {
        match &self.carry {
            Some(carry) => evaluate_streams(&model.valid(), &self.task, &carry.valid, &self.device),
            None => evaluate(
                &model.valid(),
                samples,
                &self.info,
                self.config.eval.batch_size,
                &self.device,
            ),
        }
    }

    /// Step `step`'s batch and the state it starts from: a batch of independent sequences from
    /// a zero state, or with `train.carry_state` the next window of every stream from the
    /// state the last one ended in (zero at the start of a pass over the split).
    fn batch(
        &mut self,
        step: usize,
        model: &SequenceModel,
        carried: &mut Option<ModelState>,
    ) -> Result<(Batch, Option<ModelState>), Error> {
        let Some(carry) = &mut self.carry else {
            let samples = self.train_task(step).train_batch(
                self.config.run.seed,
                step as u64,
                self.config.train.batch_size,
            );
            return Ok((Batch::new(&samples, &self.ad_device), None));
        };
        let window = carry.train.window(step);
        let batch = Batch::new(
            &self.task.stream_batch(&carry.train, window),
            &self.ad_device,
        );
        if let Some(saved) = carry.saved.take() {
            // The shapes of a state come from the model: one step of it gives a template.
            let (_, template) =
                model.forward(model_input(&crate::evaluate::window(&batch, 0, 1)), None);
            let restored =
                ModelState::from_host(template, saved, &self.ad_device).map_err(|e| {
                    Error::Config(format!(
                        "{}: the checkpoint's carried state does not fit this model: {e}",
                        self.options.out.display()
                    ))
                })?;
            *carried = Some(restored);
        }
        if window.index == 0 {
            *carried = None;
        }
        Ok((batch, carried.take()))
    }

    /// The loop, from the step after the checkpoint to the end of the budget, a solved
    /// evaluation, a divergence or a signal.
    fn train(
        &mut self,
        mut model: SequenceModel,
        mut optimizer: ModuleOptimizer,
    ) -> Result<(Outcome, SequenceModel), Error> {
        let (config, train, info) = (self.config, &self.config.train, self.info.clone());
        let start = self.state.step;
        let started = Instant::now();
        let earlier_seconds = self.state.train_seconds;
        let elapsed = || earlier_seconds + started.elapsed().as_secs_f64();
        let tokens_per_step = train.batch_size as f64 * self.mean_len();
        let mut last_checkpoint = Instant::now();
        let mut outcome = Outcome {
            last_step: start,
            stopped: StopReason::Steps,
            diverged: None,
            last_eval: None,
            train_seconds: 0.0,
        };
        let mut carried = None;
        for step in start + 1..=train.steps {
            outcome.last_step = step;
            let (batch, initial) = self.batch(step, &model, &mut carried)?;
            let (outputs, last) = model.forward(model_input(&batch), initial);
            if self.carry.is_some() {
                carried = Some(last.detach());
            }
            let scores = score(outputs, &batch, &info);
            let loss_value: f64 = scores.loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                outcome.diverged = Some((
                    step,
                    format!("the training loss at step {step} is {loss_value}"),
                ));
                break;
            }
            if step == 1 {
                self.state.initial_loss = Some(loss_value);
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
            self.bar.set_position(step as u64);
            self.bar.set_message(format!(
                "loss {loss_value:.4} {} {metric:.3}",
                info.metric.name()
            ));
            self.state.watch.add(loss_value);
            let out_of_time = train.max_seconds > 0.0 && elapsed() >= train.max_seconds;
            let last = step == train.steps || out_of_time;
            if step % train.log_every == 0 || last {
                self.dir.append_jsonl(
                    "metrics.jsonl",
                    &MetricsLine::Train {
                        step,
                        loss: loss_value,
                        metric,
                        grad_norm,
                        lr,
                        tokens_per_second: tokens_per_step * (step - start) as f64
                            / started.elapsed().as_secs_f64(),
                        elapsed_seconds: elapsed(),
                    },
                )?;
                if let Some(reason) = self.state.watch.close_window(
                    step,
                    train.divergence_factor,
                    train.divergence_patience,
                    info.baseline_loss,
                    self.state.initial_loss,
                ) {
                    outcome.diverged = Some((step, reason));
                    break;
                }
            }
            let eval_now = train.eval_every > 0 && step % train.eval_every == 0;
            let mut solved = false;
            if eval_now || last {
                let result = self.evaluate(&model, &self.eval_set);
                self.log_eval(&format!("step {step:>6}"), step, &result)?;
                solved = result.solved;
                outcome.last_eval = Some(result);
                if train.diagnostics {
                    self.diagnose(&model, step)?;
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
            if stop || signal.is_some() || (due && self.state.watch.streak == 0) {
                self.state.step = step;
                self.state.train_seconds = elapsed();
                checkpoint::write(&self.dir, &model, &optimizer, &self.state, carried.as_ref())?;
                last_checkpoint = Instant::now();
            }
            if signal.is_some() {
                break;
            }
            if stop {
                outcome.stopped = if stop_solved {
                    StopReason::Solved
                } else if step < train.steps {
                    StopReason::TimeBudget
                } else {
                    StopReason::Steps
                };
                if outcome.stopped != StopReason::Steps {
                    self.report(format!(
                        "step {step:>6}: stopping ({})",
                        outcome.stopped.describe()
                    ));
                }
                break;
            }
        }
        outcome.train_seconds = elapsed();
        Ok((outcome, model))
    }

    /// `train.diagnostics`: the state norm along the sequence, saturated gates and the Elman
    /// RNN's spectral radius, on the terminal and in the metrics.
    fn diagnose(&self, model: &SequenceModel, step: usize) -> Result<(), Error> {
        let figures = crate::diagnostics::measure(&model.valid(), &self.eval_set, &self.device);
        self.report(format!(
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
        self.dir
            .append_jsonl("metrics.jsonl", &MetricsLine::Diagnostics { step, figures })?;
        Ok(())
    }

    /// After the loop: a diverged run falls back to its last good checkpoint; a signal writes
    /// `interrupted.json` and returns its error; otherwise the final and length evaluations and
    /// `summary.json`.
    fn finish(self, outcome: Outcome, mut model: SequenceModel) -> Result<Summary, Error> {
        let Outcome {
            last_step,
            mut stopped,
            diverged,
            mut last_eval,
            train_seconds,
        } = outcome;
        let divergence = match diverged {
            Some((step, reason)) => {
                let checkpoint_step = match checkpoint::recover(self.dir.path())? {
                    Some(saved) => {
                        let kept = checkpoint::read_state(&saved)?;
                        model = checkpoint::load_model(&saved, self.fresh_model()?)?;
                        kept.step
                    }
                    None => {
                        model = self.fresh_model()?;
                        0
                    }
                };
                self.report(format!(
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
        // A signal during the loop (its checkpoint is written) or after it, before the summary
        // (the length evaluations below stop at their next window): the resumed run evaluates
        // again. A diverged run writes its summary regardless.
        let stop = |last_eval: Option<&EvalResult>| -> Result<(), Error> {
            match crate::interrupt::requested().filter(|_| divergence.is_none()) {
                Some(signal) => {
                    self.bar.finish_and_clear();
                    Err(interrupted(
                        &self.dir,
                        self.options,
                        signal,
                        &self.state,
                        last_eval,
                    )?)
                }
                None => Ok(()),
            }
        };
        stop(last_eval.as_ref())?;
        // Resumed from the final checkpoint of a run killed before its summary, or diverged:
        // evaluate the model at hand.
        let final_eval = last_eval.unwrap_or_else(|| self.evaluate(&model, &self.eval_set));
        let config = self.config;
        let length_eval = crate::evaluate::at_lengths(
            &model.valid(),
            config,
            &config.eval.lengths,
            config.eval.samples,
            "eval.lengths",
            &self.device,
        )?;
        stop(Some(&final_eval))?;
        for (&length, result) in config.eval.lengths.iter().zip(&length_eval) {
            self.log_eval(&format!("length {length:>6}"), last_step, result)?;
        }
        let test_eval = self
            .task
            .test_set(config.run.seed, config.eval.samples)
            .map(|set| self.evaluate(&model, &set));
        stop(Some(&final_eval))?;
        self.bar.finish_and_clear();

        let tokens_per_step = config.train.batch_size as f64 * self.mean_len();
        let summary = Summary {
            model: config.model.label(),
            task: self.info.kind.to_string(),
            params: self.params,
            state_size: self.state_size,
            steps: last_step,
            stopped,
            diverged: divergence.clone(),
            backend: self.options.backend,
            seed: config.run.seed,
            code_version: self.options.code_version.clone(),
            train_seconds,
            train_tokens_per_second: tokens_per_step * last_step as f64 / train_seconds,
            peak_rss_mb: crate::memory::peak_rss_mb(),
            metric: self.info.metric,
            final_eval,
            length_eval,
            test_eval,
            run_dir: self.options.out.clone(),
        };
        self.dir.write_json(RunDir::SUMMARY, &summary)?;
        if let Some(d) = divergence {
            let kept = if d.checkpoint_step > 0 {
                format!(
                    "the summary holds the figures of the last good checkpoint (step {}), kept in {}",
                    d.checkpoint_step,
                    self.dir.path().join("checkpoint").display()
                )
            } else {
                "no checkpoint was written before the loss rose, so the summary holds the \
                 untrained model's figures"
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
}

/// The untrained model, or the weights `train.init_from` names (an estafet export of any model,
/// or a PyTorch RNN/LSTM/GRU state dict).
fn fresh_model(
    config: &ExperimentConfig,
    info: &TaskInfo,
    ad_device: &Device,
) -> Result<SequenceModel, Error> {
    let model = config
        .model
        .init(model_io(info), &mut Init::new(config.run.seed, ad_device));
    let Some(path) = &config.train.init_from else {
        return Ok(model);
    };
    let at = format!("train.init_from {}", path.display());
    let bytes =
        std::fs::read(path).map_err(|e| Error::Config(format!("{at}: cannot read: {e}")))?;
    if crate::export::is_export(&bytes) {
        return crate::export::import(model, config, &bytes, &at, ad_device);
    }
    let classic = matches!(
        config.model.mixer.as_ref().map(|m| m.kind()),
        Some("rnn" | "lstm" | "gru")
    );
    if !classic || config.model.layout != estafet_models::Layout::Stacked {
        return Err(Error::Config(format!(
            "{at}: not an estafet export, so read as PyTorch RNN/LSTM/GRU weights, which need \
             model.mixer.kind = rnn, lstm or gru and model.layout = \"stacked\""
        )));
    }
    crate::weights::load_torch_rnn(model, &bytes, &at, ad_device)
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
    let checkpoint = checkpoint::recover(dir.path())?;
    let at_step = match &checkpoint {
        Some(c) => checkpoint::read_state(c)?.step,
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
        let previous_summary = std::fs::read(out.join(RunDir::SUMMARY))
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
        dir.remove(RunDir::SUMMARY)?;
    }
    dir.remove("interrupted.json")?;
    Ok((dir, checkpoint))
}

/// Writes `interrupted.json` and returns the error that tells the user how to continue.
fn interrupted(
    dir: &RunDir,
    options: &RunOptions,
    signal: Signal,
    state: &checkpoint::State,
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
                let s = sum_all(g.powf_scalar(2.0));
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
