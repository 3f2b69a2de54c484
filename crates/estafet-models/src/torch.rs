//! PyTorch's names and layouts for the classic cells' parameters, so that weights trained with
//! `torch.nn.RNN`, `nn.LSTM` or `nn.GRU` load into estafet's cells (and fixtures from torch can
//! be checked). No I/O here: the caller hands over tensors by name.
//!
//! Layer `l` of a torch module has `weight_ih_l{l} [G·H, in]`, `weight_hh_l{l} [G·H, H]`,
//! `bias_ih_l{l} [G·H]`, `bias_hh_l{l} [G·H]`, with `G` gates (1 RNN, 4 LSTM `(i, f, g, o)`,
//! 3 GRU `(r, z, n)`); estafet stores the same gates in the same order, the weights transposed.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Tensor, TensorData};

use crate::mixer::Mixer;

/// A float tensor read from somewhere else, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl HostTensor {
    /// `t`'s values, copied to the host as f32.
    pub fn of<const D: usize>(t: &Tensor<D>) -> Self {
        Self {
            shape: t.dims().to_vec(),
            values: t
                .to_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("float32 values"),
        }
    }

    /// A tensor of `shape` from little-endian f32 `bytes` (a safetensors F32 view's data).
    pub fn from_le_bytes(shape: &[usize], bytes: &[u8]) -> Self {
        Self {
            shape: shape.to_vec(),
            values: bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        }
    }

    /// The values as little-endian bytes.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// The tensor on `device`; its shape must have `D` axes.
    pub fn into_tensor<const D: usize>(self, device: &Device) -> Tensor<D> {
        Tensor::from_data(TensorData::new(self.values, self.shape), device)
    }
}

/// Where tensors come from: a name → tensor lookup.
pub type Lookup<'a> = dyn Fn(&str) -> Option<HostTensor> + 'a;

/// `mixer` with its parameters replaced by layer `layer` of a torch RNN/LSTM/GRU.
pub fn load_torch_layer(
    mixer: Mixer,
    layer: usize,
    lookup: &Lookup,
    device: &Device,
) -> Result<Mixer, String> {
    let load = |ours: &Linear, kind: &str| -> Result<Linear, String> {
        let [d_in, d_out] = ours.weight.dims();
        Ok(Linear {
            weight: Param::from_tensor(
                tensor::<2>(
                    lookup,
                    &format!("weight_{kind}_l{layer}"),
                    [d_out, d_in],
                    device,
                )?
                .transpose(),
            ),
            bias: Some(Param::from_tensor(tensor::<1>(
                lookup,
                &format!("bias_{kind}_l{layer}"),
                [d_out],
                device,
            )?)),
        })
    };
    Ok(match mixer {
        Mixer::Rnn(mut rnn) => {
            rnn.input = load(&rnn.input, "ih")?;
            rnn.hidden = load(&rnn.hidden, "hh")?;
            Mixer::Rnn(rnn)
        }
        Mixer::Lstm(mut lstm) => {
            lstm.input = load(&lstm.input, "ih")?;
            lstm.hidden = load(&lstm.hidden, "hh")?;
            Mixer::Lstm(lstm)
        }
        Mixer::Gru(mut gru) => {
            gru.input = load(&gru.input, "ih")?;
            gru.hidden = load(&gru.hidden, "hh")?;
            Mixer::Gru(gru)
        }
        other => {
            return Err(format!(
                "PyTorch weights load into rnn, lstm or gru, not {}",
                kind(&other)
            ));
        }
    })
}

fn kind(mixer: &Mixer) -> &'static str {
    match mixer {
        Mixer::Rnn(_) => "rnn",
        Mixer::Lstm(_) => "lstm",
        Mixer::Gru(_) => "gru",
        Mixer::MinGru(_) => "mingru",
        Mixer::MinLstm(_) => "minlstm",
        Mixer::Mamba(_) => "mamba",
        Mixer::Mamba2(_) => "mamba2",
        Mixer::Rwkv(_) => "rwkv",
        Mixer::GatedDeltaNet(_) => "gated_deltanet",
        Mixer::Slstm(_) => "slstm",
        Mixer::Mlstm(_) => "mlstm",
        Mixer::Rwkv7(_) => "rwkv7",
        Mixer::Attention(_) => "attention",
        Mixer::Parallel(_) => "parallel",
    }
}

/// The tensor `name`, which must have shape `shape`.
pub fn tensor<const D: usize>(
    lookup: &Lookup,
    name: &str,
    shape: [usize; D],
    device: &Device,
) -> Result<Tensor<D>, String> {
    let t = lookup(name).ok_or_else(|| format!("missing tensor `{name}`"))?;
    if t.shape != shape {
        return Err(format!(
            "`{name}` has shape {:?}, expected {shape:?}",
            t.shape
        ));
    }
    Ok(Tensor::from_data(TensorData::new(t.values, shape), device))
}
