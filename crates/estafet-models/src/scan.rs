//! Diagonal linear recurrences, the core of minGRU and Mamba, in interchangeable forms:
//!
//! ```text
//! h_t = a_t ⊙ h_{t-1} + b_t,      a_t = exp(log_a_t) ∈ (0, 1]
//! ```
//!
//! - [`Scan::Sequential`] is the definition: one step per time step. Every other form is
//!   tested against it (values, final state and gradients).
//! - [`Scan::Chunked`] splits time into chunks of `chunk_len` (the last may be shorter) and
//!   solves each chunk in closed form from its first state,
//!   `h_t = exp(L_t) h_start + Σ_{s≤t} exp(L_t − L_s) b_s` with `L_t` the in-chunk cumulative
//!   sum of `log a`. Decays are combined in log space and every exponent is `≤ 0`, so nothing
//!   overflows however long the chunk; the cost is a `[B, C, C, M]` intermediate per chunk and
//!   `T / C` sequential steps instead of `T`.
//!
//! Both take `log a` rather than `a`: minGRU computes `log(1 − z) = −softplus(k)` exactly and
//! Mamba's `Δ·A` is already a log. [`recurrence`] is the same loop over `a` itself, for
//! transitions that may be negative ([`Eigenvalues::Signed`]), which have no log.

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::mask::{self, Visible};
use crate::time::unbind;

/// Which tensor-op form computes a recurrence: the sequential loop (the definition) or chunks
/// of `chunk_len`. In TOML: `scan = { kind = "chunked", chunk_len = 32 }` or
/// `scan = { kind = "sequential" }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Scan {
    /// On a 2-core CPU with ndarray the loop beat every chunk length tried (B = 32, T = 256:
    /// minGRU-sized M = 64 113 ms vs 469 ms at chunk 16 for forward and backward; Mamba-sized
    /// M = 1024 3.2 s vs 13.6 s; RWKV-4 at D = 256 0.74 s vs 3.6 s), so the definition is also
    /// the default.
    #[default]
    Sequential,
    Chunked {
        chunk_len: usize,
    },
}

impl Scan {
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Scan::Chunked { chunk_len: 0 } => Err("chunk_len must be at least 1".into()),
            _ => Ok(()),
        }
    }
}

/// How a recurrence that has a fused CPU kernel (Mamba's selective scan, RWKV-4's WKV) is
/// computed. In TOML the same table as [`Scan`] with two more kinds:
/// `{ kind = "auto" }` (the default), `{ kind = "fused" }`, `{ kind = "sequential" }`,
/// `{ kind = "chunked", chunk_len = 16 }`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "FormTable", into = "FormTable")]
pub enum Form {
    /// The fused kernel where the backend has one (ndarray and flex for every recurrence, wgpu
    /// for those with a GPU kernel), else the sequential tensor form: the fastest form measured
    /// on each.
    #[default]
    Auto,
    /// The fused kernel; a backend without it is refused when the model is checked against
    /// its device ([`crate::ModelConfig::check_device`]).
    Fused,
    /// A tensor-op form, on every backend.
    Tensor(Scan),
}

impl Form {
    /// What runs on a backend that has the kernel (`kernel`) or not.
    pub fn resolve(self, kernel: bool) -> Compute {
        match self {
            Form::Auto if kernel => Compute::Fused,
            Form::Auto => Compute::Tensor(Scan::Sequential),
            Form::Fused => {
                assert!(
                    kernel,
                    "a fused form where its kernel does not run: a backend without it (unchecked \
                     config), or on llvmpipe a length past its loop budget (use auto)"
                );
                Compute::Fused
            }
            Form::Tensor(scan) => Compute::Tensor(scan),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        match self {
            Form::Tensor(scan) => scan.validate(),
            Form::Auto | Form::Fused => Ok(()),
        }
    }
}

/// A [`Form`] resolved for a backend: what actually computes the recurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compute {
    /// The fused kernel (`crate::fused`).
    Fused,
    /// The tensor-op form.
    Tensor(Scan),
}

/// [`Form`] as written in TOML: one flat table tagged by `kind`.
#[derive(Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum FormTable {
    Auto,
    Fused,
    Sequential,
    Chunked { chunk_len: usize },
}

impl From<FormTable> for Form {
    fn from(table: FormTable) -> Self {
        match table {
            FormTable::Auto => Form::Auto,
            FormTable::Fused => Form::Fused,
            FormTable::Sequential => Form::Tensor(Scan::Sequential),
            FormTable::Chunked { chunk_len } => Form::Tensor(Scan::Chunked { chunk_len }),
        }
    }
}

