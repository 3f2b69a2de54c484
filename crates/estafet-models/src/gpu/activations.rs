//! The activations the kernels share, as CubeCL functions.

use cubecl::prelude::*;

#[cube]
pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `tanh` through the exponential: finite for every input (some drivers' `tanh` overflows to
/// NaN beyond |x| ≈ 44).
#[cube]
pub(super) fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / ((x * 2.0).exp() + 1.0)
}
