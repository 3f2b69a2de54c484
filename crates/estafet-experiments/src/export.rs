//! Trained models out, and back in: `estafet export RUN_DIR --out FILE.safetensors` writes every
//! parameter of a run's checkpointed model as float32, and `FILE.json` beside it (the run's
//! config, the model's kind and every tensor's name and shape), for analysis in Python:
//!
//! ```python
//! from safetensors.torch import load_file
//! w = load_file("mamba.safetensors")         # {"encoder.Embedding.weight": ..., "blocks.0.mixer.in_proj.weight": ...}
//! block = mamba_ssm.modules.mamba_simple.Mamba(d_model=64, d_state=16)
//! block.load_state_dict({k.removeprefix("blocks.0.mixer."): v for k, v in w.items() if k.startswith("blocks.0.mixer.")})
//! ```
//!
//! Where a reference implementation fixes them, names and layouts are the reference's
//! (`estafet_models::reference`): each layer's Mamba, Mamba-2, Gated DeltaNet or RWKV-7 mixer as
//! its reference module's state dict under `blocks.L.mixer.`, and the classic cells of a
//! `stacked` model as PyTorch's `nn.RNN`/`nn.LSTM`/`nn.GRU` state dict under the kind's name
//! (`lstm.weight_ih_l0 [4H, D]`, …). Everything else keeps its module path in
//! [`SequenceModel`] (`blocks.0.norm.gamma`, `head.weight`, linear weights `[in, out]`).
//! `train.init_from` reads an export of any model back (the file says which, in its metadata),
//! so that export then import gives identical outputs; `make_fixtures.py --check-export` runs an
//! export in its PyTorch definitions.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::Device;
use estafet_models::reference::{self, Layout as RenameLayout, Rename};
use estafet_models::{Layout, SequenceModel};
use safetensors::SafeTensors;
use serde::Serialize;

use crate::config::ExperimentConfig;
use crate::{Error, float_tensors};

/// The metadata key and value that mark an estafet export.
const FORMAT_KEY: &str = "format";
const FORMAT: &str = "estafet-export-1";

/// What `FILE.json` says.
#[derive(Serialize)]
struct Manifest<'a> {
    format: &'static str,
    model: String,
    /// Where the names come from: estafet's module paths, and the reference's for the mixers.
    naming: String,
    /// Every tensor: its name and shape.
    tensors: BTreeMap<String, Vec<usize>>,
    /// The run's resolved config.
    config: &'a ExperimentConfig,
    /// One held-out sequence and the model's output for it, so that a reimplementation (in
    /// PyTorch, say) can check that it reads the weights as estafet does.
    probe: Option<Probe>,
}

/// An input `[1, T]` (token ids) or `[1, T, W]` (values) and the output `[1, T, O]`.
#[derive(Serialize)]
pub struct Probe {
    pub input: serde_json::Value,
    pub output: Vec<Vec<Vec<f32>>>,
}

impl Probe {
    /// The model's output for `batch`'s first sequence.
    pub fn of(model: &SequenceModel, batch: &estafet_data::Batch) -> Self {
        let input = crate::evaluate::model_input(batch);
        let (as_json, first) = match input {
            estafet_models::Input::Tokens(x) => {
                let x = x.narrow(0, 0, 1);
                let ids = x.to_data().convert::<i64>().try_into_vec::<i64>().unwrap();
                (serde_json::json!([ids]), estafet_models::Input::Tokens(x))
            }
            estafet_models::Input::Features(x) => {
                let x = x.narrow(0, 0, 1);
                let [_, t, w] = x.dims();
                let v = x.to_data().convert::<f32>().try_into_vec::<f32>().unwrap();
                let rows: Vec<Vec<f32>> = (0..t).map(|i| v[i * w..(i + 1) * w].to_vec()).collect();
                (
                    serde_json::json!([rows]),
                    estafet_models::Input::Features(x),
                )
            }
        };
        let (y, _) = model.forward(first, None);
        let [_, t, o] = y.dims();
        let v = y
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        Self {
            input: as_json,
            output: vec![(0..t).map(|i| v[i * o..(i + 1) * o].to_vec()).collect()],
        }
    }
}

