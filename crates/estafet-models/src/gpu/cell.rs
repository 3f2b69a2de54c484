//! The classic cells' layer (Elman tanh/relu, LSTM, GRU) on the GPU, with backpropagation
//! through time inside one backward kernel. The equations are the CPU kernel's (`fused/cell.rs`),
//! PyTorch's gate order:
//!
//! ```text
//! xp = x W_i + b_i                    one product over all B·T rows (burn's matmul)
//! hp_t = h_{t−1} W_h + b_h            inside the kernel, every step
//! Elman  h_t = tanh | relu(xp_t + hp_t)
//! LSTM   (i, f, g, o) = (σ, σ, tanh, σ)(xp_t + hp_t);  c_t = f c_{t−1} + i g;  h_t = o tanh(c_t)
//! GRU    (r, z) = σ(xp_t + hp_t);  n = tanh(xp_n + r ⊙ hp_n);  h_t = n + z (h_{t−1} − n)
//! ```
//!
//! One cube per sequence; its units share the channels (unit `u` takes `u, u + U, …`). The
//! previous `h` sits in shared memory (two buffers, swapped each step, so one barrier per step
//! suffices); `W_h` is read from global memory, the same row for every unit of a step, which
//! the caches serve. The backward walks time in reverse in the same layout: each unit forms its
//! channels' pre-activation gradients from the kept activations, the cube shares them, and each
//! unit takes `dh_{t−1} = dhp_t W_hᵀ` for its channels. `dx`, `dW_i`, `dW_h` and the biases'
//! gradients are then single products over all `B·T` rows. The forward needs `2H` floats of
//! shared memory and the backward `G·H` (each unit keeps its channels' carried `dh`, `dc` in
//! registers; two barriers per step): [`fits`] says whether a device has them, and the models
//! run their tensor-op definition where it does not.

use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::activations::{sigmoid, tanh};
use super::tensors::{
    add_row, cat, column_sums, columns, dims, empty, input, matmul, reshape, steps, transpose,
    units_per_cube,
};
use super::tracked::CubeKernel;
use crate::fused::Cell;

const TANH: u32 = 0;
const RELU: u32 = 1;
const LSTM: u32 = 2;
const GRU: u32 = 3;

fn code(cell: Cell) -> u32 {
    match cell {
        Cell::Tanh => TANH,
        Cell::Relu => RELU,
        Cell::Lstm => LSTM,
        Cell::Gru => GRU,
    }
}

/// Activations per hidden unit the backward reads beyond the output: LSTM `(i, f, g, o)`, GRU
/// `(r, z, n, hp_n)`; the Elman cell's derivative needs only `h_t`.
fn saved(cell: Cell) -> usize {
    match cell {
        Cell::Tanh | Cell::Relu => 0,
        Cell::Lstm | Cell::Gru => 4,
    }
}

/// Shared-memory floats of the larger of the two kernels: the forward's `h` (two halves), the
/// backward's step of pre-activation gradients.
fn shared_floats(cell: Cell, hidden: usize) -> usize {
    cell.gates().max(2) * hidden
}

/// Whether the kernels run a cell of width `hidden` on `device` (its shared memory holds their
/// buffers).
pub(super) fn fits(device: &burn_cubecl::CubeDevice, cell: Cell, hidden: usize) -> bool {
    let floats = device.client().properties().hardware.max_shared_memory_size / 4;
    shared_floats(cell, hidden) <= floats
}

/// Loop iterations of one unit of the larger kernel (the backward) over `len` steps: each of its
/// `⌈H / U⌉` channels reads `G·H` hidden-share gradients per step.
pub(super) fn loop_iterations(
    device: &burn_cubecl::CubeDevice,
    cell: Cell,
    hidden: usize,
    len: usize,
) -> usize {
    let strides = hidden.div_ceil(units_per_cube(device, hidden) as usize);
    len * (strides * (cell.gates() * hidden + 2) + 2) + 2 * strides
}

