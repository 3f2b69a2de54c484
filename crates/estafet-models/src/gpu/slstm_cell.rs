//! xLSTM's sLSTM recurrence after its input projection on the GPU, with backpropagation through
//! time inside one backward kernel. The equations are the CPU kernel's (`fused/slstm_cell.rs`):
//!
//! ```text
//! pre_t = wx_t + R h_{t−1}           R block-diagonal: H heads of [d_h, 4·d_h], gate-major
//! (ĩ, f̃, z̃, õ) = pre_t               each D wide, head-major within
//! d_t = log σ(f̃_t) + m_{t−1},   m_t = max(d_t, ĩ_t)
//! i_t = exp(ĩ_t − m_t),   f_t = exp(d_t − m_t)
//! c_t = f_t c_{t−1} + i_t tanh(z̃_t),   n_t = f_t n_{t−1} + i_t,   h_t = σ(õ_t) c_t / n_t
//! ```
//!
//! The update is non-linear in `h`, so, as for the classic cells (`cell.rs`), one cube runs one
//! sequence: its units share the channels, `h_{t−1}` sits in shared memory (two halves, swapped
//! each step), each unit keeps its channels' `c`, `n`, `m` in registers and reads its head's
//! block of `R` from global memory. A tracked forward writes every step's pre-activations and
//! `(c, n, m)`. The backward walks time in reverse: each unit forms its channels'
//! pre-activation gradients (through `h`, the cell and normaliser updates, the exponential
//! gates and the stabiliser's maximum, whose gradient goes to the larger argument), the cube
//! shares them, and each unit takes `∂h_{t−1} = R ∂pre_t` for its channels; `∂R` is then one
//! batched product per head over all `B·T` rows.

use burn::backend::ops::FloatTensorOps;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::activations::{sigmoid, tanh};
use super::tensors::{cat, dims, empty, input, matmul, reshape, steps, units_per_cube};
use super::tracked::CubeKernel;

/// Shared-memory floats of the larger kernel (the backward's step of `4D` gradients).
fn shared_floats(d: usize) -> usize {
    4 * d
}

/// Whether the kernels run a layer of width `d` on `device` (its shared memory holds them).
pub(super) fn fits(device: &burn_cubecl::CubeDevice, d: usize) -> bool {
    shared_floats(d) <= device.client().properties().hardware.max_shared_memory_size / 4
}

/// Loop iterations of one unit of the backward over `len` steps: each of its channels reads
/// `4·d_h` gradients of its head per step.
pub(super) fn loop_iterations(
    device: &burn_cubecl::CubeDevice,
    d: usize,
    heads: usize,
    len: usize,
) -> usize {
    let strides = d.div_ceil(units_per_cube(device, d) as usize);
    len * (strides * (4 * (d / heads) + 2) + 2) + 2 * strides
}

/// `log σ(x) = min(x, 0) − ln(1 + e^{−|x|})`, which never overflows.
#[cube]
fn log_sigmoid(x: f32) -> f32 {
    let mut low = x;
    if x > 0.0 {
        low = 0.0;
    }
    low - (1.0 + (-(x.abs())).exp()).ln()
}

