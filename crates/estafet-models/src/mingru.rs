//! minGRU (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi 2024, "Were RNNs All We Needed?"): a GRU
//! whose gate and candidate see only the input, so the recurrence is linear in `h` and trains
//! with a parallel scan.
//!
//! ```text
//! k_t = W_z x_t + b_z,   z_t = σ(k_t)                      update gate
//! h̃_t = g(W_h x_t + b_h),  g(v) = v + ½ if v ≥ 0 else σ(v)  positive candidate (log-space variant)
//! h_t = (1 − z_t) ⊙ h_{t-1} + z_t ⊙ h̃_t
//! ```
//!
//! [`MinGruConfig::scan`] picks the form: `fused` is one host op for everything after the
//! projection ([`fused::min_rnn`], the default on the CPU backends); `sequential` is this
//! definition step by step; `chunked`
//! writes it as `h_t = a_t h_{t-1} + b_t` with `log a_t = log(1 − z_t) = −softplus(k_t)` computed
//! in log space, and solves each chunk in closed form (see [`crate::scan`]). `step` is the
//! definition for one token, O(1) state.

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::{sigmoid, softplus};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused::{self, MinRnn};
use crate::init::Init;
use crate::projection::project;
use crate::scan::{Compute, Form, Scan, linear_scan};
use crate::time::unbind;

/// `[model.mixer]` with `kind = "mingru"`: the recurrence's form (`auto`: the fused op on the
/// CPU backends, the sequential tensor form elsewhere). Its width is the model's.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MinGruSpec {
    pub scan: Form,
}

impl MinGruSpec {
    pub fn config(&self, d_model: usize) -> MinGruConfig {
        MinGruConfig {
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

/// Configuration of a [`MinGru`] layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MinGruConfig {
    /// Input features `D`.
    pub d_input: usize,
    /// Hidden size `H`.
    pub d_hidden: usize,
    pub scan: Form,
}

/// One minGRU layer. Create it with [`MinGruConfig::init`].
#[derive(Module, Debug)]
pub struct MinGru {
    /// `[D, 2H]`: the candidate's pre-activation, then the gate's `k`.
    pub input: Linear,
    #[module(skip)]
    pub scan: Form,
}

impl MinGruConfig {
    /// PyTorch's `nn.Linear` initialisation, `U(-1/√D, 1/√D)`.
    pub fn init(&self, init: &mut Init) -> MinGru {
        MinGru {
            input: init.linear(self.d_input, 2 * self.d_hidden, true),
            scan: self.scan,
        }
    }
}

/// `g(v) = v + ½ for v ≥ 0, σ(v) otherwise`: continuous, positive, linear for large `v`.
pub(crate) fn g(v: Tensor<3>) -> Tensor<3> {
    let non_negative = v.clone().greater_equal_scalar(0.0);
    sigmoid(v.clone()).mask_where(non_negative, v + 0.5)
}

impl MinGru {
    pub fn d_hidden(&self) -> usize {
        self.input.weight.lazy_shape()[1] / 2
    }

    /// Floats of recurrent state per sequence: `h`.
    pub fn state_size(&self) -> usize {
        self.d_hidden()
    }

    /// FLOPs per token of the log-space scan beyond the weights: the gate's and candidate's
    /// logs, the decay and the drive, about five per hidden unit.
    pub fn scan_flops_per_token(&self) -> f64 {
        (5 * self.d_hidden()) as f64
    }

    /// `x [B, T, D]` (`T ≥ 1`), `h_0 [B, H]` (zeros if `None`) → `h_1..h_T [B, T, H]`, `h_T`.
    ///
    /// On a backend with the fused kernels everything after the projection is one op
    /// ([`fused::min_rnn`]) unless [`MinGru::scan`] names a tensor form; elsewhere the scan runs
    /// in that form (the sequential one for `auto`).
    pub fn forward(&self, x: Tensor<3>, state: Option<Tensor<2>>) -> (Tensor<3>, Tensor<2>) {
        let compute = self
            .scan
            .resolve(fused::runs(fused::Op::MinRnn, &x.device(), x.dims()[1]));
        self.run(x, state, compute)
    }

    /// As [`MinGru::forward`] with the recurrence built from tensor ops in the given form (the
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
        let h0 = state.unwrap_or_else(|| self.zeros(batch, &x.device()));
        let pre = project(&self.input, x);
        let Compute::Tensor(scan) = compute else {
            let hs = fused::min_rnn(MinRnn::Gru, pre, h0);
            let last = hs.clone().narrow(1, len - 1, 1).squeeze_dim(1);
            return (hs, last);
        };
        let [candidate, k]: [Tensor<3>; 2] = pre.chunk(2, 2).try_into().expect("2H splits in two");
        let candidate = g(candidate);
        match scan {
            Scan::Sequential => {
                let z = sigmoid(k);
                let mut h = h0;
                let mut hs = Vec::with_capacity(z.dims()[1]);
                for (z_t, c_t) in unbind::<3, 2>(z, 1).into_iter().zip(unbind(candidate, 1)) {
                    h = h.clone() + z_t * (c_t - h);
                    hs.push(h.clone());
                }
                (Tensor::stack(hs, 1), h)
            }
            Scan::Chunked { .. } => {
                let log_a = -softplus(k.clone(), 1.0);
                let b = sigmoid(k) * candidate;
                linear_scan(log_a, b, h0, scan)
            }
        }
    }

    /// The update gate `z_t = σ(k_t)`, `[B, H]` (it depends on the input alone).
    pub fn gates(&self, x_t: Tensor<2>) -> Tensor<2> {
        let [_, k]: [Tensor<2>; 2] = self
            .input
            .forward(x_t)
            .chunk(2, 1)
            .try_into()
            .expect("2H splits in two");
        sigmoid(k)
    }

    /// `x_t [B, D]`, `h_{t-1}` → `h_t`, returned as output and as state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<Tensor<2>>) -> (Tensor<2>, Tensor<2>) {
        let (y, h) = self.forward_with(x_t.unsqueeze_dim(1), state, Scan::Sequential);
        (y.squeeze_dim(1), h)
    }

