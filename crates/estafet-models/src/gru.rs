//! The gated recurrent unit (Cho et al. 2014) in PyTorch's `nn.GRU` formulation, where the reset
//! gate scales the recurrent projection *after* the matmul, bias included:
//!
//! ```text
//! r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)            reset gate
//! z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)            update gate
//! n_t = tanh(W_in x_t + b_in + r_t ⊙ (W_hn h_{t-1} + b_hn))  candidate
//! h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t-1}
//! ```
//!
//! Gates are fused in PyTorch's order `(r, z, n)`, so `weight_ih_l0 [3H, D]` is `input.weight`
//! transposed. The input projection of every step is one matmul before the time loop.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::{sigmoid, tanh};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused::{self, Cell};
use crate::init::Init;
use crate::time::recur;

/// `[model.mixer]` with `kind = "gru"`: PyTorch's GRU has no options. Its width is the
/// model's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GruSpec {}

impl GruSpec {
    pub fn config(&self, d_model: usize) -> GruConfig {
        GruConfig {
            d_input: d_model,
            d_hidden: d_model,
        }
    }

    pub fn validate(&self, _d_model: usize) -> Result<(), String> {
        Ok(())
    }
}

/// Configuration of a [`Gru`] layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GruConfig {
    /// Input features `D`.
    pub d_input: usize,
    /// Hidden size `H`.
    pub d_hidden: usize,
}

/// One GRU layer. Create it with [`GruConfig::init`].
#[derive(Module, Debug)]
pub struct Gru {
    /// `[D, 3H]`, gates `(r, z, n)`, with bias `b_i*`.
    pub input: Linear,
    /// `[H, 3H]`, same order, with bias `b_h*`.
    pub hidden: Linear,
}

impl GruConfig {
    /// PyTorch's initialisation: every weight and bias `U(-1/√H, 1/√H)`.
    pub fn init(&self, init: &mut Init) -> Gru {
        let (d, h) = (self.d_input, self.d_hidden);
        let bound = 1.0 / (h as f64).sqrt();
        Gru {
            input: Linear {
                weight: init.uniform([d, 3 * h], bound),
                bias: Some(init.uniform([3 * h], bound)),
            },
            hidden: Linear {
                weight: init.uniform([h, 3 * h], bound),
                bias: Some(init.uniform([3 * h], bound)),
            },
        }
    }
}

impl Gru {
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
        let op = fused::Op::Cell {
            cell: Cell::Gru,
            hidden: self.d_hidden(),
        };
        if !fused::runs(op, &x.device(), x.dims()[1]) {
            return self.forward_sequential(x, state);
        }
        let [batch, _, _] = x.dims();
        let h = state.unwrap_or_else(|| self.zeros(batch, &x.device()));
        fused::cell_layer(Cell::Gru, x, &self.input, &self.hidden, h, None)
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
            |g, h| self.cell(g, h),
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

    /// The sigmoid gates `r, z` one step from `h` would use, `[B, 2H]`: what the saturation
    /// diagnostic reads.
    pub fn gates(&self, x_t: Tensor<2>, h: Option<&Tensor<2>>) -> Tensor<2> {
        let [batch, _] = x_t.dims();
        let h = h
            .cloned()
            .unwrap_or_else(|| self.zeros(batch, &x_t.device()));
        let [xr, xz, _]: [Tensor<2>; 3] = self
            .input
            .forward(x_t)
            .chunk(3, 1)
            .try_into()
            .expect("3H splits into three gates");
        let [hr, hz, _]: [Tensor<2>; 3] = self
            .hidden
            .forward(h)
            .chunk(3, 1)
            .try_into()
            .expect("3H splits into three gates");
        sigmoid(Tensor::cat(vec![xr + hr, xz + hz], 1))
    }

    fn cell(&self, gates_x: Tensor<2>, h: Tensor<2>) -> Tensor<2> {
        let [xr, xz, xn]: [Tensor<2>; 3] = gates_x
            .chunk(3, 1)
            .try_into()
            .expect("3H splits into three gates");
        let [hr, hz, hn]: [Tensor<2>; 3] = self
            .hidden
            .forward(h.clone())
            .chunk(3, 1)
            .try_into()
            .expect("3H splits into three gates");
        let r = sigmoid(xr + hr);
        let z = sigmoid(xz + hz);
        let n = tanh(xn + r * hn);
        n.clone() + z * (h - n)
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

    /// D = H = 1, every weight 0.5, biases 0, h_0 = 0, x_1 = 1:
    /// r = z = σ(0.5) = 0.622459, n = tanh(0.5 + r·0) = 0.462117,
    /// h_1 = (1 − z)·n = 0.174468.
    #[test]
    fn hand_computed_step() {
        let init = Init::new(0, &device());
        let gru = Gru {
            input: Linear {
                weight: init.param(vec![0.5; 3], [1, 3]),
                bias: Some(init.param(vec![0.0; 3], [3])),
            },
            hidden: Linear {
                weight: init.param(vec![0.5; 3], [1, 3]),
                bias: Some(init.param(vec![0.0; 3], [3])),
            },
        };
        let (h, _) = gru.step(Tensor::from_floats([[1.0]], &device()), None);
        h.to_data()
            .assert_approx_eq::<f32>(&TensorData::from([[0.174468]]), Tolerance::absolute(1e-6));
    }
}
