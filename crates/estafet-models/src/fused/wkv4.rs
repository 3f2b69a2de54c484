//! RWKV-4's WKV in the official kernel's running-max form, as one kernel:
//!
//! ```text
//! q = max(p, u + k_t)            y_t = (e^{p−q} a + e^{u+k_t−q} v_t) / (e^{p−q} b + e^{u+k_t−q})
//! q' = max(p − w, k_t)           a ← e^{p−w−q'} a + e^{k_t−q'} v_t,  b ← e^{p−w−q'} b + e^{k_t−q'},  p ← q'
//! ```
//!
//! The backward differentiates exactly these operations (the maxima route their gradient to
//! the larger argument, as the tensor-op form's `max_pair` does), recomputing each sequence's
//! states. The definition is RWKV's sequential WKV (`rwkv::wkv4_sequential`).

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::exp;

/// The WKV's inputs on the host.
#[derive(Debug)]
pub(super) struct Wkv4 {
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
        let mut out = zeros(self.batch * width);
        par_rows(
            &mut out,
            width,
            #[inline(always)]
            |i, row| {
                let (y, state) = row.split_at_mut(t_len * d);
                let (a, rest) = state.split_at_mut(d);
                let (b, p) = rest.split_at_mut(d);
                a.copy_from_slice(&self.a[i * d..][..d]);
                b.copy_from_slice(&self.b[i * d..][..d]);
                p.copy_from_slice(&self.p[i * d..][..d]);
                for t in 0..t_len {
                    let row = (i * t_len + t) * d;
                    output_step(
                        &self.w,
                        &self.u,
                        &self.k[row..],
                        &self.v[row..],
                        a,
                        b,
                        p,
                        &mut y[t * d..][..d],
                    );
                }
            },
        );
        out
    }

    /// Gradients of `(w, u, k, v, a, b, p)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 7] {
        let (bsz, t_len, d) = (self.batch, self.len, self.d);
        let width = t_len * d + 3 * d;
        // Per sequence: [dk (T·D) | dv (T·D) | da | db | dp | dw | du] (each D).
        let per = 2 * t_len * d + 5 * d;
        let mut parts = zeros(bsz * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |i, part| {
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
                    next.copy_from_slice(prev);
                    let (a, rest) = next.split_at_mut(d);
                    let (b, p) = rest.split_at_mut(d);
                    state_step(&self.w, &self.u, &self.k[row..], &self.v[row..], a, b, p);
                }
                for t in (0..t_len).rev() {
                    let row = (i * t_len + t) * d;
                    let prev = &states[t * 3 * d..][..3 * d];
                    backward_step(
                        &self.w,
                        &self.u,
                        &self.k[row..],
                        &self.v[row..],
                        &prev[..d],
                        &prev[d..][..d],
                        &prev[2 * d..][..d],
                        &g_out[t * d..][..d],
                        ga,
                        gb,
                        gp,
                        d_w,
                        d_u,
                        &mut d_k[t * d..][..d],
                        &mut d_v[t * d..][..d],
                    );
                }
            },
        );
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

// The per-step loops over channels are functions of slices, each its own argument (a slice
// inside an array or struct carries no no-alias guarantee), inlined: LLVM then knows the
// operands do not alias and every index is in bounds. Written inline in the sequence loops they
// ran scalar (`perf`, 2026-12-03).

/// One step of every channel from `w`, `u`, `k_t`, `v_t` (each at least D long): the state
/// `(a, b, p)` updated in place.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn state_step(
    w: &[f32],
    u: &[f32],
    k: &[f32],
    v: &[f32],
    a: &mut [f32],
    b: &mut [f32],
    p: &mut [f32],
) {
    let d = a.len();
    let (w, u, k, v, b, p) = (&w[..d], &u[..d], &k[..d], &v[..d], &mut b[..d], &mut p[..d]);
    for c in 0..d {
        let s = wkv4_step(w[c], u[c], k[c], v[c], a[c], b[c], p[c]);
        (a[c], b[c], p[c]) = (s.a, s.b, s.p);
    }
}

