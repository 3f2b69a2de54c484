//! Mamba's selective scan (S6) with its output contraction on the GPU: one launch forward, one
//! backward (plus burn's sums of the per-channel partials), whatever `T`. The equations are the
//! CPU kernel's (`fused/selective.rs`):
//!
//! ```text
//! h_t = a_t ⊙ h_{t−1} + (Δ_t ⊙ x_t) ⊗ B_t              h [B, M, N]
//! a_t = s·exp(Δ_t A) + o                                 (s, o) = (1, 0), or (2, −1) signed
//! y_t = h_t C_t                                          (contract N)
//! ```
//!
//! One unit per channel `m` of a sequence, its `N` states in registers, the time loop inside;
//! neighbouring channels in neighbouring units, so a step's `Δ`, `x` and `y` are contiguous and
//! its `B_t`, `C_t` are the same for every unit of a sequence. A tracked forward writes every
//! `h_t` (`[B, T, M, N]`), which the backward reads walking time in reverse. The gradients of
//! `B` and `C` are sums over the channels and `A`'s a sum over sequences and steps: each unit
//! writes its own share (`A`'s summed over its steps in registers) and burn sums them, so no
//! unit waits for another and no float atomics are needed.

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::tensors::{dims, elementwise, empty, input, reshape};
use super::tracked::CubeKernel;
use crate::scan::Eigenvalues;

/// `delta`, `x [B, T, M]`, `a [M, N]`, `b`, `c [B, T, N]`, `h0 [B, M, N]` → `out [B, T·M + M·N]`
/// and, when `save`, `states [B, T, M, N]`. Unit `b·M + m` runs channel `m` of sequence `b`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    delta: &Tensor<f32>,
    x: &Tensor<f32>,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    c: &Tensor<f32>,
    h0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    states: &mut Tensor<f32>,
    scale: f32,
    offset: f32,
    #[comptime] n: usize,
    #[comptime] save: bool,
) {
    let pos = ABSOLUTE_POS;
    let len = delta.shape(1);
    let channels = delta.shape(2);
    if pos >= delta.shape(0) * channels {
        terminate!();
    }
    let seq = pos / channels;
    let m = pos % channels;
    let width = out.shape(1);
    let mut h = Array::<f32>::new(n);
    for k in 0..n {
        h[k] = h0[pos * n + k];
    }
    for t in 0..len {
        let i = (seq * len + t) * channels + m;
        let dt = delta[i];
        let drive = dt * x[i];
        let bc = (seq * len + t) * n;
        let mut y = 0.0f32;
        for k in 0..n {
            let decay = scale * (dt * a[m * n + k]).exp() + offset;
            h[k] = decay * h[k] + drive * b[bc + k];
            y += h[k] * c[bc + k];
            if comptime![save] {
                states[i * n + k] = h[k];
            }
        }
        out[seq * width + t * channels + m] = y;
    }
    for k in 0..n {
        out[seq * width + len * channels + m * n + k] = h[k];
    }
}

/// Given `d_out [B, T·M + M·N]`: `d_delta`, `d_x [B, T, M]`, `d_h0 [B, M, N]`, and the shares
/// `d_b_parts`, `d_c_parts [B, T, M, N]` (summed over `M` after) and `d_a_parts [B, M, N]`
/// (summed over `B` after).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    delta: &Tensor<f32>,
    x: &Tensor<f32>,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    c: &Tensor<f32>,
    h0: &Tensor<f32>,
    states: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_delta: &mut Tensor<f32>,
    d_x: &mut Tensor<f32>,
    d_h0: &mut Tensor<f32>,
    d_a_parts: &mut Tensor<f32>,
    d_b_parts: &mut Tensor<f32>,
    d_c_parts: &mut Tensor<f32>,
    scale: f32,
    offset: f32,
    #[comptime] n: usize,
) {
    let pos = ABSOLUTE_POS;
    let len = delta.shape(1);
    let channels = delta.shape(2);
    if pos >= delta.shape(0) * channels {
        terminate!();
    }
    let seq = pos / channels;
    let m = pos % channels;
    let width = d_out.shape(1);
    // dL/dh_t carried back from step t + 1, and this channel's share of dA.
    let mut dh = Array::<f32>::new(n);
    let mut da = Array::<f32>::new(n);
    for k in 0..n {
        dh[k] = d_out[seq * width + len * channels + m * n + k];
        da[k] = 0.0;
    }
    for r in 0..len {
        let t = len - 1 - r;
        let i = (seq * len + t) * channels + m;
        let dt = delta[i];
        let xv = x[i];
        let dy = d_out[seq * width + t * channels + m];
        let bc = (seq * len + t) * n;
        let mut g_dt = 0.0f32;
        let mut g_drive = 0.0f32;
        for k in 0..n {
            let mut h_prev = h0[pos * n + k];
            if t > 0 {
                h_prev = states[(i - channels) * n + k];
            }
            d_c_parts[i * n + k] = dy * states[i * n + k];
            let g = dh[k] + dy * c[bc + k];
            let e = (dt * a[m * n + k]).exp();
            let g_log = g * h_prev * scale * e;
            g_dt += g_log * a[m * n + k];
            da[k] += g_log * dt;
            g_drive += g * b[bc + k];
            d_b_parts[i * n + k] = g * dt * xv;
            dh[k] = g * (scale * e + offset);
        }
        d_delta[i] = g_dt + g_drive * xv;
        d_x[i] = g_drive * dt;
    }
    for k in 0..n {
        d_h0[pos * n + k] = dh[k];
        d_a_parts[pos * n + k] = da[k];
    }
}

