//! The causal mask, built in one place for attention and the chunked (quadratic) forms.

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
}
