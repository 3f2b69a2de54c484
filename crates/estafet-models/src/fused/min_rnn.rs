//! minGRU's and minLSTM's whole recurrence after their input projection, as one kernel: the
//! gates, the candidate and the scan, forward and backward.
//!
//! ```text
//! h̃_t = g(v_t),  g(v) = v + ½ if v ≥ 0 else σ(v)
//! minGRU:   z_t = σ(k_t)                                  a_t = 1 − z_t,  b_t = z_t h̃_t
//! minLSTM:  f_t = σ(k_f,t), i_t = σ(k_i,t), s_t = f_t + i_t   a_t = f_t / s_t,  b_t = (i_t / s_t) h̃_t
//! h_t = a_t ⊙ h_{t−1} + b_t
//! ```
//!
//! Built from tensor ops this is the projection's split, about eight element-wise ops over
//! `[B, T, H]` for the gates and `T` small steps (or a chunked scan's `[B, C, C, H]`
//! intermediates), each allocated and walked again backward: at the research shapes that, not
//! arithmetic, set minGRU's pace. Here each channel of each sequence is a scalar loop. The
//! backward walks time in reverse with `δ_t = ∂L/∂h_t` (the output's gradient plus
//! `a_{t+1} δ_{t+1}`): `∂a_t = δ_t h_{t−1}`, `∂b_t = δ_t`, then through the gates
//!
//! ```text
//! minGRU:   ∂k = (∂b h̃ − ∂a) z (1 − z)                         ∂v = ∂b z g'(v)
//! minLSTM:  ∂k_f = (∂a − ∂b h̃) (i / s²) f (1 − f)
//!           ∂k_i = (∂b h̃ − ∂a) (f / s²) i (1 − i)               ∂v = ∂b (i / s) g'(v)
//! g'(v) = 1 if v ≥ 0 else σ(v) (1 − σ(v))
//! ```
//!
//! reading `h_{t−1}` from the outputs the forward kept. The definitions are the models'
//! sequential tensor forms (`MinGru::forward_with`, `MinLstm::forward_with`).

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, copied, dims3, par_rows, read, zeros};
use super::math::sigmoid;

/// Which minimal RNN the kernel computes; it sets the projection's layout `[B, T, G·H]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MinRnn {
    /// `G = 2`: the candidate's `v`, then the update gate's `k`.
    Gru,
    /// `G = 3`: the candidate's `v`, then the forget gate's `k_f`, then the input gate's `k_i`.
    Lstm,
}

impl MinRnn {
    /// Blocks of `H` in the projection.
    pub fn groups(self) -> usize {
        match self {
            MinRnn::Gru => 2,
            MinRnn::Lstm => 3,
        }
    }
}

/// The recurrence's inputs on the host, and (under autodiff) the outputs its backward reads.
#[derive(Debug)]
pub(super) struct MinScan {
    kind: MinRnn,
    batch: usize,
    len: usize,
    hidden: usize,
    /// `[B, T, G·H]`.
    pre: Vec<f32>,
    /// `[B, H]`.
    h0: Vec<f32>,
    /// `h_1..h_T`, `[B, T, H]`, kept by a tracked forward.
    out: Vec<f32>,
}

/// `g(v)` and `g'(v)`.
#[inline(always)]
fn candidate(v: f32) -> (f32, f32) {
    let s = sigmoid(v);
    if v >= 0.0 {
        (v + 0.5, 1.0)
    } else {
        (s, s * (1.0 - s))
    }
}

/// One step's transition `a` and drive `b` for one channel, from the projection's values
/// `v`, `k` and (minLSTM) `k_i`.
#[inline(always)]
fn transition(kind: MinRnn, v: f32, k: f32, k_i: f32) -> (f32, f32) {
    let (c, _) = candidate(v);
    match kind {
        MinRnn::Gru => {
            let z = sigmoid(k);
            (1.0 - z, z * c)
        }
        MinRnn::Lstm => {
            let (f, i) = (sigmoid(k), sigmoid(k_i));
            let s = f + i;
            (f / s, i / s * c)
        }
    }
}

impl MinScan {
    /// The projection's three `H`-wide rows at step `t` of sequence `n` (`k_i` repeats `k`
    /// for minGRU, which never reads it).
    #[inline(always)]
    fn rows(&self, n: usize, t: usize) -> (&[f32], &[f32], &[f32]) {
        let (h, g) = (self.hidden, self.kind.groups());
        let row = &self.pre[(n * self.len + t) * g * h..][..g * h];
        let k_i = if g == 3 { &row[2 * h..] } else { &row[h..] };
        // Every slice exactly `H` long, so that the channel loops need no bounds checks.
        (&row[..h], &row[h..][..h], &k_i[..h])
    }
}

