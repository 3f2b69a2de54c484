//! mLSTM (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory", §2.3): an LSTM whose
//! memory is a matrix `C [d_qk, d_v]` per head, written with exponential input gating and read
//! by a query, as the layer of xLSTM-7B (`xlstm_large`) builds it around the mLSTM cell.
//!
//! ```text
//! q, k, v = W_q x, W_k x, W_v x                   per head: d_qk, d_qk, d_v;  q ← q / √d_qk
//! ĩ_t, f̃_t = w_i·x_t + b_i, w_f·x_t + b_f          one scalar each per head
//! m_t  = max(log σ(f̃_t) + m_{t−1}, ĩ_t)            stabiliser
//! i'_t = exp(ĩ_t − m_t),  f'_t = exp(log σ(f̃_t) + m_{t−1} − m_t)
//! C_t  = f'_t C_{t−1} + i'_t k_t v_tᵀ               matrix memory
//! n_t  = f'_t n_{t−1} + i'_t k_t                    normaliser
//! h̃_t  = C_tᵀ q_t / (max(|n_tᵀ q_t|, exp(−m_t)) + ε)
//! y_t  = W_out (σ(W_o x_t) ⊙ LayerNorm_H(h̃_t) ⊙ w)  head-wise norm, learned scale
//! ```
//!
//! `C`, `n` are held scaled by `exp(−m)`, so `exp(−m_t)` in the denominator is the paper's
//! lower bound 1 on `|nᵀq|` in the same scale: the stabiliser keeps `exp` finite and changes the
//! output only through `ε` (the native step kernel's `mlstm_recurrent_step__native`, ε = 1e-6).
//! As in xLSTM-7B's layer the gates read `x` (the original xLSTM block reads `q, k, v` and puts a
//! causal convolution before `q`, `k`); unlike it there is no soft cap on the gates'
//! pre-activations.
//!
//! Forms ([`MlstmSpec::scan`]): `fused` is the cell as one host op ([`fused::mlstm_cell`],
//! `auto`'s choice on the CPU backends); `sequential` is the recurrence above step by step; `chunked`
//! is the chunkwise form of `mlstm_kernels`' `chunkwise/native`: within a chunk the outputs
//! come from a causal, gate-weighted `q kᵀ` (quadratic in the chunk) plus the state carried in,
//! and the state is touched once per chunk. Unrolling `m_t`'s recursion gives
//! `m_t = max(G_t + m_start, max_{j≤t} (G_t − G_j + ĩ_j))` with `G` the in-chunk cumulative
//! `log σ(f̃)`, so the chunked form uses the very stabiliser of the definition and returns the
//! same `(C, n, m)`. `step` is the definition for one token.
//!
//! Field names: `n_heads` H, `head_dim` d_qk, `expand_v` (d_v = expand_v · d_qk).

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{sigmoid, softplus};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused;
use crate::head_dims;
use crate::init::Init;
use crate::mask::{self, Visible};
use crate::norm;
use crate::scan::{Compute, Form, Scan};
use crate::time::unbind;

/// ε in the denominator, as the reference kernels.
const EPS: f32 = 1e-6;

/// `[model.mixer]` with `kind = "mlstm"`. Its width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MlstmSpec {
    /// H.
    pub n_heads: usize,
    /// d_qk; `d_model / n_heads` when absent.
    pub head_dim: Option<usize>,
    /// d_v = expand_v · d_qk.
    pub expand_v: usize,
    pub scan: Form,
}

impl Default for MlstmSpec {
    fn default() -> Self {
        Self {
            n_heads: 4,
            head_dim: None,
            expand_v: 1,
            scan: Form::Auto,
        }
    }
}

impl MlstmSpec {
    pub fn config(&self, d_model: usize) -> MlstmConfig {
        let head_dim = head_dims::key_dim(d_model, self.n_heads, self.head_dim);
        MlstmConfig {
            d_model,
            n_heads: self.n_heads,
            head_dim,
            head_v_dim: self.expand_v * head_dim,
            scan: self.scan,
        }
    }

    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        head_dims::validate(d_model, self.n_heads, self.head_dim, self.expand_v)?;
        self.scan
            .validate()
            .map_err(|e| format!("model.mixer.scan.{e}"))
    }
}

