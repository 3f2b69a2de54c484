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