/// The inputs and the states a tracked forward wrote.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    inputs: [CubeTensor; 6],
    states: CubeTensor,
}

/// The op: inputs `[delta, x, a, b, c, h0]`, output `[B, T·M + M·N]`.
#[derive(Debug)]
pub(super) struct Selective;

impl CubeKernel<6> for Selective {
    type Args = Eigenvalues;
    type Saved = Kept;

    fn forward(
        inputs: [CubeTensor; 6],
        eigenvalues: Eigenvalues,
        keep: bool,
    ) -> (CubeTensor, Option<Kept>) {
        let [delta, x, a, b, c, h0] = inputs.map(|t| input(t, "selective_scan"));
        let [batch, len, channels] = dims::<3>(&delta);
        let [_, n] = dims::<2>(&a);
        assert!(len >= 1, "selective_scan needs T ≥ 1");
        assert_eq!(dims::<3>(&x), [batch, len, channels], "x is [B, T, M]");
        assert_eq!(dims::<2>(&a), [channels, n], "A is [M, N]");
        assert_eq!(dims::<3>(&b), [batch, len, n], "B is [B, T, N]");
        assert_eq!(dims::<3>(&c), [batch, len, n], "C is [B, T, N]");
        assert_eq!(dims::<3>(&h0), [batch, channels, n], "h0 is [B, M, N]");
        let out = empty(&delta, [batch, len * channels + channels * n]);
        let states = empty(
            &delta,
            if keep {
                vec![batch, len, channels, n]
            } else {
                vec![1]
            },
        );
        let (scale, offset) = eigenvalues.affine();
        let (cubes, dim) = elementwise(&delta, batch * channels);
        forward_kernel::launch(
            &delta.client.clone(),
            cubes,
            dim,
            delta.clone().into_tensor_arg(),
            x.clone().into_tensor_arg(),
            a.clone().into_tensor_arg(),
            b.clone().into_tensor_arg(),
            c.clone().into_tensor_arg(),
            h0.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            states.clone().into_tensor_arg(),
            scale,
            offset,
            n,
            keep,
        );
        let kept = keep.then(|| Kept {
            inputs: [delta, x, a, b, c, h0],
            states,
        });
        (out, kept)
    }

    fn backward(kept: Kept, eigenvalues: Eigenvalues, d_out: CubeTensor) -> [CubeTensor; 6] {
        let Kept { inputs, states } = kept;
        let [delta, x, a, b, c, h0] = inputs;
        let d_out = input(d_out, "selective_scan's output gradient");
        let [batch, len, channels] = dims::<3>(&delta);
        let [_, n] = dims::<2>(&a);
        let d_delta = empty(&delta, [batch, len, channels]);
        let d_x = empty(&delta, [batch, len, channels]);
        let d_h0 = empty(&delta, [batch, channels, n]);
        let d_a_parts = empty(&delta, [batch, channels, n]);
        let d_b_parts = empty(&delta, [batch, len, channels, n]);
        let d_c_parts = empty(&delta, [batch, len, channels, n]);
        let (scale, offset) = eigenvalues.affine();
        let (cubes, dim) = elementwise(&delta, batch * channels);
        backward_kernel::launch(
            &delta.client.clone(),
            cubes,
            dim,
            delta.into_tensor_arg(),
            x.into_tensor_arg(),
            a.into_tensor_arg(),
            b.into_tensor_arg(),
            c.into_tensor_arg(),
            h0.into_tensor_arg(),
            states.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_delta.clone().into_tensor_arg(),
            d_x.clone().into_tensor_arg(),
            d_h0.clone().into_tensor_arg(),
            d_a_parts.clone().into_tensor_arg(),
            d_b_parts.clone().into_tensor_arg(),
            d_c_parts.clone().into_tensor_arg(),
            scale,
            offset,
            n,
        );
        use burn::backend::ops::FloatTensorOps;
        let over_channels =
            |parts: CubeTensor| reshape(CubeBackend::float_sum_dim(parts, 2), [batch, len, n]);
        [
            d_delta,
            d_x,
            reshape(CubeBackend::float_sum_dim(d_a_parts, 0), [channels, n]),
            over_channels(d_b_parts),
            over_channels(d_c_parts),
            d_h0,
        ]
    }
}