/// [`state_step`] that also writes the output `y_t`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn output_step(
    w: &[f32],
    u: &[f32],
    k: &[f32],
    v: &[f32],
    a: &mut [f32],
    b: &mut [f32],
    p: &mut [f32],
    y: &mut [f32],
) {
    let d = a.len();
    let (w, u, k, v, b, p, y) = (
        &w[..d],
        &u[..d],
        &k[..d],
        &v[..d],
        &mut b[..d],
        &mut p[..d],
        &mut y[..d],
    );
    for c in 0..d {
        let s = wkv4_step(w[c], u[c], k[c], v[c], a[c], b[c], p[c]);
        (y[c], a[c], b[c], p[c]) = (s.y, s.a, s.b, s.p);
    }
}

/// One step's gradients for every channel: from the state before the step `(a, b, p)`, the
/// output's gradient `g_y` and the state's `(ga, gb, gp)` (replaced by the previous state's),
/// accumulates `dw`, `du` and writes `dk_t`, `dv_t`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_step(
    w: &[f32],
    u: &[f32],
    k: &[f32],
    v: &[f32],
    a: &[f32],
    b: &[f32],
    p: &[f32],
    g_y: &[f32],
    ga: &mut [f32],
    gb: &mut [f32],
    gp: &mut [f32],
    d_w: &mut [f32],
    d_u: &mut [f32],
    d_k: &mut [f32],
    d_v: &mut [f32],
) {
    let d = a.len();
    let (w, u, k, v, b, p, g_y) = (
        &w[..d],
        &u[..d],
        &k[..d],
        &v[..d],
        &b[..d],
        &p[..d],
        &g_y[..d],
    );
    let (ga, gb, gp) = (&mut ga[..d], &mut gb[..d], &mut gp[..d]);
    let (d_w, d_u, d_k, d_v) = (&mut d_w[..d], &mut d_u[..d], &mut d_k[..d], &mut d_v[..d]);
    for c in 0..d {
        let (a0, b0, p0) = (a[c], b[c], p[c]);
        let (k, v) = (k[c], v[c]);
        let s = wkv4_step(w[c], u[c], k, v, a0, b0, p0);
        let (g_a, g_b, g_p) = (ga[c], gb[c], gp[c]);
        // The state update.
        let g_f1 = g_a * a0 + g_b * b0;
        let g_f2 = g_a * v + g_b;
        let mut n_a = g_a * s.f1;
        let mut n_b = g_b * s.f1;
        let mut g_v = g_a * s.f2;
        let g_q = g_p - g_f1 * s.f1 - g_f2 * s.f2;
        // The max's gradient goes to whichever argument won; as selects, so the loop vectorises.
        let (q_decayed, q_k) = if s.decayed_won {
            (g_q, 0.0)
        } else {
            (0.0, g_q)
        };
        let g_decayed = g_f1 * s.f1 + q_decayed;
        let mut g_k = g_f2 * s.f2 + q_k;
        let mut n_p = g_decayed;
        d_w[c] -= g_decayed;
        // The output.
        let g_y = g_y[c];
        let g_num = g_y / s.den;
        let g_den = -g_y * s.y / s.den;
        let g_e1 = g_num * a0 + g_den * b0;
        let g_e2 = g_num * v + g_den;
        n_a += g_num * s.e1;
        n_b += g_den * s.e1;
        g_v += g_num * s.e2;
        let g_q = -(g_e1 * s.e1 + g_e2 * s.e2);
        n_p += g_e1 * s.e1;
        let (q_p, q_uk) = if s.p_won { (g_q, 0.0) } else { (0.0, g_q) };
        n_p += q_p;
        let g_uk = g_e2 * s.e2 + q_uk;
        d_u[c] += g_uk;
        g_k += g_uk;
        d_k[c] = g_k;
        d_v[c] = g_v;
        (ga[c], gb[c], gp[c]) = (n_a, n_b, n_p);
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::rwkv::{Wkv4State, wkv4_sequential};
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel against the definition (the sequential running-max WKV) at an uneven batch
    /// (B = 3) and odd sizes, from a non-zero state: `y`, the final `(a, b, p)` and the gradient
    /// of every input.
    #[test]
    fn kernel_matches_definition() {
        // Every instruction-set copy of the kernel the CPU runs.
        on_every_isa(|_| {
            let (bsz, t, d) = (3, 7, 5);
            let uniform3 = |lo, hi, seed| uniform([bsz, t, d], lo, hi, seed);
            let uniform2 = |lo, hi, seed| uniform([bsz, d], lo, hi, seed);
            let w = uniform([d], 0.05, 2.0, 1);
            let u = uniform([d], -1.0, 1.0, 2);
            let (k, v) = (uniform3(-2.0, 2.0, 3), uniform3(-1.0, 1.0, 4));
            let (a, b, p) = (
                uniform2(-1.0, 1.0, 5),
                uniform2(0.5, 2.0, 6),
                uniform2(-1.0, 1.0, 7),
            );
            let (r_y, r_a, r_b) = (
                uniform3(-1.0, 1.0, 8),
                uniform2(-1.0, 1.0, 9),
                uniform2(-1.0, 1.0, 10),
            );
            let run = |fused: bool| {
                let (w, u) = (w.clone().require_grad(), u.clone().require_grad());
                let (k, v) = (k.clone().require_grad(), v.clone().require_grad());
                let (a, b, p) = (
                    a.clone().require_grad(),
                    b.clone().require_grad(),
                    p.clone().require_grad(),
                );
                let (y, state) = if fused {
                    let out = super::super::wkv4(
                        w.clone(),
                        u.clone(),
                        k.clone(),
                        v.clone(),
                        a.clone(),
                        b.clone(),
                        p.clone(),
                    );
                    let part = |i| out.clone().narrow(1, t * d + i * d, d);
                    let state = Wkv4State {
                        a: part(0),
                        b: part(1),
                        p: part(2),
                    };
                    (out.narrow(1, 0, t * d).reshape([bsz, t, d]), state)
                } else {
                    let state = Wkv4State {
                        a: a.clone(),
                        b: b.clone(),
                        p: p.clone(),
                    };
                    wkv4_sequential(w.clone(), u.clone(), k.clone(), v.clone(), state)
                };
                let loss = (y.clone() * r_y.clone()).sum()
                    + (state.a.clone() * r_a.clone()).sum()
                    + (state.b.clone() * r_b.clone()).sum();
                let grads = loss.backward();
                let g1 = |t: &Tensor<1>| t.grad(&grads).unwrap();
                let g2 = |t: &Tensor<2>| t.grad(&grads).unwrap().flatten::<1>(0, 1);
                let g3 = |t: &Tensor<3>| t.grad(&grads).unwrap().flatten::<1>(0, 2);
                let inputs = [g1(&w), g1(&u), g3(&k), g3(&v), g2(&a), g2(&b), g2(&p)];
                (y, state, inputs)
            };
            let (y, s, grads) = run(true);
            let (y_ref, s_ref, grads_ref) = run(false);
            assert!(max_diff(y, y_ref) < 1e-5, "y");
            for (name, got, want) in [
                ("a", s.a, s_ref.a),
                ("b", s.b, s_ref.b),
                ("p", s.p, s_ref.p),
            ] {
                assert!(max_diff(got, want) < 1e-5, "final {name}");
            }
            let names = ["w", "u", "k", "v", "a", "b", "p"];
            for (name, (g, g_ref)) in names.iter().zip(grads.into_iter().zip(grads_ref)) {
                assert!(max_diff(g, g_ref) < 1e-4, "d{name}");
            }
        });
    }
}
