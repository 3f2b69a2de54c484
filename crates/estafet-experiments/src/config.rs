//! The experiment config: one TOML schema, unknown fields rejected, `--set` overrides typed.
//!
//! Every error is one line naming where the problem is: `FILE:LINE:COLUMN: field.path: what`
//! for the file, `--set key=value: field.path: what` for an override.

use std::path::Path;

use estafet_data::stream::Streams;
use estafet_data::{Split, Task, TaskConfig};
use estafet_models::ModelConfig;
use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    pub model: ModelConfig,
    pub task: TaskConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub run: RunConfig,
}

/// `[train]`: the loop.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimisation steps.
    pub steps: usize,
    pub batch_size: usize,
    /// Steps between lines of training metrics.
    pub log_every: usize,
    /// Steps between evaluations on the held-out set (0: only at the end).
    pub eval_every: usize,
    /// Steps between checkpoints (0: none by count; see `checkpoint_minutes`).
    pub checkpoint_every: usize,
    /// Minutes of wall time between checkpoints, besides `checkpoint_every`, so that no run
    /// loses more than this to a crash or a kill (0: none by the clock). A checkpoint is also
    /// written at the end, on SIGINT/SIGTERM, and never while the loss is diverging.
    pub checkpoint_minutes: f64,
    /// A safetensors file whose weights initialise the model: an `estafet export` of a model of
    /// the same config (every parameter), or a PyTorch `nn.RNN`/`nn.LSTM`/`nn.GRU` state dict
    /// (the recurrent layers of a stacked model of the same kind, width and depth).
    pub init_from: Option<std::path::PathBuf>,
    /// Stop at the first evaluation that reaches the task's solved level (zoology stops MQAR
    /// at 0.99 this way).
    pub stop_when_solved: bool,
    /// Stop after this many seconds of training (0: no limit). A run stopped by the clock is
    /// not reproducible step for step; its summary says why it stopped.
    pub max_seconds: f64,
    /// Log state norms along a sequence, the fraction of saturated gates and the Elman RNN's
    /// spectral radius with every evaluation (`split = "diagnostics"` in metrics.jsonl).
    pub diagnostics: bool,
    /// Divergence: the run stops when the mean training loss of each of
    /// `divergence_patience` successive logging windows (`log_every` steps each) exceeds
    /// `divergence_factor` × max(the task's baseline loss, the loss at step 1, i.e. the
    /// untrained model's). 0 disables the check; a non-finite loss always stops the run.
    pub divergence_factor: f64,
    pub divergence_patience: usize,
    /// Train on several lengths instead of the task's one (zoology #24: MQAR trained only at
    /// long lengths fails where a mixture of lengths does not): each batch is generated at one
    /// of them, chosen by the schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub length_mixture: Option<LengthMixture>,
    /// Truncated backpropagation through time on a task that is one long sequence (`char_lm`,
    /// a `time_series` read from a CSV file): the training split is read as `batch_size`
    /// parallel streams, consecutive steps read consecutive windows of them, and each window
    /// starts from the previous one's final state, detached (so gradients span one window,
    /// the state everything before it); after a pass over the split the streams start again
    /// from zero, at a seeded offset into their parts so that each pass cuts its windows in new
    /// places. Evaluation then reads the validation split as `eval.streams` streams the same
    /// way (from offset 0), so the model is scored with all the context before each position.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub carry_state: bool,
}

