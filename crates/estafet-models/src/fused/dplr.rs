//! RWKV-7's recurrence, a diagonal-plus-rank-one ("DPLR") transition, as one kernel, per
//! sequence-head with a state `S [N (key), N (value)]`:
//!
//! ```text
//! u_t = S_{t−1}ᵀ a_t                              the rank-one term's read
//! S_t = diag(w_t) S_{t−1} + b_t u_tᵀ + k_t v_tᵀ    w_t = exp(log_w_t)
//! o_t = S_tᵀ r_t
//! ```
//!
//! Built from tensor ops each step is a read, two writes and a read-out on `[B, H, N, N]`,
//! forward and backward: at d 64 the layer ran at 0.05 of the machine's GEMM rate. Here one
//! sequence-head's state lives in an `N × N` buffer for the whole loop. The backward recomputes
//! one sequence-head's states, then walks time in reverse with `∂S_t` (the final state's
//! gradient to start):
//!
//! ```text
//! ∂S_t += r_t ∂o_tᵀ,   ∂r_t = S_t ∂o_t
//! ∂log_w_t = w_t ⊙ rowsum(∂S_t ⊙ S_{t−1}),   ∂b_t = ∂S_t u_t,   ∂u = ∂S_tᵀ b_t
//! ∂k_t = ∂S_t v_t,   ∂v_t = ∂S_tᵀ k_t,   ∂a_t = S_{t−1} ∂u
//! ∂S_{t−1} = diag(w_t) ∂S_t + a_t ∂uᵀ
//! ```
//!
//! The definition is `rwkv7::sequential`, the model's sequential tensor form.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::exp;

/// The recurrence's inputs on the host: `r`, `k`, `v`, `log_w`, `a`, `b` each `[R, T, N]`, and
/// `s0 [R, N, N]`.
#[derive(Debug)]
pub(super) struct Dplr {
    rows: usize,
    len: usize,
    n: usize,
    r: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    log_w: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    s0: Vec<f32>,
}

impl Dplr {
    /// Row `row`'s `N` values of `x`.
    #[inline(always)]
    fn at<'a>(&self, x: &'a [f32], row: usize) -> &'a [f32] {
        &x[row * self.n..][..self.n]
    }

    /// One step at `row` (= `r·T + t`): `s` holds `S_{t−1}` and becomes `S_t`; `u` gets `u_t`.
    #[inline(always)]
    fn step(&self, row: usize, s: &mut [f32], u: &mut [f32]) {
        let n = self.n;
        let (k, v) = (self.at(&self.k, row), self.at(&self.v, row));
        let (a, b) = (self.at(&self.a, row), self.at(&self.b, row));
        let log_w = self.at(&self.log_w, row);
        let u = &mut u[..n];
        u.fill(0.0);
        for (i, s_i) in s.chunks_exact(n).enumerate() {
            for j in 0..n {
                u[j] += a[i] * s_i[j];
            }
        }
        for (i, s_i) in s.chunks_exact_mut(n).enumerate() {
            let w = exp(log_w[i]);
            for j in 0..n {
                s_i[j] = w * s_i[j] + b[i] * u[j] + k[i] * v[j];
            }
        }
    }
}

impl HostKernel<7> for Dplr {
    type Args = ();

