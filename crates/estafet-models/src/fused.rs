//! Whole recurrences as **one** autodiff op each, with hand-written backwards, computed by host
//! kernels on the CPU backends (burn's backend extension routes [`FusedOps`]):
//!
//! - [`cell_scan`]: an Elman, LSTM or GRU layer over the whole sequence (BPTT backward);
//! - [`selective_scan`]: Mamba's S6 scan with its `C` contraction;
//! - [`wkv4`]: RWKV-4's WKV in the official kernel's running-max form.
//!
//! Built from ordinary tensor ops, a recurrence records ~10 small ops per time step in the
//! autodiff graph and the backward walks them again: at `B = 32, H = 256` op dispatch and
//! allocation, not arithmetic, set the pace. For the cells, the input projection of every step
//! `xp = x W_i + b_i` is one GEMM, then a loop of `hp = h_{t-1} W_h + b_h` (one GEMM per step)
//! and the cell's elementwise update. The backward is one reverse loop of the elementwise
//! derivatives and `dh_{t-1} = dhp W_hᵀ` (one GEMM per step), then `dW_h`, `dW_i` and `dx` as
//! single GEMMs over all `B·T` rows. Sequences are independent, so the batch is cut into one
//! block per thread (the scans: one sequence per task) and each runs its time loop alone.
//!
//! ```text
//! cell_scan out [B, T, S·H]    S = 2 for the LSTM (h_t then c_t on the last axis), 1 otherwise
//! ```
//!
//! Each model's tensor-op forms (`forward_sequential`, `forward_with`) are the definition;
//! `tests/forms.rs` compares every op here with them in values, final states and every gradient.
//! Backends without the kernels (`has_kernel` false: wgpu) run those forms. This file and
//! `estafet-experiments/src/backend.rs` are the only places that name backends: the latter picks
//! one, this one says which run the host kernels.

// NdArray is deprecated in burn 0.22 but still estafet's reference backend; the extension
// macro's generated code names it, so the allowance covers the module.
#![allow(deprecated)]

use std::sync::Arc;

use burn::backend::TensorMetadata;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::Device;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, backend_extension};
use burn::tensor::{Tensor, TensorData};

/// Which cell the kernel runs; the gate order is PyTorch's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell {
    /// Elman, `h_t = tanh(xp_t + hp_t)`.
    Tanh,
    /// Elman, `h_t = relu(xp_t + hp_t)`.
    Relu,
    /// Gates `(i, f, g, o)`.
    Lstm,
    /// Gates `(r, z, n)`; `n = tanh(xp_n + r ⊙ hp_n)` keeps `b_hn` inside the reset.
    Gru,
}

impl Cell {
    /// Pre-activations per hidden unit: `xp` is `[B, T, G·H]`, `W_h` `[H, G·H]`.
    pub fn gates(self) -> usize {
        match self {
            Cell::Tanh | Cell::Relu => 1,
            Cell::Lstm => 4,
            Cell::Gru => 3,
        }
    }

    /// Tensors per step in the op's output: `h_t`, and `c_t` for the LSTM.
    pub fn outputs(self) -> usize {
        match self {
            Cell::Lstm => 2,
            _ => 1,
        }
    }

    /// Activations per hidden unit the backward needs beyond the output: LSTM `(i, f, g, o)`,
    /// GRU `(r, z, n, hp_n)`.
    fn saved(self) -> usize {
        match self {
            Cell::Tanh | Cell::Relu => 0,
            Cell::Lstm | Cell::Gru => 4,
        }
    }
}

/// Whether `device`'s backend runs the host kernel (then models use [`cell_scan`]).
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
    ) -> FloatTensor<Self> {
        run_plain::<Self, Selective, 6>([delta, x, a, b, c, h0], ())
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
    ) -> FloatTensor<Self> {
        run_tracked::<B, C, Selective, 6>([delta, x, a, b, c, h0], ())
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
}

/// A cell layer's inputs on the host, row-major, and after a forward that keeps them, its output
/// and activations.
#[derive(Debug)]
struct CellScan {
    cell: Cell,
    batch: usize,
    len: usize,
    d_input: usize,
    hidden: usize,
    x: Vec<f32>,
    w_i: Vec<f32>,
    w_h: Vec<f32>,
    /// `b_i + b_h`, what the input share of the pre-activation carries (for the GRU's candidate,
    /// `b_in` alone: `b_hn` sits behind the reset gate).
    b_x: Vec<f32>,
    /// `b_h` for the GRU's candidate, zero elsewhere: what the hidden share carries.
    b_h: Vec<f32>,
    h0: Vec<f32>,
    c0: Vec<f32>,
    /// `[B, T, S·H]`, kept for the backward.
    out: Vec<f32>,
    /// `[B, T, 4H]` (LSTM `(i, f, g, o)`, GRU `(r, z, n, hp_n)`), kept for the backward.
    acts: Vec<f32>,
}

impl HostKernel<7> for CellScan {
    type Args = Cell;

    fn read<B: Backend>([x, w_i, b_i, w_h, b_h, h0, c0]: [&FloatTensor<B>; 7], cell: Cell) -> Self {
        let [batch, len, d_input] = dims3::<B>(x);
        let hidden = h0.shape().as_slice()[1];
        let gh = cell.gates() * hidden;
        assert!(len >= 1, "cell_scan needs T ≥ 1");
        let (b_i, b_h_all) = (read::<B>(b_i.clone()), read::<B>(b_h.clone()));
        let split = if cell == Cell::Gru { 2 * hidden } else { gh };
        let mut b_x = b_i;
        let mut b_h = vec![0.0f32; gh];
        for j in 0..gh {
            if j < split {
                b_x[j] += b_h_all[j];
            } else {
                b_h[j] = b_h_all[j];
            }
        }
        Self {
            cell,
            batch,
            len,
            d_input,
            hidden,
            x: read::<B>(x.clone()),
            w_i: read::<B>(w_i.clone()),
            w_h: read::<B>(w_h.clone()),
            b_x,
            b_h,
            h0: read::<B>(h0.clone()),
            c0: read::<B>(c0.clone()),
            out: Vec::new(),
            acts: Vec::new(),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len, self.cell.outputs() * self.hidden]
    }

