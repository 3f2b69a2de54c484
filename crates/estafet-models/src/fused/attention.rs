//! Causal softmax attention as one kernel, in the manner of FlashAttention (Dao et al. 2022):
//! one block of query rows at a time, so the `[T, S]` score and probability matrices of the
//! tensor-op form are never held, and the backward recomputes them from each row's log-sum-exp.
//! Per sequence and head (`q [T, K]`, `k, v [S, K]`, `offset = S − T` keys already cached):
//!
//! ```text
//! s_ij = q_i·k_j / √K                  for j ≤ offset + i (the causal mask)
//! L_i  = log Σ_j e^{s_ij}              kept for the backward
//! o_i  = Σ_j e^{s_ij − L_i} v_j
//!
//! P_ij = e^{s_ij − L_i},   D_i = dO_i·o_i,   dS_ij = P_ij (dO_i·v_j − D_i)
//! dq_i = Σ_j dS_ij k_j / √K,   dk_j = Σ_i dS_ij q_i / √K,   dv_j = Σ_i P_ij dO_i
//! ```
//!
//! Queries go in blocks of [`BLOCK`]: a block's scores `[BLOCK, n]` (n: the keys its last query
//! sees) are one GEMM, its weighted sum another, and the backward's four products are GEMMs
//! too, so the arithmetic runs at the GEMM's rate while the buffer stays a few hundred kB.
//! Sequence-heads run in parallel. The inputs, the output and the gradients stay token-major,
//! `[B, T, H·K]` as the projections make them: a head is read and written in place with row
//! stride `H·K`, so no transposes to and from `[B, H, T, K]` run around the op or inside it.
//! The definition is `attention::attend` (scores, mask, softmax and weighted sum as tensor ops).

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;
use gemm::Parallelism;

use super::host::{HostKernel, copied, dims3, matmul, par_rows, read, zeros};
use super::math::{dot, exp, max, sum, vectorised};

/// Queries per block.
const BLOCK: usize = 64;

/// Queries `[B, T, H·K]`, keys and values `[B, S, H·K]` on the host, and what the forward keeps.
#[derive(Debug)]
pub(super) struct CausalAttention {
    batch: usize,
    heads: usize,
    /// Queries `T`, keys `S ≥ T` (the first `S − T` come from a cache).
    len: usize,
    keys: usize,
    head: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `o [B, T, H·K]` and `L [B·H, T]`, kept by a forward that will be differentiated.
    out: Vec<f32>,
    lse: Vec<f32>,
}

/// One query block of one sequence-head: queries `i0..i0 + m`, and `n` keys, what the block's
/// last query sees.
struct Block {
    i0: usize,
    m: usize,
    n: usize,
}

/// A token-major buffer that the sequence-heads fill in parallel, each only its own head's
/// columns `h·K..(h + 1)·K` of its own sequence's rows.
#[derive(Clone, Copy)]
struct Disjoint(*mut f32);

// SAFETY: the tasks sharing a `Disjoint` write disjoint elements (their own sequence-head's),
// and the buffer outlives the parallel loop.
unsafe impl Send for Disjoint {}
unsafe impl Sync for Disjoint {}

impl Disjoint {
    /// Where sequence-head `r`'s rows start (see [`CausalAttention::start`]).
    fn head(self, at: usize) -> *mut f32 {
        // SAFETY: `at` is a `start` inside the buffer the pointer was taken from.
        unsafe { self.0.add(at) }
    }
}

/// Calls `f(r)` for every sequence-head `r < rows` in parallel, on the kernels' instruction set.
fn par_heads(rows: usize, f: impl Fn(usize) + Sync) {
    use rayon::prelude::*;
    (0..rows).into_par_iter().for_each(|r| {
        vectorised(
            #[inline(always)]
            || f(r),
        )
    });
}

impl CausalAttention {
    /// Sequence-heads `B·H`.
    fn rows(&self) -> usize {
        self.batch * self.heads
    }

    /// The row stride of q, k and v, `D = H·K`.
    fn width(&self) -> usize {
        self.heads * self.head
    }

    /// Where sequence-head `r`'s first query (with `len = T`) or key (`len = S`) starts.
    fn start(&self, r: usize, len: usize) -> usize {
        let (b, h) = (r / self.heads, r % self.heads);
        b * len * self.width() + h * self.head
    }

    fn blocks(&self) -> impl Iterator<Item = Block> + use<> {
        let (t_len, offset) = (self.len, self.keys - self.len);
        (0..t_len).step_by(BLOCK).map(move |i0| {
            let m = BLOCK.min(t_len - i0);
            Block {
                i0,
                m,
                n: offset + i0 + m,
            }
        })
    }

