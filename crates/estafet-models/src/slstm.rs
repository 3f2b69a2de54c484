//! sLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", §2.2): an LSTM with
//! exponential input gating, a normaliser state and a stabiliser, whose recurrent weights are
//! block-diagonal by head. Its update is non-linear in the state, so it has no parallel form.
//!
//! ```text
//! (ĩ, f̃, z̃, õ)_t = W x_t + R h_{t−1} + b           R block-diagonal: H heads of [d_h, 4·d_h]
//! m_t = max(log σ(f̃_t) + m_{t−1}, ĩ_t)              stabiliser (eq. 15)
//! i'_t = exp(ĩ_t − m_t),  f'_t = exp(log σ(f̃_t) + m_{t−1} − m_t)
//! c_t = f'_t ⊙ c_{t−1} + i'_t ⊙ tanh(z̃_t)            cell
//! n_t = f'_t ⊙ n_{t−1} + i'_t                        normaliser
//! h_t = σ(õ_t) ⊙ c_t / n_t
//! y_t = GroupNorm_H(h_t)                             per head, with a learned scale
//! ```
//!
//! The stabiliser rescales `c` and `n` alike, so `h` does not depend on it: it only keeps
//! `exp` finite. As in xLSTM's sLSTM layer, the output is the head-wise normalised `h` (the
//! block's MLP follows in estafet's residual layout); unlike it, the gate pre-activations come
//! from one dense `W` rather than head-wise ones, and there is no causal convolution before the
//! input and forget gates. `step` carries `(h, c, n, m)`: O(1) memory per token.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, softplus};
use serde::{Deserialize, Serialize};

use crate::fused;
use crate::init::Init;
use crate::norm::standardise;
use crate::time::recur;

/// `[model.mixer]` with `kind = "slstm"`: the number of heads `H` of the block-diagonal
/// recurrence (xLSTM's default is 4). Its width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlstmSpec {
    pub n_heads: usize,
}

impl Default for SlstmSpec {
    fn default() -> Self {
        Self { n_heads: 4 }
    }
}

impl SlstmSpec {
    pub fn config(&self, d_model: usize) -> SlstmConfig {
        SlstmConfig {
            d_model,
            n_heads: self.n_heads,
        }
    }

    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        if self.n_heads == 0 || !d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "model.mixer.n_heads = {} must divide d_model = {d_model}",
                self.n_heads
            ));
        }
        Ok(())
    }
}

/// Configuration of an [`Slstm`] layer.
#[derive(Clone, Debug, PartialEq)]
pub struct SlstmConfig {
    /// Width `D`, also the hidden size.
    pub d_model: usize,
    /// Heads `H`; each has `d_h = D / H` units.
    pub n_heads: usize,
}

impl SlstmConfig {
    /// `W` and `b` as PyTorch's `nn.Linear`, `R` uniform in `±1/√d_h`, the forget gate's bias
    /// spread over `[3, 6]` across each head's units (long memory from the start, as xLSTM's
    /// gate-bias initialisations intend) and the other biases zero, the norm's scale one.
    pub fn init(&self, init: &mut Init) -> Slstm {
        let (d, h) = (self.d_model, self.n_heads);
        let dh = d / h;
        let mut input = init.linear(d, 4 * d, false);
        let mut bias = vec![0.0f32; 4 * d];
        for unit in 0..d {
            let j = unit % dh;
            bias[d + unit] = 3.0 + 3.0 * j as f32 / (dh.max(2) - 1) as f32;
        }
        input.bias = Some(init.param(bias, [4 * d]));
        Slstm {
            input,
            recurrent: init.uniform([h, dh, 4 * dh], 1.0 / (dh as f64).sqrt()),
            norm: init.constant([d], 1.0),
        }
    }
}

/// One sLSTM layer. Create it with [`SlstmConfig::init`].
#[derive(Module, Debug)]
pub struct Slstm {
    /// `[D, 4D]` with bias: `ĩ`, `f̃`, `z̃`, `õ`, each `D` columns, head-major within.
    pub input: Linear,
    /// `[H, d_h, 4·d_h]`: head `k`'s `d_h` units to its four gates (gate-major columns).
    pub recurrent: Param<Tensor<3>>,
    /// `[D]`: the group norm's scale.
    pub norm: Param<Tensor<1>>,
}