impl MinScan {
    /// `h_1..h_T` of sequence `n` into `seq` (`T·H`).
    #[inline(always)]
    fn forward_sequence(&self, kind: MinRnn, n: usize, seq: &mut [f32]) {
        let (t_len, h) = (self.len, self.hidden);
        for t in 0..t_len {
            let (done, rest) = seq.split_at_mut(t * h);
            let prev = if t == 0 {
                &self.h0[n * h..][..h]
            } else {
                &done[(t - 1) * h..][..h]
            };
            let (v, k, k_i) = self.rows(n, t);
            step(kind, v, k, k_i, prev, &mut rest[..h]);
        }
    }
}

impl HostKernel<2> for MinScan {
    type Args = MinRnn;

    fn read<B: Backend>([pre, h0]: [&FloatTensor<B>; 2], kind: MinRnn) -> Self {
        let [batch, len, width] = dims3::<B>(pre);
        assert!(len >= 1, "min_rnn needs T ≥ 1");
        let hidden = width / kind.groups();
        assert_eq!(hidden * kind.groups(), width, "the projection is G·H wide");
        assert_eq!(h0.shape().as_slice(), [batch, hidden], "h0 is [B, H]");
        Self {
            kind,
            batch,
            len,
            hidden,
            pre: read::<B>(pre.clone()),
            h0: read::<B>(h0.clone()),
            out: Vec::new(),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len, self.hidden]
    }

    fn input_shapes(&self) -> [Vec<usize>; 2] {
        let (b, t, h) = (self.batch, self.len, self.hidden);
        [vec![b, t, self.kind.groups() * h], vec![b, h]]
    }

    fn forward(&mut self, keep: bool) -> Vec<f32> {
        let (t_len, h) = (self.len, self.hidden);
        let mut out = zeros(self.batch * t_len * h);
        par_rows(
            &mut out,
            t_len * h,
            #[inline(always)]
            |n, seq| {
                // One copy of the step loop per kind, so that the channel loop has no branch on it.
                match self.kind {
                    MinRnn::Gru => self.forward_sequence(MinRnn::Gru, n, seq),
                    MinRnn::Lstm => self.forward_sequence(MinRnn::Lstm, n, seq),
                }
            },
        );
        if keep {
            self.out = copied(&out);
        }
        out
    }

