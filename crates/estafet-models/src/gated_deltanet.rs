//! Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
//! Delta Rule"; the linear layer of Qwen3-Next), as fla's `layers/gated_deltanet.py` builds it.
//! Per head, a matrix state `S [d_k, d_v]` learns key → value associations by the delta rule:
//!
//! ```text
//! q, k, v = SiLU(causal depthwise conv_4(W_q x, W_k x, W_v x))     short convolutions, no bias
//! q, k    = q / ‖q‖, k / ‖k‖ (per head),  q ← q / √d_k
//! β_t     = σ(W_β x_t)                     (×2 with eigenvalues = "signed")   per head
//! α_t     = exp(−exp(A_log) · softplus(W_α x_t + dt_bias))               per head (gate = true)
//! S_t     = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ
//! o_t     = S_tᵀ q_t
//! y_t     = W_o (RMSNorm(o_t) ⊙ w ⊙ SiLU(W_g x_t))                         gated norm per head
//! ```
//!
//! `gate = false` is plain DeltaNet (Schlag et al. 2021; Yang et al. 2024): `α = 1`, no `W_α`,
//! `A_log`, `dt_bias`. The transition `α (I − β k kᵀ)` has eigenvalues `α` and `α (1 − β)`:
//! in `[0, 1]` as published, in `[−1, 1]` with `β ∈ [0, 2]` (Grazzi et al. 2024).
//!
//! Forms ([`GatedDeltaNetSpec::scan`]): `fused` is the recurrence as one host op
//! ([`fused::delta_rule`], `auto`'s choice on the CPU backends); `sequential` is the recurrence
//! above step by step (fla's
//! `naive_recurrent_gated_delta_rule`); `chunked` is the WY/UT form of fla's
//! `naive_chunk_gated_delta_rule`: within a chunk of `C` steps the delta rule's updates are
//! gathered by inverting a unit lower-triangular `C × C` system (forward substitution), so the
//! state is touched once per chunk. `step` is the definition for one token.
//!
//! Field names: `n_heads` H, `head_dim` d_k, `expand_v` (d_v = expand_v · d_k), `d_conv`.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{sigmoid, silu, softplus};
use burn::tensor::{Device, Tensor};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::conv::causal_depthwise;
use crate::fused;
use crate::head_dims;
use crate::init::Init;
use crate::mask::{self, Visible};
use crate::reference::{Layout, Rename};
use crate::scan::{Compute, Eigenvalues, Form, Scan};
use crate::time::unbind;

/// `[model.mixer]` with `kind = "gated_deltanet"`. Its width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatedDeltaNetSpec {
    /// H.
    pub n_heads: usize,
    /// d_k; `d_model / n_heads` when absent.
    pub head_dim: Option<usize>,
    /// d_v = expand_v · d_k.
    pub expand_v: usize,
    pub d_conv: usize,
    /// The decay gate α; `false` is plain DeltaNet.
    pub gate: bool,
    /// `signed`: β ∈ [0, 2], so the transition's eigenvalues lie in [−1, 1].
    pub eigenvalues: Eigenvalues,
    pub scan: Form,
}

impl Default for GatedDeltaNetSpec {
    fn default() -> Self {
        Self {
            n_heads: 4,
            head_dim: None,
            expand_v: 1,
            d_conv: 4,
            gate: true,
            eigenvalues: Eigenvalues::Positive,
            scan: Form::Auto,
        }
    }
}

impl GatedDeltaNetSpec {
    pub fn config(&self, d_model: usize) -> GatedDeltaNetConfig {
        let head_dim = head_dims::key_dim(d_model, self.n_heads, self.head_dim);
        GatedDeltaNetConfig {
            d_model,
            n_heads: self.n_heads,
            head_dim,
            head_v_dim: self.expand_v * head_dim,
            d_conv: self.d_conv,
            gate: self.gate,
            eigenvalues: self.eigenvalues,
            scan: self.scan,
        }
    }

    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        head_dims::validate(d_model, self.n_heads, self.head_dim, self.expand_v)?;
        if self.d_conv < 2 {
            return Err(
                "model.mixer.d_conv must be at least 2 (a causal kernel spans the past)".into(),
            );
        }
        self.scan
            .validate()
            .map_err(|e| format!("model.mixer.scan.{e}"))
    }
}

