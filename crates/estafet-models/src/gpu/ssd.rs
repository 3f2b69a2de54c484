//! Mamba-2's SSD recurrence on the GPU: one launch forward, one backward (plus burn's sums of
//! the per-channel shares), whatever `T`. The equations are the CPU kernel's (`fused/ssd.rs`),
//! per sequence-head with a state `h [P, N]`:
//!
//! ```text
//! a_t = s·exp(log_a_t) + o        (s, o) = (1, 0), or (2, −1) with signed eigenvalues
//! h_t = a_t h_{t−1} + x_t B_tᵀ    x_t = Δ_t x_t [P], B_t [N]
//! y_t = h_t C_t                   [P]
//! ```
//!
//! Row `i` of `h` evolves on its own, so each is one unit with its `N` values in registers and
//! the time loop inside (Mamba's selective scan with one decay per head). A tracked forward
//! writes every `h_t`; the backward walks time in reverse from them. `B` and `C` are shared by
//! the rows and the heads of a sequence and `a` by the rows of a head: each unit writes its
//! share of their gradients and burn sums them.

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::tensors::{dims, elementwise, empty, input, reshape};
use super::tracked::CubeKernel;
use crate::scan::Eigenvalues;

/// `x [R, T, P]`, `log_a [R, T]`, `b`, `c [B, T, N]` (row `r` reads sequence `r / heads`),
/// `h0 [R, P, N]` → `out [R, T·P + P·N]` and, when `save`, `states [R, T, P, N]`. Unit `r·P + i`
/// runs row `i` of sequence-head `r`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    x: &Tensor<f32>,
    log_a: &Tensor<f32>,
    b: &Tensor<f32>,
    c: &Tensor<f32>,
    h0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    states: &mut Tensor<f32>,
    heads: u32,
    scale: f32,
    offset: f32,
    #[comptime] n: usize,
    #[comptime] save: bool,
) {
    let pos = ABSOLUTE_POS;
    let len = x.shape(1);
    let p = x.shape(2);
    if pos >= x.shape(0) * p {
        terminate!();
    }
    let r = pos / p;
    let i = pos % p;
    let seq = r / heads as usize;
    let width = out.shape(1);
    let mut h = Array::<f32>::new(n);
    for j in 0..n {
        h[j] = h0[pos * n + j];
    }
    for t in 0..len {
        let row = r * len + t;
        let a = scale * log_a[row].exp() + offset;
        let xi = x[row * p + i];
        let bc = (seq * len + t) * n;
        let mut y = 0.0f32;
        for j in 0..n {
            h[j] = a * h[j] + xi * b[bc + j];
            y += h[j] * c[bc + j];
            if comptime![save] {
                states[(row * p + i) * n + j] = h[j];
            }
        }
        out[r * width + t * p + i] = y;
    }
    for j in 0..n {
        out[r * width + len * p + i * n + j] = h[j];
    }
}

/// Given `d_out [R, T·P + P·N]`: `d_x [R, T, P]`, `d_h0 [R, P, N]`, and each unit's shares
/// `d_log_a_parts [R, T, P]`, `d_b_parts`, `d_c_parts [R, T, P, N]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    x: &Tensor<f32>,
    log_a: &Tensor<f32>,
    b: &Tensor<f32>,
    c: &Tensor<f32>,
    h0: &Tensor<f32>,
    states: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_x: &mut Tensor<f32>,
    d_h0: &mut Tensor<f32>,
    d_log_a_parts: &mut Tensor<f32>,
    d_b_parts: &mut Tensor<f32>,
    d_c_parts: &mut Tensor<f32>,
    heads: u32,
    scale: f32,
    offset: f32,
    #[comptime] n: usize,
) {
    let pos = ABSOLUTE_POS;
    let len = x.shape(1);
    let p = x.shape(2);
    if pos >= x.shape(0) * p {
        terminate!();
    }
    let r = pos / p;
    let i = pos % p;
    let seq = r / heads as usize;
    let width = d_out.shape(1);
    let mut dh = Array::<f32>::new(n);
    for j in 0..n {
        dh[j] = d_out[r * width + len * p + i * n + j];
    }
    for back in 0..len {
        let t = len - 1 - back;
        let row = r * len + t;
        let e = scale * log_a[row].exp();
        let a = e + offset;
        let xi = x[row * p + i];
        let d_y = d_out[r * width + t * p + i];
        let bc = (seq * len + t) * n;
        let unit = (row * p + i) * n;
        let mut d_xi = 0.0f32;
        let mut d_a = 0.0f32;
        for j in 0..n {
            let mut prev = h0[pos * n + j];
            if t > 0 {
                prev = states[((row - 1) * p + i) * n + j];
            }
            d_c_parts[unit + j] = states[unit + j] * d_y;
            dh[j] += d_y * c[bc + j];
            d_xi += dh[j] * b[bc + j];
            d_b_parts[unit + j] = dh[j] * xi;
            d_a += dh[j] * prev;
            dh[j] *= a;
        }
        d_x[row * p + i] = d_xi;
        d_log_a_parts[row * p + i] = e * d_a;
    }
    for j in 0..n {
        d_h0[pos * n + j] = dh[j];
    }
}

