//! Mamba-2's SSD recurrence (scalar decay per head, `B` and `C` shared by the heads) as one
//! kernel, per sequence-head with a state `h [P, N]`:
//!
//! ```text
//! a_t = s·exp(log_a_t) + o        (s, o) = (1, 0), or (2, −1) with signed eigenvalues
//! h_t = a_t h_{t−1} + x_t B_tᵀ    x_t = Δ_t x_t [P], B_t [N]
//! y_t = h_t C_t                   [P]
//! ```
//!
//! Built from tensor ops each step is a handful of broadcasts over `[B, H, P, N]`, forward and
//! backward. Here one sequence-head's state lives in a `P × N` buffer for the whole loop. The
//! backward recomputes one sequence-head's states, then walks time in reverse with `∂h_t` (the
//! final state's gradient to start):
//!
//! ```text
//! ∂h_t += ∂y_t C_tᵀ,   ∂C_t = h_tᵀ ∂y_t,   ∂x_t = ∂h_t B_t,   ∂B_t = ∂h_tᵀ x_t
//! ∂log_a_t = s·exp(log_a_t) Σ ∂h_t ⊙ h_{t−1},   ∂h_{t−1} = a_t ∂h_t
//! ```
//!
//! `B` and `C` are shared by a sequence's heads, so their gradients are summed over them. The
//! definition is `mamba2::recurrent`, the model's sequential tensor form.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::exp;
use crate::scan::Eigenvalues;

/// The recurrence's inputs on the host.
#[derive(Debug)]
pub(super) struct Ssd {
    batch: usize,
    heads: usize,
    len: usize,
    p: usize,
    n: usize,
    /// `(s, o)` of the transition's range.
    affine: (f32, f32),
    /// `Δ x`, `[B·H, T, P]`.
    x: Vec<f32>,
    /// `Δ A`, `[B·H, T]`.
    log_a: Vec<f32>,
    /// `[B, T, N]`.
    b: Vec<f32>,
    c: Vec<f32>,
    /// `[B·H, P, N]`.
    h0: Vec<f32>,
}

impl Ssd {
    /// `a_t` and `da_t / dlog_a_t` of row `r` at `t`.
    #[inline(always)]
    fn transition(&self, r: usize, t: usize) -> (f32, f32) {
        let (scale, offset) = self.affine;
        let e = exp(self.log_a[r * self.len + t]);
        (scale * e + offset, scale * e)
    }

    /// `B_t` and `C_t` of row `r`'s sequence.
    #[inline(always)]
    fn bc(&self, r: usize, t: usize) -> (&[f32], &[f32]) {
        let at = ((r / self.heads) * self.len + t) * self.n;
        (&self.b[at..][..self.n], &self.c[at..][..self.n])
    }

    /// One step of row `r` at `t`: `h` holds `h_{t−1}` and becomes `h_t`.
    #[inline(always)]
    fn step(&self, r: usize, t: usize, h: &mut [f32]) {
        let (a, _) = self.transition(r, t);
        let (b, _) = self.bc(r, t);
        let x = &self.x[(r * self.len + t) * self.p..][..self.p];
        for (i, h_i) in h.chunks_exact_mut(self.n).enumerate() {
            for j in 0..self.n {
                h_i[j] = a * h_i[j] + x[i] * b[j];
            }
        }
    }
}

impl HostKernel<5> for Ssd {
    type Args = (usize, Eigenvalues);

