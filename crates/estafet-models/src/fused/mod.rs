//! Whole recurrences as **one** autodiff op each, with hand-written backwards, computed by host
//! kernels on the CPU backends (burn's backend extension routes [`FusedOps`]):
//!
//! - [`cell_scan`]: an Elman, LSTM or GRU layer over the whole sequence (BPTT backward);
//! - [`selective_scan`]: Mamba's S6 scan with its `C` contraction;
//! - [`wkv4`]: RWKV-4's WKV in the official kernel's running-max form;
//! - [`wkv6`]: RWKV-6's WKV with its matrix state and decay per key channel;
//! - [`min_rnn`]: minGRU's or minLSTM's gates, candidate and scan after their projection;
//! - [`delta_rule`]: Gated DeltaNet's gated delta rule with its matrix state;
//! - [`ssd`]: Mamba-2's recurrence (scalar decay per head) with its `C` contraction;
//! - [`dplr`]: RWKV-7's diagonal-plus-rank-one recurrence with its matrix state;
//! - [`mlstm_cell`]: xLSTM's mLSTM cell (matrix memory, normaliser, stabiliser);
//! - [`slstm_cell`]: xLSTM's sLSTM recurrence (block-diagonal `R`, exponential gates);
//! - [`causal_attention`]: softmax attention under the causal mask, 64 query rows at a time;
//! - [`rope`]: the rotary position embedding of attention's queries and keys;
//! - [`shift_mix_linear`]: RWKV's token shift, interpolation, projection and activation;
//! - [`layer_norm`]: layer normalisation over the last axis;
//! - [`token_nll`]: the cross-entropy of token targets under logits;
//! - [`skip_gate`]: Mamba's skip term and SiLU output gate;
//! - [`softplus`]: Mamba's step size `Δ`;
//! - [`linear`]: a linear layer (the projections and the head) under autodiff;
//! - [`narrow`]: a kernel's outputs cut from its final state, as a tensor of their own.
//!
//! Built from ordinary tensor ops, a recurrence records ~10 small ops per time step in the
//! autodiff graph and the backward walks them again: at `B = 32, H = 256` op dispatch and
//! allocation, not arithmetic, set the pace. For the cells, each step is `xp = x_t W_i + b_i`
//! and `hp = h_{t-1} W_h + b_h` (two small GEMMs against weights packed once) and the cell's
//! elementwise update. The backward is one reverse loop of the elementwise
//! derivatives and `dh_{t-1} = dhp W_hᵀ` (one GEMM per step), then `dW_h`, `dW_i` and `dx` as
//! single GEMMs over all `B·T` rows. Sequences are independent, so the batch is cut into one
//! block per thread (the scans: one sequence per task) and each runs its time loop alone.
//!
//! ```text
//! cell_scan out [B, T, S·H]    S = 2 for the LSTM (h_t then c_t on the last axis), 1 otherwise
//! ```
//!
//! Each model's tensor-op forms (`forward_sequential`, `forward_with`) are the definition;
//! `tests/forms.rs` compares every op here with them in values, final states and every gradient,
//! and each kernel's file tests it against the definition at uneven shapes. Backends without the
//! kernels ([`has_kernel`] false: wgpu) run those forms. This file and
//! `estafet-experiments/src/backend.rs` are the only places that name backends: the latter picks
//! one, this one says which run the host kernels.
//!
//! Code map: this file holds the public ops and the backend extension that routes them;
//! [`host`] the plumbing every kernel shares (the [`host::HostKernel`] trait, its plain and
//! autodiff runners, tensor I/O, strided GEMM, batch blocks); [`pool`] rayon's pool as the
//! kernels use it (the training thread in it, the other threads kept awake between kernels);
//! [`packed`] the cells' step GEMM against a `W_h` packed once per call; [`math`] the
//! vectorisable transcendentals and the instruction-set copies; [`cell`], [`conv`], [`selective`], [`wkv4`],
//! [`wkv6`], [`min_rnn`], [`delta_rule`], [`ssd`], [`dplr`], [`mlstm_cell`], [`slstm_cell`] and
//! [`attention`], [`rope`], [`mix`], [`layer_norm`], [`nll`], [`gate`], [`softplus`] and
//! [`columns`] one kernel each, with its equations.

// NdArray is deprecated in burn 0.22 but still estafet's reference backend; the extension
// macro's generated code names it, so the allowance covers the module.
#![allow(deprecated)]

mod attention;
mod cell;
mod columns;
mod conv;
mod delta_rule;
mod dplr;
mod gate;
mod host;
mod layer_norm;
mod linear;
mod math;
mod min_rnn;
mod mix;
mod mlstm_cell;
mod nll;
mod packed;
mod pool;
mod rope;
mod selective;
mod slstm_cell;
mod softplus;
mod ssd;
mod wkv4;
mod wkv6;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Int, Tensor};