/// Configuration of an [`Mlstm`] layer.
#[derive(Clone, Debug, PartialEq)]
pub struct MlstmConfig {
    pub d_model: usize,
    pub n_heads: usize,
    /// d_qk.
    pub head_dim: usize,
    /// d_v.
    pub head_v_dim: usize,
    pub scan: Form,
}

impl MlstmConfig {
    /// xLSTM's mLSTM initialisation: projections as PyTorch's `nn.Linear`, the gates' weights
    /// zero, the input gate's bias `N(0, 0.1)`, the forget gate's bias spread over `[3, 6]`
    /// across the heads (long memory from the start), the norm's scale one.
    pub fn init(&self, init: &mut Init) -> Mlstm {
        let (d, h) = (self.d_model, self.n_heads);
        let (key, value) = (h * self.head_dim, h * self.head_v_dim);
        let forget_bias = (0..h)
            .map(|j| 3.0 + 3.0 * j as f32 / (h.max(2) - 1) as f32)
            .collect();
        let gate = |init: &mut Init, bias: Param<Tensor<1>>| Linear {
            weight: init.constant([d, h], 0.0),
            bias: Some(bias),
        };
        let input_bias = init.normal([h], 0.1);
        let forget_bias = init.param(forget_bias, [h]);
        Mlstm {
            q_proj: init.linear(d, key, false),
            k_proj: init.linear(d, key, false),
            v_proj: init.linear(d, value, false),
            i_gate: gate(init, input_bias),
            f_gate: gate(init, forget_bias),
            o_gate: init.linear(d, value, false),
            norm_weight: init.constant([value], 1.0),
            out_proj: init.linear(value, d, false),
            n_heads: h,
            scan: self.scan,
        }
    }
}

/// One mLSTM layer. Create it with [`MlstmConfig::init`].
#[derive(Module, Debug)]
pub struct Mlstm {
    /// `[D, H·d_qk]`, `[D, H·d_qk]`, `[D, H·d_v]`, no bias.
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    /// `[D, H]` with bias: `ĩ` and `f̃`, one per head.
    pub i_gate: Linear,
    pub f_gate: Linear,
    /// `[D, H·d_v]`, no bias: the output gate's pre-activation.
    pub o_gate: Linear,
    /// `[H·d_v]`: the head-wise norm's scale.
    pub norm_weight: Param<Tensor<1>>,
    /// `[H·d_v, D]`, no bias.
    pub out_proj: Linear,
    #[module(skip)]
    pub n_heads: usize,
    #[module(skip)]
    pub scan: Form,
}

/// The state of an mLSTM layer between calls, scaled by `exp(−m)`.
#[derive(Clone, Debug)]
pub struct MlstmState {
    /// `C`, `[B, H, d_qk, d_v]`.
    pub c: Tensor<4>,
    /// `n`, `[B, H, d_qk]`.
    pub n: Tensor<3>,
    /// The stabiliser `m`, `[B, H]`.
    pub m: Tensor<2>,
}

/// Per-head inputs of the cell, `[B, H, T, ·]`.
pub(crate) struct Heads {
    /// Queries already scaled by `1/√d_qk`, keys, `[B, H, T, d_qk]`.
    pub(crate) q: Tensor<4>,
    pub(crate) k: Tensor<4>,
    pub(crate) v: Tensor<4>,
    /// `ĩ`, `[B, H, T]`.
    pub(crate) i: Tensor<3>,
    /// `log σ(f̃)`, `[B, H, T]`.
    pub(crate) log_f: Tensor<3>,
}

impl Mlstm {
    fn head_dim(&self) -> usize {
        self.q_proj.weight.lazy_shape()[1] / self.n_heads
    }

    fn head_v_dim(&self) -> usize {
        self.v_proj.weight.lazy_shape()[1] / self.n_heads
    }

    /// Floats of state per sequence: `C`, `n` and `m`.
    pub fn state_size(&self) -> usize {
        self.n_heads * (self.head_dim() * (self.head_v_dim() + 1) + 1)
    }

    /// FLOPs per token of the cell beyond the weights: per state element the decay, the
    /// rank-one write and the read `Cᵀq` (six), and the normaliser's update and `nᵀq`.
    pub fn cell_flops_per_token(&self) -> f64 {
        let (h, dk, dv) = (self.n_heads, self.head_dim(), self.head_v_dim());
        (h * (6 * dk * dv + 5 * dk)) as f64
    }

