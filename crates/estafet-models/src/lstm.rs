//! Long short-term memory (Hochreiter & Schmidhuber 1997) in PyTorch's `nn.LSTM` formulation.
//!
//! ```text
//! i_t = σ(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)      input gate
//! f_t = σ(W_if x_t + b_if + W_hf h_{t-1} + b_hf)      forget gate
//! g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)   candidate
//! o_t = σ(W_io x_t + b_io + W_ho h_{t-1} + b_ho)      output gate
//! c_t = f_t ⊙ c_{t-1} + i_t ⊙ g_t
//! h_t = o_t ⊙ tanh(c_t)
//! ```
//!
//! The four gates share one fused projection for `x` and one for `h`, in PyTorch's order
//! `(i, f, g, o)`, so PyTorch's `weight_ih_l0 [4H, D]` is this module's `input.weight` transposed.
//! The input projection of every step is one matmul before the time loop; only `h_{t-1} W_h`
//! stays inside it.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::{sigmoid, tanh};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused::{self, Cell};
use crate::init::Init;
use crate::time::recur;

/// `[model.mixer]` with `kind = "lstm"`: `forget_bias`, added to the forget-gate bias at
/// initialisation (0: PyTorch's). Its width is the model's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LstmSpec {
    pub forget_bias: f64,
}

impl LstmSpec {
    pub fn config(&self, d_model: usize) -> LstmConfig {
        LstmConfig {
            d_input: d_model,
            d_hidden: d_model,
            forget_bias: self.forget_bias,
        }
    }

    pub fn validate(&self, _d_model: usize) -> Result<(), String> {
        Ok(())
    }
}

/// Configuration of an [`Lstm`] layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LstmConfig {
    /// Input features `D`.
    pub d_input: usize,
    /// Hidden and cell size `H`.
    pub d_hidden: usize,
    /// Added to the forget-gate bias `b_hf` at initialisation (Gers et al. 2000; Jozefowicz et al.
    /// 2015 recommend 1.0); 0.0 is PyTorch's initialisation exactly.
    pub forget_bias: f64,
}

/// One LSTM layer. Create it with [`LstmConfig::init`].
#[derive(Module, Debug)]
pub struct Lstm {
    /// `[D, 4H]`, gates `(i, f, g, o)` along the output axis, with bias `b_i*`.
    pub input: Linear,
    /// `[H, 4H]`, same gate order, with bias `b_h*`.
    pub hidden: Linear,
}

/// Hidden and cell state, each `[B, H]`.
#[derive(Clone, Debug)]
pub struct LstmState {
    pub h: Tensor<2>,
    pub c: Tensor<2>,
}

impl LstmState {
    pub fn zeros(batch: usize, d_hidden: usize, device: &Device) -> Self {
        Self {
            h: Tensor::zeros([batch, d_hidden], device),
            c: Tensor::zeros([batch, d_hidden], device),
        }
    }
}

impl LstmConfig {
    /// PyTorch's initialisation: every weight and bias `U(-1/√H, 1/√H)`.
    pub fn init(&self, init: &mut Init) -> Lstm {
        let (d, h) = (self.d_input, self.d_hidden);
        let bound = 1.0 / (h as f64).sqrt();
        let input = Linear {
            weight: init.uniform([d, 4 * h], bound),
            bias: Some(init.uniform([4 * h], bound)),
        };
        let hidden_weight = init.uniform([h, 4 * h], bound);
        let mut hidden_bias = init.uniform_values(4 * h, bound);
        hidden_bias[h..2 * h]
            .iter_mut()
            .for_each(|b| *b += self.forget_bias as f32);
        let hidden = Linear {
            weight: hidden_weight,
            bias: Some(init.param(hidden_bias, [4 * h])),
        };
        Lstm { input, hidden }
    }
}

impl Lstm {
    pub fn d_hidden(&self) -> usize {
        self.hidden.weight.lazy_shape()[0]
    }

