//! What `estafet list` and `estafet sample` print: every model with its size, every task with
//! its figures, one example of a task.

use estafet_data::{Sample, Seq, Task, TaskConfig, TaskInfo};
use estafet_models::{Init, InputSpec, Layout, MixerConfig, ModelConfig, ModelIo};

use crate::{Backend, Error};

/// One line of `estafet list models`.
pub struct ModelEntry {
    pub kind: &'static str,
    pub params: usize,
    pub state_size: usize,
}

/// Mixer `kind` with its defaults as the benchmark's model: one layer between an embedding and
/// a head, at width `d_model`. Errors name the flag.
pub fn one_layer(kind: &str, d_model: usize) -> Result<ModelConfig, Error> {
    let mixer: MixerConfig = serde_json::from_value(serde_json::json!({ "kind": kind }))
        .map_err(|e| Error::Config(format!("--models: {kind}: {e}")))?;
    let config = ModelConfig {
        mixer,
        d_model,
        n_layers: 1,
        layout: Layout::Stacked,
        mlp_expand: 0,
        match_params: None,
        match_state: None,
    };
    config
        .validate()
        .map_err(|e| Error::Config(format!("--d-model {d_model}: {kind}: {e}")))?;
    Ok(config)
}

/// Each mixer kind with its defaults, as one layer between an embedding and a head (vocabulary
/// 64, the benchmark's shape) at width `d_model`; state at `seq_len` tokens.
pub fn models(d_model: usize, seq_len: usize, backend: Backend) -> Result<Vec<ModelEntry>, Error> {
    let device = backend.device()?;
    MixerConfig::KINDS
        .iter()
        .map(|kind| {
            let config = one_layer(kind, d_model)?;
            let io = ModelIo {
                input: InputSpec::Tokens { vocab: 64 },
                d_output: 64,
                readout: estafet_models::Readout::PerPosition,
            };
            let model = config.init(io, &mut Init::new(0, &device));
            Ok(ModelEntry {
                kind,
                params: burn::module::Module::num_params(&model),
                state_size: model.state_size(seq_len),
            })
        })
        .collect()
}

/// Every task with its default parameters (as `key = value, …`) and what it declares.
pub fn tasks() -> Vec<(String, TaskInfo)> {
    TaskConfig::defaults()
        .into_iter()
        .map(|config| {
            let info = config.build().expect("defaults are valid").info();
            (parameters(&config), info)
        })
        .collect()
}

/// `key = value, …` of a task config, without its kind.
pub fn parameters(config: &TaskConfig) -> String {
    let table = toml::Table::try_from(config).expect("a task config is a table");
    table
        .iter()
        .filter(|(k, _)| *k != "kind")
        .map(|(k, v)| format!("{k} = {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Task `kind` with `overrides` (`key=value`, as `--set task.key=value` would) and one sample
/// of its training stream for `seed`.
pub fn sample(
    kind: &str,
    overrides: &[String],
    seed: u64,
) -> Result<(TaskConfig, Task, Sample), Error> {
    let mut table = toml::Table::new();
    table.insert("kind".into(), toml::Value::String(kind.into()));
    for item in overrides {
        crate::config::apply_override(&mut table, item)?;
    }
    let config: TaskConfig = serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| Error::Config(format!("task {kind}: {}", e.inner().message())))?;
    let task = config.build().map_err(|e| Error::Config(e.to_string()))?;
    let sample = task.train_batch(seed, 0, 1).remove(0);
    Ok((config, task, sample))
}

/// Rows `t`, `input`, `target` (scored positions only, `.` elsewhere), aligned in columns;
/// a character task's ids are shown as its characters, real values with two decimals (several
/// per position joined by `/`).
pub fn render(task: &Task, sample: &Sample) -> String {
    let cells = |seq: &Seq| -> Vec<String> {
        (0..seq.len())
            .map(|t| match (seq, task) {
                (Seq::Tokens(v), Task::CharLm(lm)) => match lm.vocab()[v[t] as usize] {
                    ' ' => "␠".into(),
                    '\n' => "↵".into(),
                    c => c.to_string(),
                },
                (Seq::Tokens(v), Task::ModularArithmetic(ma))
                    if std::ptr::eq(seq, &sample.input) =>
                {
                    ma.show(v[t])
                }
                (Seq::Tokens(v), _) => v[t].to_string(),
                (Seq::Reals { .. }, _) => seq
                    .reals_at(t)
                    .iter()
                    .map(|x| format!("{x:.2}"))
                    .collect::<Vec<_>>()
                    .join("/"),
            })
            .collect()
    };
    let input = cells(&sample.input);
    let target: Vec<String> = cells(&sample.target)
        .into_iter()
        .zip(&sample.mask)
        .map(|(v, &m)| if m { v } else { ".".into() })
        .collect();
    let t: Vec<String> = (0..sample.input.len()).map(|i| i.to_string()).collect();
    let width = input
        .iter()
        .chain(&target)
        .chain(&t)
        .map(|c| c.chars().count())
        .max()
        .unwrap_or(1);
    let row = |label: &str, cells: &[String]| {
        let cells: Vec<String> = cells.iter().map(|c| format!("{c:>width$}")).collect();
        format!("{label:<7} {}", cells.join(" "))
    };
    [row("t", &t), row("input", &input), row("target", &target)].join("\n")
}