/// Configuration of a [`GatedDeltaNet`] layer.
#[derive(Clone, Debug, PartialEq)]
pub struct GatedDeltaNetConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// d_k.
    pub head_dim: usize,
    /// d_v.
    pub head_v_dim: usize,
    pub d_conv: usize,
    pub gate: bool,
    pub eigenvalues: Eigenvalues,
    pub scan: Form,
}

/// The decay gate's parameters (absent in plain DeltaNet).
#[derive(Module, Debug)]
pub struct Decay {
    /// `[D, H]`, no bias.
    pub a_proj: Linear,
    /// `[H]`: `A = exp(A_log)`, initialised `A ~ U(0, 16)`.
    pub a_log: Param<Tensor<1>>,
    /// `[H]`: `softplus⁻¹(Δ₀)`, `Δ₀` log-uniform in `[0.001, 0.1]`.
    pub dt_bias: Param<Tensor<1>>,
}

/// One Gated DeltaNet layer. Create it with [`GatedDeltaNetConfig::init`].
#[derive(Module, Debug)]
pub struct GatedDeltaNet {
    /// `[D, H·d_k]`, `[D, H·d_k]`, `[D, H·d_v]`, no bias.
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    /// `[d_conv, 2·H·d_k + H·d_v]`: the short convolutions of q, k and v side by side; tap `j`
    /// multiplies the input `d_conv − 1 − j` steps back.
    pub conv_weight: Param<Tensor<2>>,
    /// `[D, H]`, no bias.
    pub b_proj: Linear,
    pub decay: Option<Decay>,
    /// `[D, H·d_v]`, no bias: the output gate.
    pub g_proj: Linear,
    /// `[d_v]`: the gated RMSNorm's weight, shared by the heads.
    pub norm_weight: Param<Tensor<1>>,
    /// `[H·d_v, D]`, no bias.
    pub o_proj: Linear,
    #[module(skip)]
    pub n_heads: usize,
    #[module(skip)]
    pub eigenvalues: Eigenvalues,
    #[module(skip)]
    pub scan: Form,
}

/// The state of a Gated DeltaNet layer between calls.
#[derive(Clone, Debug)]
pub struct GatedDeltaNetState {
    /// The last `d_conv − 1` inputs of the short convolutions, `[B, d_conv − 1, 2·H·d_k + H·d_v]`.
    pub conv: Tensor<3>,
    /// `S`, `[B, H, d_k, d_v]`.
    pub s: Tensor<4>,
}

impl GatedDeltaNetConfig {
    /// fla's initialisation: PyTorch's `nn.Linear` and `nn.Conv1d` defaults, `A ~ U(0, 16)`,
    /// `dt_bias = softplus⁻¹(Δ₀)` with `Δ₀` log-uniform in `[0.001, 0.1]`, norm weight 1.
    pub fn init(&self, init: &mut Init) -> GatedDeltaNet {
        let (d, h) = (self.d_model, self.n_heads);
        let (key, value) = (h * self.head_dim, h * self.head_v_dim);
        let decay = self.gate.then(|| {
            let a_log = (0..h)
                .map(|_| (16.0 * init.rng().random::<f32>()).max(1e-4).ln())
                .collect();
            let dt_bias = init.dt_bias(h, 0.001, 0.1);
            Decay {
                a_proj: init.linear(d, h, false),
                a_log: init.param(a_log, [h]),
                dt_bias,
            }
        });
        GatedDeltaNet {
            q_proj: init.linear(d, key, false),
            k_proj: init.linear(d, key, false),
            v_proj: init.linear(d, value, false),
            conv_weight: init.uniform(
                [self.d_conv, 2 * key + value],
                1.0 / (self.d_conv as f64).sqrt(),
            ),
            b_proj: init.linear(d, h, false),
            decay,
            g_proj: init.linear(d, value, false),
            norm_weight: init.constant([self.head_v_dim], 1.0),
            o_proj: init.linear(value, d, false),
            n_heads: h,
            eigenvalues: self.eigenvalues,
            scan: self.scan,
        }
    }
}

/// Per-head inputs of the recurrence, `[B, H, T, ·]`.
pub(crate) struct Heads {
    /// Unit-norm queries scaled by `1/√d_k`, and unit-norm keys, `[B, H, T, d_k]`.
    pub(crate) q: Tensor<4>,
    pub(crate) k: Tensor<4>,
    pub(crate) v: Tensor<4>,
    /// `[B, H, T]`.
    pub(crate) beta: Tensor<3>,
    /// `log α`, `[B, H, T]` (zeros without the gate).
    pub(crate) g: Tensor<3>,
}