/// `[train.length_mixture]`: the lengths a run trains on and how a batch's length is chosen.
///
/// ```toml
/// [train.length_mixture]
/// lengths = [64, 128, 256]
/// schedule = "uniform"      # each batch's length drawn uniformly (seeded by run.seed and the
///                           # step); "curriculum": the lengths in order, each for an equal
///                           # share of train.steps
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LengthMixture {
    pub lengths: Vec<usize>,
    #[serde(default)]
    pub schedule: LengthSchedule,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthSchedule {
    #[default]
    Uniform,
    Curriculum,
}

impl LengthMixture {
    /// The index into `lengths` of step `step`'s batch (steps count from 1) of a run of
    /// `steps` steps and seed `seed`. Uniform draws depend only on the seed and the step, so a
    /// resumed run draws what an uninterrupted one does; the curriculum follows `steps`, so an
    /// extended run stretches it (as a cosine schedule stretches).
    pub fn pick(&self, seed: u64, step: usize, steps: usize) -> usize {
        use rand::{Rng, SeedableRng};
        let n = self.lengths.len();
        match self.schedule {
            LengthSchedule::Uniform => {
                let stream = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (step as u64);
                rand_chacha::ChaCha8Rng::seed_from_u64(stream).random_range(0..n)
            }
            LengthSchedule::Curriculum => ((step.saturating_sub(1)) * n / steps.max(1)).min(n - 1),
        }
    }

    /// The mean length of a batch over the run (for tokens per second).
    pub fn mean(&self) -> f64 {
        self.lengths.iter().sum::<usize>() as f64 / self.lengths.len().max(1) as f64
    }
}

/// The fields that only budget a run: `--resume` may change them (and records each change in
/// `run.json`), since they decide how long training goes on and what is logged, never what a
/// step computes. Any other difference from the run's config is refused.
pub const BUDGET_FIELDS: &[&str] = &[
    "train.steps",
    "train.max_seconds",
    "train.stop_when_solved",
    "train.eval_every",
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoint_minutes",
    "train.diagnostics",
    "train.divergence_factor",
    "train.divergence_patience",
    "eval.lengths",
];

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 1000,
            batch_size: 32,
            log_every: 10,
            eval_every: 0,
            checkpoint_every: 0,
            init_from: None,
            stop_when_solved: false,
            max_seconds: 0.0,
            diagnostics: false,
            checkpoint_minutes: 10.0,
            divergence_factor: 10.0,
            length_mixture: None,
            divergence_patience: 5,
            carry_state: false,
        }
    }
}

/// `[optim]`: AdamW with global-norm clipping and a warm-up then constant or cosine schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// PyTorch's default; burn's own default is 1e-5.
    pub eps: f64,
    /// Decoupled weight decay (0: plain Adam).
    pub weight_decay: f64,
    /// Largest global gradient norm (`torch.nn.utils.clip_grad_norm_`); 0 disables clipping.
    pub grad_clip: f64,
    /// Steps of linear warm-up from 0 to `lr`.
    pub warmup_steps: usize,
    pub schedule: Schedule,
    /// Cosine only: the learning rate at the last step, as a fraction of `lr`.
    pub final_lr_ratio: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Cosine,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            grad_clip: 1.0,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            final_lr_ratio: 0.1,
        }
    }
}

impl OptimConfig {
    /// The learning rate of optimisation step `step` (1-based) of `total`.
    pub fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warmup = if step <= self.warmup_steps {
            step as f64 / self.warmup_steps as f64
        } else {
            1.0
        };
        let decay = match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = (step.saturating_sub(self.warmup_steps) as f64 / span).min(1.0);
                let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
                self.final_lr_ratio + (1.0 - self.final_lr_ratio) * cosine
            }
        };
        self.lr * warmup * decay
    }
}

/// `[eval]`: the fixed held-out set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub samples: usize,
    pub batch_size: usize,
    /// Further sequence lengths the final model is evaluated at (length generalisation), each
    /// on a held-out set of `samples` sequences of that length.
    pub lengths: Vec<usize>,
    /// With `train.carry_state`: the parallel streams the validation split is read in (1: one
    /// stream, every position scored with all the text before it; more: faster, and the first
    /// window of each stream starts from a zero state).
    pub streams: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            samples: 512,
            batch_size: 128,
            lengths: Vec::new(),
            streams: 1,
        }
    }
}

/// `[run]`: what identifies a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Seeds the initial weights, the training stream and the held-out set.
    pub seed: u64,
}

/// Config text and the name errors are reported under (usually its path).
#[derive(Clone, Debug)]
pub struct ConfigSource {
    pub name: String,
    pub text: String,
}

impl ConfigSource {
    pub fn read(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("{}: cannot read config: {e}", path.display())))?;
        Ok(Self {
            name: path.display().to_string(),
            text,
        })
    }

    /// A short name for run directories: the file stem.
    pub fn stem(&self) -> &str {
        Path::new(&self.name)
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("run")
    }
}

