//! Mamba's output gate with its skip term, as one op:
//!
//! ```text
//! s = y + x ⊙ D          out = s ⊙ SiLU(z) = s ⊙ z σ(z)                  D [C], rows of C channels
//!
//! ds = dout ⊙ z σ(z);   dy = ds;   dx = ds ⊙ D;   dD = Σ_rows ds ⊙ x
//! dz = dout ⊙ s ⊙ σ(z) (1 + z (1 − σ(z)))
//! ```
//!
//! As tensor ops (`mamba.rs`' forward, the definition) the skip and the gate are a product, a
//! sum, a sigmoid, two more products and their backwards over `[B, T, E·D]`, each on one
//! thread below flex's 4M-element threshold; here each row is one pass each way on every
//! thread, and `dD` sums per tile of [`ROWS`] rows and then over the tiles in order.

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;
use rayon::prelude::*;

use super::host::{HostKernel, column_sums, par_rows, read, zeros};
use super::math::{sigmoid, vectorised};

/// Rows per task.
const ROWS: usize = 64;

/// The inputs on the host.
#[derive(Debug)]
pub(super) struct SkipGate {
    rows: usize,
    channels: usize,
    y: Vec<f32>,
    x: Vec<f32>,
    d: Vec<f32>,
    z: Vec<f32>,
}

impl HostKernel<4> for SkipGate {
    type Args = ();

    fn read<B: Backend>([y, x, d, z]: [&FloatTensor<B>; 4], (): ()) -> Self {
        let shape = burn::backend::TensorMetadata::shape(y);
        let &[rows, channels] = shape.as_slice() else {
            panic!("skip_gate: y must be [rows, C]")
        };
        let (y, x, d, z) = (
            read::<B>(y.clone()),
            read::<B>(x.clone()),
            read::<B>(d.clone()),
            read::<B>(z.clone()),
        );
        assert!(
            x.len() == y.len() && z.len() == y.len() && d.len() == channels,
            "skip_gate: y, x, z [rows, C], D [C]"
        );
        Self {
            rows,
            channels,
            y,
            x,
            d,
            z,
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.rows, self.channels]
    }

    fn input_shapes(&self) -> [Vec<usize>; 4] {
        let rc = self.out_shape();
        [rc.clone(), rc.clone(), vec![self.channels], rc]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let c = self.channels;
        let mut out = zeros(self.rows * c);
        par_rows(
            &mut out,
            ROWS * c,
            #[inline(always)]
            |t, out| {
                let r0 = t * ROWS * c;
                let n = out.len();
                let (y, x, z) = (&self.y[r0..][..n], &self.x[r0..][..n], &self.z[r0..][..n]);
                for (r, out) in out.chunks_exact_mut(c).enumerate() {
                    let o = r * c;
                    for j in 0..c {
                        let s = y[o + j] + x[o + j] * self.d[j];
                        out[j] = s * (z[o + j] * sigmoid(z[o + j]));
                    }
                }
            },
        );
        out
    }

    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 4] {
        let c = self.channels;
        let n_all = self.rows * c;
        let (mut dy, mut dx, mut dz) = (zeros(n_all), zeros(n_all), zeros(n_all));
        let tiles = self.rows.div_ceil(ROWS);
        let mut partials = zeros(tiles * c);
        dy.par_chunks_mut(ROWS * c)
            .zip(dx.par_chunks_mut(ROWS * c))
            .zip(dz.par_chunks_mut(ROWS * c))
            .zip(partials.par_chunks_mut(c))
            .enumerate()
            .for_each(|(t, (((dy, dx), dz), d_d))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let r0 = t * ROWS * c;
                        let n = dy.len();
                        let (y, x, z) =
                            (&self.y[r0..][..n], &self.x[r0..][..n], &self.z[r0..][..n]);
                        let g = &d_out[r0..][..n];
                        for (row, ((dy, dx), dz)) in dy
                            .chunks_exact_mut(c)
                            .zip(dx.chunks_exact_mut(c))
                            .zip(dz.chunks_exact_mut(c))
                            .enumerate()
                        {
                            let o = row * c;
                            for j in 0..c {
                                let (zj, xj) = (z[o + j], x[o + j]);
                                let sg = sigmoid(zj);
                                let s = y[o + j] + xj * self.d[j];
                                let ds = g[o + j] * (zj * sg);
                                dy[j] = ds;
                                dx[j] = ds * self.d[j];
                                d_d[j] += ds * xj;
                                dz[j] = g[o + j] * s * sg * (1.0 + zj * (1.0 - sg));
                            }
                        }
                    },
                )
            });
        [dy, dx, column_sums(&partials, c), dz]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::activation::silu;

    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The op against the definition's tensor ops, at row counts that are not a multiple of
    /// the tile and widths narrower and wider than a vector: the output and all four gradients.
    #[test]
    fn op_matches_definition() {
        on_every_isa(|isa| {
            for (rows, c) in [(1, 1), (3, 5), (130, 64), (67, 37)] {
                let (y, x) = (
                    uniform([rows, c], -2.0, 2.0, 1),
                    uniform([rows, c], -2.0, 2.0, 2),
                );
                let (d, z) = (uniform([c], -1.0, 1.0, 3), uniform([rows, c], -6.0, 6.0, 4));
                let r = uniform([rows, c], -1.0, 1.0, 5);
                let run = |fused: bool| {
                    let leaves = [y.clone(), x.clone(), z.clone()].map(|t| t.require_grad());
                    let [y, x, z] = leaves.clone();
                    let d = d.clone().require_grad();
                    let out: Tensor<2> = if fused {
                        super::super::skip_gate(y, x, d.clone(), z)
                    } else {
                        (y + x * d.clone().unsqueeze_dim(0)) * silu(z)
                    };
                    let grads = (out.clone() * r.clone()).sum().backward();
                    let [dy, dx, dz] = leaves.map(|t| t.grad(&grads).unwrap());
                    (out, dy, dx, dz, d.grad(&grads).unwrap())
                };
                let (out, dy, dx, dz, dd) = run(true);
                let (out_ref, dy_ref, dx_ref, dz_ref, dd_ref) = run(false);
                let at = format!("{isa:?} rows {rows}, C {c}");
                assert!(max_diff(out, out_ref) < 1e-5, "out at {at}");
                assert!(max_diff(dy, dy_ref) < 1e-5, "dy at {at}");
                assert!(max_diff(dx, dx_ref) < 1e-5, "dx at {at}");
                assert!(max_diff(dz, dz_ref) < 1e-5, "dz at {at}");
                assert!(max_diff(dd, dd_ref) < 1e-4, "dD at {at}");
            }
        });
    }
}
