//! The negative log-likelihood of token targets under logits (cross-entropy per position), as
//! one op:
//!
//! ```text
//! nll_r = m_r + log Σ_v e^{z_rv − m_r} − z_{r, y_r}      m_r = max_v z_rv
//! dz_rv = dnll_r · (e^{z_rv − lse_r} − [v = y_r])         lse_r = nll_r + z_{r, y_r}
//! ```
//!
//! The definition is `−log_softmax(z).gather(y)`: under autodiff a max, a subtraction, an
//! exponential, a sum, a logarithm, a gather and their backwards (the gather's a scatter into
//! zeros) over `[B, T, V]`, each on one thread at the research shapes, where the head's `V` is as
//! wide as the model. Here each row is one pass forward and one backward, on every thread; the
//! forward keeps `lse` per row. PyTorch's reference fuses the same way (`F.cross_entropy`).

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;
use rayon::prelude::*;

use super::host::{HostKernel, par_rows, read, zeros};
use super::math::{exp, max, vectorised};

/// Rows per task.
const ROWS: usize = 64;

/// Logits and targets on the host, and `lse` per row once the forward ran.
#[derive(Debug)]
pub(super) struct TokenNll {
    rows: usize,
    vocab: usize,
    z: Vec<f32>,
    /// The target ids, as floats (exact below 2²⁴).
    y: Vec<f32>,
    lse: Vec<f32>,
}

impl TokenNll {
    fn target(&self, r: usize) -> usize {
        let y = self.y[r];
        assert!(
            y >= 0.0 && (y as usize) < self.vocab && y.fract() == 0.0,
            "token_nll: target {y} outside the vocabulary of {}",
            self.vocab
        );
        y as usize
    }
}

impl HostKernel<2> for TokenNll {
    type Args = ();

    fn read<B: Backend>([z, y]: [&FloatTensor<B>; 2], (): ()) -> Self {
        let shape = burn::backend::TensorMetadata::shape(z);
        let &[rows, vocab] = shape.as_slice() else {
            panic!("token_nll: logits must be [rows, V]")
        };
        let y = read::<B>(y.clone());
        assert!(
            vocab >= 1 && y.len() == rows,
            "token_nll: logits [rows, V ≥ 1], targets [rows]"
        );
        Self {
            rows,
            vocab,
            z: read::<B>(z.clone()),
            y,
            lse: Vec::new(),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.rows]
    }

    fn input_shapes(&self) -> [Vec<usize>; 2] {
        [vec![self.rows, self.vocab], vec![self.rows]]
    }

    fn forward(&mut self, keep: bool) -> Vec<f32> {
        let v = self.vocab;
        let mut nll = vec![0.0f32; self.rows];
        let mut lse = vec![0.0f32; self.rows];
        let this = &*self;
        nll.par_chunks_mut(ROWS)
            .zip(lse.par_chunks_mut(ROWS))
            .enumerate()
            .for_each(|(c, (nll, lse))| {
                vectorised(
                    #[inline(always)]
                    || {
                        for (i, (nll, lse)) in nll.iter_mut().zip(lse.iter_mut()).enumerate() {
                            let r = c * ROWS + i;
                            let z = &this.z[r * v..][..v];
                            let m = max(z);
                            let mut lanes = [0.0f32; 8];
                            let z8 = z.chunks_exact(8);
                            let tail: f32 = z8.remainder().iter().map(|&x| exp(x - m)).sum();
                            for z in z8 {
                                for k in 0..8 {
                                    lanes[k] += exp(z[k] - m);
                                }
                            }
                            *lse = m + (lanes.iter().sum::<f32>() + tail).ln();
                            *nll = *lse - z[this.target(r)];
                        }
                    },
                )
            });
        if keep {
            self.lse = lse;
        }
        nll
    }

    fn backward(&self, d_nll: &[f32]) -> [Vec<f32>; 2] {
        let v = self.vocab;
        let mut dz = zeros(self.rows * v);
        par_rows(
            &mut dz,
            ROWS * v,
            #[inline(always)]
            |c, dz| {
                for (i, dz) in dz.chunks_exact_mut(v).enumerate() {
                    let r = c * ROWS + i;
                    let (z, lse, d) = (&self.z[r * v..][..v], self.lse[r], d_nll[r]);
                    for (g, &x) in dz.iter_mut().zip(z) {
                        *g = d * exp(x - lse);
                    }
                    dz[self.target(r)] -= d;
                }
            },
        );
        // The targets carry no gradient; their node is never tracked.
        [dz, vec![0.0; self.rows]]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::log_softmax;
    use burn::tensor::{Int, Tensor, TensorData};

    use crate::test_support::{device, max_diff, on_every_isa, uniform};

    /// The op against `−log_softmax(z).gather(y)`, at row counts that are not a multiple of
    /// the tile, vocabularies narrower and wider than a vector, and logits far from zero (the
    /// max must be subtracted): the values and the logits' gradient.
    #[test]
    fn op_matches_definition() {
        on_every_isa(|isa| {
            for (rows, vocab) in [(1, 1), (3, 5), (130, 64), (67, 203)] {
                let z = uniform([rows, vocab], -4.0, 4.0, 1) + uniform([rows, 1], 50.0, 90.0, 2);
                let ids: Vec<i64> = (0..rows).map(|r| ((r * 7919) % vocab) as i64).collect();
                let y = Tensor::<1, Int>::from_data(TensorData::new(ids, [rows]), &device());
                let r = uniform([rows], -1.0, 1.0, 3);
                let run = |fused: bool| {
                    let z = z.clone().require_grad();
                    let nll: Tensor<1> = if fused {
                        super::super::token_nll(z.clone(), y.clone())
                    } else {
                        -log_softmax(z.clone(), 1)
                            .gather(1, y.clone().unsqueeze_dim(1))
                            .squeeze_dim(1)
                    };
                    let grads = (nll.clone() * r.clone()).sum().backward();
                    (nll, z.grad(&grads).unwrap())
                };
                let ((nll, dz), (nll_ref, dz_ref)) = (run(true), run(false));
                let at = format!("{isa:?} rows {rows}, V {vocab}");
                assert!(max_diff(nll, nll_ref) < 1e-4, "nll at {at}");
                assert!(max_diff(dz, dz_ref) < 1e-5, "dz at {at}");
            }
        });
    }
}
