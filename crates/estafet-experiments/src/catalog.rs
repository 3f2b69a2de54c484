//! What `estafet list` prints: every model with its size, every task with its figures.

use estafet_models::{Init, InputSpec, Layout, MixerConfig, ModelConfig, ModelIo};

use crate::{Backend, Error};

/// One line of `estafet list models`.
pub struct ModelEntry {
    pub kind: &'static str,
    pub params: usize,
    pub state_size: usize,
}

/// Each mixer kind with its defaults, as one layer between an embedding and a head (vocabulary
/// 64, the benchmark's shape) at width `d_model`; state at `seq_len` tokens.
pub fn models(d_model: usize, seq_len: usize, backend: Backend) -> Result<Vec<ModelEntry>, Error> {
    let device = backend.device()?;
    MixerConfig::KINDS
        .iter()
        .map(|kind| {
            let mixer: MixerConfig = serde_json::from_value(serde_json::json!({ "kind": kind }))
                .expect("every kind has defaults");
            let config = ModelConfig {
                mixer,
                d_model,
                n_layers: 1,
                layout: Layout::Stacked,
                mlp_expand: 0,
            };
            config
                .validate()
                .map_err(|e| Error::Config(format!("--d-model {d_model}: {kind}: {e}")))?;
            let io = ModelIo {
                input: InputSpec::Tokens { vocab: 64 },
                d_output: 64,
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
