//! Transcendentals written so that the kernels' loops over them vectorise (std's `exp` and
//! `tanh` are a libm call per element, which dominated the scans), a dot product in independent
//! lanes, and the choice of instruction set the kernels' loops run with.
//!
//! A build for baseline x86-64 vectorises four lanes with SSE2. [`vectorised`] runs a kernel's
//! block through a copy compiled for AVX2 and FMA (eight lanes), or AVX-512 (sixteen), when the
//! CPU has them, chosen at run time; every copy computes the same floats (Rust never contracts
//! `a * b + c` into an FMA by itself, and the code fixes the order of every sum).

use std::sync::atomic::{AtomicU8, Ordering};

/// The instruction sets the kernels' loops can be compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// The build's own target (SSE2 on baseline x86-64).
    Baseline = 1,
    Avx2Fma = 2,
    Avx512 = 3,
}

/// 0: not chosen yet; else the [`Isa`] in use.
static CHOSEN: AtomicU8 = AtomicU8::new(0);

impl Isa {
    /// Every tier this CPU runs, the best last.
    pub fn available() -> Vec<Isa> {
        let mut tiers = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                tiers.push(Isa::Avx2Fma);
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                    && std::is_x86_feature_detected!("avx512bw")
                    && std::is_x86_feature_detected!("avx512dq")
                {
                    tiers.push(Isa::Avx512);
                }
            }
        }
        tiers
    }

    /// The tier the kernels use: the best this CPU runs, or `ESTAFET_ISA` (`baseline`, `avx2`,
    /// `avx512`) capped at what the CPU runs, read once per process.
    pub fn current() -> Isa {
        match CHOSEN.load(Ordering::Relaxed) {
            1 => Isa::Baseline,
            2 => Isa::Avx2Fma,
            3 => Isa::Avx512,
            _ => {
                let available = Isa::available();
                let best = *available.last().expect("baseline is always available");
                let asked = match std::env::var("ESTAFET_ISA").as_deref() {
                    Ok("baseline") => Isa::Baseline,
                    Ok("avx2") => Isa::Avx2Fma,
                    Ok("avx512") => Isa::Avx512,
                    _ => best,
                };
                let isa = if available.contains(&asked) {
                    asked
                } else {
                    best
                };
                CHOSEN.store(isa as u8, Ordering::Relaxed);
                isa
            }
        }
    }

    /// Makes the kernels use `isa` from now on (tests run each tier the CPU has).
    pub fn select(isa: Isa) {
        assert!(Isa::available().contains(&isa), "{isa:?} is not available");
        CHOSEN.store(isa as u8, Ordering::Relaxed);
    }
}

/// Runs `f` with its loops compiled for [`Isa::current`]: `f`'s body and what it inlines.
///
/// Only code inlined into the copies is compiled for their instruction set, so `f` must be an
/// `#[inline(always)]` closure and so must everything it calls that holds a hot loop (the
/// kernels' block functions, the transcendentals). A plain closure has three callers here and
/// LLVM keeps it out of line, compiled for the baseline, with each copy a jump to it: so it
/// was until 2026-12-03, when every wrapper was a five-byte `jmp` (see
/// `experiments/bench/README.md`).
#[inline(always)]
pub(super) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    match Isa::current() {
        // SAFETY: `current` picks only tiers whose features the CPU has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2Fma => unsafe { avx2_fma(f) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { avx512(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// `eˣ` for `x ≤ 0` to a relative 3e-7 (2–3 ulp), written so that loops over it vectorise
/// with baseline SSE2 (std's `exp` is a libm call per element, which dominated the scans).
/// Range reduction `x = k ln 2 + r`, `|r| ≤ ln2/2`, then a degree-7 Taylor polynomial of `eʳ`;
/// below −87 the result is 0 (where `exp` gives a subnormal).
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    let xc = x.clamp(-87.0, 0.0);
    // Round to nearest through the 1.5·2²³ trick: no SSE4.1 `round` needed.
    let shifted = xc * std::f32::consts::LOG2_E + 12_582_912.0;
    let k = shifted - 12_582_912.0;
    let r = xc - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2ᵏ: `shifted`'s low mantissa bits hold k (two's complement); adding the bias 127 and
    // shifting it into the exponent field is integer arithmetic, which vectorises (a float to
    // integer `as` cast saturates, which does not).
    let y = p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23);
    if x < -87.0 { 0.0 } else { y }
}

