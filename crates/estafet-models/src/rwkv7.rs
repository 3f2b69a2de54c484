//! RWKV-7 "Goose" (Peng et al. 2025; BlinkDL's RWKV-LM v7, `RWKV_Tmix_x070`) time mix: a
//! matrix state per head of size `N` updated by a generalised delta rule whose transition is
//! a diagonal decay plus a rank-one term, `diag(w_t) + b_t a_tᵀ` (diagonal plus low rank).
//!
//! ```text
//! x'   = x_{t−1} (carried across calls);  x_* = x + (x' − x) ⊙ μ_*        * ∈ {r, w, k, v, a, g}
//! r, k, v = W_r x_r, W_k x_k, W_v x_v
//! w_t  = exp(−exp(ω)),  ω = −softplus(−(w₀ + tanh(x_w W₁) W₂)) − 0.5     decay in (0.545, 1)
//! α_t  = σ(a₀ + x_a A₁ A₂)                                               in-context learning rate
//! g    = σ(x_g G₁) G₂
//! κ̂    = normalise_head(k ⊙ k_k);   k ← k ⊙ (1 + (α − 1) ⊙ k_a)
//! S_t  = diag(w_t) S_{t−1} + (κ̂_t ⊙ α_t)(−κ̂_t)ᵀ S_{t−1} + k_t v_tᵀ          S [N (key), N (value)] per head
//! o_t  = S_tᵀ r_t
//! y    = W_o ((GroupNorm_H(o) + (Σ_head r ⊙ k ⊙ r_k) v) ⊙ g)               bonus: the current token
//! ```
//!
//! That is the reference's `state = state·diag(w) + state·a·bᵀ + v·kᵀ` with `a = −κ̂`, `b = κ̂ ⊙ α`,
//! stored transposed (key × value, as estafet's other matrix states). The block's channel mix is
//! the layout's MLP; unlike the reference there is no value residual (`v_first`, which mixes the
//! first layer's values into every later layer: estafet's mixers see no other layer) and the
//! initialisation is the reference's for a first layer (it depends on the layer's depth there).
//!
//! Forms ([`Rwkv7Spec::scan`]): `fused` is the recurrence as one host op ([`fused::dplr`],
//! `auto`'s choice on the CPU backends); `sequential` is the recurrence step by step; `chunked` is the
//! chunkwise form of fla's `dplr_chunkwise`: within a chunk the rank-one terms' contributions
//! `u_t = a_tᵀ S_{t−1}` are solved for at once through a unit lower-triangular system, then
//! outputs and the next state follow by matrix products, so the state is touched once per
//! chunk. Decays combine in log space with every exponent `≤ 0`. `step` is the definition for
//! one token.
//!
//! Field names: `head_size` N, `lora_rank` the rank of the decay, `α` and gate LoRAs.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{sigmoid, softplus};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused;
use crate::init::Init;
use crate::mask::{self, Visible};
use crate::norm;
use crate::projection;
use crate::reference::{Layout, Rename};
use crate::rwkv::{last, token_shift};
use crate::scan::{Compute, Form, Scan};
use crate::time::unbind;

/// `[model.mixer]` with `kind = "rwkv7"`. Its width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rwkv7Spec {
    /// N; `min(64, D)` when absent (the released models use 64).
    pub head_size: Option<usize>,
    /// Rank of the decay, `α` and gate LoRAs (the reference's smallest, 32).
    pub lora_rank: usize,
    pub scan: Form,
}

impl Default for Rwkv7Spec {
    fn default() -> Self {
        Self {
            head_size: None,
            lora_rank: 32,
            scan: Form::Auto,
        }
    }
}

impl Rwkv7Spec {
    pub fn config(&self, d_model: usize) -> Rwkv7Config {
        Rwkv7Config {
            d_model,
            head_size: self.head_size.unwrap_or(64.min(d_model)),
            lora_rank: self.lora_rank,
            scan: self.scan,
        }
    }

    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        let n = self.head_size.unwrap_or(64.min(d_model));
        if n == 0 || !d_model.is_multiple_of(n) {
            return Err(format!(
                "model.mixer.head_size = {n} must divide d_model = {d_model}"
            ));
        }
        if self.lora_rank == 0 {
            return Err("model.mixer.lora_rank must be at least 1".into());
        }
        self.scan
            .validate()
            .map_err(|e| format!("model.mixer.scan.{e}"))
    }
}

