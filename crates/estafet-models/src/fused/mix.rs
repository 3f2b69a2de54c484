//! RWKV's token shift, its interpolation and the projection after it, as one op:
//!
//! ```text
//! m_t = x'_t + (x_t − x'_t) ⊙ μ        x'_t = x_{t−1},  x'_1 = shift (the token before the call)
//! z_t = m_t W                          W [D_in, D_out], no bias (RWKV's projections have none)
//! y_t = act(z_t)                       act: z, σ(z) or relu(z)²
//!
//! dz = dy ⊙ act'(z);   dm = dz Wᵀ;   dW = Σ_{b,t} m_tᵀ dz_t
//! dx_t = μ ⊙ dm_t + (1 − μ) ⊙ dm_{t+1}  (the second term for t < T);   dshift = (1 − μ) ⊙ dm_1
//! dμ = Σ_{b,t} (x_t − x'_t) ⊙ dm_t
//! ```
//!
//! As tensor ops (`rwkv::token_shift`, `lerp`, `Linear` and the activation: the definition) a
//! mix is a concatenation, three passes over `[B, T, D]`, the product and one or two passes over
//! its output, and the backward twice as many, each on one thread. Here the rows are mixed,
//! multiplied and activated in tiles of [`ROWS`] on every thread, and the backward recomputes
//! `m` instead of keeping it: RWKV-4's five mixes a block as this op trained 1.24–1.37× faster
//! at d 64 and 128, two residual layers (interleaved A/B, 2026-12-04,
//! `experiments/bench/README.md`).

use std::borrow::Cow;

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;
use rayon::prelude::*;

use super::host::{HostKernel, Sections, dims3, matmul, matmul_sum_k, read, zeros};
use super::math::{sigmoid, vectorised};

/// What follows the projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// `σ(z)`: RWKV's receptance.
    Sigmoid,
    /// `relu(z)²`: RWKV's channel-mix key.
    ReluSquared,
}

impl Activation {
    /// The activation as tensor ops: what the op computes after its product, and the
    /// definition's (RWKV's tensor forms, this file's test) way of computing it.
    pub fn apply<const D: usize>(self, z: burn::tensor::Tensor<D>) -> burn::tensor::Tensor<D> {
        use burn::tensor::activation as tensor;
        match self {
            Activation::Identity => z,
            Activation::Sigmoid => tensor::sigmoid(z),
            Activation::ReluSquared => tensor::relu(z).powf_scalar(2.0),
        }
    }
}

/// Rows (tokens) per task: a tile of `m` and of the output stays in L2 between the mix, the
/// product and the activation, and gemm's packing of `W`, once per product, is spread over
/// enough rows (at 64 it was 9% of RWKV-4's samples; 256 and 1024 ran alike).
const ROWS: usize = 256;

/// The op's inputs on the host, and the pre-activation `z` when the backward needs it.
#[derive(Debug)]
pub(super) struct ShiftMix {
    batch: usize,
    len: usize,
    d_in: usize,
    d_out: usize,
    act: Activation,
    x: Vec<f32>,
    shift: Vec<f32>,
    mu: Vec<f32>,
    w: Vec<f32>,
    z: Vec<f32>,
}

impl ShiftMix {
    /// `m` of the rows `r0..r0 + m.len() / D_in` (row `r` is token `r mod T` of sequence
    /// `r div T`), in the definition's order of operations.
    #[inline(always)]
    fn mix_rows(&self, r0: usize, m: &mut [f32]) {
        let d = self.d_in;
        for (i, row) in m.chunks_exact_mut(d).enumerate() {
            let r = r0 + i;
            let x = &self.x[r * d..][..d];
            let prev = if r.is_multiple_of(self.len) {
                &self.shift[r / self.len * d..][..d]
            } else {
                &self.x[(r - 1) * d..][..d]
            };
            let mu = &self.mu[..d];
            for j in 0..d {
                row[j] = prev[j] + (x[j] - prev[j]) * mu[j];
            }
        }
    }

