//! The gated delta rule (Gated DeltaNet's recurrence, fla's `naive_recurrent_gated_delta_rule`)
//! as one kernel, per sequence-head `r` with a matrix state `S [K, V]`:
//!
//! ```text
//! P_t = α_t S_{t−1},  α_t = exp(g_t)         decay
//! w_t = P_tᵀ k_t                             what the key recalls
//! u_t = β_t (v_t − w_t)                      the delta rule's correction
//! S_t = P_t + k_t u_tᵀ                       = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ
//! o_t = S_tᵀ q_t
//! ```
//!
//! Built from tensor ops each step is about ten small ops on `[B, H, K, V]`, forward and
//! backward: at d 32–64 the layer ran at 0.03 of the machine's GEMM rate. Here a sequence-head's
//! state lives in a `K × V` buffer for the whole time loop. The backward recomputes the states
//! of one sequence-head at a time, then walks time in reverse with `∂S_t` (the final state's
//! gradient to start):
//!
//! ```text
//! ∂S_t += q_t ∂o_tᵀ,   ∂q_t = S_t ∂o_t
//! ∂u = ∂S_tᵀ k_t,   ∂k_t = ∂S_t u_t + P_t ∂w,   ∂w = −β_t ∂u,   ∂v_t = β_t ∂u,   ∂β_t = ∂u·(v_t − w_t)
//! ∂P = ∂S_t + k_t ∂wᵀ,   ∂g_t = α_t Σ ∂P ⊙ S_{t−1},   ∂S_{t−1} = α_t ∂P
//! ```
//!
//! The definition is `gated_deltanet::recurrent`, the model's sequential tensor form.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::exp;

/// The recurrence's inputs on the host.
#[derive(Debug)]
pub(super) struct DeltaRule {
    rows: usize,
    len: usize,
    dk: usize,
    dv: usize,
    /// `[R, T, K]`.
    q: Vec<f32>,
    k: Vec<f32>,
    /// `[R, T, V]`.
    v: Vec<f32>,
    /// `[R, T]`.
    beta: Vec<f32>,
    g: Vec<f32>,
    /// `[R, K, V]`.
    s0: Vec<f32>,
}

impl DeltaRule {
    /// One step of sequence-head `r` at `t`: `s` holds `S_{t−1}` and becomes `S_t`; `u` gets
    /// `u_t` and `w` gets `w_t` (`V` each).
    #[inline(always)]
    fn step(&self, r: usize, t: usize, s: &mut [f32], w: &mut [f32], u: &mut [f32]) {
        let (dk, dv) = (self.dk, self.dv);
        let row = r * self.len + t;
        let alpha = exp(self.g[row]);
        let beta = self.beta[row];
        let k = &self.k[row * dk..][..dk];
        let v = &self.v[row * dv..][..dv];
        let (w, u) = (&mut w[..dv], &mut u[..dv]);
        w.fill(0.0);
        for (i, s_i) in s.chunks_exact_mut(dv).enumerate() {
            for j in 0..dv {
                s_i[j] *= alpha;
                w[j] += k[i] * s_i[j];
            }
        }
        for j in 0..dv {
            u[j] = beta * (v[j] - w[j]);
        }
        for (i, s_i) in s.chunks_exact_mut(dv).enumerate() {
            for j in 0..dv {
                s_i[j] += k[i] * u[j];
            }
        }
    }

    /// `o = Sᵀ q` for sequence-head `r` at `t`, into `o` (`V`).
    #[inline(always)]
    fn read_out(&self, r: usize, t: usize, s: &[f32], o: &mut [f32]) {
        let dv = self.dv;
        let q = &self.q[(r * self.len + t) * self.dk..][..self.dk];
        let o = &mut o[..dv];
        o.fill(0.0);
        for (i, s_i) in s.chunks_exact(dv).enumerate() {
            for j in 0..dv {
                o[j] += q[i] * s_i[j];
            }
        }
    }
}

impl HostKernel<6> for DeltaRule {
    type Args = ();