/// `xp [B, T, G·H]`, `w_h [H, G·H]`, `b_h [G·H]`, `h0`, `c0 [B, H]` → `out [B, T, S·H]` and, when
/// `save`, `acts [B, T, 4H]`. Cube `n` runs sequence `n`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    xp: &Tensor<f32>,
    w_h: &Tensor<f32>,
    b_h: &Tensor<f32>,
    h0: &Tensor<f32>,
    c0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    acts: &mut Tensor<f32>,
    #[comptime] cell: u32,
    #[comptime] hidden: usize,
    #[comptime] save: bool,
    #[comptime] units: usize,
) {
    let n = CUBE_POS_X as usize;
    // Each unit takes channels `u, u + U, …`.
    let strides = comptime![hidden.div_ceil(units)];
    let len = xp.shape(1);
    let gh = xp.shape(2);
    let sw = out.shape(2);
    // h_{t−1} in one half, h_t written to the other.
    let mut hs = Shared::<[f32]>::new_slice(2 * hidden);
    for stride in 0..strides {
        let j = UNIT_POS_X as usize + stride * units;
        if j < hidden {
            hs[j] = h0[n * hidden + j];
        }
    }
    sync_cube();
    for t in 0..len {
        let cur = (t % 2) * hidden;
        let next = hidden - cur;
        let row = n * len + t;
        let x = row * gh;
        let o = row * sw;
        for stride in 0..strides {
            let j = UNIT_POS_X as usize + stride * units;
            if j < hidden {
                // hp = h_{t−1} W_h + b_h for this channel's gates.
                let mut p0 = b_h[j];
                let mut p1 = 0.0f32;
                let mut p2 = 0.0f32;
                let mut p3 = 0.0f32;
                if comptime![cell >= LSTM] {
                    p1 = b_h[hidden + j];
                    p2 = b_h[2 * hidden + j];
                }
                if comptime![cell == LSTM] {
                    p3 = b_h[3 * hidden + j];
                }
                for k in 0..hidden {
                    let hk = hs[cur + k];
                    let w = k * gh + j;
                    p0 += hk * w_h[w];
                    if comptime![cell >= LSTM] {
                        p1 += hk * w_h[w + hidden];
                        p2 += hk * w_h[w + 2 * hidden];
                    }
                    if comptime![cell == LSTM] {
                        p3 += hk * w_h[w + 3 * hidden];
                    }
                }
                if comptime![cell == TANH] {
                    let h = tanh(xp[x + j] + p0);
                    out[o + j] = h;
                    hs[next + j] = h;
                } else if comptime![cell == RELU] {
                    let mut h = xp[x + j] + p0;
                    if h < 0.0 {
                        h = 0.0;
                    }
                    out[o + j] = h;
                    hs[next + j] = h;
                } else if comptime![cell == LSTM] {
                    let ig = sigmoid(xp[x + j] + p0);
                    let fg = sigmoid(xp[x + hidden + j] + p1);
                    let gg = tanh(xp[x + 2 * hidden + j] + p2);
                    let og = sigmoid(xp[x + 3 * hidden + j] + p3);
                    let mut c_prev = c0[n * hidden + j];
                    if t > 0 {
                        c_prev = out[o - sw + hidden + j];
                    }
                    let c = fg * c_prev + ig * gg;
                    let h = og * tanh(c);
                    out[o + j] = h;
                    out[o + hidden + j] = c;
                    hs[next + j] = h;
                    if comptime![save] {
                        let a = row * 4 * hidden + j;
                        acts[a] = ig;
                        acts[a + hidden] = fg;
                        acts[a + 2 * hidden] = gg;
                        acts[a + 3 * hidden] = og;
                    }
                } else {
                    let r = sigmoid(xp[x + j] + p0);
                    let z = sigmoid(xp[x + hidden + j] + p1);
                    let nn = tanh(xp[x + 2 * hidden + j] + r * p2);
                    let h = nn + z * (hs[cur + j] - nn);
                    out[o + j] = h;
                    hs[next + j] = h;
                    if comptime![save] {
                        let a = row * 4 * hidden + j;
                        acts[a] = r;
                        acts[a + hidden] = z;
                        acts[a + 2 * hidden] = nn;
                        acts[a + 3 * hidden] = p2;
                    }
                }
            }
        }
        sync_cube();
    }
}