    fn input_shapes(&self) -> [Vec<usize>; 7] {
        let (b, t, d, h) = (self.batch, self.len, self.d_input, self.hidden);
        let gh = self.cell.gates() * h;
        [
            vec![b, t, d],
            vec![d, gh],
            vec![gh],
            vec![h, gh],
            vec![gh],
            vec![b, h],
            vec![b, h],
        ]
    }

    fn forward(&mut self, keep: bool) -> Vec<f32> {
        let (out, acts) = forward(self, keep);
        if keep {
            (self.out, self.acts) = (out.clone(), acts);
        }
        out
    }

    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 7] {
        backward(self, d_out)
    }
}

fn dims3<B: Backend>(t: &FloatTensor<B>) -> [usize; 3] {
    let shape = t.shape();
    let dims: &[usize] = shape.as_slice();
    dims.try_into().expect("a [B, T, ·] tensor")
}

/// A CPU backend's tensor as host `f32`s. Their reads complete immediately.
fn read<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    let future = B::float_into_data(t);
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(data) => data
            .expect("reading a CPU tensor")
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 data"),
        std::task::Poll::Pending => panic!("cell_scan's host kernel runs on CPU backends only"),
    }
}

fn write<B: Backend>(values: Vec<f32>, shape: Vec<usize>, device: &Device<B>) -> FloatTensor<B> {
    B::float_from_data(TensorData::new(values, shape), device)
}

/// `dst [m, n] (= dst +) lhs [m, k] · rhs [k, n]`; each operand given by its pointer and its row
/// and column strides in elements, so transposes and rows inside `[B, T, ·]` need no copy.
///
/// # Safety
/// Every pointer must cover its operand under its strides; `dst` must not overlap the others.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract; gemm reads and writes only inside the strided operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// `σ(x)` through [`exp`] of `−|x|` (never overflows; vectorises).
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 { s } else { e * s }
}

/// `tanh(x)` as `(1 − e)/(1 + e)`, `e = e^{−2|x|}`, with the sign restored; below `|x| = 0.1`
/// the Taylor series to `x⁷` (relative error < 1e-8 there), where the quotient would lose
/// digits to cancellation.
#[inline(always)]
fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let e = exp(-2.0 * a);
    let a2 = a * a;
    let series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))));
    let t = if a < 0.1 {
        series
    } else {
        (1.0 - e) / (1.0 + e)
    };
    t.copysign(x)
}

/// Sequences per block: the batch is cut into one contiguous block of sequences per rayon
/// thread. Sequences are independent, so each block runs the whole time loop alone with
/// single-threaded GEMMs, with no synchronisation per step.
fn block_rows(batch: usize) -> usize {
    batch.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// `data` cut into blocks of `rows` sequences of `width` floats (an empty `data` gives empty
/// blocks, one per block of the batch).
fn blocks(data: &mut [f32], batch: usize, rows: usize, width: usize) -> Vec<&mut [f32]> {
    if data.is_empty() {
        return (0..batch.div_ceil(rows))
            .map(|_| Default::default())
            .collect();
    }
    data.chunks_mut(rows * width).collect()
}

/// The forward loop: returns `out [B, T, S·H]` and, when `save`, the activations
/// `[B, T, 4H]` the backward needs.
fn forward(i: &CellScan, save: bool) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let (bsz, t_len, h) = (i.batch, i.len, i.hidden);
    let sw = i.cell.outputs() * h;
    let aw = i.cell.saved() * h;
    let mut out = vec![0.0f32; bsz * t_len * sw];
    let mut acts = vec![0.0f32; if save { bsz * t_len * aw } else { 0 }];
    let rows = block_rows(bsz);
    let out_blocks = blocks(&mut out, bsz, rows, t_len * sw);
    let act_blocks = blocks(&mut acts, bsz, rows, t_len * aw);
    out_blocks
        .into_par_iter()
        .zip(act_blocks)
        .enumerate()
        .for_each(|(k, (out, acts))| forward_block(i, k * rows, out, acts));
    (out, acts)
}

