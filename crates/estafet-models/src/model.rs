//! A sequence model: encoder → N blocks → head.
//!
//! ```text
//! stacked  (PyTorch's nn.LSTM(num_layers=N) layout)   residual (pre-norm, as in Mamba/RWKV/GPT)
//!   x = encode(input)                                    x = encode(input)
//!   x = mixer_l(x)            for l in 1..N              x = x + mixer_l(norm(x))        for l in 1..N
//!                                                        x = x + mlp_l(norm(x))          if mlp_expand > 0
//!                                                        x = norm(x)
//!   logits = head(x)                                     logits = head(x)
//! ```
//! The encoder is an embedding for token inputs and a linear projection for real-valued ones.
//!
//! With [`Readout::Bottleneck`] (MAD's autoencoder, for its compression task) only the last
//! position's vector `h = x[:, T−1]` reaches the head: position `t` reads
//! `head(mlp(h + pos_t))`, `pos_t` a fixed sinusoidal code and `mlp` MAD's two
//! `norm → linear → GELU` layers, so whatever the sequence held must pass through one vector.

use burn::module::Module;
use burn::nn::{Embedding, LayerNorm, Linear};
use burn::tensor::{Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::init::Init;
use crate::mixer::{Mixer, MixerConfig, MixerState, StateMap};
use crate::norm::{layer_norm, layer_norm_module};
use crate::projection::project;
use crate::torch::HostTensor;

/// How blocks are wired together.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// Mixers applied one after another, no norm, no residual: PyTorch's multi-layer RNNs.
    #[default]
    Stacked,
    /// Pre-norm residual blocks with an optional MLP, and a final norm.
    Residual,
}

/// `[model]` in a config.
///
/// Every layer runs `[model.mixer]`, or, in a hybrid stack, the layers name their mixers in
/// `model.pattern`, a list of mixer tables repeated to fill `n_layers` (which it must divide):
/// Qwen3-Next's three Gated DeltaNet layers per attention layer over 8 layers is
///
/// ```toml
/// [model]
/// d_model = 64
/// n_layers = 8
/// layout = "residual"
/// pattern = [
///   { kind = "gated_deltanet" }, { kind = "gated_deltanet" }, { kind = "gated_deltanet" },
///   { kind = "attention", n_heads = 4 },
/// ]
/// ```
///
/// and an explicit list is a pattern as long as the stack. Each table has its kind's own
/// options; the layers share `d_model`, the layout and the MLP.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The mixer of every layer; absent when `pattern` names them per layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixer: Option<MixerConfig>,
    /// The layers' mixers in order, repeated to fill `n_layers`: a hybrid stack.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pattern: Vec<MixerConfig>,
    /// Width `D` of the residual stream (the hidden size of the classic cells).
    pub d_model: usize,
    #[serde(default = "one")]
    pub n_layers: usize,
    #[serde(default)]
    pub layout: Layout,
    /// Hidden width of the MLP after each mixer, as a multiple of `d_model`; 0 means no MLP.
    /// Residual layout only.
    #[serde(default)]
    pub mlp_expand: usize,
    /// A parameter budget: `d_model` is then chosen as the valid width whose model lands
    /// nearest it (iso-parameter comparisons). Resolved by the experiment config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_params: Option<usize>,
    /// A state budget in floats per sequence at the task's length (iso-state comparisons).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_state: Option<usize>,
}

fn one() -> usize {
    1
}

/// A mixer's validation message, which names its fields `model.mixer.FIELD`, for the table
/// written at `field`.
pub(crate) fn at_field(message: String, field: &str) -> String {
    if message.contains("model.mixer.") {
        message.replace("model.mixer.", &format!("{field}."))
    } else {
        format!("{field}: {message}")
    }
}

/// What the model reads and predicts; given by the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelIo {
    pub input: InputSpec,
    /// Logits (classes) or values (regression) per position, `O`.
    pub d_output: usize,
    pub readout: Readout,
}

/// How the outputs of position `t` are read from the blocks' output `x [B, T, D]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Readout {
    /// `head(x[:, t])`: causal, one output per position read so far.
    #[default]
    PerPosition,
    /// `head(mlp(x[:, T−1] + pos_t))`: the whole sequence through the last position's vector
    /// (MAD's autoencoder). `step` still reads per position.
    Bottleneck,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputSpec {
    /// Token ids in `0..vocab`.
    Tokens { vocab: usize },
    /// Real-valued features of width `dim`.
    Features { dim: usize },
}

