//! A block of columns of a matrix as a tensor of its own, under autodiff:
//!
//! ```text
//! y = x[:, s..s + n]            x [rows, W], y [rows, n]
//! dx[:, s..s + n] = dy          dx = 0 in the other columns
//! ```
//!
//! The kernels that return a sequence's outputs beside their final state (the LSTM's `h` beside
//! `c`, Mamba's `y` beside `h_T`, …) are cut with `narrow`. burn's `narrow` is a view, so the
//! residual add after it walks a strided operand, and its backward fills a zero tensor of the
//! whole output and writes `dy` into it, both on the training thread while the pool waits: at
//! an LSTM of d 64, T 256 on two threads, 8% of the time one CPU worked alone (`perf`,
//! 2026-12-04, `experiments/bench/two_threads.py`). Here the block is copied out and the
//! gradient written row by row on every thread; only the block is read from the input.

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, filled, with_values};

/// Floats per task, in whole rows.
const CHUNK: usize = 1 << 15;

/// The block, read from the input, and where it lies in it.
#[derive(Debug)]
pub(super) struct Columns {
    rows: usize,
    width: usize,
    start: usize,
    len: usize,
    /// `y [rows, len]` until the forward hands it over.
    y: Vec<f32>,
}

impl Columns {
    /// Rows per task for rows of `width` floats.
    fn rows_per_task(width: usize) -> usize {
        (CHUNK / width.max(1)).max(1)
    }
}

impl HostKernel<1> for Columns {
    /// The first column `s` and the count `n`.
    type Args = (usize, usize);

    fn read<B: Backend>([x]: [&FloatTensor<B>; 1], (start, len): (usize, usize)) -> Self {
        let shape = burn::backend::TensorMetadata::shape(x);
        let &[rows, width] = shape.as_slice() else {
            panic!("columns: x must be [rows, W]")
        };
        assert!(
            start + len <= width,
            "columns: {start}..{} of {width}",
            start + len
        );
        let per_task = Self::rows_per_task(len);
        let y = with_values::<B, _>(x.clone(), |x| {
            filled(rows * len, per_task * len, |task, out| {
                let first = task * per_task;
                for (r, out) in out.chunks_exact_mut(len.max(1)).enumerate() {
                    let row = &x[(first + r) * width + start..][..len];
                    for (o, v) in out.iter_mut().zip(row) {
                        o.write(*v);
                    }
                }
            })
        });
        Self {
            rows,
            width,
            start,
            len,
            y,
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.rows, self.len]
    }

    fn input_shapes(&self) -> [Vec<usize>; 1] {
        [vec![self.rows, self.width]]
    }

    /// The block was cut as the input was read; the backward needs only the shapes.
    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        std::mem::take(&mut self.y)
    }

    fn backward(&self, dy: &[f32]) -> [Vec<f32>; 1] {
        let (width, start, len) = (self.width, self.start, self.len);
        let per_task = Self::rows_per_task(width);
        let dx = filled(self.rows * width, per_task * width, |task, out| {
            let first = task * per_task;
            for (r, out) in out.chunks_exact_mut(width.max(1)).enumerate() {
                let (before, rest) = out.split_at_mut(start);
                let (inside, after) = rest.split_at_mut(len);
                for o in before.iter_mut().chain(after) {
                    o.write(0.0);
                }
                for (o, v) in inside.iter_mut().zip(&dy[(first + r) * len..][..len]) {
                    o.write(*v);
                }
            }
        });
        [dx]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::test_support::{max_diff, uniform};

    /// The op against burn's `narrow` (the definition) on every axis of a `[B, T, W]` tensor,
    /// at blocks at the start, the middle and the end, with enough rows for several tasks and a
    /// gradient that differs per element: the values and the gradient, exactly.
    #[test]
    fn op_matches_burns_narrow() {
        let x = uniform([5, 301, 70], -2.0, 2.0, 1);
        for (dim, start, len) in [
            (2, 0, 35),
            (2, 20, 31),
            (2, 69, 1),
            (1, 300, 1),
            (1, 7, 250),
        ] {
            let mut dims = x.dims();
            dims[dim] = len;
            let r = uniform(dims, -1.0, 1.0, 2);
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let y = if fused {
                    super::super::narrow(x.clone(), dim, start, len)
                } else {
                    x.clone().narrow(dim, start, len)
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                (y, x.grad(&grads).unwrap())
            };
            let ((y, dx), (y_ref, dx_ref)) = (run(true), run(false));
            let at = format!("dim {dim}, {start}..{}", start + len);
            assert_eq!(y.dims(), y_ref.dims(), "shape at {at}");
            assert!(max_diff(y, y_ref) == 0.0, "y at {at}");
            assert!(max_diff(dx, dx_ref) == 0.0, "dx at {at}");
        }
        let y: Tensor<3> = super::super::narrow(x.clone(), 0, 1, 3);
        assert!(max_diff(y, x.narrow(0, 1, 3)) == 0.0, "dim 0");
    }
}
