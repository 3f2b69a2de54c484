//! The gated delta rule (Gated DeltaNet's recurrence) on the GPU: one launch forward, one
//! backward (plus burn's sums of the per-column shares), whatever `T`. The equations are the
//! CPU kernel's (`fused/delta_rule.rs`), per sequence-head `r` with a state `S [K, V]`:
//!
//! ```text
//! P_t = α_t S_{t−1},  α_t = exp(g_t);   w_t = P_tᵀ k_t;   u_t = β_t (v_t − w_t)
//! S_t = P_t + k_t u_tᵀ;   o_t = S_tᵀ q_t
//! ```
//!
//! Column `j` of `S` evolves on its own — `S_t[:, j] = α S_{t−1}[:, j] + k_t u_t[j]` with
//! `u_t[j]` a function of that column alone — so each is one unit with its `K` values in
//! registers, the time loop inside; the units of a sequence-head read the same `q_t`, `k_t`.
//! A tracked forward writes every `S_t` (`[R, T, K, V]`), which the backward reads walking time
//! in reverse. The backward's sums over columns (`∂q`, `∂k`, `∂β`, `∂g`) are written as each
//! column's share and summed by burn, so no unit waits for another.

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::tensors::{dims, elementwise, empty, input, reshape};
use super::tracked::CubeKernel;

/// `q`, `k [R, T, K]`, `v [R, T, V]`, `beta`, `g [R, T]`, `s0 [R, K, V]` → `out [R, T·V + K·V]`
/// and, when `save`, `states [R, T, K, V]`. Unit `r·V + j` runs column `j` of row `r`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    beta: &Tensor<f32>,
    g: &Tensor<f32>,
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
    let r = pos / dv;
    let j = pos % dv;
    let width = out.shape(1);
    let mut s = Array::<f32>::new(dk);
    for i in 0..dk {
        s[i] = s0[(r * dk + i) * dv + j];
    }
    for t in 0..len {
        let row = r * len + t;
        let alpha = g[row].exp();
        let mut recalled = 0.0f32;
        for i in 0..dk {
            recalled += k[row * dk + i] * s[i];
        }
        let u = beta[row] * (v[row * dv + j] - alpha * recalled);
        let mut o = 0.0f32;
        for i in 0..dk {
            s[i] = alpha * s[i] + k[row * dk + i] * u;
            o += q[row * dk + i] * s[i];
            if comptime![save] {
                states[(row * dk + i) * dv + j] = s[i];
            }
        }
        out[r * width + t * dv + j] = o;
    }
    for i in 0..dk {
        out[r * width + len * dv + i * dv + j] = s[i];
    }
}

/// Given `d_out [R, T·V + K·V]`: `d_v [R, T, V]`, `d_s0 [R, K, V]`, and each column's shares
/// `d_q_parts`, `d_k_parts [R, T, V, K]`, `d_beta_parts`, `d_g_parts [R, T, V]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    beta: &Tensor<f32>,
    g: &Tensor<f32>,
    s0: &Tensor<f32>,
    states: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_v: &mut Tensor<f32>,
    d_s0: &mut Tensor<f32>,
    d_q_parts: &mut Tensor<f32>,
    d_k_parts: &mut Tensor<f32>,
    d_beta_parts: &mut Tensor<f32>,
    d_g_parts: &mut Tensor<f32>,
    #[comptime] dk: usize,
) {
    let pos = ABSOLUTE_POS;
    let len = v.shape(1);
    let dv = v.shape(2);
    if pos >= v.shape(0) * dv {
        terminate!();
    }
    let r = pos / dv;
    let j = pos % dv;
    let width = d_out.shape(1);
    // ∂S_t[:, j], carried back from step t + 1.
    let mut ds = Array::<f32>::new(dk);
    for i in 0..dk {
        ds[i] = d_out[r * width + len * dv + i * dv + j];
    }
    for back in 0..len {
        let t = len - 1 - back;
        let row = r * len + t;
        let alpha = g[row].exp();
        let b = beta[row];
        let d_o = d_out[r * width + t * dv + j];
        // w and u again, from S_{t−1}.
        let mut recalled = 0.0f32;
        for i in 0..dk {
            let mut prev = s0[(r * dk + i) * dv + j];
            if t > 0 {
                prev = states[((row - 1) * dk + i) * dv + j];
            }
            recalled += k[row * dk + i] * prev;
        }
        let w = alpha * recalled;
        let u = b * (v[row * dv + j] - w);
        // ∂S_t += q ∂oᵀ; ∂q = S_t ∂o; ∂u = ∂S_tᵀ k; ∂k = ∂S_t u.
        let part = (row * dv + j) * dk;
        let mut d_u = 0.0f32;
        for i in 0..dk {
            ds[i] += q[row * dk + i] * d_o;
            d_q_parts[part + i] = states[(row * dk + i) * dv + j] * d_o;
            d_u += ds[i] * k[row * dk + i];
        }
        d_v[row * dv + j] = b * d_u;
        d_beta_parts[row * dv + j] = d_u * (v[row * dv + j] - w);
        // ∂P = ∂S_t + k ∂wᵀ with ∂w = −β ∂u; ∂k += P ∂w; ∂α = Σ ∂P ⊙ S_{t−1}; ∂S_{t−1} = α ∂P.
        let d_w = -b * d_u;
        let mut d_alpha = 0.0f32;
        for i in 0..dk {
            let mut prev = s0[(r * dk + i) * dv + j];
            if t > 0 {
                prev = states[((row - 1) * dk + i) * dv + j];
            }
            d_k_parts[part + i] = ds[i] * u + alpha * prev * d_w;
            let d_p = ds[i] + k[row * dk + i] * d_w;
            d_alpha += d_p * prev;
            ds[i] = alpha * d_p;
        }
        d_g_parts[row * dv + j] = alpha * d_alpha;
    }
    for i in 0..dk {
        d_s0[(r * dk + i) * dv + j] = ds[i];
    }
}