impl GatedDeltaNet {
    /// Its parameters under fla's `GatedDeltaNet` names ([`crate::reference`]): the one
    /// convolution over q, k and v is fla's three.
    pub fn reference_names(&self) -> Vec<Rename> {
        let (key, value) = (
            self.n_heads * self.head_dim(),
            self.n_heads * self.head_v_dim(),
        );
        let mut names = vec![
            Rename::linear("q_proj", "q_proj"),
            Rename::linear("k_proj", "k_proj"),
            Rename::linear("v_proj", "v_proj"),
            Rename {
                ours: "conv_weight".into(),
                theirs: vec![
                    ("q_conv1d.weight".into(), key),
                    ("k_conv1d.weight".into(), key),
                    ("v_conv1d.weight".into(), value),
                ],
                layout: Layout::Conv,
            },
            Rename::linear("b_proj", "b_proj"),
            Rename::linear("g_proj", "g_proj"),
            Rename::whole("norm_weight", "o_norm.weight", Layout::Same),
            Rename::linear("o_proj", "o_proj"),
        ];
        if self.decay.is_some() {
            names.extend([
                Rename::linear("decay.a_proj", "a_proj"),
                Rename::whole("decay.a_log", "A_log", Layout::Same),
                Rename::whole("decay.dt_bias", "dt_bias", Layout::Same),
            ]);
        }
        names
    }

    fn head_dim(&self) -> usize {
        self.q_proj.weight.lazy_shape()[1] / self.n_heads
    }

    fn head_v_dim(&self) -> usize {
        self.norm_weight.lazy_shape()[0]
    }

    fn d_conv(&self) -> usize {
        self.conv_weight.lazy_shape()[0]
    }

    fn channels(&self) -> usize {
        self.conv_weight.lazy_shape()[1]
    }

    /// Floats of state per sequence: the convolutions' window and `S`.
    pub fn state_size(&self) -> usize {
        (self.d_conv() - 1) * self.channels() + self.n_heads * self.head_dim() * self.head_v_dim()
    }

    /// FLOPs per token of the recurrence beyond the weights, per state element: the decay,
    /// `Sᵀk`, the rank-one update and `Sᵀq` (seven).
    pub fn scan_flops_per_token(&self) -> f64 {
        (7 * self.n_heads * self.head_dim() * self.head_v_dim()) as f64
    }

    pub fn zero_state(&self, batch: usize, device: &Device) -> GatedDeltaNetState {
        GatedDeltaNetState {
            conv: Tensor::zeros([batch, self.d_conv() - 1, self.channels()], device),
            s: Tensor::zeros(
                [batch, self.n_heads, self.head_dim(), self.head_v_dim()],
                device,
            ),
        }
    }

    /// `x [B, T, D]` (`T ≥ 1`) → `[B, T, D]` and the state after the last step.
    ///
    /// On a backend with the recurrence's kernel (the CPU backends, wgpu) it is one op
    /// ([`fused::delta_rule`]) unless [`GatedDeltaNet::scan`] names a tensor form; elsewhere it
    /// runs in that form (the sequential one for `auto`).
    pub fn forward(
        &self,
        x: Tensor<3>,
        state: Option<GatedDeltaNetState>,
    ) -> (Tensor<3>, GatedDeltaNetState) {
        let op = fused::Op::DeltaRule { k: self.head_dim() };
        let compute = self.scan.resolve(fused::runs(op, &x.device(), x.dims()[1]));
        self.run(x, state, compute)
    }