/// `wx [B, T, 4D]`, `r [H, d_h, 4·d_h]`, `h0`, `c0`, `n0`, `m0 [B, D]` → `out [B, T·D + 3D]`
/// (`h_1..h_T`, then the final `c`, `n`, `m`) and, when `save`, `pres [B, T, 4D]` and
/// `states [B, T, 3D]` (`c_t`, `n_t`, `m_t`). Cube `b` runs sequence `b`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    wx: &Tensor<f32>,
    r: &Tensor<f32>,
    h0: &Tensor<f32>,
    c0: &Tensor<f32>,
    n0: &Tensor<f32>,
    m0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    pres: &mut Tensor<f32>,
    states: &mut Tensor<f32>,
    #[comptime] d: usize,
    #[comptime] dh: usize,
    #[comptime] units: usize,
    #[comptime] save: bool,
) {
    let b = CUBE_POS_X as usize;
    let strides = comptime![d.div_ceil(units)];
    let len = wx.shape(1);
    let width = out.shape(1);
    let mut hs = Shared::<[f32]>::new_slice(2 * d);
    let mut c = Array::<f32>::new(strides);
    let mut n = Array::<f32>::new(strides);
    let mut m = Array::<f32>::new(strides);
    for s in 0..strides {
        let u = UNIT_POS_X as usize + s * units;
        if u < d {
            hs[u] = h0[b * d + u];
            c[s] = c0[b * d + u];
            n[s] = n0[b * d + u];
            m[s] = m0[b * d + u];
        }
    }
    sync_cube();
    for t in 0..len {
        let cur = (t % 2) * d;
        let next = d - cur;
        let row = b * len + t;
        for s in 0..strides {
            let u = UNIT_POS_X as usize + s * units;
            if u < d {
                let k = u / dh;
                let ju = u % dh;
                // pre = wx_t + R h_{t−1}, this channel's four gates.
                let mut p_i = wx[row * 4 * d + u];
                let mut p_f = wx[row * 4 * d + d + u];
                let mut p_z = wx[row * 4 * d + 2 * d + u];
                let mut p_o = wx[row * 4 * d + 3 * d + u];
                for j in 0..dh {
                    let h_j = hs[cur + k * dh + j];
                    let w = (k * dh + j) * 4 * dh + ju;
                    p_i += h_j * r[w];
                    p_f += h_j * r[w + dh];
                    p_z += h_j * r[w + 2 * dh];
                    p_o += h_j * r[w + 3 * dh];
                }
                let dd = log_sigmoid(p_f) + m[s];
                let mut m_t = p_i;
                if dd > p_i {
                    m_t = dd;
                }
                let ig = (p_i - m_t).exp();
                let fg = (dd - m_t).exp();
                let c_t = fg * c[s] + ig * tanh(p_z);
                let n_t = fg * n[s] + ig;
                let h = sigmoid(p_o) * c_t / n_t;
                out[b * width + t * d + u] = h;
                hs[next + u] = h;
                c[s] = c_t;
                n[s] = n_t;
                m[s] = m_t;
                if comptime![save] {
                    pres[row * 4 * d + u] = p_i;
                    pres[row * 4 * d + d + u] = p_f;
                    pres[row * 4 * d + 2 * d + u] = p_z;
                    pres[row * 4 * d + 3 * d + u] = p_o;
                    states[row * 3 * d + u] = c_t;
                    states[row * 3 * d + d + u] = n_t;
                    states[row * 3 * d + 2 * d + u] = m_t;
                }
            }
        }
        sync_cube();
    }
    for s in 0..strides {
        let u = UNIT_POS_X as usize + s * units;
        if u < d {
            out[b * width + len * d + u] = c[s];
            out[b * width + len * d + d + u] = n[s];
            out[b * width + len * d + 2 * d + u] = m[s];
        }
    }
}

