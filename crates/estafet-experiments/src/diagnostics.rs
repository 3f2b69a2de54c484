//! Training diagnostics (`train.diagnostics = true`), logged with each evaluation: how large the
//! state grows along a sequence, how many gates are saturated, and, for the Elman RNN, the
//! spectral radius of the recurrent matrix (below 1 its memory fades geometrically; above 1 it
//! can explode).

use burn::tensor::{Device, Tensor};
use estafet_data::{Batch, Sample, SeqBatch};
use estafet_models::{Input, SequenceModel};
use serde::Serialize;

/// Sequences the diagnostics run on (the first of the held-out set).
pub const SEQUENCES: usize = 8;

/// A gate counts as saturated within this distance of 0 or 1.
pub const SATURATION: f64 = 0.05;

#[derive(Clone, Debug, Serialize)]
pub struct Diagnostics {
    /// `(t, ‖state after t + 1 tokens‖)` at five positions, averaged over the sequences.
    pub state_norm: Vec<(usize, f64)>,
    /// Fraction of gate activations within 0.05 of 0 or 1, over every step and layer (LSTM,
    /// GRU, minGRU; `None` for other mixers).
    pub saturated_gates: Option<f64>,
    /// Spectral radius of each Elman layer's `W_hh` (empty for other mixers).
    pub spectral_radius: Vec<f64>,
}

pub fn measure(model: &SequenceModel, samples: &[Sample], device: &Device) -> Diagnostics {
    let samples = &samples[..samples.len().min(SEQUENCES)];
    let batch = Batch::new(samples, device);
    let input = match batch.input {
        SeqBatch::Tokens(x) => Input::Tokens(x),
        SeqBatch::Reals(x) => Input::Features(x),
    };
    let encoded = model.encode(input);
    let [b, t_len, _] = encoded.dims();
    let marks: Vec<usize> = [0, t_len / 4, t_len / 2, 3 * t_len / 4, t_len - 1]
        .into_iter()
        .fold(Vec::new(), |mut v, t| {
            if v.last() != Some(&t) {
                v.push(t);
            }
            v
        });
    let (mut state, mut norms) = (None, Vec::new());
    let (mut saturated, mut gates_seen) = (0.0, 0.0);
    for t in 0..t_len {
        let x = encoded.clone().slice_dim(1, t..t + 1).squeeze_dim::<2>(1);
        let (_, next, gates) = model.step_with_gates(x, state);
        for g in gates {
            let n = g.dims().iter().product::<usize>() as f64;
            let near =
                g.clone().lower_elem(SATURATION).float() + g.greater_elem(1.0 - SATURATION).float();
            saturated += near.sum().into_scalar::<f32>() as f64;
            gates_seen += n;
        }
        if marks.contains(&t) {
            // Each layer's state is batch-major, so it splits into one row per sequence.
            let rows: Vec<Tensor<2>> = next
                .layers
                .iter()
                .map(|s| {
                    let flat = s.flatten();
                    let n = flat.dims()[0] / b;
                    flat.reshape([b, n])
                })
                .collect();
            let per_sequence = Tensor::cat(rows, 1).powf_scalar(2.0).sum_dim(1).sqrt();
            norms.push((t, per_sequence.mean().into_scalar::<f32>() as f64));
        }
        state = Some(next);
    }
    Diagnostics {
        state_norm: norms,
        saturated_gates: (gates_seen > 0.0).then(|| saturated / gates_seen),
        spectral_radius: model
            .blocks
            .iter()
            .filter_map(|block| block.mixer.recurrent_matrix())
            .map(|w| spectral_radius(&w))
            .collect(),
    }
}

/// `ρ(W) = lim ‖W^k‖^{1/k}` (Gelfand), with `k = 2^20` reached by repeated squaring on the host,
/// renormalising at each squaring: exact for any square matrix as `k` grows, unlike power
/// iteration, which stalls on complex eigenvalue pairs.
pub fn spectral_radius(w: &Tensor<2>) -> f64 {
    let [n, m] = w.dims();
    assert_eq!(n, m, "a recurrent matrix is square");
    let mut a: Vec<f64> = w
        .clone()
        .into_data()
        .try_to_vec::<f32>()
        .expect("f32 weights")
        .into_iter()
        .map(f64::from)
        .collect();
    let mut log_rho = 0.0;
    let mut power = 1.0;
    for _ in 0..=20 {
        let norm = a.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        a.iter_mut().for_each(|v| *v /= norm);
        log_rho += norm.ln() / power;
        power *= 2.0;
        let mut sq = vec![0.0; n * n];
        for i in 0..n {
            for k in 0..n {
                let aik = a[i * n + k];
                if aik != 0.0 {
                    for j in 0..n {
                        sq[i * n + j] += aik * a[k * n + j];
                    }
                }
            }
        }
        a = sq;
    }
    log_rho.exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;

    #[test]
    fn spectral_radius_of_known_matrices() {
        let device = Backend::default_compiled().unwrap().device().unwrap();
        let m = |v: Vec<f32>, n: usize| {
            Tensor::<2>::from_data(burn::tensor::TensorData::new(v, [n, n]), &device)
        };
        // A rotation by 90° scaled by 0.9: eigenvalues ±0.9i, where power iteration never settles.
        let rotation = m(vec![0.0, -0.9, 0.9, 0.0], 2);
        assert!((spectral_radius(&rotation) - 0.9).abs() < 1e-4);
        // Upper triangular: the largest |diagonal|, however large the off-diagonal entry.
        let triangular = m(vec![0.5, 100.0, 0.0, -0.7], 2);
        assert!(
            (spectral_radius(&triangular) - 0.7).abs() < 1e-3,
            "{}",
            spectral_radius(&triangular)
        );
        assert_eq!(spectral_radius(&m(vec![0.0; 4], 2)), 0.0);
    }
}
