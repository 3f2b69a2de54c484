//! The swappable sequence mixer: one config enum, one module enum, one state enum.
//!
//! Every mixer maps `[B, T, D] → [B, T, D]` with explicit state in and out, and offers a
//! single-token `step` for recurrent inference. Adding an architecture means adding a variant
//! to each of the three enums below and to their `match`es; nothing else changes.

use burn::module::Module;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::init::Init;
use crate::lstm::{Lstm, LstmConfig, LstmState};

/// Which mixer a block uses, with that mixer's own hyper-parameters (its width is the model's
/// `d_model`). In TOML: `[model.mixer]` with `kind = "lstm"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum MixerConfig {
    /// [`Lstm`]; `forget_bias` is added to the forget-gate bias at initialisation.
    Lstm {
        #[serde(default)]
        forget_bias: f64,
    },
}

impl MixerConfig {
    /// Every mixer kind, as written in configs.
    pub const KINDS: &[&str] = &["lstm"];

    /// The name used in configs, reports and run summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            MixerConfig::Lstm { .. } => "lstm",
        }
    }

    pub fn init(&self, d_model: usize, init: &mut Init) -> Mixer {
        match self {
            MixerConfig::Lstm { forget_bias } => Mixer::Lstm(
                LstmConfig {
                    d_input: d_model,
                    d_hidden: d_model,
                    forget_bias: *forget_bias,
                }
                .init(init),
            ),
        }
    }
}

#[derive(Module, Debug)]
pub enum Mixer {
    Lstm(Lstm),
}

/// The recurrent state a mixer carries from one call to the next.
#[derive(Clone, Debug)]
pub enum MixerState {
    Lstm(LstmState),
}

impl Mixer {
    /// `x [B, T, D]` → `y [B, T, D]` and the state after the last step.
    pub fn forward(&self, x: Tensor<3>, state: Option<MixerState>) -> (Tensor<3>, MixerState) {
        match self {
            Mixer::Lstm(lstm) => {
                let (y, s) = lstm.forward(x, state.map(MixerState::into_lstm));
                (y, MixerState::Lstm(s))
            }
        }
    }

    /// `x_t [B, D]` → `y_t [B, D]` and the next state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<MixerState>) -> (Tensor<2>, MixerState) {
        match self {
            Mixer::Lstm(lstm) => {
                let (y, s) = lstm.step(x_t, state.map(MixerState::into_lstm));
                (y, MixerState::Lstm(s))
            }
        }
    }

    /// Floats of recurrent state per sequence (independent of `T` for every recurrent mixer).
    pub fn state_size(&self) -> usize {
        match self {
            Mixer::Lstm(lstm) => lstm.state_size(),
        }
    }
}

impl MixerState {
    fn into_lstm(self) -> LstmState {
        match self {
            MixerState::Lstm(s) => s,
        }
    }
}
