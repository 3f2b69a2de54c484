//! The classic cells' layer (Elman tanh/relu, LSTM, GRU) as one kernel, input projection
//! included, with backpropagation through time:
//!
//! ```text
//! xp = x W_i + b_i                    one GEMM over all B·T rows
//! hp_t = h_{t−1} W_h + b_h            one GEMM per step
//! Elman  h_t = tanh | relu(xp_t + hp_t)
//! LSTM   (i, f, g, o) = (σ, σ, tanh, σ)(xp_t + hp_t);  c_t = f c_{t−1} + i g;  h_t = o tanh(c_t)
//! GRU    (r, z) = σ(xp_t + hp_t);  n = tanh(xp_n + r ⊙ hp_n);  h_t = n + z (h_{t−1} − n)
//! ```
//!
//! The backward is one reverse loop of the elementwise derivatives and `dh_{t−1} = dhp W_hᵀ`,
//! then `dW_h`, `dW_i` and `dx` as single GEMMs over all `B·T` rows. The definitions it is tested
//! against are the cells' `forward_sequential` (here, and in `tests/forms.rs`).

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{
    HostKernel, block_rows, blocks, column_sums, copied, dims3, matmul, matmul_sum_k, read, zeros,
};
use super::math::{sigmoid, tanh, vectorised};
use super::packed::PackedRhs;

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

/// A cell layer's inputs on the host, row-major, and after a forward that keeps them, its output
/// and activations.
#[derive(Debug)]
pub(super) struct CellScan {
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
        let (out, acts) = scan_forward(self, keep);
        if keep {
            (self.out, self.acts) = (copied(&out), acts);
        }
        out
    }

    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 7] {
        scan_backward(self, d_out)
    }
}

/// The forward loop: returns `out [B, T, S·H]` and, when `save`, the activations
/// `[B, T, 4H]` the backward needs.
fn scan_forward(i: &CellScan, save: bool) -> (Vec<f32>, Vec<f32>) {
    use rayon::prelude::*;
    let (bsz, t_len, h) = (i.batch, i.len, i.hidden);
    let sw = i.cell.outputs() * h;
    let aw = i.cell.saved() * h;
    let mut out = zeros(bsz * t_len * sw);
    let mut acts = zeros(if save { bsz * t_len * aw } else { 0 });
    let rows = block_rows(bsz);
    let out_blocks = blocks(&mut out, bsz, rows, t_len * sw);
    let act_blocks = blocks(&mut acts, bsz, rows, t_len * aw);
    let gh = i.cell.gates() * h;
    let w_i = PackedRhs::new(&i.w_i, [i.d_input, gh], (gh, 1));
    let w_h = PackedRhs::new(&i.w_h, [h, gh], (gh, 1));
    out_blocks
        .into_par_iter()
        .zip(act_blocks)
        .enumerate()
        .for_each(|(k, (out, acts))| {
            vectorised(
                #[inline(always)]
                || forward_block(i, [&w_i, &w_h], k * rows, out, acts),
            )
        });
    (out, acts)
}