/// Parses `source`, applies `overrides` (`key.path=value`, the value read as TOML and taken as
/// a string if it is not valid TOML), deserializes, resolves the model's budget and validates.
pub fn load(source: &ConfigSource, overrides: &[String]) -> Result<ExperimentConfig, Error> {
    let mut config = parse(source, overrides)?;
    let name = &source.name;
    crate::sizing::resolve(&mut config).map_err(|e| Error::Config(format!("{name}: {e}")))?;
    config
        .validate()
        .map_err(|e| Error::Config(format!("{name}: {e}")))?;
    Ok(config)
}

/// [`load`] without resolving or validating: the config as written. Enough for a config that
/// estafet itself resolved and wrote (a run's `config.toml`), whose `match_params` would
/// otherwise build a dozen models again only to find the width already there.
pub fn parse(source: &ConfigSource, overrides: &[String]) -> Result<ExperimentConfig, Error> {
    let name = &source.name;
    let mut table: toml::Table = source
        .text
        .parse()
        .map_err(|e: toml::de::Error| Error::Config(located(name, &source.text, &e, None)))?;
    let mut set_keys = Vec::with_capacity(overrides.len());
    for item in overrides {
        set_keys.push((apply_override(&mut table, item)?, item));
    }

    let config: ExperimentConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| {
            let path = e.path().to_string();
            let message = e.inner().message().to_string();
            // Blame the override that wrote this field, if one did.
            if let Some((_, item)) = set_keys
                .iter()
                .rev()
                .find(|(key, _)| path == *key || path.starts_with(&format!("{key}.")))
            {
                return Error::Config(format!("--set {item}: {path}: {message}"));
            }
            // Otherwise the file is at fault: deserialize it alone to locate the problem.
            match toml::de::Deserializer::parse(&source.text)
                .map_err(|e| (String::new(), e))
                .and_then(|d| {
                    serde_path_to_error::deserialize::<_, ExperimentConfig>(d)
                        .map_err(|e| (e.path().to_string(), e.into_inner()))
                }) {
                Err((path, e)) => Error::Config(located(name, &source.text, &e, Some(&path))),
                Ok(_) => Error::Config(format!("{name}: {path}: {message}")),
            }
        })?;
    Ok(config)
}

impl ExperimentConfig {
    /// With `train.carry_state`, the streams of `task` (this config's, built) that training
    /// (the training split in `train.batch_size` streams, each pass shifted by `run.seed`) and
    /// evaluation (the validation split in `eval.streams`) read; `None` without it. Carrying a
    /// state needs a task that is one long sequence, long enough for a window per stream in
    /// both splits, a mixer whose state stays the same size, and one length.
    pub fn carry_streams(&self, task: &Task) -> Result<Option<(Streams, Streams)>, String> {
        if !self.train.carry_state {
            return Ok(None);
        }
        if self.model.has("attention") {
            return Err(
                "train.carry_state: attention's state is its KV cache, which would grow \
                        with every window; carry the state of a recurrence"
                    .into(),
            );
        }
        if self.train.length_mixture.is_some() {
            return Err(
                "train.carry_state: the windows of a stream have one length; drop \
                        train.length_mixture"
                    .into(),
            );
        }
        let streams = |split, count, what| {
            let streams = task.streams(split, count).and_then(|s| match (s, split) {
                (Some(s), Split::Train) => s.shifted(self.run.seed).map(Some),
                (s, _) => Ok(s),
            });
            match streams {
                Ok(Some(s)) => Ok(s),
                Ok(None) => Err(format!(
                    "train.carry_state: task.kind = \"{}\" draws independent sequences; \
                     carrying a state needs one long sequence (char_lm, or time_series with \
                     series = \"csv\")",
                    self.task.kind()
                )),
                Err(e) => {
                    let part = match split {
                        Split::Train => "training",
                        Split::Valid => "validation",
                    };
                    Err(format!(
                        "train.carry_state: the {part} split: {e} ({what} = {count})"
                    ))
                }
            }
        };
        Ok(Some((
            streams(Split::Train, self.train.batch_size, "train.batch_size")?,
            streams(Split::Valid, self.eval.streams, "eval.streams")?,
        )))
    }