    pub fn zero_state(&self, batch: usize, device: &Device) -> MlstmState {
        let (h, dk, dv) = (self.n_heads, self.head_dim(), self.head_v_dim());
        MlstmState {
            c: Tensor::zeros([batch, h, dk, dv], device),
            n: Tensor::zeros([batch, h, dk], device),
            m: Tensor::zeros([batch, h], device),
        }
    }

    /// `x [B, T, D]` (`T ≥ 1`) → `[B, T, D]` and the state after the last step.
    ///
    /// On a backend with the cell's kernel (the CPU backends, wgpu) it is one op
    /// ([`fused::mlstm_cell`]) unless [`Mlstm::scan`] names a tensor form; elsewhere it runs in
    /// that form (the sequential one for `auto`).
    pub fn forward(&self, x: Tensor<3>, state: Option<MlstmState>) -> (Tensor<3>, MlstmState) {
        let op = fused::Op::MlstmCell { k: self.head_dim() };
        let compute = self.scan.resolve(fused::runs(op, &x.device(), x.dims()[1]));
        self.run(x, state, compute)
    }

    /// As [`Mlstm::forward`] with the cell built from tensor ops in the given form (the
    /// sequential one is the definition).
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        state: Option<MlstmState>,
        scan: Scan,
    ) -> (Tensor<3>, MlstmState) {
        self.run(x, state, Compute::Tensor(scan))
    }

    fn run(
        &self,
        x: Tensor<3>,
        state: Option<MlstmState>,
        compute: Compute,
    ) -> (Tensor<3>, MlstmState) {
        let [batch, t, _] = x.dims();
        let (h, dk, dv) = (self.n_heads, self.head_dim(), self.head_v_dim());
        let state = state.unwrap_or_else(|| self.zero_state(batch, &x.device()));
        let heads = |y: Tensor<3>, width: usize| y.reshape([batch, t, h, width]).swap_dims(1, 2);
        let per_head = |y: Tensor<3>| y.swap_dims(1, 2); // [B, T, H] → [B, H, T]
        let inputs = Heads {
            q: heads(self.q_proj.forward(x.clone()), dk) * (dk as f32).powf(-0.5),
            k: heads(self.k_proj.forward(x.clone()), dk),
            v: heads(self.v_proj.forward(x.clone()), dv),
            i: per_head(self.i_gate.forward(x.clone())),
            log_f: per_head(-softplus(-self.f_gate.forward(x.clone()), 1.0)),
        };
        let (o, state) = match compute {
            Compute::Fused => fused_cell(inputs, state),
            Compute::Tensor(Scan::Sequential) => recurrent(inputs, state),
            Compute::Tensor(Scan::Chunked { chunk_len }) => chunked(inputs, state, chunk_len),
        }; // o [B, H, T, d_v]
        let normed = norm::per_head(o, 1e-5);
        let weight = self
            .norm_weight
            .val()
            .unsqueeze_dim::<2>(0)
            .unsqueeze_dim(0);
        let y = self
            .out_proj
            .forward(sigmoid(self.o_gate.forward(x)) * normed * weight);
        (y, state)
    }

    /// One token: `x_t [B, D]` → `[B, D]` and the next state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<MlstmState>) -> (Tensor<2>, MlstmState) {
        let (y, state) = self.forward_with(x_t.unsqueeze_dim(1), state, Scan::Sequential);
        (y.squeeze_dim(1), state)
    }
}

/// `num / (max(|qn|, exp(−m)) + ε)`: `num [B, H, T, d_v]`, `qn` and `m` `[B, H, T]`.
fn normalise(num: Tensor<4>, qn: Tensor<3>, m: Tensor<3>) -> Tensor<4> {
    let denominator = qn.abs().max_pair((-m).exp()) + EPS;
    num / denominator.unsqueeze_dim::<4>(3)
}