/// A batch of model input.
#[derive(Clone, Debug)]
pub enum Input {
    /// `[B, T]` token ids.
    Tokens(Tensor<2, Int>),
    /// `[B, T, F]` features.
    Features(Tensor<3>),
}

impl ModelConfig {
    /// A stack of `n_layers` layers of `mixer`.
    pub fn uniform(mixer: MixerConfig, d_model: usize, n_layers: usize, layout: Layout) -> Self {
        Self {
            mixer: Some(mixer),
            pattern: Vec::new(),
            d_model,
            n_layers,
            layout,
            mlp_expand: 0,
            match_params: None,
            match_state: None,
        }
    }

    /// Each layer's mixer, in order: `mixer` every time, or `pattern` repeated.
    pub fn layer_mixers(&self) -> Vec<&MixerConfig> {
        match &self.mixer {
            Some(mixer) => vec![mixer; self.n_layers],
            None => self.pattern.iter().cycle().take(self.n_layers).collect(),
        }
    }

    /// The mixer tables the config writes, each with the field it is written at
    /// (`model.mixer`, or `model.pattern[i]`).
    fn written_mixers(&self) -> Vec<(String, &MixerConfig)> {
        match &self.mixer {
            Some(mixer) => vec![("model.mixer".to_string(), mixer)],
            None => (self.pattern.iter().enumerate())
                .map(|(i, mixer)| (format!("model.pattern[{i}]"), mixer))
                .collect(),
        }
    }

    /// Every mixer the layers run, each with the field it is written at: [`written_mixers`]'s,
    /// with a parallel layer's branches at `….branches[i]`.
    ///
    /// [`written_mixers`]: Self::written_mixers
    fn leaf_mixers(&self) -> Vec<(String, &MixerConfig)> {
        (self.written_mixers().into_iter())
            .flat_map(|(at, mixer)| {
                let parallel = matches!(mixer, MixerConfig::Parallel(_));
                (mixer.leaves().into_iter().enumerate()).map(move |(i, leaf)| match parallel {
                    true => (format!("{at}.branches[{i}]"), leaf),
                    false => (at.clone(), leaf),
                })
            })
            .collect()
    }

    /// The model's name in reports, summaries and messages: its mixer's kind, or the
    /// pattern's kinds with repeats counted, `gated_deltanet*3+attention` (a parallel layer's
    /// branches joined by `|`: `attention|mamba`).
    pub fn label(&self) -> String {
        let Some(first) = self.pattern.first().filter(|_| self.mixer.is_none()) else {
            return self.mixer.as_ref().map_or(String::new(), |m| m.name());
        };
        let mut runs: Vec<(String, usize)> = vec![(first.name(), 0)];
        for mixer in &self.pattern {
            match runs.last_mut() {
                Some((name, n)) if *name == mixer.name() => *n += 1,
                _ => runs.push((mixer.name(), 1)),
            }
        }
        (runs.iter())
            .map(|(name, n)| match n {
                1 => name.clone(),
                n => format!("{name}*{n}"),
            })
            .collect::<Vec<_>>()
            .join("+")
    }

    /// Whether some layer (or a branch of a parallel layer) runs mixer `kind`.
    pub fn has(&self, kind: &str) -> bool {
        self.leaf_mixers().iter().any(|(_, m)| m.kind() == kind)
    }