/// Configuration of an [`Rwkv7`] time mix.
#[derive(Clone, Debug, PartialEq)]
pub struct Rwkv7Config {
    pub d_model: usize,
    /// N.
    pub head_size: usize,
    pub lora_rank: usize,
    pub scan: Form,
}

impl Rwkv7Config {
    /// The reference's initialisation for a first layer (`layer_id = 0`): token-shift mixes
    /// `μ = 1 − (n/D)^p` per channel `n` (`p` 0.2 for r and g, 0.7 for k and v, 0.9 for w and
    /// a); the decay bias `w₀` ramping from −6 to 0 across channels plus a zigzag within each
    /// head; `a₀`, `k_k`, `k_a = 1.02`, `r_k = −0.04` as released; the LoRAs' first matrices
    /// zero and second ones small (`U(±0.1/√R)`, in place of the reference's scaled orthogonal
    /// matrices); `W_r`, `W_v` in `±0.5/√D`, `W_k` in `±0.05/√D`, `W_o` zero (the block starts
    /// as the identity of its residual); the norm's scale one and bias zero.
    pub fn init(&self, init: &mut Init) -> Rwkv7 {
        let (d, n, rank) = (self.d_model, self.head_size, self.lora_rank);
        let h = d / n;
        let per_channel =
            |f: &dyn Fn(usize) -> f64| -> Vec<f32> { (0..d).map(|c| f(c) as f32).collect() };
        let ratio = |c: usize| c as f64 / d as f64;
        let linear = |c: usize| c as f64 / (d.max(2) - 1) as f64 - 0.5;
        let zigzag = |c: usize| {
            let half = (n.max(2) - 1) as f64 / 2.0;
            let z = ((c % n) as f64 - half) / half;
            z * z.abs()
        };
        let mix = |p: f64| per_channel(&|c| 1.0 - ratio(c).powf(p));
        // The first layer's ramp −6 + 6·n/(D − 1) (deeper layers bend it), plus softplus's 0.5.
        let w0 = per_channel(&|c| -6.0 + 6.0 * (linear(c) + 0.5) + 0.5 + 2.5 * zigzag(c));
        let a0 = per_channel(&|c| -0.19 + 0.3 * zigzag(c) + 0.4 * linear(c));
        let k_k = per_channel(&|c| 0.71 - 0.1 * linear(c));
        let lora = |init: &mut Init| {
            (
                init.constant([d, rank], 0.0),
                init.uniform([rank, d], 0.1 / (rank as f64).sqrt()),
            )
        };
        let (w1, w2) = lora(init);
        let (a1, a2) = lora(init);
        let (g1, g2) = lora(init);
        let bound = 1.0 / (d as f64).sqrt();
        let square = |init: &mut Init, scale: f64| Linear {
            weight: init.uniform([d, d], scale * bound),
            bias: None,
        };
        let receptance = square(init, 0.5);
        let key = square(init, 0.05);
        let value = square(init, 0.5);
        Rwkv7 {
            x_r: init.param(mix(0.2), [d]),
            x_w: init.param(mix(0.9), [d]),
            x_k: init.param(mix(0.7), [d]),
            x_v: init.param(mix(0.7), [d]),
            x_a: init.param(mix(0.9), [d]),
            x_g: init.param(mix(0.2), [d]),
            w0: init.param(w0, [d]),
            w1,
            w2,
            a0: init.param(a0, [d]),
            a1,
            a2,
            g1,
            g2,
            k_k: init.param(k_k, [d]),
            k_a: init.constant([d], 1.02),
            r_k: init.constant([h, n], -0.04),
            receptance,
            key,
            value,
            output: Linear {
                weight: init.constant([d, d], 0.0),
                bias: None,
            },
            ln_x_weight: init.constant([d], 1.0),
            ln_x_bias: init.constant([d], 0.0),
            scan: self.scan,
        }
    }
}