/// How each parameter of a model is named in an export: a layer's mixer under its reference
/// module's names (`estafet_models::reference`), prefixed `blocks.L.mixer.`, or, for the classic
/// cells of a stacked model, under PyTorch's multi-layer names (`lstm.weight_ih_l0`); every
/// other parameter under its estafet module path.
struct Naming {
    /// Per layer: the prefix of its mixer's exported names and their renames, if it has any.
    layers: Vec<Option<(String, Vec<Rename>)>>,
    /// What the manifest says of the names.
    says: String,
}

impl Naming {
    fn of(model: &SequenceModel, config: &ExperimentConfig) -> Self {
        // torch.nn's multi-layer cells are one kind throughout.
        let kind = config.model.mixer.as_ref().map_or("", |m| m.kind());
        let classic =
            matches!(kind, "rnn" | "lstm" | "gru") && config.model.layout == Layout::Stacked;
        let layers = model
            .blocks
            .iter()
            .enumerate()
            .map(|(l, block)| {
                if classic {
                    let torch = |ours: &str, theirs: &str, layout| {
                        Rename::whole(ours, &format!("{kind}.{theirs}_l{l}"), layout)
                    };
                    return Some((
                        String::new(),
                        vec![
                            torch("input.weight", "weight_ih", RenameLayout::Transposed),
                            torch("input.bias", "bias_ih", RenameLayout::Same),
                            torch("hidden.weight", "weight_hh", RenameLayout::Transposed),
                            torch("hidden.bias", "bias_hh", RenameLayout::Same),
                        ],
                    ));
                }
                reference::names(&block.mixer).map(|names| (format!("blocks.{l}.mixer."), names))
            })
            .collect();
        let says = if classic {
            format!(
                "estafet module paths; the recurrent layers as torch.nn.{}'s state dict",
                kind.to_uppercase()
            )
        } else {
            // Which layers read as which reference module: every layer, or in a hybrid each
            // module's layers.
            let mut modules: Vec<(&str, Vec<usize>)> = Vec::new();
            for (l, block) in model.blocks.iter().enumerate() {
                let Some(module) = reference::module(&block.mixer) else {
                    continue;
                };
                match modules.iter_mut().find(|(m, _)| *m == module) {
                    Some((_, layers)) => layers.push(l),
                    None => modules.push((module, vec![l])),
                }
            }
            let every = |layers: &[usize]| layers.len() == model.blocks.len();
            (modules.iter())
                .map(|(module, layers)| match every(layers) {
                    true => format!("; blocks.L.mixer.* as {module}'s state dict"),
                    false => format!(
                        "; blocks.L.mixer.* for L in {} as {module}'s state dict",
                        (layers.iter().map(|l| l.to_string()))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
                .fold("estafet module paths".to_string(), |says, part| {
                    says + &part
                })
        };
        Self { layers, says }
    }

    /// The renames of the parameter at `path` and the prefix of their names, if it has any.
    fn rename(&self, path: &[String]) -> Option<(&str, &Rename)> {
        let [blocks, layer, mixer, below @ ..] = path else {
            return None;
        };
        if blocks != "blocks" || mixer != "mixer" || below.is_empty() {
            return None;
        }
        let (prefix, renames) = self.layers.get(layer.parse::<usize>().ok()?)?.as_ref()?;
        Some((prefix, reference::rename_at(renames, below)))
    }
}

/// Writes `model` (of the run `config`) to `out` and its manifest to `out` with `.json`;
/// returns the number of tensors and of parameters written.
pub fn export(
    model: &SequenceModel,
    config: &ExperimentConfig,
    probe: Option<Probe>,
    out: &Path,
) -> Result<(usize, usize), Error> {
    let naming = Naming::of(model, config);
    let tensors = reference::collect_named(model, &|path| naming.rename(path));
    let metadata = std::collections::HashMap::from([
        (FORMAT_KEY.to_string(), FORMAT.to_string()),
        ("model".to_string(), config.model.label()),
        ("config".to_string(), config.to_toml()),
    ]);
    let serialized = float_tensors::to_bytes(&tensors, Some(metadata))?;
    crate::run_dir::write_atomic(out, &serialized)?;
    let manifest = Manifest {
        format: FORMAT,
        model: config.model.label(),
        naming: naming.says.clone(),
        tensors: tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.shape.clone()))
            .collect(),
        config,
        probe,
    };
    let mut json = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
    json.push('\n');
    crate::run_dir::write_atomic(&out.with_extension("json"), json.as_bytes())?;
    let params = tensors.iter().map(|(_, t)| t.values.len()).sum();
    Ok((tensors.len(), params))
}

/// Whether the safetensors file `bytes` is an estafet export.
pub fn is_export(bytes: &[u8]) -> bool {
    SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, meta)| meta.metadata().clone())
        .is_some_and(|m| m.get(FORMAT_KEY).map(String::as_str) == Some(FORMAT))
}

