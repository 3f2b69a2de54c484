//! xLSTM's sLSTM recurrence after its input projection as one kernel, per sequence (the update
//! is non-linear in the state, so time stays a loop; what the kernel removes is the dozen
//! tensor ops per step and their autodiff records):
//!
//! ```text
//! pre_t = wx_t + R h_{t−1}           R block-diagonal: H heads of [d_h, 4·d_h], gate-major
//! (ĩ, f̃, z̃, õ) = pre_t               each D wide, head-major within
//! d_t = log σ(f̃_t) + m_{t−1},   m_t = max(d_t, ĩ_t)
//! i_t = exp(ĩ_t − m_t),   f_t = exp(d_t − m_t)
//! c_t = f_t c_{t−1} + i_t tanh(z̃_t),   n_t = f_t n_{t−1} + i_t,   h_t = σ(õ_t) c_t / n_t
//! ```
//!
//! The backward walks time in reverse with `∂h`, `∂c`, `∂n`, `∂m` (the final state's to
//! start): through `h`, the cell and normaliser updates, the exponential gates and the
//! stabiliser's maximum (its gradient goes to the larger argument, as `max_pair`'s does), then
//! `∂wx_t = ∂pre_t`, `∂R += h_{t−1} ⊗ ∂pre_t` per head and `∂h_{t−1} += R ∂pre_t`. The
//! definition is `Slstm::forward`, the model's loop of tensor ops.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::{exp, sigmoid, tanh};

/// The recurrence's inputs on the host, and (under autodiff) the states its backward reads.
#[derive(Debug)]
pub(super) struct SlstmCell {
    batch: usize,
    len: usize,
    d: usize,
    heads: usize,
    /// `W x + b`, `[B, T, 4D]`.
    wx: Vec<f32>,
    /// `[H, d_h, 4·d_h]`.
    r: Vec<f32>,
    /// `h_0`, `c_0`, `n_0`, `m_0`, each `[B, D]`.
    h0: Vec<f32>,
    c0: Vec<f32>,
    n0: Vec<f32>,
    m0: Vec<f32>,
}

/// One unit's step: the new state and what the backward differentiates.
struct Unit {
    h: f32,
    c: f32,
    n: f32,
    m: f32,
    /// The input and forget gates `i_t`, `f_t`, `tanh(z̃)`, `σ(õ)`, and whether `d_t` won the
    /// stabiliser's maximum.
    ig: f32,
    fg: f32,
    tz: f32,
    so: f32,
    d_won: bool,
}

/// One unit's step from its pre-activations and `(c, n, m)`.
#[inline(always)]
fn unit(i_pre: f32, f_pre: f32, z_pre: f32, o_pre: f32, c: f32, n: f32, m: f32) -> Unit {
    // log σ(f̃) = −softplus(−f̃), written so that it never overflows.
    let log_f = f_pre.min(0.0) - (1.0 + exp(-f_pre.abs())).ln();
    let d = log_f + m;
    let d_won = d > i_pre;
    let m_t = if d_won { d } else { i_pre };
    let (ig, fg) = (exp(i_pre - m_t), exp(d - m_t));
    let tz = tanh(z_pre);
    let c_t = fg * c + ig * tz;
    let n_t = fg * n + ig;
    let so = sigmoid(o_pre);
    Unit {
        h: so * c_t / n_t,
        c: c_t,
        n: n_t,
        m: m_t,
        ig,
        fg,
        tz,
        so,
        d_won,
    }
}

impl SlstmCell {
    fn dh(&self) -> usize {
        self.d / self.heads
    }

    /// `pre = wx_t + R h` for sequence `b` at `t`, into `pre` (`4D`, gate-major).
    #[inline(always)]
    fn pre(&self, b: usize, t: usize, h: &[f32], pre: &mut [f32]) {
        let (d, dh) = (self.d, self.dh());
        pre.copy_from_slice(&self.wx[(b * self.len + t) * 4 * d..][..4 * d]);
        for k in 0..self.heads {
            let r_k = &self.r[k * dh * 4 * dh..][..dh * 4 * dh];
            for (j, row) in r_k.chunks_exact(4 * dh).enumerate() {
                let h_j = h[k * dh + j];
                for g in 0..4 {
                    let (out, w) = (&mut pre[g * d + k * dh..][..dh], &row[g * dh..][..dh]);
                    for u in 0..dh {
                        out[u] += h_j * w[u];
                    }
                }
            }
        }
    }

    /// One step of sequence `b` at `t` from `prev = [h | c | n | m]` into `next` (each `D`).
    #[inline(always)]
    fn step(&self, b: usize, t: usize, prev: &[f32], next: &mut [f32], pre: &mut [f32]) {
        let d = self.d;
        self.pre(b, t, &prev[..d], pre);
        for u in 0..d {
            let s = self.unit(pre, prev, u);
            (next[u], next[d + u], next[2 * d + u], next[3 * d + u]) = (s.h, s.c, s.n, s.m);
        }
    }