/// [`forward`] for the sequences `first..` that `out` holds; `acts` empty when not saving.
fn forward_block(i: &CellScan, first: usize, out: &mut [f32], acts: &mut [f32]) {
    let (cell, t_len, h) = (i.cell, i.len, i.hidden);
    let gh = cell.gates() * h;
    let sw = cell.outputs() * h;
    let aw = cell.saved() * h;
    let (bsz, d) = (out.len() / (t_len * sw), i.d_input);
    let save = !acts.is_empty();
    // xp = x W_i + b_i (+ b_h) for every step of the block: one GEMM.
    let mut xp = vec![0.0f32; bsz * t_len * gh];
    for row in xp.chunks_exact_mut(gh) {
        row.copy_from_slice(&i.b_x);
    }
    // SAFETY: `x` rows of the block [B·T, D]; `w_i` [D, G·H]; `xp` [B·T, G·H].
    unsafe {
        matmul(
            [bsz * t_len, gh, d],
            xp.as_mut_ptr(),
            gh,
            true,
            (i.x.as_ptr().add(first * t_len * d), d, 1),
            (i.w_i.as_ptr(), gh, 1),
            gemm::Parallelism::None,
        )
    };
    let h0 = &i.h0[first * h..][..bsz * h];
    let c0 = &i.c0[first * h..][..bsz * h];
    let mut hp = vec![0.0f32; bsz * gh];
    // Where the activations go when the backward will not need them.
    let mut scratch = vec![0.0f32; aw];
    for t in 0..t_len {
        // hp = h_{t-1} W_h
        let (h_prev, h_prev_rs) = if t == 0 {
            (h0.as_ptr(), h)
        } else {
            // SAFETY: row (b, t − 1) of `out` starts at ((b·T + t − 1)·S·H).
            (unsafe { out.as_ptr().add((t - 1) * sw) }, t_len * sw)
        };
        // SAFETY: `hp` is [B, G·H]; `h_prev` B rows of H at stride `h_prev_rs`; `w` [H, G·H].
        unsafe {
            matmul(
                [bsz, gh, h],
                hp.as_mut_ptr(),
                gh,
                false,
                (h_prev, h_prev_rs, 1),
                (i.w_h.as_ptr(), gh, 1),
                gemm::Parallelism::None,
            )
        };
        for b in 0..bsz {
            let row = b * t_len + t;
            let x = &xp[row * gh..][..gh];
            let hpb = &mut hp[b * gh..][..gh];
            // hp_b ← xp + hp (+ b_hn) for every gate (the GRU's candidate keeps hp_n apart).
            let split = if cell == Cell::Gru { 2 * h } else { gh };
            let (joint, apart) = hpb.split_at_mut(split);
            joint.iter_mut().zip(&x[..split]).for_each(|(p, x)| *p += x);
            apart
                .iter_mut()
                .zip(&i.b_h[split..])
                .for_each(|(p, b)| *p += b);
            let pre = &hp[b * gh..][..gh];
            let (before, now) = out.split_at_mut(row * sw);
            let now = &mut now[..sw];
            match cell {
                Cell::Tanh => {
                    for j in 0..h {
                        now[j] = tanh(pre[j]);
                    }
                }
                Cell::Relu => {
                    for j in 0..h {
                        now[j] = pre[j].max(0.0);
                    }
                }
                Cell::Lstm => {
                    let c_prev = if t == 0 {
                        &c0[b * h..][..h]
                    } else {
                        &before[(row - 1) * sw + h..][..h]
                    };
                    let (h_now, c_now) = now.split_at_mut(h);
                    let a = if save {
                        &mut acts[row * aw..][..aw]
                    } else {
                        &mut scratch[..]
                    };
                    let (ai, rest) = a.split_at_mut(h);
                    let (af, rest) = rest.split_at_mut(h);
                    let (ag, ao) = rest.split_at_mut(h);
                    let (pi, pf, pg, po) = (
                        &pre[..h],
                        &pre[h..][..h],
                        &pre[2 * h..][..h],
                        &pre[3 * h..][..h],
                    );
                    let (c_now, h_now, c_prev) = (&mut c_now[..h], &mut h_now[..h], &c_prev[..h]);
                    for j in 0..h {
                        let (ig, fg, gg, og) =
                            (sigmoid(pi[j]), sigmoid(pf[j]), tanh(pg[j]), sigmoid(po[j]));
                        let c = fg * c_prev[j] + ig * gg;
                        c_now[j] = c;
                        h_now[j] = og * tanh(c);
                        (ai[j], af[j], ag[j], ao[j]) = (ig, fg, gg, og);
                    }
                }
                Cell::Gru => {
                    let h_prev = if t == 0 {
                        &h0[b * h..][..h]
                    } else {
                        &before[(row - 1) * sw..][..h]
                    };
                    let a = if save {
                        &mut acts[row * aw..][..aw]
                    } else {
                        &mut scratch[..]
                    };
                    let (ar, rest) = a.split_at_mut(h);
                    let (az, rest) = rest.split_at_mut(h);
                    let (an, ahn) = rest.split_at_mut(h);
                    let (pr, pz, phn) = (&pre[..h], &pre[h..][..h], &pre[2 * h..][..h]);
                    let (xn, now) = (&x[2 * h..][..h], &mut now[..h]);
                    for j in 0..h {
                        let r = sigmoid(pr[j]);
                        let z = sigmoid(pz[j]);
                        let n = tanh(xn[j] + r * phn[j]);
                        now[j] = n + z * (h_prev[j] - n);
                        (ar[j], az[j], an[j], ahn[j]) = (r, z, n, phn[j]);
                    }
                }
            }
        }
    }
}

