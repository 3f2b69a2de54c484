//! RWKV-7's diagonal-plus-rank-one recurrence on the GPU: one launch forward, one backward
//! (plus burn's sums of the per-column shares), whatever `T`. The equations are the CPU
//! kernel's (`fused/dplr.rs`), per sequence-head with a state `S [N (key), N (value)]`:
//!
//! ```text
//! u_t = S_{t−1}ᵀ a_t                              the rank-one term's read
//! S_t = diag(w_t) S_{t−1} + b_t u_tᵀ + k_t v_tᵀ    w_t = exp(log_w_t)
//! o_t = S_tᵀ r_t
//! ```
//!
//! Column `j` of `S` evolves on its own (`u_t[j]` reads only that column), so each is one unit
//! with its `N` values in registers and the time loop inside, the units of a sequence-head
//! reading the same `r_t, k_t, log_w_t, a_t, b_t`. A tracked forward writes every `S_t`; the
//! backward walks time in reverse from them. The gradients of the per-key vectors are sums over
//! the columns: each unit writes its share and burn sums them.

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::tensors::{dims, elementwise, empty, input, reshape};
use super::tracked::CubeKernel;

/// `r`, `k`, `v`, `log_w`, `a`, `b [R, T, N]`, `s0 [R, N, N]` → `out [R, T·N + N·N]` and, when
/// `save`, `states [R, T, N, N]`. Unit `row·N + j` runs column `j` of sequence-head `row`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    r: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    log_w: &Tensor<f32>,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    s0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    states: &mut Tensor<f32>,
    #[comptime] n: usize,
    #[comptime] save: bool,
) {
    let pos = ABSOLUTE_POS;
    let len = r.shape(1);
    if pos >= r.shape(0) * n {
        terminate!();
    }
    let seq = pos / n;
    let j = pos % n;
    let width = out.shape(1);
    let mut s = Array::<f32>::new(n);
    for i in 0..n {
        s[i] = s0[(seq * n + i) * n + j];
    }
    for t in 0..len {
        let at = (seq * len + t) * n;
        let mut u = 0.0f32;
        for i in 0..n {
            u += a[at + i] * s[i];
        }
        let vj = v[at + j];
        let mut o = 0.0f32;
        for i in 0..n {
            s[i] = log_w[at + i].exp() * s[i] + b[at + i] * u + k[at + i] * vj;
            o += r[at + i] * s[i];
            if comptime![save] {
                states[(at + i) * n + j] = s[i];
            }
        }
        out[seq * width + t * n + j] = o;
    }
    for i in 0..n {
        out[seq * width + len * n + i * n + j] = s[i];
    }
}

/// Given `d_out [R, T·N + N·N]`: `d_v [R, T, N]`, `d_s0 [R, N, N]`, and each column's shares
/// of `∂r`, `∂log_w`, `∂b`, `∂k`, `∂a` (`parts [5, R, T, N (column), N]`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    r: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    log_w: &Tensor<f32>,
    a: &Tensor<f32>,
    b: &Tensor<f32>,
    s0: &Tensor<f32>,
    states: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_v: &mut Tensor<f32>,
    d_s0: &mut Tensor<f32>,
    parts: &mut Tensor<f32>,
    #[comptime] n: usize,
) {
    let pos = ABSOLUTE_POS;
    let rows = r.shape(0);
    let len = r.shape(1);
    if pos >= rows * n {
        terminate!();
    }
    let seq = pos / n;
    let j = pos % n;
    let width = d_out.shape(1);
    // One share tensor after another in `parts`.
    let stride = rows * len * n * n;
    let mut ds = Array::<f32>::new(n);
    for i in 0..n {
        ds[i] = d_out[seq * width + len * n + i * n + j];
    }
    for back in 0..len {
        let t = len - 1 - back;
        let at = (seq * len + t) * n;
        let share = (at + j) * n;
        let d_o = d_out[seq * width + t * n + j];
        let vj = v[at + j];
        let mut u = 0.0f32;
        for i in 0..n {
            let mut prev = s0[(seq * n + i) * n + j];
            if t > 0 {
                prev = states[(at - n + i) * n + j];
            }
            u += a[at + i] * prev;
        }
        let mut d_u = 0.0f32;
        let mut d_vj = 0.0f32;
        for i in 0..n {
            let mut prev = s0[(seq * n + i) * n + j];
            if t > 0 {
                prev = states[(at - n + i) * n + j];
            }
            ds[i] += r[at + i] * d_o;
            parts[share + i] = states[(at + i) * n + j] * d_o;
            parts[stride + share + i] = ds[i] * prev * log_w[at + i].exp();
            parts[2 * stride + share + i] = ds[i] * u;
            parts[3 * stride + share + i] = ds[i] * vj;
            d_u += ds[i] * b[at + i];
            d_vj += ds[i] * k[at + i];
        }
        d_v[at + j] = d_vj;
        for i in 0..n {
            let mut prev = s0[(seq * n + i) * n + j];
            if t > 0 {
                prev = states[(at - n + i) * n + j];
            }
            parts[4 * stride + share + i] = prev * d_u;
            ds[i] = log_w[at + i].exp() * ds[i] + a[at + i] * d_u;
        }
    }
    for i in 0..n {
        d_s0[(seq * n + i) * n + j] = ds[i];
    }
}

