//! Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): the SSD block of `state-spaces/mamba`'s
//! `Mamba2Simple` with one group, a scalar decay per head.
//!
//! ```text
//! (z, xBC, dt) = in_proj(u)                       u [B,T,D] → z [E·D], xBC [E·D + 2N], dt [H]
//! (x, B, C) = SiLU(causal depthwise conv1d_k(xBC))  x [B,T,H,P] (H·P = E·D), B, C [B,T,N]
//! Δ       = softplus(dt + dt_bias)                [B,T,H]
//! A       = −exp(A_log)                           [H], initialised A ~ U(1, 16)
//! h_t     = exp(Δ_t A) h_{t−1} + Δ_t x_t ⊗ B_t     h [H, P, N]; 2·exp(Δ_t A) − 1 when signed
//! y_t     = h_t C_t + D ⊙ x_t                     (contract N; D per head)
//! out     = out_proj(RMSNorm(y ⊙ SiLU(z)) ⊙ w)    gated RMSNorm over E·D
//! ```
//!
//! Forms ([`Mamba2Spec::scan`]): `fused` is the recurrence as one host op ([`fused::ssd`],
//! `auto`'s choice on the CPU backends); `sequential` is the recurrence step by step; `chunked` is the SSD
//! form of `ssd_minimal.py`: within a chunk the outputs are a masked, decayed attention
//! `(C Bᵀ ⊙ L) X` with `L_ij = exp(Σ_{j<s≤i} Δ_s A)`, plus the carried state read through `C`, and
//! the state is updated once per chunk. Signed eigenvalues have no log, so the chunked form is
//! refused with them. `step` is the definition for one token.
//!
//! Field names follow the paper: `d_state` N, `expand` E, `head_dim` P, `d_conv`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{silu, softplus};
use burn::tensor::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::conv::causal_depthwise;
use crate::fused;
use crate::init::Init;
use crate::mask::{self, Visible};
use crate::projection::{project, split_linear};
use crate::reference::{Layout, Rename};
use crate::scan::{Compute, Eigenvalues, Form, Scan};
use crate::time::unbind;

/// `[model.mixer]` with `kind = "mamba2"`. Its width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Mamba2Spec {
    /// N.
    pub d_state: usize,
    /// E.
    pub expand: usize,
    /// P; the heads are `H = E·D / P`.
    pub head_dim: usize,
    pub d_conv: usize,
    /// The transition's range: `exp(Δ A) ∈ [0, 1]` as published, or `2·exp(Δ A) − 1`.
    pub eigenvalues: Eigenvalues,
    pub scan: Form,
}

impl Default for Mamba2Spec {
    fn default() -> Self {
        Self {
            d_state: 16,
            expand: 2,
            head_dim: 16,
            d_conv: 4,
            eigenvalues: Eigenvalues::Positive,
            scan: Form::Auto,
        }
    }
}

impl Mamba2Spec {
    pub fn config(&self, d_model: usize) -> Mamba2Config {
        Mamba2Config {
            d_model,
            d_state: self.d_state,
            expand: self.expand,
            head_dim: self.head_dim,
            d_conv: self.d_conv,
            eigenvalues: self.eigenvalues,
            scan: self.scan,
        }
    }

    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        let positive = [
            ("d_state", self.d_state),
            ("expand", self.expand),
            ("head_dim", self.head_dim),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("model.mixer.{field} must be at least 1"));
        }
        if !(self.expand * d_model).is_multiple_of(self.head_dim) {
            return Err(format!(
                "model.mixer.head_dim = {} must divide expand · d_model = {}",
                self.head_dim,
                self.expand * d_model
            ));
        }
        if self.d_conv < 2 {
            return Err(
                "model.mixer.d_conv must be at least 2 (a causal kernel spans the past)".into(),
            );
        }
        self.eigenvalues
            .check_chunked(matches!(self.scan, Form::Tensor(Scan::Chunked { .. })))?;
        self.scan
            .validate()
            .map_err(|e| format!("model.mixer.scan.{e}"))
    }
}

/// Configuration of a [`Mamba2`] block.
#[derive(Clone, Debug, PartialEq)]
pub struct Mamba2Config {
    pub d_model: usize,
    pub d_state: usize,
    pub expand: usize,
    pub head_dim: usize,
    pub d_conv: usize,
    pub eigenvalues: Eigenvalues,
    pub scan: Form,
}