/// `σ(x)` through [`exp`] of `−|x|` (never overflows; vectorises).
#[inline(always)]
pub(super) fn sigmoid(x: f32) -> f32 {
    let e = exp(-x.abs());
    let s = 1.0 / (1.0 + e);
    if x >= 0.0 { s } else { e * s }
}

/// `tanh(x)` as `(1 − e)/(1 + e)`, `e = e^{−2|x|}`, with the sign restored; below `|x| = 0.1`
/// the Taylor series to `x⁷` (relative error < 1e-8 there), where the quotient would lose
/// digits to cancellation.
#[inline(always)]
pub(super) fn tanh(x: f32) -> f32 {
    let a = x.abs();
    let e = exp(-2.0 * a);
    let a2 = a * a;
    let series = a * (1.0 + a2 * (-1.0 / 3.0 + a2 * (2.0 / 15.0 + a2 * (-17.0 / 315.0))));
    let t = if a < 0.1 {
        series
    } else {
        (1.0 - e) / (1.0 + e)
    };
    t.copysign(x)
}

/// `Σ a_k b_k` in eight independent lanes, so that it vectorises (a plain float sum is a
/// serial chain the compiler may not reorder).
#[inline(always)]
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (a, b) in a8.zip(b8) {
        for k in 0..8 {
            lanes[k] += a[k] * b[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a_k` in eight independent lanes, so that it vectorises.
#[inline(always)]
pub(super) fn sum(a: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let a8 = a.chunks_exact(8);
    let tail: f32 = a8.remainder().iter().sum();
    for a in a8 {
        for k in 0..8 {
            lanes[k] += a[k];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `max_k a_k` (−∞ when empty) in eight independent lanes, so that it vectorises.
#[inline(always)]
pub(super) fn max(a: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let a8 = a.chunks_exact(8);
    let tail = a8
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    for a in a8 {
        for k in 0..8 {
            lanes[k] = lanes[k].max(a[k]);
        }
    }
    lanes.iter().fold(tail, |m, &x| m.max(x))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every instruction-set copy computes the same floats as the baseline build.
    #[test]
    fn every_tier_computes_the_same_floats() {
        #[inline(always)]
        fn run(xs: &[f32]) -> Vec<f32> {
            let mut out: Vec<f32> = xs
                .iter()
                .map(|&x| exp(x.min(0.0)) + sigmoid(x) + tanh(x))
                .collect();
            out.push(dot(xs, &xs[1..]));
            out.extend([sum(xs), max(xs), sum(&xs[..13]), max(&xs[3..9])]);
            out
        }
        let xs: Vec<f32> = (0..4099).map(|i| -60.0 + i as f32 * 0.0301).collect();
        let baseline = run(&xs);
        for isa in Isa::available() {
            Isa::select(isa);
            let got = vectorised(
                #[inline(always)]
                || run(&xs),
            );
            assert!(
                got.iter()
                    .zip(&baseline)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{isa:?}"
            );
        }
    }

    /// The vectorisable `exp`, `σ` and `tanh` against std's, over the range the kernels use.
    #[test]
    fn fast_transcendentals_are_accurate() {
        for i in 0..=20_000 {
            let x = -100.0 + i as f32 * 0.01;
            if x <= 0.0 {
                let e = x.exp();
                assert!(
                    (exp(x) - e).abs() <= 3e-7 * e + 2.0 * f32::MIN_POSITIVE,
                    "exp({x})"
                );
            }
            let s = 1.0 / (1.0 + (-x).exp());
            assert!((sigmoid(x) - s).abs() <= 3e-7, "σ({x})");
            assert!((tanh(x) - x.tanh()).abs() <= 3e-7, "tanh({x})");
            let small = x * 1e-3;
            let t = small.tanh();
            assert!(
                (tanh(small) - t).abs() <= 1e-6 * t.abs() + 1e-12,
                "tanh({small})"
            );
        }
    }
}
