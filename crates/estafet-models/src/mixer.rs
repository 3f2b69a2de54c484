//! The swappable sequence mixer: one config enum, one module enum, one state enum.
//!
//! Every mixer maps `[B, T, D] → [B, T, D]` with explicit state in and out, and offers a
//! single-token `step` for recurrent inference. Adding an architecture means adding a variant
//! to each of the three enums below and to their `match`es; nothing else changes.

use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::attention::{Attention, AttentionConfig, KvCache, Positions};
use crate::gru::{Gru, GruConfig};
use crate::init::Init;
use crate::lstm::{Lstm, LstmConfig, LstmState};
use crate::mamba::{Mamba, MambaConfig, MambaState};
use crate::mingru::{MinGru, MinGruConfig};
use crate::rnn::{Nonlinearity, Rnn, RnnConfig};
use crate::rwkv::{Rwkv, RwkvConfig, RwkvState, WkvForm};
use crate::scan::Scan;

/// Which mixer a block uses, with that mixer's own hyper-parameters (its width is the model's
/// `d_model`). In TOML: `[model.mixer]` with `kind = "lstm"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MixerConfig {
    /// [`Rnn`], the Elman RNN: `nonlinearity = "tanh" | "relu"`, `irnn_init` for the identity
    /// recurrent initialisation.
    Rnn {
        #[serde(default)]
        nonlinearity: Nonlinearity,
        #[serde(default)]
        irnn_init: bool,
    },
    /// [`Lstm`]; `forget_bias` is added to the forget-gate bias at initialisation.
    Lstm {
        #[serde(default)]
        forget_bias: f64,
    },
    /// [`Gru`], PyTorch's formulation.
    Gru,
    /// [`MinGru`]; `scan` picks the training form.
    #[serde(rename = "mingru")]
    MinGru {
        #[serde(default = "default_scan")]
        scan: Scan,
    },
    /// [`Mamba`], the selective SSM block of Mamba-1; the paper's symbols.
    Mamba {
        /// N.
        #[serde(default = "default_d_state")]
        d_state: usize,
        /// E.
        #[serde(default = "default_expand")]
        expand: usize,
        #[serde(default = "default_d_conv")]
        d_conv: usize,
        /// R; `⌈d_model / 16⌉` when absent.
        #[serde(default)]
        dt_rank: Option<usize>,
        #[serde(default = "default_scan")]
        scan: Scan,
    },
    /// [`Rwkv`], a complete RWKV block (time mix and channel mix with their own pre-norms and
    /// residuals; use it with `layout = "stacked"` to get RWKV's own architecture).
    Rwkv {
        /// 4 (RWKV-4, per-channel decay) or 6 (Finch, matrix state, data-dependent decay).
        #[serde(default = "default_rwkv_version")]
        version: u8,
        #[serde(default = "default_ffn_expand")]
        ffn_expand: usize,
        /// RWKV-6 head size; `min(64, d_model)` when absent.
        #[serde(default)]
        head_size: Option<usize>,
        /// RWKV-6 LoRA rank.
        #[serde(default = "default_lora_rank")]
        lora_rank: usize,
        #[serde(default = "default_wkv")]
        wkv: WkvForm,
    },
    /// [`Attention`], causal softmax attention with a KV cache: the non-recurrent baseline.
    Attention {
        #[serde(default = "default_n_heads")]
        n_heads: usize,
        #[serde(default = "default_positions")]
        positions: Positions,
    },
}

fn default_n_heads() -> usize {
    4
}

fn default_positions() -> Positions {
    Positions::Rotary
}

fn default_rwkv_version() -> u8 {
    4
}

fn default_ffn_expand() -> usize {
    4
}

fn default_lora_rank() -> usize {
    32
}

/// As for the scans, the loop is the fastest form measured here (B = 32, T = 256, D = 256:
/// 0.74 s vs 3.6 s at chunk 16 for forward and backward).
fn default_wkv() -> WkvForm {
    WkvForm::Sequential
}

fn default_d_state() -> usize {
    16
}

fn default_expand() -> usize {
    2
}

fn default_d_conv() -> usize {
    4
}

/// On a 2-core CPU with ndarray the loop beat every chunk length tried (B = 32, T = 256:
/// minGRU-sized M = 64 113 ms vs 469 ms at chunk 16 for forward and backward; Mamba-sized
/// M = 1024 3.2 s vs 13.6 s), so the definition is also the default.
fn default_scan() -> Scan {
    Scan::Sequential
}

impl MixerConfig {
    /// Every mixer kind, as written in configs.
    pub const KINDS: &[&str] = &["rnn", "lstm", "gru", "mingru", "mamba", "rwkv", "attention"];