/// One Mamba-2 block. Create it with [`Mamba2Config::init`].
#[derive(Module, Debug)]
pub struct Mamba2 {
    /// `[D, 2·E·D + 2N + H]`: `z`, then `x`, `B`, `C`, then `dt`; no bias.
    pub in_proj: Linear,
    /// `[d_conv, E·D + 2N]`: tap `j` multiplies the input `d_conv − 1 − j` steps back.
    pub conv_weight: Param<Tensor<2>>,
    pub conv_bias: Param<Tensor<1>>,
    /// `[H]`.
    pub dt_bias: Param<Tensor<1>>,
    /// `[H]`.
    pub a_log: Param<Tensor<1>>,
    /// `[H]`.
    pub d: Param<Tensor<1>>,
    /// `[E·D]`: the gated RMSNorm's weight.
    pub norm_weight: Param<Tensor<1>>,
    /// `[E·D, D]`, no bias.
    pub out_proj: Linear,
    #[module(skip)]
    pub d_state: usize,
    #[module(skip)]
    pub eigenvalues: Eigenvalues,
    #[module(skip)]
    pub scan: Form,
}

/// The state of a Mamba-2 block between calls.
#[derive(Clone, Debug)]
pub struct Mamba2State {
    /// The last `d_conv − 1` inputs of the convolution, `[B, d_conv − 1, E·D + 2N]`.
    pub conv: Tensor<3>,
    /// `h`, `[B, H, P, N]`.
    pub ssm: Tensor<4>,
}

impl Mamba2Config {
    /// `Mamba2Simple`'s initialisation: PyTorch defaults for the projections and the
    /// convolution, `A ~ U(1, 16)`, `dt_bias = softplus⁻¹(Δ₀)` with `Δ₀` log-uniform in
    /// `[0.001, 0.1]`, `D = 1`, norm weight 1.
    pub fn init(&self, init: &mut Init) -> Mamba2 {
        let (d, n) = (self.d_model, self.d_state);
        let inner = self.expand * d;
        let heads = inner / self.head_dim;
        let channels = inner + 2 * n;
        let bound = 1.0 / (self.d_conv as f64).sqrt();
        let dt_bias = init.dt_bias(heads, 0.001, 0.1);
        let a_log = (0..heads)
            .map(|_| (1.0 + 15.0 * init.rng().random::<f32>()).ln())
            .collect();
        Mamba2 {
            in_proj: init.linear(d, 2 * inner + 2 * n + heads, false),
            conv_weight: init.uniform([self.d_conv, channels], bound),
            conv_bias: init.uniform([channels], bound),
            dt_bias,
            a_log: init.param(a_log, [heads]),
            d: init.constant([heads], 1.0),
            norm_weight: init.constant([inner], 1.0),
            out_proj: init.linear(inner, d, false),
            d_state: n,
            eigenvalues: self.eigenvalues,
            scan: self.scan,
        }
    }
}

/// The SSD recurrence's inputs per head.
pub(crate) struct Ssd {
    /// `Δ x`, `[B, H, T, P]`.
    pub(crate) x: Tensor<4>,
    /// `Δ A`, `[B, H, T]`.
    pub(crate) log_a: Tensor<3>,
    /// `[B, T, N]`, shared by the heads.
    pub(crate) b: Tensor<3>,
    pub(crate) c: Tensor<3>,
}

impl Mamba2 {
    /// Its parameters under `mamba_ssm`'s `Mamba2` names ([`crate::reference`]).
    pub fn reference_names(&self) -> Vec<Rename> {
        vec![
            Rename::linear("in_proj", "in_proj"),
            Rename::whole("conv_weight", "conv1d.weight", Layout::Conv),
            Rename::whole("conv_bias", "conv1d.bias", Layout::Same),
            Rename::whole("dt_bias", "dt_bias", Layout::Same),
            Rename::whole("a_log", "A_log", Layout::Same),
            Rename::whole("d", "D", Layout::Same),
            Rename::whole("norm_weight", "norm.weight", Layout::Same),
            Rename::linear("out_proj", "out_proj"),
        ]
    }

    fn inner(&self) -> usize {
        self.norm_weight.lazy_shape()[0]
    }

    fn heads(&self) -> usize {
        self.a_log.lazy_shape()[0]
    }

    fn d_conv(&self) -> usize {
        self.conv_weight.lazy_shape()[0]
    }