    /// As [`GatedDeltaNet::forward`] with the recurrence built from tensor ops in the given
    /// form (the sequential one is the definition).
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        state: Option<GatedDeltaNetState>,
        scan: Scan,
    ) -> (Tensor<3>, GatedDeltaNetState) {
        self.run(x, state, Compute::Tensor(scan))
    }

    fn run(
        &self,
        x: Tensor<3>,
        state: Option<GatedDeltaNetState>,
        compute: Compute,
    ) -> (Tensor<3>, GatedDeltaNetState) {
        let [batch, t, _] = x.dims();
        let (h, dk, dv) = (self.n_heads, self.head_dim(), self.head_v_dim());
        let state = state.unwrap_or_else(|| self.zero_state(batch, &x.device()));
        let projected = Tensor::cat(
            vec![
                self.q_proj.forward(x.clone()),
                self.k_proj.forward(x.clone()),
                self.v_proj.forward(x.clone()),
            ],
            2,
        );
        let window = Tensor::cat(vec![state.conv, projected], 1); // [B, k − 1 + T, C]
        let conv = window.clone().narrow(1, t, self.d_conv() - 1);
        // With the fused recurrence on the CPU the convolutions and their SiLU are one op too
        // (no bias; a host kernel: a GPU runs only the recurrence as one).
        let host = compute == Compute::Fused && fused::has_kernel(&x.device());
        let qkv = match compute {
            Compute::Fused if host => {
                let bias = Tensor::zeros([self.channels()], &window.device());
                fused::conv_silu(window, self.conv_weight.val(), bias)
            }
            _ => silu(causal_depthwise(window, self.conv_weight.val(), None, t)),
        };
        let heads = |from: usize, width: usize| {
            qkv.clone()
                .narrow(2, from, h * width)
                .reshape([batch, t, h, width])
                .swap_dims(1, 2) // [B, H, T, width]
        };
        let l2 = |x: Tensor<4>| {
            let norm = (x.clone().powf_scalar(2.0).sum_dim(3) + 1e-6).sqrt();
            x / norm
        };
        let per_head = |y: Tensor<3>| y.swap_dims(1, 2); // [B, T, H] → [B, H, T]
        let beta = sigmoid(self.b_proj.forward(x.clone()));
        let beta = match self.eigenvalues {
            Eigenvalues::Positive => beta,
            Eigenvalues::Signed => beta * 2.0,
        };
        let g = match &self.decay {
            Some(decay) => {
                let bias = decay.dt_bias.val().unsqueeze_dim::<2>(0).unsqueeze_dim(0);
                let a = decay
                    .a_log
                    .val()
                    .exp()
                    .unsqueeze_dim::<2>(0)
                    .unsqueeze_dim(0);
                -(a * softplus(decay.a_proj.forward(x.clone()) + bias, 1.0))
            }
            None => Tensor::zeros([batch, t, h], &x.device()),
        };
        let inputs = Heads {
            q: l2(heads(0, dk)) * (dk as f32).powf(-0.5),
            k: l2(heads(h * dk, dk)),
            v: heads(2 * h * dk, dv),
            beta: per_head(beta),
            g: per_head(g),
        };
        let (o, s) = match compute {
            Compute::Fused => fused_recurrence(inputs, state.s),
            Compute::Tensor(Scan::Sequential) => recurrent(inputs, state.s),
            Compute::Tensor(Scan::Chunked { chunk_len }) => chunked(inputs, state.s, chunk_len),
        }; // o [B, H, T, d_v]

        // Gated RMSNorm per head, then the output projection.
        let rms = (o.clone().powf_scalar(2.0).mean_dim(3) + 1e-5).sqrt();
        let weight = self
            .norm_weight
            .val()
            .unsqueeze_dim::<2>(0)
            .unsqueeze_dim::<3>(0)
            .unsqueeze_dim::<4>(0);
        let gate = self
            .g_proj
            .forward(x)
            .reshape([batch, t, h, dv])
            .swap_dims(1, 2);
        let o = o / rms * weight * silu(gate);
        let y = self
            .o_proj
            .forward(o.swap_dims(1, 2).reshape([batch, t, h * dv]));
        (y, GatedDeltaNetState { conv, s })
    }

    /// One token: `x_t [B, D]` → `[B, D]` and the next state.
    pub fn step(
        &self,
        x_t: Tensor<2>,
        state: Option<GatedDeltaNetState>,
    ) -> (Tensor<2>, GatedDeltaNetState) {
        let (y, state) = self.forward_with(x_t.unsqueeze_dim(1), state, Scan::Sequential);
        (y.squeeze_dim(1), state)
    }
}

/// The recurrence as one host op, sequence-heads flattened to rows.
fn fused_recurrence(x: Heads, s0: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let [b, h, t, dk] = x.q.dims();
    let dv = x.v.dims()[3];
    let rows = |y: Tensor<4>| {
        let [_, _, _, n] = y.dims();
        y.reshape([b * h, t, n])
    };
    let out = fused::delta_rule(
        rows(x.q),
        rows(x.k),
        rows(x.v),
        x.beta.reshape([b * h, t]),
        x.g.reshape([b * h, t]),
        s0.reshape([b * h, dk, dv]),
    );
    fused::split_heads(out, [b, h, t, dv], [dk, dv])
}