use crate::scan::Eigenvalues;

use attention::CausalAttention;
pub use cell::Cell;
use cell::CellScan;
use columns::Columns;
use conv::ConvSilu;
use delta_rule::DeltaRule;
use dplr::Dplr;
use gate::SkipGate;
use host::{run_plain, run_tracked};
use layer_norm::LayerNorm;
use linear::Linear;
pub use math::Isa;
pub use min_rnn::MinRnn;
use min_rnn::MinScan;
pub use mix::Activation;
use mix::ShiftMix;
use mlstm_cell::MlstmCell;
use nll::TokenNll;
pub use pool::{join_global_pool, threads};
use rope::Rotary;
use selective::Selective;
use slstm_cell::SlstmCell;
use softplus::Softplus;
use ssd::Ssd;
use wkv4::Wkv4;
use wkv6::Wkv6;

/// The rate of one `n × n × n` f32 GEMM with the kernels' GEMM on rayon's pool (its threads
/// are the process's `RAYON_NUM_THREADS`), GFLOP/s, the best of `repeats`: the yardstick of the
/// benchmark's efficiency.
pub fn gemm_gflops(n: usize, repeats: usize) -> f64 {
    host::gemm_gflops(n, repeats)
}

/// An op of this module that a backend may or may not run as one kernel, with the sizes that
/// decide whether a GPU kernel fits a device (`crate::gpu::runs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// [`cell_scan`] of a cell of width `hidden`.
    Cell { cell: Cell, hidden: usize },
    /// [`min_rnn`].
    MinRnn,
    /// [`selective_scan`] with `n` states per channel.
    SelectiveScan { n: usize },
    /// [`wkv4`].
    Wkv4,
    /// [`delta_rule`] with keys of `k`.
    DeltaRule { k: usize },
    /// [`wkv6`] with heads of `k`.
    Wkv6 { k: usize },
    /// [`ssd`] with `n` states per row.
    Ssd { n: usize },
    /// [`dplr`] with heads of `n`.
    Dplr { n: usize },
    /// [`mlstm_cell`] with keys of `k`.
    MlstmCell { k: usize },
    /// [`slstm_cell`] of width `d` in `heads` heads.
    Slstm { d: usize, heads: usize },
    /// Any other op: host kernels only.
    Other,
}

/// Whether `op` over `len` steps runs as one op on `device`: every op on the CPU backends (host
/// kernels), the ops with a GPU kernel (`crate::gpu`) on a CubeCL device that can run it at
/// that length. Models run their tensor-op forms where it does not.
pub fn runs(op: Op, device: &burn::tensor::Device, len: usize) -> bool {
    if has_kernel(device) {
        return true;
    }
    #[cfg(feature = "wgpu")]
    if crate::gpu::runs(op, device, len) {
        return true;
    }
    let _ = (op, len);
    false
}

/// Whether `device`'s backend runs the host kernels (then models use the ops of this module).
pub fn has_kernel(device: &burn::tensor::Device) -> bool {
    use burn::backend::DispatchDevice;
    #[allow(unreachable_patterns)]
    match device.as_dispatch().clone().inner() {
        #[cfg(feature = "ndarray")]
        DispatchDevice::NdArray(_) => true,
        #[cfg(feature = "flex")]
        DispatchDevice::Flex(_) => true,
        _ => false,
    }
}

/// Runs `cell` over the sequence; see the module docs.
///
/// - `x`: `[B, T, D]`, `T ≥ 1`; `w_i`: `[D, G·H]`; `w_h`: `[H, G·H]`; `b_i`, `b_h`: `[G·H]`
/// - `h0`, `c0`: `[B, H]` (`c0` is read by the LSTM only)
/// - returns `[B, T, S·H]`
#[allow(clippy::too_many_arguments)]
pub fn cell_scan(
    cell: Cell,
    x: Tensor<3>,
    w_i: Tensor<2>,
    b_i: Tensor<1>,
    w_h: Tensor<2>,
    b_h: Tensor<1>,
    h0: Tensor<2>,
    c0: Tensor<2>,
) -> Tensor<3> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&x.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::cell_scan(
            x.into_dispatch(),
            w_i.into_dispatch(),
            b_i.into_dispatch(),
            w_h.into_dispatch(),
            b_h.into_dispatch(),
            h0.into_dispatch(),
            c0.into_dispatch(),
            cell,
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::cell_scan(
        x.into_dispatch(),
        w_i.into_dispatch(),
        b_i.into_dispatch(),
        w_h.into_dispatch(),
        b_h.into_dispatch(),
        h0.into_dispatch(),
        c0.into_dispatch(),
        cell,
    ))
}