    /// Floats of state per sequence: the convolution's window and `h`.
    pub fn state_size(&self) -> usize {
        (self.d_conv() - 1) * (self.inner() + 2 * self.d_state) + self.inner() * self.d_state
    }

    /// FLOPs per token of the scan beyond the weights, per state element: the decay, the drive
    /// and the `C` contraction (five).
    pub fn scan_flops_per_token(&self) -> f64 {
        (5 * self.inner() * self.d_state) as f64
    }

    pub fn zero_state(&self, batch: usize, device: &Device) -> Mamba2State {
        let p = self.inner() / self.heads();
        Mamba2State {
            conv: Tensor::zeros(
                [batch, self.d_conv() - 1, self.inner() + 2 * self.d_state],
                device,
            ),
            ssm: Tensor::zeros([batch, self.heads(), p, self.d_state], device),
        }
    }

    /// `u [B, T, D]` (`T ≥ 1`) → `[B, T, D]` and the state after the last step.
    ///
    /// On a backend with the recurrence's kernel (the CPU backends, wgpu) it is one op
    /// ([`fused::ssd`]) unless [`Mamba2::scan`] names a tensor form; elsewhere it runs in that
    /// form (the sequential one for `auto`).
    pub fn forward(&self, u: Tensor<3>, state: Option<Mamba2State>) -> (Tensor<3>, Mamba2State) {
        let op = fused::Op::Ssd { n: self.d_state };
        let compute = self.scan.resolve(fused::runs(op, &u.device(), u.dims()[1]));
        self.run(u, state, compute)
    }

    /// As [`Mamba2::forward`] with the recurrence built from tensor ops in the given form (the
    /// sequential one is the definition).
    pub fn forward_with(
        &self,
        u: Tensor<3>,
        state: Option<Mamba2State>,
        scan: Scan,
    ) -> (Tensor<3>, Mamba2State) {
        self.run(u, state, Compute::Tensor(scan))
    }

    fn run(
        &self,
        u: Tensor<3>,
        state: Option<Mamba2State>,
        compute: Compute,
    ) -> (Tensor<3>, Mamba2State) {
        let [batch, t, _] = u.dims();
        let (inner, n, h) = (self.inner(), self.d_state, self.heads());
        let p = inner / h;
        let state = state.unwrap_or_else(|| self.zero_state(batch, &u.device()));
        let [z, xbc, dt] = split_linear(&self.in_proj, u, [inner, inner + 2 * n, h]);

        let window = Tensor::cat(vec![state.conv, xbc], 1);
        let conv = window.clone().narrow(1, t, self.d_conv() - 1);
        // With the fused recurrence on the CPU the convolution and its SiLU are one op too (a
        // host kernel: a GPU runs only the recurrence as one).
        let host = compute == Compute::Fused && fused::has_kernel(&window.device());
        let xbc = match compute {
            Compute::Fused if host => {
                fused::conv_silu(window, self.conv_weight.val(), self.conv_bias.val())
            }
            _ => silu(causal_depthwise(
                window,
                self.conv_weight.val(),
                Some(self.conv_bias.val()),
                t,
            )),
        };
        let x = xbc.clone().narrow(2, 0, inner); // [B, T, E·D]
        let b = xbc.clone().narrow(2, inner, n);
        let c = xbc.narrow(2, inner + n, n);

        let delta = softplus(
            dt + self.dt_bias.val().unsqueeze_dim::<2>(0).unsqueeze(),
            1.0,
        );
        let a = -self.a_log.val().exp();
        let log_a = (delta.clone() * a.unsqueeze_dim::<2>(0).unsqueeze()).swap_dims(1, 2); // [B, H, T]
        let x_heads = x.clone().reshape([batch, t, h, p]).swap_dims(1, 2); // [B, H, T, P]
        let inputs = Ssd {
            x: x_heads.clone() * delta.swap_dims(1, 2).unsqueeze_dim::<4>(3),
            log_a,
            b,
            c,
        };
        let (y, ssm) = match compute {
            Compute::Fused => fused_recurrence(inputs, state.ssm, self.eigenvalues),
            Compute::Tensor(Scan::Sequential) => recurrent(inputs, state.ssm, self.eigenvalues),
            Compute::Tensor(Scan::Chunked { chunk_len }) => {
                assert_eq!(
                    self.eigenvalues,
                    Eigenvalues::Positive,
                    "signed eigenvalues have no chunked form (unchecked config)"
                );
                chunked(inputs, state.ssm, chunk_len)
            }
        }; // y [B, H, T, P]
        let skip = self
            .d
            .val()
            .unsqueeze_dim::<2>(1)
            .unsqueeze_dim::<3>(2)
            .unsqueeze_dim::<4>(0); // [1, H, 1, 1]
        let y = (y + x_heads * skip)
            .swap_dims(1, 2)
            .reshape([batch, t, inner]);
        // Gated RMSNorm (norm after the gate, as Mamba2Simple's RMSNormGated).
        let gated = y * silu(z);
        let rms = (gated.clone().powf_scalar(2.0).mean_dim(2) + 1e-5).sqrt();
        let weight = self.norm_weight.val().unsqueeze_dim::<2>(0).unsqueeze();
        let out = project(&self.out_proj, gated / rms * weight);
        (out, Mamba2State { conv, ssm })
    }

