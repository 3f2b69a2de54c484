//! Mamba's causal depthwise convolution and its SiLU, as one kernel:
//!
//! ```text
//! pre_t = bias + Σ_{j<K} w_j ⊙ window_{t+j}      window [B, K−1+T, C]: the carried K−1 inputs, then T
//! y_t   = SiLU(pre_t) = pre_t σ(pre_t)           y [B, T, C]
//! ```
//!
//! Built from tensor ops this is `K` slices, products and sums and a SiLU over `[B, T, C]`, each
//! a separate op forward and backward: at the research shapes (d 64, 2 layers) the element-wise
//! ops around the scan took more of Mamba's step than the scan. The backward recomputes `pre`
//! (`dpre = dy ⊙ σ(pre) (1 + pre (1 − σ(pre)))`), then `dwindow_{t+j} += w_j dpre_t`,
//! `dw_j = Σ dpre_t window_{t+j}`, `dbias = Σ dpre_t`, one sequence per task. The definition is
//! `crate::conv::causal_depthwise` followed by `silu` (`forward_with`).

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, Sections, dims3, par_rows, read, zeros};
use super::math::sigmoid;

/// The convolution's inputs on the host.
#[derive(Debug)]
pub(super) struct ConvSilu {
    batch: usize,
    /// `K − 1 + T`.
    window_len: usize,
    taps: usize,
    channels: usize,
    window: Vec<f32>,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl ConvSilu {
    fn len(&self) -> usize {
        self.window_len + 1 - self.taps
    }

    /// `pre` of sequence `i` at step `t`, written into `pre` (`C` floats).
    #[inline(always)]
    fn pre(&self, i: usize, t: usize, pre: &mut [f32]) {
        let c = self.channels;
        let window = &self.window[(i * self.window_len + t) * c..][..self.taps * c];
        taps_sum(&self.bias, &self.weight, window, pre);
    }
}

/// `pre = bias + Σ_j weight_j ⊙ window_j` over the `K` taps (`weight`, `window`: `[K, C]`). A
/// function of slices, each its own argument, so that LLVM knows `pre` aliases none of them:
/// inlined into the backward's sequence loop, the loop ran scalar (`perf`, 2026-12-03).
#[inline(always)]
fn taps_sum(bias: &[f32], weight: &[f32], window: &[f32], pre: &mut [f32]) {
    let c = pre.len();
    pre.copy_from_slice(&bias[..c]);
    for (w, x) in weight.chunks_exact(c).zip(window.chunks_exact(c)) {
        let (w, x) = (&w[..c], &x[..c]);
        for k in 0..c {
            pre[k] += w[k] * x[k];
        }
    }
}

impl HostKernel<3> for ConvSilu {
    type Args = ();

    fn read<B: Backend>([window, weight, bias]: [&FloatTensor<B>; 3], (): ()) -> Self {
        let [batch, window_len, channels] = dims3::<B>(window);
        let taps = weight.shape().as_slice()[0];
        assert!(window_len >= taps, "conv_silu needs T ≥ 1");
        Self {
            batch,
            window_len,
            taps,
            channels,
            window: read::<B>(window.clone()),
            weight: read::<B>(weight.clone()),
            bias: read::<B>(bias.clone()),
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len(), self.channels]
    }

    fn input_shapes(&self) -> [Vec<usize>; 3] {
        let c = self.channels;
        [
            vec![self.batch, self.window_len, c],
            vec![self.taps, c],
            vec![c],
        ]
    }

    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let (t_len, c) = (self.len(), self.channels);
        let mut out = zeros(self.batch * t_len * c);
        par_rows(
            &mut out,
            t_len * c,
            #[inline(always)]
            |i, row| {
                for (t, y) in row.chunks_exact_mut(c).enumerate() {
                    self.pre(i, t, y);
                    for v in y.iter_mut() {
                        *v *= sigmoid(*v);
                    }
                }
            },
        );
        out
    }

