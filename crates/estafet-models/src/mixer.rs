//! The swappable sequence mixer: one config enum, one module enum, one state enum.
//!
//! Every mixer maps `[B, T, D] → [B, T, D]` with explicit state in and out, and offers a
//! single-token `step` for recurrent inference. Adding an architecture means adding a variant
//! to each of the three enums below and to their `match`es; nothing else changes.

use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::gru::{Gru, GruConfig};
use crate::init::Init;
use crate::lstm::{Lstm, LstmConfig, LstmState};
use crate::rnn::{Nonlinearity, Rnn, RnnConfig};

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
}

impl MixerConfig {
    /// Every mixer kind, as written in configs.
    pub const KINDS: &[&str] = &["rnn", "lstm", "gru"];

    /// The name used in configs, reports and run summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            MixerConfig::Rnn { .. } => "rnn",
            MixerConfig::Lstm { .. } => "lstm",
            MixerConfig::Gru => "gru",
        }
    }

    pub fn init(&self, d_model: usize, init: &mut Init) -> Mixer {
        match self {
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
        }
    }
}

#[derive(Module, Debug)]
pub enum Mixer {
    Rnn(Rnn),
    Lstm(Lstm),
    Gru(Gru),
}

/// The recurrent state a mixer carries from one call to the next.
#[derive(Clone, Debug)]
pub enum MixerState {
    /// `h [B, H]` of an RNN or GRU.
    Hidden(Tensor<2>),
    Lstm(LstmState),
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
        }
    }

    /// Floats of recurrent state per sequence (independent of `T` for every recurrent mixer).
    pub fn state_size(&self) -> usize {
        match self {
            Mixer::Rnn(rnn) => rnn.state_size(),
            Mixer::Lstm(lstm) => lstm.state_size(),
            Mixer::Gru(gru) => gru.state_size(),
        }
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

    fn into_hidden(self) -> Tensor<2> {
        match self {
            MixerState::Hidden(h) => h,
            other => panic!("an RNN or GRU was handed {other:?}"),
        }
    }
}