/// The state of an sLSTM layer between calls, each `[B, D]`.
#[derive(Clone, Debug)]
pub struct SlstmState {
    pub h: Tensor<2>,
    pub c: Tensor<2>,
    pub n: Tensor<2>,
    /// The stabiliser `m` (log scale of `c` and `n`).
    pub m: Tensor<2>,
}

impl Slstm {
    fn d_model(&self) -> usize {
        self.norm.lazy_shape()[0]
    }

    fn heads(&self) -> usize {
        self.recurrent.lazy_shape()[0]
    }

    /// Floats of state per sequence: `h`, `c`, `n` and `m`.
    pub fn state_size(&self) -> usize {
        4 * self.d_model()
    }

    /// FLOPs per token beyond the dense `W`: the block-diagonal `R` (`2·D·4·d_h`) and about
    /// twenty for the gates, states and norm per unit.
    pub fn extra_flops_per_token(&self) -> f64 {
        let (d, h) = (self.d_model(), self.heads());
        (8 * d * (d / h) + 20 * d) as f64
    }

    pub fn zero_state(&self, batch: usize, device: &burn::tensor::Device) -> SlstmState {
        let zeros = || Tensor::zeros([batch, self.d_model()], device);
        SlstmState {
            h: zeros(),
            c: zeros(),
            n: zeros(),
            m: zeros(),
        }
    }

    /// `x [B, T, D]` (`T ≥ 1`) → `y [B, T, D]` and the state after the last step: on a
    /// backend with the recurrence's kernel (the CPU backends, wgpu) it is one op
    /// ([`fused::slstm_cell`]), elsewhere the definition.
    pub fn forward(&self, x: Tensor<3>, state: Option<SlstmState>) -> (Tensor<3>, SlstmState) {
        let op = fused::Op::Slstm {
            d: self.d_model(),
            heads: self.heads(),
        };
        let fused = fused::runs(op, &x.device(), x.dims()[1]);
        self.forward_with(x, state, fused)
    }

