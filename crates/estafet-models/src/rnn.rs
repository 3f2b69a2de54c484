//! The Elman RNN in PyTorch's `nn.RNN` formulation.
//!
//! ```text
//! h_t = φ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh),    φ = tanh or relu
//! ```
//!
//! With `irnn_init` (Le, Jaitly & Hinton 2015, "IRNN") the recurrent matrix starts as the
//! identity and the recurrent bias at zero, which with relu lets the state carry information
//! unchanged until training says otherwise. The input projection of every step is one matmul
//! before the time loop.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::{relu, tanh};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused::{self, Cell};
use crate::init::Init;
use crate::time::recur;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Nonlinearity {
    #[default]
    Tanh,
    Relu,
}

/// `[model.mixer]` with `kind = "rnn"`: `nonlinearity = "tanh" | "relu"`, `irnn_init` for the
/// identity recurrent initialisation. Its width is the model's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RnnSpec {
    pub nonlinearity: Nonlinearity,
    pub irnn_init: bool,
}

impl RnnSpec {
    pub fn config(&self, d_model: usize) -> RnnConfig {
        RnnConfig {
            d_input: d_model,
            d_hidden: d_model,
            nonlinearity: self.nonlinearity,
            irnn_init: self.irnn_init,
        }
    }

    pub fn validate(&self, _d_model: usize) -> Result<(), String> {
        Ok(())
    }
}

/// Configuration of an [`Rnn`] layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RnnConfig {
    /// Input features `D`.
    pub d_input: usize,
    /// Hidden size `H`.
    pub d_hidden: usize,
    pub nonlinearity: Nonlinearity,
    /// Identity recurrent matrix and zero recurrent bias (IRNN) instead of PyTorch's uniform.
    pub irnn_init: bool,
}

/// One Elman RNN layer. Create it with [`RnnConfig::init`].
#[derive(Module, Debug)]
pub struct Rnn {
    /// `[D, H]` with bias `b_ih`.
    pub input: Linear,
    /// `[H, H]` with bias `b_hh`.
    pub hidden: Linear,
    #[module(skip)]
    pub nonlinearity: Nonlinearity,
}

impl RnnConfig {
    /// PyTorch's initialisation, every weight and bias `U(-1/√H, 1/√H)`, unless `irnn_init`.
    pub fn init(&self, init: &mut Init) -> Rnn {
        let (d, h) = (self.d_input, self.d_hidden);
        let bound = 1.0 / (h as f64).sqrt();
        let input = Linear {
            weight: init.uniform([d, h], bound),
            bias: Some(init.uniform([h], bound)),
        };
        let hidden = if self.irnn_init {
            Linear {
                weight: init.identity(h),
                bias: Some(init.constant([h], 0.0)),
            }
        } else {
            Linear {
                weight: init.uniform([h, h], bound),
                bias: Some(init.uniform([h], bound)),
            }
        };
        Rnn {
            input,
            hidden,
            nonlinearity: self.nonlinearity,
        }
    }
}

impl Rnn {
    pub fn d_hidden(&self) -> usize {
        self.hidden.weight.lazy_shape()[0]
    }

    /// Floats of recurrent state per sequence: `h`.
    pub fn state_size(&self) -> usize {
        self.d_hidden()
    }

    /// `x [B, T, D]` (`T ≥ 1`), `h_0 [B, H]` (zeros if `None`) → `h_1..h_T [B, T, H]`, `h_T`.
    ///
    /// On a backend with the fused kernel this is one op ([`fused::cell_scan`]), elsewhere
    /// [`Self::forward_sequential`].
    pub fn forward(&self, x: Tensor<3>, state: Option<Tensor<2>>) -> (Tensor<3>, Tensor<2>) {
        let cell = match self.nonlinearity {
            Nonlinearity::Tanh => Cell::Tanh,
            Nonlinearity::Relu => Cell::Relu,
        };
        let hidden = self.d_hidden();
        if !fused::runs(fused::Op::Cell { cell, hidden }, &x.device(), x.dims()[1]) {
            return self.forward_sequential(x, state);
        }
        let [batch, _, _] = x.dims();
        let h = state.unwrap_or_else(|| self.zeros(batch, &x.device()));
        fused::cell_layer(cell, x, &self.input, &self.hidden, h, None)
    }

    /// The definition, one cell update per step built from tensor ops: what the fused op is
    /// tested against, and what backends without the kernel run.
    pub fn forward_sequential(
        &self,
        x: Tensor<3>,
        state: Option<Tensor<2>>,
    ) -> (Tensor<3>, Tensor<2>) {
        let [batch, _, _] = x.dims();
        let h = state.unwrap_or_else(|| self.zeros(batch, &x.device()));
        recur(
            self.input.forward(x),
            h,
            |p, h| self.cell(p, h),
            Clone::clone,
        )
    }

    /// `x_t [B, D]`, `h_{t-1} [B, H]` → `h_t`, returned as output and as state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<Tensor<2>>) -> (Tensor<2>, Tensor<2>) {
        let [batch, _] = x_t.dims();
        let h = state.unwrap_or_else(|| self.zeros(batch, &x_t.device()));
        let h = self.cell(self.input.forward(x_t), h);
        (h.clone(), h)
    }

    fn cell(&self, pre_x: Tensor<2>, h: Tensor<2>) -> Tensor<2> {
        let pre = pre_x + self.hidden.forward(h);
        match self.nonlinearity {
            Nonlinearity::Tanh => tanh(pre),
            Nonlinearity::Relu => relu(pre),
        }
    }

    fn zeros(&self, batch: usize, device: &Device) -> Tensor<2> {
        Tensor::zeros([batch, self.d_hidden()], device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::device;
    use burn::tensor::{TensorData, Tolerance};

    #[test]
    fn irnn_init_is_identity_and_carries_the_state() {
        let rnn = RnnConfig {
            d_input: 2,
            d_hidden: 3,
            nonlinearity: Nonlinearity::Relu,
            irnn_init: true,
        }
        .init(&mut Init::new(0, &device()));
        rnn.hidden.weight.val().to_data().assert_approx_eq::<f32>(
            &TensorData::from([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
            Tolerance::absolute(0.0),
        );
        // With a zero input projection a positive state passes through unchanged.
        let rnn = Rnn {
            input: Linear {
                weight: Init::new(0, &device()).constant([2, 3], 0.0),
                bias: Some(Init::new(0, &device()).constant([3], 0.0)),
            },
            ..rnn
        };
        let h0 = Tensor::<2>::from_floats([[0.5, 1.0, 2.0]], &device());
        let (_, h) = rnn.forward(Tensor::zeros([1, 9, 2], &device()), Some(h0.clone()));
        h.to_data()
            .assert_approx_eq::<f32>(&h0.to_data(), Tolerance::absolute(1e-6));
    }
}
