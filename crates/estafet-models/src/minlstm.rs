//! minLSTM (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?"): an
//! LSTM whose gates and candidate see only the input, with the forget and input gates
//! normalised to sum to one (time-independent scale), so the recurrence is linear in `h`.
//!
//! ```text
//! f_t = σ(W_f x_t + b_f),  i_t = σ(W_i x_t + b_i)               forget and input gates
//! f'_t = f_t / (f_t + i_t),  i'_t = i_t / (f_t + i_t)            normalised
//! h̃_t = g(W_h x_t + b_h),  g(v) = v + ½ if v ≥ 0 else σ(v)      positive candidate (log-space variant)
//! h_t = f'_t ⊙ h_{t-1} + i'_t ⊙ h̃_t
//! ```
//!
//! [`MinLstmConfig::scan`] picks the form: `fused` is one host op for everything after the
//! projection ([`fused::min_rnn`], the default on the CPU backends); `sequential` is this
//! definition step by step;
//! `chunked` writes it as `h_t = a_t h_{t-1} + b_t` with the paper's log-space gates
//! (`d = softplus(−k_f) − softplus(−k_i)`, `log f' = −softplus(d)`, `log i' = −softplus(−d)`) and
//! solves each chunk in closed form (see [`crate::scan`]). `step` is the definition for one
//! token, O(1) state.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::activation::{sigmoid, softplus};
use serde::{Deserialize, Serialize};

use crate::fused::{self, MinRnn};
use crate::init::Init;
use crate::mingru::g;
use crate::projection::project;
use crate::scan::{Compute, Form, Scan, linear_scan};
use crate::time::unbind;

/// `[model.mixer]` with `kind = "minlstm"`: the recurrence's form (`auto`: the fused op on the
/// CPU backends, the sequential tensor form elsewhere). Its width is the model's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MinLstmSpec {
    pub scan: Form,
}

impl MinLstmSpec {
    pub fn config(&self, d_model: usize) -> MinLstmConfig {
        MinLstmConfig {
            d_input: d_model,
            d_hidden: d_model,
            scan: self.scan,
        }
    }

    pub fn validate(&self, _d_model: usize) -> Result<(), String> {
        self.scan
            .validate()
            .map_err(|e| format!("model.mixer.scan.{e}"))
    }
}

/// Configuration of a [`MinLstm`] layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinLstmConfig {
    /// Input features `D`.
    pub d_input: usize,
    /// Hidden size `H`.
    pub d_hidden: usize,
    pub scan: Form,
}

/// One minLSTM layer. Create it with [`MinLstmConfig::init`].
#[derive(Module, Debug)]
pub struct MinLstm {
    /// `[D, 3H]`: the candidate's pre-activation, then the forget gate's `k_f`, then the input
    /// gate's `k_i`.
    pub input: Linear,
    #[module(skip)]
    pub scan: Form,
}

impl MinLstmConfig {
    /// PyTorch's `nn.Linear` initialisation, `U(-1/√D, 1/√D)`.
    pub fn init(&self, init: &mut Init) -> MinLstm {
        MinLstm {
            input: init.linear(self.d_input, 3 * self.d_hidden, true),
            scan: self.scan,
        }
    }
}

impl MinLstm {
    pub fn d_hidden(&self) -> usize {
        self.input.weight.lazy_shape()[1] / 3
    }

    /// Floats of recurrent state per sequence: `h`.
    pub fn state_size(&self) -> usize {
        self.d_hidden()
    }

    /// FLOPs per token of the log-space scan beyond the weights: the gates' logs and their
    /// normalisation, the decay and the drive, about seven per hidden unit.
    pub fn scan_flops_per_token(&self) -> f64 {
        (7 * self.d_hidden()) as f64
    }

    /// `x [B, T, D]` (`T ≥ 1`), `h_0 [B, H]` (zeros if `None`) → `h_1..h_T [B, T, H]`, `h_T`.
    ///
    /// On a backend with the fused kernels everything after the projection is one op
    /// ([`fused::min_rnn`]) unless [`MinLstm::scan`] names a tensor form; elsewhere the scan
    /// runs in that form (the sequential one for `auto`).
    pub fn forward(&self, x: Tensor<3>, state: Option<Tensor<2>>) -> (Tensor<3>, Tensor<2>) {
        let compute = self
            .scan
            .resolve(fused::runs(fused::Op::MinRnn, &x.device(), x.dims()[1]));
        self.run(x, state, compute)
    }

