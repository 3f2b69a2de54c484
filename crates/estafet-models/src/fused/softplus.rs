//! Softplus, Mamba's `Δ = softplus(dt_proj(δ))`, as one op:
//!
//! ```text
//! y = log(1 + eˣ) = max(x, 0) + log(1 + e^{−|x|})        dx = dy σ(x)
//! ```
//!
//! burn's `softplus` (the definition, which returns `x` above 20) is an exponential, a `log1p`
//! and their backwards over `[B, T, E·D]`, libm calls on one thread below flex's 4M-element
//! threshold (with Mamba's gate, 10% of a d 64 training step's samples). Here each element is
//! [`math::exp`](super::math::exp) and [`ln_1p`], both vectorisable, on every thread; the
//! backward recomputes `σ(x)` from the input.

use super::host::{HostKernel, par_rows, read, zeros};
use super::math::{exp, sigmoid};
use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;

/// Elements per task.
const CHUNK: usize = 1 << 14;

/// `log(1 + u)` for `u ∈ [0, 1]` to a few ulp: `2 atanh(s)`, `s = u / (2 + u) ≤ 1/3`, by its
/// odd series to `s¹³` (the next term is below 1e-8 of the sum), which vectorises where libm's
/// `log1pf` is a call per element.
#[inline(always)]
fn ln_1p(u: f32) -> f32 {
    let s = u / (2.0 + u);
    let s2 = s * s;
    2.0 * s
        * (1.0
            + s2 * (1.0 / 3.0
                + s2 * (1.0 / 5.0
                    + s2 * (1.0 / 7.0 + s2 * (1.0 / 9.0 + s2 * (1.0 / 11.0 + s2 * (1.0 / 13.0)))))))
}

/// The input on the host.
#[derive(Debug)]
pub(super) struct Softplus {
    shape: Vec<usize>,
    x: Vec<f32>,
}

impl HostKernel<1> for Softplus {
    type Args = ();

    fn read<B: Backend>([x]: [&FloatTensor<B>; 1], (): ()) -> Self {
        let shape = burn::backend::TensorMetadata::shape(x).as_slice().to_vec();
        Self {
            shape,
            x: read::<B>(x.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        self.shape.clone()
    }

    fn input_shapes(&self) -> [Vec<usize>; 1] {
        [self.shape.clone()]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let mut y = zeros(self.x.len());
        par_rows(
            &mut y,
            CHUNK,
            #[inline(always)]
            |c, y| {
                let x = &self.x[c * CHUNK..][..y.len()];
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x.max(0.0) + ln_1p(exp(-x.abs()));
                }
            },
        );
        y
    }

    fn backward(&self, dy: &[f32]) -> [Vec<f32>; 1] {
        let mut dx = zeros(self.x.len());
        par_rows(
            &mut dx,
            CHUNK,
            #[inline(always)]
            |c, dx| {
                let (x, dy) = (
                    &self.x[c * CHUNK..][..dx.len()],
                    &dy[c * CHUNK..][..dx.len()],
                );
                for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                    *dx = g * sigmoid(x);
                }
            },
        );
        [dx]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::activation::softplus;

    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The op against burn's `softplus` over both tails and the threshold at 20, in a tensor
    /// longer than one task: values to a relative 1e-6, the gradient to 1e-6.
    #[test]
    fn op_matches_burns_softplus() {
        on_every_isa(|isa| {
            let x = uniform([3, 7001], -30.0, 30.0, 1);
            let r = uniform([3, 7001], -1.0, 1.0, 2);
            let run = |fused: bool| {
                let x = x.clone().require_grad();
                let y: Tensor<2> = if fused {
                    super::super::softplus(x.clone())
                } else {
                    softplus(x.clone(), 1.0)
                };
                let grads = (y.clone() * r.clone()).sum().backward();
                (y, x.grad(&grads).unwrap())
            };
            let ((y, dx), (y_ref, dx_ref)) = (run(true), run(false));
            let relative = ((y - y_ref.clone()).abs() / (y_ref.abs() + 1e-30))
                .max()
                .into_scalar::<f32>();
            assert!(relative < 1e-6, "{isa:?}: relative error {relative}");
            assert!(max_diff(dx, dx_ref) < 1e-6, "{isa:?}: dx");
        });
    }
}
