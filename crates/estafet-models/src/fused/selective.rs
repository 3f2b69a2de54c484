//! Mamba's selective scan (S6) with its output contraction, as one kernel:
//!
//! ```text
//! h_t = a_t ⊙ h_{t−1} + (Δ_t ⊙ x_t) ⊗ B_t              h [B, M, N]
//! a_t = s·exp(Δ_t A) + o                                 (s, o) = (1, 0), or (2, −1) signed
//! y_t = h_t C_t                                          (contract N)
//! ```
//!
//! The forward keeps one `[M, N]` state per sequence; the backward recomputes the states of one
//! sequence at a time; sequences run in parallel. The definition is
//! [`crate::scan::recurrence`] over the materialised transitions and drives (Mamba's
//! `forward_with`).

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::{dot, exp};
use crate::scan::Eigenvalues;

/// The selective scan's inputs on the host.
#[derive(Debug)]
pub(super) struct Selective {
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
    /// `(s, o)` of [`Eigenvalues::affine`].
    affine: (f32, f32),
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
        let (s, o) = self.affine;
        let mut h = h0.to_vec();
        for t in 0..t_len {
            let b_t = &b[t * n..][..n];
            for d in 0..m {
                let (dt, dx) = (delta[t * m + d], delta[t * m + d] * x[t * m + d]);
                let a_d = &self.a[d * n..][..n];
                let h_d = &mut h[d * n..][..n];
                for k in 0..n {
                    h_d[k] = (s * exp(dt * a_d[k]) + o) * h_d[k] + dx * b_t[k];
                }
            }
            visit(t, &h);
        }
        h
    }
}

impl HostKernel<6> for Selective {
    type Args = Eigenvalues;

    fn read<B: Backend>(
        [delta, x, a, b, c, h0]: [&FloatTensor<B>; 6],
        eigenvalues: Eigenvalues,
    ) -> Self {
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
            affine: eigenvalues.affine(),
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
        let mut out = zeros(self.batch * width);
        par_rows(
            &mut out,
            width,
            #[inline(always)]
            |i, row| {
                let c = self.sequence(i)[3];
                let (y, last) = row.split_at_mut(t_len * m);
                let h = self.run(i, |t, h| {
                    let c_t = &c[t * n..][..n];
                    for (d, y) in y[t * m..][..m].iter_mut().enumerate() {
                        *y = dot(&h[d * n..][..n], c_t);
                    }
                });
                last.copy_from_slice(&h);
            },
        );
        out
    }