/// The cell as one host op, sequence-heads flattened to rows.
pub(crate) fn fused_cell(x: Heads, s0: MlstmState) -> (Tensor<4>, MlstmState) {
    let [b, h, t, dk] = x.q.dims();
    let dv = x.v.dims()[3];
    let rows = |y: Tensor<4>| {
        let [_, _, _, n] = y.dims();
        y.reshape([b * h, t, n])
    };
    let out = fused::mlstm_cell(
        rows(x.q),
        rows(x.k),
        rows(x.v),
        x.i.reshape([b * h, t]),
        x.log_f.reshape([b * h, t]),
        s0.c.reshape([b * h, dk, dv]),
        s0.n.reshape([b * h, dk]),
        s0.m.reshape([b * h]),
    );
    let part = |from: usize, len: usize| fused::narrow(out.clone(), 1, from, len);
    let (tv, kv) = (t * dv, dk * dv);
    let o = normalise(
        part(0, tv).reshape([b, h, t, dv]),
        part(tv, t).reshape([b, h, t]),
        part(tv + t, t).reshape([b, h, t]),
    );
    let state = MlstmState {
        c: part(tv + 2 * t, kv).reshape([b, h, dk, dv]),
        n: part(tv + 2 * t + kv, dk).reshape([b, h, dk]),
        m: part(tv + 2 * t + kv + dk, 1).reshape([b, h]),
    };
    (o, state)
}

/// The definition, one step at a time (the native step kernel).
pub(crate) fn recurrent(x: Heads, s0: MlstmState) -> (Tensor<4>, MlstmState) {
    let MlstmState {
        mut c,
        mut n,
        mut m,
    } = s0;
    let t = x.q.dims()[2];
    let (mut nums, mut qns, mut ms) = (
        Vec::with_capacity(t),
        Vec::with_capacity(t),
        Vec::with_capacity(t),
    );
    let steps = unbind::<4, 3>(x.q, 2)
        .into_iter()
        .zip(unbind::<4, 3>(x.k, 2))
        .zip(unbind::<4, 3>(x.v, 2))
        .zip(unbind::<3, 2>(x.i, 2))
        .zip(unbind::<3, 2>(x.log_f, 2));
    for ((((q_t, k_t), v_t), i_t), log_f_t) in steps {
        // q_t, k_t [B, H, d_qk]; v_t [B, H, d_v]; i_t, log_f_t, m [B, H].
        let decayed = log_f_t + m;
        let m_t = decayed.clone().max_pair(i_t.clone());
        let f_t = (decayed - m_t.clone()).exp().unsqueeze_dim::<3>(2); // [B, H, 1]
        let i_t = (i_t - m_t.clone()).exp().unsqueeze_dim::<3>(2);
        let k_col = k_t.clone().unsqueeze_dim::<4>(3); // [B, H, d_qk, 1]
        c = c * f_t.clone().unsqueeze_dim::<4>(3)
            + k_col * (v_t * i_t.clone()).unsqueeze_dim::<4>(2);
        n = n * f_t + k_t * i_t;
        let q_col = q_t.clone().unsqueeze_dim::<4>(3);
        nums.push((c.clone() * q_col).sum_dim(2).squeeze_dim::<3>(2)); // Cᵀq, [B, H, d_v]
        qns.push((n.clone() * q_t).sum_dim(2).squeeze_dim::<2>(2)); // nᵀq, [B, H]
        ms.push(m_t.clone());
        m = m_t;
    }
    let o = normalise(
        Tensor::stack(nums, 2),
        Tensor::stack(qns, 2),
        Tensor::stack(ms, 2),
    );
    (o, MlstmState { c, n, m })
}