    /// Checks what serde cannot; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.d_model == 0 {
            return Err("model.d_model must be at least 1".into());
        }
        if self.n_layers == 0 {
            return Err("model.n_layers must be at least 1".into());
        }
        if self.mlp_expand > 0 && self.layout == Layout::Stacked {
            return Err("model.mlp_expand needs model.layout = \"residual\"".into());
        }
        match (&self.mixer, self.pattern.len()) {
            (Some(_), 1..) => {
                return Err(
                    "model.mixer and model.pattern: give one, the mixer of every layer \
                            or the mixers per layer"
                        .into(),
                );
            }
            (None, 0) => {
                return Err(
                    "model: give model.mixer (every layer's) or model.pattern (the \
                            mixers per layer)"
                        .into(),
                );
            }
            (None, n) if !self.n_layers.is_multiple_of(n) => {
                return Err(format!(
                    "model.pattern: {n} mixers do not repeat evenly over model.n_layers = {}",
                    self.n_layers
                ));
            }
            _ => {}
        }
        for (field, mixer) in self.written_mixers() {
            mixer
                .validate(self.d_model)
                .map_err(|e| at_field(e, &field))?;
        }
        Ok(())
    }

    /// The longest sequence the model can read, if it has a limit (learned positions).
    pub fn max_seq_len(&self) -> Option<usize> {
        (self.leaf_mixers().into_iter())
            .filter_map(|(_, mixer)| match mixer {
                MixerConfig::Attention(crate::attention::AttentionSpec {
                    positions: crate::attention::Positions::Learned { max_len },
                    ..
                }) => Some(*max_len),
                _ => None,
            })
            .min()
    }

    /// Whether `device`'s backend can run the forms the config names: a `fused` form needs a
    /// backend with that recurrence's kernel.
    pub fn check_device(&self, device: &burn::tensor::Device) -> Result<(), String> {
        for (at, mixer) in self.leaf_mixers() {
            match mixer.form() {
                Some((field, crate::scan::Form::Fused))
                    if !crate::fused::runs(mixer.form_op(self.d_model), device, 1) =>
                {
                    return Err(format!(
                        "{at}.{field} = fused: this backend has no fused kernel for {} \
                         (ndarray and flex have every one; wgpu every recurrence's, a classic \
                         cell's where its width fits the shared memory); use auto, sequential \
                         or chunked",
                        mixer.kind()
                    ));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub fn init(&self, io: ModelIo, init: &mut Init) -> SequenceModel {
        let d = self.d_model;
        let encoder = match io.input {
            // PyTorch's nn.Embedding initialisation, N(0, 1).
            InputSpec::Tokens { vocab } => Encoder::Embedding(Embedding {
                weight: init.normal([vocab, d], 1.0),
            }),
            InputSpec::Features { dim } => Encoder::Projection(init.linear(dim, d, true)),
        };
        let residual = self.layout == Layout::Residual;
        let device = init.device().clone();
        let norm = || layer_norm_module(d, &device);
        let blocks = (self.layer_mixers().into_iter())
            .map(|mixer| Block {
                norm: residual.then(norm),
                mixer: mixer.init(d, init),
                mlp: (self.mlp_expand > 0).then(|| Mlp {
                    norm: norm(),
                    up: init.linear(d, self.mlp_expand * d, true),
                    down: init.linear(self.mlp_expand * d, d, true),
                }),
            })
            .collect();
        let bottleneck = (io.readout == Readout::Bottleneck).then(|| Bottleneck {
            norm_in: norm(),
            first: init.linear(d, d, true),
            norm_mid: norm(),
            second: init.linear(d, d, true),
        });
        SequenceModel {
            encoder,
            blocks,
            bottleneck,
            norm: residual.then(norm),
            head: init.linear(d, io.d_output, true),
        }
    }
}

#[derive(Module, Debug)]
pub enum Encoder {
    Embedding(Embedding),
    Projection(Linear),
}

/// One layer. With `norm` present it is a pre-norm residual block.
#[derive(Module, Debug)]
pub struct Block {
    pub norm: Option<LayerNorm>,
    pub mixer: Mixer,
    pub mlp: Option<Mlp>,
}

/// `x + down(gelu(up(norm(x))))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub norm: LayerNorm,
    pub up: Linear,
    pub down: Linear,
}

/// MAD's non-expanding decoder: `gelu(second(norm_mid(gelu(first(norm_in(h + pos))))))`.
#[derive(Module, Debug)]
pub struct Bottleneck {
    pub norm_in: LayerNorm,
    pub first: Linear,
    pub norm_mid: LayerNorm,
    pub second: Linear,
}

impl Bottleneck {
    /// `h [B, D]` → `[B, T, D]`, one vector per position to read.
    fn forward(&self, h: Tensor<2>, seq_len: usize) -> Tensor<3> {
        let [b, d] = h.dims();
        let pos = Tensor::<2>::from_data(
            burn::tensor::TensorData::new(sinusoidal(seq_len, d), [seq_len, d]),
            &h.device(),
        );
        let x = h.unsqueeze_dim::<3>(1).expand([b, seq_len, d]) + pos.unsqueeze_dim::<3>(0);
        let x = gelu(self.first.forward(layer_norm(&self.norm_in, x)));
        gelu(self.second.forward(layer_norm(&self.norm_mid, x)))
    }
}

/// The fixed position code `[T, D]` row-major: `sin(t·ω_i)` in the first half of the
/// features, `cos(t·ω_i)` in the second, `ω_i = 10000^(−i/(D/2))` (Vaswani et al.).
fn sinusoidal(seq_len: usize, d: usize) -> Vec<f32> {
    let half = d / 2;
    let mut out = vec![0.0; seq_len * d];
    for t in 0..seq_len {
        for i in 0..half {
            let angle = t as f64 * 10000f64.powf(-(i as f64) / half.max(1) as f64);
            out[t * d + i] = angle.sin() as f32;
            out[t * d + half + i] = angle.cos() as f32;
        }
    }
    out
}

#[derive(Module, Debug)]
pub struct SequenceModel {
    pub encoder: Encoder,
    pub blocks: Vec<Block>,
    /// Present for [`Readout::Bottleneck`].
    pub bottleneck: Option<Bottleneck>,
    pub norm: Option<LayerNorm>,
    pub head: Linear,
}

/// The state of every layer, in order.
#[derive(Clone, Debug)]
pub struct ModelState {
    pub layers: Vec<MixerState>,
}

impl ModelState {
    /// The same values, cut from the autodiff graph: what a window hands the next in truncated
    /// backpropagation through time.
    pub fn detach(self) -> Self {
        struct Detach;
        impl StateMap for Detach {
            fn apply<const D: usize>(&mut self, t: Tensor<D>) -> Tensor<D> {
                t.detach()
            }
        }
        self.map(&mut Detach)
    }

    /// Every tensor of every layer, in order, copied to the host (what a checkpoint keeps).
    pub fn to_host(&self) -> Vec<HostTensor> {
        struct Copy(Vec<HostTensor>);
        impl StateMap for Copy {
            fn apply<const D: usize>(&mut self, t: Tensor<D>) -> Tensor<D> {
                self.0.push(HostTensor::of(&t));
                t
            }
        }
        let mut copy = Copy(Vec::new());
        let _ = self.clone().map(&mut copy);
        copy.0
    }

    /// `template` (a state of the same model and batch) with the values of `saved`
    /// ([`to_host`](Self::to_host)'s), on `device`; `Err` names the first tensor whose shape
    /// differs, or a count that does.
    pub fn from_host(
        template: Self,
        saved: Vec<HostTensor>,
        device: &Device,
    ) -> Result<Self, String> {
        struct Restore<'a> {
            saved: std::vec::IntoIter<HostTensor>,
            device: &'a Device,
            at: usize,
            error: Option<String>,
        }
        impl StateMap for Restore<'_> {
            fn apply<const D: usize>(&mut self, t: Tensor<D>) -> Tensor<D> {
                self.at += 1;
                match self.saved.next() {
                    Some(h) if h.shape == t.dims() => h.into_tensor(self.device),
                    other => {
                        self.error.get_or_insert_with(|| match other {
                            Some(h) => format!(
                                "state tensor {} has shape {:?}, the model's {:?}",
                                self.at,
                                h.shape,
                                t.dims()
                            ),
                            None => {
                                format!("the model has more than {} state tensors", self.at - 1)
                            }
                        });
                        t
                    }
                }
            }
        }
        let mut restore = Restore {
            saved: saved.into_iter(),
            device,
            at: 0,
            error: None,
        };
        let state = template.map(&mut restore);
        if let Some(e) = restore.error {
            return Err(e);
        }
        if restore.saved.next().is_some() {
            return Err(format!(
                "the model has {} state tensors, fewer than saved",
                restore.at
            ));
        }
        Ok(state)
    }

    fn map(self, f: &mut impl StateMap) -> Self {
        Self {
            layers: self.layers.into_iter().map(|s| s.map(f)).collect(),
        }
    }
}

