//! xLSTM's mLSTM cell on the GPU: one launch forward, two backward (plus burn's sums of the
//! per-column shares), whatever `T`. The equations are the CPU kernel's (`fused/mlstm_cell.rs`),
//! per sequence-head with a memory `C [K, V]`, a normaliser `n [K]` and a stabiliser `m`:
//!
//! ```text
//! d_t = log_f_t + m_{t−1},   m_t = max(d_t, ĩ_t)
//! f_t = exp(d_t − m_t),      i_t = exp(ĩ_t − m_t)
//! C_t = f_t C_{t−1} + i_t k_t v_tᵀ,   n_t = f_t n_{t−1} + i_t k_t
//! out: C_tᵀ q_t [V], n_tᵀ q_t, m_t
//! ```
//!
//! The gates depend only on the inputs and `m`, so every unit follows them itself; then each
//! column of `C` evolves on its own, and so does `n`, a column whose `v` is 1. So a
//! sequence-head is `V + 1` units, each with its `K` values in registers and the time loop
//! inside. A tracked forward writes every step's columns; the first backward kernel walks time
//! in reverse in the same layout, writing each column's share of `∂q`, `∂k`, `∂f` and `∂i`
//! (summed by burn). `∂f` and `∂i` then feed the stabiliser's scalar chain, one unit per
//! sequence-head in the second kernel (the maximum routes its gradient to the larger argument).

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::tensors::{dims, elementwise, empty, input, reshape};
use super::tracked::CubeKernel;

/// `q`, `k [R, T, K]`, `v [R, T, V]`, `i`, `log_f [R, T]`, `c0 [R, K, V]`, `n0 [R, K]`, `m0 [R]`
/// → `out [R, T·V + 2T + K·V + K + 1]` and, when `save`, `states [R, T, V + 1, K]`. Unit
/// `r·(V + 1) + j` runs column `j` of `C` (`j < V`) or `n` (`j = V`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    i_pre: &Tensor<f32>,
    log_f: &Tensor<f32>,
    c0: &Tensor<f32>,
    n0: &Tensor<f32>,
    m0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    states: &mut Tensor<f32>,
    #[comptime] dk: usize,
    #[comptime] save: bool,
) {
    let pos = ABSOLUTE_POS;
    let len = v.shape(1);
    let dv = v.shape(2);
    let cols = dv + 1;
    if pos >= v.shape(0) * cols {
        terminate!();
    }
    let r = pos / cols;
    let j = pos % cols;
    let width = out.shape(1);
    let mut c = Array::<f32>::new(dk);
    for l in 0..dk {
        if j < dv {
            c[l] = c0[(r * dk + l) * dv + j];
        } else {
            c[l] = n0[r * dk + l];
        }
    }
    let mut m = m0[r];
    for t in 0..len {
        let row = r * len + t;
        let d = log_f[row] + m;
        let ip = i_pre[row];
        let mut m_t = ip;
        if d > ip {
            m_t = d;
        }
        let f = (d - m_t).exp();
        let ig = (ip - m_t).exp();
        m = m_t;
        let mut vj = 1.0f32;
        if j < dv {
            vj = v[row * dv + j];
        }
        let mut o = 0.0f32;
        for l in 0..dk {
            c[l] = f * c[l] + ig * k[row * dk + l] * vj;
            o += q[row * dk + l] * c[l];
            if comptime![save] {
                states[(row * cols + j) * dk + l] = c[l];
            }
        }
        if j < dv {
            out[r * width + t * dv + j] = o;
        } else {
            out[r * width + len * dv + t] = o;
            out[r * width + len * dv + len + t] = m;
        }
    }
    let state = r * width + len * dv + 2 * len;
    for l in 0..dk {
        if j < dv {
            out[state + l * dv + j] = c[l];
        } else {
            out[state + dk * dv + l] = c[l];
        }
    }
    if j == dv {
        out[state + dk * dv + dk] = m;
    }
}