    /// Checks the constraints serde cannot express; the message starts with the field.
    pub fn validate(&self) -> Result<(), String> {
        self.model.validate()?;
        let task = self.task.build().map_err(|e| e.to_string())?;
        let seq_len = task.info().seq_len;
        for &length in &self.eval.lengths {
            self.task
                .with_seq_len(length)
                .map_err(|e| format!("eval.lengths: {length}: {e}"))?;
        }
        self.carry_streams(&task)?;
        let mixture = self.train.length_mixture.as_ref();
        if let Some(m) = mixture {
            if m.lengths.is_empty() {
                return Err("train.length_mixture.lengths: give at least one length".into());
            }
            for &length in &m.lengths {
                self.task
                    .with_seq_len(length)
                    .map_err(|e| format!("train.length_mixture.lengths: {length}: {e}"))?;
            }
        }
        if let Some(max_len) = self.model.max_seq_len() {
            let longest = self
                .eval
                .lengths
                .iter()
                .chain(mixture.iter().flat_map(|m| m.lengths.iter()))
                .copied()
                .fold(seq_len, usize::max);
            if longest > max_len {
                return Err(format!(
                    "model.mixer.positions.max_len: {max_len} learned positions cannot read \
                     sequences of {longest}"
                ));
            }
        }
        let positive = [
            ("train.steps", self.train.steps as f64),
            ("train.batch_size", self.train.batch_size as f64),
            ("train.log_every", self.train.log_every as f64),
            ("eval.samples", self.eval.samples as f64),
            ("eval.batch_size", self.eval.batch_size as f64),
            ("optim.lr", self.optim.lr),
            ("optim.eps", self.optim.eps),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| v.is_nan() || *v <= 0.0) {
            return Err(format!("{field} must be positive"));
        }
        for (field, v) in [
            ("optim.beta1", self.optim.beta1),
            ("optim.beta2", self.optim.beta2),
        ] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("{field} must lie in [0, 1), got {v}"));
            }
        }
        for (field, v) in [
            ("train.max_seconds", self.train.max_seconds),
            ("train.checkpoint_minutes", self.train.checkpoint_minutes),
            ("train.divergence_factor", self.train.divergence_factor),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("{field} must be a number ≥ 0 (0: off), got {v}"));
            }
        }
        if self.train.divergence_factor > 0.0 && self.train.divergence_patience == 0 {
            return Err("train.divergence_patience must be at least 1".into());
        }
        if !(self.optim.weight_decay >= 0.0 && self.optim.grad_clip >= 0.0) {
            return Err("optim.weight_decay and optim.grad_clip must not be negative".into());
        }
        if !(0.0..=1.0).contains(&self.optim.final_lr_ratio) {
            return Err("optim.final_lr_ratio must lie in [0, 1]".into());
        }
        Ok(())
    }

    /// The config as it was run, every default written out.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("an experiment config is always valid TOML")
    }

    /// How `self` differs from `earlier`, field by field (`path`, earlier value, this value),
    /// split into the [`BUDGET_FIELDS`] and the rest. A field absent on one side reads `–`.
    pub fn changes_from(&self, earlier: &ExperimentConfig) -> (Vec<Change>, Vec<Change>) {
        let table = |c: &ExperimentConfig| {
            toml::Value::try_from(c).expect("an experiment config is always valid TOML")
        };
        let (mut old, mut new) = (Vec::new(), Vec::new());
        flatten("", &table(earlier), &mut old);
        flatten("", &table(self), &mut new);
        let value_at = |leaves: &[(String, String)], path: &str| {
            leaves
                .iter()
                .find(|(p, _)| p == path)
                .map_or("–".to_string(), |(_, v)| v.clone())
        };
        let mut paths: Vec<&String> = old.iter().chain(&new).map(|(p, _)| p).collect();
        paths.sort();
        paths.dedup();
        let (mut budget, mut other) = (Vec::new(), Vec::new());
        for path in paths {
            let (was, now) = (value_at(&old, path), value_at(&new, path));
            if was != now {
                let change = Change {
                    field: path.clone(),
                    was,
                    now,
                };
                if BUDGET_FIELDS.contains(&path.as_str()) {
                    budget.push(change);
                } else {
                    other.push(change);
                }
            }
        }
        (budget, other)
    }
}

/// One field that differs between two configs, its values written as TOML.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Change {
    pub field: String,
    pub was: String,
    pub now: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} → {})", self.field, self.was, self.now)
    }
}

/// The leaves of a TOML value as `(dotted.path, value)`; arrays are leaves.
fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
    match value {
        toml::Value::Table(table) => {
            for (key, v) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&path, v, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.to_string())),
    }
}