/// One RWKV-7 time mix. Create it with [`Rwkv7Config::init`].
#[derive(Module, Debug)]
pub struct Rwkv7 {
    /// `[D]` each: the token-shift mixes μ_r, μ_w, μ_k, μ_v, μ_a, μ_g.
    pub x_r: Param<Tensor<1>>,
    pub x_w: Param<Tensor<1>>,
    pub x_k: Param<Tensor<1>>,
    pub x_v: Param<Tensor<1>>,
    pub x_a: Param<Tensor<1>>,
    pub x_g: Param<Tensor<1>>,
    /// The decay: bias `[D]`, LoRA `[D, R]`, `[R, D]`.
    pub w0: Param<Tensor<1>>,
    pub w1: Param<Tensor<2>>,
    pub w2: Param<Tensor<2>>,
    /// The in-context learning rate α: bias `[D]`, LoRA `[D, R]`, `[R, D]`.
    pub a0: Param<Tensor<1>>,
    pub a1: Param<Tensor<2>>,
    pub a2: Param<Tensor<2>>,
    /// The output gate's LoRA, `[D, R]`, `[R, D]`.
    pub g1: Param<Tensor<2>>,
    pub g2: Param<Tensor<2>>,
    /// `[D]`: the removal key's scale and how much α scales the written key.
    pub k_k: Param<Tensor<1>>,
    pub k_a: Param<Tensor<1>>,
    /// `[H, N]`: the bonus's weights.
    pub r_k: Param<Tensor<2>>,
    /// `[D, D]` each, no bias.
    pub receptance: Linear,
    pub key: Linear,
    pub value: Linear,
    pub output: Linear,
    /// `[D]`: the per-head GroupNorm's scale and bias.
    pub ln_x_weight: Param<Tensor<1>>,
    pub ln_x_bias: Param<Tensor<1>>,
    #[module(skip)]
    pub scan: Form,
}

/// The state of an RWKV-7 time mix between calls.
#[derive(Clone, Debug)]
pub struct Rwkv7State {
    /// The last input, for the token shift, `[B, D]`.
    pub shift: Tensor<2>,
    /// `S` (key × value), `[B, H, N, N]`.
    pub s: Tensor<4>,
}

/// Per-head inputs of the recurrence, `[B, H, T, N]`.
pub(crate) struct Heads {
    pub(crate) r: Tensor<4>,
    pub(crate) k: Tensor<4>,
    pub(crate) v: Tensor<4>,
    /// `log w_t` (in `[−e^{−0.5}, 0)`).
    pub(crate) log_w: Tensor<4>,
    /// The rank-one term's read `a = −κ̂` and write `b = κ̂ ⊙ α`.
    pub(crate) a: Tensor<4>,
    pub(crate) b: Tensor<4>,
}

impl Rwkv7 {
    /// Its parameters under `RWKV_Tmix_x070`'s names ([`crate::reference`]).
    pub fn reference_names(&self) -> Vec<Rename> {
        let mut names: Vec<Rename> = [
            "x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a",
        ]
        .into_iter()
        .map(|p| Rename::whole(p, p, Layout::Broadcast))
        .collect();
        names.extend(
            ["w1", "w2", "a1", "a2", "g1", "g2", "r_k"]
                .into_iter()
                .map(|p| Rename::whole(p, p, Layout::Same)),
        );
        names.extend(
            ["receptance", "key", "value", "output"]
                .into_iter()
                .map(|p| Rename::linear(p, p)),
        );
        names.push(Rename::whole("ln_x_weight", "ln_x.weight", Layout::Same));
        names.push(Rename::whole("ln_x_bias", "ln_x.bias", Layout::Same));
        names
    }

    fn d_model(&self) -> usize {
        self.w0.lazy_shape()[0]
    }

    fn head_size(&self) -> usize {
        self.r_k.lazy_shape()[1]
    }

    fn heads(&self) -> usize {
        self.r_k.lazy_shape()[0]
    }

    /// Floats of state per sequence: the shifted input and `S`.
    pub fn state_size(&self) -> usize {
        self.d_model() * (1 + self.head_size())
    }

    /// FLOPs per token of the recurrence beyond the weights, per state element: the decay,
    /// `aᵀS`, the rank-one and `k vᵀ` writes and `Sᵀr` (nine).
    pub fn wkv_flops_per_token(&self) -> f64 {
        (9 * self.d_model() * self.head_size()) as f64
    }

    pub fn zero_state(&self, batch: usize, device: &Device) -> Rwkv7State {
        let (h, n) = (self.heads(), self.head_size());
        Rwkv7State {
            shift: Tensor::zeros([batch, self.d_model()], device),
            s: Tensor::zeros([batch, h, n, n], device),
        }
    }

    /// `x [B, T, D]` (`T ≥ 1`) → `[B, T, D]` and the state after the last step.
    ///
    /// On a backend with the recurrence's kernel (the CPU backends, wgpu) it is one op
    /// ([`fused::dplr`]) unless [`Rwkv7::scan`] names a tensor form; elsewhere it runs in that
    /// form (the sequential one for `auto`).
    pub fn forward(&self, x: Tensor<3>, state: Option<Rwkv7State>) -> (Tensor<3>, Rwkv7State) {
        let op = fused::Op::Dplr {
            n: self.head_size(),
        };
        let compute = self.scan.resolve(fused::runs(op, &x.device(), x.dims()[1]));
        self.run(x, state, compute)
    }