    /// As [`MinLstm::forward`] with the recurrence built from tensor ops in the given form (the
    /// sequential one is the definition).
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        state: Option<Tensor<2>>,
        scan: Scan,
    ) -> (Tensor<3>, Tensor<2>) {
        self.run(x, state, Compute::Tensor(scan))
    }

    fn run(
        &self,
        x: Tensor<3>,
        state: Option<Tensor<2>>,
        compute: Compute,
    ) -> (Tensor<3>, Tensor<2>) {
        let [batch, len, _] = x.dims();
        let h0 = state.unwrap_or_else(|| Tensor::zeros([batch, self.d_hidden()], &x.device()));
        let pre = project(&self.input, x);
        let Compute::Tensor(scan) = compute else {
            let hs = fused::min_rnn(MinRnn::Lstm, pre, h0);
            let last = hs.clone().narrow(1, len - 1, 1).squeeze_dim(1);
            return (hs, last);
        };
        let [candidate, k_f, k_i]: [Tensor<3>; 3] =
            pre.chunk(3, 2).try_into().expect("3H splits in three");
        let candidate = g(candidate);
        match scan {
            Scan::Sequential => {
                let (f, i) = (sigmoid(k_f), sigmoid(k_i));
                let total = f.clone() + i.clone();
                let (f, i) = (f / total.clone(), i / total);
                let mut h = h0;
                let mut hs = Vec::with_capacity(f.dims()[1]);
                for ((f_t, i_t), c_t) in unbind::<3, 2>(f, 1)
                    .into_iter()
                    .zip(unbind(i, 1))
                    .zip(unbind(candidate, 1))
                {
                    h = f_t * h + i_t * c_t;
                    hs.push(h.clone());
                }
                (Tensor::stack(hs, 1), h)
            }
            Scan::Chunked { .. } => {
                let d = softplus(-k_f, 1.0) - softplus(-k_i, 1.0);
                let log_f = -softplus(d.clone(), 1.0);
                let log_i = -softplus(-d, 1.0);
                linear_scan(log_f, log_i.exp() * candidate, h0, scan)
            }
        }
    }

    /// The normalised forget gate `f'_t`, `[B, H]` (it depends on the input alone).
    pub fn gates(&self, x_t: Tensor<2>) -> Tensor<2> {
        let [_, k_f, k_i]: [Tensor<2>; 3] = self
            .input
            .forward(x_t)
            .chunk(3, 1)
            .try_into()
            .expect("3H splits in three");
        let f = sigmoid(k_f);
        f.clone() / (f + sigmoid(k_i))
    }

    /// `x_t [B, D]`, `h_{t-1}` → `h_t`, returned as output and as state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<Tensor<2>>) -> (Tensor<2>, Tensor<2>) {
        let (y, h) = self.forward_with(x_t.unsqueeze_dim(1), state, Scan::Sequential);
        (y.squeeze_dim(1), h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::device;
    use burn::tensor::{TensorData, Tolerance};

    /// D = H = 1, every weight 1 and bias 0, x = 0 then 2:
    /// t=1: f = i = σ(0) = ½ → f' = i' = ½; h̃ = g(0) = ½; h = ½·0 + ½·½ = 0.25
    /// t=2: f = i = σ(2) → f' = i' = ½; h̃ = g(2) = 2.5; h = ½·0.25 + ½·2.5 = 1.375
    /// and with the input gate's bias at ln 3 (i = σ(ln 3) = ¾ at x = 0, f = ½ → i' = 0.6):
    /// t=1: h = 0.4·0 + 0.6·½ = 0.3
    #[test]
    fn hand_computed() {
        let init = Init::new(0, &device());
        let cell = |bias_i: f32, scan: Form| MinLstm {
            input: Linear {
                weight: init.param(vec![1.0, 1.0, 1.0], [1, 3]),
                bias: Some(init.param(vec![0.0, 0.0, bias_i], [3])),
            },
            scan,
        };
        let x = Tensor::<3>::from_floats([[[0.0], [2.0]]], &device());
        let chunked = Form::Tensor(Scan::Chunked { chunk_len: 2 });
        for scan in [Form::Tensor(Scan::Sequential), chunked, Form::Fused] {
            let (y, _) = cell(0.0, scan).forward(x.clone(), None);
            y.to_data().assert_approx_eq::<f32>(
                &TensorData::from([[[0.25], [1.375]]]),
                Tolerance::absolute(1e-5),
            );
            let (y, _) = cell(3f32.ln(), scan).forward(x.clone().narrow(1, 0, 1), None);
            y.to_data()
                .assert_approx_eq::<f32>(&TensorData::from([[[0.3]]]), Tolerance::absolute(1e-5));
        }
    }
}
