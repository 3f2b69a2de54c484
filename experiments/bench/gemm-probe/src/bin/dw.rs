//! GFLOP/s of a weight gradient `dW [h, n] = Hᵀ · G` summed over `B·T` rows (H stored `[B·T, h]`,
//! G `[B·T, n]`, as the cells' `h_prev` and `dhp`) four ways: gemm on one thread; gemm on two
//! rayon threads (it splits only the output); 64-column chunks of the output on two threads; and
//! fixed 2048-row chunks of the sum on two threads, added in order (what `host::matmul_sum_k`
//! does). Session 13's table in `experiments/bench/README.md`:
//!   CARGO_TARGET_DIR=$HOME/.cache/estafet/target cargo run --release --manifest-path experiments/bench/gemm-probe/Cargo.toml --bin dw

use rayon::prelude::*;
use std::time::Instant;

/// The operands of one product.
struct Grad<'a> {
    hm: &'a [f32],
    g: &'a [f32],
    h: usize,
    n: usize,
}

impl Grad<'_> {
    /// `out [h, cols] (row stride n) = H[rows]ᵀ · G[rows, col0..col0 + cols]`.
    fn product(
        &self,
        out: &mut [f32],
        rows: std::ops::Range<usize>,
        col0: usize,
        cols: usize,
        par: gemm::Parallelism,
    ) {
        let (h, n) = (self.h, self.n);
        assert!(
            out.len() >= (h - 1) * n + cols
                && rows.end * h <= self.hm.len()
                && rows.end * n <= self.g.len()
        );
        // SAFETY: the assert above: both operands hold the rows read, `out` the rows written.
        unsafe {
            gemm::gemm(
                h,
                cols,
                rows.len(),
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                self.hm.as_ptr().add(rows.start * h),
                h as isize,
                1,
                self.g.as_ptr().add(rows.start * n + col0),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    }
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    for (h, n, bt) in [
        (64, 256, 8192),
        (128, 512, 8192),
        (64, 256, 32768),
        (32, 128, 8192),
    ] {
        let (hm, g) = (vec![0.01f32; bt * h], vec![0.02f32; bt * n]);
        let grad = Grad {
            hm: &hm,
            g: &g,
            h,
            n,
        };
        let mut w = vec![0.0f32; h * n];
        let gflops = |f: &mut dyn FnMut()| {
            f();
            let reps = 10;
            let started = Instant::now();
            (0..reps).for_each(|_| f());
            2.0 * (h * n * bt * reps) as f64 / started.elapsed().as_secs_f64() / 1e9
        };
        let one = gflops(&mut || grad.product(&mut w, 0..bt, 0, n, gemm::Parallelism::None));
        let ray = pool.install(|| {
            gflops(&mut || grad.product(&mut w, 0..bt, 0, n, gemm::Parallelism::Rayon(0)))
        });
        // Column chunks write disjoint columns of every row of `w`, so each gets a private [h, 64].
        let cw = 64;
        let mut col_parts = vec![0.0f32; n.div_ceil(cw) * h * n];
        let cols = pool.install(|| {
            gflops(&mut || {
                col_parts
                    .par_chunks_mut(h * n)
                    .enumerate()
                    .for_each(|(c, out)| {
                        let col0 = c * cw;
                        grad.product(
                            &mut out[col0..],
                            0..bt,
                            col0,
                            cw.min(n - col0),
                            gemm::Parallelism::None,
                        )
                    })
            })
        });
        let kc = 2048;
        let mut row_parts = vec![0.0f32; bt.div_ceil(kc) * h * n];
        let rows = pool.install(|| {
            gflops(&mut || {
                row_parts
                    .par_chunks_mut(h * n)
                    .enumerate()
                    .for_each(|(c, out)| {
                        grad.product(
                            out,
                            c * kc..bt.min((c + 1) * kc),
                            0,
                            n,
                            gemm::Parallelism::None,
                        )
                    });
                w.copy_from_slice(&row_parts[..h * n]);
                for part in row_parts[h * n..].chunks_exact(h * n) {
                    w.iter_mut().zip(part).for_each(|(a, b)| *a += b);
                }
            })
        });
        println!(
            "dW h {h}, n {n}, B·T {bt}: one thread {one:.0}, gemm on two {ray:.0}, column chunks {cols:.0}, row chunks {rows:.0} GFLOP/s"
        );
    }
}