/// The inputs and the states a tracked forward wrote.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    inputs: [CubeTensor; 5],
    states: CubeTensor,
}

/// The op: inputs `[x, log_a, b, c, h0]`, output `[R, T·P + P·N]`; arguments: the heads per
/// sequence and the transitions' range.
#[derive(Debug)]
pub(super) struct Ssd;

impl CubeKernel<5> for Ssd {
    type Args = (usize, Eigenvalues);
    type Saved = Kept;

    fn forward(
        inputs: [CubeTensor; 5],
        (heads, eigenvalues): (usize, Eigenvalues),
        keep: bool,
    ) -> (CubeTensor, Option<Kept>) {
        let [x, log_a, b, c, h0] = inputs.map(|t| input(t, "ssd"));
        let [rows, len, p] = dims::<3>(&x);
        let [batch, _, n] = dims::<3>(&b);
        assert!(len >= 1, "ssd needs T ≥ 1");
        assert_eq!(rows, batch * heads, "x has B·H rows");
        assert_eq!(dims::<2>(&log_a), [rows, len], "log_a is [B·H, T]");
        assert_eq!(dims::<3>(&c), [batch, len, n], "C is [B, T, N]");
        assert_eq!(dims::<3>(&h0), [rows, p, n], "h0 is [B·H, P, N]");
        let out = empty(&x, [rows, len * p + p * n]);
        let states = empty(&x, if keep { vec![rows, len, p, n] } else { vec![1] });
        let (scale, offset) = eigenvalues.affine();
        let (cubes, dim) = elementwise(&x, rows * p);
        forward_kernel::launch(
            &x.client.clone(),
            cubes,
            dim,
            x.clone().into_tensor_arg(),
            log_a.clone().into_tensor_arg(),
            b.clone().into_tensor_arg(),
            c.clone().into_tensor_arg(),
            h0.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            states.clone().into_tensor_arg(),
            heads as u32,
            scale,
            offset,
            n,
            keep,
        );
        let kept = keep.then(|| Kept {
            inputs: [x, log_a, b, c, h0],
            states,
        });
        (out, kept)
    }

    fn backward(
        kept: Kept,
        (heads, eigenvalues): (usize, Eigenvalues),
        d_out: CubeTensor,
    ) -> [CubeTensor; 5] {
        let Kept { inputs, states } = kept;
        let [x, log_a, b, c, h0] = inputs;
        let d_out = input(d_out, "ssd's output gradient");
        let [rows, len, p] = dims::<3>(&x);
        let [batch, _, n] = dims::<3>(&b);
        let d_x = empty(&x, [rows, len, p]);
        let d_h0 = empty(&x, [rows, p, n]);
        let d_log_a_parts = empty(&x, [rows, len, p]);
        let d_b_parts = empty(&x, [rows, len, p, n]);
        let d_c_parts = empty(&x, [rows, len, p, n]);
        let (scale, offset) = eigenvalues.affine();
        let (cubes, dim) = elementwise(&x, rows * p);
        backward_kernel::launch(
            &x.client.clone(),
            cubes,
            dim,
            x.into_tensor_arg(),
            log_a.into_tensor_arg(),
            b.into_tensor_arg(),
            c.into_tensor_arg(),
            h0.into_tensor_arg(),
            states.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_x.clone().into_tensor_arg(),
            d_h0.clone().into_tensor_arg(),
            d_log_a_parts.clone().into_tensor_arg(),
            d_b_parts.clone().into_tensor_arg(),
            d_c_parts.clone().into_tensor_arg(),
            heads as u32,
            scale,
            offset,
            n,
        );
        use burn::backend::ops::FloatTensorOps;
        // Over the rows of each head, then over the heads of each sequence.
        let shared = |parts| {
            let per_head = CubeBackend::float_sum_dim(parts, 2); // [R, T, 1, N]
            let per_seq = reshape(per_head, [batch, heads, len, n]);
            reshape(CubeBackend::float_sum_dim(per_seq, 1), [batch, len, n])
        };
        [
            d_x,
            reshape(CubeBackend::float_sum_dim(d_log_a_parts, 2), [rows, len]),
            shared(d_b_parts),
            shared(d_c_parts),
            d_h0,
        ]
    }
}