    /// As [`Rwkv7::forward`] with the recurrence built from tensor ops in the given form (the
    /// sequential one is the definition).
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        state: Option<Rwkv7State>,
        scan: Scan,
    ) -> (Tensor<3>, Rwkv7State) {
        self.run(x, state, Compute::Tensor(scan))
    }

    fn run(
        &self,
        x: Tensor<3>,
        state: Option<Rwkv7State>,
        compute: Compute,
    ) -> (Tensor<3>, Rwkv7State) {
        let [batch, t, d] = x.dims();
        let (h, n) = (self.heads(), self.head_size());
        let state = state.unwrap_or_else(|| self.zero_state(batch, &x.device()));
        let next = last(&x);
        let delta = token_shift(x.clone(), state.shift) - x.clone(); // x' − x
        let row = |p: &Param<Tensor<1>>| p.val().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0);
        let mixed = |mu: &Param<Tensor<1>>| x.clone() + delta.clone() * row(mu);
        // One factor of a LoRA: [B, T, ·] × [·, ·].
        let project = |x: Tensor<3>, p: &Param<Tensor<2>>| x.matmul(p.val().unsqueeze_dim(0));
        let r = self.receptance.forward(mixed(&self.x_r));
        let decay = project(project(mixed(&self.x_w), &self.w1).tanh(), &self.w2);
        let omega = -softplus(-(row(&self.w0) + decay), 1.0) - 0.5;
        let log_w = -omega.exp();
        let k = self.key.forward(mixed(&self.x_k));
        let v = self.value.forward(mixed(&self.x_v));
        let alpha = sigmoid(row(&self.a0) + project(project(mixed(&self.x_a), &self.a1), &self.a2));
        let g = project(sigmoid(project(mixed(&self.x_g), &self.g1)), &self.g2);
        let split = |y: Tensor<3>| y.reshape([batch, t, h, n]).swap_dims(1, 2); // [B, H, T, N]
        let kk = split(k.clone() * row(&self.k_k));
        let kk = kk.clone() / (kk.powf_scalar(2.0).sum_dim(3).sqrt().clamp_min(1e-12));
        let k = k * ((alpha.clone() - 1.0) * row(&self.k_a) + 1.0);
        let inputs = Heads {
            r: split(r),
            k: split(k),
            v: split(v),
            log_w: split(log_w),
            a: -kk.clone(),
            b: kk * split(alpha),
        };
        let bonus = (inputs.r.clone()
            * inputs.k.clone()
            * self.r_k.val().unsqueeze_dim::<3>(0).unsqueeze_dim::<4>(2))
        .sum_dim(3)
            * inputs.v.clone(); // [B, H, T, N]
        let (o, s) = match compute {
            Compute::Fused => fused_recurrence(inputs, state.s),
            Compute::Tensor(Scan::Sequential) => sequential(inputs, state.s),
            Compute::Tensor(Scan::Chunked { chunk_len }) => chunked(inputs, state.s, chunk_len),
        };
        let normed =
            norm::per_head(o, (n as f64) * 1e-5) * row(&self.ln_x_weight) + row(&self.ln_x_bias);
        let bonus = bonus.swap_dims(1, 2).reshape([batch, t, d]);
        let y = projection::project(&self.output, (normed + bonus) * g);
        (y, Rwkv7State { shift: next, s })
    }

    /// One token: `x_t [B, D]` → `[B, D]` and the next state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<Rwkv7State>) -> (Tensor<2>, Rwkv7State) {
        let (y, state) = self.forward_with(x_t.unsqueeze_dim(1), state, Scan::Sequential);
        (y.squeeze_dim(1), state)
    }
}

/// The recurrence as one host op, sequence-heads flattened to rows.
fn fused_recurrence(x: Heads, s0: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let [b, h, t, n] = x.r.dims();
    let rows = |y: Tensor<4>| y.reshape([b * h, t, n]);
    let out = fused::dplr(
        rows(x.r),
        rows(x.k),
        rows(x.v),
        rows(x.log_w),
        rows(x.a),
        rows(x.b),
        s0.reshape([b * h, n, n]),
    );
    fused::split_heads(out, [b, h, t, n], [n, n])
}