/// Given `d_out [B, T·D + 3D]`: `d_pre [B, T, 4D]` (= `∂wx`) and `d_h0`, `d_c0`, `d_n0`, `d_m0
/// [B, D]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    r: &Tensor<f32>,
    c0: &Tensor<f32>,
    n0: &Tensor<f32>,
    m0: &Tensor<f32>,
    pres: &Tensor<f32>,
    states: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_pre: &mut Tensor<f32>,
    d_h0: &mut Tensor<f32>,
    d_c0: &mut Tensor<f32>,
    d_n0: &mut Tensor<f32>,
    d_m0: &mut Tensor<f32>,
    #[comptime] d: usize,
    #[comptime] dh: usize,
    #[comptime] units: usize,
) {
    let b = CUBE_POS_X as usize;
    let strides = comptime![d.div_ceil(units)];
    let len = pres.shape(1);
    let width = d_out.shape(1);
    // This step's pre-activation gradients, shared; each channel's carried ∂h (from R), ∂c,
    // ∂n, ∂m in its unit's registers.
    let mut dg = Shared::<[f32]>::new_slice(4 * d);
    let mut dh_r = Array::<f32>::new(strides);
    let mut dc = Array::<f32>::new(strides);
    let mut dn = Array::<f32>::new(strides);
    let mut dm = Array::<f32>::new(strides);
    for s in 0..strides {
        let u = UNIT_POS_X as usize + s * units;
        dh_r[s] = 0.0;
        dc[s] = 0.0;
        dn[s] = 0.0;
        dm[s] = 0.0;
        if u < d {
            dc[s] = d_out[b * width + len * d + u];
            dn[s] = d_out[b * width + len * d + d + u];
            dm[s] = d_out[b * width + len * d + 2 * d + u];
        }
    }
    for i in 0..len {
        let t = len - 1 - i;
        let row = b * len + t;
        for s in 0..strides {
            let u = UNIT_POS_X as usize + s * units;
            if u < d {
                let p_i = pres[row * 4 * d + u];
                let p_f = pres[row * 4 * d + d + u];
                let p_z = pres[row * 4 * d + 2 * d + u];
                let p_o = pres[row * 4 * d + 3 * d + u];
                let mut c = c0[b * d + u];
                let mut n = n0[b * d + u];
                let mut m = m0[b * d + u];
                if t > 0 {
                    c = states[(row - 1) * 3 * d + u];
                    n = states[(row - 1) * 3 * d + d + u];
                    m = states[(row - 1) * 3 * d + 2 * d + u];
                }
                // The step again.
                let dd = log_sigmoid(p_f) + m;
                let d_won = dd > p_i;
                let mut m_t = p_i;
                if d_won {
                    m_t = dd;
                }
                let ig = (p_i - m_t).exp();
                let fg = (dd - m_t).exp();
                let tz = tanh(p_z);
                let c_t = fg * c + ig * tz;
                let n_t = fg * n + ig;
                let so = sigmoid(p_o);
                // Back through h, the updates, the gates and the stabiliser.
                let d_h = d_out[b * width + t * d + u] + dh_r[s];
                let mut d_c = dc[s] + d_h * so / n_t;
                let d_n = dn[s] - d_h * so * c_t / (n_t * n_t);
                let d_o = d_h * c_t / n_t * so * (1.0 - so);
                let d_fg = d_c * c + d_n * n;
                let d_ig = d_c * tz + d_n;
                let d_z = d_c * ig * (1.0 - tz * tz);
                d_c *= fg;
                let mut d_i = d_ig * ig;
                let mut d_d = d_fg * fg;
                let d_m_t = dm[s] - d_i - d_d;
                if d_won {
                    d_d += d_m_t;
                } else {
                    d_i += d_m_t;
                }
                // d log σ(f̃) / df̃ = 1 − σ(f̃).
                let d_f = d_d * (1.0 - sigmoid(p_f));
                d_pre[row * 4 * d + u] = d_i;
                d_pre[row * 4 * d + d + u] = d_f;
                d_pre[row * 4 * d + 2 * d + u] = d_z;
                d_pre[row * 4 * d + 3 * d + u] = d_o;
                dg[u] = d_i;
                dg[d + u] = d_f;
                dg[2 * d + u] = d_z;
                dg[3 * d + u] = d_o;
                dc[s] = d_c;
                dn[s] = fg * d_n;
                dm[s] = d_d;
            }
        }
        sync_cube();
        // ∂h_{t−1} = R ∂pre_t for this unit's channels (channel j of head k).
        for s in 0..strides {
            let u = UNIT_POS_X as usize + s * units;
            if u < d {
                let k = u / dh;
                let mut acc = 0.0f32;
                for g in 0..4 {
                    for v in 0..dh {
                        acc += r[u * 4 * dh + g * dh + v] * dg[g * d + k * dh + v];
                    }
                }
                dh_r[s] = acc;
            }
        }
        // Every unit has read `dg` before the next step writes it.
        sync_cube();
    }
    for s in 0..strides {
        let u = UNIT_POS_X as usize + s * units;
        if u < d {
            d_h0[b * d + u] = dh_r[s];
            d_c0[b * d + u] = dc[s];
            d_n0[b * d + u] = dn[s];
            d_m0[b * d + u] = dm[s];
        }
    }
}

/// What the backward reads: `r`, `h0` (for `∂R`), `c0`, `n0`, `m0`, the output (every `h_t`),
/// and the pre-activations and states the forward wrote.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    r: CubeTensor,
    init: [CubeTensor; 4],
    out: CubeTensor,
    pres: CubeTensor,
    states: CubeTensor,
}

/// The op: inputs `[wx, r, h0, c0, n0, m0]`, output `[B, T·D + 3D]`; the argument is the
/// number of heads.
#[derive(Debug)]
pub(super) struct SlstmCell;

impl CubeKernel<6> for SlstmCell {
    type Args = usize;
    type Saved = Kept;