    /// Gradients of `(window, weight, bias)` given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 3] {
        let (t_len, c, taps, wl) = (self.len(), self.channels, self.taps, self.window_len);
        // Per sequence: [dwindow (L·C) | dw (K·C) | dbias (C)].
        let per = wl * c + taps * c + c;
        let mut parts = zeros(self.batch * per);
        par_rows(
            &mut parts,
            per,
            #[inline(always)]
            |i, part| {
                let window = &self.window[i * wl * c..][..wl * c];
                let d_y = &d_out[i * t_len * c..][..t_len * c];
                let (d_window, rest) = part.split_at_mut(wl * c);
                let (d_w, d_b) = rest.split_at_mut(taps * c);
                let mut d_pre = vec![0.0f32; c];
                for t in 0..t_len {
                    self.pre(i, t, &mut d_pre);
                    let dy = &d_y[t * c..][..c];
                    for k in 0..c {
                        let s = sigmoid(d_pre[k]);
                        d_pre[k] = dy[k] * s * (1.0 + d_pre[k] * (1.0 - s));
                        d_b[k] += d_pre[k];
                    }
                    for j in 0..taps {
                        let w = &self.weight[j * c..][..c];
                        let x = &window[(t + j) * c..][..c];
                        let (d_wj, d_x) =
                            (&mut d_w[j * c..][..c], &mut d_window[(t + j) * c..][..c]);
                        for k in 0..c {
                            d_wj[k] += d_pre[k] * x[k];
                            d_x[k] += d_pre[k] * w[k];
                        }
                    }
                }
            },
        );
        let section = |offset, len| Sections {
            parts: &parts,
            per,
            offset,
            len,
        };
        [
            section(0, wl * c).gather(),
            section(wl * c, taps * c).sum(),
            section(wl * c + taps * c, c).sum(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use burn::tensor::activation::silu;

    use crate::test_support::{max_diff, on_every_isa, uniform};

    /// The kernel against the definition (taps as tensor slices, then SiLU) at an uneven batch
    /// (B = 3), T 1 and 7, every instruction-set copy: `y` and the gradient of every input.
    #[test]
    fn kernel_matches_definition() {
        // Every instruction-set copy of the kernel the CPU runs.
        on_every_isa(|isa| {
            for t in [1, 7] {
                let (bsz, k, c) = (3, 4, 5);
                let window = uniform([bsz, k - 1 + t, c], -2.0, 2.0, 1);
                let weight = uniform([k, c], -1.0, 1.0, 2);
                let bias = uniform([c], -0.5, 0.5, 3);
                let r = uniform([bsz, t, c], -1.0, 1.0, 4);
                let run = |fused: bool| {
                    let window = window.clone().require_grad();
                    let (weight, bias) =
                        (weight.clone().require_grad(), bias.clone().require_grad());
                    let y = if fused {
                        super::super::conv_silu(window.clone(), weight.clone(), bias.clone())
                    } else {
                        let mut pre = bias.clone().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0);
                        for j in 0..k {
                            let tap = weight.clone().narrow(0, j, 1).unsqueeze_dim::<3>(0);
                            pre = pre + window.clone().narrow(1, j, t) * tap;
                        }
                        silu(pre)
                    };
                    let grads = (y.clone() * r.clone()).sum().backward();
                    let g: [Tensor<1>; 3] = [
                        window.grad(&grads).unwrap().flatten(0, 2),
                        weight.grad(&grads).unwrap().flatten(0, 1),
                        bias.grad(&grads).unwrap(),
                    ];
                    (y, g)
                };
                let (y, grads) = run(true);
                let (y_ref, grads_ref) = run(false);
                assert!(max_diff(y, y_ref) < 1e-5, "{isa:?} T {t}: y");
                for (name, (g, g_ref)) in ["window", "weight", "bias"]
                    .iter()
                    .zip(grads.into_iter().zip(grads_ref))
                {
                    assert!(max_diff(g, g_ref) < 1e-4, "{isa:?} T {t}: d{name}");
                }
            }
        });
    }
}