/// The definition, one step at a time: `S ← diag(w) S + b (aᵀS) + k vᵀ`, `o = Sᵀr`.
pub(crate) fn sequential(x: Heads, s0: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
    let mut s = s0; // [B, H, N (key), N (value)]
    let mut outs = Vec::with_capacity(x.r.dims()[2]);
    let column = |y: Tensor<3>| y.unsqueeze_dim::<4>(3); // [B, H, N, 1]
    let steps = unbind::<4, 3>(x.r, 2)
        .into_iter()
        .zip(unbind::<4, 3>(x.k, 2))
        .zip(unbind::<4, 3>(x.v, 2))
        .zip(unbind::<4, 3>(x.log_w.exp(), 2))
        .zip(unbind::<4, 3>(x.a, 2))
        .zip(unbind::<4, 3>(x.b, 2));
    let row = |y: Tensor<3>| y.unsqueeze_dim::<4>(2); // [B, H, 1, N]
    for (((((r_t, k_t), v_t), w_t), a_t), b_t) in steps {
        let read = row(a_t).matmul(s.clone()); // aᵀS, [B, H, 1, N]
        // Both rank-one writes as one product: [b k] [aᵀS; vᵀ].
        let writes = Tensor::cat(vec![column(b_t), column(k_t)], 3)
            .matmul(Tensor::cat(vec![read, row(v_t)], 2));
        s = s * column(w_t) + writes;
        outs.push(row(r_t).matmul(s.clone()).squeeze_dim::<3>(2));
    }
    (Tensor::stack(outs, 2), s)
}

