//! GFLOP/s of `C[m, n] = A[m, k] · B[k, n]` (row-major, f32, one thread) for the shapes of the
//! benchmark's layers at B 32, d 256, with the batch cut into two per-thread blocks of 16.

use std::time::Instant;

fn gflops(m: usize, n: usize, k: usize) -> f64 {
    let a = vec![0.01f32; m * k];
    let b = vec![0.02f32; k * n];
    let mut c = vec![0.0f32; m * n];
    let reps = (2_000_000_000 / (2 * m * n * k)).max(3);
    let start = Instant::now();
    for _ in 0..reps {
        // SAFETY: every operand is a dense row-major buffer of its shape.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            )
        }
    }
    2.0 * (m * n * k * reps) as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    println!("| GEMM | m | n | k | GFLOP/s (one thread) |\n|---|---|---|---|---|");
    for (what, m, n, k) in [
        ("Elman step, h W_h", 16, 256, 256),
        ("LSTM step, h W_h", 16, 1024, 256),
        ("LSTM step backward, dhp W_hᵀ", 16, 256, 1024),
        ("GRU step, h W_h", 16, 768, 256),
        ("LSTM input projection, one block", 4096, 1024, 256),
    ] {
        println!("| {what} | {m} | {n} | {k} | {:.0} |", gflops(m, n, k));
    }
}
