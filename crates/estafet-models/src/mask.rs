//! The causal mask, built in one place for attention and the chunked (quadratic) forms, and
//! the unit lower-triangular solve of the delta-rule chunked forms.

use burn::tensor::{Device, Tensor, TensorData};

/// Which keys a query sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Visible {
    /// Keys up to and including the query's own position.
    UpTo,
    /// Keys strictly before it.
    Before,
}

/// An additive mask `[queries, keys]`: 0 where key `j` is visible to query `i` (at absolute
/// position `offset + i`), `hidden` elsewhere. `hidden` is `−∞` where a softmax or `exp`
/// follows, or a large finite negative where a maximum must stay finite.
pub fn causal(
    queries: usize,
    keys: usize,
    offset: usize,
    visible: Visible,
    hidden: f32,
    device: &Device,
) -> Tensor<2> {
    let values: Vec<f32> = (0..queries * keys)
        .map(|n| {
            let (query, key) = (offset + n / keys, n % keys);
            let seen = match visible {
                Visible::UpTo => key <= query,
                Visible::Before => key < query,
            };
            if seen { 0.0 } else { hidden }
        })
        .collect();
    Tensor::from_data(TensorData::new(values, [queries, keys]), device)
}

/// `(I − A)⁻¹` for `A [B, H, C, C]` strictly lower triangular, by forward substitution: row `i`
/// of `N = (I − A)⁻¹ − I` is `A_i + A_i[..i] N[..i]`, built in order. How the delta rule's chunked
/// forms (Gated DeltaNet, RWKV-7) gather a chunk's interdependent updates.
pub fn unit_lower_inverse(a: Tensor<4>) -> Tensor<4> {
    let c = a.dims()[2];
    let mut rows: Vec<Tensor<4>> = Vec::with_capacity(c);
    for i in 0..c {
        let a_i = a.clone().narrow(2, i, 1); // [B, H, 1, C]
        let row = if i == 0 {
            a_i
        } else {
            let done = Tensor::cat(rows.clone(), 2); // [B, H, i, C]
            a_i.clone() + a_i.narrow(3, 0, i).matmul(done)
        };
        rows.push(row);
    }
    let eye = Tensor::<2>::eye(c, &a.device());
    Tensor::cat(rows, 2) + eye.unsqueeze_dim::<3>(0).unsqueeze_dim::<4>(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::device;

    #[test]
    fn masks_the_future_from_any_offset() {
        let m = causal(2, 4, 1, Visible::UpTo, -9.0, &device());
        assert_eq!(
            m.to_data().try_to_vec::<f32>().unwrap(),
            [0.0, 0.0, -9.0, -9.0, 0.0, 0.0, 0.0, -9.0]
        );
        let m = causal(3, 3, 0, Visible::Before, -9.0, &device());
        assert_eq!(
            m.to_data().try_to_vec::<f32>().unwrap(),
            [-9.0, -9.0, -9.0, 0.0, -9.0, -9.0, 0.0, 0.0, -9.0]
        );
    }

    #[test]
    fn unit_lower_inverse_inverts() {
        let dev = device();
        let a = Tensor::<4>::random(
            [2, 1, 5, 5],
            burn::tensor::Distribution::Normal(0.0, 1.0),
            &dev,
        ) * causal(5, 5, 0, Visible::Before, f32::NEG_INFINITY, &dev)
            .exp()
            .unsqueeze_dim::<3>(0)
            .unsqueeze_dim::<4>(0);
        let eye = Tensor::<2>::eye(5, &dev)
            .unsqueeze_dim::<3>(0)
            .unsqueeze_dim::<4>(0);
        let product = (eye.clone() - a.clone()).matmul(unit_lower_inverse(a));
        assert!(crate::test_support::max_diff(product, eye.expand([2, 1, 5, 5])) < 1e-4);
    }
}