/// The inputs and the states a tracked forward wrote.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    inputs: [CubeTensor; 7],
    states: CubeTensor,
}

/// The op: inputs `[r, k, v, log_w, a, b, s0]`, output `[R, T·N + N·N]`.
#[derive(Debug)]
pub(super) struct Dplr;

impl CubeKernel<7> for Dplr {
    type Args = ();
    type Saved = Kept;

    fn forward(inputs: [CubeTensor; 7], (): (), keep: bool) -> (CubeTensor, Option<Kept>) {
        let [r, k, v, log_w, a, b, s0] = inputs.map(|t| input(t, "dplr"));
        let [rows, len, n] = dims::<3>(&r);
        assert!(len >= 1, "dplr needs T ≥ 1");
        for t in [&k, &v, &log_w, &a, &b] {
            assert_eq!(
                dims::<3>(t),
                [rows, len, n],
                "every vector input is [R, T, N]"
            );
        }
        assert_eq!(dims::<3>(&s0), [rows, n, n], "S_0 is [R, N, N]");
        let out = empty(&r, [rows, len * n + n * n]);
        let states = empty(&r, if keep { vec![rows, len, n, n] } else { vec![1] });
        let (cubes, dim) = elementwise(&r, rows * n);
        forward_kernel::launch(
            &r.client.clone(),
            cubes,
            dim,
            r.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            log_w.clone().into_tensor_arg(),
            a.clone().into_tensor_arg(),
            b.clone().into_tensor_arg(),
            s0.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            states.clone().into_tensor_arg(),
            n,
            keep,
        );
        let kept = keep.then(|| Kept {
            inputs: [r, k, v, log_w, a, b, s0],
            states,
        });
        (out, kept)
    }

    fn backward(kept: Kept, (): (), d_out: CubeTensor) -> [CubeTensor; 7] {
        let Kept { inputs, states } = kept;
        let [r, k, v, log_w, a, b, s0] = inputs;
        let d_out = input(d_out, "dplr's output gradient");
        let [rows, len, n] = dims::<3>(&r);
        let d_v = empty(&r, [rows, len, n]);
        let d_s0 = empty(&r, [rows, n, n]);
        let parts = empty(&r, [5, rows, len, n, n]);
        let (cubes, dim) = elementwise(&r, rows * n);
        backward_kernel::launch(
            &r.client.clone(),
            cubes,
            dim,
            r.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            log_w.into_tensor_arg(),
            a.into_tensor_arg(),
            b.into_tensor_arg(),
            s0.into_tensor_arg(),
            states.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_v.clone().into_tensor_arg(),
            d_s0.clone().into_tensor_arg(),
            parts.clone().into_tensor_arg(),
            n,
        );
        use burn::backend::ops::FloatTensorOps;
        // [5, R, T, N, N] summed over the columns: [5, R, T, N].
        let sums = reshape(CubeBackend::float_sum_dim(parts, 3), [5, rows * len * n]);
        let share = |which: usize| {
            let one = super::tensors::rows(sums.clone(), which, which + 1);
            reshape(one, [rows, len, n])
        };
        [share(0), share(3), d_v, share(1), share(4), share(2), d_s0]
    }
}
