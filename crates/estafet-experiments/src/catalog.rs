//! What `estafet list` and `estafet sample` print: every model with its size, every task with
//! its figures, one example of a task.

use estafet_data::{Sample, Seq, Task, TaskConfig, TaskInfo};
use estafet_models::{Init, InputSpec, Layout, MixerConfig, ModelConfig, ModelIo};

use crate::{Backend, Error};

/// One line of `estafet list models`.
pub struct ModelEntry {
    /// A mixer kind, or a hybrid's pattern as [`ModelConfig::label`] writes it.
    pub name: String,
    pub layers: usize,
    pub params: usize,
    pub state_size: usize,
}

/// The hybrids `estafet list models` shows beside the kinds: Qwen3-Next's three Gated DeltaNet
/// layers per attention layer and Jamba's seven Mamba layers per attention layer.
pub const HYBRIDS: &[&str] = &["gated_deltanet*3+attention", "mamba*7+attention"];

/// The model `name` names, at its defaults, between an embedding and a head at width
/// `d_model`: a mixer kind (`lstm`) as one layer, or a hybrid's pattern as
/// [`ModelConfig::label`] writes it (`gated_deltanet*3+attention`, `attention|mamba` for
/// parallel heads), one layer per mixer. The benchmark's models; errors name the flag.
pub fn named(name: &str, d_model: usize) -> Result<ModelConfig, Error> {
    let kind = |kind: &str| -> Result<MixerConfig, Error> {
        if !MixerConfig::KINDS.contains(&kind) {
            return Err(Error::Config(format!(
                "--models: {name}: unknown model {kind:?}; choose from {}, or a hybrid's \
                 pattern such as {}",
                MixerConfig::KINDS.join(", "),
                HYBRIDS[0]
            )));
        }
        Ok(serde_json::from_value(serde_json::json!({ "kind": kind })).expect("a known kind"))
    };
    let mut pattern = Vec::new();
    for part in name.split('+') {
        let (k, times) = match part.split_once('*') {
            Some((k, n)) => match n.parse::<usize>() {
                Ok(n) if n > 0 => (k, n),
                _ => {
                    return Err(Error::Config(format!(
                        "--models: {name}: `{part}`: repeat a kind a positive number of times, \
                         kind*N"
                    )));
                }
            },
            None => (part, 1),
        };
        let mixer = match k.split('|').collect::<Vec<_>>()[..] {
            [one] => kind(one)?,
            ref branches => MixerConfig::Parallel(estafet_models::parallel::ParallelSpec {
                branches: branches.iter().map(|b| kind(b)).collect::<Result<_, _>>()?,
            }),
        };
        pattern.extend(std::iter::repeat_n(mixer, times));
    }
    let mut config = ModelConfig::uniform(pattern[0].clone(), d_model, 1, Layout::Stacked);
    if pattern.len() > 1 {
        config.mixer = None;
        config.n_layers = pattern.len();
        config.pattern = pattern;
    }
    config
        .validate()
        .map_err(|e| Error::Config(format!("--d-model {d_model}: {name}: {e}")))?;
    Ok(config)
}

/// Each mixer kind with its defaults, as one layer between an embedding and a head (vocabulary
/// 64, the benchmark's shape) at width `d_model`, then the [`HYBRIDS`], one layer per mixer of
/// their pattern; state at `seq_len` tokens.
pub fn models(d_model: usize, seq_len: usize, backend: Backend) -> Result<Vec<ModelEntry>, Error> {
    let device = backend.device()?;
    (MixerConfig::KINDS.iter().chain(HYBRIDS))
        .map(|name| {
            let config = named(name, d_model)?;
            let io = ModelIo {
                input: InputSpec::Tokens { vocab: 64 },
                d_output: 64,
                readout: estafet_models::Readout::PerPosition,
            };
            let model = config.init(io, &mut Init::new(0, &device));
            Ok(ModelEntry {
                name: name.to_string(),
                layers: config.n_layers,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A name reads back as the model whose label it is: a kind as one layer, a pattern one
    /// layer per mixer; a bad repeat or kind is named.
    #[test]
    fn a_models_label_names_it() {
        let lstm = named("lstm", 16).unwrap();
        assert_eq!((lstm.label(), lstm.n_layers), ("lstm".to_string(), 1));
        let more = [
            "mamba+attention+mamba",
            "gru*2",
            "attention|mamba",
            "lstm+mamba|attention*2",
        ];
        for label in HYBRIDS.iter().chain(&more) {
            let model = named(label, 16).unwrap();
            assert_eq!(model.label(), *label);
            assert_eq!(model.n_layers, model.pattern.len().max(1));
        }
        let e = named("lstm*0+gru", 16).unwrap_err().to_string();
        assert!(
            e.contains("`lstm*0`: repeat a kind a positive number"),
            "{e}"
        );
        let e = named("lstm+transformer", 16).unwrap_err().to_string();
        assert!(
            e.starts_with("--models: lstm+transformer: unknown model \"transformer\""),
            "{e}"
        );
    }
}