/// GELU with the exact erf form, `x · Φ(x)`, built from primitive ops so that autodiff
/// differentiates it. burn's fused `gelu` has a backward on ndarray that is off by up to 3e-4
/// (flex's is exact), which broke backend parity; this one agrees everywhere.
fn gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * ((x / std::f32::consts::SQRT_2).erf() + 1.0) * 0.5
}

impl Mlp {
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        x.clone()
            + project(
                &self.down,
                gelu(project(&self.up, layer_norm(&self.norm, x))),
            )
    }
}

impl Block {
    fn forward(&self, x: Tensor<3>, state: Option<MixerState>) -> (Tensor<3>, MixerState) {
        let (x, state) = match &self.norm {
            Some(norm) => {
                let (y, state) = self.mixer.forward(layer_norm(norm, x.clone()), state);
                (x + y, state)
            }
            None => self.mixer.forward(x, state),
        };
        (self.apply_mlp(x), state)
    }

    fn step(&self, x: Tensor<2>, state: Option<MixerState>) -> (Tensor<2>, MixerState) {
        let (x, state) = match &self.norm {
            Some(norm) => {
                let (y, state) = self.mixer.step(layer_norm(norm, x.clone()), state);
                (x + y, state)
            }
            None => self.mixer.step(x, state),
        };
        (self.apply_mlp(x), state)
    }