    /// One token: `u_t [B, D]` → `[B, D]` and the next state.
    pub fn step(&self, u_t: Tensor<2>, state: Option<Mamba2State>) -> (Tensor<2>, Mamba2State) {
        let (y, state) = self.forward_with(u_t.unsqueeze_dim(1), state, Scan::Sequential);
        (y.squeeze_dim(1), state)
    }
}

/// The recurrence as one host op, sequence-heads flattened to rows.
fn fused_recurrence(s: Ssd, h0: Tensor<4>, eigenvalues: Eigenvalues) -> (Tensor<4>, Tensor<4>) {
    let [b, h, t, p] = s.x.dims();
    let n = s.b.dims()[2];
    let out = fused::ssd(
        s.x.reshape([b * h, t, p]),
        s.log_a.reshape([b * h, t]),
        s.b,
        s.c,
        h0.reshape([b * h, p, n]),
        h,
        eigenvalues,
    );
    fused::split_heads(out, [b, h, t, p], [p, n])
}

/// The definition, one step at a time: `h ← a_t h + Δx_t ⊗ B_t`, `y_t = h C_t`.
pub(crate) fn recurrent(s: Ssd, h0: Tensor<4>, eigenvalues: Eigenvalues) -> (Tensor<4>, Tensor<4>) {
    let a = eigenvalues.transition(s.log_a); // [B, H, T]
    let mut h = h0; // [B, H, P, N]
    let mut ys = Vec::with_capacity(a.dims()[2]);
    let steps = unbind::<4, 3>(s.x, 2)
        .into_iter()
        .zip(unbind::<3, 2>(a, 2))
        .zip(unbind::<3, 2>(s.b, 1))
        .zip(unbind::<3, 2>(s.c, 1));
    for (((x_t, a_t), b_t), c_t) in steps {
        // x_t [B, H, P]; a_t [B, H]; b_t, c_t [B, N].
        let b_t = b_t.unsqueeze_dim::<3>(1).unsqueeze_dim::<4>(1); // [B, 1, 1, N]
        let c_t = c_t.unsqueeze_dim::<3>(1).unsqueeze_dim::<4>(1);
        h = h * a_t.unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3) + x_t.unsqueeze_dim::<4>(3) * b_t;
        ys.push((h.clone() * c_t).sum_dim(3).squeeze_dim::<3>(3));
    }
    (Tensor::stack(ys, 2), h)
}