    /// Gradients of `(pre, h0)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 2] {
        let (t_len, h, g) = (self.len, self.hidden, self.kind.groups());
        // Per sequence: [d_pre (T·G·H) | d_h0 (H)].
        let per = t_len * g * h + h;
        let mut parts = zeros(self.batch * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |n, part| {
                let (d_pre, carry) = part.split_at_mut(t_len * g * h);
                let carry = &mut carry[..h];
                let outs = &self.out[n * t_len * h..][..t_len * h];
                let d_outs = &d_out[n * t_len * h..][..t_len * h];
                for t in (0..t_len).rev() {
                    let prev = if t == 0 {
                        &self.h0[n * h..][..h]
                    } else {
                        &outs[(t - 1) * h..][..h]
                    };
                    let d_y = &d_outs[t * h..][..h];
                    let (v, k, k_i) = self.rows(n, t);
                    let (d_v, d_gates) = d_pre[t * g * h..][..g * h].split_at_mut(h);
                    match self.kind {
                        MinRnn::Gru => gru_step_back(v, k, prev, d_y, carry, d_v, d_gates),
                        MinRnn::Lstm => {
                            let (d_kf, d_ki) = d_gates.split_at_mut(h);
                            lstm_step_back(v, k, k_i, prev, d_y, carry, d_v, d_kf, d_ki);
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
        let tgh = t_len * g * h;
        [section(0, tgh).gather(), section(tgh, h).gather()]
    }
}

// The per-step loops over channels are functions of slices, each its own argument, inlined, so
// that LLVM knows they do not alias: written inline in the sequence loops, parts of them ran
// scalar (`perf`, 2026-12-03).

/// `h_t = a_t ⊙ h_{t−1} + b_t` for every channel, from the step's `v`, `k`, `k_i`.
#[inline(always)]
fn step(kind: MinRnn, v: &[f32], k: &[f32], k_i: &[f32], prev: &[f32], h_t: &mut [f32]) {
    let h = h_t.len();
    let (v, k, k_i, prev) = (&v[..h], &k[..h], &k_i[..h], &prev[..h]);
    for c in 0..h {
        let (a, b) = transition(kind, v[c], k[c], k_i[c]);
        h_t[c] = a * prev[c] + b;
    }
}

/// minGRU's step backward: from `δ_t = d_y + carry`, writes `d_v`, `d_k` and leaves
/// `δ_t ⊙ (1 − z)` in `carry`.
#[inline(always)]
fn gru_step_back(
    v: &[f32],
    k: &[f32],
    prev: &[f32],
    d_y: &[f32],
    carry: &mut [f32],
    d_v: &mut [f32],
    d_k: &mut [f32],
) {
    let h = carry.len();
    let (v, k, prev, d_y) = (&v[..h], &k[..h], &prev[..h], &d_y[..h]);
    let (d_v, d_k) = (&mut d_v[..h], &mut d_k[..h]);
    for c in 0..h {
        let delta = d_y[c] + carry[c];
        let (cand, d_cand) = candidate(v[c]);
        let z = sigmoid(k[c]);
        // ∂L/∂b_t = δ_t, ∂L/∂a_t = δ_t h_{t−1}.
        d_v[c] = delta * z * d_cand;
        d_k[c] = (delta * cand - delta * prev[c]) * z * (1.0 - z);
        carry[c] = delta * (1.0 - z);
    }
}

/// minLSTM's step backward: writes `d_v`, `d_kf`, `d_ki` and leaves `δ_t ⊙ f/(f + i)` in `carry`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn lstm_step_back(
    v: &[f32],
    k: &[f32],
    k_i: &[f32],
    prev: &[f32],
    d_y: &[f32],
    carry: &mut [f32],
    d_v: &mut [f32],
    d_kf: &mut [f32],
    d_ki: &mut [f32],
) {
    let h = carry.len();
    let (v, k, k_i, prev, d_y) = (&v[..h], &k[..h], &k_i[..h], &prev[..h], &d_y[..h]);
    let (d_v, d_kf, d_ki) = (&mut d_v[..h], &mut d_kf[..h], &mut d_ki[..h]);
    for c in 0..h {
        let delta = d_y[c] + carry[c];
        let (cand, d_cand) = candidate(v[c]);
        let (f, i) = (sigmoid(k[c]), sigmoid(k_i[c]));
        let s = f + i;
        let s2 = s * s;
        // ∂L/∂(i/s) − ∂L/∂(f/s).
        let d_ratio = delta * cand - delta * prev[c];
        d_v[c] = delta * (i / s) * d_cand;
        d_kf[c] = -d_ratio * (i / s2) * f * (1.0 - f);
        d_ki[c] = d_ratio * (f / s2) * i * (1.0 - i);
        carry[c] = delta * (f / s);
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::MinRnn;
    use crate::mingru::g;
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The definition, written independently of the models: the gates and the step-by-step
    /// recurrence in tensor ops.
    fn definition(kind: MinRnn, pre: Tensor<3>, h0: Tensor<2>) -> Tensor<3> {
        use burn::tensor::activation::sigmoid;
        let h = h0.dims()[1];
        let v = pre.clone().narrow(2, 0, h);
        let k = pre.clone().narrow(2, h, h);
        let (a, b) = match kind {
            MinRnn::Gru => {
                let z = sigmoid(k);
                (z.clone().neg() + 1.0, z * g(v))
            }
            MinRnn::Lstm => {
                let (f, i) = (sigmoid(k), sigmoid(pre.narrow(2, 2 * h, h)));
                let s = f.clone() + i.clone();
                (f / s.clone(), i / s * g(v))
            }
        };
        let mut state = h0;
        let mut hs = Vec::new();
        for t in 0..a.dims()[1] {
            let step = |x: &Tensor<3>| x.clone().narrow(1, t, 1).squeeze_dim(1);
            state = step(&a) * state + step(&b);
            hs.push(state.clone());
        }
        Tensor::stack(hs, 1)
    }

    /// The kernel against the definition at uneven sizes (B 3, T 1 and 9, H 5), from a
    /// non-zero state, with pre-activations of both signs (both branches of `g`): outputs
    /// and both inputs' gradients, on every instruction-set copy the CPU runs.
    #[test]
    fn kernel_matches_definition() {
        on_every_isa(|_| {
            for kind in [MinRnn::Gru, MinRnn::Lstm] {
                for t in [1, 9] {
                    let (bsz, h) = (3, 5);
                    let pre = uniform([bsz, t, kind.groups() * h], -3.0, 3.0, 1);
                    let h0 = uniform([bsz, h], -1.0, 1.0, 2);
                    let r = uniform([bsz, t, h], -1.0, 1.0, 3);
                    let run = |fused: bool| {
                        let (pre, h0) = (pre.clone().require_grad(), h0.clone().require_grad());
                        let y = if fused {
                            super::super::min_rnn(kind, pre.clone(), h0.clone())
                        } else {
                            definition(kind, pre.clone(), h0.clone())
                        };
                        let grads = (y.clone() * r.clone()).sum().backward();
                        let d_pre = pre.grad(&grads).unwrap();
                        (y, d_pre, h0.grad(&grads).unwrap())
                    };
                    let (y, d_pre, d_h0) = run(true);
                    let (y_ref, d_pre_ref, d_h0_ref) = run(false);
                    assert!(max_diff(y, y_ref) < 1e-5, "{kind:?} T {t}: y");
                    assert!(max_diff(d_pre, d_pre_ref) < 1e-5, "{kind:?} T {t}: d_pre");
                    assert!(max_diff(d_h0, d_h0_ref) < 1e-5, "{kind:?} T {t}: d_h0");
                }
            }
        });
    }
}