/// Given `d_out [B, T, S·H]`: `d_xp [B, T, G·H]` (the input share's pre-activation gradient),
/// `d_hp [B, T, G·H]` (the hidden share's; the GRU's differs in `n`, the others leave it
/// unwritten and use `d_xp`), `d_h0` and `d_c0` `[B, H]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    w_h: &Tensor<f32>,
    h0: &Tensor<f32>,
    c0: &Tensor<f32>,
    out: &Tensor<f32>,
    acts: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_xp: &mut Tensor<f32>,
    d_hp: &mut Tensor<f32>,
    d_h0: &mut Tensor<f32>,
    d_c0: &mut Tensor<f32>,
    #[comptime] cell: u32,
    #[comptime] hidden: usize,
    #[comptime] gates: usize,
    #[comptime] units: usize,
) {
    let n = CUBE_POS_X as usize;
    let strides = comptime![hidden.div_ceil(units)];
    let len = d_out.shape(1);
    let sw = d_out.shape(2);
    let gh = gates * hidden;
    // This step's hidden-share gradients, shared by the cube; each channel's dh and dc arriving
    // from step t + 1 in its unit's registers (channel `u + s·U` at index `s`).
    let mut dg = Shared::<[f32]>::new_slice(gates * hidden);
    let mut dh = Array::<f32>::new(strides);
    let mut dc = Array::<f32>::new(strides);
    for stride in 0..strides {
        dh[stride] = 0.0;
        dc[stride] = 0.0;
    }
    for i in 0..len {
        let t = len - 1 - i;
        let row = n * len + t;
        let o = row * sw;
        let g = row * gh;
        for stride in 0..strides {
            let j = UNIT_POS_X as usize + stride * units;
            if j < hidden {
                let dh_t = d_out[o + j] + dh[stride];
                if comptime![cell == TANH] {
                    let h = out[o + j];
                    let d = dh_t * (1.0 - h * h);
                    d_xp[g + j] = d;
                    dg[j] = d;
                    dh[stride] = 0.0;
                } else if comptime![cell == RELU] {
                    let mut d = 0.0f32;
                    if out[o + j] > 0.0 {
                        d = dh_t;
                    }
                    d_xp[g + j] = d;
                    dg[j] = d;
                    dh[stride] = 0.0;
                } else if comptime![cell == LSTM] {
                    let a = row * 4 * hidden + j;
                    let ig = acts[a];
                    let fg = acts[a + hidden];
                    let gg = acts[a + 2 * hidden];
                    let og = acts[a + 3 * hidden];
                    let mut c_prev = c0[n * hidden + j];
                    if t > 0 {
                        c_prev = out[o - sw + hidden + j];
                    }
                    let tc = tanh(out[o + hidden + j]);
                    let dc_t = d_out[o + hidden + j] + dc[stride] + dh_t * og * (1.0 - tc * tc);
                    let di = dc_t * gg * ig * (1.0 - ig);
                    let df = dc_t * c_prev * fg * (1.0 - fg);
                    let dgg = dc_t * ig * (1.0 - gg * gg);
                    let d_o = dh_t * tc * og * (1.0 - og);
                    d_xp[g + j] = di;
                    d_xp[g + hidden + j] = df;
                    d_xp[g + 2 * hidden + j] = dgg;
                    d_xp[g + 3 * hidden + j] = d_o;
                    dg[j] = di;
                    dg[hidden + j] = df;
                    dg[2 * hidden + j] = dgg;
                    dg[3 * hidden + j] = d_o;
                    dc[stride] = dc_t * fg;
                    dh[stride] = 0.0;
                } else {
                    let a = row * 4 * hidden + j;
                    let r = acts[a];
                    let z = acts[a + hidden];
                    let nn = acts[a + 2 * hidden];
                    let hp_n = acts[a + 3 * hidden];
                    let mut h_prev = h0[n * hidden + j];
                    if t > 0 {
                        h_prev = out[o - sw + j];
                    }
                    let dn = dh_t * (1.0 - z) * (1.0 - nn * nn);
                    let dr = dn * hp_n * r * (1.0 - r);
                    let dz = dh_t * (h_prev - nn) * z * (1.0 - z);
                    d_xp[g + j] = dr;
                    d_xp[g + hidden + j] = dz;
                    d_xp[g + 2 * hidden + j] = dn;
                    d_hp[g + j] = dr;
                    d_hp[g + hidden + j] = dz;
                    d_hp[g + 2 * hidden + j] = dn * r;
                    dg[j] = dr;
                    dg[hidden + j] = dz;
                    dg[2 * hidden + j] = dn * r;
                    // The direct path h_t = … + z h_{t−1}.
                    dh[stride] = dh_t * z;
                }
            }
        }
        sync_cube();
        // dh_{t−1} += dhp_t W_hᵀ for this unit's channels.
        for stride in 0..strides {
            let j = UNIT_POS_X as usize + stride * units;
            if j < hidden {
                let mut acc = 0.0f32;
                for m in 0..gh {
                    acc += w_h[j * gh + m] * dg[m];
                }
                dh[stride] += acc;
            }
        }
        // Every unit has read `dg` before the next step writes it.
        sync_cube();
    }
    for stride in 0..strides {
        let j = UNIT_POS_X as usize + stride * units;
        if j < hidden {
            d_h0[n * hidden + j] = dh[stride];
            d_c0[n * hidden + j] = dc[stride];
        }
    }
}

/// What the backward reads: the inputs but the biases, the output and (LSTM, GRU) the
/// activations.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    x: CubeTensor,
    w_i: CubeTensor,
    w_h: CubeTensor,
    h0: CubeTensor,
    c0: CubeTensor,
    out: CubeTensor,
    acts: CubeTensor,
}

/// The op: inputs `[x, w_i, b_i, w_h, b_h, h0, c0]`, output `[B, T, S·H]`.
#[derive(Debug)]
pub(super) struct CellScan;