    /// The name used in configs, reports and run summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            MixerConfig::Rnn { .. } => "rnn",
            MixerConfig::Lstm { .. } => "lstm",
            MixerConfig::Gru => "gru",
            MixerConfig::MinGru { .. } => "mingru",
            MixerConfig::Mamba { .. } => "mamba",
            MixerConfig::Rwkv { .. } => "rwkv",
            MixerConfig::Attention { .. } => "attention",
        }
    }

    /// Checks what serde cannot, at width `d_model`; the message names the field.
    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        match self {
            MixerConfig::MinGru { scan } => scan.validate().map_err(|e| format!("model.mixer.{e}")),
            MixerConfig::Mamba {
                d_state,
                expand,
                d_conv,
                dt_rank,
                scan,
            } => {
                let positive = [
                    ("d_state", *d_state),
                    ("expand", *expand),
                    ("dt_rank", dt_rank.unwrap_or(1)),
                ];
                if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
                    return Err(format!("model.mixer.{field} must be at least 1"));
                }
                if *d_conv < 2 {
                    return Err(
                        "model.mixer.d_conv must be at least 2 (a causal kernel spans the past)"
                            .into(),
                    );
                }
                scan.validate().map_err(|e| format!("model.mixer.{e}"))
            }
            MixerConfig::Rwkv { .. } => self.rwkv_config(d_model).validate(),
            MixerConfig::Attention { n_heads, positions } => AttentionConfig {
                d_model,
                n_heads: *n_heads,
                positions: *positions,
            }
            .validate(),
            MixerConfig::Rnn { .. } | MixerConfig::Lstm { .. } | MixerConfig::Gru => Ok(()),
        }
    }

    /// The RWKV block this config describes at width `d_model`.
    fn rwkv_config(&self, d_model: usize) -> RwkvConfig {
        match self {
            MixerConfig::Rwkv {
                version,
                ffn_expand,
                head_size,
                lora_rank,
                wkv,
            } => RwkvConfig {
                d_model,
                version: *version,
                ffn_expand: *ffn_expand,
                head_size: head_size.unwrap_or(64.min(d_model)),
                lora_rank: *lora_rank,
                wkv: *wkv,
            },
            _ => unreachable!("only called on MixerConfig::Rwkv"),
        }
    }

    pub fn init(&self, d_model: usize, init: &mut Init) -> Mixer {
        match self {
            MixerConfig::Rwkv { .. } => Mixer::Rwkv(self.rwkv_config(d_model).init(init)),
            MixerConfig::Attention { n_heads, positions } => Mixer::Attention(
                AttentionConfig {
                    d_model,
                    n_heads: *n_heads,
                    positions: *positions,
                }
                .init(init),
            ),
            MixerConfig::Rnn {
                nonlinearity,
                irnn_init,
            } => Mixer::Rnn(
                RnnConfig {
                    d_input: d_model,
                    d_hidden: d_model,
                    nonlinearity: *nonlinearity,
                    irnn_init: *irnn_init,
                }
                .init(init),
            ),
            MixerConfig::Lstm { forget_bias } => Mixer::Lstm(
                LstmConfig {
                    d_input: d_model,
                    d_hidden: d_model,
                    forget_bias: *forget_bias,
                }
                .init(init),
            ),
            MixerConfig::Gru => Mixer::Gru(
                GruConfig {
                    d_input: d_model,
                    d_hidden: d_model,
                }
                .init(init),
            ),
            MixerConfig::Mamba {
                d_state,
                expand,
                d_conv,
                dt_rank,
                scan,
            } => {
                let mut config = MambaConfig::new(d_model, *scan);
                config.d_state = *d_state;
                config.expand = *expand;
                config.d_conv = *d_conv;
                config.dt_rank = dt_rank.unwrap_or(config.dt_rank);
                Mixer::Mamba(config.init(init))
            }
            MixerConfig::MinGru { scan } => Mixer::MinGru(
                MinGruConfig {
                    d_input: d_model,
                    d_hidden: d_model,
                    scan: *scan,
                }
                .init(init),
            ),
        }
    }
}

#[derive(Module, Debug)]
pub enum Mixer {
    Rnn(Rnn),
    Lstm(Lstm),
    Gru(Gru),
    MinGru(MinGru),
    Mamba(Mamba),
    Rwkv(Rwkv),
    Attention(Attention),
}

