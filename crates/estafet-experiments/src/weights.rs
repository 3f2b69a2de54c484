//! Loading PyTorch weights: a safetensors file holding an `nn.RNN`, `nn.LSTM` or `nn.GRU`
//! state dict (`weight_ih_l0`, …, optionally under a prefix such as `lstm.`) initialises the
//! recurrent layers of a `stacked` model of the same kind, width and depth. The embedding and
//! head keep their seeded initialisation.

use burn::tensor::Device;
use estafet_models::SequenceModel;
use estafet_models::torch::{HostTensor, load_torch_layer};
use safetensors::{Dtype, SafeTensors};

use crate::Error;

/// `model` with layer `l`'s cell replaced by layer `l` of the torch module in the safetensors
/// file `bytes` (read once by the caller, which names it `at` in errors).
pub fn load_torch_rnn(
    model: SequenceModel,
    bytes: &[u8],
    at: &str,
    device: &Device,
) -> Result<SequenceModel, Error> {
    let file = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Config(format!("{at}: not a safetensors file: {e}")))?;
    let names = file.names();
    let prefixes: Vec<&str> = names
        .iter()
        .filter_map(|n| n.strip_suffix("weight_ih_l0"))
        .collect();
    let prefix = match prefixes.as_slice() {
        [one] => one.to_string(),
        [] => {
            return Err(Error::Config(format!(
                "{at}: no `weight_ih_l0`: not a torch RNN/LSTM/GRU state dict"
            )));
        }
        many => {
            return Err(Error::Config(format!(
                "{at}: several modules ({}); keep one",
                many.iter()
                    .map(|p| format!("`{p}weight_ih_l0`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    };
    let layers = model.blocks.len();
    if names
        .iter()
        .any(|n| **n == format!("{prefix}weight_ih_l{layers}"))
    {
        return Err(Error::Config(format!(
            "{at}: the file has more than model.n_layers = {layers} layers"
        )));
    }
    let lookup = |name: &str| -> Option<HostTensor> {
        let view = file.tensor(&format!("{prefix}{name}")).ok()?;
        match view.dtype() {
            Dtype::F32 => Some(HostTensor::from_le_bytes(view.shape(), view.data())),
            Dtype::F64 => Some(HostTensor {
                shape: view.shape().to_vec(),
                values: view
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
                    .collect(),
            }),
            _ => None,
        }
    };
    let mut blocks = Vec::with_capacity(layers);
    for (l, block) in model.blocks.into_iter().enumerate() {
        let mixer = load_torch_layer(block.mixer, l, &lookup, device).map_err(|e| {
            Error::Config(format!(
                "{at}: {e} (float32 or float64, torch's [gates·H, in] layout)"
            ))
        })?;
        blocks.push(estafet_models::model::Block { mixer, ..block });
    }
    Ok(SequenceModel { blocks, ..model })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;
    use estafet_models::mixer::Mixer;
    use estafet_models::{Init, InputSpec, ModelConfig, ModelIo};
    use std::path::Path;

    fn device() -> Device {
        Backend::default_compiled().unwrap().device().unwrap()
    }

    fn model(kind: &str, layers: usize) -> SequenceModel {
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "mixer": { "kind": kind }, "d_model": 4, "n_layers": layers
        }))
        .unwrap();
        let io = ModelIo {
            input: InputSpec::Tokens { vocab: 5 },
            d_output: 5,
            readout: estafet_models::Readout::PerPosition,
        };
        config.init(io, &mut Init::new(0, &device()))
    }

    /// A torch-style state dict: `prefix + weight_ih_l{l}` etc., value `i + 1000·l` at index i.
    fn write(path: &Path, prefix: &str, gates: usize, h: usize, layers: usize) {
        let mut tensors = Vec::new();
        for l in 0..layers {
            for (name, shape) in [
                ("weight_ih", vec![gates * h, h]),
                ("weight_hh", vec![gates * h, h]),
                ("bias_ih", vec![gates * h]),
                ("bias_hh", vec![gates * h]),
            ] {
                let n: usize = shape.iter().product();
                let bytes: Vec<u8> = (0..n)
                    .flat_map(|i| ((i + 1000 * l) as f32).to_le_bytes())
                    .collect();
                tensors.push((format!("{prefix}{name}_l{l}"), shape, bytes));
            }
        }
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(name, shape, bytes)| {
                (
                    name.clone(),
                    safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!(
            "estafet-weights-{name}-{}.safetensors",
            std::process::id()
        ))
    }

    fn load(model: SequenceModel, path: &Path, device: &Device) -> Result<SequenceModel, Error> {
        load_torch_rnn(model, &std::fs::read(path).unwrap(), "test", device)
    }

    #[test]
    fn torch_lstm_weights_land_transposed_in_every_layer() {
        let path = scratch("lstm");
        write(&path, "lstm.", 4, 4, 2);
        let loaded = load(model("lstm", 2), &path, &device()).unwrap();
        for (l, block) in loaded.blocks.iter().enumerate() {
            let Mixer::Lstm(lstm) = &block.mixer else {
                panic!()
            };
            let w: Vec<f32> = lstm
                .input
                .weight
                .val()
                .transpose()
                .to_data()
                .try_to_vec::<f32>()
                .unwrap();
            let expected: Vec<f32> = (0..64).map(|i| (i + 1000 * l) as f32).collect();
            assert_eq!(w, expected, "layer {l}");
            let b: Vec<f32> = lstm
                .hidden
                .bias
                .as_ref()
                .unwrap()
                .val()
                .to_data()
                .try_to_vec::<f32>()
                .unwrap();
            assert_eq!(
                b,
                (0..16).map(|i| (i + 1000 * l) as f32).collect::<Vec<_>>()
            );
        }
        std::fs::remove_file(path).ok();
    }

    #[test]
    fn mismatches_are_named() {
        let path = scratch("gru");
        write(&path, "", 3, 4, 2);
        let e = load(model("lstm", 2), &path, &device())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("`weight_ih_l0` has shape [12, 4], expected [16, 4]"),
            "{e}"
        );
        let e = load(model("gru", 1), &path, &device())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("more than model.n_layers = 1"), "{e}");
        let e = load(model("gru", 3), &path, &device())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("missing tensor `weight_ih_l2`"), "{e}");
        std::fs::write(&path, b"not safetensors").unwrap();
        let e = load(model("gru", 2), &path, &device())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
        std::fs::remove_file(path).ok();
    }
}