    /// The block's scaled scores `q_i·k_j / √K` into `s [m, n]` (row-major, row stride `n`), by
    /// one GEMM; returns, per query, how many keys it sees.
    fn scores(
        &self,
        r: usize,
        block: &Block,
        s: &mut [f32],
    ) -> impl Iterator<Item = usize> + use<> {
        let (kd, d, offset) = (self.head, self.width(), self.keys - self.len);
        let Block { i0, m, n } = *block;
        let (q, k) = (
            &self.q[self.start(r, self.len) + i0 * d..],
            &self.k[self.start(r, self.keys)..],
        );
        // SAFETY: q holds m rows of kd at stride d, k n rows of kd at stride d (read as kᵀ
        // [kd, n]), s holds m·n floats and is distinct from both.
        unsafe {
            matmul(
                [m, n, kd],
                s.as_mut_ptr(),
                n,
                false,
                (q.as_ptr(), d, 1),
                (k.as_ptr(), 1, d),
                Parallelism::None,
            )
        };
        let scale = 1.0 / (kd as f32).sqrt();
        s[..m * n].iter_mut().for_each(|x| *x *= scale);
        (0..m).map(move |a| offset + i0 + a + 1)
    }
}

impl HostKernel<3> for CausalAttention {
    /// Heads `H`.
    type Args = usize;

    fn read<B: Backend>([q, k, v]: [&FloatTensor<B>; 3], heads: usize) -> Self {
        let [batch, len, width] = dims3::<B>(q);
        let [k_batch, keys, k_width] = dims3::<B>(k);
        assert!(
            k_batch == batch && k_width == width && dims3::<B>(v) == [batch, keys, width],
            "attention: q [B, T, D], k and v [B, S, D]"
        );
        assert!(
            heads >= 1 && width % heads == 0,
            "attention: D = {width} in {heads} heads"
        );
        assert!(len >= 1 && keys >= len, "attention needs 1 ≤ T ≤ S");
        Self {
            batch,
            heads,
            head: width / heads,
            len,
            keys,
            q: read::<B>(q.clone()),
            k: read::<B>(k.clone()),
            v: read::<B>(v.clone()),
            out: Vec::new(),
            lse: Vec::new(),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len, self.width()]
    }

    fn input_shapes(&self) -> [Vec<usize>; 3] {
        let (b, t, s, d) = (self.batch, self.len, self.keys, self.width());
        [vec![b, t, d], vec![b, s, d], vec![b, s, d]]
    }

    fn forward(&mut self, keep: bool) -> Vec<f32> {
        let (t_len, s_len, kd, d) = (self.len, self.keys, self.head, self.width());
        let mut out = zeros(self.batch * t_len * d);
        let mut lse = vec![0.0f32; self.rows() * t_len];
        let shared = Disjoint(out.as_mut_ptr());
        par_rows(
            &mut lse,
            t_len,
            #[inline(always)]
            |r, lse| {
                let o = shared.head(self.start(r, t_len));
                let v = &self.v[self.start(r, s_len)..];
                let mut s = vec![0.0f32; BLOCK * s_len];
                for block in self.blocks() {
                    let Block { i0, m, n } = block;
                    let seen = self.scores(r, &block, &mut s);
                    let mut sums = [0.0f32; BLOCK];
                    for (a, seen) in seen.enumerate() {
                        let (row, hidden) = s[a * n..][..n].split_at_mut(seen);
                        let top = max(row);
                        row.iter_mut().for_each(|x| *x = exp(*x - top));
                        hidden.fill(0.0);
                        sums[a] = sum(row);
                        lse[i0 + a] = top + sums[a].ln();
                    }
                    // SAFETY: s holds the block's m × n probabilities, v n rows of kd at stride d;
                    // o's rows i0..i0 + m (kd columns at stride d) are this sequence-head's alone.
                    unsafe {
                        matmul(
                            [m, kd, n],
                            o.add(i0 * d),
                            d,
                            false,
                            (s.as_ptr(), n, 1),
                            (v.as_ptr(), d, 1),
                            Parallelism::None,
                        );
                        for (a, total) in sums[..m].iter().enumerate() {
                            let inv = 1.0 / total;
                            std::slice::from_raw_parts_mut(o.add((i0 + a) * d), kd)
                                .iter_mut()
                                .for_each(|x| *x *= inv);
                        }
                    }
                }
            },
        );
        if keep {
            self.out = copied(&out);
            self.lse = lse;
        }
        out
    }