/// [`scan_forward`] for the sequences `first..` that `out` holds; `acts` empty when not saving.
/// Inlined into each instruction-set copy of [`vectorised`].
#[inline(always)]
fn forward_block(
    i: &CellScan,
    [w_i, w_h]: [&PackedRhs; 2],
    first: usize,
    out: &mut [f32],
    acts: &mut [f32],
) {
    let (cell, t_len, h) = (i.cell, i.len, i.hidden);
    let gh = cell.gates() * h;
    let sw = cell.outputs() * h;
    let aw = cell.saved() * h;
    let (bsz, d) = (out.len() / (t_len * sw), i.d_input);
    let save = !acts.is_empty();
    let h0 = &i.h0[first * h..][..bsz * h];
    let c0 = &i.c0[first * h..][..bsz * h];
    let x_block = &i.x[first * t_len * d..][..bsz * t_len * d];
    // The input share of the pre-activations, one step at a time against the packed `W_i`: a
    // `[B·T, G·H]` buffer written by one GEMM up front and read back step by step cost more.
    let mut xp = vec![0.0f32; bsz * gh];
    let mut hp = vec![0.0f32; bsz * gh];
    // Where the activations go when the backward will not need them.
    let mut scratch = vec![0.0f32; aw];
    for t in 0..t_len {
        // xp = x_t W_i + b_i (+ b_h)
        for row in xp.chunks_exact_mut(gh) {
            row.copy_from_slice(&i.b_x);
        }
        // SAFETY: `xp` is [B, G·H]; `x_block` holds B rows of D at stride T·D from step t.
        unsafe {
            w_i.matmul(
                bsz,
                xp.as_mut_ptr(),
                gh,
                true,
                (x_block.as_ptr().add(t * d), t_len * d),
            )
        };
        // hp = h_{t-1} W_h
        let (h_prev, h_prev_rs) = if t == 0 {
            (h0.as_ptr(), h)
        } else {
            // SAFETY: row (b, t − 1) of `out` starts at ((b·T + t − 1)·S·H).
            (unsafe { out.as_ptr().add((t - 1) * sw) }, t_len * sw)
        };
        // SAFETY: `hp` is [B, G·H]; `h_prev` B rows of H at stride `h_prev_rs`.
        unsafe { w_h.matmul(bsz, hp.as_mut_ptr(), gh, false, (h_prev, h_prev_rs)) };
        for b in 0..bsz {
            let row = b * t_len + t;
            let x = &xp[b * gh..][..gh];
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
                Cell::Tanh | Cell::Relu => elman_step(cell, pre, now),
                Cell::Lstm => {
                    let c_prev = if t == 0 {
                        &c0[b * h..][..h]
                    } else {
                        &before[(row - 1) * sw + h..][..h]
                    };
                    let a = if save {
                        &mut acts[row * aw..][..aw]
                    } else {
                        &mut scratch[..]
                    };
                    lstm_step(pre, c_prev, now, a);
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
                    gru_step(pre, &x[2 * h..][..h], h_prev, now, a);
                }
            }
        }
    }
}

// The gate maths of one sequence's step. Each is a function of slices, inlined, because
// LLVM then knows its operands do not alias: written inline in the block loops, the dozen
// streams exceeded its budget of run-time alias checks and the loops ran scalar (a third of an
// LSTM step, `perf`, 2026-12-03). Every slice is cut to `h` so the loops carry no bounds checks.

/// Elman: `now` = `h_t` = tanh or relu of `pre` (`H` each).
#[inline(always)]
fn elman_step(cell: Cell, pre: &[f32], now: &mut [f32]) {
    let h = now.len();
    let pre = &pre[..h];
    if cell == Cell::Tanh {
        for j in 0..h {
            now[j] = tanh(pre[j]);
        }
    } else {
        for j in 0..h {
            now[j] = pre[j].max(0.0);
        }
    }
}

/// Elman's derivative: `dx` = dL/d pre-activation from `h_t` (`o`) and `dh = dout + dh_in`.
#[inline(always)]
fn elman_step_back(cell: Cell, o: &[f32], dout: &[f32], dh_in: &[f32], dx: &mut [f32]) {
    let h = dx.len();
    let (o, dout, dh_in) = (&o[..h], &dout[..h], &dh_in[..h]);
    if cell == Cell::Tanh {
        for j in 0..h {
            dx[j] = (dout[j] + dh_in[j]) * (1.0 - o[j] * o[j]);
        }
    } else {
        for j in 0..h {
            let dh = dout[j] + dh_in[j];
            dx[j] = if o[j] > 0.0 { dh } else { 0.0 };
        }
    }
}