/// Sets `key.path=value` in `table`; returns the key path.
pub(crate) fn apply_override(table: &mut toml::Table, item: &str) -> Result<String, Error> {
    let bad = |why: &str| Error::Config(format!("--set {item}: {why}"));
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| bad("expected KEY.PATH=VALUE"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad("empty key"));
    }
    let value = format!("v = {}", raw.trim())
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
    let (last, parents) = parts.split_last().expect("split yields at least one part");
    let mut node = table;
    for (i, part) in parents.iter().enumerate() {
        node = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| bad(&format!("`{}` is not a table", parts[..=i].join("."))))?;
    }
    node.insert(last.to_string(), value);
    Ok(key.to_string())
}

/// `NAME:LINE:COLUMN: path: message`, on one line.
fn located(name: &str, text: &str, e: &toml::de::Error, path: Option<&str>) -> String {
    let at = match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("{name}:{line}:{column}")
        }
        None => name.to_string(),
    };
    let message = e.message().trim().replace('\n', " ");
    match path {
        Some(p) if !p.is_empty() && p != "." => format!("{at}: {p}: {message}"),
        _ => format!("{at}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A length mixture samples what it says: uniform draws each length about equally often,
    /// the same draws for the same seed and others for another; a curriculum walks the lengths
    /// in order, an equal share of the steps each; a bad length is refused by name.
    #[test]
    fn a_length_mixture_samples_what_it_says() {
        let uniform = LengthMixture {
            lengths: vec![64, 128, 256],
            schedule: LengthSchedule::Uniform,
        };
        let picks =
            |seed| -> Vec<usize> { (1..=3000).map(|s| uniform.pick(seed, s, 3000)).collect() };
        let (a, b) = (picks(0), picks(1));
        assert_eq!(a, picks(0), "the same seed draws the same lengths");
        assert_ne!(a, b, "another seed draws others");
        for i in 0..3 {
            let share = a.iter().filter(|&&p| p == i).count() as f64 / 3000.0;
            assert!((share - 1.0 / 3.0).abs() < 0.03, "length {i}: {share}");
        }
        let curriculum = LengthMixture {
            schedule: LengthSchedule::Curriculum,
            ..uniform
        };
        let walk: Vec<usize> = (1..=300).map(|s| curriculum.pick(0, s, 300)).collect();
        assert!(walk.windows(2).all(|w| w[0] <= w[1]), "in order");
        for i in 0..3 {
            assert_eq!(walk.iter().filter(|&&p| p == i).count(), 100, "length {i}");
        }
        let e = load(
            &copy_lstm(),
            &["train.length_mixture = { lengths = [30, 2] }".into()],
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("train.length_mixture.lengths: 2"), "{e}");
    }

    fn copy_lstm() -> ConfigSource {
        ConfigSource {
            name: "configs/copy-lstm.toml".into(),
            text: include_str!("../../../configs/copy-lstm.toml").into(),
        }
    }

    #[test]
    fn a_parameter_budget_picks_the_nearest_width() {
        let source = copy_lstm();
        let config = load(&source, &["model.match_params=50000".into()]).unwrap();
        let io = crate::evaluate::model_io(&config.task.build().unwrap().info());
        let device = crate::Backend::default_compiled()
            .unwrap()
            .device()
            .unwrap();
        let params = |d: usize| {
            let mut m = config.model.clone();
            m.d_model = d;
            burn::module::Module::num_params(
                &m.init(io, &mut estafet_models::Init::new(0, &device)),
            )
        };
        let d = config.model.d_model;
        let miss = params(d).abs_diff(50_000);
        assert!(miss <= params(d - 1).abs_diff(50_000) && miss <= params(d + 1).abs_diff(50_000));
        assert!(miss < 2_000, "d {d}: {} parameters", params(d));
        // Resolving the resolved config again keeps the width.
        let again = load(
            &ConfigSource {
                name: "resolved".into(),
                text: config.to_toml(),
            },
            &[],
        )
        .unwrap();
        assert_eq!(again.model.d_model, d);
    }

    fn source(text: &str) -> ConfigSource {
        ConfigSource {
            name: "c.toml".into(),
            text: text.into(),
        }
    }

    const BASE: &str = r#"
[model]
d_model = 8

[model.mixer]
kind = "lstm"

[task]
kind = "copy_memory"
lag = 5

[train]
steps = 3
"#;

    fn err(text: &str, overrides: &[&str]) -> String {
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        load(&source(text), &overrides).unwrap_err().to_string()
    }

    #[test]
    fn the_shipped_default_loads_and_round_trips() {
        let config = load(&copy_lstm(), &[]).unwrap();
        let again = load(&source(&config.to_toml()), &[]).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let e = err(&BASE.replace("steps = 3", "steps = 3\nstepz = 4"), &[]);
        assert!(e.starts_with("c.toml:14:"), "{e}");
        assert!(e.contains("stepz"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let e = err(&BASE.replace("steps = 3", "steps = \"many\""), &[]);
        assert!(e.starts_with("c.toml:13:"), "{e}");
        assert!(e.contains("train.steps"), "{e}");
    }

    #[test]
    fn unknown_mixer_kind_is_rejected() {
        let e = err(&BASE.replace("\"lstm\"", "\"lstmm\""), &[]);
        assert!(e.contains("lstmm"), "{e}");
    }

    #[test]
    fn syntax_error_is_located() {
        let e = err(&BASE.replace("lag = 5", "lag = "), &[]);
        assert!(e.starts_with("c.toml:10:"), "{e}");
        assert!(!e.contains('\n'));
    }

    #[test]
    fn overrides_are_typed() {
        let overrides = [
            "train.steps=7".to_string(),
            "optim.schedule=cosine".to_string(),
        ];
        let config = load(&source(BASE), &overrides).unwrap();
        assert_eq!(config.train.steps, 7);
        assert_eq!(config.optim.schedule, Schedule::Cosine);
        let e = err(BASE, &["train.steps=many"]);
        assert!(e.starts_with("--set train.steps=many: train.steps:"), "{e}");
        let e = err(BASE, &["train.stepz=1"]);
        assert!(e.contains("stepz"), "{e}");
        let e = err(BASE, &["train.steps"]);
        assert!(e.contains("KEY.PATH=VALUE"), "{e}");
    }

    #[test]
    fn impossible_values_are_rejected() {
        let e = err(BASE, &["task.lag=0"]);
        assert!(e.starts_with("c.toml: task.lag:"), "{e}");
        let e = err(BASE, &["optim.beta2=1.0"]);
        assert!(e.contains("optim.beta2"), "{e}");
        let e = err(BASE, &["train.steps=0"]);
        assert!(e.contains("train.steps must be positive"), "{e}");
    }

    #[test]
    fn changes_are_split_into_budget_and_the_rest() {
        let base = load(&source(BASE), &[]).unwrap();
        let other = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            load(&source(BASE), &o).unwrap()
        };
        assert_eq!(base.changes_from(&base), (vec![], vec![]));
        let (budget, rest) = other(&["train.steps=9", "eval.lengths=[40]"]).changes_from(&base);
        assert_eq!(
            budget.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["eval.lengths ([] → [40])", "train.steps (3 → 9)"]
        );
        assert!(rest.is_empty());
        let (budget, rest) =
            other(&["optim.lr=0.5", "model.mixer.kind=\"gru\""]).changes_from(&base);
        assert!(budget.is_empty());
        let fields: Vec<&str> = rest.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"optim.lr"), "{fields:?}");
        assert!(fields.contains(&"model.mixer.kind"), "{fields:?}");
        // Every budget field names a real field.
        let leaves = {
            let mut v = Vec::new();
            flatten("", &toml::Value::try_from(&base).unwrap(), &mut v);
            v
        };
        for field in BUDGET_FIELDS {
            assert!(leaves.iter().any(|(p, _)| p == field), "{field}");
        }
    }

    #[test]
    fn schedule_warms_up_then_decays() {
        let optim = OptimConfig {
            lr: 1.0,
            warmup_steps: 10,
            schedule: Schedule::Cosine,
            final_lr_ratio: 0.1,
            ..OptimConfig::default()
        };
        assert!((optim.lr_at(5, 110) - 0.5).abs() < 1e-12);
        assert!((optim.lr_at(10, 110) - 1.0).abs() < 1e-12);
        assert!((optim.lr_at(60, 110) - 0.55).abs() < 1e-12);
        assert!((optim.lr_at(110, 110) - 0.1).abs() < 1e-12);
    }
}