/// The chunkwise form, chunks of `chunk_len` (the last may be shorter). Within a chunk, with
/// `G` the cumulative `log σ(f̃)`, `a_t = G_t + m_start` the carried state's log weight and
/// `D_tj = G_t − G_j + ĩ_j` (`j ≤ t`) each in-chunk write's:
///
/// ```text
/// m_t   = max(a_t, max_j D_tj)                       the definition's stabiliser, unrolled
/// P_tj  = exp(D_tj − m_t) (q_t·k_j),  w_t = exp(a_t − m_t)
/// Cᵀq_t = w_t C_startᵀ q_t + Σ_j P_tj v_j,   nᵀq_t = w_t n_startᵀ q_t + Σ_j P_tj
/// C ← exp(a_last − m_last) C_start + Σ_j exp(D_last,j − m_last) k_j v_jᵀ   (n alike)
/// ```
fn chunked(x: Heads, s0: MlstmState, chunk_len: usize) -> (Tensor<4>, MlstmState) {
    let [_, _, t, _] = x.q.dims();
    let device = x.q.device();
    let MlstmState {
        mut c,
        mut n,
        mut m,
    } = s0;
    let mut outs = Vec::with_capacity(t.div_ceil(chunk_len));
    for start in (0..t).step_by(chunk_len) {
        let len = chunk_len.min(t - start);
        let part4 = |y: &Tensor<4>| y.clone().narrow(2, start, len);
        let (q, k, v) = (part4(&x.q), part4(&x.k), part4(&x.v));
        let i = x.i.clone().narrow(2, start, len); // [B, H, C]
        let cum = x.log_f.clone().narrow(2, start, len).cumsum(2); // G
        let upto = mask::causal(len, len, 0, Visible::UpTo, f32::NEG_INFINITY, &device)
            .unsqueeze_dim::<3>(0)
            .unsqueeze_dim::<4>(0);
        // D_tj = G_t − G_j + ĩ_j, −∞ above the diagonal; [B, H, C, C].
        let log_d =
            cum.clone().unsqueeze_dim::<4>(3) - (cum.clone() - i).unsqueeze_dim::<4>(2) + upto;
        let carried = cum.clone() + m.unsqueeze_dim::<3>(2); // a, [B, H, C]
        let m_t = log_d
            .clone()
            .max_dim(3)
            .squeeze_dim::<3>(3)
            .max_pair(carried.clone()); // [B, H, C]
        let weights = (log_d - m_t.clone().unsqueeze_dim::<4>(3)).exp(); // [B, H, C, C]
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3)) * weights.clone();
        let w = (carried.clone() - m_t.clone()).exp(); // [B, H, C]
        let w_col = w.unsqueeze_dim::<4>(3);
        let num = q.clone().matmul(c.clone()) * w_col.clone() + scores.clone().matmul(v.clone());
        let qn = (q.matmul(n.clone().unsqueeze_dim::<4>(3)) * w_col).squeeze_dim::<3>(3)
            + scores.sum_dim(3).squeeze_dim::<3>(3);
        outs.push(normalise(num, qn, m_t.clone()));
        // The state after the chunk's last step, in that step's scale.
        let m_last = m_t.narrow(2, len - 1, 1); // [B, H, 1]
        let w_last = carried.narrow(2, len - 1, 1) - m_last.clone();
        let to_end = weights.narrow(2, len - 1, 1).swap_dims(2, 3); // [B, H, C, 1]
        let k_w = k * to_end;
        let keep = w_last.exp(); // [B, H, 1]
        c = c * keep.clone().unsqueeze_dim::<4>(3) + k_w.clone().swap_dims(2, 3).matmul(v);
        n = n * keep + k_w.sum_dim(2).squeeze_dim::<3>(2);
        m = m_last.squeeze_dim::<2>(2);
    }
    (Tensor::cat(outs, 2), MlstmState { c, n, m })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;

    fn heads(b: usize, h: usize, t: usize, dk: usize, dv: usize) -> (Heads, MlstmState) {
        let dev = device();
        let normal = |shape: [usize; 4]| {
            Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &dev).require_grad()
        };
        let gates = |lo, hi| {
            Tensor::<3>::random([b, h, t], Distribution::Uniform(lo, hi), &dev).require_grad()
        };
        let x = Heads {
            q: normal([b, h, t, dk]),
            k: normal([b, h, t, dk]),
            v: normal([b, h, t, dv]),
            i: gates(-3.0, 3.0),
            log_f: gates(-2.0, 0.0),
        };
        let s0 = MlstmState {
            c: normal([b, h, dk, dv]),
            n: Tensor::<3>::random([b, h, dk], Distribution::Normal(0.0, 1.0), &dev).require_grad(),
            m: Tensor::<2>::random([b, h], Distribution::Normal(0.0, 1.0), &dev).require_grad(),
        };
        (x, s0)
    }

    fn clone(x: &Heads) -> Heads {
        Heads {
            q: x.q.clone(),
            k: x.k.clone(),
            v: x.v.clone(),
            i: x.i.clone(),
            log_f: x.log_f.clone(),
        }
    }

    /// With the forget gate open (log f = 0) and the input gate at 0, the memory is the plain
    /// sum of `k vᵀ` and the normaliser the sum of `k`: the cell is unnormalised linear
    /// attention divided by `max(|Σ qᵀk|, 1)`.
    #[test]
    fn with_open_gates_the_cell_is_normalised_linear_attention() {
        let dev = device();
        let (b, h, t, dk, dv) = (1, 1, 5, 3, 2);
        let q = Tensor::<4>::random([b, h, t, dk], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<4>::random([b, h, t, dk], Distribution::Normal(0.0, 1.0), &dev);
        let v = Tensor::<4>::random([b, h, t, dv], Distribution::Normal(0.0, 1.0), &dev);
        let zeros = Tensor::<3>::zeros([b, h, t], &dev);
        let x = Heads {
            q: q.clone(),
            k: k.clone(),
            v: v.clone(),
            i: zeros.clone(),
            log_f: zeros,
        };
        let (o, s) = recurrent(
            x,
            MlstmState {
                c: Tensor::zeros([b, h, dk, dv], &dev),
                n: Tensor::zeros([b, h, dk], &dev),
                m: Tensor::zeros([b, h], &dev),
            },
        );
        let scores = q.matmul(k.clone().swap_dims(2, 3))
            * mask::causal(t, t, 0, Visible::UpTo, f32::NEG_INFINITY, &dev)
                .exp()
                .unsqueeze_dim::<3>(0)
                .unsqueeze_dim::<4>(0);
        let denominator = scores.clone().sum_dim(3).abs().clamp_min(1.0) + EPS;
        let expected = scores.matmul(v.clone()) / denominator;
        assert!(max_diff(o, expected) < 1e-5);
        assert!(max_diff(s.c, k.swap_dims(2, 3).matmul(v)) < 1e-5);
        assert!(max_diff(s.m, Tensor::<2>::zeros([b, h], &dev)) < 1e-6);
    }

    /// The chunked form against the definition on raw heads at a length no chunk divides,
    /// from a non-zero state: outputs, the three parts of the state and every gradient.
    #[test]
    fn chunked_matches_recurrent_with_gradients() {
        let (b, h, t, dk, dv) = (2, 3, 11, 4, 5);
        let (x, s0) = heads(b, h, t, dk, dv);
        let dev = device();
        let r = Tensor::<4>::random([b, h, t, dv], Distribution::Normal(0.0, 1.0), &dev);
        let run = |chunk: Option<usize>| {
            let (o, s) = match chunk {
                None => recurrent(clone(&x), s0.clone()),
                Some(c) => chunked(clone(&x), s0.clone(), c),
            };
            let loss = (o.clone() * r.clone()).sum()
                + s.c.clone().sum()
                + s.n.clone().sum()
                + s.m.clone().sum();
            let grads = loss.backward();
            let flat4 = |y: Tensor<4>| y.flatten::<1>(0, 3);
            let flat3 = |y: Tensor<3>| y.flatten::<1>(0, 2);
            vec![
                flat4(o),
                flat4(s.c),
                flat3(s.n),
                s.m.flatten::<1>(0, 1),
                flat4(x.q.grad(&grads).unwrap()),
                flat4(x.k.grad(&grads).unwrap()),
                flat4(x.v.grad(&grads).unwrap()),
                flat3(x.i.grad(&grads).unwrap()),
                flat3(x.log_f.grad(&grads).unwrap()),
                flat4(s0.c.grad(&grads).unwrap()),
                flat3(s0.n.grad(&grads).unwrap()),
                s0.m.grad(&grads).unwrap().flatten::<1>(0, 1),
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

    /// The stabiliser only rescales: shifting `m_0` (and `C_0`, `n_0` by its exp) leaves the
    /// outputs unchanged but for ε, in both forms.
    #[test]
    fn the_stabiliser_does_not_change_the_output() {
        let layer = MlstmSpec {
            n_heads: 2,
            ..MlstmSpec::default()
        }
        .config(8)
        .init(&mut Init::new(3, &device()));
        let dev = device();
        let x = Tensor::<3>::random([2, 7, 8], Distribution::Normal(0.0, 1.0), &dev);
        let c0 = Tensor::<4>::random([2, 2, 4, 4], Distribution::Normal(0.0, 1.0), &dev);
        let n0 = Tensor::<3>::random([2, 2, 4], Distribution::Normal(0.0, 1.0), &dev);
        let start = |shift: f32| MlstmState {
            c: c0.clone() * (-shift).exp(),
            n: n0.clone() * (-shift).exp(),
            m: Tensor::zeros([2, 2], &dev) + shift,
        };
        for scan in [Scan::Sequential, Scan::Chunked { chunk_len: 3 }] {
            let (a, _) = layer.forward_with(x.clone(), Some(start(0.0)), scan);
            let (b, _) = layer.forward_with(x.clone(), Some(start(2.5)), scan);
            assert!(max_diff(a, b) < 1e-4, "{scan:?}");
        }
    }
}