/// The recurrent state a mixer carries from one call to the next.
#[derive(Clone, Debug)]
pub enum MixerState {
    /// `h [B, H]` of an RNN, GRU or minGRU.
    Hidden(Tensor<2>),
    Lstm(LstmState),
    Mamba(MambaState),
    Rwkv(RwkvState),
    /// Attention's KV cache, which grows with every token.
    Attention(KvCache),
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
            Mixer::Mamba(block) => {
                let (y, s) = block.forward(x, state.map(MixerState::into_mamba));
                (y, MixerState::Mamba(s))
            }
            Mixer::Rwkv(block) => {
                let (y, s) = block.forward(x, state.map(MixerState::into_rwkv));
                (y, MixerState::Rwkv(s))
            }
            Mixer::Attention(attn) => {
                let (y, cache) = attn.forward(x, state.map(MixerState::into_cache));
                (y, MixerState::Attention(cache))
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
            Mixer::Mamba(block) => {
                let (y, s) = block.step(x_t, state.map(MixerState::into_mamba));
                (y, MixerState::Mamba(s))
            }
            Mixer::Rwkv(block) => {
                let (y, s) = block.step(x_t, state.map(MixerState::into_rwkv));
                (y, MixerState::Rwkv(s))
            }
            Mixer::Attention(attn) => {
                let (y, cache) = attn.step(x_t, state.map(MixerState::into_cache));
                (y, MixerState::Attention(cache))
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
            Mixer::Mamba(block) => block.state_size(),
            Mixer::Rwkv(block) => block.state_size(),
        }
    }
}

impl Mixer {
    /// The sigmoid gate activations one `step` from `state` would use (LSTM `i, f, o`; GRU
    /// `r, z`; minGRU `z`), `[B, G]`, for the saturation diagnostic; `None` for mixers whose
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
        fn flat<const D: usize>(t: &Tensor<D>) -> Tensor<2> {
            let dims = t.dims();
            t.clone()
                .reshape([dims[0], dims[1..].iter().product::<usize>()])
        }
        let parts = match self {
            MixerState::Hidden(h) => vec![flat(h)],
            MixerState::Lstm(s) => vec![flat(&s.h), flat(&s.c)],
            MixerState::Mamba(s) => vec![flat(&s.conv), flat(&s.ssm)],
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
            MixerState::Attention(c) => vec![flat(&c.k), flat(&c.v)],
        };
        Tensor::cat(parts, 1).flatten(0, 1)
    }
}

impl MixerState {
    /// The same state plus zero tensors that autodiff tracks, one `[B, n]` leaf per state
    /// tensor: the gradient of a later loss with respect to a leaf is its gradient with
    /// respect to that part of the state. Needs an autodiff device.
    pub fn perturbed(self) -> (MixerState, Vec<Tensor<2>>) {
        fn add<const D: usize>(t: Tensor<D>, leaves: &mut Vec<Tensor<2>>) -> Tensor<D> {
            let dims = t.dims();
            let n = dims[1..].iter().product::<usize>();
            let leaf = Tensor::<2>::zeros([dims[0], n], &t.device()).require_grad();
            leaves.push(leaf.clone());
            t + leaf.reshape(dims)
        }
        let mut leaves = Vec::new();
        let state = match self {
            MixerState::Hidden(h) => MixerState::Hidden(add(h, &mut leaves)),
            MixerState::Lstm(s) => MixerState::Lstm(LstmState {
                h: add(s.h, &mut leaves),
                c: add(s.c, &mut leaves),
            }),
            MixerState::Mamba(s) => MixerState::Mamba(MambaState {
                conv: add(s.conv, &mut leaves),
                ssm: add(s.ssm, &mut leaves),
            }),
            MixerState::Rwkv(s) => MixerState::Rwkv(crate::rwkv::RwkvState {
                shift_time: add(s.shift_time, &mut leaves),
                wkv: match s.wkv {
                    crate::rwkv::WkvState::V4(w) => {
                        crate::rwkv::WkvState::V4(crate::rwkv::Wkv4State {
                            a: add(w.a, &mut leaves),
                            b: add(w.b, &mut leaves),
                            // The running maximum only rescales a and b; its gradient is zero.
                            p: w.p,
                        })
                    }
                    crate::rwkv::WkvState::V6(w) => crate::rwkv::WkvState::V6(add(w, &mut leaves)),
                },
                shift_channel: add(s.shift_channel, &mut leaves),
            }),
            MixerState::Attention(c) => MixerState::Attention(KvCache {
                k: add(c.k, &mut leaves),
                v: add(c.v, &mut leaves),
            }),
        };
        (state, leaves)
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

    fn into_mamba(self) -> MambaState {
        match self {
            MixerState::Mamba(s) => s,
            other => panic!("a Mamba block was handed {other:?}"),
        }
    }

    fn into_rwkv(self) -> RwkvState {
        match self {
            MixerState::Rwkv(s) => s,
            other => panic!("an RWKV block was handed {other:?}"),
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
            other => panic!("an RNN, GRU or minGRU was handed {other:?}"),
        }
    }
}
