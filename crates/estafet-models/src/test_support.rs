//! What the unit tests share: the reference backend they run on, and one comparison.

#![allow(deprecated)] // Device::ndarray: burn 0.22 deprecates it; it is our reference CPU backend

use burn::tensor::{Device, Tensor};

/// ndarray with autodiff: every unit test runs here.
pub fn device() -> Device {
    Device::ndarray().autodiff()
}

/// `max |a − b|`.
pub fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// `U(lo, hi)` draws of `shape` from `seed`: unit tests compare the same numbers every run (the
/// backend's own generator is not seeded).
pub fn uniform<const D: usize>(shape: [usize; D], lo: f64, hi: f64, seed: u64) -> Tensor<D> {
    let centred = crate::Init::new(seed, &device())
        .uniform(shape, (hi - lo) / 2.0)
        .val();
    (centred + (hi + lo) / 2.0).detach()
}

/// Runs `f` once on each instruction-set copy of the fused kernels this CPU runs.
pub fn on_every_isa(mut f: impl FnMut(crate::fused::Isa)) {
    for isa in crate::fused::Isa::available() {
        crate::fused::Isa::select(isa);
        f(isa);
    }
}
