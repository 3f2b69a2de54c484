//! RWKV-6's WKV (Finch; fla's `naive_recurrent_rwkv6`) as one kernel, per sequence-head `r`
//! with a matrix state `S [K, V]`, a decay per key channel and the bonus `u` of the current
//! token:
//!
//! ```text
//! o_t = (S_{t−1} + diag(u) k_t v_tᵀ)ᵀ r_t
//! S_t = diag(w_t) S_{t−1} + k_t v_tᵀ,        w_t = exp(log_w_t) ∈ (0, 1]
//! ```
//!
//! Built from tensor ops each step is a handful of small ops on `[B, H, K, V]`, forward and
//! backward. Here a sequence-head's state lives in a `K × V` buffer for the whole time loop.
//! The backward recomputes the states of one sequence-head at a time, then walks time in
//! reverse with `∂S_t` (the final state's gradient to start), `a_t = Σ_i r_i u_i k_i` and
//! `c_t = ∂o_t · v_t`:
//!
//! ```text
//! ∂r_t = S_{t−1} ∂o_t + c_t u ⊙ k_t           ∂u += c_t r_t ⊙ k_t
//! ∂k_t = c_t r_t ⊙ u + ∂S_t v_t                ∂v_t = a_t ∂o_t + ∂S_tᵀ k_t
//! ∂log_w_t = w_t ⊙ Σ_j ∂S_t ⊙ S_{t−1}          ∂S_{t−1} = r_t ∂o_tᵀ + diag(w_t) ∂S_t
//! ```
//!
//! The definition is `rwkv::wkv6_sequential`, the model's sequential tensor form.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::exp;

/// The recurrence's inputs on the host.
#[derive(Debug)]
pub(super) struct Wkv6 {
    rows: usize,
    len: usize,
    dk: usize,
    dv: usize,
    /// `[R, T, K]`.
    r: Vec<f32>,
    k: Vec<f32>,
    log_w: Vec<f32>,
    /// `[R, T, V]`.
    v: Vec<f32>,
    /// `[R, K]`.
    u: Vec<f32>,
    /// `[R, K, V]`.
    s0: Vec<f32>,
}

impl Wkv6 {
    /// One step of sequence-head `row` at `t`: `o` (`V`) gets `o_t` from `s` = `S_{t−1}`, which
    /// then becomes `S_t`.
    #[inline(always)]
    fn step(&self, row: usize, t: usize, s: &mut [f32], o: &mut [f32]) {
        let (dk, dv) = (self.dk, self.dv);
        let at = row * self.len + t;
        let r = &self.r[at * dk..][..dk];
        let k = &self.k[at * dk..][..dk];
        let log_w = &self.log_w[at * dk..][..dk];
        let v = &self.v[at * dv..][..dv];
        let u = &self.u[row * dk..][..dk];
        let o = &mut o[..dv];
        let mut bonus = 0.0f32;
        for i in 0..dk {
            bonus += r[i] * u[i] * k[i];
        }
        for j in 0..dv {
            o[j] = bonus * v[j];
        }
        for (i, s_i) in s.chunks_exact_mut(dv).enumerate() {
            let w = exp(log_w[i]);
            for j in 0..dv {
                o[j] += r[i] * s_i[j];
                s_i[j] = w * s_i[j] + k[i] * v[j];
            }
        }
    }
}

impl HostKernel<6> for Wkv6 {
    type Args = ();