/// LSTM: `pre` = `(i, f, g, o)` pre-activations `[4H]`; writes `now` = `(h_t, c_t)` `[2H]` and
/// the activations `a` = `(i, f, g, o)` `[4H]`.
#[inline(always)]
fn lstm_step(pre: &[f32], c_prev: &[f32], now: &mut [f32], a: &mut [f32]) {
    let h = c_prev.len();
    let (h_now, c_now) = now.split_at_mut(h);
    let (ai, rest) = a.split_at_mut(h);
    let (af, rest) = rest.split_at_mut(h);
    let (ag, ao) = rest.split_at_mut(h);
    let (ai, af, ag, ao) = (&mut ai[..h], &mut af[..h], &mut ag[..h], &mut ao[..h]);
    let (h_now, c_now) = (&mut h_now[..h], &mut c_now[..h]);
    let (pi, pf, pg, po) = (
        &pre[..h],
        &pre[h..][..h],
        &pre[2 * h..][..h],
        &pre[3 * h..][..h],
    );
    for j in 0..h {
        let (ig, fg, gg, og) = (sigmoid(pi[j]), sigmoid(pf[j]), tanh(pg[j]), sigmoid(po[j]));
        let c = fg * c_prev[j] + ig * gg;
        c_now[j] = c;
        h_now[j] = og * tanh(c);
        (ai[j], af[j], ag[j], ao[j]) = (ig, fg, gg, og);
    }
}

/// GRU: `pre` = `(r, z, hp_n)` `[3H]` (`hp_n` without `xp_n`), `xn` = `xp_n`; writes `now` =
/// `h_t` and the activations `a` = `(r, z, n, hp_n)` `[4H]`.
#[inline(always)]
fn gru_step(pre: &[f32], xn: &[f32], h_prev: &[f32], now: &mut [f32], a: &mut [f32]) {
    let h = h_prev.len();
    let (ar, rest) = a.split_at_mut(h);
    let (az, rest) = rest.split_at_mut(h);
    let (an, ahn) = rest.split_at_mut(h);
    let (ar, az, an, ahn) = (&mut ar[..h], &mut az[..h], &mut an[..h], &mut ahn[..h]);
    let (pr, pz, phn) = (&pre[..h], &pre[h..][..h], &pre[2 * h..][..h]);
    let (xn, now) = (&xn[..h], &mut now[..h]);
    for j in 0..h {
        let r = sigmoid(pr[j]);
        let z = sigmoid(pz[j]);
        let n = tanh(xn[j] + r * phn[j]);
        now[j] = n + z * (h_prev[j] - n);
        (ar[j], az[j], an[j], ahn[j]) = (r, z, n, phn[j]);
    }
}

/// The LSTM step's derivatives: from `dout` = `(dh_t, dc_t)` of the output, `dh_in`, `dc_in`
/// arriving from step t + 1, the saved `a` = `(i, f, g, o)` and `c_t`, writes `dx` = the
/// pre-activations' gradient `[4H]` and leaves `dc_{t−1}`'s direct share in `dc_in`.
#[inline(always)]
fn lstm_step_back(
    a: &[f32],
    c_prev: &[f32],
    c_now: &[f32],
    dout: &[f32],
    dh_in: &mut [f32],
    dc_in: &mut [f32],
    dx: &mut [f32],
) {
    let h = c_prev.len();
    let (ai, af, ag, ao) = (&a[..h], &a[h..][..h], &a[2 * h..][..h], &a[3 * h..][..h]);
    let (c_now, do_h, do_c) = (&c_now[..h], &dout[..h], &dout[h..][..h]);
    let (dh_in, dc_in) = (&mut dh_in[..h], &mut dc_in[..h]);
    let (dxi, rest) = dx.split_at_mut(h);
    let (dxf, rest) = rest.split_at_mut(h);
    let (dxg, dxo) = rest.split_at_mut(h);
    let (dxi, dxf, dxg, dxo) = (&mut dxi[..h], &mut dxf[..h], &mut dxg[..h], &mut dxo[..h]);
    for j in 0..h {
        let (ig, fg, gg, og) = (ai[j], af[j], ag[j], ao[j]);
        let tc = tanh(c_now[j]);
        let dh = do_h[j] + dh_in[j];
        let dc = do_c[j] + dc_in[j] + dh * og * (1.0 - tc * tc);
        dxi[j] = dc * gg * ig * (1.0 - ig);
        dxf[j] = dc * c_prev[j] * fg * (1.0 - fg);
        dxg[j] = dc * ig * (1.0 - gg * gg);
        dxo[j] = dh * tc * og * (1.0 - og);
        dc_in[j] = dc * fg;
    }
}