/// [`cell_scan`] with the projections of a cell's `input` (`[D, G·H]`) and `hidden`
/// (`[H, G·H]`) linear layers, from `h0` and (LSTM) `c0`: returns the op's output
/// `[B, T, S·H]` and its last step `[B, S·H]`, the final state.
pub fn cell_layer(
    cell: Cell,
    x: Tensor<3>,
    input: &burn::nn::Linear,
    hidden: &burn::nn::Linear,
    h0: Tensor<2>,
    c0: Option<Tensor<2>>,
) -> (Tensor<3>, Tensor<2>) {
    let len = x.dims()[1];
    let c0 = c0.unwrap_or_else(|| h0.zeros_like());
    let (w_i, w_h) = (input.weight.val(), hidden.weight.val());
    let out = cell_scan(cell, x, w_i, bias(input), w_h, bias(hidden), h0, c0);
    let last = out.clone().narrow(1, len - 1, 1).squeeze_dim(1);
    (out, last)
}

/// A linear layer's bias (zeros when it has none).
pub(crate) fn bias(linear: &burn::nn::Linear) -> Tensor<1> {
    linear.bias.as_ref().map_or_else(
        || {
            let [_, n] = linear.weight.dims();
            Tensor::zeros([n], &linear.weight.device())
        },
        |b| b.val(),
    )
}

/// Mamba's selective scan (S6) with its output contraction, one op:
///
/// ```text
/// h_t = a_t ⊙ h_{t−1} + (Δ_t ⊙ x_t) ⊗ B_t              h [B, M, N]
/// a_t = exp(Δ_t A), or 2·exp(Δ_t A) − 1 with signed eigenvalues
/// y_t = h_t C_t                                          (contract N)
/// ```
///
/// - `delta`, `x`: `[B, T, M]`; `a`: `[M, N]` (`A`, negative); `b`, `c`: `[B, T, N]`;
///   `h0`: `[B, M, N]`
/// - returns `[B, T·M + M·N]`: `y` flattened, then `h_T` flattened
///
/// Unlike the tensor-op forms it never materialises the `[B, T, M, N]` decays, drives and
/// states: the forward keeps one `[M, N]` state per sequence, the backward recomputes the
/// states of one sequence at a time, and sequences run in parallel.
pub fn selective_scan(
    delta: Tensor<3>,
    x: Tensor<3>,
    a: Tensor<2>,
    b: Tensor<3>,
    c: Tensor<3>,
    h0: Tensor<3>,
    eigenvalues: Eigenvalues,
) -> Tensor<2> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&x.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::selective_scan(
            delta.into_dispatch(),
            x.into_dispatch(),
            a.into_dispatch(),
            b.into_dispatch(),
            c.into_dispatch(),
            h0.into_dispatch(),
            eigenvalues,
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::selective_scan(
        delta.into_dispatch(),
        x.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        c.into_dispatch(),
        h0.into_dispatch(),
        eigenvalues,
    ))
}

/// Mamba's causal depthwise convolution and its SiLU, one op (see `conv.rs`):
/// `y_t = SiLU(bias + Σ_j w_j ⊙ window_{t+j})`.
///
/// - `window`: `[B, K−1+T, C]` (the carried `K − 1` inputs, then this call's `T`); `weight`:
///   `[K, C]` (tap `j` multiplies the input `K − 1 − j` steps back); `bias`: `[C]`
/// - returns `[B, T, C]`
pub fn conv_silu(window: Tensor<3>, weight: Tensor<2>, bias: Tensor<1>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::conv_silu(
        window.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
    ))
}

/// RWKV-4's WKV in the official kernel's running-max form, one op:
///
/// ```text
/// q = max(p, u + k_t)            y_t = (e^{p−q} a + e^{u+k_t−q} v_t) / (e^{p−q} b + e^{u+k_t−q})
/// q' = max(p − w, k_t)           a ← e^{p−w−q'} a + e^{k_t−q'} v_t,  b ← e^{p−w−q'} b + e^{k_t−q'},  p ← q'
/// ```
///
/// - `w`, `u`: `[D]`; `k`, `v`: `[B, T, D]`; `a`, `b`, `p`: `[B, D]`
/// - returns `[B, T·D + 3·D]`: `y` flattened, then the final `a`, `b`, `p`
///
/// The backward differentiates exactly these operations (the maxima route their gradient to the
/// larger argument, as the tensor-op form's `max_pair` does), recomputing each sequence's states.
#[allow(clippy::too_many_arguments)]
pub fn wkv4(
    w: Tensor<1>,
    u: Tensor<1>,
    k: Tensor<3>,
    v: Tensor<3>,
    a: Tensor<2>,
    b: Tensor<2>,
    p: Tensor<2>,
) -> Tensor<2> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&k.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::wkv4(
            w.into_dispatch(),
            u.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            a.into_dispatch(),
            b.into_dispatch(),
            p.into_dispatch(),
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::wkv4(
        w.into_dispatch(),
        u.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        p.into_dispatch(),
    ))
}

