//! RWKV-6's WKV on the GPU: one launch forward, one backward (plus burn's sums of the
//! per-column shares), whatever `T`. The equations are the CPU kernel's (`fused/wkv6.rs`), per
//! sequence-head `r` with a state `S [K, V]`:
//!
//! ```text
//! o_t = (S_{t−1} + diag(u) k_t v_tᵀ)ᵀ r_t,   S_t = diag(w_t) S_{t−1} + k_t v_tᵀ,   w_t = exp(log_w_t)
//! ```
//!
//! Column `j` of `S` evolves on its own — `S_t[:, j] = w_t ⊙ S_{t−1}[:, j] + k_t v_t[j]` — and
//! `o_t[j]` reads that column alone, so each is one unit with its `K` values in registers, the
//! time loop inside. A tracked forward writes every `S_t` (`[R, T, K, V]`), which the backward
//! reads walking time in reverse. The backward's sums over columns (`∂r`, `∂k`, `∂log_w`, `∂u`)
//! are written as each column's share and summed by burn, so no unit waits for another:
//!
//! ```text
//! share of column j:  ∂r_t = S_{t−1}[:, j] ∂o_j + u ⊙ k_t c_j,   ∂k_t = ∂S_t[:, j] v_j + r_t ⊙ u c_j,
//!                     ∂log_w_t = w_t ⊙ ∂S_t[:, j] ⊙ S_{t−1}[:, j],   ∂u = Σ_t r_t ⊙ k_t c_j
//! its own:            ∂v_t[j] = (Σ_i r_i u_i k_i) ∂o_j + ∂S_t[:, j]·k_t,   ∂S_{t−1}[:, j] = w_t ⊙ ∂S_t[:, j] + r_t ∂o_j
//! ```
//!
//! with `c_j = ∂o_t[j] v_t[j]`.

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::tensors::{dims, elementwise, empty, input, reshape};
use super::tracked::CubeKernel;

/// `r`, `k`, `log_w [R, T, K]`, `v [R, T, V]`, `u [R, K]`, `s0 [R, K, V]` → `out [R, T·V + K·V]`
/// and, when `save`, `states [R, T, K, V]`. Unit `r·V + j` runs column `j` of row `r`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    r: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    log_w: &Tensor<f32>,
    u: &Tensor<f32>,
    s0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    states: &mut Tensor<f32>,
    #[comptime] dk: usize,
    #[comptime] save: bool,
) {
    let pos = ABSOLUTE_POS;
    let len = v.shape(1);
    let dv = v.shape(2);
    if pos >= v.shape(0) * dv {
        terminate!();
    }
    let row_head = pos / dv;
    let j = pos % dv;
    let width = out.shape(1);
    let mut s = Array::<f32>::new(dk);
    for i in 0..dk {
        s[i] = s0[(row_head * dk + i) * dv + j];
    }
    for t in 0..len {
        let row = row_head * len + t;
        let v_j = v[row * dv + j];
        let mut o = 0.0f32;
        for i in 0..dk {
            let r_i = r[row * dk + i];
            let k_i = k[row * dk + i];
            o += r_i * (s[i] + u[row_head * dk + i] * k_i * v_j);
            s[i] = log_w[row * dk + i].exp() * s[i] + k_i * v_j;
            if comptime![save] {
                states[(row * dk + i) * dv + j] = s[i];
            }
        }
        out[row_head * width + t * dv + j] = o;
    }
    for i in 0..dk {
        out[row_head * width + len * dv + i * dv + j] = s[i];
    }
}

/// Given `d_out [R, T·V + K·V]`: `d_v [R, T, V]`, `d_s0 [R, K, V]`, and each column's shares
/// `d_r_parts`, `d_k_parts`, `d_lw_parts [R, T, V, K]` and `d_u_parts [R, V, K]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    r: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    log_w: &Tensor<f32>,
    u: &Tensor<f32>,
    s0: &Tensor<f32>,
    states: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_v: &mut Tensor<f32>,
    d_s0: &mut Tensor<f32>,
    d_r_parts: &mut Tensor<f32>,
    d_k_parts: &mut Tensor<f32>,
    d_lw_parts: &mut Tensor<f32>,
    d_u_parts: &mut Tensor<f32>,
    #[comptime] dk: usize,
) {
    let pos = ABSOLUTE_POS;
    let len = v.shape(1);
    let dv = v.shape(2);
    if pos >= v.shape(0) * dv {
        terminate!();
    }
    let row_head = pos / dv;
    let j = pos % dv;
    let width = d_out.shape(1);
    // ∂S_t[:, j], carried back from step t + 1, and this column's share of ∂u.
    let mut ds = Array::<f32>::new(dk);
    let mut du = Array::<f32>::new(dk);
    for i in 0..dk {
        ds[i] = d_out[row_head * width + len * dv + i * dv + j];
        du[i] = 0.0;
    }
    for back in 0..len {
        let t = len - 1 - back;
        let row = row_head * len + t;
        let d_o = d_out[row_head * width + t * dv + j];
        let v_j = v[row * dv + j];
        let c = d_o * v_j;
        let part = (row * dv + j) * dk;
        let mut bonus = 0.0f32;
        let mut dv_j = 0.0f32;
        for i in 0..dk {
            let r_i = r[row * dk + i];
            let k_i = k[row * dk + i];
            let u_i = u[row_head * dk + i];
            let w_i = log_w[row * dk + i].exp();
            let mut prev = s0[(row_head * dk + i) * dv + j];
            if t > 0 {
                prev = states[((row - 1) * dk + i) * dv + j];
            }
            bonus += r_i * u_i * k_i;
            dv_j += ds[i] * k_i;
            d_r_parts[part + i] = prev * d_o + u_i * k_i * c;
            d_k_parts[part + i] = ds[i] * v_j + r_i * u_i * c;
            d_lw_parts[part + i] = w_i * ds[i] * prev;
            du[i] += r_i * k_i * c;
            ds[i] = w_i * ds[i] + r_i * d_o;
        }
        d_v[row * dv + j] = bonus * d_o + dv_j;
    }
    for i in 0..dk {
        d_s0[(row_head * dk + i) * dv + j] = ds[i];
        d_u_parts[(row_head * dv + j) * dk + i] = du[i];
    }
}