/// The chunkwise form (fla's `dplr_chunkwise`), chunks of `chunk_len` (the last may be
/// shorter). Within a chunk, with `G_t` the cumulative `log w` (per key channel) and
/// `G⁻_t = G_t − log w_t`:
///
/// ```text
/// A_ab[t, j] = Σ_c a_tc b_jc e^{G⁻_tc − G_jc},  A_ak likewise with k_j       j < t
/// A_rb[t, j] = Σ_c r_tc b_jc e^{G_tc − G_jc},   A_rk likewise with k_j       j ≤ t
/// U = (I − A_ab)⁻¹ (A_ak V + (a ⊙ e^{G⁻}) S)        the reads u_t = a_tᵀ S_{t−1}
/// O = (r ⊙ e^{G}) S + A_rk V + A_rb U
/// S ← e^{G_C} ⊙ S + (k ⊙ e^{G_C − G})ᵀ V + (b ⊙ e^{G_C − G})ᵀ U
/// ```
fn chunked(x: Heads, s0: Tensor<4>, chunk_len: usize) -> (Tensor<4>, Tensor<4>) {
    let [_, _, t, _] = x.r.dims();
    let device = x.r.device();
    let mut s = s0;
    let mut outs = Vec::with_capacity(t.div_ceil(chunk_len));
    for start in (0..t).step_by(chunk_len) {
        let c = chunk_len.min(t - start);
        let part = |y: &Tensor<4>| y.clone().narrow(2, start, c);
        let (r, k, v, a, b) = (part(&x.r), part(&x.k), part(&x.v), part(&x.a), part(&x.b));
        let log_w = part(&x.log_w);
        let cum = log_w.clone().cumsum(2); // G, [B, H, C, N]
        let before = cum.clone() - log_w; // G⁻
        let mask5 = |visible| {
            mask::causal(c, c, 0, visible, f32::NEG_INFINITY, &device)
                .unsqueeze_dim::<3>(0)
                .unsqueeze_dim::<4>(0)
                .unsqueeze_dim::<5>(4) // [1, 1, C, C, 1]
        };
        // e^{G_t − G_j} (j ≤ t) and e^{G⁻_t − G_j} (j < t), [B, H, C, C, N].
        let from = cum.clone().unsqueeze_dim::<5>(2);
        let upto = (cum.clone().unsqueeze_dim::<5>(3) - from.clone() + mask5(Visible::UpTo)).exp();
        let strict = (before.clone().unsqueeze_dim::<5>(3) - from + mask5(Visible::Before)).exp();
        let pair = |query: &Tensor<4>, decay: &Tensor<5>, key: &Tensor<4>| {
            (query.clone().unsqueeze_dim::<5>(3)
                * decay.clone()
                * key.clone().unsqueeze_dim::<5>(2))
            .sum_dim(4)
            .squeeze_dim::<4>(4) // [B, H, C, C]
        };
        let a_ab = pair(&a, &strict, &b);
        let a_ak = pair(&a, &strict, &k);
        let a_rb = pair(&r, &upto, &b);
        let a_rk = pair(&r, &upto, &k);
        let reads = mask::unit_lower_inverse(a_ab)
            .matmul(a_ak.matmul(v.clone()) + (a * before.exp()).matmul(s.clone())); // U
        outs.push(
            (r * cum.clone().exp()).matmul(s.clone())
                + a_rk.matmul(v.clone())
                + a_rb.matmul(reads.clone()),
        );
        let end = cum.clone().narrow(2, c - 1, 1); // G_C, [B, H, 1, N]
        let to_end = (end.clone() - cum).exp(); // [B, H, C, N]
        s = s * end.exp().swap_dims(2, 3)
            + (k * to_end.clone()).swap_dims(2, 3).matmul(v)
            + (b * to_end).swap_dims(2, 3).matmul(reads);
    }
    (Tensor::cat(outs, 2), s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;

    /// With no decay (w = 1) and no rank-one term (a = 0), the state is the plain sum of
    /// `k vᵀ`: the output is causal linear attention `Σ_{j≤t} (r_t·k_j) v_j`.
    #[test]
    fn without_decay_or_removal_it_is_linear_attention() {
        let dev = device();
        let (t, n) = (5, 3);
        let normal = || Tensor::<4>::random([1, 1, t, n], Distribution::Normal(0.0, 1.0), &dev);
        let (r, k, v) = (normal(), normal(), normal());
        let zeros = Tensor::<4>::zeros([1, 1, t, n], &dev);
        let heads = || Heads {
            r: r.clone(),
            k: k.clone(),
            v: v.clone(),
            log_w: zeros.clone(),
            a: zeros.clone(),
            b: normal(),
        };
        let scores = r.clone().matmul(k.clone().swap_dims(2, 3))
            * mask::causal(t, t, 0, Visible::UpTo, f32::NEG_INFINITY, &dev)
                .exp()
                .unsqueeze_dim::<3>(0)
                .unsqueeze_dim::<4>(0);
        let expected = scores.matmul(v.clone());
        for (o, s) in [
            sequential(heads(), Tensor::zeros([1, 1, n, n], &dev)),
            chunked(heads(), Tensor::zeros([1, 1, n, n], &dev), 2),
        ] {
            assert!(max_diff(o, expected.clone()) < 1e-5);
            assert!(max_diff(s, k.clone().swap_dims(2, 3).matmul(v.clone())) < 1e-5);
        }
    }

    /// The chunked form against the definition on raw heads, at a length no chunk divides,
    /// from a non-zero state: outputs, state and every gradient.
    #[test]
    fn chunked_matches_sequential_with_gradients() {
        let dev = device();
        let (bsz, h, t, n) = (2, 2, 11, 4);
        let normal =
            |shape: [usize; 4]| Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &dev);
        let unit = |x: Tensor<4>| x.clone() / x.powf_scalar(2.0).sum_dim(3).sqrt();
        let kk = unit(normal([bsz, h, t, n]));
        let alpha = Tensor::<4>::random([bsz, h, t, n], Distribution::Uniform(0.0, 1.0), &dev);
        let raw = [
            normal([bsz, h, t, n]),
            normal([bsz, h, t, n]),
            normal([bsz, h, t, n]),
            -Tensor::<4>::random([bsz, h, t, n], Distribution::Uniform(0.0, 0.6), &dev),
            -kk.clone(),
            kk * alpha,
            normal([bsz, h, n, n]),
        ];
        let out = normal([bsz, h, t, n]);
        let run = |chunk: Option<usize>| {
            let leaves: Vec<Tensor<4>> = raw.iter().map(|x| x.clone().require_grad()).collect();
            let heads = Heads {
                r: leaves[0].clone(),
                k: leaves[1].clone(),
                v: leaves[2].clone(),
                log_w: leaves[3].clone(),
                a: leaves[4].clone(),
                b: leaves[5].clone(),
            };
            let (o, s) = match chunk {
                None => sequential(heads, leaves[6].clone()),
                Some(c) => chunked(heads, leaves[6].clone(), c),
            };
            let grads = ((o.clone() * out.clone()).sum() + s.clone().sum()).backward();
            let mut all = vec![o.flatten::<1>(0, 3), s.flatten::<1>(0, 3)];
            all.extend(
                leaves
                    .iter()
                    .map(|l| l.grad(&grads).unwrap().flatten::<1>(0, 3)),
            );
            all
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
