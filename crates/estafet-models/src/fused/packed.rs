//! The recurrent step's GEMM, `C[m, n] (+)= A[m, k] · B[k, n]`, against a right operand packed
//! once per sequence and reused at every step.
//!
//! The cells multiply a block of 16–32 inputs by `W_i` and hidden states by `W_h` (and the
//! backward by `W_hᵀ`) at each of T steps. At those shapes the gemm crate spends much of each
//! call choosing blocking parameters and packing its operands (the transposed `W_hᵀ` on every
//! call): the step GEMMs of an LSTM at d 64–256 ran at 27–72 GFLOP/s on one Zen 3 core, against
//! 80–98 for this kernel (`experiments/bench/README.md`, 2026-12-03). `B` is laid out once as
//! panels of [`NR`] columns, `[⌈n/NR⌉][k][NR]`, zero beyond `n`, so that a panel is read
//! contiguously and stays in L1 while every row tile of `A` passes over it:
//!
//! ```text
//! for each panel p (NR columns of C):
//!   for each tile of up to MR = 6 rows r:
//!     acc[r][0..NR] = Σ_kk A[r, kk] · panel_p[kk][0..NR]     (2 × 6 AVX2 accumulators)
//!     C[r, p·NR..] (+)= acc[r]
//! ```
//!
//! Every output is one sum in `kk` order. The kernel is AVX2 + FMA; on the baseline tier (no AVX2,
//! or `ESTAFET_ISA=baseline`) the same calls go to the gemm crate with the unpacked operand.

use super::host::matmul;
use super::math::Isa;

/// Columns per panel: two 8-lane AVX2 registers.
const NR: usize = 16;
/// Rows per tile: 6 × 2 accumulators, 2 panel registers and the broadcast fill 15 of AVX2's 16.
const MR: usize = 6;

/// A GEMM's right operand `B [k, n]`, packed for the step kernel when the CPU runs it.
pub(super) struct PackedRhs<'a> {
    k: usize,
    n: usize,
    /// `B` as the caller holds it, with its row and column strides (the baseline tier's gemm).
    raw: (&'a [f32], usize, usize),
    /// `[⌈n/NR⌉][k][NR]`; empty on the baseline tier.
    panels: Vec<f32>,
}

impl<'a> PackedRhs<'a> {
    /// `B[kk, j] = b[kk·rs + j·cs]`: `(n, 1)` reads a row-major `[k, n]`, `(1, k)` the transpose
    /// of a row-major `[n, k]`.
    pub fn new(b: &'a [f32], [k, n]: [usize; 2], (rs, cs): (usize, usize)) -> Self {
        assert!(
            k >= 1 && n >= 1 && (k - 1) * rs + (n - 1) * cs < b.len(),
            "PackedRhs: a [{k}, {n}] operand at strides ({rs}, {cs}) overruns {} floats",
            b.len()
        );
        let panels = if has_kernel() {
            let mut panels = vec![0.0f32; n.div_ceil(NR) * k * NR];
            for (p, panel) in panels.chunks_exact_mut(k * NR).enumerate() {
                let cols = (n - p * NR).min(NR);
                for (kk, row) in panel.chunks_exact_mut(NR).enumerate() {
                    for (c, v) in row[..cols].iter_mut().enumerate() {
                        *v = b[kk * rs + (p * NR + c) * cs];
                    }
                }
            }
            panels
        } else {
            Vec::new()
        };
        Self {
            k,
            n,
            raw: (b, rs, cs),
            panels,
        }
    }

    /// `dst[r, ·] (+)= Σ_kk lhs[r·lhs_rs + kk] · B[kk, ·]` for `r < m`; `dst` rows at stride
    /// `dst_rs`, overwritten unless `accumulate`.
    ///
    /// # Safety
    /// `lhs` must cover `m` rows of `k` contiguous floats at stride `lhs_rs`, `dst` `m` rows of
    /// `n` at stride `dst_rs`, and `dst` must not overlap `lhs` or `B`.
    pub unsafe fn matmul(
        &self,
        m: usize,
        dst: *mut f32,
        dst_rs: usize,
        accumulate: bool,
        (lhs, lhs_rs): (*const f32, usize),
    ) {
        let (k, n) = (self.k, self.n);
        #[cfg(target_arch = "x86_64")]
        if !self.panels.is_empty() {
            // SAFETY: `panels` is non-empty only where `has_kernel` saw AVX2 and FMA; the
            // operands are the caller's contract.
            unsafe {
                avx2::gemm(
                    m,
                    n,
                    k,
                    (lhs, lhs_rs),
                    &self.panels,
                    (dst, dst_rs),
                    accumulate,
                )
            };
            return;
        }
        let (b, rs, cs) = self.raw;
        // SAFETY: the caller's contract for `lhs` and `dst`; `new` checked `B` against `b`.
        unsafe {
            matmul(
                [m, n, k],
                dst,
                dst_rs,
                accumulate,
                (lhs, lhs_rs, 1),
                (b.as_ptr(), rs, cs),
                gemm::Parallelism::None,
            )
        }
    }
}