/// Backpropagation through time given `d_out`, the gradient of `out`: the gradients of
/// `(x, W_i, b_i, W_h, b_h, h_0, c_0)`.
fn backward(i: &CellScan, d_out: &[f32]) -> [Vec<f32>; 7] {
    use rayon::prelude::*;
    let (cell, bsz, t_len, h) = (i.cell, i.batch, i.len, i.hidden);
    let gh = cell.gates() * h;
    // d pre-activations of the input share, and of the hidden share `hp` (equal but for the
    // GRU's candidate, where `hp_n` sits behind the reset gate).
    let mut d_xp = vec![0.0f32; bsz * t_len * gh];
    let mut d_hp_gru = vec![
        0.0f32;
        if cell == Cell::Gru {
            bsz * t_len * gh
        } else {
            0
        }
    ];
    // h_{t-1} of every step, the left factor of dW_h.
    let mut h_prev = vec![0.0f32; bsz * t_len * h];
    let mut d_h0 = vec![0.0f32; bsz * h];
    let mut d_c0 = vec![0.0f32; bsz * h];
    let rows = block_rows(bsz);
    let parts = blocks(&mut d_xp, bsz, rows, t_len * gh)
        .into_iter()
        .zip(blocks(&mut d_hp_gru, bsz, rows, t_len * gh))
        .zip(blocks(&mut h_prev, bsz, rows, t_len * h))
        .zip(blocks(&mut d_h0, bsz, rows, h))
        .zip(blocks(&mut d_c0, bsz, rows, h))
        .map(|((((a, b), c), d), e)| [a, b, c, d, e])
        .collect::<Vec<_>>();
    parts
        .into_par_iter()
        .enumerate()
        .for_each(|(k, part)| backward_block(i, k * rows, d_out, part));
    let d_hp = if cell == Cell::Gru { &d_hp_gru } else { &d_xp };
    let (rows_all, d) = (bsz * t_len, i.d_input);
    // dW_h = Σ_{b,t} h_{t-1}ᵀ dhp_t, dW_i = Σ_{b,t} x_tᵀ dxp_t, dx = dxp W_iᵀ: one GEMM each
    // over all B·T rows.
    let mut d_w_h = vec![0.0f32; h * gh];
    let mut d_w_i = vec![0.0f32; d * gh];
    let mut d_x = vec![0.0f32; rows_all * d];
    // SAFETY: `h_prev` [B·T, H] and `x` [B·T, D] read transposed; `d_hp`, `d_xp` [B·T, G·H];
    // `w_i` [D, G·H] read transposed; every destination sized by its shape.
    unsafe {
        matmul(
            [h, gh, rows_all],
            d_w_h.as_mut_ptr(),
            gh,
            false,
            (h_prev.as_ptr(), 1, h),
            (d_hp.as_ptr(), gh, 1),
            gemm::Parallelism::Rayon(0),
        );
        matmul(
            [d, gh, rows_all],
            d_w_i.as_mut_ptr(),
            gh,
            false,
            (i.x.as_ptr(), 1, d),
            (d_xp.as_ptr(), gh, 1),
            gemm::Parallelism::Rayon(0),
        );
        matmul(
            [rows_all, d, gh],
            d_x.as_mut_ptr(),
            d,
            false,
            (d_xp.as_ptr(), gh, 1),
            (i.w_i.as_ptr(), 1, gh),
            gemm::Parallelism::Rayon(0),
        );
    }
    let column_sums = |m: &[f32]| {
        let mut sums = vec![0.0f32; gh];
        for row in m.chunks_exact(gh) {
            sums.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        sums
    };
    let (d_b_i, d_b_h) = (column_sums(&d_xp), column_sums(d_hp));
    [d_x, d_w_i, d_b_i, d_w_h, d_b_h, d_h0, d_c0]
}

/// [`backward`] for the block of sequences starting at `first`; `part` holds its slices of
/// `d_xp`, `d_hp` (GRU only, else empty), `h_prev`, `d_h0` and `d_c0`.
fn backward_block(
    i: &CellScan,
    first: usize,
    d_out: &[f32],
    [d_xp, d_hp_gru, h_prev, dh_next, dc_next]: [&mut [f32]; 5],
) {
    let (cell, t_len, h) = (i.cell, i.len, i.hidden);
    let gh = cell.gates() * h;
    let sw = cell.outputs() * h;
    let aw = cell.saved() * h;
    let bsz = dh_next.len() / h;
    let out = &i.out[first * t_len * sw..][..bsz * t_len * sw];
    let d_out = &d_out[first * t_len * sw..][..bsz * t_len * sw];
    let acts = &i.acts[first * t_len * aw..][..bsz * t_len * aw];
    let h0 = &i.h0[first * h..][..bsz * h];
    let c0 = &i.c0[first * h..][..bsz * h];
    for b in 0..bsz {
        for t in 0..t_len {
            let src = if t == 0 {
                &h0[b * h..][..h]
            } else {
                &out[(b * t_len + t - 1) * sw..][..h]
            };
            h_prev[(b * t_len + t) * h..][..h].copy_from_slice(src);
        }
    }
    // dL/dh_t and dL/dc_t arriving from step t + 1 live in `dh_next`, `dc_next`.
    for t in (0..t_len).rev() {
        for b in 0..bsz {
            let row = b * t_len + t;
            let o = &out[row * sw..][..sw];
            let dout = &d_out[row * sw..][..sw];
            let dx = &mut d_xp[row * gh..][..gh];
            let dh_in = &mut dh_next[b * h..][..h];
            match cell {
                Cell::Tanh => {
                    for j in 0..h {
                        let dh = dout[j] + dh_in[j];
                        dx[j] = dh * (1.0 - o[j] * o[j]);
                    }
                }
                Cell::Relu => {
                    for j in 0..h {
                        let dh = dout[j] + dh_in[j];
                        dx[j] = if o[j] > 0.0 { dh } else { 0.0 };
                    }
                }
                Cell::Lstm => {
                    let a = &acts[row * aw..][..aw];
                    let (ai, af, ag, ao) =
                        (&a[..h], &a[h..][..h], &a[2 * h..][..h], &a[3 * h..][..h]);
                    let c_prev = if t == 0 {
                        &c0[b * h..][..h]
                    } else {
                        &out[(row - 1) * sw + h..][..h]
                    };
                    let (o_c, do_h, do_c) = (&o[h..][..h], &dout[..h], &dout[h..][..h]);
                    let dc_in = &mut dc_next[b * h..][..h];
                    let (dxi, rest) = dx.split_at_mut(h);
                    let (dxf, rest) = rest.split_at_mut(h);
                    let (dxg, dxo) = rest.split_at_mut(h);
                    let (dxg, dxo, dh_in) = (&mut dxg[..h], &mut dxo[..h], &mut dh_in[..h]);
                    for j in 0..h {
                        let (ig, fg, gg, og) = (ai[j], af[j], ag[j], ao[j]);
                        let tc = tanh(o_c[j]);
                        let dh = do_h[j] + dh_in[j];
                        let dc = do_c[j] + dc_in[j] + dh * og * (1.0 - tc * tc);
                        dxi[j] = dc * gg * ig * (1.0 - ig);
                        dxf[j] = dc * c_prev[j] * fg * (1.0 - fg);
                        dxg[j] = dc * ig * (1.0 - gg * gg);
                        dxo[j] = dh * tc * og * (1.0 - og);
                        dc_in[j] = dc * fg;
                    }
                }
                Cell::Gru => {
                    let a = &acts[row * aw..][..aw];
                    let dhp = &mut d_hp_gru[row * gh..][..gh];
                    let hp = &h_prev[row * h..][..h];
                    for j in 0..h {
                        let (r, z, n, hn) = (a[j], a[h + j], a[2 * h + j], a[3 * h + j]);
                        let dh = dout[j] + dh_in[j];
                        let dn = dh * (1.0 - z) * (1.0 - n * n);
                        let dz = dh * (hp[j] - n) * z * (1.0 - z);
                        let dr = dn * hn * r * (1.0 - r);
                        (dx[j], dx[h + j], dx[2 * h + j]) = (dr, dz, dn);
                        (dhp[j], dhp[h + j], dhp[2 * h + j]) = (dr, dz, dn * r);
                        // The direct path h_t = … + z ⊙ h_{t-1}; the GEMM below adds the rest.
                        dh_in[j] = dh * z;
                    }
                }
            }
        }
        // dh_{t-1} (+)= dhp_t W_hᵀ
        let d_hp: &[f32] = if cell == Cell::Gru { d_hp_gru } else { d_xp };
        // SAFETY: rows (b, t) of `d_hp` at stride T·G·H; `w` [H, G·H] read as its transpose.
        unsafe {
            matmul(
                [bsz, h, gh],
                dh_next.as_mut_ptr(),
                h,
                cell == Cell::Gru,
                (d_hp.as_ptr().add(t * gh), t_len * gh, 1),
                (i.w_h.as_ptr(), 1, gh),
                gemm::Parallelism::None,
            )
        };
    }
    if cell != Cell::Lstm {
        dc_next.fill(0.0);
    }
}

/// A host kernel with `N` input tensors and one output, and its backward: what
/// [`run_plain`] and [`run_tracked`] turn into a backend op.
trait HostKernel<const N: usize>: Sized + Send + Sync + std::fmt::Debug + 'static {
    /// The op's arguments that are not tensors.
    type Args;
    /// Reads the inputs to the host (checking their shapes).
    fn read<B: Backend>(inputs: [&FloatTensor<B>; N], args: Self::Args) -> Self;
    fn out_shape(&self) -> Vec<usize>;
    fn input_shapes(&self) -> [Vec<usize>; N];
    /// The output; with `keep`, the kernel also keeps what its backward needs beyond the inputs.
    fn forward(&mut self, keep: bool) -> Vec<f32>;
    /// The gradients of the inputs given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; N];
}