    fn read<B: Backend>([r, k, v, log_w, u, s0]: [&FloatTensor<B>; 6], (): ()) -> Self {
        let [rows, len, dk] = dims3::<B>(r);
        let dv = v.shape().as_slice()[2];
        assert!(len >= 1, "wkv6 needs T ≥ 1");
        assert_eq!(u.shape().as_slice(), [rows, dk], "u is [R, K]");
        assert_eq!(s0.shape().as_slice(), [rows, dk, dv], "s0 is [R, K, V]");
        Self {
            rows,
            len,
            dk,
            dv,
            r: read::<B>(r.clone()),
            k: read::<B>(k.clone()),
            log_w: read::<B>(log_w.clone()),
            v: read::<B>(v.clone()),
            u: read::<B>(u.clone()),
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
            vec![r, t, dk],
            vec![r, dk],
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
            |row, out| {
                let (o, s) = out.split_at_mut(t_len * dv);
                s.copy_from_slice(&self.s0[row * dk * dv..][..dk * dv]);
                for (t, o_t) in o.chunks_exact_mut(dv).enumerate() {
                    self.step(row, t, s, o_t);
                }
            },
        );
        out
    }

    /// Gradients of `(r, k, v, log_w, u, S_0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 6] {
        let (t_len, dk, dv) = (self.len, self.dk, self.dv);
        let kv = dk * dv;
        let width = t_len * dv + kv;
        // Per sequence-head: [dr | dk | dlog_w (T·K each) | dv (T·V) | du (K) | dS (K·V)].
        let per = 3 * t_len * dk + t_len * dv + dk + kv;
        let mut parts = zeros(self.rows * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |row, part| {
                let (d_r, rest) = part.split_at_mut(t_len * dk);
                let (d_k, rest) = rest.split_at_mut(t_len * dk);
                let (d_lw, rest) = rest.split_at_mut(t_len * dk);
                let (d_v, rest) = rest.split_at_mut(t_len * dv);
                let (d_u, d_s) = rest.split_at_mut(dk);
                let d_s = &mut d_s[..kv];
                let g_out = &d_out[row * width..][..width];
                d_s.copy_from_slice(&g_out[t_len * dv..][..kv]);
                // S_0..S_{T−1}: the state each step reads.
                let mut states = vec![0.0f32; t_len * kv];
                let mut o = vec![0.0f32; dv];
                states[..kv].copy_from_slice(&self.s0[row * kv..][..kv]);
                for t in 1..t_len {
                    let (prev, next) = states[(t - 1) * kv..][..2 * kv].split_at_mut(kv);
                    next.copy_from_slice(prev);
                    self.step(row, t - 1, next, &mut o);
                }
                let u = &self.u[row * dk..][..dk];
                for t in (0..t_len).rev() {
                    let at = row * t_len + t;
                    let r = &self.r[at * dk..][..dk];
                    let k = &self.k[at * dk..][..dk];
                    let log_w = &self.log_w[at * dk..][..dk];
                    let v = &self.v[at * dv..][..dv];
                    let s_prev = &states[t * kv..][..kv];
                    let d_o = &g_out[t * dv..][..dv];
                    let (d_r, d_k) = (&mut d_r[t * dk..][..dk], &mut d_k[t * dk..][..dk]);
                    let d_lw = &mut d_lw[t * dk..][..dk];
                    let d_v = &mut d_v[t * dv..][..dv];
                    let mut bonus = 0.0f32;
                    let mut c = 0.0f32;
                    for i in 0..dk {
                        bonus += r[i] * u[i] * k[i];
                    }
                    for j in 0..dv {
                        c += d_o[j] * v[j];
                        d_v[j] = bonus * d_o[j];
                    }
                    for i in 0..dk {
                        let w = exp(log_w[i]);
                        let ds_i = &mut d_s[i * dv..][..dv];
                        let sp_i = &s_prev[i * dv..][..dv];
                        let (mut dr_i, mut dk_i, mut dw_i) = (0.0f32, 0.0f32, 0.0f32);
                        for j in 0..dv {
                            // S_t = w S_{t−1} + k vᵀ, with ∂S_t still the step's own.
                            dk_i += ds_i[j] * v[j];
                            d_v[j] += ds_i[j] * k[i];
                            dw_i += ds_i[j] * sp_i[j];
                            // o_t reads S_{t−1}.
                            dr_i += sp_i[j] * d_o[j];
                            ds_i[j] = w * ds_i[j] + r[i] * d_o[j];
                        }
                        d_r[i] = dr_i + c * u[i] * k[i];
                        d_k[i] = dk_i + c * r[i] * u[i];
                        d_lw[i] = w * dw_i;
                        d_u[i] += c * r[i] * k[i];
                    }
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
            section(3 * tk, tv).gather(),
            section(2 * tk, tk).gather(),
            section(3 * tk + tv, dk).gather(),
            section(3 * tk + tv + dk, kv).gather(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::rwkv::wkv6_sequential;
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel against the definition at uneven sizes (R 3, T 1 and 9, K 5, V 3), from a
    /// non-zero state, with decays from 0.2 to 1 and a bonus of either sign: outputs, the final
    /// state and every input's gradient, on every instruction-set copy the CPU runs.
    #[test]
    fn kernel_matches_definition() {
        on_every_isa(|_| {
            for t in [1, 9] {
                let (rows, dk, dv) = (3, 5, 3);
                let r = uniform([rows, t, dk], -1.0, 1.0, 1);
                let k = uniform([rows, t, dk], -1.0, 1.0, 2);
                let v = uniform([rows, t, dv], -1.0, 1.0, 3);
                let log_w = uniform([rows, t, dk], -1.6, 0.0, 4);
                let u = uniform([rows, dk], -1.0, 1.0, 5);
                let s0 = uniform([rows, dk, dv], -1.0, 1.0, 6);
                let (r_o, r_s) = (
                    uniform([rows, t, dv], -1.0, 1.0, 7),
                    uniform([rows, dk, dv], -1.0, 1.0, 8),
                );
                let run = |fused: bool| {
                    let leaf3 = |x: &Tensor<3>| x.clone().require_grad();
                    let (r, k, v, log_w, s0) =
                        (leaf3(&r), leaf3(&k), leaf3(&v), leaf3(&log_w), leaf3(&s0));
                    let u = u.clone().require_grad();
                    let (o, s) = if fused {
                        let out = super::super::wkv6(
                            r.clone(),
                            k.clone(),
                            v.clone(),
                            log_w.clone(),
                            u.clone(),
                            s0.clone(),
                        );
                        let o = out.clone().narrow(1, 0, t * dv).reshape([rows, t, dv]);
                        (o, out.narrow(1, t * dv, dk * dv).reshape([rows, dk, dv]))
                    } else {
                        // The definition over heads: [1, R, T, ·], u [1, R, 1, K].
                        let (o, s) = wkv6_sequential(
                            r.clone().unsqueeze_dim(0),
                            k.clone().unsqueeze_dim(0),
                            v.clone().unsqueeze_dim(0),
                            log_w.clone().unsqueeze_dim(0),
                            u.clone().unsqueeze_dim::<3>(1).unsqueeze_dim(0),
                            s0.clone().unsqueeze_dim(0),
                        );
                        (o.squeeze_dim(0), s.squeeze_dim(0))
                    };
                    let loss = (o.clone() * r_o.clone()).sum() + (s.clone() * r_s.clone()).sum();
                    let grads = loss.backward();
                    let g3 = |x: &Tensor<3>| x.grad(&grads).unwrap().flatten::<1>(0, 2);
                    let g_u = u.grad(&grads).unwrap().flatten::<1>(0, 1);
                    (o, s, [g3(&r), g3(&k), g3(&v), g3(&log_w), g_u, g3(&s0)])
                };
                let (o, s, grads) = run(true);
                let (o_ref, s_ref, grads_ref) = run(false);
                assert!(max_diff(o, o_ref) < 1e-5, "T {t}: o");
                assert!(max_diff(s, s_ref) < 1e-5, "T {t}: S_T");
                let names = ["r", "k", "v", "log_w", "u", "s0"];
                for (name, (g, g_ref)) in names.iter().zip(grads.into_iter().zip(grads_ref)) {
                    assert!(max_diff(g, g_ref) < 1e-5, "T {t}: d{name}");
                }
            }
        });
    }
}