    /// As [`Slstm::forward`], through the fused op or (`fused` false) the definition, one step
    /// of tensor ops per token.
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        state: Option<SlstmState>,
        fused: bool,
    ) -> (Tensor<3>, SlstmState) {
        let [batch, t, d] = x.dims();
        let state = state.unwrap_or_else(|| self.zero_state(batch, &x.device()));
        let wx = self.input.forward(x);
        if fused {
            let SlstmState { h, c, n, m } = state;
            let out = fused::slstm_cell(wx, self.recurrent.val(), [h, c, n, m]);
            let part = |from: usize| out.clone().narrow(1, from, d);
            let hs = fused::narrow(out.clone(), 1, 0, t * d).reshape([batch, t, d]);
            let state = SlstmState {
                h: part((t - 1) * d),
                c: part(t * d),
                n: part(t * d + d),
                m: part(t * d + 2 * d),
            };
            return (self.group_norm(hs), state);
        }
        let (h, state) = recur(wx, state, |wx_t, s| self.cell(wx_t, s), |s| s.h.clone());
        (self.group_norm(h), state)
    }

    /// One token: `x_t [B, D]` → `y_t [B, D]` and the next state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<SlstmState>) -> (Tensor<2>, SlstmState) {
        let (y, state) = self.forward(x_t.unsqueeze_dim(1), state);
        (y.squeeze_dim(1), state)
    }

    /// One step of the recurrence from the input's share `wx_t = W x_t + b`, `[B, 4D]`.
    fn cell(&self, wx_t: Tensor<2>, s: SlstmState) -> SlstmState {
        let [batch, _] = s.h.dims();
        let (d, heads) = (self.d_model(), self.heads());
        let dh = d / heads;
        // R h per head: [H, B, d_h] × [H, d_h, 4·d_h], then back to the gate-major [B, 4D].
        let rh =
            s.h.reshape([batch, heads, dh])
                .swap_dims(0, 1)
                .matmul(self.recurrent.val())
                .reshape([heads, batch, 4, dh])
                .permute([1, 2, 0, 3])
                .reshape([batch, 4 * d]);
        let [i, f, z, o]: [Tensor<2>; 4] = (wx_t + rh)
            .chunk(4, 1)
            .try_into()
            .expect("4D splits in four");
        let log_f = -softplus(-f, 1.0); // log σ(f̃)
        let decayed = log_f + s.m;
        let m = decayed.clone().max_pair(i.clone());
        let input_gate = (i - m.clone()).exp();
        let forget_gate = (decayed - m.clone()).exp();
        let c = forget_gate.clone() * s.c + input_gate.clone() * z.tanh();
        let n = forget_gate * s.n + input_gate;
        let h = sigmoid(o) * c.clone() / n.clone();
        SlstmState { h, c, n, m }
    }

    /// Per head: `(h − mean) / √(var + 1e-5)` over its `d_h` units, times the learned scale.
    fn group_norm(&self, h: Tensor<3>) -> Tensor<3> {
        let [batch, t, d] = h.dims();
        let heads = self.heads();
        let normed =
            standardise(h.reshape([batch, t, heads, d / heads]), 1e-5).reshape([batch, t, d]);
        normed * self.norm.val().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;

    fn layer() -> Slstm {
        SlstmConfig {
            d_model: 8,
            n_heads: 2,
        }
        .init(&mut Init::new(3, &device()))
    }

    #[test]
    fn heads_must_divide_the_width() {
        assert!(SlstmSpec { n_heads: 3 }.validate(8).is_err());
        assert!(SlstmSpec { n_heads: 0 }.validate(8).is_err());
        assert_eq!(SlstmSpec { n_heads: 4 }.validate(8), Ok(()));
        let m = layer();
        assert_eq!(m.recurrent.dims(), [2, 4, 16]);
        assert_eq!(m.state_size(), 32);
    }

    /// `step`, token by token, is `forward`: outputs and all four parts of the final state,
    /// from a non-zero state.
    #[test]
    fn step_matches_forward() {
        let m = layer();
        let dev = device();
        let normal =
            |shape: [usize; 2]| Tensor::<2>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let start = SlstmState {
            h: normal([3, 8]),
            c: normal([3, 8]),
            n: normal([3, 8]).abs() + 0.5,
            m: normal([3, 8]),
        };
        let x = Tensor::<3>::random([3, 9, 8], Distribution::Normal(0.0, 1.0), &dev);
        let (y, s) = m.forward(x.clone(), Some(start.clone()));
        let mut state = Some(start);
        let mut ys = Vec::new();
        for x_t in x.iter_dim(1) {
            let (y_t, next) = m.step(x_t.squeeze_dim(1), state);
            ys.push(y_t);
            state = Some(next);
        }
        let state = state.unwrap();
        assert!(max_diff(Tensor::stack::<3>(ys, 1), y) < 1e-5);
        for (a, b) in [
            (state.h, s.h),
            (state.c, s.c),
            (state.n, s.n),
            (state.m, s.m),
        ] {
            assert!(max_diff(a, b) < 1e-5);
        }
    }

    /// The stabiliser only rescales: shifting `m_0` by a constant (and `c_0`, `n_0` by its
    /// exp) leaves every output unchanged.
    #[test]
    fn the_stabiliser_does_not_change_the_output() {
        let m = layer();
        let dev = device();
        let x = Tensor::<3>::random([2, 6, 8], Distribution::Normal(0.0, 1.0), &dev);
        let c0 = Tensor::<2>::random([2, 8], Distribution::Normal(0.0, 1.0), &dev);
        let n0 = Tensor::<2>::random([2, 8], Distribution::Uniform(0.5, 2.0), &dev);
        let start = |shift: f32| SlstmState {
            h: Tensor::zeros([2, 8], &dev),
            c: c0.clone() * (-shift).exp(),
            n: n0.clone() * (-shift).exp(),
            m: Tensor::zeros([2, 8], &dev) + shift,
        };
        let (a, _) = m.forward(x.clone(), Some(start(0.0)));
        let (b, _) = m.forward(x, Some(start(2.5)));
        assert!(max_diff(a, b) < 1e-4);
    }
}