/// `K` on a CPU backend without autodiff.
fn run_plain<B: Backend, K: HostKernel<N>, const N: usize>(
    inputs: [FloatTensor<B>; N],
    args: K::Args,
) -> FloatTensor<B> {
    let device = inputs[0].device();
    let mut kernel = K::read::<B>(inputs.each_ref(), args);
    write::<B>(kernel.forward(false), kernel.out_shape(), &device)
}

/// `K` under autodiff: when any input is tracked, the kernel (its host-side inputs and what
/// its forward kept) is the state of one backward node that runs `K::backward`.
fn run_tracked<B: Backend, C: CheckpointStrategy, K: HostKernel<N>, const N: usize>(
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    args: K::Args,
) -> FloatTensor<Autodiff<B, C>> {
    let prep = HostBackward::<K>(std::marker::PhantomData)
        .prepare::<C>(inputs.each_ref().map(|t| t.node()))
        .compute_bound()
        .stateful();
    let device = inputs[0].primitive().device();
    let mut kernel = K::read::<B>(inputs.each_ref().map(|t| t.primitive()), args);
    match prep {
        OpsKind::Tracked(prep) => {
            let out = write::<B>(kernel.forward(true), kernel.out_shape(), &device);
            prep.finish((Arc::new(kernel), device), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(write::<B>(
            kernel.forward(false),
            kernel.out_shape(),
            &device,
        )),
    }
}

#[derive(Debug)]
struct HostBackward<K>(std::marker::PhantomData<K>);

impl<B: Backend, K: HostKernel<N>, const N: usize> Backward<B, N> for HostBackward<K> {
    type State = (Arc<K>, Device<B>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = read::<B>(grads.consume::<B>(&ops.node));
        let (kernel, device) = &ops.state;
        let results = kernel
            .backward(&d_out)
            .into_iter()
            .zip(kernel.input_shapes());
        for (parent, (values, shape)) in ops.parents.into_iter().zip(results) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, write::<B>(values, shape, device));
            }
        }
    }
}

/// Mamba's selective scan (S6) with its output contraction, one op:
///
/// ```text
/// h_t = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t ⊙ x_t) ⊗ B_t        h [B, M, N]
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
) -> Tensor<2> {
    Tensor::from_dispatch(<Dispatch as FusedOps>::selective_scan(
        delta.into_dispatch(),
        x.into_dispatch(),
        a.into_dispatch(),
        b.into_dispatch(),
        c.into_dispatch(),
        h0.into_dispatch(),
    ))
}

/// The selective scan's inputs on the host.
#[derive(Debug)]
struct Selective {
    batch: usize,
    len: usize,
    m: usize,
    n: usize,
    delta: Vec<f32>,
    x: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    h0: Vec<f32>,
}

impl Selective {
    /// One sequence's slices: `(delta, x, b, c, h0)`.
    fn sequence(&self, i: usize) -> [&[f32]; 5] {
        let (t, m, n) = (self.len, self.m, self.n);
        [
            &self.delta[i * t * m..][..t * m],
            &self.x[i * t * m..][..t * m],
            &self.b[i * t * n..][..t * n],
            &self.c[i * t * n..][..t * n],
            &self.h0[i * m * n..][..m * n],
        ]
    }

    /// Runs one sequence, handing `h_t` (`[M, N]`) to `visit` after each step; returns `h_T`.
    #[inline(always)]
    fn run(&self, i: usize, mut visit: impl FnMut(usize, &[f32])) -> Vec<f32> {
        let (t_len, m, n) = (self.len, self.m, self.n);
        let [delta, x, b, _, h0] = self.sequence(i);
        let mut h = h0.to_vec();
        for t in 0..t_len {
            let b_t = &b[t * n..][..n];
            for d in 0..m {
                let (dt, dx) = (delta[t * m + d], delta[t * m + d] * x[t * m + d]);
                let a_d = &self.a[d * n..][..n];
                let h_d = &mut h[d * n..][..n];
                for k in 0..n {
                    h_d[k] = exp(dt * a_d[k]) * h_d[k] + dx * b_t[k];
                }
            }
            visit(t, &h);
        }
        h
    }
}

impl HostKernel<6> for Selective {
    type Args = ();

