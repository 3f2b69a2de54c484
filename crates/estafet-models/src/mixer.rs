//! The swappable sequence mixer: one config enum, one module enum, one state enum.
//!
//! Every mixer maps `[B, T, D] → [B, T, D]` with explicit state in and out, and offers a
//! single-token `step` for recurrent inference. Each architecture's file owns its options and
//! their defaults (`XSpec`, the `[model.mixer]` table), its built configuration (`XConfig`) and
//! its module (`X`). The list below names each kind once: the config and module enums, the list
//! of kinds and [`MixerConfig::all`] (what the tests iterate) are generated from it, and every
//! `match` on [`Mixer`] is checked by the compiler, so a new kind cannot be left out.

use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::attention::{Attention, AttentionSpec, KvCache};
use crate::gated_deltanet::{GatedDeltaNet, GatedDeltaNetSpec, GatedDeltaNetState};
use crate::gru::{Gru, GruSpec};
use crate::init::Init;
use crate::lstm::{Lstm, LstmSpec, LstmState};
use crate::mamba::{Mamba, MambaSpec, MambaState};
use crate::mamba2::{Mamba2, Mamba2Spec, Mamba2State};
use crate::mingru::{MinGru, MinGruSpec};
use crate::minlstm::{MinLstm, MinLstmSpec};
use crate::mlstm::{Mlstm, MlstmSpec, MlstmState};
use crate::parallel::{Parallel, ParallelSpec};
use crate::rnn::{Rnn, RnnSpec};
use crate::rwkv::{Rwkv, RwkvSpec, RwkvState};
use crate::rwkv7::{Rwkv7, Rwkv7Spec, Rwkv7State};
use crate::scan::Form;
use crate::slstm::{Slstm, SlstmSpec, SlstmState};