    fn read<B: Backend>([r, k, v, log_w, a, b, s0]: [&FloatTensor<B>; 7], (): ()) -> Self {
        let [rows, len, n] = dims3::<B>(r);
        assert!(len >= 1, "dplr needs T ≥ 1");
        assert_eq!(s0.shape().as_slice(), [rows, n, n], "s0 is [R, N, N]");
        Self {
            rows,
            len,
            n,
            r: read::<B>(r.clone()),
            k: read::<B>(k.clone()),
            v: read::<B>(v.clone()),
            log_w: read::<B>(log_w.clone()),
            a: read::<B>(a.clone()),
            b: read::<B>(b.clone()),
            s0: read::<B>(s0.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.rows, self.len * self.n + self.n * self.n]
    }

    fn input_shapes(&self) -> [Vec<usize>; 7] {
        let seq = vec![self.rows, self.len, self.n];
        [
            seq.clone(),
            seq.clone(),
            seq.clone(),
            seq.clone(),
            seq.clone(),
            seq,
            vec![self.rows, self.n, self.n],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (t_len, n) = (self.len, self.n);
        let width = t_len * n + n * n;
        let mut out = zeros(self.rows * width);
        par_rows(
            &mut out,
            width,
            #[inline(always)]
            |seq, row| {
                let (o, s) = row.split_at_mut(t_len * n);
                s.copy_from_slice(&self.s0[seq * n * n..][..n * n]);
                let mut u = vec![0.0f32; n];
                for (t, o_t) in o.chunks_exact_mut(n).enumerate() {
                    let at = seq * t_len + t;
                    self.step(at, s, &mut u);
                    let r = self.at(&self.r, at);
                    o_t.fill(0.0);
                    for (i, s_i) in s.chunks_exact(n).enumerate() {
                        for j in 0..n {
                            o_t[j] += r[i] * s_i[j];
                        }
                    }
                }
            },
        );
        out
    }

    /// Gradients of `(r, k, v, log_w, a, b, s0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 7] {
        let (t_len, n) = (self.len, self.n);
        let (nn, tn) = (n * n, t_len * n);
        let width = tn + nn;
        // Per sequence-head: [dr | dk | dv | dlog_w | da | db] (T·N each), then dS (N·N).
        let per = 6 * tn + nn;
        let mut parts = zeros(self.rows * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |seq, part| {
                let (grads, d_s) = part.split_at_mut(6 * tn);
                let d_s = &mut d_s[..nn];
                let (d_r, rest) = grads.split_at_mut(tn);
                let (d_k, rest) = rest.split_at_mut(tn);
                let (d_v, rest) = rest.split_at_mut(tn);
                let (d_log_w, rest) = rest.split_at_mut(tn);
                let (d_a, d_b) = rest.split_at_mut(tn);
                let g_out = &d_out[seq * width..][..width];
                d_s.copy_from_slice(&g_out[tn..][..nn]);
                // S_0..S_T and every step's u_t.
                let mut states = vec![0.0f32; (t_len + 1) * nn];
                let mut us = vec![0.0f32; tn];
                states[..nn].copy_from_slice(&self.s0[seq * nn..][..nn]);
                for t in 0..t_len {
                    let (prev, next) = states[t * nn..][..2 * nn].split_at_mut(nn);
                    next.copy_from_slice(prev);
                    self.step(seq * t_len + t, next, &mut us[t * n..][..n]);
                }
                let mut d_u = vec![0.0f32; n];
                for t in (0..t_len).rev() {
                    let at = seq * t_len + t;
                    let (r, k, v) = (
                        self.at(&self.r, at),
                        self.at(&self.k, at),
                        self.at(&self.v, at),
                    );
                    let (a, b) = (self.at(&self.a, at), self.at(&self.b, at));
                    let log_w = self.at(&self.log_w, at);
                    let u = &us[t * n..][..n];
                    let d_o = &g_out[t * n..][..n];
                    let s_prev = &states[t * nn..][..nn];
                    let s_t = &states[(t + 1) * nn..][..nn];
                    let d_v = &mut d_v[t * n..][..n];
                    d_u.fill(0.0);
                    for i in 0..n {
                        let ds_i = &mut d_s[i * n..][..n];
                        let (sp_i, st_i) = (&s_prev[i * n..][..n], &s_t[i * n..][..n]);
                        let (mut dr, mut dw, mut db, mut dk) = (0.0f32, 0.0f32, 0.0f32, 0.0f32);
                        for j in 0..n {
                            ds_i[j] += r[i] * d_o[j];
                            dr += st_i[j] * d_o[j];
                            dw += ds_i[j] * sp_i[j];
                            db += ds_i[j] * u[j];
                            dk += ds_i[j] * v[j];
                            d_u[j] += ds_i[j] * b[i];
                            d_v[j] += ds_i[j] * k[i];
                        }
                        d_r[t * n + i] = dr;
                        d_log_w[t * n + i] = dw * exp(log_w[i]);
                        d_b[t * n + i] = db;
                        d_k[t * n + i] = dk;
                    }
                    for i in 0..n {
                        let ds_i = &mut d_s[i * n..][..n];
                        let sp_i = &s_prev[i * n..][..n];
                        let w = exp(log_w[i]);
                        let mut da = 0.0f32;
                        for j in 0..n {
                            da += sp_i[j] * d_u[j];
                            ds_i[j] = w * ds_i[j] + a[i] * d_u[j];
                        }
                        d_a[t * n + i] = da;
                    }
                }
            },
        );
        let section = |k: usize, len| Sections {
            parts: &parts,
            per,
            offset: k * tn,
            len,
        };
        [
            section(0, tn).gather(),
            section(1, tn).gather(),
            section(2, tn).gather(),
            section(3, tn).gather(),
            section(4, tn).gather(),
            section(5, tn).gather(),
            section(6, nn).gather(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::rwkv7::{Heads, sequential};
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel against the definition at uneven sizes (R 3, T 1 and 9, N 5), from a
    /// non-zero state, with decays from 0.37 to 1 and rank-one terms as RWKV-7 makes them
    /// (`a = −κ̂`, `b = κ̂ ⊙ α`): outputs, the final state and every input's gradient, on every
    /// instruction-set copy the CPU runs.
    #[test]
    fn kernel_matches_definition() {
        on_every_isa(|_| {
            for t in [1, 9] {
                let (rows, n) = (3, 5);
                let seq = |lo, hi, seed| uniform([rows, t, n], lo, hi, seed);
                let inputs = [
                    seq(-1.0, 1.0, 1),
                    seq(-1.0, 1.0, 2),
                    seq(-1.0, 1.0, 3),
                    seq(-1.0, 0.0, 4),
                    seq(-0.5, 0.0, 5),
                    seq(0.0, 0.5, 6),
                ];
                let s0 = uniform([rows, n, n], -1.0, 1.0, 7);
                let (r_o, r_s) = (seq(-1.0, 1.0, 8), uniform([rows, n, n], -1.0, 1.0, 9));
                let run = |fused: bool| {
                    let xs = inputs.clone().map(|x| x.require_grad());
                    let s0 = s0.clone().require_grad();
                    let [r, k, v, log_w, a, b] = xs.clone();
                    let (o, s) = if fused {
                        let out = super::super::dplr(r, k, v, log_w, a, b, s0.clone());
                        let o = out.clone().narrow(1, 0, t * n).reshape([rows, t, n]);
                        (o, out.narrow(1, t * n, n * n).reshape([rows, n, n]))
                    } else {
                        let heads = Heads {
                            r: r.unsqueeze_dim(0),
                            k: k.unsqueeze_dim(0),
                            v: v.unsqueeze_dim(0),
                            log_w: log_w.unsqueeze_dim(0),
                            a: a.unsqueeze_dim(0),
                            b: b.unsqueeze_dim(0),
                        };
                        let (o, s) = sequential(heads, s0.clone().unsqueeze_dim(0));
                        (o.squeeze_dim(0), s.squeeze_dim(0))
                    };
                    let loss = (o.clone() * r_o.clone()).sum() + (s.clone() * r_s.clone()).sum();
                    let grads = loss.backward();
                    let g = |x: &Tensor<3>| x.grad(&grads).unwrap().flatten::<1>(0, 2);
                    let mut all: Vec<Tensor<1>> = xs.iter().map(g).collect();
                    all.push(g(&s0));
                    (o, s, all)
                };
                let (o, s, grads) = run(true);
                let (o_ref, s_ref, grads_ref) = run(false);
                assert!(max_diff(o, o_ref) < 1e-5, "T {t}: o");
                assert!(max_diff(s, s_ref) < 1e-5, "T {t}: S_T");
                let names = ["r", "k", "v", "log_w", "a", "b", "s0"];
                for (name, (g, g_ref)) in names.iter().zip(grads.into_iter().zip(grads_ref)) {
                    assert!(max_diff(g, g_ref) < 1e-5, "T {t}: d{name}");
                }
            }
        });
    }
}