    /// Gradients of `(delta, x, a, b, c, h0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 6] {
        let (bsz, t_len, m, n) = (self.batch, self.len, self.m, self.n);
        let width = t_len * m + m * n;
        // Per sequence: [dΔ (T·M) | dx (T·M) | dB (T·N) | dC (T·N) | dh0 (M·N) | dA (M·N)].
        let per = 2 * t_len * m + 2 * t_len * n + 2 * m * n;
        let mut parts = zeros(bsz * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |i, part| {
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
                let (s, o) = self.affine;
                let (mut g_dt, mut g_drive) = (vec![0.0f32; n], vec![0.0f32; n]);
                for t in (0..t_len).rev() {
                    let (h_prev, h_t) = hs[t * m * n..][..2 * m * n].split_at(m * n);
                    let (b_t, c_t) = (&b[t * n..][..n], &c[t * n..][..n]);
                    let d_b_t = &mut d_b[t * n..][..n];
                    let d_c_t = &mut d_c[t * n..][..n];
                    for d in 0..m {
                        let (dt, xv, dy) = (delta[t * m + d], x[t * m + d], d_y[t * m + d]);
                        backward_channel(
                            (dt, xv, dy, s, o),
                            &self.a[d * n..][..n],
                            &h_prev[d * n..][..n],
                            &h_t[d * n..][..n],
                            b_t,
                            c_t,
                            &mut d_h[d * n..][..n],
                            &mut d_a[d * n..][..n],
                            d_b_t,
                            d_c_t,
                            &mut g_dt,
                            &mut g_drive,
                        );
                        let (g_dt, g_drive) =
                            (g_dt.iter().sum::<f32>(), g_drive.iter().sum::<f32>());
                        d_delta[t * m + d] = g_dt + g_drive * xv;
                        d_x[t * m + d] = g_drive * dt;
                    }
                }
            },
        );
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

/// One channel `d`'s step of the backward over its `N` states: from `dh` = dL/dh_t's share
/// carried from step t + 1, accumulates `dA_d`, `dB_t`, `dC_t`, leaves dL/dh_{t−1}'s in `dh`
/// and the per-k terms of dL/dΔ (through the decay) and dL/d(Δ x) in `g_dt`, `g_drive`, summed
/// by the caller so that this loop vectorises. A function of slices, each its own argument, so
/// that LLVM knows they do not alias: inline in the sequence loop, its AVX2 copy ran scalar
/// (`perf`, 2026-12-03) and Mamba trained faster through the SSE2 baseline.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_channel(
    (dt, xv, dy, s, o): (f32, f32, f32, f32, f32),
    a_d: &[f32],
    hp: &[f32],
    ht: &[f32],
    b_t: &[f32],
    c_t: &[f32],
    dh: &mut [f32],
    d_a_d: &mut [f32],
    d_b_t: &mut [f32],
    d_c_t: &mut [f32],
    g_dt: &mut [f32],
    g_drive: &mut [f32],
) {
    let n = a_d.len();
    let (hp, ht, b_t, c_t) = (&hp[..n], &ht[..n], &b_t[..n], &c_t[..n]);
    let (dh, d_a_d, d_b_t, d_c_t) = (
        &mut dh[..n],
        &mut d_a_d[..n],
        &mut d_b_t[..n],
        &mut d_c_t[..n],
    );
    let (g_dt, g_drive) = (&mut g_dt[..n], &mut g_drive[..n]);
    for k in 0..n {
        d_c_t[k] += dy * ht[k];
        let g = dh[k] + dy * c_t[k]; // dL/dh_t
        let e = exp(dt * a_d[k]);
        let decay = s * e + o;
        let g_log = g * hp[k] * (s * e); // dL/d(Δ A)
        g_dt[k] = g_log * a_d[k];
        d_a_d[k] += g_log * dt;
        g_drive[k] = g * b_t[k];
        d_b_t[k] += g * dt * xv;
        dh[k] = g * decay;
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::scan::{Eigenvalues, recurrence};
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel against the definition (the diagonal recurrence over the materialised
    /// transitions and drives, contracted with `C`) at an uneven batch (B = 3) and odd sizes,
    /// with either eigenvalue range: `y`, `h_T` and the gradient of every input.
    #[test]
    fn kernel_matches_definition() {
        // Every instruction-set copy of the kernel the CPU runs.
        on_every_isa(|_| {
            for eigenvalues in [Eigenvalues::Positive, Eigenvalues::Signed] {
                matches_definition(eigenvalues);
            }
        });
    }

    fn matches_definition(eigenvalues: Eigenvalues) {
        let (bsz, t, m, n) = (3, 7, 5, 3);
        let mut seed = 0;
        let mut uniform = |shape: [usize; 3], lo, hi| {
            seed += 1;
            uniform(shape, lo, hi, seed)
        };
        // Δ up to 1.5 with A down to −2 puts signed transitions on both sides of zero.
        let delta = uniform([bsz, t, m], 0.01, 1.5);
        let x = uniform([bsz, t, m], -1.0, 1.0);
        let a = -crate::test_support::uniform([m, n], 0.1, 2.0, 99);
        let b = uniform([bsz, t, n], -1.0, 1.0);
        let c = uniform([bsz, t, n], -1.0, 1.0);
        let h0 = uniform([bsz, m, n], -1.0, 1.0);
        let (r_y, r_h) = (
            uniform([bsz, t, m], -1.0, 1.0),
            uniform([bsz, m, n], -1.0, 1.0),
        );
        let run = |fused: bool| {
            let track = |t: &Tensor<3>| t.clone().detach().require_grad();
            let (delta, x, b, c, h0) = (track(&delta), track(&x), track(&b), track(&c), track(&h0));
            let a = a.clone().detach().require_grad();
            let (y, h) = if fused {
                let out = super::super::selective_scan(
                    delta.clone(),
                    x.clone(),
                    a.clone(),
                    b.clone(),
                    c.clone(),
                    h0.clone(),
                    eigenvalues,
                );
                (
                    out.clone().narrow(1, 0, t * m).reshape([bsz, t, m]),
                    out.narrow(1, t * m, m * n).reshape([bsz, m, n]),
                )
            } else {
                let transition = eigenvalues.transition(
                    delta.clone().unsqueeze_dim::<4>(3)
                        * a.clone().unsqueeze_dim::<3>(0).unsqueeze_dim::<4>(0),
                );
                let drive = (delta.clone() * x.clone()).unsqueeze_dim::<4>(3)
                    * b.clone().unsqueeze_dim::<4>(2);
                let (h, h_last) = recurrence(
                    transition.reshape([bsz, t, m * n]),
                    drive.reshape([bsz, t, m * n]),
                    h0.clone().reshape([bsz, m * n]),
                );
                let y = (h.reshape([bsz, t, m, n]) * c.clone().unsqueeze_dim::<4>(2))
                    .sum_dim(3)
                    .squeeze_dim::<3>(3);
                (y, h_last.reshape([bsz, m, n]))
            };
            let grads =
                ((y.clone() * r_y.clone()).sum() + (h.clone() * r_h.clone()).sum()).backward();
            let g3 = |t: &Tensor<3>| t.grad(&grads).unwrap().flatten::<1>(0, 2);
            let inputs = [
                g3(&delta),
                g3(&x),
                a.grad(&grads).unwrap().flatten::<1>(0, 1),
                g3(&b),
                g3(&c),
                g3(&h0),
            ];
            (y, h, inputs)
        };
        let (y, h, grads) = run(true);
        let (y_ref, h_ref, grads_ref) = run(false);
        let what = format!("{eigenvalues:?}");
        assert!(max_diff(y, y_ref) < 1e-5, "y, {what}");
        assert!(max_diff(h, h_ref) < 1e-5, "h_T, {what}");
        for (name, (g, g_ref)) in ["Δ", "x", "A", "B", "C", "h0"]
            .iter()
            .zip(grads.into_iter().zip(grads_ref))
        {
            assert!(max_diff(g, g_ref) < 1e-4, "d{name}, {what}");
        }
    }
}
