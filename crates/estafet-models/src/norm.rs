//! Normalisation shared by the layers that normalise per head (RWKV-6's and RWKV-7's `ln_x`,
//! sLSTM's group norm, mLSTM's head-wise norm): each keeps its own scale, bias and epsilon.

use burn::tensor::Tensor;

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
