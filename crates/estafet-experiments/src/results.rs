//! The typed results a run writes and every reader (report, sweep, the command line) reads
//! back: `summary.json` ([`Summary`], with its [`EvalResult`]s) and the part of `run.json` the
//! report needs ([`RunHeader`]).

use std::path::{Path, PathBuf};

use estafet_data::Metric;
use serde::{Deserialize, Serialize};

use crate::run_dir::RunDir;
use crate::{Backend, Error};

/// `summary.json`: written last, so its presence means the run completed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub model: String,
    pub task: String,
    pub params: usize,
    /// Floats of state per sequence at the task's length (attention: its KV cache).
    pub state_size: usize,
    /// Steps taken (fewer than `train.steps` when the run stopped early).
    pub steps: usize,
    pub stopped: StopReason,
    /// Where and why training diverged (`stopped = "diverged"`); the figures below are then
    /// those of the last good checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
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
    /// The final model on the task's test set, a second held-out set that neither training nor
    /// early stopping saw ([`estafet_data::Task::test_set`]): what a report that picks a
    /// setting by `final_eval` quotes. Absent for tasks read from a data file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_eval: Option<EvalResult>,
    pub run_dir: PathBuf,
}

impl Summary {
    /// The summary of the complete run in `dir`.
    pub fn read(dir: &Path) -> Result<Self, Error> {
        read_json(&dir.join(RunDir::SUMMARY))
    }

    /// The two lines `estafet run` ends with: the figures beside the baselines, and the cost.
    pub fn describe(&self) -> String {
        let e = &self.final_eval;
        format!(
            "{} on {}: eval loss {:.4} (baseline {:.4}), {} {:.4} (baseline {:.4}, solved at {:.4}){}{}\n\
             {} steps in {:.1} s ({:.0} tokens/s); run directory: {}",
            self.model,
            self.task,
            e.loss,
            e.baseline_loss,
            self.metric.name(),
            e.metric,
            e.baseline_metric,
            e.solved_metric,
            e.scaled_accuracy
                .map_or(String::new(), |s| format!(", scaled accuracy {s:.3}")),
            if e.solved { ": solved" } else { "" },
            self.steps,
            self.train_seconds,
            self.train_tokens_per_second,
            self.run_dir.display()
        )
    }
}

/// Why training ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Steps => "all steps taken",
            StopReason::Solved => "the task is solved",
            StopReason::TimeBudget => "train.max_seconds is spent",
            StopReason::Diverged => "training diverged",
        }
    }
}

/// How a run diverged.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Divergence {
    /// The step at which the run stopped.
    pub step: usize,
    pub reason: String,
    /// The step of the checkpoint kept (0: none was written; the figures are the untrained
    /// model's).
    pub checkpoint_step: usize,
}

/// Figures on the held-out set, beside the task's baselines.
#[derive(Clone, Debug, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scaled_accuracy: Option<f64>,
}

/// What the report reads of `run.json` (which `train` writes whole, the task's full
/// description included).
#[derive(Clone, Debug, Deserialize)]
pub struct RunHeader {
    pub task: TaskHeader,
    pub params: usize,
    pub state_size: usize,
}

/// The task as `run.json` describes it.
#[derive(Clone, Debug, Deserialize)]
pub struct TaskHeader {
    pub kind: String,
    pub seq_len: usize,
    pub metric: Metric,
    pub baseline_metric: f64,
    pub solved_metric: f64,
}

impl RunHeader {
    pub fn read(dir: &Path) -> Result<Self, Error> {
        read_json(&dir.join("run.json"))
    }
}

/// A JSON file of estafet's as `T`; a missing or malformed one is a one-line error naming it.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{}: cannot read: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not a valid estafet file: {e}", path.display())))
}
