//! Layer normalisation over the last axis, as one op with its backward:
//!
//! ```text
//! μ = mean_j x_j     σ² = mean_j (x_j − μ)²     x̂ = (x − μ) / √(σ² + ε)     y = x̂ ⊙ γ + β
//!
//! g = dy ⊙ γ     dx = (g − mean_j g_j − x̂ · mean_j g_j x̂_j) / √(σ² + ε)
//! dγ = Σ_rows dy ⊙ x̂     dβ = Σ_rows dy
//! ```
//!
//! burn's `LayerNorm` (the definition) is one op on flex's forward, but under autodiff it is
//! built from nine tensor ops and their backwards, and flex runs element-wise ops on one thread
//! below 4M elements: every pre-norm of the research shapes. Here each row is one pass (two
//! in the backward) on every thread, the forward keeps `μ` and `1/√(σ² + ε)` per row, and
//! `dγ`, `dβ` are summed per tile of [`ROWS`] rows and then over the tiles in order, so they
//! do not depend on the thread count.

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;
use rayon::prelude::*;

use super::host::{HostKernel, column_sums, read, zeros};
use super::math::{dot, sum, vectorised};

/// Rows per task.
const ROWS: usize = 64;

/// The inputs on the host, and each row's mean and deviation once the forward ran.
#[derive(Debug)]
pub(super) struct LayerNorm {
    rows: usize,
    d: usize,
    eps: f32,
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    /// `(μ, √(σ² + ε))` per row.
    stats: Vec<[f32; 2]>,
}

impl LayerNorm {
    /// `(μ, √(σ² + ε))` of one row, in the definition's order of operations (the variance of
    /// the centred row), with the centred row written to `centred`.
    #[inline(always)]
    fn row_stats(&self, x: &[f32], centred: &mut [f32]) -> [f32; 2] {
        let n = self.d as f32;
        let mean = sum(x) / n;
        for (c, v) in centred.iter_mut().zip(x) {
            *c = v - mean;
        }
        [mean, (dot(centred, centred) / n + self.eps).sqrt()]
    }
}

impl HostKernel<3> for LayerNorm {
    /// ε.
    type Args = f64;

    fn read<B: Backend>([x, gamma, beta]: [&FloatTensor<B>; 3], eps: f64) -> Self {
        let shape = burn::backend::TensorMetadata::shape(x);
        let &[rows, d] = shape.as_slice() else {
            panic!("layer_norm: x must be [rows, D]")
        };
        let (gamma, beta) = (read::<B>(gamma.clone()), read::<B>(beta.clone()));
        assert!(
            d >= 1 && gamma.len() == d && beta.len() == d,
            "layer_norm: x [rows, D ≥ 1], γ and β [D]"
        );
        Self {
            rows,
            d,
            eps: eps as f32,
            x: read::<B>(x.clone()),
            gamma,
            beta,
            stats: Vec::new(),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.rows, self.d]
    }

    fn input_shapes(&self) -> [Vec<usize>; 3] {
        [self.out_shape(), vec![self.d], vec![self.d]]
    }