/// The inputs and the states a tracked forward wrote.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    inputs: [CubeTensor; 6],
    states: CubeTensor,
}

/// The op: inputs `[q, k, v, beta, g, s0]`, output `[R, T·V + K·V]`.
#[derive(Debug)]
pub(super) struct DeltaRule;

impl CubeKernel<6> for DeltaRule {
    type Args = ();
    type Saved = Kept;

    fn forward(inputs: [CubeTensor; 6], (): (), keep: bool) -> (CubeTensor, Option<Kept>) {
        let [q, k, v, beta, g, s0] = inputs.map(|t| input(t, "delta_rule"));
        let [rows, len, dk] = dims::<3>(&q);
        let dv = dims::<3>(&v)[2];
        assert!(len >= 1, "delta_rule needs T ≥ 1");
        assert_eq!(dims::<3>(&k), [rows, len, dk], "k is [R, T, K]");
        assert_eq!(dims::<3>(&v), [rows, len, dv], "v is [R, T, V]");
        assert_eq!(dims::<2>(&beta), [rows, len], "β is [R, T]");
        assert_eq!(dims::<2>(&g), [rows, len], "g is [R, T]");
        assert_eq!(dims::<3>(&s0), [rows, dk, dv], "S_0 is [R, K, V]");
        let out = empty(&q, [rows, len * dv + dk * dv]);
        let states = empty(
            &q,
            if keep {
                vec![rows, len, dk, dv]
            } else {
                vec![1]
            },
        );
        let (cubes, dim) = elementwise(&q, rows * dv);
        forward_kernel::launch(
            &q.client.clone(),
            cubes,
            dim,
            q.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            beta.clone().into_tensor_arg(),
            g.clone().into_tensor_arg(),
            s0.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            states.clone().into_tensor_arg(),
            dk,
            keep,
        );
        let kept = keep.then(|| Kept {
            inputs: [q, k, v, beta, g, s0],
            states,
        });
        (out, kept)
    }

    fn backward(kept: Kept, (): (), d_out: CubeTensor) -> [CubeTensor; 6] {
        let Kept { inputs, states } = kept;
        let [q, k, v, beta, g, s0] = inputs;
        let d_out = input(d_out, "delta_rule's output gradient");
        let [rows, len, dk] = dims::<3>(&q);
        let dv = dims::<3>(&v)[2];
        let d_v = empty(&q, [rows, len, dv]);
        let d_s0 = empty(&q, [rows, dk, dv]);
        let d_q_parts = empty(&q, [rows, len, dv, dk]);
        let d_k_parts = empty(&q, [rows, len, dv, dk]);
        let d_beta_parts = empty(&q, [rows, len, dv]);
        let d_g_parts = empty(&q, [rows, len, dv]);
        let (cubes, dim) = elementwise(&q, rows * dv);
        backward_kernel::launch(
            &q.client.clone(),
            cubes,
            dim,
            q.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            beta.into_tensor_arg(),
            g.into_tensor_arg(),
            s0.into_tensor_arg(),
            states.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_v.clone().into_tensor_arg(),
            d_s0.clone().into_tensor_arg(),
            d_q_parts.clone().into_tensor_arg(),
            d_k_parts.clone().into_tensor_arg(),
            d_beta_parts.clone().into_tensor_arg(),
            d_g_parts.clone().into_tensor_arg(),
            dk,
        );
        use burn::backend::ops::FloatTensorOps;
        let vectors = |parts| reshape(CubeBackend::float_sum_dim(parts, 2), [rows, len, dk]);
        let scalars = |parts| reshape(CubeBackend::float_sum_dim(parts, 2), [rows, len]);
        [
            vectors(d_q_parts),
            vectors(d_k_parts),
            d_v,
            scalars(d_beta_parts),
            scalars(d_g_parts),
            d_s0,
        ]
    }
}