/// Whether the packed kernel runs on the tier in use (it needs AVX2 and FMA).
fn has_kernel() -> bool {
    matches!(Isa::current(), Isa::Avx2Fma | Isa::Avx512)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// # Safety
    /// AVX2 and FMA present; `panels` packed for `[k, n]`; `lhs`/`dst` as in `PackedRhs::matmul`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        (lhs, lhs_rs): (*const f32, usize),
        panels: &[f32],
        (dst, dst_rs): (*mut f32, usize),
        accumulate: bool,
    ) {
        for (p, panel) in panels.chunks_exact(k * NR).enumerate() {
            let cols = (n - p * NR).min(NR);
            let mut r = 0;
            while r < m {
                let rows = (m - r).min(MR);
                // SAFETY: rows r..r + rows of `lhs` and `dst`, columns p·NR.. of `dst`.
                unsafe {
                    let (a, c) = (lhs.add(r * lhs_rs), dst.add(r * dst_rs + p * NR));
                    let tile = (a, lhs_rs, panel, c, dst_rs, cols, accumulate);
                    match rows {
                        1 => tile_rows::<1>(tile),
                        2 => tile_rows::<2>(tile),
                        3 => tile_rows::<3>(tile),
                        4 => tile_rows::<4>(tile),
                        5 => tile_rows::<5>(tile),
                        _ => tile_rows::<MR>(tile),
                    }
                }
                r += rows;
            }
        }
    }

    type Tile<'p> = (*const f32, usize, &'p [f32], *mut f32, usize, usize, bool);

    /// `R` rows of `A` times one panel into `cols ≤ NR` columns of `C`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile_rows<const R: usize>((a, a_rs, panel, c, c_rs, cols, accumulate): Tile<'_>) {
        // SAFETY (whole body): the caller's bounds; `panel` holds k rows of NR floats.
        unsafe {
            let mut lo = [_mm256_setzero_ps(); R];
            let mut hi = [_mm256_setzero_ps(); R];
            for (kk, b) in panel.chunks_exact(NR).enumerate() {
                let b0 = _mm256_loadu_ps(b.as_ptr());
                let b1 = _mm256_loadu_ps(b.as_ptr().add(8));
                for r in 0..R {
                    let av = _mm256_broadcast_ss(&*a.add(r * a_rs + kk));
                    lo[r] = _mm256_fmadd_ps(av, b0, lo[r]);
                    hi[r] = _mm256_fmadd_ps(av, b1, hi[r]);
                }
            }
            for r in 0..R {
                let out = c.add(r * c_rs);
                if cols == NR {
                    if accumulate {
                        lo[r] = _mm256_add_ps(_mm256_loadu_ps(out), lo[r]);
                        hi[r] = _mm256_add_ps(_mm256_loadu_ps(out.add(8)), hi[r]);
                    }
                    _mm256_storeu_ps(out, lo[r]);
                    _mm256_storeu_ps(out.add(8), hi[r]);
                } else {
                    let mut sums = [0.0f32; NR];
                    _mm256_storeu_ps(sums.as_mut_ptr(), lo[r]);
                    _mm256_storeu_ps(sums.as_mut_ptr().add(8), hi[r]);
                    for (j, s) in sums[..cols].iter().enumerate() {
                        *out.add(j) = if accumulate { *out.add(j) + s } else { *s };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::on_every_isa;

    /// The definition: one plain sum per output.
    fn naive(
        a: &[f32],
        a_rs: usize,
        b: &[f32],
        (rs, cs): (usize, usize),
        [m, n, k]: [usize; 3],
    ) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                c[r * n + j] = (0..k)
                    .map(|kk| a[r * a_rs + kk] as f64 * b[kk * rs + j * cs] as f64)
                    .sum::<f64>() as f32;
            }
        }
        c
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    #[test]
    fn matches_the_definition_at_uneven_shapes_and_strides() {
        on_every_isa(|isa| {
            // n not a multiple of 16, m not of 6, both layouts of B, a strided A and C.
            for &(m, n, k) in &[
                (1, 1, 1),
                (5, 17, 3),
                (7, 33, 64),
                (16, 100, 37),
                (13, 64, 129),
            ] {
                for transposed in [false, true] {
                    let b = values(k * n, n);
                    let strides = if transposed { (1, k) } else { (n, 1) };
                    let (a_rs, c_rs) = (k + 3, n + 5);
                    let a = values(m * a_rs, m);
                    let want = naive(&a, a_rs, &b, strides, [m, n, k]);
                    let packed = PackedRhs::new(&b, [k, n], strides);
                    for accumulate in [false, true] {
                        let before = values(m * c_rs, 7);
                        let mut c = before.clone();
                        // SAFETY: `a` holds m rows at stride a_rs ≥ k, `c` m rows at c_rs ≥ n.
                        unsafe {
                            packed.matmul(m, c.as_mut_ptr(), c_rs, accumulate, (a.as_ptr(), a_rs))
                        };
                        for r in 0..m {
                            for j in 0..c_rs {
                                let got = c[r * c_rs + j];
                                let old = before[r * c_rs + j];
                                let expect = match (j < n, accumulate) {
                                    (false, _) => old,
                                    (true, false) => want[r * n + j],
                                    (true, true) => old + want[r * n + j],
                                };
                                assert!(
                                    (got - expect).abs() <= 1e-5 * (1.0 + expect.abs()) * k as f32,
                                    "{isa:?} m{m} n{n} k{k} transposed {transposed} accumulate {accumulate}: C[{r}, {j}] = {got}, want {expect}"
                                );
                            }
                        }
                    }
                }
            }
        });
    }

    #[test]
    #[should_panic(expected = "overruns")]
    fn an_operand_shorter_than_its_shape_is_refused() {
        PackedRhs::new(&[0.0; 11], [3, 4], (4, 1));
    }
}