    /// Floats of recurrent state per sequence: `h` and `c`.
    pub fn state_size(&self) -> usize {
        2 * self.d_hidden()
    }

    /// Runs the whole sequence.
    ///
    /// - `x`: `[B, T, D]`, `T ≥ 1`
    /// - `state`: `h_0, c_0` (zeros if `None`)
    /// - returns `h_1..h_T` as `[B, T, H]` and the final state
    ///
    /// On a backend with the fused kernel this is one op ([`fused::cell_scan`]), elsewhere
    /// [`Self::forward_sequential`].
    pub fn forward(&self, x: Tensor<3>, state: Option<LstmState>) -> (Tensor<3>, LstmState) {
        let op = fused::Op::Cell {
            cell: Cell::Lstm,
            hidden: self.d_hidden(),
        };
        if !fused::runs(op, &x.device(), x.dims()[1]) {
            return self.forward_sequential(x, state);
        }
        let [batch, _, _] = x.dims();
        let h = self.d_hidden();
        let state = state.unwrap_or_else(|| LstmState::zeros(batch, h, &x.device()));
        let (out, last) = fused::cell_layer(
            Cell::Lstm,
            x,
            &self.input,
            &self.hidden,
            state.h,
            Some(state.c),
        );
        let state = LstmState {
            h: last.clone().narrow(1, 0, h),
            c: last.narrow(1, h, h),
        };
        (fused::narrow(out, 2, 0, h), state)
    }

    /// The definition, one cell update per step built from tensor ops: what the fused op is
    /// tested against, and what backends without the kernel run.
    pub fn forward_sequential(
        &self,
        x: Tensor<3>,
        state: Option<LstmState>,
    ) -> (Tensor<3>, LstmState) {
        let [batch, _, _] = x.dims();
        let state = state.unwrap_or_else(|| LstmState::zeros(batch, self.d_hidden(), &x.device()));
        recur(
            self.input.forward(x),
            state,
            |g, s| self.cell(g, s),
            |s| s.h.clone(),
        )
    }