    fn forward(inputs: [CubeTensor; 6], heads: usize, keep: bool) -> (CubeTensor, Option<Kept>) {
        let [wx, r, h0, c0, n0, m0] = inputs.map(|t| input(t, "slstm_cell"));
        let [batch, len, four_d] = dims::<3>(&wx);
        let d = four_d / 4;
        let dh = d / heads;
        assert!(len >= 1, "slstm_cell needs T ≥ 1");
        assert_eq!(dims::<3>(&r), [heads, dh, 4 * dh], "R is [H, d_h, 4·d_h]");
        for t in [&h0, &c0, &n0, &m0] {
            assert_eq!(dims::<2>(t), [batch, d], "the state is [B, D]");
        }
        assert!(
            fits(&wx.device, d),
            "slstm_cell: D = {d} does not fit (runs() first)"
        );
        let out = empty(&wx, [batch, len * d + 3 * d]);
        let (pres, states) = if keep {
            (
                empty(&wx, [batch, len, 4 * d]),
                empty(&wx, [batch, len, 3 * d]),
            )
        } else {
            (empty(&wx, [1]), empty(&wx, [1]))
        };
        let units = units_per_cube(&wx.device, d);
        let arg = |t: &CubeTensor| t.clone().into_tensor_arg();
        forward_kernel::launch(
            &wx.client.clone(),
            CubeCount::Static(batch as u32, 1, 1),
            CubeDim::new_1d(units),
            arg(&wx),
            arg(&r),
            arg(&h0),
            arg(&c0),
            arg(&n0),
            arg(&m0),
            arg(&out),
            arg(&pres),
            arg(&states),
            d,
            dh,
            units as usize,
            keep,
        );
        let kept = keep.then(|| Kept {
            r,
            init: [h0, c0, n0, m0],
            out: out.clone(),
            pres,
            states,
        });
        (out, kept)
    }

    fn backward(kept: Kept, heads: usize, d_out: CubeTensor) -> [CubeTensor; 6] {
        let Kept {
            r,
            init,
            out,
            pres,
            states,
        } = kept;
        let [h0, c0, n0, m0] = init;
        let d_out = input(d_out, "slstm_cell's output gradient");
        let [batch, len, four_d] = dims::<3>(&pres);
        let d = four_d / 4;
        let dh = d / heads;
        let d_pre = empty(&pres, [batch, len, 4 * d]);
        let new = || empty(&pres, [batch, d]);
        let (d_h0, d_c0, d_n0, d_m0) = (new(), new(), new(), new());
        let units = units_per_cube(&pres.device, d);
        let arg = |t: &CubeTensor| t.clone().into_tensor_arg();
        backward_kernel::launch(
            &pres.client.clone(),
            CubeCount::Static(batch as u32, 1, 1),
            CubeDim::new_1d(units),
            arg(&r),
            arg(&c0),
            arg(&n0),
            arg(&m0),
            arg(&pres),
            arg(&states),
            arg(&d_out),
            arg(&d_pre),
            arg(&d_h0),
            arg(&d_c0),
            arg(&d_n0),
            arg(&d_m0),
            d,
            dh,
            units as usize,
        );
        // ∂R[k] = Σ_rows h_{t−1}[head k]ᵀ ∂pre_t[head k's gate columns], one product per head.
        let rows = batch * len;
        let h_seq = reshape(
            CubeBackend::float_slice(
                out,
                &[
                    burn::tensor::Slice::from(0..batch),
                    burn::tensor::Slice::from(0..len * d),
                ],
            ),
            [batch, len, d],
        );
        let h_prev = if len == 1 {
            reshape(h0, [batch, 1, d])
        } else {
            cat(
                vec![reshape(h0, [batch, 1, d]), steps(h_seq, 0, len - 1)],
                1,
            )
        };
        // [B·T, H, d_h] → [H, d_h, B·T]; [B·T, 4, H, d_h] → [H, B·T, 4·d_h].
        let h_prev = CubeBackend::float_permute(reshape(h_prev, [rows, heads, dh]), &[1, 2, 0]);
        let d_gates =
            CubeBackend::float_permute(reshape(d_pre.clone(), [rows, 4, heads, dh]), &[2, 0, 1, 3]);
        let d_gates = reshape(
            input(d_gates, "sLSTM gate gradients"),
            [heads, rows, 4 * dh],
        );
        let d_r = matmul(h_prev, d_gates);
        [d_pre, d_r, d_h0, d_c0, d_n0, d_m0]
    }
}
