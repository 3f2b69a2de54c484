//! Normalisation: the layer norms of the residual blocks, the MLP and RWKV's block (built and
//! applied here, fused on the CPU backends), and what the layers that normalise per head share
//! (RWKV-6's and RWKV-7's `ln_x`, sLSTM's group norm, mLSTM's head-wise norm), each with its
//! own scale, bias and epsilon.

use burn::nn::{LayerNorm, LayerNormConfig};
use burn::tensor::{Device, Tensor};

use crate::fused;

/// A layer norm over `d` features as every model here builds it: burn's defaults (a bias, and
/// `ε` = [`EPSILON`]).
pub fn layer_norm_module(d: usize, device: &Device) -> LayerNorm {
    LayerNormConfig::new(d).init(device)
}

/// The `ε` of [`layer_norm_module`]'s norms. burn keeps a `LayerNorm`'s own `ε` private (a
/// constant of its config, not of its record), so [`layer_norm`] passes this one to the fused op.
const EPSILON: f64 = 1e-5;

/// `ln(x)` over the last axis, `ln` from [`layer_norm_module`]: on a backend with the fused
/// kernels one op ([`fused::layer_norm`]), elsewhere burn's `LayerNorm` (the definition).
pub fn layer_norm<const D: usize>(ln: &LayerNorm, x: Tensor<D>) -> Tensor<D> {
    let Some(beta) = ln.beta.as_ref().filter(|_| fused::has_kernel(&x.device())) else {
        return ln.forward(x);
    };
    let dims = x.dims();
    let d = dims[D - 1];
    let rows = x.shape().num_elements() / d.max(1);
    fused::layer_norm(x.reshape([rows, d]), ln.gamma.val(), beta.val(), EPSILON).reshape(dims)
}

/// `(x − mean) / √(var + eps)` over the last dimension (biased variance, as PyTorch's
/// `layer_norm`), without scale or bias.
pub fn standardise<const D: usize>(x: Tensor<D>, eps: f64) -> Tensor<D> {
    let last = D - 1;
    let centred = x.clone() - x.mean_dim(last);
    let var = centred.clone().powf_scalar(2.0).mean_dim(last);
    centred / (var + eps).sqrt()
}

/// Heads `[B, H, T, N]` standardised each over its `N` values and laid side by side as
/// `[B, T, H·N]`: the group norm (one group per head) before its scale and bias.
pub fn per_head(o: Tensor<4>, eps: f64) -> Tensor<3> {
    let [b, h, t, n] = o.dims();
    standardise(o, eps).swap_dims(1, 2).reshape([b, t, h * n])
}