/// minGRU's or minLSTM's recurrence after the input projection, one op (see `min_rnn.rs`):
///
/// ```text
/// minGRU:  a_t = 1 − σ(k_t),  b_t = σ(k_t) g(v_t)
/// minLSTM: a_t = f_t / (f_t + i_t),  b_t = i_t / (f_t + i_t) g(v_t),  f_t = σ(k_f,t), i_t = σ(k_i,t)
/// h_t = a_t ⊙ h_{t−1} + b_t
/// ```
///
/// - `pre`: `[B, T, G·H]`, the projection `[v | k]` (minGRU) or `[v | k_f | k_i]` (minLSTM);
///   `h0`: `[B, H]`
/// - returns `h_1..h_T`, `[B, T, H]` (the last step is the final state)
pub fn min_rnn(kind: MinRnn, pre: Tensor<3>, h0: Tensor<2>) -> Tensor<3> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&pre.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::min_rnn(
            pre.into_dispatch(),
            h0.into_dispatch(),
            kind,
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::min_rnn(
        pre.into_dispatch(),
        h0.into_dispatch(),
        kind,
    ))
}

/// The gated delta rule (Gated DeltaNet's recurrence), one op (see `delta_rule.rs`), per row
/// (a sequence's head) with a matrix state `S [K, V]`:
///
/// ```text
/// S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,   α_t = exp(g_t)
/// o_t = S_tᵀ q_t
/// ```
///
/// - `q`, `k`: `[R, T, K]`; `v`: `[R, T, V]`; `beta`, `g`: `[R, T]`; `s0`: `[R, K, V]`
/// - returns `[R, T·V + K·V]`: `o` flattened, then `S_T` flattened
pub fn delta_rule(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    beta: Tensor<2>,
    g: Tensor<2>,
    s0: Tensor<3>,
) -> Tensor<2> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&q.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::delta_rule(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            beta.into_dispatch(),
            g.into_dispatch(),
            s0.into_dispatch(),
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::delta_rule(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        beta.into_dispatch(),
        g.into_dispatch(),
        s0.into_dispatch(),
    ))
}

/// RWKV-6's WKV, one op (see `wkv6.rs`), per row (a sequence's head) with a matrix state
/// `S [K, V]`:
///
/// ```text
/// o_t = (S_{t−1} + diag(u) k_t v_tᵀ)ᵀ r_t,   S_t = diag(exp(log_w_t)) S_{t−1} + k_t v_tᵀ
/// ```
///
/// - `r`, `k`, `log_w`: `[R, T, K]`; `v`: `[R, T, V]`; `u`: `[R, K]`; `s0`: `[R, K, V]`
/// - returns `[R, T·V + K·V]`: `o` flattened, then `S_T` flattened
pub fn wkv6(
    r: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    log_w: Tensor<3>,
    u: Tensor<2>,
    s0: Tensor<3>,
) -> Tensor<2> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&r.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::wkv6(
            r.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            log_w.into_dispatch(),
            u.into_dispatch(),
            s0.into_dispatch(),
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::wkv6(
        r.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        log_w.into_dispatch(),
        u.into_dispatch(),
        s0.into_dispatch(),
    ))
}

/// Mamba-2's SSD recurrence, one op (see `ssd.rs`), per row (a sequence's head) with a state
/// `h [P, N]`:
///
/// ```text
/// h_t = a_t h_{t−1} + x_t B_tᵀ,   a_t = exp(log_a_t), or 2·exp(log_a_t) − 1 when signed
/// y_t = h_t C_t
/// ```
///
/// - `x`: `[B·H, T, P]` (`Δ x`); `log_a`: `[B·H, T]` (`Δ A`); `b`, `c`: `[B, T, N]`, shared by
///   the `heads` of a sequence; `h0`: `[B·H, P, N]`
/// - returns `[B·H, T·P + P·N]`: `y` flattened, then `h_T` flattened
pub fn ssd(
    x: Tensor<3>,
    log_a: Tensor<2>,
    b: Tensor<3>,
    c: Tensor<3>,
    h0: Tensor<3>,
    heads: usize,
    eigenvalues: Eigenvalues,
) -> Tensor<2> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&x.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::ssd(
            x.into_dispatch(),
            log_a.into_dispatch(),
            b.into_dispatch(),
            c.into_dispatch(),
            h0.into_dispatch(),
            heads,
            eigenvalues,
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::ssd(
        x.into_dispatch(),
        log_a.into_dispatch(),
        b.into_dispatch(),
        c.into_dispatch(),
        h0.into_dispatch(),
        heads,
        eigenvalues,
    ))
}