macro_rules! mixers {
    ($($(#[$doc:meta])* $variant:ident($spec:ty) -> $module:ty = $kind:literal,)*) => {
        /// Which mixer a block uses, with that mixer's own options (its width is the model's
        /// `d_model`). In TOML: `[model.mixer]` with `kind = "lstm"` and the kind's fields.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind", deny_unknown_fields)]
        pub enum MixerConfig {
            $($(#[$doc])* #[serde(rename = $kind)] $variant($spec),)*
        }

        #[derive(Module, Debug)]
        pub enum Mixer {
            $($variant($module),)*
        }

        impl MixerConfig {
            /// Every mixer kind, as written in configs.
            pub const KINDS: &[&str] = &[$($kind),*];

            /// The name used in configs, reports and run summaries.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(MixerConfig::$variant(_) => $kind,)*
                }
            }

            /// Every kind with its defaults, in the order of [`MixerConfig::KINDS`].
            pub fn all() -> Vec<MixerConfig> {
                vec![$(MixerConfig::$variant(<$spec>::default()),)*]
            }

            /// Checks what serde cannot, at width `d_model`; the message names the field.
            pub fn validate(&self, d_model: usize) -> Result<(), String> {
                match self {
                    $(MixerConfig::$variant(spec) => spec.validate(d_model),)*
                }
            }

            pub fn init(&self, d_model: usize, init: &mut Init) -> Mixer {
                match self {
                    $(MixerConfig::$variant(spec) => Mixer::$variant(spec.config(d_model).init(init)),)*
                }
            }
        }
    };
}

mixers! {
    /// [`Rnn`], the Elman RNN.
    Rnn(RnnSpec) -> Rnn = "rnn",
    /// [`Lstm`], PyTorch's formulation.
    Lstm(LstmSpec) -> Lstm = "lstm",
    /// [`Gru`], PyTorch's formulation.
    Gru(GruSpec) -> Gru = "gru",
    /// [`MinGru`] (Feng et al. 2024).
    MinGru(MinGruSpec) -> MinGru = "mingru",
    /// [`MinLstm`] (Feng et al. 2024).
    MinLstm(MinLstmSpec) -> MinLstm = "minlstm",
    /// [`Mamba`], the selective SSM block of Mamba-1.
    Mamba(MambaSpec) -> Mamba = "mamba",
    /// [`Mamba2`], the SSD block of Mamba-2.
    Mamba2(Mamba2Spec) -> Mamba2 = "mamba2",
    /// [`Rwkv`], a complete RWKV block (time mix and channel mix with their own pre-norms and
    /// residuals; use it with `layout = "stacked"` to get RWKV's own architecture).
    Rwkv(RwkvSpec) -> Rwkv = "rwkv",
    /// [`Rwkv7`], RWKV-7's time mix (diagonal plus rank-one transition; Peng et al. 2025).
    Rwkv7(Rwkv7Spec) -> Rwkv7 = "rwkv7",
    /// [`GatedDeltaNet`] (Yang et al. 2024); plain DeltaNet with `gate = false`.
    GatedDeltaNet(GatedDeltaNetSpec) -> GatedDeltaNet = "gated_deltanet",
    /// [`Slstm`], xLSTM's scalar-memory LSTM with exponential gating (Beck et al. 2024).
    Slstm(SlstmSpec) -> Slstm = "slstm",
    /// [`Mlstm`], xLSTM's matrix-memory LSTM (Beck et al. 2024).
    Mlstm(MlstmSpec) -> Mlstm = "mlstm",
    /// [`Attention`], causal softmax attention with a KV cache: the non-recurrent baseline.
    Attention(AttentionSpec) -> Attention = "attention",
    /// [`Parallel`], Hymba's parallel heads: mixers side by side in one layer, their
    /// normalised outputs averaged.
    Parallel(ParallelSpec) -> Parallel = "parallel",
}

impl MixerConfig {
    /// The mixers this table runs: itself, or a parallel layer's branches.
    pub fn leaves(&self) -> Vec<&MixerConfig> {
        match self {
            MixerConfig::Parallel(spec) => spec.branches.iter().collect(),
            other => vec![other],
        }
    }

    /// The name a label gives it: its kind, or a parallel layer's branches joined by `|`
    /// (`attention|mamba`).
    pub fn name(&self) -> String {
        match self {
            MixerConfig::Parallel(spec) => (spec.branches.iter())
                .map(|b| b.kind())
                .collect::<Vec<_>>()
                .join("|"),
            other => other.kind().to_string(),
        }
    }

    /// The op that runs the recurrence [`MixerConfig::form`] names, at width `d_model`.
    pub fn form_op(&self, d_model: usize) -> crate::fused::Op {
        use crate::fused::Op;
        match self {
            MixerConfig::MinGru(_) | MixerConfig::MinLstm(_) => Op::MinRnn,
            MixerConfig::Mamba(spec) => Op::SelectiveScan {
                n: spec.config(d_model).d_state,
            },
            MixerConfig::Rwkv(spec) => match spec.config(d_model).head_size() {
                None => Op::Wkv4,
                Some(k) => Op::Wkv6 { k },
            },
            MixerConfig::GatedDeltaNet(spec) => Op::DeltaRule {
                k: spec.config(d_model).head_dim,
            },
            MixerConfig::Mamba2(spec) => Op::Ssd {
                n: spec.config(d_model).d_state,
            },
            MixerConfig::Rwkv7(spec) => Op::Dplr {
                n: spec.config(d_model).head_size,
            },
            MixerConfig::Mlstm(spec) => Op::MlstmCell {
                k: spec.config(d_model).head_dim,
            },
            _ => Op::Other,
        }
    }

    /// The form the config names for a recurrence with a fused kernel, and its field.
    pub fn form(&self) -> Option<(&'static str, Form)> {
        match self {
            MixerConfig::Mamba(spec) => Some(("scan", spec.scan)),
            MixerConfig::Rwkv(spec) => Some(("wkv", spec.wkv)),
            MixerConfig::MinGru(spec) => Some(("scan", spec.scan)),
            MixerConfig::MinLstm(spec) => Some(("scan", spec.scan)),
            MixerConfig::GatedDeltaNet(spec) => Some(("scan", spec.scan)),
            MixerConfig::Mamba2(spec) => Some(("scan", spec.scan)),
            MixerConfig::Rwkv7(spec) => Some(("scan", spec.scan)),
            MixerConfig::Mlstm(spec) => Some(("scan", spec.scan)),
            _ => None,
        }
    }
}

/// The recurrent state a mixer carries from one call to the next.
#[derive(Clone, Debug)]
pub enum MixerState {
    /// `h [B, H]` of an RNN, GRU, minGRU or minLSTM.
    Hidden(Tensor<2>),
    Lstm(LstmState),
    Mamba(MambaState),
    Mamba2(Mamba2State),
    Rwkv(RwkvState),
    Rwkv7(Rwkv7State),
    GatedDeltaNet(GatedDeltaNetState),
    Slstm(SlstmState),
    Mlstm(MlstmState),
    /// Attention's KV cache, which grows with every token.
    Attention(KvCache),
    /// A parallel layer's branches' states, in order.
    Parallel(Vec<MixerState>),
}

impl Mixer {
    /// `x [B, T, D]` → `y [B, T, D]` and the state after the last step.
    pub fn forward(&self, x: Tensor<3>, state: Option<MixerState>) -> (Tensor<3>, MixerState) {
        match self {
            Mixer::Rnn(rnn) => {
                let (y, h) = rnn.forward(x, state.map(MixerState::into_hidden));
                (y, MixerState::Hidden(h))
            }
            Mixer::Lstm(lstm) => {
                let (y, s) = lstm.forward(x, state.map(MixerState::into_lstm));
                (y, MixerState::Lstm(s))
            }
            Mixer::Gru(gru) => {
                let (y, h) = gru.forward(x, state.map(MixerState::into_hidden));
                (y, MixerState::Hidden(h))
            }
            Mixer::MinGru(cell) => {
                let (y, h) = cell.forward(x, state.map(MixerState::into_hidden));
                (y, MixerState::Hidden(h))
            }
            Mixer::MinLstm(cell) => {
                let (y, h) = cell.forward(x, state.map(MixerState::into_hidden));
                (y, MixerState::Hidden(h))
            }
            Mixer::Mamba(block) => {
                let (y, s) = block.forward(x, state.map(MixerState::into_mamba));
                (y, MixerState::Mamba(s))
            }
            Mixer::Mamba2(block) => {
                let (y, s) = block.forward(x, state.map(MixerState::into_mamba2));
                (y, MixerState::Mamba2(s))
            }
            Mixer::Rwkv(block) => {
                let (y, s) = block.forward(x, state.map(MixerState::into_rwkv));
                (y, MixerState::Rwkv(s))
            }
            Mixer::GatedDeltaNet(layer) => {
                let (y, s) = layer.forward(x, state.map(MixerState::into_delta));
                (y, MixerState::GatedDeltaNet(s))
            }
            Mixer::Slstm(layer) => {
                let (y, s) = layer.forward(x, state.map(MixerState::into_slstm));
                (y, MixerState::Slstm(s))
            }
            Mixer::Mlstm(layer) => {
                let (y, s) = layer.forward(x, state.map(MixerState::into_mlstm));
                (y, MixerState::Mlstm(s))
            }
            Mixer::Rwkv7(layer) => {
                let (y, s) = layer.forward(x, state.map(MixerState::into_rwkv7));
                (y, MixerState::Rwkv7(s))
            }
            Mixer::Attention(attn) => {
                let (y, cache) = attn.forward(x, state.map(MixerState::into_cache));
                (y, MixerState::Attention(cache))
            }
            Mixer::Parallel(layer) => {
                let (y, s) = layer.forward(x, state.map(MixerState::into_branches));
                (y, MixerState::Parallel(s))
            }
        }
    }

    /// `x_t [B, D]` → `y_t [B, D]` and the next state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<MixerState>) -> (Tensor<2>, MixerState) {
        match self {
            Mixer::Rnn(rnn) => {
                let (y, h) = rnn.step(x_t, state.map(MixerState::into_hidden));
                (y, MixerState::Hidden(h))
            }
            Mixer::Lstm(lstm) => {
                let (y, s) = lstm.step(x_t, state.map(MixerState::into_lstm));
                (y, MixerState::Lstm(s))
            }
            Mixer::Gru(gru) => {
                let (y, h) = gru.step(x_t, state.map(MixerState::into_hidden));
                (y, MixerState::Hidden(h))
            }
            Mixer::MinGru(cell) => {
                let (y, h) = cell.step(x_t, state.map(MixerState::into_hidden));
                (y, MixerState::Hidden(h))
            }
            Mixer::MinLstm(cell) => {
                let (y, h) = cell.step(x_t, state.map(MixerState::into_hidden));
                (y, MixerState::Hidden(h))
            }
            Mixer::Mamba(block) => {
                let (y, s) = block.step(x_t, state.map(MixerState::into_mamba));
                (y, MixerState::Mamba(s))
            }
            Mixer::Mamba2(block) => {
                let (y, s) = block.step(x_t, state.map(MixerState::into_mamba2));
                (y, MixerState::Mamba2(s))
            }
            Mixer::Rwkv(block) => {
                let (y, s) = block.step(x_t, state.map(MixerState::into_rwkv));
                (y, MixerState::Rwkv(s))
            }
            Mixer::GatedDeltaNet(layer) => {
                let (y, s) = layer.step(x_t, state.map(MixerState::into_delta));
                (y, MixerState::GatedDeltaNet(s))
            }
            Mixer::Slstm(layer) => {
                let (y, s) = layer.step(x_t, state.map(MixerState::into_slstm));
                (y, MixerState::Slstm(s))
            }
            Mixer::Mlstm(layer) => {
                let (y, s) = layer.step(x_t, state.map(MixerState::into_mlstm));
                (y, MixerState::Mlstm(s))
            }
            Mixer::Rwkv7(layer) => {
                let (y, s) = layer.step(x_t, state.map(MixerState::into_rwkv7));
                (y, MixerState::Rwkv7(s))
            }
            Mixer::Attention(attn) => {
                let (y, cache) = attn.step(x_t, state.map(MixerState::into_cache));
                (y, MixerState::Attention(cache))
            }
            Mixer::Parallel(layer) => {
                let (y, s) = layer.step(x_t, state.map(MixerState::into_branches));
                (y, MixerState::Parallel(s))
            }
        }
    }

    /// Floats of state per sequence after `seq_len` tokens: independent of `seq_len` for every
    /// recurrent mixer, `2·seq_len·D` for attention's cache.
    pub fn state_size(&self, seq_len: usize) -> usize {
        match self {
            Mixer::Attention(attn) => attn.state_size(seq_len),
            Mixer::Rnn(rnn) => rnn.state_size(),
            Mixer::Lstm(lstm) => lstm.state_size(),
            Mixer::Gru(gru) => gru.state_size(),
            Mixer::MinGru(cell) => cell.state_size(),
            Mixer::MinLstm(cell) => cell.state_size(),
            Mixer::Mamba(block) => block.state_size(),
            Mixer::Mamba2(block) => block.state_size(),
            Mixer::Rwkv(block) => block.state_size(),
            Mixer::GatedDeltaNet(layer) => layer.state_size(),
            Mixer::Slstm(layer) => layer.state_size(),
            Mixer::Mlstm(layer) => layer.state_size(),
            Mixer::Rwkv7(layer) => layer.state_size(),
            Mixer::Parallel(layer) => layer.state_size(seq_len),
        }
    }
}

impl Mixer {
    /// Forward FLOPs per token beyond the weights (which [`crate::SequenceModel`] counts): the
    /// scans' state updates and attention's scores at length `seq_len`. The classic cells'
    /// elementwise gate math (a few FLOPs per unit against `2·G·H` per unit in their GEMMs) is
    /// not counted.
    pub fn extra_flops_per_token(&self, seq_len: usize) -> f64 {
        match self {
            Mixer::Rnn(_) | Mixer::Lstm(_) | Mixer::Gru(_) => 0.0,
            Mixer::MinGru(cell) => cell.scan_flops_per_token(),
            Mixer::MinLstm(cell) => cell.scan_flops_per_token(),
            Mixer::Mamba(block) => block.scan_flops_per_token(),
            Mixer::Mamba2(block) => block.scan_flops_per_token(),
            Mixer::Rwkv(block) => block.wkv_flops_per_token(),
            Mixer::GatedDeltaNet(layer) => layer.scan_flops_per_token(),
            Mixer::Slstm(layer) => layer.extra_flops_per_token(),
            Mixer::Mlstm(layer) => layer.cell_flops_per_token(),
            Mixer::Rwkv7(layer) => layer.wkv_flops_per_token(),
            Mixer::Attention(attn) => attn.score_flops_per_token(seq_len),
            Mixer::Parallel(layer) => layer.extra_flops_per_token(seq_len),
        }
    }

    /// The sigmoid gate activations one `step` from `state` would use (LSTM `i, f, o`; GRU
    /// `r, z`; minGRU `z`; minLSTM the normalised forget gate), `[B, G]`, for the saturation diagnostic; `None` for mixers whose
    /// memory is not gated that way.
    pub fn gates(&self, x_t: Tensor<2>, state: Option<&MixerState>) -> Option<Tensor<2>> {
        let hidden = match state {
            Some(MixerState::Hidden(h)) => Some(h),
            _ => None,
        };
        match self {
            Mixer::Lstm(cell) => Some(cell.gates(
                x_t,
                match state {
                    Some(MixerState::Lstm(s)) => Some(s),
                    _ => None,
                },
            )),
            Mixer::Gru(cell) => Some(cell.gates(x_t, hidden)),
            Mixer::MinGru(cell) => Some(cell.gates(x_t)),
            Mixer::MinLstm(cell) => Some(cell.gates(x_t)),
            _ => None,
        }
    }

    /// The Elman RNN's recurrent matrix `W_hh`, whose spectral radius governs how fast its
    /// memory fades; `None` for other mixers.
    pub fn recurrent_matrix(&self) -> Option<Tensor<2>> {
        match self {
            Mixer::Rnn(cell) => Some(cell.hidden.weight.val()),
            _ => None,
        }
    }
}

impl MixerState {
    /// Every number of the state in a fixed order, batch-major (sequence `b`'s numbers are
    /// the `b`-th contiguous block): what tests compare across forms and backends, and what
    /// per-sequence state norms are taken over.
    pub fn flatten(&self) -> Tensor<1> {
        Tensor::cat(self.parts(), 1).flatten(0, 1)
    }

    /// Every tensor of the state as `[B, n]`, in [`flatten`](Self::flatten)'s order.
    fn parts(&self) -> Vec<Tensor<2>> {
        fn flat<const D: usize>(t: &Tensor<D>) -> Tensor<2> {
            let dims = t.dims();
            t.clone()
                .reshape([dims[0], dims[1..].iter().product::<usize>()])
        }
        match self {
            MixerState::Hidden(h) => vec![flat(h)],
            MixerState::Lstm(s) => vec![flat(&s.h), flat(&s.c)],
            MixerState::Mamba(s) => vec![flat(&s.conv), flat(&s.ssm)],
            MixerState::Mamba2(s) => vec![flat(&s.conv), flat(&s.ssm)],
            MixerState::Rwkv(s) => {
                let mut parts = vec![flat(&s.shift_time), flat(&s.shift_channel)];
                match &s.wkv {
                    crate::rwkv::WkvState::V4(w) => {
                        parts.extend([flat(&w.a), flat(&w.b), flat(&w.p)])
                    }
                    crate::rwkv::WkvState::V6(w) => parts.push(flat(w)),
                }
                parts
            }
            MixerState::GatedDeltaNet(s) => vec![flat(&s.conv), flat(&s.s)],
            MixerState::Slstm(s) => vec![flat(&s.h), flat(&s.c), flat(&s.n), flat(&s.m)],
            MixerState::Mlstm(s) => vec![flat(&s.c), flat(&s.n), flat(&s.m)],
            MixerState::Rwkv7(s) => vec![flat(&s.shift), flat(&s.s)],
            MixerState::Attention(c) => vec![flat(&c.k), flat(&c.v)],
            MixerState::Parallel(states) => states.iter().flat_map(MixerState::parts).collect(),
        }
    }
}

/// A function applied to every tensor of a state ([`MixerState::map`]), whatever its rank.
pub trait StateMap {
    fn apply<const D: usize>(&mut self, t: Tensor<D>) -> Tensor<D>;

    /// RWKV-4's running maximum `p`, which only rescales `a` and `b` (a change of `p` changes
    /// nothing downstream, so its gradient is zero).
    fn apply_stabiliser<const D: usize>(&mut self, t: Tensor<D>) -> Tensor<D> {
        self.apply(t)
    }
}

impl MixerState {
    /// The state with `f` applied to each of its tensors, in [`flatten`](Self::flatten)'s
    /// order.
    pub fn map(self, f: &mut impl StateMap) -> MixerState {
        match self {
            MixerState::Hidden(h) => MixerState::Hidden(f.apply(h)),
            MixerState::Lstm(s) => MixerState::Lstm(LstmState {
                h: f.apply(s.h),
                c: f.apply(s.c),
            }),
            MixerState::Mamba(s) => MixerState::Mamba(MambaState {
                conv: f.apply(s.conv),
                ssm: f.apply(s.ssm),
            }),
            MixerState::Mamba2(s) => MixerState::Mamba2(Mamba2State {
                conv: f.apply(s.conv),
                ssm: f.apply(s.ssm),
            }),
            MixerState::Rwkv(s) => {
                let shift_time = f.apply(s.shift_time);
                let shift_channel = f.apply(s.shift_channel);
                let wkv = match s.wkv {
                    crate::rwkv::WkvState::V4(w) => {
                        crate::rwkv::WkvState::V4(crate::rwkv::Wkv4State {
                            a: f.apply(w.a),
                            b: f.apply(w.b),
                            p: f.apply_stabiliser(w.p),
                        })
                    }
                    crate::rwkv::WkvState::V6(w) => crate::rwkv::WkvState::V6(f.apply(w)),
                };
                MixerState::Rwkv(crate::rwkv::RwkvState {
                    shift_time,
                    wkv,
                    shift_channel,
                })
            }
            MixerState::GatedDeltaNet(s) => MixerState::GatedDeltaNet(GatedDeltaNetState {
                conv: f.apply(s.conv),
                s: f.apply(s.s),
            }),
            MixerState::Slstm(s) => MixerState::Slstm(SlstmState {
                h: f.apply(s.h),
                c: f.apply(s.c),
                n: f.apply(s.n),
                m: f.apply(s.m),
            }),
            MixerState::Mlstm(s) => MixerState::Mlstm(MlstmState {
                c: f.apply(s.c),
                n: f.apply(s.n),
                m: f.apply(s.m),
            }),
            MixerState::Rwkv7(s) => MixerState::Rwkv7(Rwkv7State {
                shift: f.apply(s.shift),
                s: f.apply(s.s),
            }),
            MixerState::Attention(c) => MixerState::Attention(KvCache {
                k: f.apply(c.k),
                v: f.apply(c.v),
            }),
            MixerState::Parallel(states) => {
                MixerState::Parallel(states.into_iter().map(|s| s.map(f)).collect())
            }
        }
    }

    /// The same state plus zero tensors that autodiff tracks, one `[B, n]` leaf per state
    /// tensor: the gradient of a later loss with respect to a leaf is its gradient with
    /// respect to that part of the state. Needs an autodiff device.
    pub fn perturbed(self) -> (MixerState, Vec<Tensor<2>>) {
        struct Perturb(Vec<Tensor<2>>);
        impl StateMap for Perturb {
            fn apply<const D: usize>(&mut self, t: Tensor<D>) -> Tensor<D> {
                let dims = t.dims();
                let n = dims[1..].iter().product::<usize>();
                let leaf = Tensor::<2>::zeros([dims[0], n], &t.device()).require_grad();
                self.0.push(leaf.clone());
                t + leaf.reshape(dims)
            }

            fn apply_stabiliser<const D: usize>(&mut self, t: Tensor<D>) -> Tensor<D> {
                t
            }
        }
        let mut perturb = Perturb(Vec::new());
        let state = self.map(&mut perturb);
        (state, perturb.0)
    }
}

// A state always comes from the same mixer it is handed back to; a mismatch is a bug in the
// caller, not an input error.
impl MixerState {
    fn into_lstm(self) -> LstmState {
        match self {
            MixerState::Lstm(s) => s,
            other => panic!("an LSTM was handed {other:?}"),
        }
    }

    fn into_branches(self) -> Vec<MixerState> {
        match self {
            MixerState::Parallel(s) => s,
            other => panic!("a parallel layer was handed {other:?}"),
        }
    }

    fn into_mamba(self) -> MambaState {
        match self {
            MixerState::Mamba(s) => s,
            other => panic!("a Mamba block was handed {other:?}"),
        }
    }

    fn into_mamba2(self) -> Mamba2State {
        match self {
            MixerState::Mamba2(s) => s,
            other => panic!("a Mamba-2 block was handed {other:?}"),
        }
    }

    fn into_rwkv(self) -> RwkvState {
        match self {
            MixerState::Rwkv(s) => s,
            other => panic!("an RWKV block was handed {other:?}"),
        }
    }

    fn into_delta(self) -> GatedDeltaNetState {
        match self {
            MixerState::GatedDeltaNet(s) => s,
            other => panic!("a Gated DeltaNet layer was handed {other:?}"),
        }
    }

    fn into_slstm(self) -> SlstmState {
        match self {
            MixerState::Slstm(s) => s,
            other => panic!("an sLSTM layer was handed {other:?}"),
        }
    }

    fn into_rwkv7(self) -> Rwkv7State {
        match self {
            MixerState::Rwkv7(s) => s,
            other => panic!("an RWKV-7 time mix was handed {other:?}"),
        }
    }

    fn into_mlstm(self) -> MlstmState {
        match self {
            MixerState::Mlstm(s) => s,
            other => panic!("an mLSTM layer was handed {other:?}"),
        }
    }

    fn into_cache(self) -> KvCache {
        match self {
            MixerState::Attention(s) => s,
            other => panic!("attention was handed {other:?}"),
        }
    }

    fn into_hidden(self) -> Tensor<2> {
        match self {
            MixerState::Hidden(h) => h,
            other => panic!("an RNN, GRU, minGRU or minLSTM was handed {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: serde_json::Value) -> Result<MixerConfig, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    /// A table with `kind` alone is that kind's `Default` (serde's defaults and the spec's
    /// agree), every kind survives a round trip, and `all` lists the kinds in `KINDS` order.
    #[test]
    fn a_kind_alone_is_its_defaults() {
        let all = MixerConfig::all();
        assert_eq!(all.len(), MixerConfig::KINDS.len());
        for (kind, config) in MixerConfig::KINDS.iter().zip(all) {
            assert_eq!(config.kind(), *kind);
            assert_eq!(parse(serde_json::json!({ "kind": kind })).unwrap(), config);
            let written = serde_json::to_value(&config).unwrap();
            assert_eq!(written["kind"], *kind);
            assert_eq!(parse(written).unwrap(), config);
        }
    }

    /// Each RWKV version takes its own fields only; both have a fused WKV.
    #[test]
    fn rwkv_versions_carry_their_own_fields() {
        let err = parse(serde_json::json!({ "kind": "rwkv", "lora_rank": 8 })).unwrap_err();
        assert!(err.contains("RWKV-6 fields"), "{err}");
        let err = parse(serde_json::json!({ "kind": "rwkv", "version": 5 })).unwrap_err();
        assert!(err.contains("4 or 6"), "{err}");
        let v6 =
            parse(serde_json::json!({ "kind": "rwkv", "version": 6, "head_size": 4 })).unwrap();
        assert_eq!(
            v6,
            MixerConfig::Rwkv(RwkvSpec {
                version: crate::rwkv::Version::V6 {
                    head_size: Some(4),
                    lora_rank: 32
                },
                ..RwkvSpec::default()
            })
        );
        assert!(v6.validate(8).is_ok());
        let fused =
            parse(serde_json::json!({ "kind": "rwkv", "version": 6, "wkv": { "kind": "fused" } }))
                .unwrap();
        fused.validate(64).unwrap();
    }

    /// The form tables as written in configs.
    #[test]
    fn forms_parse_from_their_tables() {
        for (table, form) in [
            (serde_json::json!({ "kind": "auto" }), Form::Auto),
            (serde_json::json!({ "kind": "fused" }), Form::Fused),
            (
                serde_json::json!({ "kind": "sequential" }),
                Form::Tensor(crate::Scan::Sequential),
            ),
            (
                serde_json::json!({ "kind": "chunked", "chunk_len": 3 }),
                Form::Tensor(crate::Scan::Chunked { chunk_len: 3 }),
            ),
        ] {
            let config = parse(serde_json::json!({ "kind": "mamba", "scan": table })).unwrap();
            assert_eq!(config.form(), Some(("scan", form)));
        }
        let err =
            parse(serde_json::json!({ "kind": "mamba", "scan": { "kind": "fast" } })).unwrap_err();
        assert!(err.contains("fast"), "{err}");
    }
}
