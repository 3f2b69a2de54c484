//! Linear layers as the models apply them. [`project`]: on the CPU backends under autodiff one op
//! (`fused::linear`, whose bias add and weight and bias gradients run on every thread), burn's
//! `Linear::forward` elsewhere. [`split_linear`]: a layer whose output is used in parts
//! (attention's `q, k, v`, Mamba's `x, z`), as one product per part against the weight's columns:
//!
//! ```text
//! y_p = x W[:, c_p..c_p + w_p] + b[c_p..c_p + w_p]      for parts of widths w_p, c_p = Σ_{q<p} w_q
//! ```
//!
//! The same numbers as slicing `Linear::forward`'s output, at a lower cost under autodiff: the
//! backward of a slice of an activation is a zero tensor of the whole output, the slice
//! assigned into it, and an addition per further part, several passes over `[B, T, Σ w_p]`
//! (at attention's d 128, T 1024 training shapes ~0.6 GB of memory traffic per layer). Sliced
//! here, only the small weight is zero-filled; the input's gradient is the parts' sum.

use burn::nn::Linear;
use burn::tensor::Tensor;
use burn::tensor::module::linear;

use crate::fused;

/// `layer` applied to `x [.., D_in]`.
pub fn project<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    if !fused::has_kernel(&x.device()) {
        return layer.forward(x);
    }
    let dims = x.dims();
    let [d_in, d_out] = layer.weight.dims();
    let rows = dims[..D - 1].iter().product::<usize>();
    let y = fused::linear(
        x.reshape([rows, d_in]),
        layer.weight.val(),
        fused::bias(layer),
    );
    let mut out = dims;
    out[D - 1] = d_out;
    y.reshape(out)
}

/// `layer`'s output in parts of `widths` (summing to its output width), each its own product.
pub fn split_linear<const D: usize, const N: usize>(
    layer: &Linear,
    x: Tensor<D>,
    widths: [usize; N],
) -> [Tensor<D>; N] {
    let weight = layer.weight.val(); // [D_in, D_out]
    let bias = layer.bias.as_ref().map(|b| b.val());
    assert_eq!(
        widths.iter().sum::<usize>(),
        weight.dims()[1],
        "split_linear: the parts cover the output"
    );
    let mut from = 0;
    widths.map(|width| {
        let part = linear(
            x.clone(),
            weight.clone().narrow(1, from, width),
            bias.clone().map(|b| b.narrow(0, from, width)),
        );
        from += width;
        part
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Init;
    use crate::test_support::{device, max_diff, uniform};

    /// The parts equal the whole output's slices, and so do the gradients of the input, the
    /// weight and the bias.
    #[test]
    fn parts_match_the_sliced_output() {
        let layer = Init::new(3, &device()).linear(5, 9, true);
        let x = uniform([2, 3, 5], -1.0, 1.0, 1);
        let r = uniform([2, 3, 9], -1.0, 1.0, 2);
        let run = |split: bool| {
            let x = x.clone().require_grad();
            let y = if split {
                Tensor::cat(split_linear(&layer, x.clone(), [2, 4, 3]).to_vec(), 2)
            } else {
                layer.forward(x.clone())
            };
            let grads = (y.clone() * r.clone()).sum().backward();
            let g_w = layer.weight.val().grad(&grads).unwrap();
            let g_b = layer.bias.as_ref().unwrap().val().grad(&grads).unwrap();
            (y, x.grad(&grads).unwrap(), g_w, g_b)
        };
        let (y, g_x, g_w, g_b) = run(true);
        let (y_ref, g_x_ref, g_w_ref, g_b_ref) = run(false);
        assert!(max_diff(y, y_ref) < 1e-6);
        assert!(max_diff(g_x, g_x_ref) < 1e-6);
        assert!(max_diff(g_w, g_w_ref) < 1e-6);
        assert!(max_diff(g_b, g_b_ref) < 1e-6);
    }
}