    fn forward(&mut self, keep: bool) -> Vec<f32> {
        let d = self.d;
        let mut y = zeros(self.rows * d);
        let mut stats = vec![[0.0f32; 2]; self.rows];
        let this = &*self;
        y.par_chunks_mut(ROWS * d)
            .zip(stats.par_chunks_mut(ROWS))
            .enumerate()
            .for_each(|(c, (y, stats))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let x = &this.x[c * ROWS * d..][..y.len()];
                        let (gamma, beta) = (&this.gamma[..d], &this.beta[..d]);
                        for ((x, y), s) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats) {
                            *s = this.row_stats(x, y);
                            let denom = s[1];
                            for j in 0..d {
                                y[j] = y[j] / denom * gamma[j] + beta[j];
                            }
                        }
                    },
                )
            });
        if keep {
            self.stats = stats;
        }
        y
    }

    fn backward(&self, dy: &[f32]) -> [Vec<f32>; 3] {
        let d = self.d;
        let mut dx = zeros(self.rows * d);
        let tiles = self.rows.div_ceil(ROWS);
        // Per tile: dγ then dβ.
        let mut partials = vec![0.0f32; tiles * 2 * d];
        dx.par_chunks_mut(ROWS * d)
            .zip(partials.par_chunks_mut(2 * d))
            .enumerate()
            .for_each(|(c, (dx, partial))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let r0 = c * ROWS;
                        let x = &self.x[r0 * d..][..dx.len()];
                        let dy = &dy[r0 * d..][..dx.len()];
                        let stats = &self.stats[r0..][..dx.len() / d];
                        let gamma = &self.gamma[..d];
                        let (d_gamma, d_beta) = partial.split_at_mut(d);
                        let n = d as f32;
                        let mut g = vec![0.0f32; d];
                        for (((x, dy), dx), &[mean, denom]) in x
                            .chunks_exact(d)
                            .zip(dy.chunks_exact(d))
                            .zip(dx.chunks_exact_mut(d))
                            .zip(stats)
                        {
                            let rstd = 1.0 / denom;
                            // dx holds x̂ first, then the gradient.
                            for j in 0..d {
                                let x_hat = (x[j] - mean) * rstd;
                                dx[j] = x_hat;
                                g[j] = dy[j] * gamma[j];
                                d_gamma[j] += dy[j] * x_hat;
                                d_beta[j] += dy[j];
                            }
                            let (a, b) = (sum(&g) / n, dot(&g, dx) / n);
                            for j in 0..d {
                                dx[j] = (g[j] - a - dx[j] * b) * rstd;
                            }
                        }
                    },
                )
            });
        let mut d_gamma = column_sums(&partials, 2 * d);
        let d_beta = d_gamma.split_off(d);
        [dx, d_gamma, d_beta]
    }
}

#[cfg(test)]
mod tests {
    use burn::nn::LayerNormConfig;
    use burn::tensor::Tensor;

    use crate::test_support::{device, max_diff, on_every_isa, uniform};

    /// The op against burn's `LayerNorm` (the definition) with a trained-looking γ and β, at a
    /// row count that is not a multiple of the tile, widths from one to wider than a vector, and
    /// rows far from zero mean: the output and the gradients of x, γ and β.
    #[test]
    fn op_matches_burns_layer_norm() {
        on_every_isa(|isa| {
            for (rows, d) in [(1, 1), (3, 5), (130, 64), (67, 130)] {
                let mut ln = LayerNormConfig::new(d).init(&device());
                ln.gamma = ln.gamma.map(|_| uniform([d], 0.5, 1.5, 7).require_grad());
                ln.beta = ln
                    .beta
                    .map(|b| b.map(|_| uniform([d], -0.5, 0.5, 8).require_grad()));
                let x = uniform([rows, d], -2.0, 2.0, 1) + uniform([rows, 1], 0.0, 5.0, 2);
                let r = uniform([rows, d], -1.0, 1.0, 3);
                let run = |fused: bool| {
                    let x = x.clone().require_grad();
                    let y: Tensor<2> = if fused {
                        super::super::layer_norm(
                            x.clone(),
                            ln.gamma.val(),
                            ln.beta.as_ref().unwrap().val(),
                            LayerNormConfig::new(d).epsilon,
                        )
                    } else {
                        ln.forward(x.clone())
                    };
                    let grads = (y.clone() * r.clone()).sum().backward();
                    let d_gamma = ln.gamma.val().grad(&grads).unwrap();
                    let d_beta = ln.beta.as_ref().unwrap().val().grad(&grads).unwrap();
                    (y, x.grad(&grads).unwrap(), d_gamma, d_beta)
                };
                let ((y, dx, dg, db), (y_ref, dx_ref, dg_ref, db_ref)) = (run(true), run(false));
                let at = format!("{isa:?} rows {rows}, D {d}");
                assert!(max_diff(y, y_ref) < 1e-5, "y at {at}");
                assert!(max_diff(dx, dx_ref) < 1e-4, "dx at {at}");
                assert!(max_diff(dg, dg_ref) < 1e-4, "dγ at {at}");
                assert!(max_diff(db, db_ref) < 1e-4, "dβ at {at}");
            }
        });
    }
}