    /// Unit `u`'s step from `pre` (`4D`) and `prev = [h | c | n | m]`.
    #[inline(always)]
    fn unit(&self, pre: &[f32], prev: &[f32], u: usize) -> Unit {
        let d = self.d;
        unit(
            pre[u],
            pre[d + u],
            pre[2 * d + u],
            pre[3 * d + u],
            prev[d + u],
            prev[2 * d + u],
            prev[3 * d + u],
        )
    }
}

impl HostKernel<6> for SlstmCell {
    type Args = usize;

    fn read<B: Backend>([wx, r, h0, c0, n0, m0]: [&FloatTensor<B>; 6], heads: usize) -> Self {
        let [batch, len, width] = dims3::<B>(wx);
        let d = width / 4;
        assert!(len >= 1, "slstm_cell needs T ≥ 1");
        assert_eq!(
            r.shape().as_slice(),
            [heads, d / heads, 4 * (d / heads)],
            "R is [H, d_h, 4·d_h]"
        );
        Self {
            batch,
            len,
            d,
            heads,
            wx: read::<B>(wx.clone()),
            r: read::<B>(r.clone()),
            h0: read::<B>(h0.clone()),
            c0: read::<B>(c0.clone()),
            n0: read::<B>(n0.clone()),
            m0: read::<B>(m0.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len * self.d + 3 * self.d]
    }

    fn input_shapes(&self) -> [Vec<usize>; 6] {
        let (b, t, d, dh) = (self.batch, self.len, self.d, self.dh());
        [
            vec![b, t, 4 * d],
            vec![self.heads, dh, 4 * dh],
            vec![b, d],
            vec![b, d],
            vec![b, d],
            vec![b, d],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (t_len, d) = (self.len, self.d);
        let width = t_len * d + 3 * d;
        let mut out = zeros(self.batch * width);
        par_rows(
            &mut out,
            width,
            #[inline(always)]
            |b, row| {
                let mut state = [&self.h0, &self.c0, &self.n0, &self.m0]
                    .map(|s| &s[b * d..][..d])
                    .concat();
                let mut next = vec![0.0f32; 4 * d];
                let mut pre = vec![0.0f32; 4 * d];
                for t in 0..t_len {
                    self.step(b, t, &state, &mut next, &mut pre);
                    std::mem::swap(&mut state, &mut next);
                    row[t * d..][..d].copy_from_slice(&state[..d]);
                }
                row[t_len * d..].copy_from_slice(&state[d..]);
            },
        );
        out
    }

    /// Gradients of `(wx, R, h_0, c_0, n_0, m_0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 6] {
        let (t_len, d, dh) = (self.len, self.d, self.dh());
        let width = t_len * d + 3 * d;
        let r_len = self.heads * dh * 4 * dh;
        // Per sequence: [dwx (T·4D) | dR | dh0 | dc0 | dn0 | dm0].
        let per = t_len * 4 * d + r_len + 4 * d;
        let mut parts = zeros(self.batch * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |b, part| {
                let (d_wx, rest) = part.split_at_mut(t_len * 4 * d);
                let (d_r, d_state) = rest.split_at_mut(r_len);
                let g = &d_out[b * width..][..width];
                // [h | c | n | m] before every step and after the last.
                let mut states = vec![0.0f32; (t_len + 1) * 4 * d];
                for (s, init) in [&self.h0, &self.c0, &self.n0, &self.m0]
                    .into_iter()
                    .enumerate()
                {
                    states[s * d..][..d].copy_from_slice(&init[b * d..][..d]);
                }
                // And every step's pre-activations, so that `R h` is computed once.
                let mut pres = vec![0.0f32; t_len * 4 * d];
                for t in 0..t_len {
                    let (prev, next) = states[t * 4 * d..][..8 * d].split_at_mut(4 * d);
                    self.step(b, t, prev, next, &mut pres[t * 4 * d..][..4 * d]);
                }
                // ∂h, ∂c, ∂n, ∂m of the state after the step being walked.
                let d_state = &mut d_state[..4 * d];
                d_state[..d].fill(0.0);
                d_state[d..].copy_from_slice(&g[t_len * d..][..3 * d]);
                for t in (0..t_len).rev() {
                    let prev = &states[t * 4 * d..][..4 * d];
                    let pre = &pres[t * 4 * d..][..4 * d];
                    let d_pre = &mut d_wx[t * 4 * d..][..4 * d];
                    for u in 0..d {
                        let (c, n) = (prev[d + u], prev[2 * d + u]);
                        let Unit {
                            c: c_t,
                            n: n_t,
                            ig,
                            fg,
                            tz,
                            so,
                            d_won,
                            ..
                        } = self.unit(pre, prev, u);
                        let d_h = g[t * d + u] + d_state[u];
                        let mut d_c = d_state[d + u] + d_h * so / n_t;
                        let d_n = d_state[2 * d + u] - d_h * so * c_t / (n_t * n_t);
                        let d_o = d_h * c_t / n_t * so * (1.0 - so);
                        let d_fg = d_c * c + d_n * n;
                        let d_ig = d_c * tz + d_n;
                        let d_z = d_c * ig * (1.0 - tz * tz);
                        d_c *= fg;
                        let (mut d_i, mut d_d) = (d_ig * ig, d_fg * fg);
                        let d_m_t = d_state[3 * d + u] - d_i - d_d;
                        if d_won {
                            d_d += d_m_t;
                        } else {
                            d_i += d_m_t;
                        }
                        // d log σ(f̃) / df̃ = 1 − σ(f̃).
                        let d_f = d_d * (1.0 - sigmoid(pre[d + u]));
                        (d_pre[u], d_pre[d + u], d_pre[2 * d + u], d_pre[3 * d + u]) =
                            (d_i, d_f, d_z, d_o);
                        (d_state[d + u], d_state[2 * d + u], d_state[3 * d + u]) =
                            (d_c, fg * d_n, d_d);
                    }
                    // Through pre = wx + R h_{t−1}: ∂R += h_{t−1} ⊗ ∂pre, ∂h_{t−1} = R ∂pre.
                    let h_prev = &prev[..d];
                    for k in 0..self.heads {
                        let r_k = &self.r[k * dh * 4 * dh..][..dh * 4 * dh];
                        let dr_k = &mut d_r[k * dh * 4 * dh..][..dh * 4 * dh];
                        for j in 0..dh {
                            let (row, d_row) = (
                                &r_k[j * 4 * dh..][..4 * dh],
                                &mut dr_k[j * 4 * dh..][..4 * dh],
                            );
                            let h_j = h_prev[k * dh + j];
                            let mut acc = 0.0f32;
                            for gate in 0..4 {
                                let dp = &d_pre[gate * d + k * dh..][..dh];
                                let (w, dw) =
                                    (&row[gate * dh..][..dh], &mut d_row[gate * dh..][..dh]);
                                for u in 0..dh {
                                    dw[u] += h_j * dp[u];
                                    acc += w[u] * dp[u];
                                }
                            }
                            d_state[k * dh + j] = acc;
                        }
                    }
                }
            },
        );
        let section = |offset, len| Sections {
            parts: &parts,
            per,
            offset,
            len,
        };
        let state = t_len * 4 * d + r_len;
        [
            section(0, t_len * 4 * d).gather(),
            section(t_len * 4 * d, r_len).sum(),
            section(state, d).gather(),
            section(state + d, d).gather(),
            section(state + 2 * d, d).gather(),
            section(state + 3 * d, d).gather(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::Init;
    use crate::slstm::{SlstmSpec, SlstmState};
    use crate::test_support::{device, max_diff, on_every_isa, uniform};

    /// The op inside the layer against the definition at uneven sizes (B 3, T 1 and 9, D 6 in
    /// 3 heads of 2), from a non-zero state whose stabiliser the first writes exceed in some
    /// units and not in others: outputs, the final `(h, c, n, m)` and the gradients of the input,
    /// every part of the initial state and `R`, on every instruction-set copy the CPU runs.
    #[test]
    fn kernel_matches_definition() {
        let layer = SlstmSpec { n_heads: 3 }
            .config(6)
            .init(&mut Init::new(3, &device()));
        on_every_isa(|_| {
            for t in [1, 9] {
                let x = uniform([3, t, 6], -2.0, 2.0, 1);
                let s0 = [
                    uniform([3, 6], -1.0, 1.0, 2),
                    uniform([3, 6], -1.0, 1.0, 3),
                    uniform([3, 6], 0.5, 1.5, 4),
                    uniform([3, 6], -2.0, 2.0, 5),
                ];
                let r_y = uniform([3, t, 6], -1.0, 1.0, 6);
                let run = |fused: bool| {
                    let x = x.clone().require_grad();
                    let leaves = s0.clone().map(|s| s.require_grad());
                    let [h, c, n, m] = leaves.clone();
                    let (y, s) =
                        layer.forward_with(x.clone(), Some(SlstmState { h, c, n, m }), fused);
                    let loss = (y.clone() * r_y.clone()).sum()
                        + s.h.clone().sum()
                        + (s.c.clone() * 0.5).sum()
                        + (s.n.clone() * 0.3).sum()
                        + (s.m.clone() * 0.7).sum();
                    let grads = loss.backward();
                    let flat2 = |v: &Tensor<2>| v.grad(&grads).unwrap().flatten::<1>(0, 1);
                    let mut all = vec![x.grad(&grads).unwrap().flatten::<1>(0, 2)];
                    all.extend(leaves.iter().map(flat2));
                    all.push(layer.recurrent.grad(&grads).unwrap().flatten::<1>(0, 2));
                    (y, [s.h, s.c, s.n, s.m], all)
                };
                let (y, s, grads) = run(true);
                let (y_ref, s_ref, grads_ref) = run(false);
                assert!(max_diff(y, y_ref) < 1e-5, "T {t}: y");
                for (k, (a, b)) in s.into_iter().zip(s_ref).enumerate() {
                    assert!(max_diff(a, b) < 1e-5, "T {t}: final state part {k}");
                }
                let names = ["x", "h0", "c0", "n0", "m0", "R"];
                for (name, (g, g_ref)) in names.iter().zip(grads.into_iter().zip(grads_ref)) {
                    assert!(max_diff(g, g_ref) < 1e-4, "T {t}: d{name}");
                }
            }
        });
    }
}
