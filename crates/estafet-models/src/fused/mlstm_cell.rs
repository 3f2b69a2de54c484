//! xLSTM's mLSTM cell (the native step of `mlstm_kernels`) as one kernel, per sequence-head
//! with a matrix memory `C [K, V]`, a normaliser `n [K]` and a stabiliser `m`:
//!
//! ```text
//! d_t = log_f_t + m_{t−1},   m_t = max(d_t, ĩ_t)
//! f_t = exp(d_t − m_t),      i_t = exp(ĩ_t − m_t)
//! C_t = f_t C_{t−1} + i_t k_t v_tᵀ,   n_t = f_t n_{t−1} + i_t k_t
//! out: C_tᵀ q_t [V], n_tᵀ q_t, m_t           (the model divides: num / (max(|nᵀq|, e^{−m}) + ε))
//! ```
//!
//! Built from tensor ops each step is a dozen small ops on `[B, H, K, V]`, forward and backward.
//! Here one sequence-head's memory lives in one buffer for the whole loop; the backward
//! recomputes one sequence-head's states and walks time in reverse with `∂C`, `∂n`, `∂m`:
//!
//! ```text
//! ∂C += q ∂numᵀ,  ∂n += q ∂qn,  ∂q = C_t ∂num + n_t ∂qn
//! ∂f = Σ ∂C ⊙ C_{t−1} + ∂n·n_{t−1},   ∂i = Σ_jl ∂C_jl k_j v_l + ∂n·k
//! ∂k = i (∂C v + ∂n),  ∂v = i ∂Cᵀ k,   ∂C_{t−1} = f ∂C,  ∂n_{t−1} = f ∂n
//! ∂d = f ∂f,  ∂ĩ = i ∂i,  ∂m_t = ∂m_t(out) + ∂m − ∂d − ∂ĩ  → to d_t if d_t > ĩ_t, else to ĩ_t
//! ∂log_f = ∂m_{t−1} = ∂d (plus ∂m_t if d_t won)
//! ```
//!
//! (the maximum routes its gradient to the larger argument, as the tensor form's `max_pair`
//! does). The definition is `mlstm::recurrent`, the model's sequential tensor form.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::exp;

/// The cell's inputs on the host.
#[derive(Debug)]
pub(super) struct MlstmCell {
    rows: usize,
    len: usize,
    dk: usize,
    dv: usize,
    /// `[R, T, K]`, `[R, T, K]`, `[R, T, V]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `ĩ` and `log σ(f̃)`, `[R, T]`.
    i: Vec<f32>,
    log_f: Vec<f32>,
    /// `[R, K, V]`, `[R, K]`, `[R]`.
    c0: Vec<f32>,
    n0: Vec<f32>,
    m0: Vec<f32>,
}

/// One step's gates: `(m_t, f_t, i_t, d_t won the max)`.
#[inline(always)]
fn gates(log_f: f32, i_pre: f32, m_prev: f32) -> (f32, f32, f32, bool) {
    let d = log_f + m_prev;
    let d_won = d > i_pre;
    let m = if d_won { d } else { i_pre };
    (m, exp(d - m), exp(i_pre - m), d_won)
}

impl MlstmCell {
    /// One step at `row` (= `r·T + t`) from `(c, n, m)`, which become the step's.
    #[inline(always)]
    fn step(&self, row: usize, c: &mut [f32], n: &mut [f32], m: &mut f32) {
        let (dk, dv) = (self.dk, self.dv);
        let (m_t, f, i, _) = gates(self.log_f[row], self.i[row], *m);
        let k = &self.k[row * dk..][..dk];
        let v = &self.v[row * dv..][..dv];
        for (j, c_j) in c.chunks_exact_mut(dv).enumerate() {
            let ik = i * k[j];
            for l in 0..dv {
                c_j[l] = f * c_j[l] + ik * v[l];
            }
        }
        for j in 0..dk {
            n[j] = f * n[j] + i * k[j];
        }
        *m = m_t;
    }
}

impl HostKernel<8> for MlstmCell {
    type Args = ();

