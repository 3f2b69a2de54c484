//! Whole-tensor sums in one fixed order, whatever the thread count.
//!
//! burn-flex, built with its `rayon` feature (which puts its matrix products and copies on the
//! thread pool), sums a tensor of 4M or more `f32`s as a rayon reduction, whose association
//! order depends on how work was stolen: the last bits of a loss or a gradient norm would then
//! differ between runs of the same seed. A sum along one dimension reduces each row on one
//! thread, so flattening first keeps the order fixed on every backend.

use burn::tensor::Tensor;

/// `Σ t` as a `[1]` tensor (as `Tensor::sum`), summed in index order.
pub fn sum_all<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    t.flatten::<1>(0, D - 1).sum_dim(0)
}

/// `mean(t)` as a `[1]` tensor (as `Tensor::mean`), summed as [`sum_all`] sums.
pub fn mean_all<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    sum_all(t) / n as f32
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::{Device, Tensor, TensorData};

    use super::*;

    /// On flex, above its parallel threshold, the sum is the same to the last bit on one thread
    /// and on two (`Tensor::sum` is not: its rayon reduction gave different bits here), and
    /// agrees with the sum in `f64`.
    #[test]
    fn the_same_bits_on_any_thread_count() {
        let n: usize = 4 * 1024 * 1024 + 1001;
        let values: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 10007) as f32 / 5003.5 - 1.0 + 1e-4 * (i % 13) as f32)
            .collect();
        let exact: f64 = values.iter().map(|&v| v as f64).sum();
        let t = Tensor::<1>::from_data(TensorData::new(values, [n]), &Device::flex());
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| sum_all(t.clone()).into_scalar::<f32>())
        };
        let one = on(1);
        for _ in 0..3 {
            assert_eq!(one.to_bits(), on(2).to_bits());
        }
        assert!((one as f64 - exact).abs() < 1.0, "{one} vs {exact}");
        let mean = mean_all(t.reshape([n / 5, 5])).into_scalar::<f32>();
        assert!((mean as f64 - exact / n as f64).abs() < 1e-6);
    }
}
