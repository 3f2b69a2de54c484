//! The causal depthwise convolution of Mamba's block and of DeltaNet's short convolutions, as
//! tensor ops over a carried window (the last `K − 1` inputs of the previous call, then this
//! call's), so that a call of `T` tokens and `T` calls of one token compute the same thing.

use burn::tensor::Tensor;

/// `window [B, K − 1 + T, C]`, `weight [K, C]` (tap `j` multiplies the input `K − 1 − j` steps
/// back), `bias [C]` → `[B, T, C]`: `y_t = bias + Σ_j weight_j ⊙ window_{t+j}`.
pub fn causal_depthwise(
    window: Tensor<3>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    t: usize,
) -> Tensor<3> {
    let [k, _] = weight.dims();
    let mut out = bias.map(|b| b.unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0));
    for j in 0..k {
        let tap = weight.clone().narrow(0, j, 1).unsqueeze_dim::<3>(0); // [1, 1, C]
        let term = window.clone().narrow(1, j, t) * tap;
        out = Some(match out {
            Some(sum) => sum + term,
            None => term,
        });
    }
    out.expect("a kernel has at least one tap")
}