    /// Gradients of `(q, k, v)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 3] {
        let (t_len, s_len, kd, d) = (self.len, self.keys, self.head, self.width());
        let scale = 1.0 / (kd as f32).sqrt();
        let mut dq = zeros(self.batch * t_len * d);
        let (mut dk, mut dv) = (zeros(self.batch * s_len * d), zeros(self.batch * s_len * d));
        let shared = (
            Disjoint(dq.as_mut_ptr()),
            Disjoint(dk.as_mut_ptr()),
            Disjoint(dv.as_mut_ptr()),
        );
        par_heads(
            self.rows(),
            #[inline(always)]
            |r| {
                let (dq, dk, dv) = (
                    shared.0.head(self.start(r, t_len)),
                    shared.1.head(self.start(r, s_len)),
                    shared.2.head(self.start(r, s_len)),
                );
                let (q, k, v) = (
                    &self.q[self.start(r, t_len)..],
                    &self.k[self.start(r, s_len)..],
                    &self.v[self.start(r, s_len)..],
                );
                let (g, o) = (
                    &d_out[self.start(r, t_len)..],
                    &self.out[self.start(r, t_len)..],
                );
                let (mut p, mut ds) = (vec![0.0f32; BLOCK * s_len], vec![0.0f32; BLOCK * s_len]);
                for block in self.blocks() {
                    let Block { i0, m, n } = block;
                    let seen: Vec<usize> = self.scores(r, &block, &mut p).collect();
                    for (a, &seen) in seen.iter().enumerate() {
                        let l = self.lse[r * t_len + i0 + a];
                        let (row, hidden) = p[a * n..][..n].split_at_mut(seen);
                        row.iter_mut().for_each(|x| *x = exp(*x - l));
                        hidden.fill(0.0);
                    }
                    let (g_blk, q_blk) = (&g[i0 * d..], &q[i0 * d..]);
                    // SAFETY (all four products): p and ds hold m × n floats, g_blk and q_blk m
                    // rows of kd at stride d, k and v n rows of kd at stride d; dq's rows
                    // i0..i0 + m and dk's and dv's first n rows (kd columns at stride d) are this
                    // sequence-head's alone.
                    unsafe {
                        // dV[:n] += Pᵀ dO,  dP = dO Vᵀ.
                        matmul(
                            [n, kd, m],
                            dv,
                            d,
                            true,
                            (p.as_ptr(), 1, n),
                            (g_blk.as_ptr(), d, 1),
                            Parallelism::None,
                        );
                        matmul(
                            [m, n, kd],
                            ds.as_mut_ptr(),
                            n,
                            false,
                            (g_blk.as_ptr(), d, 1),
                            (v.as_ptr(), 1, d),
                            Parallelism::None,
                        );
                    }
                    // dS = P ⊙ (dP − D_i) / √K, with D_i = dO_i·o_i.
                    for (a, &seen) in seen.iter().enumerate() {
                        let at = (i0 + a) * d;
                        let d_i = dot(&g[at..][..kd], &o[at..][..kd]);
                        let (row, hidden) = ds[a * n..][..n].split_at_mut(seen);
                        row.iter_mut()
                            .zip(&p[a * n..][..seen])
                            .for_each(|(d, p)| *d = scale * p * (*d - d_i));
                        hidden.fill(0.0);
                    }
                    unsafe {
                        // dQ = dS K,  dK[:n] += dSᵀ Q.
                        matmul(
                            [m, kd, n],
                            dq.add(i0 * d),
                            d,
                            false,
                            (ds.as_ptr(), n, 1),
                            (k.as_ptr(), d, 1),
                            Parallelism::None,
                        );
                        matmul(
                            [n, kd, m],
                            dk,
                            d,
                            true,
                            (ds.as_ptr(), 1, n),
                            (q_blk.as_ptr(), d, 1),
                            Parallelism::None,
                        );
                    }
                }
            },
        );
        [dq, dk, dv]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::attention::attend;
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel against the definition (scores, causal mask, softmax, weighted sum as tensor
    /// ops, on `[B, H, T, K]`) at uneven batches and head counts, an odd head size and lengths,
    /// with and without cached keys: the output and the gradient of every input.
    #[test]
    fn kernel_matches_definition() {
        on_every_isa(|_| {
            for (batch, heads, t, s, k) in [
                (3, 1, 7, 7, 5),
                (2, 3, 1, 1, 4),
                (1, 3, 5, 9, 3),
                (2, 1, 150, 150, 8),
                (3, 2, 70, 75, 4),
            ] {
                let d = heads * k;
                let q = uniform([batch, t, d], -2.0, 2.0, 1);
                let key = uniform([batch, s, d], -2.0, 2.0, 2);
                let v = uniform([batch, s, d], -1.0, 1.0, 3);
                let r_o = uniform([batch, t, d], -1.0, 1.0, 4);
                let run = |fused: bool| {
                    let (q, key, v) = (
                        q.clone().require_grad(),
                        key.clone().require_grad(),
                        v.clone().require_grad(),
                    );
                    let o = if fused {
                        super::super::causal_attention(q.clone(), key.clone(), v.clone(), heads)
                    } else {
                        let split =
                            |x: Tensor<3>, len| x.reshape([batch, len, heads, k]).swap_dims(1, 2);
                        attend(
                            split(q.clone(), t),
                            split(key.clone(), s),
                            split(v.clone(), s),
                        )
                        .swap_dims(1, 2)
                        .reshape([batch, t, d])
                    };
                    let grads = (o.clone() * r_o.clone()).sum().backward();
                    let g = |x: &Tensor<3>| x.grad(&grads).unwrap();
                    (o, [g(&q), g(&key), g(&v)])
                };
                let (o, grads) = run(true);
                let (o_ref, grads_ref) = run(false);
                let at = format!("B {batch}, H {heads}, T {t}, S {s}, K {k}");
                assert!(max_diff(o, o_ref) < 1e-5, "o at {at}");
                for ((name, got), want) in ["q", "k", "v"].iter().zip(grads).zip(grads_ref) {
                    assert!(max_diff(got, want) < 1e-5, "d{name} at {at}");
                }
            }
        });
    }
}