impl CubeKernel<7> for CellScan {
    type Args = Cell;
    type Saved = Kept;

    fn forward(
        [x, w_i, b_i, w_h, b_h, h0, c0]: [CubeTensor; 7],
        cell: Cell,
        keep: bool,
    ) -> (CubeTensor, Option<Kept>) {
        let x = input(x, "cell_scan x");
        let [batch, len, d] = dims::<3>(&x);
        let [_, hidden] = dims::<2>(&h0);
        let gh = cell.gates() * hidden;
        assert!(len >= 1, "cell_scan needs T ≥ 1");
        assert_eq!(dims::<2>(&w_i), [d, gh], "W_i is [D, G·H]");
        assert_eq!(dims::<2>(&w_h), [hidden, gh], "W_h is [H, G·H]");
        let xp = add_row(
            matmul(reshape(x.clone(), [batch * len, d]), w_i.clone()),
            b_i,
        );
        let xp = input(reshape(xp, [batch, len, gh]), "cell_scan xp");
        let (w_h, b_h) = (input(w_h, "cell_scan W_h"), input(b_h, "cell_scan b_h"));
        let (h0, c0) = (input(h0, "cell_scan h0"), input(c0, "cell_scan c0"));
        let out = empty(&x, [batch, len, cell.outputs() * hidden]);
        let save = keep && saved(cell) > 0;
        let acts = empty(
            &x,
            if save {
                vec![batch, len, 4 * hidden]
            } else {
                vec![1]
            },
        );
        assert!(
            fits(&x.device, cell, hidden),
            "cell_scan: H = {hidden} needs more shared memory than the device has (runs() first)"
        );
        let units = units_per_cube(&x.device, hidden);
        forward_kernel::launch(
            &x.client.clone(),
            CubeCount::Static(batch as u32, 1, 1),
            CubeDim::new_1d(units),
            xp.into_tensor_arg(),
            w_h.clone().into_tensor_arg(),
            b_h.into_tensor_arg(),
            h0.clone().into_tensor_arg(),
            c0.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            acts.clone().into_tensor_arg(),
            code(cell),
            hidden,
            save,
            units as usize,
        );
        let kept = keep.then(|| Kept {
            x,
            w_i,
            w_h,
            h0,
            c0,
            out: out.clone(),
            acts,
        });
        (out, kept)
    }

    fn backward(kept: Kept, cell: Cell, d_out: CubeTensor) -> [CubeTensor; 7] {
        let Kept {
            x,
            w_i,
            w_h,
            h0,
            c0,
            out,
            acts,
        } = kept;
        let d_out = input(d_out, "cell_scan's output gradient");
        let [batch, len, d] = dims::<3>(&x);
        let [_, hidden] = dims::<2>(&h0);
        let gh = cell.gates() * hidden;
        let d_xp = empty(&x, [batch, len, gh]);
        let d_hp = empty(
            &x,
            if cell == Cell::Gru {
                vec![batch, len, gh]
            } else {
                vec![1]
            },
        );
        let (d_h0, d_c0) = (empty(&x, [batch, hidden]), empty(&x, [batch, hidden]));
        let units = units_per_cube(&x.device, hidden);
        backward_kernel::launch(
            &x.client.clone(),
            CubeCount::Static(batch as u32, 1, 1),
            CubeDim::new_1d(units),
            w_h.clone().into_tensor_arg(),
            h0.clone().into_tensor_arg(),
            c0.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            acts.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_xp.clone().into_tensor_arg(),
            d_hp.clone().into_tensor_arg(),
            d_h0.clone().into_tensor_arg(),
            d_c0.clone().into_tensor_arg(),
            code(cell),
            hidden,
            cell.gates(),
            units as usize,
        );
        let rows = batch * len;
        let d_xp = reshape(d_xp, [rows, gh]);
        let d_hp = if cell == Cell::Gru {
            reshape(d_hp, [rows, gh])
        } else {
            d_xp.clone()
        };
        // h_{t−1} for every row: h_0, then the outputs' h of steps 1..T−1.
        let h_prev = if len == 1 {
            h0
        } else {
            let earlier = steps(columns(out, 0, hidden), 0, len - 1);
            reshape(
                cat(vec![reshape(h0, [batch, 1, hidden]), earlier], 1),
                [rows, hidden],
            )
        };
        let x = reshape(x, [rows, d]);
        let dx = reshape(matmul(d_xp.clone(), transpose(w_i)), [batch, len, d]);
        let dw_i = matmul(transpose(x), d_xp.clone());
        let dw_h = matmul(transpose(h_prev), d_hp.clone());
        [
            dx,
            dw_i,
            column_sums(d_xp),
            dw_h,
            column_sums(d_hp),
            d_h0,
            d_c0,
        ]
    }
}