/// The GRU step's derivatives: writes `dx` `[3H]` (input share) and `dhp` `[3H]` (hidden share,
/// `hp_n` behind the reset) and leaves the direct path `dh ⊙ z` in `dh_in`.
#[inline(always)]
fn gru_step_back(
    a: &[f32],
    h_prev: &[f32],
    dout: &[f32],
    dh_in: &mut [f32],
    dx: &mut [f32],
    dhp: &mut [f32],
) {
    let h = h_prev.len();
    let (ar, az, an, ahn) = (&a[..h], &a[h..][..h], &a[2 * h..][..h], &a[3 * h..][..h]);
    let (dout, dh_in) = (&dout[..h], &mut dh_in[..h]);
    let (dxr, rest) = dx.split_at_mut(h);
    let (dxz, dxn) = rest.split_at_mut(h);
    let (dxr, dxz, dxn) = (&mut dxr[..h], &mut dxz[..h], &mut dxn[..h]);
    let (dhr, rest) = dhp.split_at_mut(h);
    let (dhz, dhn) = rest.split_at_mut(h);
    let (dhr, dhz, dhn) = (&mut dhr[..h], &mut dhz[..h], &mut dhn[..h]);
    for j in 0..h {
        let (r, z, n, hn) = (ar[j], az[j], an[j], ahn[j]);
        let dh = dout[j] + dh_in[j];
        let dn = dh * (1.0 - z) * (1.0 - n * n);
        let dz = dh * (h_prev[j] - n) * z * (1.0 - z);
        let dr = dn * hn * r * (1.0 - r);
        (dxr[j], dxz[j], dxn[j]) = (dr, dz, dn);
        (dhr[j], dhz[j], dhn[j]) = (dr, dz, dn * r);
        // The direct path h_t = … + z ⊙ h_{t-1}; the step's GEMM adds the rest.
        dh_in[j] = dh * z;
    }
}