/// RWKV-7's recurrence, one op (see `dplr.rs`), per row (a sequence's head) with a state
/// `S [N (key), N (value)]`:
///
/// ```text
/// S_t = diag(exp(log_w_t)) S_{t−1} + b_t (a_tᵀ S_{t−1}) + k_t v_tᵀ
/// o_t = S_tᵀ r_t
/// ```
///
/// - `r`, `k`, `v`, `log_w`, `a`, `b`: `[R, T, N]`; `s0`: `[R, N, N]`
/// - returns `[R, T·N + N·N]`: `o` flattened, then `S_T` flattened
#[allow(clippy::too_many_arguments)]
pub fn dplr(
    r: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    log_w: Tensor<3>,
    a: Tensor<3>,
    b: Tensor<3>,
    s0: Tensor<3>,
) -> Tensor<2> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&r.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::dplr(
            r.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            log_w.into_dispatch(),
            a.into_dispatch(),
            b.into_dispatch(),
            s0.into_dispatch(),
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::dplr(
        r.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        log_w.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        s0.into_dispatch(),
    ))
}

/// xLSTM's mLSTM cell, one op (see `mlstm_cell.rs`), per row (a sequence's head) with a matrix
/// memory `C [K, V]`, a normaliser `n [K]` and a stabiliser `m`:
///
/// ```text
/// m_t = max(log_f_t + m_{t−1}, ĩ_t),  f_t = exp(log_f_t + m_{t−1} − m_t),  i_t = exp(ĩ_t − m_t)
/// C_t = f_t C_{t−1} + i_t k_t v_tᵀ,   n_t = f_t n_{t−1} + i_t k_t
/// ```
///
/// - `q`, `k`: `[R, T, K]`; `v`: `[R, T, V]`; `i` (`ĩ`), `log_f`: `[R, T]`; `c0`: `[R, K, V]`;
///   `n0`: `[R, K]`; `m0`: `[R]`
/// - returns `[R, T·V + 2T + K·V + K + 1]`: every step's `C_tᵀ q_t`, then `n_tᵀ q_t`, then `m_t`,
///   then the final `C`, `n`, `m`
#[allow(clippy::too_many_arguments)]
pub fn mlstm_cell(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    i: Tensor<2>,
    log_f: Tensor<2>,
    c0: Tensor<3>,
    n0: Tensor<2>,
    m0: Tensor<1>,
) -> Tensor<2> {
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&q.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::mlstm_cell(
            q.into_dispatch(),
            k.into_dispatch(),
            v.into_dispatch(),
            i.into_dispatch(),
            log_f.into_dispatch(),
            c0.into_dispatch(),
            n0.into_dispatch(),
            m0.into_dispatch(),
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::mlstm_cell(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        i.into_dispatch(),
        log_f.into_dispatch(),
        c0.into_dispatch(),
        n0.into_dispatch(),
        m0.into_dispatch(),
    ))
}

/// xLSTM's sLSTM recurrence after its input projection, one op (see `slstm_cell.rs`), one
/// sequence per task:
///
/// ```text
/// (ĩ, f̃, z̃, õ)_t = wx_t + R h_{t−1},  m_t = max(log σ(f̃_t) + m_{t−1}, ĩ_t)
/// c_t = f_t c_{t−1} + i_t tanh(z̃_t),  n_t = f_t n_{t−1} + i_t,  h_t = σ(õ_t) c_t / n_t
/// ```
///
/// - `wx`: `[B, T, 4D]` (`W x + b`, gate-major, head-major within); `r`: `[H, d_h, 4·d_h]`;
///   `h0`, `c0`, `n0`, `m0`: `[B, D]`
/// - returns `[B, T·D + 3D]`: `h_1..h_T` flattened, then the final `c`, `n`, `m`
pub fn slstm_cell(wx: Tensor<3>, r: Tensor<3>, [h0, c0, n0, m0]: [Tensor<2>; 4]) -> Tensor<2> {
    let heads = r.dims()[0];
    #[cfg(feature = "wgpu")]
    if crate::gpu::cube_device(&wx.device()).is_some() {
        return Tensor::from_dispatch(<Dispatch as crate::gpu::CubeOps>::slstm_cell(
            wx.into_dispatch(),
            r.into_dispatch(),
            h0.into_dispatch(),
            c0.into_dispatch(),
            n0.into_dispatch(),
            m0.into_dispatch(),
            heads,
        ));
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::slstm_cell(
        wx.into_dispatch(),
        r.into_dispatch(),
        h0.into_dispatch(),
        c0.into_dispatch(),
        n0.into_dispatch(),
        m0.into_dispatch(),
        heads,
    ))
}