    /// `dst [rows, D_out] = m [rows, D_in] · W`, or with `transposed`,
    /// `dst [rows, D_in] = m [rows, D_out] · Wᵀ`; on the calling thread.
    fn times_w(&self, m: &[f32], dst: &mut [f32], transposed: bool) {
        let (d_in, d_out) = (self.d_in, self.d_out);
        let (k, n, w_strides) = if transposed {
            (d_out, d_in, (1, d_out))
        } else {
            (d_in, d_out, (d_out, 1))
        };
        let rows = m.len() / k;
        assert_eq!(dst.len(), rows * n);
        // SAFETY: `m` is [rows, k] and `dst` [rows, n] row-major, W [D_in, D_out] read with the
        // strides of W or Wᵀ; `dst` is a buffer of its own.
        unsafe {
            matmul(
                [rows, n, k],
                dst.as_mut_ptr(),
                n,
                false,
                (m.as_ptr(), k, 1),
                (self.w.as_ptr(), w_strides.0, w_strides.1),
                gemm::Parallelism::None,
            )
        }
    }
}

impl HostKernel<4> for ShiftMix {
    type Args = Activation;

    fn read<B: Backend>([x, shift, mu, w]: [&FloatTensor<B>; 4], act: Activation) -> Self {
        let [batch, len, d_in] = dims3::<B>(x);
        let w_shape = burn::backend::TensorMetadata::shape(w);
        let &[w_in, d_out] = w_shape.as_slice() else {
            panic!("shift_mix_linear: W must be [D_in, D_out]")
        };
        assert!(
            len >= 1 && w_in == d_in,
            "shift_mix_linear: x [B, T ≥ 1, D_in], W [D_in, ·]"
        );
        let (shift, mu) = (read::<B>(shift.clone()), read::<B>(mu.clone()));
        assert!(
            shift.len() == batch * d_in && mu.len() == d_in,
            "shift_mix_linear: shift [B, D_in], μ [D_in]"
        );
        Self {
            batch,
            len,
            d_in,
            d_out,
            act,
            x: read::<B>(x.clone()),
            shift,
            mu,
            w: read::<B>(w.clone()),
            z: Vec::new(),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len, self.d_out]
    }

    fn input_shapes(&self) -> [Vec<usize>; 4] {
        [
            vec![self.batch, self.len, self.d_in],
            vec![self.batch, self.d_in],
            vec![self.d_in],
            vec![self.d_in, self.d_out],
        ]
    }

    fn forward(&mut self, keep: bool) -> Vec<f32> {
        let rows = self.batch * self.len;
        let (d_in, d_out, act) = (self.d_in, self.d_out, self.act);
        let mut y = zeros(rows * d_out);
        let mut z = Vec::new();
        let tiles: Vec<Option<&mut [f32]>> = if keep && act != Activation::Identity {
            z = zeros(rows * d_out);
            z.chunks_mut(ROWS * d_out).map(Some).collect()
        } else {
            (0..rows.div_ceil(ROWS)).map(|_| None).collect()
        };
        let this = &*self;
        y.par_chunks_mut(ROWS * d_out)
            .zip(tiles)
            .enumerate()
            .for_each(|(c, (y, z))| {
                let mut m = vec![0.0f32; y.len() / d_out * d_in];
                vectorised(
                    #[inline(always)]
                    || this.mix_rows(c * ROWS, &mut m),
                );
                this.times_w(&m, y, false);
                if let Some(z) = z {
                    z.copy_from_slice(y);
                }
                vectorised(
                    #[inline(always)]
                    || match act {
                        Activation::Identity => {}
                        Activation::Sigmoid => y.iter_mut().for_each(|v| *v = sigmoid(*v)),
                        Activation::ReluSquared => {
                            y.iter_mut().for_each(|v| *v = v.max(0.0) * v.max(0.0))
                        }
                    },
                );
            });
        self.z = z;
        y
    }