/// Given `d_out` (as `out`) and the forward's `out` (for `m_t`): `d_v [R, T, V]`, `d_c0`,
/// `d_n0`, and each column's shares `d_q_parts`, `d_k_parts [R, T, V + 1, K]`, `d_f_parts`,
/// `d_i_parts [R, T, V + 1]` (of `∂f` and `∂i`, the gates' values).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    q: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    i_pre: &Tensor<f32>,
    log_f: &Tensor<f32>,
    c0: &Tensor<f32>,
    n0: &Tensor<f32>,
    m0: &Tensor<f32>,
    out: &Tensor<f32>,
    states: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_v: &mut Tensor<f32>,
    d_c0: &mut Tensor<f32>,
    d_n0: &mut Tensor<f32>,
    d_q_parts: &mut Tensor<f32>,
    d_k_parts: &mut Tensor<f32>,
    d_f_parts: &mut Tensor<f32>,
    d_i_parts: &mut Tensor<f32>,
    #[comptime] dk: usize,
) {
    let pos = ABSOLUTE_POS;
    let len = v.shape(1);
    let dv = v.shape(2);
    let cols = dv + 1;
    if pos >= v.shape(0) * cols {
        terminate!();
    }
    let r = pos / cols;
    let j = pos % cols;
    let width = out.shape(1);
    let state = r * width + len * dv + 2 * len;
    let mut dc = Array::<f32>::new(dk);
    for l in 0..dk {
        if j < dv {
            dc[l] = d_out[state + l * dv + j];
        } else {
            dc[l] = d_out[state + dk * dv + l];
        }
    }
    for back in 0..len {
        let t = len - 1 - back;
        let row = r * len + t;
        let mut m_prev = m0[r];
        if t > 0 {
            m_prev = out[r * width + len * dv + len + t - 1];
        }
        let d = log_f[row] + m_prev;
        let ip = i_pre[row];
        let mut m_t = ip;
        if d > ip {
            m_t = d;
        }
        let f = (d - m_t).exp();
        let ig = (ip - m_t).exp();
        let mut vj = 1.0f32;
        let mut g = d_out[r * width + len * dv + t];
        if j < dv {
            vj = v[row * dv + j];
            g = d_out[r * width + t * dv + j];
        }
        let unit = (row * cols + j) * dk;
        let mut d_f = 0.0f32;
        let mut d_gate_i = 0.0f32;
        let mut d_vj = 0.0f32;
        for l in 0..dk {
            let mut prev = n0[r * dk + l];
            if t > 0 {
                prev = states[unit - cols * dk + l];
            } else if j < dv {
                prev = c0[(r * dk + l) * dv + j];
            }
            dc[l] += q[row * dk + l] * g;
            d_q_parts[unit + l] = states[unit + l] * g;
            d_f += dc[l] * prev;
            let dcv = dc[l] * vj;
            d_gate_i += dcv * k[row * dk + l];
            d_k_parts[unit + l] = ig * dcv;
            d_vj += ig * dc[l] * k[row * dk + l];
            dc[l] *= f;
        }
        if j < dv {
            d_v[row * dv + j] = d_vj;
        }
        d_f_parts[row * cols + j] = d_f;
        d_i_parts[row * cols + j] = d_gate_i;
    }
    for l in 0..dk {
        if j < dv {
            d_c0[(r * dk + l) * dv + j] = dc[l];
        } else {
            d_n0[r * dk + l] = dc[l];
        }
    }
}

/// The stabiliser's chain, one unit per sequence-head: from `∂f`, `∂i` (summed over columns)
/// and the outputs' `∂m_t`, `∂ĩ`, `∂log_f [R, T]` and `∂m_0 [R]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn stabiliser_kernel(
    i_pre: &Tensor<f32>,
    log_f: &Tensor<f32>,
    m0: &Tensor<f32>,
    out: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_f: &Tensor<f32>,
    d_gate_i: &Tensor<f32>,
    d_i: &mut Tensor<f32>,
    d_log_f: &mut Tensor<f32>,
    d_m0: &mut Tensor<f32>,
    dk: u32,
    dv: u32,
) {
    let r = ABSOLUTE_POS;
    if r >= m0.len() {
        terminate!();
    }
    let len = i_pre.shape(1);
    let width = out.shape(1);
    let head = len * dv as usize;
    let mut d_m = d_out[r * width + head + 2 * len + (dk * dv + dk) as usize];
    for back in 0..len {
        let t = len - 1 - back;
        let row = r * len + t;
        let mut m_prev = m0[r];
        if t > 0 {
            m_prev = out[r * width + head + len + t - 1];
        }
        let d = log_f[row] + m_prev;
        let ip = i_pre[row];
        let d_won = d > ip;
        let mut m_t = ip;
        if d_won {
            m_t = d;
        }
        let f = (d - m_t).exp();
        let ig = (ip - m_t).exp();
        let mut d_d = f * d_f[row];
        let mut d_ip = ig * d_gate_i[row];
        let d_m_t = d_out[r * width + head + len + t] + d_m - d_d - d_ip;
        if d_won {
            d_d += d_m_t;
        } else {
            d_ip += d_m_t;
        }
        d_i[row] = d_ip;
        d_log_f[row] = d_d;
        d_m = d_d;
    }
    d_m0[r] = d_m;
}

/// The inputs, the output (for `m_t`) and the columns a tracked forward wrote.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    inputs: [CubeTensor; 8],
    out: CubeTensor,
    states: CubeTensor,
}

/// The op: inputs `[q, k, v, i, log_f, c0, n0, m0]`, output `[R, T·V + 2T + K·V + K + 1]`.
#[derive(Debug)]
pub(super) struct MlstmCell;