/// The definition, one step at a time: `S ← α S`, `u = β (v − Sᵀk)`, `S ← S + k uᵀ`, `o = Sᵀq`.
pub(crate) fn recurrent(x: Heads, s0: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let alpha = x.g.exp();
    let mut s = s0; // [B, H, K, V]
    let mut outs = Vec::with_capacity(x.q.dims()[2]);
    let steps = unbind::<4, 3>(x.q, 2)
        .into_iter()
        .zip(unbind::<4, 3>(x.k, 2))
        .zip(unbind::<4, 3>(x.v, 2))
        .zip(unbind::<3, 2>(x.beta, 2))
        .zip(unbind::<3, 2>(alpha, 2));
    for ((((q_t, k_t), v_t), beta_t), alpha_t) in steps {
        // q_t, k_t [B, H, K]; v_t [B, H, V]; beta_t, alpha_t [B, H].
        s = s * alpha_t.unsqueeze_dim::<3>(2).unsqueeze_dim::<4>(3);
        let k_col = k_t.unsqueeze_dim::<4>(3); // [B, H, K, 1]
        let recalled = (s.clone() * k_col.clone()).sum_dim(2).squeeze_dim::<3>(2); // Sᵀk
        let u = (v_t - recalled) * beta_t.unsqueeze_dim::<3>(2);
        s = s + k_col * u.unsqueeze_dim::<4>(2);
        let o_t = (s.clone() * q_t.unsqueeze_dim::<4>(3))
            .sum_dim(2)
            .squeeze_dim::<3>(2);
        outs.push(o_t);
    }
    (Tensor::stack(outs, 2), s)
}