    fn backward(&self, dy: &[f32]) -> [Vec<f32>; 4] {
        let (batch, len, d_in, d_out) = (self.batch, self.len, self.d_in, self.d_out);
        let rows = batch * len;
        let mut m = zeros(rows * d_in);
        let mut dm = zeros(rows * d_in);
        // dz = dy ⊙ act'(z), tile by tile beside m and dm = dz Wᵀ.
        let mut dz_owned = match self.act {
            Activation::Identity => Vec::new(),
            _ => zeros(rows * d_out),
        };
        let dz_tiles: Vec<Option<&mut [f32]>> = if dz_owned.is_empty() {
            (0..rows.div_ceil(ROWS)).map(|_| None).collect()
        } else {
            dz_owned.chunks_mut(ROWS * d_out).map(Some).collect()
        };
        m.par_chunks_mut(ROWS * d_in)
            .zip(dm.par_chunks_mut(ROWS * d_in))
            .zip(dz_tiles)
            .enumerate()
            .for_each(|(c, ((m, dm), dz))| {
                let r0 = c * ROWS;
                let n = m.len() / d_in;
                let dy = &dy[r0 * d_out..][..n * d_out];
                vectorised(
                    #[inline(always)]
                    || self.mix_rows(r0, m),
                );
                let dz: &[f32] = match dz {
                    None => dy,
                    Some(dz) => {
                        let z = &self.z[r0 * d_out..][..n * d_out];
                        vectorised(
                            #[inline(always)]
                            || act_backward(self.act, dz, dy, z),
                        );
                        dz
                    }
                };
                self.times_w(dz, dm, true);
            });
        let dz: Cow<[f32]> = if dz_owned.is_empty() {
            Cow::Borrowed(dy)
        } else {
            Cow::Owned(dz_owned)
        };
        let mut dw = vec![0.0f32; d_in * d_out];
        // SAFETY: m [rows, D_in] read as mᵀ [D_in, rows]; dz [rows, D_out].
        unsafe {
            matmul_sum_k(
                [d_in, d_out, rows],
                &mut dw,
                (m.as_ptr(), 1, d_in),
                (dz.as_ptr(), d_out, 1),
            )
        };
        // Per sequence: dx, and its terms of dshift and dμ (summed over the batch in order
        // below, so the gradients do not depend on the thread count).
        let mut dx = zeros(rows * d_in);
        let mut sides = vec![0.0f32; batch * 2 * d_in];
        let mu = &self.mu[..d_in];
        dx.par_chunks_mut(len * d_in)
            .zip(sides.par_chunks_mut(2 * d_in))
            .enumerate()
            .for_each(|(b, (dx, side))| {
                vectorised(
                    #[inline(always)]
                    || {
                        let (d_shift, d_mu) = side.split_at_mut(d_in);
                        let x = &self.x[b * len * d_in..][..len * d_in];
                        let dm = &dm[b * len * d_in..][..len * d_in];
                        for t in 0..len {
                            let prev = if t == 0 {
                                &self.shift[b * d_in..][..d_in]
                            } else {
                                &x[(t - 1) * d_in..][..d_in]
                            };
                            let (xt, dmt) = (&x[t * d_in..][..d_in], &dm[t * d_in..][..d_in]);
                            let dxt = &mut dx[t * d_in..][..d_in];
                            for j in 0..d_in {
                                dxt[j] = mu[j] * dmt[j];
                                d_mu[j] += (xt[j] - prev[j]) * dmt[j];
                            }
                            // x_t is also x'_{t+1}.
                            if t + 1 < len {
                                let next = &dm[(t + 1) * d_in..][..d_in];
                                for j in 0..d_in {
                                    dxt[j] += (1.0 - mu[j]) * next[j];
                                }
                            }
                        }
                        let first = &dm[..d_in];
                        for j in 0..d_in {
                            d_shift[j] = (1.0 - mu[j]) * first[j];
                        }
                    },
                )
            });
        let side = |offset| Sections {
            parts: &sides,
            per: 2 * d_in,
            offset,
            len: d_in,
        };
        [dx, side(0).gather(), side(d_in).sum(), dw]
    }
}

