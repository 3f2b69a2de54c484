//! Device tensors as the kernels take them: contiguous `f32` inputs, fresh outputs, the launch
//! grid of a one-unit-per-element kernel, and the few burn ops (products, sums, reshapes) the
//! kernels' host sides compose around them.

use burn::backend::TensorMetadata;
use burn::backend::ops::FloatTensorOps;
use burn::tensor::{DType, Shape, Slice};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// `t` laid out row-major, checked to be `f32` (what every kernel here computes in).
pub(super) fn input(t: CubeTensor, what: &str) -> CubeTensor {
    assert_eq!(
        t.dtype,
        DType::F32,
        "{what}: the GPU kernels compute in f32"
    );
    into_contiguous(t)
}

/// The dims of a rank-`D` tensor.
pub(super) fn dims<const D: usize>(t: &CubeTensor) -> [usize; D] {
    t.shape().dims::<D>()
}

/// A new, uninitialised `f32` tensor on `like`'s device.
pub(super) fn empty(like: &CubeTensor, shape: impl Into<Shape>) -> CubeTensor {
    empty_device_dtype(
        like.client.clone(),
        like.device.clone(),
        shape.into(),
        DType::F32,
    )
}

/// Cubes and units for `n` independent elements, one unit each.
pub(super) fn elementwise(like: &CubeTensor, n: usize) -> (CubeCount, CubeDim) {
    let dim = CubeDim::new(&like.client, n);
    (
        cubecl::calculate_cube_count_elemwise(&like.client, n, dim),
        dim,
    )
}

pub(super) fn reshape(t: CubeTensor, shape: impl Into<Shape>) -> CubeTensor {
    CubeBackend::float_reshape(t, shape.into())
}

pub(super) fn matmul(lhs: CubeTensor, rhs: CubeTensor) -> CubeTensor {
    CubeBackend::float_matmul(lhs, rhs)
}

pub(super) fn transpose(t: CubeTensor) -> CubeTensor {
    CubeBackend::float_transpose(t)
}

/// `[rows, n]` summed over the rows, `[n]`.
pub(super) fn column_sums(t: CubeTensor) -> CubeTensor {
    let [_, n] = dims::<2>(&t);
    reshape(CubeBackend::float_sum_dim(t, 0), [n])
}

/// `rows [m, n] + bias [n]` on every row.
pub(super) fn add_row(rows: CubeTensor, bias: CubeTensor) -> CubeTensor {
    let [n] = dims::<1>(&bias);
    CubeBackend::float_add(rows, reshape(bias, [1, n]))
}

/// `t [B, T, W]` at steps `start..end`.
pub(super) fn steps(t: CubeTensor, start: usize, end: usize) -> CubeTensor {
    let [b, _, w] = dims::<3>(&t);
    CubeBackend::float_slice(
        t,
        &[
            Slice::from(0..b),
            Slice::from(start..end),
            Slice::from(0..w),
        ],
    )
}

/// `t [B, T, W]`, columns `start..end`.
pub(super) fn columns(t: CubeTensor, start: usize, end: usize) -> CubeTensor {
    let [b, len, _] = dims::<3>(&t);
    CubeBackend::float_slice(
        t,
        &[
            Slice::from(0..b),
            Slice::from(0..len),
            Slice::from(start..end),
        ],
    )
}

pub(super) fn cat(tensors: Vec<CubeTensor>, dim: usize) -> CubeTensor {
    CubeBackend::float_cat(tensors, dim)
}

/// `t [M, N]`, rows `start..end`.
pub(super) fn rows(t: CubeTensor, start: usize, end: usize) -> CubeTensor {
    let [_, n] = dims::<2>(&t);
    CubeBackend::float_slice(t, &[Slice::from(start..end), Slice::from(0..n)])
}

/// Units per cube for a kernel whose units share a sequence's `channels`: one per channel up to
/// 256 (or the device's limit), channels shared beyond (unit `u` takes `u, u + U, …`).
pub(super) fn units_per_cube(device: &burn_cubecl::CubeDevice, channels: usize) -> u32 {
    let client = device.client();
    let hardware = &client.properties().hardware;
    let cap = hardware
        .max_cube_dim
        .0
        .min(hardware.max_units_per_cube)
        .min(256);
    (channels as u32).clamp(1, cap)
}