/// The SSD chunked form (`ssd_minimal_discrete`, one chunk at a time carrying the state):
/// with `G` the in-chunk cumulative `Δ A` and `L_ij = exp(G_i − G_j)` for `j ≤ i`,
///
/// ```text
/// y = (C Bᵀ ⊙ L) X + exp(G) ⊙ (C hᵀ)          h ← exp(G_C) h + (X ⊙ exp(G_C − G))ᵀ B
/// ```
fn chunked(s: Ssd, h0: Tensor<4>, chunk_len: usize) -> (Tensor<4>, Tensor<4>) {
    let [_, _, t, _] = s.x.dims();
    let device = s.x.device();
    let mut h = h0; // [B, H, P, N]
    let mut ys = Vec::with_capacity(t.div_ceil(chunk_len));
    for start in (0..t).step_by(chunk_len) {
        let len = chunk_len.min(t - start);
        let x = s.x.clone().narrow(2, start, len); // [B, H, C, P]
        let b = s.b.clone().narrow(1, start, len).unsqueeze_dim::<4>(1); // [B, 1, C, N]
        let c = s.c.clone().narrow(1, start, len).unsqueeze_dim::<4>(1);
        let cum = s.log_a.clone().narrow(2, start, len).cumsum(2); // [B, H, C]
        let causal = mask::causal(len, len, 0, Visible::UpTo, f32::NEG_INFINITY, &device)
            .unsqueeze_dim::<3>(0)
            .unsqueeze_dim::<4>(0);
        let decay =
            (cum.clone().unsqueeze_dim::<4>(3) - cum.clone().unsqueeze_dim::<4>(2) + causal).exp(); // [B, H, C, C]
        let scores = c.clone().matmul(b.clone().swap_dims(2, 3)) * decay; // [B, H, C, C]
        let within = scores.matmul(x.clone());
        let carried = c.matmul(h.clone().swap_dims(2, 3)) * cum.clone().exp().unsqueeze_dim(3);
        ys.push(within + carried);
        let last = cum.clone().narrow(2, len - 1, 1); // [B, H, 1]
        let to_end = (last.clone() - cum).exp().unsqueeze_dim::<4>(3); // [B, H, C, 1]
        h = h * last.exp().unsqueeze_dim::<4>(3) + (x * to_end).swap_dims(2, 3).matmul(b);
    }
    (Tensor::cat(ys, 2), h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;

    /// The SSD chunked form against the definition on raw inputs, at a length no chunk divides,
    /// from a non-zero state: outputs, state and every gradient.
    #[test]
    fn chunked_matches_recurrent_with_gradients() {
        let dev = device();
        let (bsz, h, t, p, n) = (2, 3, 11, 4, 5);
        let normal4 =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let normal3 =
            |shape: [usize; 3]| Tensor::<3>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let (x, h0) = (normal4([bsz, h, t, p]), normal4([bsz, h, p, n]));
        let (b, c) = (normal3([bsz, t, n]), normal3([bsz, t, n]));
        let log_a = -Tensor::<3>::random([bsz, h, t], Distribution::Uniform(0.0, 2.0), &dev);
        let r = normal4([bsz, h, t, p]);
        let run = |chunk: Option<usize>| {
            let track4 = |v: &Tensor<4>| v.clone().detach().require_grad();
            let track3 = |v: &Tensor<3>| v.clone().detach().require_grad();
            let (x, h0, b, c, log_a) = (
                track4(&x),
                track4(&h0),
                track3(&b),
                track3(&c),
                track3(&log_a),
            );
            let inputs = Ssd {
                x: x.clone(),
                log_a: log_a.clone(),
                b: b.clone(),
                c: c.clone(),
            };
            let (y, h) = match chunk {
                None => recurrent(inputs, h0.clone(), Eigenvalues::Positive),
                Some(len) => chunked(inputs, h0.clone(), len),
            };
            let grads = ((y.clone() * r.clone()).sum() + h.clone().sum()).backward();
            let flat4 = |v: Tensor<4>| v.flatten::<1>(0, 3);
            let flat3 = |v: Tensor<3>| v.flatten::<1>(0, 2);
            vec![
                flat4(y),
                flat4(h),
                flat4(x.grad(&grads).unwrap()),
                flat4(h0.grad(&grads).unwrap()),
                flat3(b.grad(&grads).unwrap()),
                flat3(c.grad(&grads).unwrap()),
                flat3(log_a.grad(&grads).unwrap()),
            ]
        };
        let reference = run(None);
        for chunk in [1, 3, 4, 16] {
            for (i, (got, want)) in run(Some(chunk)).into_iter().zip(&reference).enumerate() {
                let scale: f32 = want.clone().abs().max().into_scalar();
                assert!(
                    max_diff(got, want.clone()) < 1e-5 + 1e-4 * scale,
                    "output {i}, chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn signed_eigenvalues_refuse_the_chunked_form() {
        let spec = Mamba2Spec {
            eigenvalues: Eigenvalues::Signed,
            scan: Form::Tensor(Scan::Chunked { chunk_len: 8 }),
            ..Mamba2Spec::default()
        };
        assert!(spec.validate(32).unwrap_err().contains("eigenvalues"));
        let bad_heads = Mamba2Spec {
            head_dim: 24,
            ..Mamba2Spec::default()
        };
        assert!(bad_heads.validate(32).unwrap_err().contains("head_dim"));
    }
}