/// The inputs and the states a tracked forward wrote.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    inputs: [CubeTensor; 6],
    states: CubeTensor,
}

/// The op: inputs `[r, k, v, log_w, u, s0]`, output `[R, T·V + K·V]`.
#[derive(Debug)]
pub(super) struct Wkv6;

impl CubeKernel<6> for Wkv6 {
    type Args = ();
    type Saved = Kept;

    fn forward(inputs: [CubeTensor; 6], (): (), keep: bool) -> (CubeTensor, Option<Kept>) {
        let [r, k, v, log_w, u, s0] = inputs.map(|t| input(t, "wkv6"));
        let [rows, len, dk] = dims::<3>(&r);
        let dv = dims::<3>(&v)[2];
        assert!(len >= 1, "wkv6 needs T ≥ 1");
        assert_eq!(dims::<3>(&k), [rows, len, dk], "k is [R, T, K]");
        assert_eq!(dims::<3>(&log_w), [rows, len, dk], "log_w is [R, T, K]");
        assert_eq!(dims::<3>(&v), [rows, len, dv], "v is [R, T, V]");
        assert_eq!(dims::<2>(&u), [rows, dk], "u is [R, K]");
        assert_eq!(dims::<3>(&s0), [rows, dk, dv], "S_0 is [R, K, V]");
        let out = empty(&r, [rows, len * dv + dk * dv]);
        let states = empty(
            &r,
            if keep {
                vec![rows, len, dk, dv]
            } else {
                vec![1]
            },
        );
        let (cubes, dim) = elementwise(&r, rows * dv);
        forward_kernel::launch(
            &r.client.clone(),
            cubes,
            dim,
            r.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            log_w.clone().into_tensor_arg(),
            u.clone().into_tensor_arg(),
            s0.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            states.clone().into_tensor_arg(),
            dk,
            keep,
        );
        let kept = keep.then(|| Kept {
            inputs: [r, k, v, log_w, u, s0],
            states,
        });
        (out, kept)
    }

    fn backward(kept: Kept, (): (), d_out: CubeTensor) -> [CubeTensor; 6] {
        let Kept { inputs, states } = kept;
        let [r, k, v, log_w, u, s0] = inputs;
        let d_out = input(d_out, "wkv6's output gradient");
        let [rows, len, dk] = dims::<3>(&r);
        let dv = dims::<3>(&v)[2];
        let d_v = empty(&r, [rows, len, dv]);
        let d_s0 = empty(&r, [rows, dk, dv]);
        let d_r_parts = empty(&r, [rows, len, dv, dk]);
        let d_k_parts = empty(&r, [rows, len, dv, dk]);
        let d_lw_parts = empty(&r, [rows, len, dv, dk]);
        let d_u_parts = empty(&r, [rows, dv, dk]);
        let (cubes, dim) = elementwise(&r, rows * dv);
        backward_kernel::launch(
            &r.client.clone(),
            cubes,
            dim,
            r.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            log_w.into_tensor_arg(),
            u.into_tensor_arg(),
            s0.into_tensor_arg(),
            states.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_v.clone().into_tensor_arg(),
            d_s0.clone().into_tensor_arg(),
            d_r_parts.clone().into_tensor_arg(),
            d_k_parts.clone().into_tensor_arg(),
            d_lw_parts.clone().into_tensor_arg(),
            d_u_parts.clone().into_tensor_arg(),
            dk,
        );
        use burn::backend::ops::FloatTensorOps;
        let vectors = |parts| reshape(CubeBackend::float_sum_dim(parts, 2), [rows, len, dk]);
        [
            vectors(d_r_parts),
            vectors(d_k_parts),
            d_v,
            vectors(d_lw_parts),
            reshape(CubeBackend::float_sum_dim(d_u_parts, 1), [rows, dk]),
            d_s0,
        ]
    }
}