/// Causal softmax attention, one op (see `attention.rs`): per row (a sequence's head),
/// `o_i = softmax_j(q_i·k_j / √K) v_j` over the keys `j ≤ S − T + i`, never holding the
/// `[T, S]` scores; the backward recomputes them one block of queries at a time.
///
/// - `q`: `[B, T, H·K]`; `k`, `v`: `[B, S, H·K]` with `S ≥ T ≥ 1` (the first `S − T` keys
///   cached), head `h` in columns `h·K..(h + 1)·K` (token-major, as the projections make them)
/// - `heads`: `H`
/// - returns `[B, T, H·K]`
pub fn causal_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        heads,
    ))
}

/// Rotary position embedding, one op (see `rope.rs`): each head of each token turned pairwise
/// by its position's angles, the definition's `attention::rotate`.
///
/// - `x`: `[B, T, H·K]`, token `t` at position `offset + t`; `head`: `K`, even
/// - returns `[B, T, H·K]`
pub fn rope(x: Tensor<3>, head: usize, offset: usize) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::rope(
        x.into_dispatch(),
        head,
        offset,
    ))
}

/// RWKV's token shift, interpolation, projection and activation, one op (see `mix.rs`):
///
/// ```text
/// y_t = act((x'_t + (x_t − x'_t) ⊙ μ) W)      x'_t = x_{t−1}, x'_1 = shift
/// ```
///
/// - `x`: `[B, T, D_in]`, `T ≥ 1`; `shift`: `[B, D_in]`; `mu`: `[D_in]`; `w`: `[D_in, D_out]`
/// - returns `[B, T, D_out]`
pub fn shift_mix_linear(
    x: Tensor<3>,
    shift: Tensor<2>,
    mu: Tensor<1>,
    w: Tensor<2>,
    act: Activation,
) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::shift_mix_linear(
        x.into_dispatch(),
        shift.into_dispatch(),
        mu.into_dispatch(),
        w.into_dispatch(),
        act,
    ))
}

/// Layer normalisation over the last axis, one op (see `layer_norm.rs`): burn's
/// `layer_norm` (biased variance, `ε` inside the root) with a hand-written backward; without
/// autodiff, the backend's own `layer_norm` op.
///
/// - `x`: `[rows, D]`; `gamma`, `beta`: `[D]`
/// - returns `[rows, D]`
pub fn layer_norm(x: Tensor<2>, gamma: Tensor<1>, beta: Tensor<1>, eps: f64) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::layer_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        eps,
    ))
}

/// The negative log-likelihood of each row's target token, one op (see `nll.rs`):
/// `−log_softmax(logits).gather(targets)`, the targets carrying no gradient.
///
/// - `logits`: `[rows, V]`; `targets`: `[rows]`, ids in `0..V`
/// - returns `[rows]`
pub fn token_nll(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::token_nll(
        logits.into_dispatch(),
        targets.float().detach().into_dispatch(),
    ))
}

/// Mamba's skip term and output gate, one op (see `gate.rs`): `(y + x ⊙ D) ⊙ SiLU(z)`.
///
/// - `y`, `x`, `z`: `[rows, C]`; `d`: `[C]`
/// - returns `[rows, C]`
pub fn skip_gate(y: Tensor<2>, x: Tensor<2>, d: Tensor<1>, z: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::skip_gate(
        y.into_dispatch(),
        x.into_dispatch(),
        d.into_dispatch(),
        z.into_dispatch(),
    ))
}

/// A linear layer, one op under autodiff (see `linear.rs`): `x W + b`.
///
/// - `x`: `[rows, D_in]`; `w`: `[D_in, D_out]`; `b`: `[D_out]`
/// - returns `[rows, D_out]`
pub fn linear(x: Tensor<2>, w: Tensor<2>, b: Tensor<1>) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::linear(
        x.into_dispatch(),
        w.into_dispatch(),
        b.into_dispatch(),
    ))
}