/// The chunked WY/UT form (fla's `naive_chunk_gated_delta_rule`), chunks of `chunk_len` (the
/// last may be shorter). Within a chunk, with `G` the cumulative `log α`,
/// `L_ij = exp(G_i − G_j)` for `j ≤ i`:
///
/// ```text
/// A  = −(βk kᵀ ⊙ L) strictly below the diagonal;  T = (I − A)⁻¹ by forward substitution
/// U  = T (β v),   W = T (β k ⊙ exp(G))
/// V' = U − W S,   o = (q ⊙ exp(G)) S + (q kᵀ ⊙ L) V'
/// S ← exp(G_C) S + (k ⊙ exp(G_C − G))ᵀ V'
/// ```
fn chunked(x: Heads, s0: Tensor<4>, chunk_len: usize) -> (Tensor<4>, Tensor<4>) {
    let [_, _, t, _] = x.q.dims();
    let device = x.q.device();
    let mut s = s0;
    let mut outs = Vec::with_capacity(t.div_ceil(chunk_len));
    for start in (0..t).step_by(chunk_len) {
        let c = chunk_len.min(t - start);
        let part4 = |y: &Tensor<4>| y.clone().narrow(2, start, c);
        let (q, k, v) = (part4(&x.q), part4(&x.k), part4(&x.v));
        let beta = x.beta.clone().narrow(2, start, c).unsqueeze_dim::<4>(3); // [B, H, C, 1]
        let cum = x.g.clone().narrow(2, start, c).cumsum(2); // G, [B, H, C]
        let upto = mask::causal(c, c, 0, Visible::UpTo, f32::NEG_INFINITY, &device)
            .unsqueeze_dim::<3>(0)
            .unsqueeze_dim::<4>(0);
        let before = mask::causal(c, c, 0, Visible::Before, f32::NEG_INFINITY, &device)
            .exp()
            .unsqueeze_dim::<3>(0)
            .unsqueeze_dim::<4>(0); // 1 strictly below the diagonal, else 0
        let decay =
            (cum.clone().unsqueeze_dim::<4>(3) - cum.clone().unsqueeze_dim::<4>(2) + upto).exp(); // L, [B, H, C, C]
        let k_beta = k.clone() * beta.clone();
        let a = -(k_beta.clone().matmul(k.clone().swap_dims(2, 3)) * decay.clone()) * before;
        let tri = mask::unit_lower_inverse(a);
        let g_exp = cum.clone().exp().unsqueeze_dim::<4>(3); // [B, H, C, 1]
        let u = tri.clone().matmul(v * beta);
        let w = tri.matmul(k_beta * g_exp.clone());
        let v_new = u - w.matmul(s.clone());
        let attn = q.clone().matmul(k.clone().swap_dims(2, 3)) * decay;
        outs.push((q * g_exp).matmul(s.clone()) + attn.matmul(v_new.clone()));
        let last = cum.clone().narrow(2, c - 1, 1); // G_C, [B, H, 1]
        let to_end = (last.clone() - cum).exp().unsqueeze_dim::<4>(3); // [B, H, C, 1]
        s = s * last.exp().unsqueeze_dim::<4>(3) + (k * to_end).swap_dims(2, 3).matmul(v_new);
    }
    (Tensor::cat(outs, 2), s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;

    /// One head, d_k = d_v = 1, α = 1, β = 1, k = 1: the delta rule overwrites, so S_t = v_t.
    #[test]
    fn the_delta_rule_overwrites_a_key_it_sees_again() {
        let dev = device();
        let ones = |t| Tensor::<4>::ones([1, 1, t, 1], &dev);
        let v = Tensor::<4>::from_floats([[[[3.0], [-2.0], [5.0]]]], &dev);
        let heads = || Heads {
            q: ones(3),
            k: ones(3),
            v: v.clone(),
            beta: Tensor::ones([1, 1, 3], &dev),
            g: Tensor::zeros([1, 1, 3], &dev),
        };
        for (o, s) in [
            recurrent(heads(), Tensor::zeros([1, 1, 1, 1], &dev)),
            chunked(heads(), Tensor::zeros([1, 1, 1, 1], &dev), 2),
        ] {
            assert!(max_diff(o, v.clone()) < 1e-6);
            assert!(max_diff(s, v.clone().narrow(2, 2, 1)) < 1e-6);
        }
    }

    /// The chunked form against the definition on raw heads, with decay and signed β, at a
    /// length no chunk divides, from a non-zero state: outputs, state and every gradient.
    #[test]
    fn chunked_matches_recurrent_with_gradients() {
        let dev = device();
        let (b, h, t, dk, dv) = (2, 3, 11, 4, 5);
        let normal =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let unit = |x: Tensor<4>| x.clone() / x.powf_scalar(2.0).sum_dim(3).sqrt();
        let (q, k, v, s0) = (
            unit(normal([b, h, t, dk])),
            unit(normal([b, h, t, dk])),
            normal([b, h, t, dv]),
            normal([b, h, dk, dv]),
        );
        let beta = Tensor::<3>::random([b, h, t], Distribution::Uniform(0.0, 2.0), &dev);
        let g = -Tensor::<3>::random([b, h, t], Distribution::Uniform(0.0, 1.5), &dev);
        let r = normal([b, h, t, dv]);
        let run = |chunk: Option<usize>| {
            let track4 = |x: &Tensor<4>| x.clone().detach().require_grad();
            let track3 = |x: &Tensor<3>| x.clone().detach().require_grad();
            let (q, k, v, s0) = (track4(&q), track4(&k), track4(&v), track4(&s0));
            let (beta, g) = (track3(&beta), track3(&g));
            let heads = Heads {
                q: q.clone(),
                k: k.clone(),
                v: v.clone(),
                beta: beta.clone(),
                g: g.clone(),
            };
            let (o, s) = match chunk {
                None => recurrent(heads, s0.clone()),
                Some(c) => chunked(heads, s0.clone(), c),
            };
            let grads = ((o.clone() * r.clone()).sum() + s.clone().sum()).backward();
            let flat4 = |x: Tensor<4>| x.flatten::<1>(0, 3);
            let flat3 = |x: Tensor<3>| x.flatten::<1>(0, 2);
            vec![
                flat4(o),
                flat4(s),
                flat4(q.grad(&grads).unwrap()),
                flat4(k.grad(&grads).unwrap()),
                flat4(v.grad(&grads).unwrap()),
                flat4(s0.grad(&grads).unwrap()),
                flat3(beta.grad(&grads).unwrap()),
                flat3(g.grad(&grads).unwrap()),
            ]
        };
        let reference = run(None);
        for chunk in [1, 3, 4, 16] {
            for (i, (x, y)) in run(Some(chunk)).into_iter().zip(&reference).enumerate() {
                let scale: f32 = y.clone().abs().max().into_scalar();
                assert!(
                    max_diff(x, y.clone()) < 1e-5 + 1e-4 * scale,
                    "output {i}, chunk {chunk}"
                );
            }
        }
    }
}