    fn read<B: Backend>([q, k, v, i, log_f, c0, n0, m0]: [&FloatTensor<B>; 8], (): ()) -> Self {
        let [rows, len, dk] = dims3::<B>(q);
        let dv = v.shape().as_slice()[2];
        assert!(len >= 1, "mlstm_cell needs T ≥ 1");
        assert_eq!(c0.shape().as_slice(), [rows, dk, dv], "c0 is [R, K, V]");
        Self {
            rows,
            len,
            dk,
            dv,
            q: read::<B>(q.clone()),
            k: read::<B>(k.clone()),
            v: read::<B>(v.clone()),
            i: read::<B>(i.clone()),
            log_f: read::<B>(log_f.clone()),
            c0: read::<B>(c0.clone()),
            n0: read::<B>(n0.clone()),
            m0: read::<B>(m0.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        let (t, dk, dv) = (self.len, self.dk, self.dv);
        vec![self.rows, t * dv + 2 * t + dk * dv + dk + 1]
    }

    fn input_shapes(&self) -> [Vec<usize>; 8] {
        let (r, t, dk, dv) = (self.rows, self.len, self.dk, self.dv);
        [
            vec![r, t, dk],
            vec![r, t, dk],
            vec![r, t, dv],
            vec![r, t],
            vec![r, t],
            vec![r, dk, dv],
            vec![r, dk],
            vec![r],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (t_len, dk, dv) = (self.len, self.dk, self.dv);
        let width = t_len * dv + 2 * t_len + dk * dv + dk + 1;
        let mut out = zeros(self.rows * width);
        par_rows(
            &mut out,
            width,
            #[inline(always)]
            |r, row| {
                let (nums, rest) = row.split_at_mut(t_len * dv);
                let (qns, rest) = rest.split_at_mut(t_len);
                let (ms, rest) = rest.split_at_mut(t_len);
                let (c, rest) = rest.split_at_mut(dk * dv);
                let (n, m) = rest.split_at_mut(dk);
                c.copy_from_slice(&self.c0[r * dk * dv..][..dk * dv]);
                n.copy_from_slice(&self.n0[r * dk..][..dk]);
                m[0] = self.m0[r];
                for (t, num) in nums.chunks_exact_mut(dv).enumerate() {
                    let at = r * t_len + t;
                    self.step(at, c, n, &mut m[0]);
                    let q = &self.q[at * dk..][..dk];
                    num.fill(0.0);
                    let mut qn = 0.0f32;
                    for (j, c_j) in c.chunks_exact(dv).enumerate() {
                        for l in 0..dv {
                            num[l] += q[j] * c_j[l];
                        }
                        qn += q[j] * n[j];
                    }
                    qns[t] = qn;
                    ms[t] = m[0];
                }
            },
        );
        out
    }

    /// Gradients of `(q, k, v, ĩ, log_f, C_0, n_0, m_0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 8] {
        let (t_len, dk, dv) = (self.len, self.dk, self.dv);
        let kv = dk * dv;
        let width = t_len * dv + 2 * t_len + kv + dk + 1;
        // Per sequence-head: [dq | dk (T·K each) | dv (T·V) | dĩ | dlog_f (T each) | dC | dn | dm].
        let per = 2 * t_len * dk + t_len * dv + 2 * t_len + kv + dk + 1;
        let mut parts = zeros(self.rows * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |r, part| {
                let (d_q, rest) = part.split_at_mut(t_len * dk);
                let (d_k, rest) = rest.split_at_mut(t_len * dk);
                let (d_v, rest) = rest.split_at_mut(t_len * dv);
                let (d_i, rest) = rest.split_at_mut(t_len);
                let (d_log_f, rest) = rest.split_at_mut(t_len);
                let (d_c, rest) = rest.split_at_mut(kv);
                let (d_n, d_m) = rest.split_at_mut(dk);
                let g = &d_out[r * width..][..width];
                let (g_num, g_qn, g_m) = (
                    &g[..t_len * dv],
                    &g[t_len * dv..][..t_len],
                    &g[t_len * dv + t_len..][..t_len],
                );
                let g_state = &g[t_len * dv + 2 * t_len..];
                d_c.copy_from_slice(&g_state[..kv]);
                d_n.copy_from_slice(&g_state[kv..][..dk]);
                d_m[0] = g_state[kv + dk];
                // (C, n, m) before every step and after the last.
                let mut cs = vec![0.0f32; (t_len + 1) * kv];
                let mut ns = vec![0.0f32; (t_len + 1) * dk];
                let mut ms = vec![0.0f32; t_len + 1];
                cs[..kv].copy_from_slice(&self.c0[r * kv..][..kv]);
                ns[..dk].copy_from_slice(&self.n0[r * dk..][..dk]);
                ms[0] = self.m0[r];
                for t in 0..t_len {
                    let (c_prev, c_next) = cs[t * kv..][..2 * kv].split_at_mut(kv);
                    c_next.copy_from_slice(c_prev);
                    let (n_prev, n_next) = ns[t * dk..][..2 * dk].split_at_mut(dk);
                    n_next.copy_from_slice(n_prev);
                    let mut m = ms[t];
                    self.step(r * t_len + t, c_next, n_next, &mut m);
                    ms[t + 1] = m;
                }
                for t in (0..t_len).rev() {
                    let at = r * t_len + t;
                    let (_, f, i, d_won) = gates(self.log_f[at], self.i[at], ms[t]);
                    let q = &self.q[at * dk..][..dk];
                    let k = &self.k[at * dk..][..dk];
                    let v = &self.v[at * dv..][..dv];
                    let (c_prev, c_t) = (&cs[t * kv..][..kv], &cs[(t + 1) * kv..][..kv]);
                    let (n_prev, n_t) = (&ns[t * dk..][..dk], &ns[(t + 1) * dk..][..dk]);
                    let d_num = &g_num[t * dv..][..dv];
                    let d_qn = g_qn[t];
                    let (d_q, d_k) = (&mut d_q[t * dk..][..dk], &mut d_k[t * dk..][..dk]);
                    let d_v = &mut d_v[t * dv..][..dv];
                    let (mut d_f, mut d_gate_i) = (0.0f32, 0.0f32);
                    for j in 0..dk {
                        let dc_j = &mut d_c[j * dv..][..dv];
                        let (cp_j, ct_j) = (&c_prev[j * dv..][..dv], &c_t[j * dv..][..dv]);
                        d_n[j] += q[j] * d_qn;
                        let (mut dq_j, mut dcv_j) = (n_t[j] * d_qn, 0.0f32);
                        for l in 0..dv {
                            dc_j[l] += q[j] * d_num[l];
                            dq_j += ct_j[l] * d_num[l];
                            d_f += dc_j[l] * cp_j[l];
                            dcv_j += dc_j[l] * v[l];
                            d_v[l] += i * dc_j[l] * k[j];
                            dc_j[l] *= f;
                        }
                        d_q[j] = dq_j;
                        d_f += d_n[j] * n_prev[j];
                        d_gate_i += (dcv_j + d_n[j]) * k[j];
                        d_k[j] = i * (dcv_j + d_n[j]);
                        d_n[j] *= f;
                    }
                    let d_d = f * d_f;
                    let d_i_pre = i * d_gate_i;
                    let d_m_t = g_m[t] + d_m[0] - d_d - d_i_pre;
                    let (d_d, d_i_pre) = if d_won {
                        (d_d + d_m_t, d_i_pre)
                    } else {
                        (d_d, d_i_pre + d_m_t)
                    };
                    d_i[t] = d_i_pre;
                    d_log_f[t] = d_d;
                    d_m[0] = d_d;
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
        let state = 2 * tk + tv + 2 * t_len;
        [
            section(0, tk).gather(),
            section(tk, tk).gather(),
            section(2 * tk, tv).gather(),
            section(2 * tk + tv, t_len).gather(),
            section(2 * tk + tv + t_len, t_len).gather(),
            section(state, kv).gather(),
            section(state + kv, dk).gather(),
            section(state + kv + dk, 1).gather(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::mlstm::{Heads, MlstmState, fused_cell, recurrent};
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel (with the model's normalisation after it) against the definition at uneven
    /// sizes (B 1 × 3 heads, T 1 and 9, K 5, V 3), from a non-zero state whose stabiliser the
    /// first writes exceed in some heads and not in others (`m_0` from −2 to 2, `ĩ` from −3 to
    /// 3): outputs, the final `(C, n, m)` and every input's gradient, on every instruction-set
    /// copy the CPU runs.
    #[test]
    fn kernel_matches_definition() {
        on_every_isa(|_| {
            for t in [1, 9] {
                let (h, dk, dv) = (3, 5, 3);
                let q = uniform([1, h, t, dk], -1.0, 1.0, 1);
                let k = uniform([1, h, t, dk], -1.0, 1.0, 2);
                let v = uniform([1, h, t, dv], -1.0, 1.0, 3);
                let i = uniform([1, h, t], -3.0, 3.0, 4);
                let log_f = uniform([1, h, t], -2.0, -0.01, 5);
                let c0 = uniform([1, h, dk, dv], -1.0, 1.0, 6);
                let n0 = uniform([1, h, dk], -1.0, 1.0, 7);
                let m0 = uniform([1, h], -2.0, 2.0, 8);
                let r_o = uniform([1, h, t, dv], -1.0, 1.0, 9);
                let run = |fused: bool| {
                    let (q, k, v) = (
                        q.clone().require_grad(),
                        k.clone().require_grad(),
                        v.clone().require_grad(),
                    );
                    let (i, log_f) = (i.clone().require_grad(), log_f.clone().require_grad());
                    let (c0, n0, m0) = (
                        c0.clone().require_grad(),
                        n0.clone().require_grad(),
                        m0.clone().require_grad(),
                    );
                    let heads = Heads {
                        q: q.clone(),
                        k: k.clone(),
                        v: v.clone(),
                        i: i.clone(),
                        log_f: log_f.clone(),
                    };
                    let state = MlstmState {
                        c: c0.clone(),
                        n: n0.clone(),
                        m: m0.clone(),
                    };
                    let (o, s) = if fused {
                        fused_cell(heads, state)
                    } else {
                        recurrent(heads, state)
                    };
                    let loss = (o.clone() * r_o.clone()).sum()
                        + s.c.clone().sum()
                        + (s.n.clone() * 0.7).sum()
                        + (s.m.clone() * 1.3).sum();
                    let grads = loss.backward();
                    let g4 = |x: &Tensor<4>| x.grad(&grads).unwrap().flatten::<1>(0, 3);
                    let g3 = |x: &Tensor<3>| x.grad(&grads).unwrap().flatten::<1>(0, 2);
                    let g2 = |x: &Tensor<2>| x.grad(&grads).unwrap().flatten::<1>(0, 1);
                    let all = [
                        g4(&q),
                        g4(&k),
                        g4(&v),
                        g3(&i),
                        g3(&log_f),
                        g4(&c0),
                        g3(&n0),
                        g2(&m0),
                    ];
                    (o, s, all)
                };
                let (o, s, grads) = run(true);
                let (o_ref, s_ref, grads_ref) = run(false);
                assert!(max_diff(o, o_ref) < 1e-5, "T {t}: o");
                assert!(max_diff(s.c, s_ref.c) < 1e-5, "T {t}: C");
                assert!(max_diff(s.n, s_ref.n) < 1e-5, "T {t}: n");
                assert!(max_diff(s.m, s_ref.m) < 1e-5, "T {t}: m");
                let names = ["q", "k", "v", "i", "log_f", "c0", "n0", "m0"];
                for (name, (g, g_ref)) in names.iter().zip(grads.into_iter().zip(grads_ref)) {
                    assert!(max_diff(g, g_ref) < 1e-5, "T {t}: d{name}");
                }
            }
        });
    }
}