/// Backpropagation through time given `d_out`, the gradient of `out`: the gradients of
/// `(x, W_i, b_i, W_h, b_h, h_0, c_0)`.
fn scan_backward(i: &CellScan, d_out: &[f32]) -> [Vec<f32>; 7] {
    use rayon::prelude::*;
    let (cell, bsz, t_len, h) = (i.cell, i.batch, i.len, i.hidden);
    let gh = cell.gates() * h;
    // d pre-activations of the input share, and of the hidden share `hp` (equal but for the
    // GRU's candidate, where `hp_n` sits behind the reset gate).
    let mut d_xp = zeros(bsz * t_len * gh);
    let mut d_hp_gru = zeros(if cell == Cell::Gru {
        bsz * t_len * gh
    } else {
        0
    });
    // h_{t-1} of every step, the left factor of dW_h.
    let mut h_prev = zeros(bsz * t_len * h);
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
    // W_hᵀ [G·H, H]: the transpose of the row-major W_h [H, G·H].
    let w_h_t = PackedRhs::new(&i.w_h, [gh, h], (1, gh));
    parts.into_par_iter().enumerate().for_each(|(k, part)| {
        vectorised(
            #[inline(always)]
            || backward_block(i, &w_h_t, k * rows, d_out, part),
        )
    });
    let d_hp = if cell == Cell::Gru { &d_hp_gru } else { &d_xp };
    let (rows_all, d) = (bsz * t_len, i.d_input);
    // dW_h = Σ_{b,t} h_{t-1}ᵀ dhp_t, dW_i = Σ_{b,t} x_tᵀ dxp_t: sums over all B·T rows, split
    // along that sum; dx = dxp W_iᵀ: one GEMM over the rows.
    let mut d_w_h = vec![0.0f32; h * gh];
    let mut d_w_i = vec![0.0f32; d * gh];
    let mut d_x = zeros(rows_all * d);
    // SAFETY: `h_prev` [B·T, H] and `x` [B·T, D] read transposed; `d_hp`, `d_xp` [B·T, G·H];
    // `w_i` [D, G·H] read transposed; every destination sized by its shape.
    unsafe {
        matmul_sum_k(
            [h, gh, rows_all],
            &mut d_w_h,
            (h_prev.as_ptr(), 1, h),
            (d_hp.as_ptr(), gh, 1),
        );
        matmul_sum_k(
            [d, gh, rows_all],
            &mut d_w_i,
            (i.x.as_ptr(), 1, d),
            (d_xp.as_ptr(), gh, 1),
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
    // b_i and b_h enter every pre-activation alike but for the GRU's candidate.
    let d_b_i = column_sums(&d_xp, gh);
    let d_b_h = if cell == Cell::Gru {
        column_sums(d_hp, gh)
    } else {
        d_b_i.clone()
    };
    [d_x, d_w_i, d_b_i, d_w_h, d_b_h, d_h0, d_c0]
}

/// [`scan_backward`] for the block of sequences starting at `first`; `part` holds its slices of
/// `d_xp`, `d_hp` (GRU only, else empty), `h_prev`, `d_h0` and `d_c0`.
#[inline(always)]
fn backward_block(
    i: &CellScan,
    w_h_t: &PackedRhs,
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
                Cell::Tanh | Cell::Relu => elman_step_back(cell, o, dout, dh_in, dx),
                Cell::Lstm => {
                    let c_prev = if t == 0 {
                        &c0[b * h..][..h]
                    } else {
                        &out[(row - 1) * sw + h..][..h]
                    };
                    let a = &acts[row * aw..][..aw];
                    let dc_in = &mut dc_next[b * h..][..h];
                    lstm_step_back(a, c_prev, &o[h..][..h], dout, dh_in, dc_in, dx);
                }
                Cell::Gru => {
                    let a = &acts[row * aw..][..aw];
                    let dhp = &mut d_hp_gru[row * gh..][..gh];
                    gru_step_back(a, &h_prev[row * h..][..h], dout, dh_in, dx, dhp);
                }
            }
        }
        // dh_{t-1} (+)= dhp_t W_hᵀ
        let d_hp: &[f32] = if cell == Cell::Gru { d_hp_gru } else { d_xp };
        // SAFETY: `dh_next` is [B, H]; rows (b, t) of `d_hp` at stride T·G·H.
        unsafe {
            w_h_t.matmul(
                bsz,
                dh_next.as_mut_ptr(),
                h,
                cell == Cell::Gru,
                (d_hp.as_ptr().add(t * gh), t_len * gh),
            )
        };
    }
    if cell != Cell::Lstm {
        dc_next.fill(0.0);
    }
}

#[cfg(test)]
mod tests {
    use crate::Init;
    use crate::gru::GruConfig;
    use crate::lstm::LstmConfig;
    use crate::test_support::{device, max_diff, on_every_isa, uniform};

    /// Batches that do not split evenly into per-thread blocks (B = 3, 5, 13 on any pool of two
    /// or more threads) give what the sequential form gives, gradients included; hidden sizes
    /// below and above the step GEMM's 16-column panels, row tiles of 6 and their remainders.
    #[test]
    fn uneven_batch_blocks_agree_with_sequential() {
        // Every instruction-set copy of the kernel the CPU runs.
        on_every_isa(|isa| {
            let dev = device();
            for d_hidden in [4, 19] {
                let lstm = LstmConfig {
                    d_input: 3,
                    d_hidden,
                    forget_bias: 1.0,
                }
                .init(&mut Init::new(1, &dev));
                let gru = GruConfig {
                    d_input: 3,
                    d_hidden,
                }
                .init(&mut Init::new(2, &dev));
                for batch in [3, 5, 13] {
                    let x = uniform([batch, 6, 3], -2.0, 2.0, batch as u64);
                    let r = uniform([batch, 6, d_hidden], -2.0, 2.0, 10 + batch as u64);
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
                        let at = format!("{isa:?} H {d_hidden} B {batch}, lstm {lstm_cell}");
                        assert!(max_diff(y, y_ref) < 1e-5, "{at}: y");
                        assert!(max_diff(dx, dx_ref) < 1e-4, "{at}: dx");
                    }
                }
            }
        });
    }
}