impl From<Form> for FormTable {
    fn from(form: Form) -> Self {
        match form {
            Form::Auto => FormTable::Auto,
            Form::Fused => FormTable::Fused,
            Form::Tensor(Scan::Sequential) => FormTable::Sequential,
            Form::Tensor(Scan::Chunked { chunk_len }) => FormTable::Chunked { chunk_len },
        }
    }
}

/// The range of a diagonal linear recurrence's transition `a_t` (its eigenvalues).
///
/// Grazzi et al. 2024 ("Unlocking State-Tracking in Linear RNNs Through Negative Eigenvalues")
/// show that a recurrence whose transitions lie in `[0, 1]` cannot track parity at any length,
/// while the same model with transitions in `[−1, 1]` can: `a = −1` flips the state. `Signed`
/// maps a transition `e ∈ [0, 1]` to `2e − 1`. In TOML: `eigenvalues = "positive"` (the
/// default) or `"signed"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Eigenvalues {
    /// `a ∈ [0, 1]`: the model as published.
    #[default]
    Positive,
    /// `a = 2e − 1 ∈ [−1, 1]`.
    Signed,
}

impl Eigenvalues {
    /// `(s, o)` with `a = s·e + o`: the transition from its `[0, 1]` value `e`, and `da/de = s`.
    /// Exact for `Positive` (`1·e + 0 = e` in floating point too).
    pub fn affine(self) -> (f32, f32) {
        match self {
            Eigenvalues::Positive => (1.0, 0.0),
            Eigenvalues::Signed => (2.0, -1.0),
        }
    }

    /// The transitions `a = s·exp(log_e) + o` from their `[0, 1]` logs (tensor ops; the fused
    /// kernel applies [`Eigenvalues::affine`] itself).
    pub fn transition<const D: usize>(self, log_e: Tensor<D>) -> Tensor<D> {
        let (scale, offset) = self.affine();
        log_e.exp() * scale + offset
    }

    /// Whether a recurrence with this range may run chunked: the chunked forms work in log
    /// space, and a signed transition has no log. The error names the config fields.
    pub fn check_chunked(self, chunked: bool) -> Result<(), String> {
        if self == Eigenvalues::Signed && chunked {
            return Err("model.mixer.scan = chunked works in log space and needs \
                 eigenvalues = \"positive\"; signed eigenvalues run step by step"
                .into());
        }
        Ok(())
    }
}

/// Runs `h_t = exp(log_a_t) ⊙ h_{t-1} + b_t`.
///
/// - `log_a`, `b`: `[B, T, M]`, `T ≥ 1`, `log_a ≤ 0`
/// - `h0`: `[B, M]`
/// - returns `h_1..h_T` as `[B, T, M]` and `h_T` as `[B, M]`
pub fn linear_scan(
    log_a: Tensor<3>,
    b: Tensor<3>,
    h0: Tensor<2>,
    scan: Scan,
) -> (Tensor<3>, Tensor<2>) {
    match scan {
        Scan::Sequential => sequential(log_a, b, h0),
        Scan::Chunked { chunk_len } => chunked(log_a, b, h0, chunk_len),
    }
}

fn sequential(log_a: Tensor<3>, b: Tensor<3>, h0: Tensor<2>) -> (Tensor<3>, Tensor<2>) {
    recurrence(log_a.exp(), b, h0)
}

/// The definition, `h_t = a_t ⊙ h_{t-1} + b_t`, one step per time step, for transitions of
/// either sign.
///
/// - `a`, `b`: `[B, T, M]`, `T ≥ 1`; `h0`: `[B, M]`
/// - returns `h_1..h_T` as `[B, T, M]` and `h_T` as `[B, M]`
pub fn recurrence(a: Tensor<3>, b: Tensor<3>, h0: Tensor<2>) -> (Tensor<3>, Tensor<2>) {
    let mut h = h0;
    let mut hs = Vec::with_capacity(a.dims()[1]);
    for (a_t, b_t) in unbind::<3, 2>(a, 1).into_iter().zip(unbind(b, 1)) {
        h = a_t * h + b_t;
        hs.push(h.clone());
    }
    (Tensor::stack(hs, 1), h)
}