impl CubeKernel<8> for MlstmCell {
    type Args = ();
    type Saved = Kept;

    fn forward(inputs: [CubeTensor; 8], (): (), keep: bool) -> (CubeTensor, Option<Kept>) {
        let inputs = inputs.map(|t| input(t, "mlstm_cell"));
        let [q, k, v, i, log_f, c0, n0, m0] = &inputs;
        let [rows, len, dk] = dims::<3>(q);
        let dv = dims::<3>(v)[2];
        assert!(len >= 1, "mlstm_cell needs T ≥ 1");
        assert_eq!(dims::<3>(k), [rows, len, dk], "k is [R, T, K]");
        assert_eq!(dims::<3>(v), [rows, len, dv], "v is [R, T, V]");
        assert_eq!(dims::<2>(i), [rows, len], "ĩ is [R, T]");
        assert_eq!(dims::<2>(log_f), [rows, len], "log_f is [R, T]");
        assert_eq!(dims::<3>(c0), [rows, dk, dv], "c0 is [R, K, V]");
        assert_eq!(dims::<2>(n0), [rows, dk], "n0 is [R, K]");
        assert_eq!(dims::<1>(m0), [rows], "m0 is [R]");
        let out = empty(q, [rows, len * dv + 2 * len + dk * dv + dk + 1]);
        let states = empty(
            q,
            if keep {
                vec![rows, len, dv + 1, dk]
            } else {
                vec![1]
            },
        );
        let (cubes, dim) = elementwise(q, rows * (dv + 1));
        let arg = |t: &CubeTensor| t.clone().into_tensor_arg();
        forward_kernel::launch(
            &q.client.clone(),
            cubes,
            dim,
            arg(q),
            arg(k),
            arg(v),
            arg(i),
            arg(log_f),
            arg(c0),
            arg(n0),
            arg(m0),
            arg(&out),
            arg(&states),
            dk,
            keep,
        );
        let kept = keep.then(|| Kept {
            inputs: inputs.clone(),
            out: out.clone(),
            states,
        });
        (out, kept)
    }

    fn backward(kept: Kept, (): (), d_out: CubeTensor) -> [CubeTensor; 8] {
        let Kept {
            inputs,
            out,
            states,
        } = kept;
        let [q, k, v, i, log_f, c0, n0, m0] = &inputs;
        let d_out = input(d_out, "mlstm_cell's output gradient");
        let [rows, len, dk] = dims::<3>(q);
        let dv = dims::<3>(v)[2];
        let cols = dv + 1;
        let d_v = empty(q, [rows, len, dv]);
        let (d_c0, d_n0) = (empty(q, [rows, dk, dv]), empty(q, [rows, dk]));
        let d_q_parts = empty(q, [rows, len, cols, dk]);
        let d_k_parts = empty(q, [rows, len, cols, dk]);
        let d_f_parts = empty(q, [rows, len, cols]);
        let d_i_parts = empty(q, [rows, len, cols]);
        let (cubes, dim) = elementwise(q, rows * cols);
        let arg = |t: &CubeTensor| t.clone().into_tensor_arg();
        backward_kernel::launch(
            &q.client.clone(),
            cubes,
            dim,
            arg(q),
            arg(k),
            arg(v),
            arg(i),
            arg(log_f),
            arg(c0),
            arg(n0),
            arg(m0),
            arg(&out),
            arg(&states),
            arg(&d_out),
            arg(&d_v),
            arg(&d_c0),
            arg(&d_n0),
            arg(&d_q_parts),
            arg(&d_k_parts),
            arg(&d_f_parts),
            arg(&d_i_parts),
            dk,
        );
        use burn::backend::ops::FloatTensorOps;
        let vectors = |parts| reshape(CubeBackend::float_sum_dim(parts, 2), [rows, len, dk]);
        let scalars = |parts| reshape(CubeBackend::float_sum_dim(parts, 2), [rows, len]);
        let (d_f, d_gate_i) = (scalars(d_f_parts), scalars(d_i_parts));
        let d_i = empty(q, [rows, len]);
        let d_log_f = empty(q, [rows, len]);
        let d_m0 = empty(q, [rows]);
        let (cubes, dim) = elementwise(q, rows);
        stabiliser_kernel::launch(
            &q.client.clone(),
            cubes,
            dim,
            arg(i),
            arg(log_f),
            arg(m0),
            arg(&out),
            arg(&d_out),
            arg(&d_f),
            arg(&d_gate_i),
            arg(&d_i),
            arg(&d_log_f),
            arg(&d_m0),
            dk as u32,
            dv as u32,
        );
        [
            vectors(d_q_parts),
            vectors(d_k_parts),
            d_v,
            d_i,
            d_log_f,
            d_c0,
            d_n0,
            d_m0,
        ]
    }
}