    fn read<B: Backend>([q, k, v, beta, g, s0]: [&FloatTensor<B>; 6], (): ()) -> Self {
        let [rows, len, dk] = dims3::<B>(q);
        let dv = v.shape().as_slice()[2];
        assert!(len >= 1, "delta_rule needs T ≥ 1");
        assert_eq!(s0.shape().as_slice(), [rows, dk, dv], "s0 is [R, K, V]");
        Self {
            rows,
            len,
            dk,
            dv,
            q: read::<B>(q.clone()),
            k: read::<B>(k.clone()),
            v: read::<B>(v.clone()),
            beta: read::<B>(beta.clone()),
            g: read::<B>(g.clone()),
            s0: read::<B>(s0.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.rows, self.len * self.dv + self.dk * self.dv]
    }

    fn input_shapes(&self) -> [Vec<usize>; 6] {
        let (r, t, dk, dv) = (self.rows, self.len, self.dk, self.dv);
        [
            vec![r, t, dk],
            vec![r, t, dk],
            vec![r, t, dv],
            vec![r, t],
            vec![r, t],
            vec![r, dk, dv],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (t_len, dk, dv) = (self.len, self.dk, self.dv);
        let width = t_len * dv + dk * dv;
        let mut out = zeros(self.rows * width);
        par_rows(
            &mut out,
            width,
            #[inline(always)]
            |r, row| {
                let (o, s) = row.split_at_mut(t_len * dv);
                s.copy_from_slice(&self.s0[r * dk * dv..][..dk * dv]);
                let (mut w, mut u) = (vec![0.0f32; dv], vec![0.0f32; dv]);
                for (t, o_t) in o.chunks_exact_mut(dv).enumerate() {
                    self.step(r, t, s, &mut w, &mut u);
                    self.read_out(r, t, s, o_t);
                }
            },
        );
        out
    }

    /// Gradients of `(q, k, v, β, g, S_0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 6] {
        let (t_len, dk, dv) = (self.len, self.dk, self.dv);
        let kv = dk * dv;
        let width = t_len * dv + kv;
        // Per sequence-head: [dq (T·K) | dk (T·K) | dv (T·V) | dβ (T) | dg (T) | dS (K·V)].
        let per = 2 * t_len * dk + t_len * dv + 2 * t_len + kv;
        let mut parts = zeros(self.rows * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |r, part| {
                let (d_q, rest) = part.split_at_mut(t_len * dk);
                let (d_k, rest) = rest.split_at_mut(t_len * dk);
                let (d_v, rest) = rest.split_at_mut(t_len * dv);
                let (d_beta, rest) = rest.split_at_mut(t_len);
                let (d_g, d_s) = rest.split_at_mut(t_len);
                let d_s = &mut d_s[..kv];
                let g_out = &d_out[r * width..][..width];
                d_s.copy_from_slice(&g_out[t_len * dv..][..kv]);
                // S_0..S_T, and every step's w_t and u_t.
                let mut states = vec![0.0f32; (t_len + 1) * kv];
                let mut ws = vec![0.0f32; t_len * dv];
                let mut us = vec![0.0f32; t_len * dv];
                states[..kv].copy_from_slice(&self.s0[r * kv..][..kv]);
                for t in 0..t_len {
                    let (prev, next) = states[t * kv..][..2 * kv].split_at_mut(kv);
                    next.copy_from_slice(prev);
                    let (w, u) = (&mut ws[t * dv..][..dv], &mut us[t * dv..][..dv]);
                    self.step(r, t, next, w, u);
                }
                let mut d_u = vec![0.0f32; dv];
                for t in (0..t_len).rev() {
                    let row = r * t_len + t;
                    let alpha = exp(self.g[row]);
                    let beta = self.beta[row];
                    let q = &self.q[row * dk..][..dk];
                    let k = &self.k[row * dk..][..dk];
                    let v = &self.v[row * dv..][..dv];
                    let (w, u) = (&ws[t * dv..][..dv], &us[t * dv..][..dv]);
                    let s_prev = &states[t * kv..][..kv];
                    let s_t = &states[(t + 1) * kv..][..kv];
                    let d_o = &g_out[t * dv..][..dv];
                    let (d_q, d_k) = (&mut d_q[t * dk..][..dk], &mut d_k[t * dk..][..dk]);
                    let d_v = &mut d_v[t * dv..][..dv];
                    // ∂S_t += q ∂oᵀ; ∂q = S_t ∂o; ∂u = ∂S_tᵀ k; ∂k = ∂S_t u.
                    d_u.fill(0.0);
                    for i in 0..dk {
                        let ds_i = &mut d_s[i * dv..][..dv];
                        let s_i = &s_t[i * dv..][..dv];
                        let (mut dq_i, mut dk_i) = (0.0f32, 0.0f32);
                        for j in 0..dv {
                            ds_i[j] += q[i] * d_o[j];
                            dq_i += s_i[j] * d_o[j];
                            d_u[j] += ds_i[j] * k[i];
                            dk_i += ds_i[j] * u[j];
                        }
                        d_q[i] = dq_i;
                        d_k[i] = dk_i;
                    }
                    // u = β (v − w): ∂v = β ∂u, ∂w = −β ∂u, ∂β = ∂u·(v − w).
                    let mut d_b = 0.0f32;
                    for j in 0..dv {
                        d_b += d_u[j] * (v[j] - w[j]);
                        d_v[j] = beta * d_u[j];
                    }
                    d_beta[t] = d_b;
                    // ∂P = ∂S_t + k ∂wᵀ; ∂k += P ∂w with P = α S_{t−1};
                    // ∂α = Σ ∂P ⊙ S_{t−1}; ∂S_{t−1} = α ∂P.
                    let mut d_alpha = 0.0f32;
                    for i in 0..dk {
                        let ds_i = &mut d_s[i * dv..][..dv];
                        let sp_i = &s_prev[i * dv..][..dv];
                        let mut dk_i = 0.0f32;
                        for j in 0..dv {
                            let d_w = -beta * d_u[j];
                            dk_i += alpha * sp_i[j] * d_w;
                            let d_p = ds_i[j] + k[i] * d_w;
                            d_alpha += d_p * sp_i[j];
                            ds_i[j] = alpha * d_p;
                        }
                        d_k[i] += dk_i;
                    }
                    d_g[t] = alpha * d_alpha;
                }
            },
        );
        let (tk, tv) = (t_len * dk, t_len * dv);
        let section = |offset, len| Sections {
            parts: &parts,
            per,
            offset,
            len,
        };
        [
            section(0, tk).gather(),
            section(tk, tk).gather(),
            section(2 * tk, tv).gather(),
            section(2 * tk + tv, t_len).gather(),
            section(2 * tk + tv + t_len, t_len).gather(),
            section(2 * tk + tv + 2 * t_len, kv).gather(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::gated_deltanet::{Heads, recurrent};
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel against the definition at uneven sizes (R 3, T 1 and 9, K 5, V 3), from a
    /// non-zero state, with β up to 2 (signed eigenvalues) and decays well below 1: outputs,
    /// the final state and every input's gradient, on every instruction-set copy the CPU runs.
    #[test]
    fn kernel_matches_definition() {
        on_every_isa(|_| {
            for t in [1, 9] {
                let (r, dk, dv) = (3, 5, 3);
                let q = uniform([r, t, dk], -1.0, 1.0, 1);
                let k = uniform([r, t, dk], -0.5, 0.5, 2);
                let v = uniform([r, t, dv], -1.0, 1.0, 3);
                let beta = uniform([r, t], 0.0, 2.0, 4);
                let g = uniform([r, t], -1.5, 0.0, 5);
                let s0 = uniform([r, dk, dv], -1.0, 1.0, 6);
                let (r_o, r_s) = (
                    uniform([r, t, dv], -1.0, 1.0, 7),
                    uniform([r, dk, dv], -1.0, 1.0, 8),
                );
                let run = |fused: bool| {
                    let leaf3 = |x: &Tensor<3>| x.clone().require_grad();
                    let (q, k, v, s0) = (leaf3(&q), leaf3(&k), leaf3(&v), leaf3(&s0));
                    let (beta, g) = (beta.clone().require_grad(), g.clone().require_grad());
                    let (o, s) = if fused {
                        let out = super::super::delta_rule(
                            q.clone(),
                            k.clone(),
                            v.clone(),
                            beta.clone(),
                            g.clone(),
                            s0.clone(),
                        );
                        let o = out.clone().narrow(1, 0, t * dv).reshape([r, t, dv]);
                        (o, out.narrow(1, t * dv, dk * dv).reshape([r, dk, dv]))
                    } else {
                        let heads = Heads {
                            q: q.clone().unsqueeze_dim(0),
                            k: k.clone().unsqueeze_dim(0),
                            v: v.clone().unsqueeze_dim(0),
                            beta: beta.clone().unsqueeze_dim(0),
                            g: g.clone().unsqueeze_dim(0),
                        };
                        let (o, s) = recurrent(heads, s0.clone().unsqueeze_dim(0));
                        (o.squeeze_dim(0), s.squeeze_dim(0))
                    };
                    let loss = (o.clone() * r_o.clone()).sum() + (s.clone() * r_s.clone()).sum();
                    let grads = loss.backward();
                    let g3 = |x: &Tensor<3>| x.grad(&grads).unwrap().flatten::<1>(0, 2);
                    let g2 = |x: &Tensor<2>| x.grad(&grads).unwrap().flatten::<1>(0, 1);
                    (o, s, [g3(&q), g3(&k), g3(&v), g2(&beta), g2(&g), g3(&s0)])
                };
                let (o, s, grads) = run(true);
                let (o_ref, s_ref, grads_ref) = run(false);
                assert!(max_diff(o, o_ref) < 1e-5, "T {t}: o");
                assert!(max_diff(s, s_ref) < 1e-5, "T {t}: S_T");
                let names = ["q", "k", "v", "beta", "g", "s0"];
                for (name, (g, g_ref)) in names.iter().zip(grads.into_iter().zip(grads_ref)) {
                    assert!(max_diff(g, g_ref) < 1e-5, "T {t}: d{name}");
                }
            }
        });
    }
}