    fn read<B: Backend>([delta, x, a, b, c, h0]: [&FloatTensor<B>; 6], (): ()) -> Self {
        let [batch, len, m] = dims3::<B>(delta);
        let n = a.shape().as_slice()[1];
        assert!(len >= 1, "selective_scan needs T ≥ 1");
        Self {
            batch,
            len,
            m,
            n,
            delta: read::<B>(delta.clone()),
            x: read::<B>(x.clone()),
            a: read::<B>(a.clone()),
            b: read::<B>(b.clone()),
            c: read::<B>(c.clone()),
            h0: read::<B>(h0.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len * self.m + self.m * self.n]
    }

    fn input_shapes(&self) -> [Vec<usize>; 6] {
        let (b, t, m, n) = (self.batch, self.len, self.m, self.n);
        [
            vec![b, t, m],
            vec![b, t, m],
            vec![m, n],
            vec![b, t, n],
            vec![b, t, n],
            vec![b, m, n],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (t_len, m, n) = (self.len, self.m, self.n);
        let width = t_len * m + m * n;
        let mut out = vec![0.0f32; self.batch * width];
        par_rows(&mut out, width, |i, row| {
            let c = self.sequence(i)[3];
            let (y, last) = row.split_at_mut(t_len * m);
            let h = self.run(i, |t, h| {
                let c_t = &c[t * n..][..n];
                for (d, y) in y[t * m..][..m].iter_mut().enumerate() {
                    *y = dot(&h[d * n..][..n], c_t);
                }
            });
            last.copy_from_slice(&h);
        });
        out
    }

    /// Gradients of `(delta, x, a, b, c, h0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 6] {
        let (bsz, t_len, m, n) = (self.batch, self.len, self.m, self.n);
        let width = t_len * m + m * n;
        // Per sequence: [dΔ (T·M) | dx (T·M) | dB (T·N) | dC (T·N) | dh0 (M·N) | dA (M·N)].
        let per = 2 * t_len * m + 2 * t_len * n + 2 * m * n;
        let mut parts = vec![0.0f32; bsz * per];
        par_rows(&mut parts, per, |i, part| {
            let [delta, x, b, c, _] = self.sequence(i);
            let d_y = &d_out[i * width..][..t_len * m];
            let mut hs = vec![0.0f32; (t_len + 1) * m * n];
            hs[..m * n].copy_from_slice(self.sequence(i)[4]);
            self.run(i, |t, h| hs[(t + 1) * m * n..][..m * n].copy_from_slice(h));
            let (d_delta, rest) = part.split_at_mut(t_len * m);
            let (d_x, rest) = rest.split_at_mut(t_len * m);
            let (d_b, rest) = rest.split_at_mut(t_len * n);
            let (d_c, rest) = rest.split_at_mut(t_len * n);
            let (d_h, d_a) = rest.split_at_mut(m * n);
            d_h.copy_from_slice(&d_out[i * width + t_len * m..][..m * n]);
            let (mut g_dt, mut g_drive) = (vec![0.0f32; n], vec![0.0f32; n]);
            for t in (0..t_len).rev() {
                let (h_prev, h_t) = hs[t * m * n..][..2 * m * n].split_at(m * n);
                let (b_t, c_t) = (&b[t * n..][..n], &c[t * n..][..n]);
                let d_b_t = &mut d_b[t * n..][..n];
                let d_c_t = &mut d_c[t * n..][..n];
                for d in 0..m {
                    let (dt, xv, dy) = (delta[t * m + d], x[t * m + d], d_y[t * m + d]);
                    let a_d = &self.a[d * n..][..n];
                    let d_a_d = &mut d_a[d * n..][..n];
                    let dh = &mut d_h[d * n..][..n];
                    let (hp, ht) = (&h_prev[d * n..][..n], &h_t[d * n..][..n]);
                    // Per-k terms of dL/dΔ through the decay and of dL/d(Δ x), summed after the
                    // loop so that it vectorises.
                    let (g_dt, g_drive) = (&mut g_dt[..n], &mut g_drive[..n]);
                    for k in 0..n {
                        d_c_t[k] += dy * ht[k];
                        let g = dh[k] + dy * c_t[k]; // dL/dh_t
                        let decay = exp(dt * a_d[k]);
                        let g_log = g * hp[k] * decay; // dL/d(Δ A)
                        g_dt[k] = g_log * a_d[k];
                        d_a_d[k] += g_log * dt;
                        g_drive[k] = g * b_t[k];
                        d_b_t[k] += g * dt * xv;
                        dh[k] = g * decay;
                    }
                    let (g_dt, g_drive) = (g_dt.iter().sum::<f32>(), g_drive.iter().sum::<f32>());
                    d_delta[t * m + d] = g_dt + g_drive * xv;
                    d_x[t * m + d] = g_drive * dt;
                }
            }
        });
        let (tm, tn) = (t_len * m, t_len * n);
        let section = |offset, len| Sections {
            parts: &parts,
            per,
            offset,
            len,
        };
        [
            section(0, tm).gather(),
            section(tm, tm).gather(),
            section(per - m * n, m * n).sum(),
            section(2 * tm, tn).gather(),
            section(2 * tm + tn, tn).gather(),
            section(2 * tm + 2 * tn, m * n).gather(),
        ]
    }
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

/// The WKV's inputs on the host.
#[derive(Debug)]
struct Wkv4 {
    batch: usize,
    len: usize,
    d: usize,
    w: Vec<f32>,
    u: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    p: Vec<f32>,
}

/// One step's forward values for one channel, what the backward differentiates.
struct Wkv4Step {
    y: f32,
    /// e^{p−q}, e^{u+k−q}, and whether `p` won the max.
    e1: f32,
    e2: f32,
    p_won: bool,
    den: f32,
    /// e^{p−w−q'}, e^{k−q'}, and whether `p − w` won.
    f1: f32,
    f2: f32,
    decayed_won: bool,
    /// The state after the step.
    a: f32,
    b: f32,
    p: f32,
}

/// One step of one channel from state `(a, b, p)`.
#[inline(always)]
fn wkv4_step(w: f32, u: f32, k: f32, v: f32, a: f32, b: f32, p: f32) -> Wkv4Step {
    let uk = u + k;
    let p_won = p > uk;
    let q = if p_won { p } else { uk };
    let (e1, e2) = (exp(p - q), exp(uk - q));
    let den = e1 * b + e2;
    let y = (e1 * a + e2 * v) / den;
    let decayed = p - w;
    let decayed_won = decayed > k;
    let q = if decayed_won { decayed } else { k };
    let (f1, f2) = (exp(decayed - q), exp(k - q));
    Wkv4Step {
        y,
        e1,
        e2,
        p_won,
        den,
        f1,
        f2,
        decayed_won,
        a: f1 * a + f2 * v,
        b: f1 * b + f2,
        p: q,
    }
}

impl HostKernel<7> for Wkv4 {
    type Args = ();

    fn read<B: Backend>([w, u, k, v, a, b, p]: [&FloatTensor<B>; 7], (): ()) -> Self {
        let [batch, len, d] = dims3::<B>(k);
        assert!(len >= 1, "wkv4 needs T ≥ 1");
        Self {
            batch,
            len,
            d,
            w: read::<B>(w.clone()),
            u: read::<B>(u.clone()),
            k: read::<B>(k.clone()),
            v: read::<B>(v.clone()),
            a: read::<B>(a.clone()),
            b: read::<B>(b.clone()),
            p: read::<B>(p.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len * self.d + 3 * self.d]
    }

    fn input_shapes(&self) -> [Vec<usize>; 7] {
        let (b, t, d) = (self.batch, self.len, self.d);
        [
            vec![d],
            vec![d],
            vec![b, t, d],
            vec![b, t, d],
            vec![b, d],
            vec![b, d],
            vec![b, d],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (t_len, d) = (self.len, self.d);
        let width = t_len * d + 3 * d;
        let mut out = vec![0.0f32; self.batch * width];
        par_rows(&mut out, width, |i, row| {
            let (y, state) = row.split_at_mut(t_len * d);
            let (a, rest) = state.split_at_mut(d);
            let (b, p) = rest.split_at_mut(d);
            a.copy_from_slice(&self.a[i * d..][..d]);
            b.copy_from_slice(&self.b[i * d..][..d]);
            p.copy_from_slice(&self.p[i * d..][..d]);
            for t in 0..t_len {
                let (k, v) = (
                    &self.k[(i * t_len + t) * d..][..d],
                    &self.v[(i * t_len + t) * d..][..d],
                );
                for c in 0..d {
                    let s = wkv4_step(self.w[c], self.u[c], k[c], v[c], a[c], b[c], p[c]);
                    (y[t * d + c], a[c], b[c], p[c]) = (s.y, s.a, s.b, s.p);
                }
            }
        });
        out
    }

    /// Gradients of `(w, u, k, v, a, b, p)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 7] {
        let (bsz, t_len, d) = (self.batch, self.len, self.d);
        let width = t_len * d + 3 * d;
        // Per sequence: [dk (T·D) | dv (T·D) | da | db | dp | dw | du] (each D).
        let per = 2 * t_len * d + 5 * d;
        let mut parts = vec![0.0f32; bsz * per];
        par_rows(&mut parts, per, |i, part| {
            let (d_k, rest) = part.split_at_mut(t_len * d);
            let (d_v, rest) = rest.split_at_mut(t_len * d);
            let (ga, rest) = rest.split_at_mut(d);
            let (gb, rest) = rest.split_at_mut(d);
            let (gp, rest) = rest.split_at_mut(d);
            let (d_w, d_u) = rest.split_at_mut(d);
            let g_out = &d_out[i * width..][..width];
            ga.copy_from_slice(&g_out[t_len * d..][..d]);
            gb.copy_from_slice(&g_out[t_len * d + d..][..d]);
            gp.copy_from_slice(&g_out[t_len * d + 2 * d..][..d]);
            // The state before every step: [T + 1][a | b | p].
            let mut states = vec![0.0f32; (t_len + 1) * 3 * d];
            states[..d].copy_from_slice(&self.a[i * d..][..d]);
            states[d..2 * d].copy_from_slice(&self.b[i * d..][..d]);
            states[2 * d..3 * d].copy_from_slice(&self.p[i * d..][..d]);
            for t in 0..t_len {
                let row = (i * t_len + t) * d;
                let (prev, next) = states[t * 3 * d..][..6 * d].split_at_mut(3 * d);
                for c in 0..d {
                    let s = wkv4_step(
                        self.w[c],
                        self.u[c],
                        self.k[row + c],
                        self.v[row + c],
                        prev[c],
                        prev[d + c],
                        prev[2 * d + c],
                    );
                    (next[c], next[d + c], next[2 * d + c]) = (s.a, s.b, s.p);
                }
            }
            for t in (0..t_len).rev() {
                let row = (i * t_len + t) * d;
                let prev = &states[t * 3 * d..][..3 * d];
                for c in 0..d {
                    let (a0, b0, p0) = (prev[c], prev[d + c], prev[2 * d + c]);
                    let (k, v) = (self.k[row + c], self.v[row + c]);
                    let s = wkv4_step(self.w[c], self.u[c], k, v, a0, b0, p0);
                    let (g_a, g_b, g_p) = (ga[c], gb[c], gp[c]);
                    // The state update.
                    let g_f1 = g_a * a0 + g_b * b0;
                    let g_f2 = g_a * v + g_b;
                    let mut n_a = g_a * s.f1;
                    let mut n_b = g_b * s.f1;
                    let mut g_v = g_a * s.f2;
                    let g_q = g_p - g_f1 * s.f1 - g_f2 * s.f2;
                    let mut g_decayed = g_f1 * s.f1;
                    let mut g_k = g_f2 * s.f2;
                    if s.decayed_won {
                        g_decayed += g_q;
                    } else {
                        g_k += g_q;
                    }
                    let mut n_p = g_decayed;
                    d_w[c] -= g_decayed;
                    // The output.
                    let g_y = g_out[t * d + c];
                    let g_num = g_y / s.den;
                    let g_den = -g_y * s.y / s.den;
                    let g_e1 = g_num * a0 + g_den * b0;
                    let g_e2 = g_num * v + g_den;
                    n_a += g_num * s.e1;
                    n_b += g_den * s.e1;
                    g_v += g_num * s.e2;
                    let g_q = -(g_e1 * s.e1 + g_e2 * s.e2);
                    n_p += g_e1 * s.e1;
                    let mut g_uk = g_e2 * s.e2;
                    if s.p_won {
                        n_p += g_q;
                    } else {
                        g_uk += g_q;
                    }
                    d_u[c] += g_uk;
                    g_k += g_uk;
                    d_k[t * d + c] = g_k;
                    d_v[t * d + c] = g_v;
                    (ga[c], gb[c], gp[c]) = (n_a, n_b, n_p);
                }
            }
        });
        let td = t_len * d;
        let section = |offset, len| Sections {
            parts: &parts,
            per,
            offset,
            len,
        };
        [
            section(2 * td + 3 * d, d).sum(),
            section(2 * td + 4 * d, d).sum(),
            section(0, td).gather(),
            section(td, td).gather(),
            section(2 * td, d).gather(),
            section(2 * td + d, d).gather(),
            section(2 * td + 2 * d, d).gather(),
        ]
    }
}

/// One section (`offset..offset + len`) of every sequence's `per`-float block of per-sequence
/// gradients, which the kernels' backwards write in parallel.
struct Sections<'a> {
    parts: &'a [f32],
    per: usize,
    offset: usize,
    len: usize,
}

impl Sections<'_> {
    /// The section of every sequence, in batch order: a per-sequence input's gradient.
    fn gather(&self) -> Vec<f32> {
        self.parts
            .chunks_exact(self.per)
            .flat_map(|part| part[self.offset..][..self.len].iter().copied())
            .collect()
    }

    /// The section summed over sequences: a shared parameter's gradient.
    fn sum(&self) -> Vec<f32> {
        let mut total = vec![0.0f32; self.len];
        for part in self.parts.chunks_exact(self.per) {
            let part = &part[self.offset..][..self.len];
            total.iter_mut().zip(part).for_each(|(s, v)| *s += v);
        }
        total
    }
}

/// Calls `f(i, row)` for each `width`-long row of `data`, rows in parallel on rayon's pool.
fn par_rows(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    data.par_chunks_mut(width)
        .enumerate()
        .for_each(|(i, row)| f(i, row));
}

/// `Σ a_k b_k` in eight independent lanes, so that it vectorises (a plain float sum is a
/// serial chain the compiler may not reorder).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a8.zip(b8) {
        for k in 0..8 {
            lanes[k] += a[k] * b[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `eˣ` for `x ≤ 0` to a relative 3e-7 (2–3 ulp), written so that loops over it vectorise
/// with baseline SSE2 (std's `exp` is a libm call per element, which dominated the scans).
/// Range reduction `x = k ln 2 + r`, `|r| ≤ ln2/2`, then a degree-7 Taylor polynomial of `eʳ`;
/// below −87 the result is 0 (where `exp` gives a subnormal).
#[inline(always)]
fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 0.0);
    // Round to nearest through the 1.5·2²³ trick: no SSE4.1 `round` needed.
    let shifted = xc * std::f32::consts::LOG2_E + 12_582_912.0;
    let k = shifted - 12_582_912.0;
    let r = xc - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2ᵏ: `shifted`'s low mantissa bits hold k (two's complement); adding the bias 127 and
    // shifting it into the exponent field is integer arithmetic, which vectorises (a float to
    // integer `as` cast saturates, which does not).
    let y = p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    if x < -87.0 { 0.0 } else { y }
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
fn bias(linear: &burn::nn::Linear) -> Tensor<1> {
    linear.bias.as_ref().map_or_else(
        || {
            let [_, n] = linear.weight.dims();
            Tensor::zeros([n], &linear.weight.device())
        },
        |b| b.val(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Init;
    use crate::gru::GruConfig;
    use crate::lstm::LstmConfig;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;

    /// Batches that do not split evenly into per-thread blocks (B = 3, 5 on any pool of two or
    /// more threads) give what the sequential form gives, gradients included.
    #[test]
    fn uneven_batch_blocks_agree_with_sequential() {
        let dev = device();
        let lstm = LstmConfig {
            d_input: 3,
            d_hidden: 4,
            forget_bias: 1.0,
        }
        .init(&mut Init::new(1, &dev));
        let gru = GruConfig {
            d_input: 3,
            d_hidden: 4,
        }
        .init(&mut Init::new(2, &dev));
        for batch in [3, 5] {
            let x = Tensor::<3>::random([batch, 6, 3], Distribution::Normal(0.0, 1.0), &dev);
            let r = Tensor::<3>::random([batch, 6, 4], Distribution::Normal(0.0, 1.0), &dev);
            let run = |fused: bool, lstm_cell: bool| {
                let x = x.clone().detach().require_grad();
                let y = match (lstm_cell, fused) {
                    (true, true) => lstm.forward(x.clone(), None).0,
                    (true, false) => lstm.forward_sequential(x.clone(), None).0,
                    (false, true) => gru.forward(x.clone(), None).0,
                    (false, false) => gru.forward_sequential(x.clone(), None).0,
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                (y, x.grad(&grads).unwrap())
            };
            for lstm_cell in [true, false] {
                let (y, dx) = run(true, lstm_cell);
                let (y_ref, dx_ref) = run(false, lstm_cell);
                assert!(max_diff(y, y_ref) < 1e-5, "B {batch}, lstm {lstm_cell}: y");
                assert!(
                    max_diff(dx, dx_ref) < 1e-5,
                    "B {batch}, lstm {lstm_cell}: dx"
                );
            }
        }
    }

    /// The vectorisable `exp`, `σ` and `tanh` against std's, over the range the kernels use.
    #[test]
    fn fast_transcendentals_are_accurate() {
        for i in 0..=20_000 {
            let x = -100.0 + i as f32 * 0.01;
            if x <= 0.0 {
                let e = x.exp();
                assert!(
                    (exp(x) - e).abs() <= 3e-7 * e + 2.0 * f32::MIN_POSITIVE,
                    "exp({x})"
                );
            }
            let s = 1.0 / (1.0 + (-x).exp());
            assert!((sigmoid(x) - s).abs() <= 3e-7, "σ({x})");
            assert!((tanh(x) - x.tanh()).abs() <= 3e-7, "tanh({x})");
            let small = x * 1e-3;
            let t = small.tanh();
            assert!(
                (tanh(small) - t).abs() <= 1e-6 * t.abs() + 1e-12,
                "tanh({small})"
            );
        }
    }
}