/// `dz = dy ⊙ act'(z)` for the activations that have a derivative to apply.
#[inline(always)]
fn act_backward(act: Activation, dz: &mut [f32], dy: &[f32], z: &[f32]) {
    let (dy, z) = (&dy[..dz.len()], &z[..dz.len()]);
    match act {
        Activation::Identity => dz.copy_from_slice(dy),
        Activation::Sigmoid => {
            for i in 0..dz.len() {
                let s = sigmoid(z[i]);
                dz[i] = dy[i] * s * (1.0 - s);
            }
        }
        Activation::ReluSquared => {
            for i in 0..dz.len() {
                dz[i] = dy[i] * 2.0 * z[i].max(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use super::super::shift_mix_linear;
    use super::Activation;
    use crate::rwkv::{lerp, token_shift};
    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The definition: RWKV's token shift and interpolation, the product, the activation.
    fn definition(
        x: Tensor<3>,
        shift: Tensor<2>,
        mu: Tensor<1>,
        w: Tensor<2>,
        act: Activation,
    ) -> Tensor<3> {
        let batch = x.dims()[0];
        let m = lerp(x.clone(), token_shift(x, shift), mu);
        act.apply(m.matmul(w.unsqueeze_dim(0).repeat_dim(0, batch)))
    }

    /// The op against the definition, every activation, at uneven batches, odd lengths (one
    /// token; a length that is not a multiple of the tile, so tiles cross sequences) and widths
    /// that change between input and output: outputs and the gradients of all four inputs.
    #[test]
    fn op_matches_definition() {
        on_every_isa(|isa| {
            for (batch, len, d_in, d_out) in
                [(1, 1, 3, 5), (3, 7, 8, 4), (5, 37, 6, 24), (2, 300, 16, 16)]
            {
                for act in [
                    Activation::Identity,
                    Activation::Sigmoid,
                    Activation::ReluSquared,
                ] {
                    let x = uniform([batch, len, d_in], -2.0, 2.0, 1);
                    let shift = uniform([batch, d_in], -2.0, 2.0, 2);
                    let mu = uniform([d_in], 0.0, 1.0, 3);
                    let w = uniform([d_in, d_out], -0.5, 0.5, 4);
                    let r = uniform([batch, len, d_out], -1.0, 1.0, 5);
                    let run = |fused: bool| {
                        let (x, shift, mu, w) = (
                            x.clone().require_grad(),
                            shift.clone().require_grad(),
                            mu.clone().require_grad(),
                            w.clone().require_grad(),
                        );
                        let y = if fused {
                            shift_mix_linear(x.clone(), shift.clone(), mu.clone(), w.clone(), act)
                        } else {
                            definition(x.clone(), shift.clone(), mu.clone(), w.clone(), act)
                        };
                        let grads = (y.clone() * r.clone()).sum().backward();
                        (
                            y,
                            x.grad(&grads).unwrap(),
                            shift.grad(&grads).unwrap(),
                            mu.grad(&grads).unwrap(),
                            w.grad(&grads).unwrap(),
                        )
                    };
                    let (y, dx, ds, dmu, dw) = run(true);
                    let (y_ref, dx_ref, ds_ref, dmu_ref, dw_ref) = run(false);
                    let at = format!("{isa:?} {act:?} B {batch}, T {len}, {d_in} → {d_out}");
                    assert!(max_diff(y, y_ref) < 1e-5, "y at {at}");
                    assert!(max_diff(dx, dx_ref) < 1e-5, "dx at {at}");
                    assert!(max_diff(ds, ds_ref) < 1e-5, "dshift at {at}");
                    assert!(max_diff(dmu, dmu_ref) < 1e-3, "dμ at {at}");
                    assert!(max_diff(dw, dw_ref) < 1e-3, "dW at {at}");
                }
            }
        });
    }
}