/// `model` (built from `config`) with every parameter read from the export `bytes`; `at` names
/// the file in errors.
pub fn import(
    model: SequenceModel,
    config: &ExperimentConfig,
    bytes: &[u8],
    at: &str,
    device: &Device,
) -> Result<SequenceModel, Error> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Config(format!("{at}: not a safetensors file: {e}")))?;
    let kind = SafeTensors::read_metadata(bytes)
        .ok()
        .and_then(|(_, meta)| meta.metadata().clone())
        .and_then(|m| m.get("model").cloned())
        .unwrap_or_default();
    if kind != config.model.label() {
        return Err(Error::Config(format!(
            "{at}: an export of a {kind} model; this config's model is {}",
            config.model.label()
        )));
    }
    let naming = Naming::of(&model, config);
    let lookup = |name: &str| float_tensors::read(&file, name);
    let (model, read) = reference::load_named(model, &|path| naming.rename(path), &lookup, device)
        .map_err(|e| {
            Error::Config(format!(
                "{at}: {e} (an export of a different model? its .json says which)"
            ))
        })?;
    if read != file.len() {
        return Err(Error::Config(format!(
            "{at}: the file holds {} tensors, the model {read}: an export of a different model",
            file.len(),
        )));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ConfigSource, parse};
    use crate::evaluate::model_io;
    use burn::module::Module;
    use burn::tensor::{Distribution, Tensor};
    use estafet_models::{Init, Input, MixerConfig};

    fn device() -> Device {
        crate::Backend::default_compiled()
            .unwrap()
            .device()
            .unwrap()
    }

    fn config(mixer: &MixerConfig, layout: &str) -> ExperimentConfig {
        let mut table: toml::Table = toml::from_str(&format!(
            "[model]\nd_model = 8\nn_layers = 2\nlayout = \"{layout}\"\n\
             [task]\nkind = \"parity\"\nseq_len = 9\n[train]\nsteps = 1\n"
        ))
        .unwrap();
        table["model"]
            .as_table_mut()
            .unwrap()
            .insert("mixer".into(), toml::Value::try_from(mixer).unwrap());
        parse(
            &ConfigSource {
                name: "test".into(),
                text: toml::to_string(&table).unwrap(),
            },
            &[],
        )
        .unwrap()
    }

    /// Every kind, in both layouts: a model exported and imported into a model of another seed
    /// gives exactly the outputs of the one exported; the classic cells of a stacked model go
    /// out under PyTorch's names, the mixers with a reference module under its names and
    /// layouts (a convolution `[C, 1, K]`, RWKV-7's vectors `[1, 1, C]`); an export of another
    /// kind is refused by name.
    #[test]
    fn export_then_import_gives_identical_outputs_for_every_model() {
        let device = device();
        let dir = std::env::temp_dir().join(format!("estafet-export-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for mixer in MixerConfig::all() {
            for layout in ["stacked", "residual"] {
                let config = config(&mixer, layout);
                let info = config.task.build().unwrap().info();
                let build = |seed| {
                    config
                        .model
                        .init(model_io(&info), &mut Init::new(seed, &device))
                };
                let (ours, other) = (build(1), build(2));
                let path = dir.join(format!("{}-{layout}.safetensors", mixer.kind()));
                let (_, params) = export(&ours, &config, None, &path).unwrap();
                assert_eq!(params, ours.num_params());
                let bytes = std::fs::read(&path).unwrap();
                assert!(is_export(&bytes));
                let names = SafeTensors::deserialize(&bytes).unwrap().names().len();
                let what = format!("{} {layout}", mixer.kind());
                if ["rnn", "lstm", "gru"].contains(&mixer.kind()) && layout == "stacked" {
                    let file = SafeTensors::deserialize(&bytes).unwrap();
                    let w = file
                        .tensor(&format!("{}.weight_ih_l1", mixer.kind()))
                        .unwrap_or_else(|_| panic!("{what}: torch names"));
                    assert_eq!(w.shape()[1], 8, "{what}: [G·H, in]");
                }
                let reference = match mixer.kind() {
                    "mamba" | "mamba2" => Some(("blocks.1.mixer.conv1d.weight", 1)),
                    "gated_deltanet" => Some(("blocks.1.mixer.k_conv1d.weight", 1)),
                    "rwkv7" => Some(("blocks.1.mixer.x_r", 0)),
                    _ => None,
                };
                if let Some((name, unit)) = reference {
                    let file = SafeTensors::deserialize(&bytes).unwrap();
                    let w = file
                        .tensor(name)
                        .unwrap_or_else(|_| panic!("{what}: {name}"));
                    assert_eq!(w.shape()[unit], 1, "{what}: {name} {:?}", w.shape());
                }
                let loaded = import(other, &config, &bytes, "test", &device).unwrap();
                let tokens =
                    Tensor::<2>::random([2, 9], Distribution::Uniform(0.0, 2.0), &device).int();
                let (a, _) = ours.forward(Input::Tokens(tokens.clone()), None);
                let (b, _) = loaded.forward(Input::Tokens(tokens), None);
                assert_eq!(
                    a.into_data().try_to_vec::<f32>().unwrap(),
                    b.into_data().try_to_vec::<f32>().unwrap(),
                    "{what} ({names} tensors)"
                );
            }
        }
        let lstm = config(&MixerConfig::all()[1], "stacked");
        let gru_bytes = std::fs::read(dir.join("gru-stacked.safetensors")).unwrap();
        let info = lstm.task.build().unwrap().info();
        let model = lstm.model.init(model_io(&info), &mut Init::new(0, &device));
        let e = import(model, &lstm, &gru_bytes, "x", &device)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("an export of a gru model"), "{e}");
        std::fs::remove_dir_all(dir).ok();
    }

    /// A hybrid's layers go out each under its own reference's names, the manifest says which
    /// layers read as which module, the round trip is exact, and a uniform model refuses it.
    #[test]
    fn a_hybrid_exports_each_layer_under_its_reference() {
        let device = device();
        let dir = std::env::temp_dir().join(format!("estafet-export-h-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let lstm = config(&MixerConfig::all()[1], "residual");
        let mut hybrid = lstm.clone();
        hybrid.model.mixer = None;
        hybrid.model.n_layers = 4;
        hybrid.model.pattern = ["mamba", "gated_deltanet", "rwkv7", "lstm"]
            .map(|kind| serde_json::from_value(serde_json::json!({ "kind": kind })).unwrap())
            .to_vec();
        hybrid.model.validate().unwrap();
        let info = hybrid.task.build().unwrap().info();
        let build = |config: &ExperimentConfig, seed| {
            (config.model).init(model_io(&info), &mut Init::new(seed, &device))
        };
        let (ours, other) = (build(&hybrid, 1), build(&hybrid, 2));
        let path = dir.join("hybrid.safetensors");
        export(&ours, &hybrid, None, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        for name in [
            "blocks.0.mixer.conv1d.weight",
            "blocks.1.mixer.k_conv1d.weight",
            "blocks.2.mixer.x_r",
            "blocks.3.mixer.Lstm.input.weight",
        ] {
            assert!(file.tensor(name).is_ok(), "{name}");
        }
        let manifest = std::fs::read_to_string(path.with_extension("json")).unwrap();
        assert!(
            manifest.contains("\"model\": \"mamba+gated_deltanet+rwkv7+lstm\"")
                && manifest.contains("for L in 1 as fla.layers.GatedDeltaNet"),
            "{manifest}"
        );
        let loaded = import(other, &hybrid, &bytes, "test", &device).unwrap();
        let tokens = Tensor::<2>::random([2, 9], Distribution::Uniform(0.0, 2.0), &device).int();
        let (a, _) = ours.forward(Input::Tokens(tokens.clone()), None);
        let (b, _) = loaded.forward(Input::Tokens(tokens), None);
        assert_eq!(
            a.into_data().try_to_vec::<f32>().unwrap(),
            b.into_data().try_to_vec::<f32>().unwrap()
        );
        let e = import(build(&lstm, 0), &lstm, &bytes, "x", &device)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains(
                "an export of a mamba+gated_deltanet+rwkv7+lstm model; this config's model is lstm"
            ),
            "{e}"
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