/// `x.narrow(dim, start, len)` as a contiguous tensor of its own, one op on the CPU backends
/// (see `columns.rs`: its backward fills the gradient on every thread), burn's `narrow` (a view)
/// elsewhere. What cuts a sequence's outputs from the final state a kernel returns beside them.
pub fn narrow<const D: usize>(x: Tensor<D>, dim: usize, start: usize, len: usize) -> Tensor<D> {
    if !has_kernel(&x.device()) {
        return x.narrow(dim, start, len);
    }
    let dims = x.dims();
    let rows = dims[..dim].iter().product::<usize>();
    let inner = dims[dim + 1..].iter().product::<usize>();
    let columns = <Dispatch as FusedOps>::columns(
        x.reshape([rows, dims[dim] * inner]).into_dispatch(),
        start * inner,
        len * inner,
    );
    let mut out = dims;
    out[dim] = len;
    Tensor::<2>::from_dispatch(columns).reshape(out)
}

/// The output `[B·H, T·W + M·N]` of a recurrence over sequence-heads (`delta_rule`, `wkv6`,
/// `dplr`, `ssd`: each row's outputs, then its final state) as the outputs `[B, H, T, W]` and
/// the final states `[B, H, M, N]`, for `dims = [B, H, T, W]` and `state = [M, N]`.
pub fn split_heads(
    out: Tensor<2>,
    [b, h, t, w]: [usize; 4],
    [m, n]: [usize; 2],
) -> (Tensor<4>, Tensor<4>) {
    let outputs = narrow(out.clone(), 1, 0, t * w).reshape([b, h, t, w]);
    (outputs, out.narrow(1, t * w, m * n).reshape([b, h, m, n]))
}

/// Softplus, one op (see `softplus.rs`): burn's `softplus(x, 1)` with vectorised transcendentals.
pub fn softplus<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::softplus(x.into_dispatch()))
}

#[backend_extension(
    Autodiff,
    NdArray: cfg(feature = "ndarray"),
    Flex: cfg(feature = "flex")
)]
pub trait FusedOps: Backend {
    #[allow(clippy::too_many_arguments)]
    fn cell_scan(
        x: FloatTensor<Self>,
        w_i: FloatTensor<Self>,
        b_i: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b_h: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        cell: Cell,
    ) -> FloatTensor<Self> {
        run_plain::<Self, CellScan, 7>([x, w_i, b_i, w_h, b_h, h0, c0], cell)
    }

    fn selective_scan(
        delta: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self> {
        run_plain::<Self, Selective, 6>([delta, x, a, b, c, h0], eigenvalues)
    }

    fn conv_silu(
        window: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<Self, ConvSilu, 3>([window, weight, bias], ())
    }

    fn wkv4(
        w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        p: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<Self, Wkv4, 7>([w, u, k, v, a, b, p], ())
    }

    fn min_rnn(pre: FloatTensor<Self>, h0: FloatTensor<Self>, kind: MinRnn) -> FloatTensor<Self> {
        run_plain::<Self, MinScan, 2>([pre, h0], kind)
    }

    fn delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        g: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<Self, DeltaRule, 6>([q, k, v, beta, g, s0], ())
    }

    fn wkv6(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<Self, Wkv6, 6>([r, k, v, log_w, u, s0], ())
    }

    #[allow(clippy::too_many_arguments)]
    fn ssd(
        x: FloatTensor<Self>,
        log_a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        heads: usize,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self> {
        run_plain::<Self, Ssd, 5>([x, log_a, b, c, h0], (heads, eigenvalues))
    }

    #[allow(clippy::too_many_arguments)]
    fn dplr(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<Self, Dplr, 7>([r, k, v, log_w, a, b, s0], ())
    }

    #[allow(clippy::too_many_arguments)]
    fn mlstm_cell(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        i: FloatTensor<Self>,
        log_f: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<Self, MlstmCell, 8>([q, k, v, i, log_f, c0, n0, m0], ())
    }

    #[allow(clippy::too_many_arguments)]
    fn slstm_cell(
        wx: FloatTensor<Self>,
        r: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        run_plain::<Self, SlstmCell, 6>([wx, r, h0, c0, n0, m0], heads)
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        run_plain::<Self, CausalAttention, 3>([q, k, v], heads)
    }

    fn rope(x: FloatTensor<Self>, head: usize, offset: usize) -> FloatTensor<Self> {
        run_plain::<Self, Rotary, 1>([x], (head, offset))
    }

    fn shift_mix_linear(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        mu: FloatTensor<Self>,
        w: FloatTensor<Self>,
        act: Activation,
    ) -> FloatTensor<Self> {
        run_plain::<Self, ShiftMix, 4>([x, shift, mu, w], act)
    }

    /// Without autodiff, the backend's own `layer_norm`: flex's is already one op on every
    /// thread, and a host kernel would only add the copies in and out.
    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        <Self as burn::backend::ops::ModuleOps<Self>>::layer_norm(x, gamma, Some(beta), eps)
    }