    fn read<B: Backend>(
        [x, log_a, b, c, h0]: [&FloatTensor<B>; 5],
        (heads, eigenvalues): (usize, Eigenvalues),
    ) -> Self {
        let [rows, len, p] = dims3::<B>(x);
        let [batch, _, n] = dims3::<B>(b);
        assert!(len >= 1, "ssd needs T ≥ 1");
        assert_eq!(rows, batch * heads, "x is [B·H, T, P]");
        assert_eq!(h0.shape().as_slice(), [rows, p, n], "h0 is [B·H, P, N]");
        Self {
            batch,
            heads,
            len,
            p,
            n,
            affine: eigenvalues.affine(),
            x: read::<B>(x.clone()),
            log_a: read::<B>(log_a.clone()),
            b: read::<B>(b.clone()),
            c: read::<B>(c.clone()),
            h0: read::<B>(h0.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch * self.heads, self.len * self.p + self.p * self.n]
    }

    fn input_shapes(&self) -> [Vec<usize>; 5] {
        let (bsz, rows, t, p, n) = (
            self.batch,
            self.batch * self.heads,
            self.len,
            self.p,
            self.n,
        );
        [
            vec![rows, t, p],
            vec![rows, t],
            vec![bsz, t, n],
            vec![bsz, t, n],
            vec![rows, p, n],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (t_len, p, n) = (self.len, self.p, self.n);
        let width = t_len * p + p * n;
        let mut out = zeros(self.batch * self.heads * width);
        par_rows(
            &mut out,
            width,
            #[inline(always)]
            |r, row| {
                let (y, h) = row.split_at_mut(t_len * p);
                h.copy_from_slice(&self.h0[r * p * n..][..p * n]);
                for (t, y_t) in y.chunks_exact_mut(p).enumerate() {
                    self.step(r, t, h);
                    let (_, c) = self.bc(r, t);
                    for (i, h_i) in h.chunks_exact(n).enumerate() {
                        let mut acc = 0.0f32;
                        for j in 0..n {
                            acc += h_i[j] * c[j];
                        }
                        y_t[i] = acc;
                    }
                }
            },
        );
        out
    }

    /// Gradients of `(x, log_a, B, C, h0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 5] {
        let (t_len, p, n) = (self.len, self.p, self.n);
        let pn = p * n;
        let width = t_len * p + pn;
        // Per row: [dx (T·P) | dlog_a (T) | dB (T·N) | dC (T·N) | dh (P·N)].
        let per = t_len * p + t_len + 2 * t_len * n + pn;
        let mut parts = zeros(self.batch * self.heads * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |r, part| {
                let (d_x, rest) = part.split_at_mut(t_len * p);
                let (d_log_a, rest) = rest.split_at_mut(t_len);
                let (d_b, rest) = rest.split_at_mut(t_len * n);
                let (d_c, d_h) = rest.split_at_mut(t_len * n);
                let d_h = &mut d_h[..pn];
                let g_out = &d_out[r * width..][..width];
                d_h.copy_from_slice(&g_out[t_len * p..][..pn]);
                let mut states = vec![0.0f32; (t_len + 1) * pn];
                states[..pn].copy_from_slice(&self.h0[r * pn..][..pn]);
                for t in 0..t_len {
                    let (prev, next) = states[t * pn..][..2 * pn].split_at_mut(pn);
                    next.copy_from_slice(prev);
                    self.step(r, t, next);
                }
                for t in (0..t_len).rev() {
                    let (a, da) = self.transition(r, t);
                    let (b, c) = self.bc(r, t);
                    let x = &self.x[(r * t_len + t) * p..][..p];
                    let d_y = &g_out[t * p..][..p];
                    let h_prev = &states[t * pn..][..pn];
                    let h_t = &states[(t + 1) * pn..][..pn];
                    let (d_x, d_b) = (&mut d_x[t * p..][..p], &mut d_b[t * n..][..n]);
                    let d_c = &mut d_c[t * n..][..n];
                    let mut d_a = 0.0f32;
                    for i in 0..p {
                        let dh_i = &mut d_h[i * n..][..n];
                        let (hp_i, ht_i) = (&h_prev[i * n..][..n], &h_t[i * n..][..n]);
                        let mut dx_i = 0.0f32;
                        for j in 0..n {
                            d_c[j] += ht_i[j] * d_y[i];
                            dh_i[j] += d_y[i] * c[j];
                            dx_i += dh_i[j] * b[j];
                            d_b[j] += dh_i[j] * x[i];
                            d_a += dh_i[j] * hp_i[j];
                            dh_i[j] *= a;
                        }
                        d_x[i] = dx_i;
                    }
                    d_log_a[t] = da * d_a;
                }
            },
        );
        let section = |offset, len| Sections {
            parts: &parts,
            per,
            offset,
            len,
        };
        let (tp, tn) = (t_len * p, t_len * n);
        // B and C are shared by a sequence's heads: sum each sequence's rows.
        let per_sequence = |offset| {
            let rows = section(offset, tn).gather();
            rows.chunks_exact(self.heads * tn)
                .flat_map(|heads| {
                    (0..tn).map(move |k| (0..self.heads).map(|h| heads[h * tn + k]).sum::<f32>())
                })
                .collect()
        };
        [
            section(0, tp).gather(),
            section(tp, t_len).gather(),
            per_sequence(tp + t_len),
            per_sequence(tp + t_len + tn),
            section(tp + t_len + 2 * tn, pn).gather(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::mamba2::{Ssd, recurrent};
    use crate::scan::Eigenvalues;
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel against the definition at uneven sizes (B 2 with 3 heads, T 1 and 9, P 5,
    /// N 3), from a non-zero state, at both eigenvalue ranges (decays from 0.2 to 1, so signed
    /// transitions of both signs): outputs, the final state and every input's gradient, `B`'s
    /// and `C`'s summed over the heads, on every instruction-set copy the CPU runs.
    #[test]
    fn kernel_matches_definition() {
        on_every_isa(|_| {
            for eigenvalues in [Eigenvalues::Positive, Eigenvalues::Signed] {
                for t in [1, 9] {
                    let (bsz, heads, p, n) = (2, 3, 5, 3);
                    let x = uniform([bsz, heads, t, p], -1.0, 1.0, 1);
                    let log_a = uniform([bsz, heads, t], -1.6, 0.0, 2);
                    let b = uniform([bsz, t, n], -1.0, 1.0, 3);
                    let c = uniform([bsz, t, n], -1.0, 1.0, 4);
                    let h0 = uniform([bsz, heads, p, n], -1.0, 1.0, 5);
                    let r_y = uniform([bsz, heads, t, p], -1.0, 1.0, 6);
                    let r_h = uniform([bsz, heads, p, n], -1.0, 1.0, 7);
                    let run = |fused: bool| {
                        let (x, h0) = (x.clone().require_grad(), h0.clone().require_grad());
                        let (b, c) = (b.clone().require_grad(), c.clone().require_grad());
                        let log_a = log_a.clone().require_grad();
                        let (y, h) = if fused {
                            let out = super::super::ssd(
                                x.clone().reshape([bsz * heads, t, p]),
                                log_a.clone().reshape([bsz * heads, t]),
                                b.clone(),
                                c.clone(),
                                h0.clone().reshape([bsz * heads, p, n]),
                                heads,
                                eigenvalues,
                            );
                            let y = out.clone().narrow(1, 0, t * p).reshape([bsz, heads, t, p]);
                            (y, out.narrow(1, t * p, p * n).reshape([bsz, heads, p, n]))
                        } else {
                            let inputs = Ssd {
                                x: x.clone(),
                                log_a: log_a.clone(),
                                b: b.clone(),
                                c: c.clone(),
                            };
                            recurrent(inputs, h0.clone(), eigenvalues)
                        };
                        let loss =
                            (y.clone() * r_y.clone()).sum() + (h.clone() * r_h.clone()).sum();
                        let grads = loss.backward();
                        let g4 = |v: &Tensor<4>| v.grad(&grads).unwrap().flatten::<1>(0, 3);
                        let g3 = |v: &Tensor<3>| v.grad(&grads).unwrap().flatten::<1>(0, 2);
                        (y, h, [g4(&x), g3(&log_a), g3(&b), g3(&c), g4(&h0)])
                    };
                    let (y, h, grads) = run(true);
                    let (y_ref, h_ref, grads_ref) = run(false);
                    let what = format!("{eigenvalues:?} T {t}");
                    assert!(max_diff(y, y_ref) < 1e-5, "{what}: y");
                    assert!(max_diff(h, h_ref) < 1e-5, "{what}: h_T");
                    let names = ["x", "log_a", "B", "C", "h0"];
                    for (name, (g, g_ref)) in names.iter().zip(grads.into_iter().zip(grads_ref)) {
                        assert!(max_diff(g, g_ref) < 1e-5, "{what}: d{name}");
                    }
                }
            }
        });
    }
}