    fn zeros(&self, batch: usize, device: &Device) -> Tensor<2> {
        Tensor::zeros([batch, self.d_hidden()], device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::{Distribution, TensorData, Tolerance};

    #[test]
    fn g_is_continuous_and_positive() {
        let v = Tensor::<3>::from_floats([[[-30.0, -1.0, 0.0, 2.0]]], &device());
        g(v).to_data().assert_approx_eq::<f32>(
            &TensorData::from([[[9.357623e-14, 0.268941, 0.5, 2.5]]]),
            Tolerance::absolute(1e-6),
        );
    }

    /// D = H = 1, weight 1, bias 0 on both halves, x = 0 then 2:
    /// t=1: z = σ(0) = ½, h̃ = g(0) = ½, h = ½·0 + ½·½ = 0.25
    /// t=2: z = σ(2) = 0.880797, h̃ = 2.5, h = 0.119203·0.25 + 0.880797·2.5 = 2.231793
    #[test]
    fn hand_computed() {
        let init = Init::new(0, &device());
        let cell = |scan| MinGru {
            input: Linear {
                weight: init.param(vec![1.0, 1.0], [1, 2]),
                bias: Some(init.param(vec![0.0, 0.0], [2])),
            },
            scan,
        };
        let x = Tensor::<3>::from_floats([[[0.0], [2.0]]], &device());
        let expected = TensorData::from([[[0.25], [2.231793]]]);
        let chunked = Form::Tensor(Scan::Chunked { chunk_len: 2 });
        for scan in [Form::Tensor(Scan::Sequential), chunked, Form::Fused] {
            let (y, _) = cell(scan).forward(x.clone(), None);
            y.to_data()
                .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
        }
    }

    /// Every form against the sequential definition: outputs, final state, and the gradients
    /// of the input and the weights, at odd T and chunk sizes that do not divide it.
    #[test]
    fn forms_agree_with_the_definition() {
        let cell = MinGruConfig {
            d_input: 3,
            d_hidden: 4,
            scan: Form::Auto,
        }
        .init(&mut Init::new(5, &device()));
        let x = Tensor::<3>::random([2, 11, 3], Distribution::Normal(0.0, 2.0), &device());
        let h0 = Tensor::<2>::random([2, 4], Distribution::Default, &device());
        let r = Tensor::<3>::random([2, 11, 4], Distribution::Default, &device());
        let run = |scan| {
            let x = x.clone().detach().require_grad();
            let cell = MinGru {
                scan,
                ..cell.clone()
            };
            let (y, h) = cell.forward(x.clone(), Some(h0.clone()));
            let grads = ((y.clone() * r.clone()).sum() + h.clone().sum()).backward();
            let dw = cell.input.weight.grad(&grads).unwrap();
            (y, h, x.grad(&grads).unwrap(), dw)
        };
        let reference = run(Form::Tensor(Scan::Sequential));
        let close = |a: Tensor<3>, b: Tensor<3>| max_diff(a, b) < 1e-5;
        let chunked = [3, 4, 16].map(|chunk_len| Form::Tensor(Scan::Chunked { chunk_len }));
        for form in chunked.into_iter().chain([Form::Fused]) {
            let fast = run(form);
            assert!(close(fast.0, reference.0.clone()), "y, {form:?}");
            assert!(
                close(fast.1.unsqueeze(), reference.1.clone().unsqueeze()),
                "h_T, {form:?}"
            );
            assert!(close(fast.2, reference.2.clone()), "dx, {form:?}");
            assert!(
                close(fast.3.unsqueeze(), reference.3.clone().unsqueeze()),
                "dW, {form:?}"
            );
        }
        // step, token by token, is the same recurrence.
        let mut h = Some(h0.clone());
        let mut ys = Vec::new();
        for x_t in x.clone().iter_dim(1) {
            let (y_t, s) = cell.step(x_t.squeeze_dim(1), h);
            ys.push(y_t);
            h = Some(s);
        }
        assert!(close(Tensor::stack(ys, 1), reference.0));
    }
}
