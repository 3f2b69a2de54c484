//! minGRU's and minLSTM's recurrence after their input projection on the GPU: one launch
//! forward, one backward, whatever `T`. The equations are the CPU kernel's (`fused/min_rnn.rs`):
//!
//! ```text
//! h̃_t = g(v_t),  g(v) = v + ½ if v ≥ 0 else σ(v)
//! minGRU:   z_t = σ(k_t)                                  a_t = 1 − z_t,  b_t = z_t h̃_t
//! minLSTM:  f_t = σ(k_f,t), i_t = σ(k_i,t), s_t = f_t + i_t   a_t = f_t / s_t,  b_t = (i_t / s_t) h̃_t
//! h_t = a_t ⊙ h_{t−1} + b_t
//! ```
//!
//! Every channel of every sequence is independent, so each is one unit with its state in a
//! register and the time loop inside: `B·H` units, neighbouring channels in neighbouring units so
//! that each step's reads and writes are contiguous. The backward is the same grid walking time
//! in reverse with `δ_t = ∂L/∂h_t + a_{t+1} δ_{t+1}`, reading `h_{t−1}` from the kept outputs;
//! every gradient is per element, so no unit waits for another.

use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::activations::sigmoid;
use super::tensors::{dims, elementwise, empty, input};
use super::tracked::CubeKernel;
use crate::fused::MinRnn;

/// `g(v)`.
#[cube]
fn candidate(v: f32) -> f32 {
    let mut c = sigmoid(v);
    if v >= 0.0 {
        c = v + 0.5;
    }
    c
}

/// `g'(v)`.
#[cube]
fn candidate_slope(v: f32) -> f32 {
    let s = sigmoid(v);
    let mut d = s * (1.0 - s);
    if v >= 0.0 {
        d = 1.0;
    }
    d
}

/// `pre [B, T, G·H]`, `h0 [B, H]` → `out [B, T, H]`; unit `n·H + j` runs channel `j` of
/// sequence `n`.
#[cube(launch)]
fn forward_kernel(
    pre: &Tensor<f32>,
    h0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    #[comptime] lstm: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos >= h0.len() {
        terminate!();
    }
    let hidden = h0.shape(1);
    let n = pos / hidden;
    let j = pos % hidden;
    let len = pre.shape(1);
    let width = pre.shape(2);
    let mut h = h0[pos];
    for t in 0..len {
        let row = (n * len + t) * width;
        let c = candidate(pre[row + j]);
        let z = sigmoid(pre[row + hidden + j]);
        if comptime![lstm] {
            let i = sigmoid(pre[row + 2 * hidden + j]);
            let s = z + i;
            h = z / s * h + i / s * c;
        } else {
            h += z * (c - h);
        }
        out[(n * len + t) * hidden + j] = h;
    }
}

/// The gradients of `pre` and `h0` given `d_out`, from the forward's `out`.
#[cube(launch)]
fn backward_kernel(
    pre: &Tensor<f32>,
    h0: &Tensor<f32>,
    out: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_pre: &mut Tensor<f32>,
    d_h0: &mut Tensor<f32>,
    #[comptime] lstm: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos >= h0.len() {
        terminate!();
    }
    let hidden = h0.shape(1);
    let n = pos / hidden;
    let j = pos % hidden;
    let len = pre.shape(1);
    let width = pre.shape(2);
    // a_{t+1} δ_{t+1}: what step t + 1 passes back to h_t.
    let mut carry = 0.0f32;
    for i in 0..len {
        let t = len - 1 - i;
        let row = (n * len + t) * width;
        let o = (n * len + t) * hidden + j;
        let mut prev = h0[pos];
        if t > 0 {
            prev = out[o - hidden];
        }
        let delta = d_out[o] + carry;
        let v = pre[row + j];
        let c = candidate(v);
        let slope = candidate_slope(v);
        let z = sigmoid(pre[row + hidden + j]);
        if comptime![lstm] {
            let i = sigmoid(pre[row + 2 * hidden + j]);
            let s = z + i;
            // ∂a = δ h_{t−1}, ∂b = δ, through a = f / s and b = (i / s) h̃.
            let da = delta * prev;
            d_pre[row + j] = delta * (i / s) * slope;
            d_pre[row + hidden + j] = (da - delta * c) * (i / (s * s)) * z * (1.0 - z);
            d_pre[row + 2 * hidden + j] = (delta * c - da) * (z / (s * s)) * i * (1.0 - i);
            carry = delta * (z / s);
        } else {
            d_pre[row + j] = delta * z * slope;
            d_pre[row + hidden + j] = delta * (c - prev) * z * (1.0 - z);
            carry = delta * (1.0 - z);
        }
    }
    d_h0[pos] = carry;
}

/// The op: inputs `[pre, h0]`; kept for the backward: `pre`, `h0` and the output.
#[derive(Debug)]
pub(super) struct MinScan;

impl CubeKernel<2> for MinScan {
    type Args = MinRnn;
    type Saved = [CubeTensor; 3];

    fn forward(
        [pre, h0]: [CubeTensor; 2],
        kind: MinRnn,
        keep: bool,
    ) -> (CubeTensor, Option<Self::Saved>) {
        let (pre, h0) = (input(pre, "min_rnn pre"), input(h0, "min_rnn h0"));
        let [batch, len, width] = dims::<3>(&pre);
        let hidden = width / kind.groups();
        assert!(len >= 1, "min_rnn needs T ≥ 1");
        assert_eq!(hidden * kind.groups(), width, "the projection is G·H wide");
        assert_eq!(dims::<2>(&h0), [batch, hidden], "h0 is [B, H]");
        let out = empty(&pre, [batch, len, hidden]);
        let (cubes, dim) = elementwise(&pre, batch * hidden);
        forward_kernel::launch(
            &pre.client.clone(),
            cubes,
            dim,
            pre.clone().into_tensor_arg(),
            h0.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            kind == MinRnn::Lstm,
        );
        let saved = keep.then(|| [pre, h0, out.clone()]);
        (out, saved)
    }

    fn backward([pre, h0, out]: Self::Saved, kind: MinRnn, d_out: CubeTensor) -> [CubeTensor; 2] {
        let d_out = input(d_out, "min_rnn's output gradient");
        let d_pre = empty(&pre, dims::<3>(&pre));
        let d_h0 = empty(&h0, dims::<2>(&h0));
        let [batch, hidden] = dims::<2>(&h0);
        let (cubes, dim) = elementwise(&pre, batch * hidden);
        backward_kernel::launch(
            &pre.client.clone(),
            cubes,
            dim,
            pre.into_tensor_arg(),
            h0.into_tensor_arg(),
            out.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_pre.clone().into_tensor_arg(),
            d_h0.clone().into_tensor_arg(),
            kind == MinRnn::Lstm,
        );
        [d_pre, d_h0]
    }
}
