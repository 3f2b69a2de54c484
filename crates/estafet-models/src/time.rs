//! Splitting a sequence into its time steps without quadratic backward cost.
//!
//! burn's autodiff turns the backward of every slice into a zero tensor of the *whole* input
//! with the slice's gradient written in, so taking `T` single steps of a `[B, T, ·]` tensor
//! costs `T` full-size allocations: `O(T²)` memory traffic. Slicing in two levels, first
//! `√T`-step blocks of the sequence, then single steps of each block, costs `O(T^1.5)`: at
//! `T = 256` that is 32 full-size tensors' worth instead of 256.

use burn::tensor::Tensor;

/// The `T` slices of `x` along `dim`, each with that dimension removed (`D2 = D − 1`).
pub fn unbind<const D: usize, const D2: usize>(x: Tensor<D>, dim: usize) -> Vec<Tensor<D2>> {
    let t = x.dims()[dim];
    let block = (t as f64).sqrt().ceil().max(1.0) as usize;
    let mut steps = Vec::with_capacity(t);
    for start in (0..t).step_by(block) {
        let len = block.min(t - start);
        let chunk = x.clone().narrow(dim, start, len);
        for i in 0..len {
            steps.push(chunk.clone().narrow(dim, i, 1).squeeze_dim(dim));
        }
    }
    steps
}

/// Runs `cell` over the time steps of `inputs [B, T, ·]` from `state`, and stacks
/// `output(&state)` after each step into `[B, T, ·]`: the loop of every recurrent cell.
pub fn recur<S>(
    inputs: Tensor<3>,
    mut state: S,
    mut cell: impl FnMut(Tensor<2>, S) -> S,
    output: impl Fn(&S) -> Tensor<2>,
) -> (Tensor<3>, S) {
    let steps: Vec<Tensor<2>> = unbind(inputs, 1);
    let mut outputs = Vec::with_capacity(steps.len());
    for x_t in steps {
        state = cell(x_t, state);
        outputs.push(output(&state));
    }
    (Tensor::stack(outputs, 1), state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::device;
    use burn::tensor::TensorData;

    #[test]
    fn unbinds_in_order_at_any_length() {
        let device = device();
        for t in [1, 2, 5, 16, 17] {
            let values: Vec<f32> = (0..2 * t * 3).map(|v| v as f32).collect();
            let x = Tensor::<3>::from_data(TensorData::new(values, [2, t, 3]), &device);
            let steps: Vec<Tensor<2>> = unbind(x.clone(), 1);
            assert_eq!(steps.len(), t);
            let back = Tensor::stack::<3>(steps, 1);
            assert_eq!(back.to_data(), x.to_data());
        }
    }
}