    fn apply_mlp<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        match &self.mlp {
            Some(mlp) => mlp.forward(x),
            None => x,
        }
    }
}

impl SequenceModel {
    /// `input` (`T ≥ 1` steps) → logits `[B, T, O]` and the state after the last step.
    pub fn forward(&self, input: Input, state: Option<ModelState>) -> (Tensor<3>, ModelState) {
        let mut x = self.encode(input);
        let mut states = self.split_state(state);
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (block, state) in self.blocks.iter().zip(states.iter_mut()) {
            let (y, s) = block.forward(x, state.take());
            x = y;
            layers.push(s);
        }
        if let Some(bottleneck) = &self.bottleneck {
            let t = x.dims()[1];
            x = bottleneck.forward(x.narrow(1, t - 1, 1).squeeze_dim::<2>(1), t);
        }
        (self.decode(x), ModelState { layers })
    }

    /// One token per sequence (`input` with `T = 1`) → logits `[B, O]` and the next state.
    pub fn step(&self, input: Input, state: Option<ModelState>) -> (Tensor<2>, ModelState) {
        self.step_encoded(self.encode(input).squeeze_dim::<2>(1), state)
    }

    /// [`step`](Self::step) from an encoded input `x [B, D]`: what measures gradients with
    /// respect to the model's inputs.
    pub fn step_encoded(
        &self,
        mut x: Tensor<2>,
        state: Option<ModelState>,
    ) -> (Tensor<2>, ModelState) {
        let mut states = self.split_state(state);
        let mut layers = Vec::with_capacity(self.blocks.len());
        for (block, state) in self.blocks.iter().zip(states.iter_mut()) {
            let (y, s) = block.step(x, state.take());
            x = y;
            layers.push(s);
        }
        (self.decode(x), ModelState { layers })
    }

    /// [`step_encoded`](Self::step_encoded), also returning the gate activations each layer's
    /// mixer used (see [`Mixer::gates`]), for the training diagnostics.
    pub fn step_with_gates(
        &self,
        mut x: Tensor<2>,
        state: Option<ModelState>,
    ) -> (Tensor<2>, ModelState, Vec<Tensor<2>>) {
        let mut states = self.split_state(state);
        let mut layers = Vec::with_capacity(self.blocks.len());
        let mut gates = Vec::new();
        for (block, state) in self.blocks.iter().zip(states.iter_mut()) {
            let mixer_input = match &block.norm {
                Some(norm) => layer_norm(norm, x.clone()),
                None => x.clone(),
            };
            gates.extend(block.mixer.gates(mixer_input, state.as_ref()));
            let (y, s) = block.step(x, state.take());
            x = y;
            layers.push(s);
        }
        (self.decode(x), ModelState { layers }, gates)
    }

    /// Floats of state per sequence after `seq_len` tokens, summed over layers.
    pub fn state_size(&self, seq_len: usize) -> usize {
        self.blocks
            .iter()
            .map(|b| b.mixer.state_size(seq_len))
            .sum()
    }

    /// Training FLOPs per token at length `seq_len`, counted analytically: the forward pass
    /// costs 2 FLOPs per parameter (every weight but the embedding's, a table lookup, multiplies
    /// and adds once per token) plus each mixer's [`Mixer::extra_flops_per_token`]; the backward
    /// twice the forward (the gradients of the inputs and of the weights), so training is 3×.
    pub fn train_flops_per_token(&self, seq_len: usize) -> f64 {
        let embedding = match &self.encoder {
            Encoder::Embedding(e) => e.num_params(),
            Encoder::Projection(_) => 0,
        };
        let weights = 2.0 * (self.num_params() - embedding) as f64;
        let extra: f64 = self
            .blocks
            .iter()
            .map(|b| b.mixer.extra_flops_per_token(seq_len))
            .sum();
        3.0 * (weights + extra)
    }

    /// The encoder alone: `input` → `[B, T, D]`.
    pub fn encode(&self, input: Input) -> Tensor<3> {
        match (&self.encoder, input) {
            (Encoder::Embedding(embedding), Input::Tokens(tokens)) => embedding.forward(tokens),
            (Encoder::Projection(linear), Input::Features(x)) => linear.forward(x),
            (Encoder::Embedding(_), Input::Features(_)) => {
                panic!("this model embeds token ids but was given real-valued features")
            }
            (Encoder::Projection(_), Input::Tokens(_)) => {
                panic!("this model projects real-valued features but was given token ids")
            }
        }
    }