fn chunked(
    log_a: Tensor<3>,
    b: Tensor<3>,
    h0: Tensor<2>,
    chunk_len: usize,
) -> (Tensor<3>, Tensor<2>) {
    let [_, t, _] = log_a.dims();
    let device = log_a.device();
    let mut h = h0;
    let mut chunks = Vec::with_capacity(t.div_ceil(chunk_len));
    for start in (0..t).step_by(chunk_len) {
        let len = chunk_len.min(t - start);
        let cum = log_a.clone().narrow(1, start, len).cumsum(1); // L_t, [B, C, M]
        let b_chunk = b.clone().narrow(1, start, len);
        // exp(L_t − L_s) for s ≤ t, 0 above the diagonal: [B, C(t), C(s), M].
        let causal = mask::causal(len, len, 0, Visible::UpTo, f32::NEG_INFINITY, &device)
            .reshape([1, len, len, 1]);
        let decay =
            (cum.clone().unsqueeze_dim::<4>(2) - cum.clone().unsqueeze_dim::<4>(1) + causal).exp();
        let within = (decay * b_chunk.unsqueeze_dim::<4>(1))
            .sum_dim(2)
            .squeeze_dim::<3>(2);
        let hs = within + cum.exp() * h.unsqueeze_dim::<3>(1);
        h = hs.clone().narrow(1, len - 1, 1).squeeze_dim(1);
        chunks.push(hs);
    }
    (Tensor::cat(chunks, 1), h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;
    use burn::tensor::activation::softplus;

    /// Chunked equals sequential in values, final state and the gradients of `log a`, `b` and
    /// `h0`, at an odd length and chunk sizes that do not divide it, including strong decay.
    #[test]
    fn chunked_matches_sequential_with_gradients() {
        let dev = device();
        let (batch, t, m) = (2, 13, 5);
        for decay_scale in [1.0, 8.0] {
            let raw = Tensor::<3>::random([batch, t, m], Distribution::Normal(0.0, 1.0), &dev);
            let log_a = -softplus(raw, 1.0) * decay_scale;
            let b = Tensor::<3>::random([batch, t, m], Distribution::Normal(0.0, 1.0), &dev);
            let h0 = Tensor::<2>::random([batch, m], Distribution::Normal(0.0, 1.0), &dev);
            let r = Tensor::<3>::random([batch, t, m], Distribution::Normal(0.0, 1.0), &dev);
            let run = |scan| {
                let (log_a, b, h0) = (
                    log_a.clone().detach().require_grad(),
                    b.clone().detach().require_grad(),
                    h0.clone().detach().require_grad(),
                );
                let (hs, h_last) = linear_scan(log_a.clone(), b.clone(), h0.clone(), scan);
                let grads = ((hs.clone() * r.clone()).sum() + h_last.clone().sum()).backward();
                (
                    hs,
                    h_last,
                    log_a.grad(&grads).unwrap(),
                    b.grad(&grads).unwrap(),
                    h0.grad(&grads).unwrap(),
                )
            };
            let reference = run(Scan::Sequential);
            for chunk_len in [1, 4, 5, 13, 32] {
                let fast = run(Scan::Chunked { chunk_len });
                let what = format!("chunk_len {chunk_len}, decay ×{decay_scale}");
                assert!(max_diff(fast.0, reference.0.clone()) < 1e-5, "h, {what}");
                assert!(max_diff(fast.1, reference.1.clone()) < 1e-5, "h_T, {what}");
                assert!(
                    max_diff(fast.2, reference.2.clone()) < 1e-4,
                    "d log a, {what}"
                );
                assert!(max_diff(fast.3, reference.3.clone()) < 1e-5, "d b, {what}");
                assert!(max_diff(fast.4, reference.4.clone()) < 1e-5, "d h0, {what}");
            }
        }
    }

    #[test]
    fn sequential_is_the_recurrence() {
        let dev = device();
        // a = 0.5, b = 1, h0 = 0: h = 1, 1.5, 1.75
        let log_a = Tensor::<3>::full([1, 3, 1], 0.5f32.ln(), &dev);
        let b = Tensor::<3>::ones([1, 3, 1], &dev);
        let (hs, _) = linear_scan(log_a, b, Tensor::zeros([1, 1], &dev), Scan::Sequential);
        let hs: Vec<f32> = hs.to_data().try_to_vec::<f32>().unwrap();
        assert!(
            hs.iter()
                .zip([1.0, 1.5, 1.75])
                .all(|(a, e)| (a - e).abs() < 1e-6),
            "{hs:?}"
        );
    }
}