    fn token_nll(logits: FloatTensor<Self>, targets: FloatTensor<Self>) -> FloatTensor<Self> {
        run_plain::<Self, TokenNll, 2>([logits, targets], ())
    }

    fn skip_gate(
        y: FloatTensor<Self>,
        x: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<Self, SkipGate, 4>([y, x, d, z], ())
    }

    fn softplus(x: FloatTensor<Self>) -> FloatTensor<Self> {
        run_plain::<Self, Softplus, 1>([x], ())
    }

    fn columns(x: FloatTensor<Self>, start: usize, len: usize) -> FloatTensor<Self> {
        run_plain::<Self, Columns, 1>([x], (start, len))
    }

    /// Without autodiff, the backend's own `linear`: one product and a bias add, and a host
    /// kernel would only add the copies in and out.
    fn linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        <Self as burn::backend::ops::ModuleOps<Self>>::linear(x, w, Some(b))
    }
}

#[cfg(feature = "ndarray")]
impl FusedOps for burn::backend::NdArray {}

#[cfg(feature = "flex")]
impl FusedOps for burn::backend::Flex {}

impl<B: Backend, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn cell_scan(
        x: FloatTensor<Self>,
        w_i: FloatTensor<Self>,
        b_i: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b_h: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        cell: Cell,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, CellScan, 7>([x, w_i, b_i, w_h, b_h, h0, c0], cell)
    }

    fn selective_scan(
        delta: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, Selective, 6>([delta, x, a, b, c, h0], eigenvalues)
    }

    fn conv_silu(
        window: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, ConvSilu, 3>([window, weight, bias], ())
    }

    fn wkv4(
        w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        p: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, Wkv4, 7>([w, u, k, v, a, b, p], ())
    }

    fn min_rnn(pre: FloatTensor<Self>, h0: FloatTensor<Self>, kind: MinRnn) -> FloatTensor<Self> {
        run_tracked::<B, C, MinScan, 2>([pre, h0], kind)
    }

    fn delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        g: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, DeltaRule, 6>([q, k, v, beta, g, s0], ())
    }

    fn wkv6(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, Wkv6, 6>([r, k, v, log_w, u, s0], ())
    }

    #[allow(clippy::too_many_arguments)]
    fn ssd(
        x: FloatTensor<Self>,
        log_a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        heads: usize,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, Ssd, 5>([x, log_a, b, c, h0], (heads, eigenvalues))
    }

    #[allow(clippy::too_many_arguments)]
    fn dplr(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, Dplr, 7>([r, k, v, log_w, a, b, s0], ())
    }

    #[allow(clippy::too_many_arguments)]
    fn mlstm_cell(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        i: FloatTensor<Self>,
        log_f: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, MlstmCell, 8>([q, k, v, i, log_f, c0, n0, m0], ())
    }

    #[allow(clippy::too_many_arguments)]
    fn slstm_cell(
        wx: FloatTensor<Self>,
        r: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, SlstmCell, 6>([wx, r, h0, c0, n0, m0], heads)
    }

    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, CausalAttention, 3>([q, k, v], heads)
    }

    fn rope(x: FloatTensor<Self>, head: usize, offset: usize) -> FloatTensor<Self> {
        run_tracked::<B, C, Rotary, 1>([x], (head, offset))
    }

    fn shift_mix_linear(
        x: FloatTensor<Self>,
        shift: FloatTensor<Self>,
        mu: FloatTensor<Self>,
        w: FloatTensor<Self>,
        act: Activation,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, ShiftMix, 4>([x, shift, mu, w], act)
    }

    fn layer_norm(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        eps: f64,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, LayerNorm, 3>([x, gamma, beta], eps)
    }

    fn token_nll(logits: FloatTensor<Self>, targets: FloatTensor<Self>) -> FloatTensor<Self> {
        run_tracked::<B, C, TokenNll, 2>([logits, targets], ())
    }

    fn skip_gate(
        y: FloatTensor<Self>,
        x: FloatTensor<Self>,
        d: FloatTensor<Self>,
        z: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, SkipGate, 4>([y, x, d, z], ())
    }

    fn softplus(x: FloatTensor<Self>) -> FloatTensor<Self> {
        run_tracked::<B, C, Softplus, 1>([x], ())
    }

    fn columns(x: FloatTensor<Self>, start: usize, len: usize) -> FloatTensor<Self> {
        run_tracked::<B, C, Columns, 1>([x], (start, len))
    }

    fn linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, Linear, 3>([x, w, b], ())
    }
}