    /// One recurrent step: `x_t [B, D]` → `h_t [B, H]` and the new state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<LstmState>) -> (Tensor<2>, LstmState) {
        let [batch, _] = x_t.dims();
        let state =
            state.unwrap_or_else(|| LstmState::zeros(batch, self.d_hidden(), &x_t.device()));
        let state = self.cell(self.input.forward(x_t), state);
        (state.h.clone(), state)
    }

    /// The sigmoid gates `i, f, o` one step from `state` would use, `[B, 3H]`: what the
    /// saturation diagnostic reads.
    pub fn gates(&self, x_t: Tensor<2>, state: Option<&LstmState>) -> Tensor<2> {
        let [batch, _] = x_t.dims();
        let h = state.map_or_else(
            || Tensor::zeros([batch, self.d_hidden()], &x_t.device()),
            |s| s.h.clone(),
        );
        let [i, f, _, o]: [Tensor<2>; 4] = (self.input.forward(x_t) + self.hidden.forward(h))
            .chunk(4, 1)
            .try_into()
            .expect("4H splits into four gates");
        sigmoid(Tensor::cat(vec![i, f, o], 1))
    }

    /// The cell update given the input's share of the gate pre-activations `[B, 4H]`.
    fn cell(&self, gates_x: Tensor<2>, LstmState { h, c }: LstmState) -> LstmState {
        let gates = gates_x + self.hidden.forward(h);
        let [i, f, g, o]: [Tensor<2>; 4] = gates
            .chunk(4, 1)
            .try_into()
            .expect("4H splits into four gates");
        let c = sigmoid(f) * c + sigmoid(i) * tanh(g);
        let h = sigmoid(o) * tanh(c.clone());
        LstmState { h, c }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::device;
    use burn::tensor::{Distribution, TensorData, Tolerance};

    /// An LSTM with exactly these parameters (weights row-major `[in, 4H]`).
    fn lstm_with(
        d: usize,
        h: usize,
        w_i: Vec<f32>,
        w_h: Vec<f32>,
        b_i: Vec<f32>,
        b_h: Vec<f32>,
    ) -> Lstm {
        let init = Init::new(0, &device());
        Lstm {
            input: Linear {
                weight: init.param(w_i, [d, 4 * h]),
                bias: Some(init.param(b_i, [4 * h])),
            },
            hidden: Linear {
                weight: init.param(w_h, [h, 4 * h]),
                bias: Some(init.param(b_h, [4 * h])),
            },
        }
    }

    fn random_lstm(d: usize, h: usize, seed: u64) -> Lstm {
        LstmConfig {
            d_input: d,
            d_hidden: h,
            forget_bias: 0.0,
        }
        .init(&mut Init::new(seed, &device()))
    }

    #[test]
    fn shapes() {
        let lstm = random_lstm(3, 4, 0);
        let x = Tensor::<3>::random([2, 5, 3], Distribution::Default, &device());
        let (y, state) = lstm.forward(x, None);
        assert_eq!(y.dims(), [2, 5, 4]);
        assert_eq!(state.h.dims(), [2, 4]);
        assert_eq!(state.c.dims(), [2, 4]);
        assert_eq!(lstm.state_size(), 8);
        // PyTorch's nn.LSTM(3, 4) has 4·4·(3 + 4) + 2·4·4 parameters.
        assert_eq!(lstm.num_params(), 144);
    }

    /// D = H = 1, every weight 0.5, biases 0, inputs 0.5 then −1:
    ///
    /// ```text
    /// t=1: pre = 0.25        i=f=o=σ(0.25)=0.562177  g=tanh(0.25)=0.244919
    ///      c1 = 0.562177·0.244919 = 0.137688        h1 = 0.562177·tanh(c1) = 0.076919
    /// t=2: pre = 0.5·(−1) + 0.5·h1 = −0.461540      i=f=o=0.386620  g=−0.431339
    ///      c2 = 0.386620·0.137688 + 0.386620·(−0.431339) = −0.113532
    ///      h2 = 0.386620·tanh(c2) = −0.043706
    /// ```
    #[test]
    fn hand_computed_two_steps() {
        let lstm = lstm_with(1, 1, vec![0.5; 4], vec![0.5; 4], vec![0.0; 4], vec![0.0; 4]);
        let x = Tensor::<3>::from_floats([[[0.5], [-1.0]]], &device());
        let (y, state) = lstm.forward(x, None);
        let tolerance = Tolerance::absolute(1e-5);
        y.to_data()
            .assert_approx_eq::<f32>(&TensorData::from([[[0.076919], [-0.043706]]]), tolerance);
        state
            .c
            .to_data()
            .assert_approx_eq::<f32>(&TensorData::from([[-0.113532]]), tolerance);
    }

    #[test]
    fn forget_bias_shifts_only_the_forget_gate() {
        let config = |forget_bias| LstmConfig {
            d_input: 2,
            d_hidden: 3,
            forget_bias,
        };
        let plain = config(0.0).init(&mut Init::new(9, &device()));
        let shifted = config(1.0).init(&mut Init::new(9, &device()));
        let difference = shifted.hidden.bias.unwrap().val() - plain.hidden.bias.unwrap().val();
        difference.to_data().assert_approx_eq::<f32>(
            &TensorData::from([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
            Tolerance::absolute(1e-6),
        );
    }

    #[test]
    fn step_by_step_equals_forward_with_initial_state() {
        let lstm = random_lstm(3, 5, 1);
        let dev = device();
        let x = Tensor::<3>::random([2, 7, 3], Distribution::Default, &dev);
        let init = LstmState {
            h: Tensor::random([2, 5], Distribution::Default, &dev),
            c: Tensor::random([2, 5], Distribution::Default, &dev),
        };
        let (y, last) = lstm.forward(x.clone(), Some(init.clone()));
        let mut state = Some(init);
        let mut ys = Vec::new();
        for x_t in x.iter_dim(1) {
            let (y_t, s) = lstm.step(x_t.squeeze_dim(1), state);
            ys.push(y_t);
            state = Some(s);
        }
        let tolerance = Tolerance::absolute(1e-6);
        Tensor::stack::<3>(ys, 1)
            .to_data()
            .assert_approx_eq::<f32>(&y.to_data(), tolerance);
        let state = state.unwrap();
        state
            .c
            .to_data()
            .assert_approx_eq::<f32>(&last.c.to_data(), tolerance);
        state
            .h
            .to_data()
            .assert_approx_eq::<f32>(&last.h.to_data(), tolerance);
    }

    /// Autodiff gradients against central finite differences of
    /// `L = Σ y ⊙ r + Σ c_T` (a fixed random `r`), for the input and a recurrent weight.
    #[test]
    fn gradients_match_finite_differences() {
        let (d, h, t) = (2, 3, 4);
        let mut init = Init::new(3, &device());
        let w_i = init.uniform_values(d * 4 * h, 0.8);
        let w_h = init.uniform_values(h * 4 * h, 0.8);
        let b_i = init.uniform_values(4 * h, 0.5);
        let b_h = init.uniform_values(4 * h, 0.5);
        let x_values = init.uniform_values(2 * t * d, 1.0);
        let r = Tensor::<3>::from_data(
            TensorData::new(init.uniform_values(2 * t * h, 1.0), [2, t, h]),
            &device(),
        );
        let loss = |w_h: Vec<f32>, x_values: Vec<f32>, track: bool| {
            let lstm = lstm_with(d, h, w_i.clone(), w_h, b_i.clone(), b_h.clone());
            let mut x = Tensor::<3>::from_data(TensorData::new(x_values, [2, t, d]), &device());
            if track {
                x = x.require_grad();
            }
            let (y, state) = lstm.forward(x.clone(), None);
            ((y * r.clone()).sum() + state.c.sum(), lstm, x)
        };

        let (l, lstm, x) = loss(w_h.clone(), x_values.clone(), true);
        let grads = l.backward();
        let dx: Vec<f32> = x
            .grad(&grads)
            .unwrap()
            .to_data()
            .try_to_vec::<f32>()
            .unwrap();
        let dw: Vec<f32> = lstm
            .hidden
            .weight
            .grad(&grads)
            .unwrap()
            .to_data()
            .try_to_vec::<f32>()
            .unwrap();

        let eps = 1e-2;
        let value = |w: Vec<f32>, xs: Vec<f32>| loss(w, xs, false).0.into_scalar::<f32>() as f64;
        let central = |i: usize, on_x: bool| {
            let (mut wp, mut xp) = (w_h.clone(), x_values.clone());
            let (mut wm, mut xm) = (w_h.clone(), x_values.clone());
            if on_x {
                xp[i] += eps;
                xm[i] -= eps;
            } else {
                wp[i] += eps;
                wm[i] -= eps;
            }
            (value(wp, xp) - value(wm, xm)) / (2.0 * eps as f64)
        };
        for (i, &g) in dx.iter().enumerate() {
            let fd = central(i, true);
            assert!(
                (fd - g as f64).abs() < 2e-3,
                "dL/dx[{i}]: autodiff {g} vs fd {fd}"
            );
        }
        for (i, &g) in dw.iter().enumerate().step_by(5) {
            let fd = central(i, false);
            assert!(
                (fd - g as f64).abs() < 2e-3,
                "dL/dW_h[{i}]: autodiff {g} vs fd {fd}"
            );
        }
        assert!(
            dw.iter().any(|g| g.abs() > 1e-2),
            "the gradient is not trivially zero"
        );
    }
}