    fn decode<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = match &self.norm {
            Some(norm) => layer_norm(norm, x),
            None => x,
        };
        project(&self.head, x)
    }

    fn split_state(&self, state: Option<ModelState>) -> Vec<Option<MixerState>> {
        match state {
            Some(ModelState { layers }) => {
                assert_eq!(layers.len(), self.blocks.len(), "one state per layer");
                layers.into_iter().map(Some).collect()
            }
            None => self.blocks.iter().map(|_| None).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::device;
    use burn::tensor::Distribution;

    /// Every mixer kind with its default settings, as a config file would name it, and the
    /// other versions and forms.
    fn every_mixer() -> Vec<MixerConfig> {
        let defaults = MixerConfig::KINDS
            .iter()
            .map(|kind| serde_json::json!({ "kind": kind }));
        let variants = [
            serde_json::json!({ "kind": "rnn", "nonlinearity": "relu", "irnn_init": true }),
            serde_json::json!({ "kind": "mingru", "scan": { "kind": "sequential" } }),
            serde_json::json!({ "kind": "mamba", "scan": { "kind": "sequential" } }),
            serde_json::json!({ "kind": "rwkv", "wkv": { "kind": "sequential" } }),
            serde_json::json!({ "kind": "mamba", "scan": { "kind": "fused" } }),
            serde_json::json!({ "kind": "rwkv", "wkv": { "kind": "fused" } }),
            serde_json::json!({ "kind": "rwkv", "version": 6, "head_size": 4 }),
            serde_json::json!({ "kind": "attention", "n_heads": 2,
                                "positions": { "kind": "learned", "max_len": 16 } }),
        ];
        defaults
            .chain(variants)
            .map(|v| serde_json::from_value(v).unwrap())
            .collect()
    }

    /// A model built with [`Init::shapes_only`] counts the parameters of the real one, for
    /// every mixer and layout, and at a width no machine could hold it is built at once
    /// without allocating its matrices (d 200,000: an LSTM layer alone is 1.3 TB), and its
    /// state size is known.
    #[test]
    fn a_shapes_only_model_counts_the_real_parameters_without_allocating() {
        let device = device();
        let io = ModelIo {
            input: InputSpec::Tokens { vocab: 7 },
            d_output: 5,
            readout: Readout::PerPosition,
        };
        for mixer in every_mixer() {
            for (layout, mlp_expand, d_model) in
                [(Layout::Stacked, 0, 8), (Layout::Residual, 2, 24)]
            {
                let config = ModelConfig {
                    mixer: Some(mixer.clone()),
                    pattern: Vec::new(),
                    d_model,
                    n_layers: 2,
                    layout,
                    mlp_expand,
                    match_params: None,
                    match_state: None,
                };
                let real = config.init(io, &mut Init::new(3, &device)).num_params();
                let counted = config
                    .init(io, &mut Init::shapes_only(&device))
                    .num_params();
                assert_eq!(counted, real, "{} {layout:?}", mixer.kind());
            }
            let huge = ModelConfig {
                mixer: Some(mixer.clone()),
                pattern: Vec::new(),
                d_model: 200_000,
                n_layers: 1,
                layout: Layout::Residual,
                mlp_expand: 0,
                match_params: None,
                match_state: None,
            };
            if huge.validate().is_ok() {
                let model = huge.init(io, &mut Init::shapes_only(&device));
                let n = model.num_params();
                assert!(n > 200_000 * 200_000, "{}: {n}", mixer.kind());
                // The state size is read from the lazy shapes too.
                assert!(model.state_size(1) >= 200_000, "{}", mixer.kind());
            }
        }
    }

    /// Token by token with `step`, `model` (vocabulary 7, 5 outputs) gives the logits and
    /// final state of one `forward` over 9 tokens, and so does the sequence split in two with
    /// the state carried over.
    fn step_and_split_agree(model: &SequenceModel, what: &str) {
        let device = device();
        let tokens = Tensor::<2>::random([2, 9], Distribution::Uniform(0.0, 7.0), &device).int();
        let (logits, state) = model.forward(Input::Tokens(tokens.clone()), None);
        assert_eq!(logits.dims(), [2, 9, 5]);
        let mut s = None;
        let mut steps = Vec::new();
        for t in 0..9 {
            let (y, next) = model.step(Input::Tokens(tokens.clone().narrow(1, t, 1)), s);
            steps.push(y);
            s = Some(next);
        }
        let diff: f32 = (Tensor::stack::<3>(steps, 1) - logits.clone())
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-4, "{what}: step vs forward, max |Δ| = {diff}");
        let (head, mid) = model.forward(Input::Tokens(tokens.clone().narrow(1, 0, 4)), None);
        let (tail, end) = model.forward(Input::Tokens(tokens.narrow(1, 4, 5)), Some(mid));
        let diff: f32 = (Tensor::cat(vec![head, tail], 1) - logits)
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-4, "{what}: split forward, max |Δ| = {diff}");
        assert_eq!(end.layers.len(), state.layers.len());
    }

    /// For every mixer, in both layouts, with two layers: running token by token with `step`
    /// gives the same logits and final state as `forward` over the whole sequence, and a
    /// sequence split in two with the state carried over equals one call.
    #[test]
    fn step_and_split_forward_equal_forward_for_every_mixer() {
        let device = device();
        for mixer in every_mixer() {
            for (layout, mlp_expand) in [(Layout::Stacked, 0), (Layout::Residual, 2)] {
                let config = ModelConfig {
                    mixer: Some(mixer.clone()),
                    pattern: Vec::new(),
                    d_model: 8,
                    n_layers: 2,
                    layout,
                    mlp_expand,
                    match_params: None,
                    match_state: None,
                };
                let io = ModelIo {
                    input: InputSpec::Tokens { vocab: 7 },
                    d_output: 5,
                    readout: Readout::PerPosition,
                };
                let model = config.init(io, &mut Init::new(3, &device));
                step_and_split_agree(&model, &format!("{} {layout:?}", mixer.kind()));
            }
        }
    }

    /// A hybrid's pattern, repeated over the stack, gives each layer its mixer with that
    /// table's own options; its label counts repeats; `step` and a split forward equal one
    /// forward; its state is the sum of its layers' (attention's growing with T); and what is
    /// wrong with a pattern is named by its field.
    #[test]
    fn a_pattern_gives_each_layer_its_mixer() {
        let device = device();
        let parse = |toml: &str| -> ModelConfig { toml::from_str(toml).unwrap() };
        let config = parse(
            r#"
            d_model = 8
            n_layers = 6
            layout = "residual"
            pattern = [
              { kind = "gated_deltanet" }, { kind = "gated_deltanet", n_heads = 2 },
              { kind = "attention", n_heads = 2 },
            ]
            "#,
        );
        config.validate().unwrap();
        assert_eq!(config.label(), "gated_deltanet*2+attention");
        assert!(config.has("attention") && !config.has("mamba"));
        let kinds: Vec<_> = config.layer_mixers().iter().map(|m| m.kind()).collect();
        assert_eq!(
            kinds,
            ["gated_deltanet", "gated_deltanet", "attention"].repeat(2)
        );
        // The config survives a round trip through TOML, as a run directory keeps it.
        assert_eq!(parse(&toml::to_string(&config).unwrap()), config);

        let io = ModelIo {
            input: InputSpec::Tokens { vocab: 7 },
            d_output: 5,
            readout: Readout::PerPosition,
        };
        let model = config.init(io, &mut Init::new(3, &device));
        let heads = |b: &Block| match &b.mixer {
            Mixer::GatedDeltaNet(m) => m.n_heads,
            Mixer::Attention(_) => 0,
            _ => panic!("a layer the pattern does not name"),
        };
        let built: Vec<_> = model.blocks.iter().map(heads).collect();
        assert_eq!(built, [4, 2, 0, 4, 2, 0]);
        // A layer's state is its mixer's: the two recurrences' fixed, attention's K and V.
        let per_layer = |t| -> usize { (model.blocks.iter()).map(|b| b.mixer.state_size(t)).sum() };
        assert_eq!(model.state_size(10) - model.state_size(5), 2 * 2 * 8 * 5);
        assert_eq!(model.state_size(10), per_layer(10));

        step_and_split_agree(&model, "gated_deltanet*2+attention");

        let error = |toml: &str| parse(toml).validate().unwrap_err();
        assert_eq!(
            error(
                "d_model = 8\nn_layers = 4\npattern = [{ kind = \"lstm\" }, { kind = \"attention\", n_heads = 3 }]"
            ),
            "model.pattern[1].n_heads must divide d_model = 8 (got 3)"
        );
        assert_eq!(
            error("d_model = 8\nn_layers = 3\npattern = [{ kind = \"lstm\" }, { kind = \"gru\" }]"),
            "model.pattern: 2 mixers do not repeat evenly over model.n_layers = 3"
        );
        assert!(
            error("d_model = 8\nmixer = { kind = \"lstm\" }\npattern = [{ kind = \"gru\" }]")
                .starts_with("model.mixer and model.pattern: give one")
        );
        assert!(error("d_model = 8").starts_with("model: give model.mixer"));
        // Learned positions in any layer bound the length the model reads.
        let learned = parse(
            "d_model = 8\nn_layers = 2\npattern = [{ kind = \"lstm\" }, \
             { kind = \"attention\", positions = { kind = \"learned\", max_len = 16 } }]",
        );
        assert_eq!(learned.max_seq_len(), Some(16));
    }

    /// The bottleneck readout reads every position from the last one's vector alone: the
    /// logits equal the decoder applied to the per-position model's last hidden vector, and
    /// two sequences that end in the same state give the same logits everywhere.
    #[test]
    fn the_bottleneck_reads_the_sequence_through_its_last_position() {
        let device = device();
        let config = ModelConfig {
            mixer: Some(serde_json::from_value(serde_json::json!({ "kind": "lstm" })).unwrap()),
            pattern: Vec::new(),
            d_model: 8,
            n_layers: 1,
            layout: Layout::Residual,
            mlp_expand: 0,
            match_params: None,
            match_state: None,
        };
        let io = |readout| ModelIo {
            input: InputSpec::Tokens { vocab: 7 },
            d_output: 5,
            readout,
        };
        let model = config.init(io(Readout::Bottleneck), &mut Init::new(1, &device));
        let tokens = Tensor::<2>::random([3, 6], Distribution::Uniform(0.0, 7.0), &device).int();
        let (logits, _) = model.forward(Input::Tokens(tokens.clone()), None);
        assert_eq!(logits.dims(), [3, 6, 5]);

        // By hand: the blocks' output at the last position, through the decoder and head.
        let x = model.blocks[0]
            .forward(model.encode(Input::Tokens(tokens.clone())), None)
            .0;
        let h = x.narrow(1, 5, 1).squeeze_dim::<2>(1);
        let by_hand = model.decode(model.bottleneck.as_ref().unwrap().forward(h, 6));
        let diff: f32 = (by_hand - logits.clone()).abs().max().into_scalar();
        assert!(diff < 1e-6, "{diff}");
        // Positions differ only through the position code.
        let first = logits.clone().narrow(1, 0, 1);
        let second = logits.narrow(1, 1, 1);
        let apart: f32 = (first - second).abs().max().into_scalar();
        assert!(apart > 1e-4, "positions are told apart");
        // The per-position model of the same seed has no decoder.
        let plain = config.init(io(Readout::PerPosition), &mut Init::new(1, &device));
        assert!(plain.bottleneck.is_none());
        assert!(
            burn::module::Module::num_params(&model) > burn::module::Module::num_params(&plain)
        );
    }

    /// Training FLOPs: 6 per weight but the embedding's, plus the mixers' own terms.
    #[test]
    fn training_flops_count_weights_and_scores() {
        let io = ModelIo {
            input: InputSpec::Tokens { vocab: 7 },
            d_output: 5,
            readout: Readout::PerPosition,
        };
        let model = |mixer: serde_json::Value| {
            ModelConfig {
                mixer: Some(serde_json::from_value(mixer).unwrap()),
                pattern: Vec::new(),
                d_model: 8,
                n_layers: 1,
                layout: Layout::Stacked,
                mlp_expand: 0,
                match_params: None,
                match_state: None,
            }
            .init(io, &mut Init::new(0, &device()))
        };
        // LSTM: W_i, W_h [8, 32] and their biases, the head [8, 5] and its bias.
        let lstm = model(serde_json::json!({ "kind": "lstm" }));
        assert_eq!(
            lstm.train_flops_per_token(100),
            6.0 * (2.0 * (256.0 + 32.0) + 45.0)
        );
        // Attention adds its scores, 2·D·(T + 1) per token forward, which grow with T.
        let attention = model(serde_json::json!({ "kind": "attention", "n_heads": 2 }));
        let grows = attention.train_flops_per_token(100) - attention.train_flops_per_token(50);
        assert_eq!(grows, 3.0 * 2.0 * 8.0 * 50.0);
    }
}
