//! A linear layer under autodiff, as one op:
//!
//! ```text
//! y = x W + b                       x [rows, D_in], W [D_in, D_out], b [D_out]
//!
//! dx = dy Wᵀ;   dW = xᵀ dy;   db = Σ_rows dy
//! ```
//!
//! burn's `linear` is a matrix product and a broadcast add, and its backward a product per
//! operand and a sum over the rows: the add and the sum run on one thread, and the weight's
//! gradient, a `[D_in, D_out]` product summed over all `B·T` rows, is one gemm call that
//! parallelises over its small output only. Here the bias rows are written on the pool, the
//! weight's gradient is cut along its long sum ([`matmul_sum_k`], fixed chunks: the same sum on
//! any thread count) and the bias's is [`column_sums`]. Without autodiff the backend's own
//! `linear` runs (`FusedOps::linear`): nothing there is serial but the bias add.

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, column_sums, filled_rows, matmul, matmul_sum_k, read, zeros};

/// The inputs on the host.
#[derive(Debug)]
pub(super) struct Linear {
    rows: usize,
    d_in: usize,
    d_out: usize,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
}

impl HostKernel<3> for Linear {
    type Args = ();

    fn read<B: Backend>([x, w, b]: [&FloatTensor<B>; 3], (): ()) -> Self {
        let (xs, ws) = (x.shape(), w.shape());
        let (&[rows, d_in], &[w_in, d_out]) = (xs.as_slice(), ws.as_slice()) else {
            panic!("linear: x must be [rows, D_in] and W [D_in, D_out]")
        };
        assert_eq!(d_in, w_in, "linear: x [rows, {d_in}] against W [{w_in}, ·]");
        let b = read::<B>(b.clone());
        assert_eq!(b.len(), d_out, "linear: b must be [D_out]");
        Self {
            rows,
            d_in,
            d_out,
            x: read::<B>(x.clone()),
            w: read::<B>(w.clone()),
            b,
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.rows, self.d_out]
    }

    fn input_shapes(&self) -> [Vec<usize>; 3] {
        [
            vec![self.rows, self.d_in],
            vec![self.d_in, self.d_out],
            vec![self.d_out],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (rows, d_in, d_out) = (self.rows, self.d_in, self.d_out);
        let mut y = filled_rows(&self.b, rows);
        if d_in > 0 {
            // SAFETY: `x` [rows, D_in], `w` [D_in, D_out] and `y` [rows, D_out], row-major.
            unsafe {
                matmul(
                    [rows, d_out, d_in],
                    y.as_mut_ptr(),
                    d_out,
                    true,
                    (self.x.as_ptr(), d_in, 1),
                    (self.w.as_ptr(), d_out, 1),
                    gemm::Parallelism::Rayon(0),
                )
            };
        }
        y
    }

    fn backward(&self, dy: &[f32]) -> [Vec<f32>; 3] {
        let (rows, d_in, d_out) = (self.rows, self.d_in, self.d_out);
        let mut dx = zeros(rows * d_in);
        let mut dw = vec![0.0f32; d_in * d_out];
        if d_in > 0 && d_out > 0 {
            // SAFETY: `dy` [rows, D_out]; `w` [D_in, D_out] read transposed; `x` [rows, D_in]
            // read transposed; `dx` [rows, D_in] and `dw` [D_in, D_out] sized by their shapes.
            unsafe {
                matmul(
                    [rows, d_in, d_out],
                    dx.as_mut_ptr(),
                    d_in,
                    false,
                    (dy.as_ptr(), d_out, 1),
                    (self.w.as_ptr(), 1, d_out),
                    gemm::Parallelism::Rayon(0),
                );
                matmul_sum_k(
                    [d_in, d_out, rows],
                    &mut dw,
                    (self.x.as_ptr(), 1, d_in),
                    (dy.as_ptr(), d_out, 1),
                );
            }
        }
        [dx, dw, column_sums(dy, d_out)]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::module::linear;

    use crate::test_support::{max_diff, uniform};

    /// The op against burn's `linear` (the definition), at row counts above and below the
    /// weight gradient's sum chunk and widths narrower and wider than a vector: the output and
    /// the gradients of `x`, `W` and `b`.
    #[test]
    fn op_matches_burns_linear() {
        for (rows, d_in, d_out) in [(1, 1, 1), (3, 5, 7), (2100, 19, 33), (4099, 64, 16)] {
            let x = uniform([rows, d_in], -2.0, 2.0, 1);
            let w = uniform([d_in, d_out], -1.0, 1.0, 2);
            let b = uniform([d_out], -1.0, 1.0, 3);
            let r = uniform([rows, d_out], -1.0, 1.0, 4);
            let run = |fused: bool| {
                let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
                let b = b.clone().require_grad();
                let y: Tensor<2> = if fused {
                    super::super::linear(x.clone(), w.clone(), b.clone())
                } else {
                    linear(x.clone(), w.clone(), Some(b.clone()))
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                let g = |t: &Tensor<2>| t.grad(&grads).unwrap();
                (y, g(&x), g(&w), b.grad(&grads).unwrap())
            };
            let (y, dx, dw, db) = run(true);
            let (y_ref, dx_ref, dw_ref, db_ref) = run(false);
            let at = format!("rows {rows}, D_in {d_in}, D_out {d_out}");
            assert!(max_diff(y, y_ref) < 1e-4, "y at {at}");
            assert!(max_diff(dx, dx_ref) < 1e-4, "dx at {at}");
            assert!(max_diff(dw, dw_ref) < 1e-2, "dW at {at}");
            assert!(max_diff(db, db_ref) < 1e-3, "db at {at}");
        }
    }
}
