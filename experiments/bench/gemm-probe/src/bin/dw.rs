//! GFLOP/s of a weight gradient `dW [h, n] = Hᵀ · G` summed over `B·T` rows (H stored `[B·T, h]`,
//! G `[B·T, n]`) on two threads: gemm on one thread, gemm on rayon (which splits only the output),
//! 64-column chunks of the output, and fixed 2048-row chunks of the sum added in order (what
//! `host::matmul_sum_k` does). Session 13's table in `experiments/bench/README.md`:
//!   CARGO_TARGET_DIR=$HOME/.cache/estafet/target cargo run --release --manifest-path experiments/bench/gemm-probe/Cargo.toml --bin dw

use rayon::prelude::*;
use std::time::Instant;

unsafe fn mm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    drs: usize,
    lhs: *const f32,
    lrs: isize,
    lcs: isize,
    rhs: *const f32,
    rrs: isize,
    rcs: isize,
    par: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            drs as isize,
            false,
            lhs,
            lcs,
            lrs,
            rhs,
            rcs,
            rrs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}
#[derive(Clone, Copy)]
struct P(*mut f32);
unsafe impl Send for P {}
unsafe impl Sync for P {}
#[derive(Clone, Copy)]
struct C(*const f32);
unsafe impl Send for C {}
unsafe impl Sync for C {}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // dW = Hᵀ [h, BT] · G [BT, n]; H stored [BT, h] row-major.
    for &(h, n, bt) in &[
        (64usize, 256usize, 8192usize),
        (128, 512, 8192),
        (64, 256, 32768),
        (32, 128, 8192),
    ] {
        let hm = vec![0.01f32; bt * h];
        let g = vec![0.02f32; bt * n];
        let mut w = vec![0.0f32; h * n];
        let flops = 2.0 * (h * n * bt) as f64;
        let time = |f: &mut dyn FnMut()| {
            f();
            let reps = 10;
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            flops * reps as f64 / t.elapsed().as_secs_f64() / 1e9
        };
        let one = time(&mut || unsafe {
            mm(
                h,
                n,
                bt,
                w.as_mut_ptr(),
                n,
                hm.as_ptr(),
                1,
                h as isize,
                g.as_ptr(),
                n as isize,
                1,
                gemm::Parallelism::None,
            )
        });
        let ray = pool.install(|| {
            time(&mut || unsafe {
                mm(
                    h,
                    n,
                    bt,
                    w.as_mut_ptr(),
                    n,
                    hm.as_ptr(),
                    1,
                    h as isize,
                    g.as_ptr(),
                    n as isize,
                    1,
                    gemm::Parallelism::Rayon(0),
                )
            })
        });
        // column chunks of 64
        let cw = 64;
        let cols = pool.install(|| {
            time(&mut || {
                let (dp, hp, gp) = (P(w.as_mut_ptr()), C(hm.as_ptr()), C(g.as_ptr()));
                (0..n.div_ceil(cw)).into_par_iter().for_each(|c| {
                    let (dp, hp, gp) = (dp, hp, gp);
                    let w0 = c * cw;
                    let wn = cw.min(n - w0);
                    unsafe {
                        mm(
                            h,
                            wn,
                            bt,
                            dp.0.add(w0),
                            n,
                            hp.0,
                            1,
                            h as isize,
                            gp.0.add(w0),
                            n as isize,
                            1,
                            gemm::Parallelism::None,
                        )
                    }
                });
            })
        });
        // k split in fixed chunks of 2048 rows, partials summed in order
        let kc = 2048;
        let mut parts = vec![0.0f32; bt.div_ceil(kc) * h * n];
        let ksplit = pool.install(|| {
            time(&mut || {
                parts
                    .par_chunks_mut(h * n)
                    .enumerate()
                    .for_each(|(c, part)| {
                        let r0 = c * kc;
                        let rn = kc.min(bt - r0);
                        unsafe {
                            mm(
                                h,
                                n,
                                rn,
                                part.as_mut_ptr(),
                                n,
                                hm.as_ptr().add(r0 * h),
                                1,
                                h as isize,
                                g.as_ptr().add(r0 * n),
                                n as isize,
                                1,
                                gemm::Parallelism::None,
                            )
                        }
                    });
                w.copy_from_slice(&parts[..h * n]);
                for p in parts[h * n..].chunks_exact(h * n) {
                    w.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                }
            })
        });
        println!(
            "dW h{h} n{n} BT{bt}: 1 thread {one:.0}, gemm rayon(2) {ray:.0}, column chunks(2) {cols:.0}, k-split(2) {ksplit:.0} GFLOP/s"
        );
    }
}
