//! Parallel heads in one layer (Hymba; Dong et al. 2024): attention and a recurrence read the
//! same input side by side, and their outputs, each normalised, are averaged.
//!
//! ```text
//! y = (1/n) Σ_i LN_i(M_i(x))        x, y [B, T, D]; M_1..M_n the branches, each a mixer
//! ```
//!
//! Hymba writes `Y = W_out(β₁·norm(M_attn(X)) + β₂·norm(M_ssm(X))) / 2` with learnable
//! per-channel `β`: here each branch keeps its own output projection, and the layer norm's
//! scale `γ_i` is `β_i` (its bias a free offset). The state is every branch's, in order;
//! attention's KV cache still grows with `T`. In a config:
//!
//! ```toml
//! [model.mixer]
//! kind = "parallel"
//! branches = [{ kind = "attention", n_heads = 4 }, { kind = "mamba" }]
//! ```
//!
//! and in a label `attention|mamba` (a hybrid stack of such layers and others:
//! `gated_deltanet*3+attention|mamba`).

use burn::module::Module;
use burn::nn::LayerNorm;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::init::Init;
use crate::mixer::{Mixer, MixerConfig, MixerState};
use crate::norm::{layer_norm, layer_norm_module};

/// `[model.mixer]` with `kind = "parallel"`: the `branches`, each a mixer table of its own kind
/// (default: Hymba's pair, attention with 4 heads beside a Mamba). Their width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ParallelSpec {
    pub branches: Vec<MixerConfig>,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        Self {
            branches: vec![
                MixerConfig::Attention(crate::attention::AttentionSpec::default()),
                MixerConfig::Mamba(crate::mamba::MambaSpec::default()),
            ],
        }
    }
}

impl ParallelSpec {
    pub fn config(&self, d_model: usize) -> ParallelConfig {
        ParallelConfig {
            d_model,
            branches: self.branches.clone(),
        }
    }

    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        if self.branches.len() < 2 {
            return Err(
                "model.mixer.branches: give at least two mixers to run side by side".into(),
            );
        }
        for (i, branch) in self.branches.iter().enumerate() {
            let at = format!("model.mixer.branches[{i}]");
            if matches!(branch, MixerConfig::Parallel(_)) {
                return Err(format!(
                    "{at}: a branch is one mixer, not another parallel layer"
                ));
            }
            branch
                .validate(d_model)
                .map_err(|e| crate::model::at_field(e, &at))?;
        }
        Ok(())
    }
}

/// The spec at a width.
#[derive(Clone, Debug)]
pub struct ParallelConfig {
    pub d_model: usize,
    pub branches: Vec<MixerConfig>,
}

impl ParallelConfig {
    pub fn init(&self, init: &mut Init) -> Parallel {
        let device = init.device().clone();
        Parallel {
            branches: (self.branches.iter())
                .map(|branch| branch.init(self.d_model, init))
                .collect(),
            norms: (self.branches.iter())
                .map(|_| layer_norm_module(self.d_model, &device))
                .collect(),
        }
    }
}

/// Branches `M_i` and their output norms `LN_i`.
#[derive(Module, Debug)]
pub struct Parallel {
    pub branches: Vec<Mixer>,
    pub norms: Vec<LayerNorm>,
}

impl Parallel {
    /// `x [B, T, D]` → `y [B, T, D]` and every branch's state.
    pub fn forward(
        &self,
        x: Tensor<3>,
        state: Option<Vec<MixerState>>,
    ) -> (Tensor<3>, Vec<MixerState>) {
        self.combine(state, |mixer, s| mixer.forward(x.clone(), s))
    }

    /// `x_t [B, D]` → `y_t [B, D]` and every branch's next state.
    pub fn step(
        &self,
        x_t: Tensor<2>,
        state: Option<Vec<MixerState>>,
    ) -> (Tensor<2>, Vec<MixerState>) {
        self.combine(state, |mixer, s| mixer.step(x_t.clone(), s))
    }

    /// `(1/n) Σ_i LN_i(y_i)` over the branches' outputs `y_i = run(M_i, state_i)`.
    fn combine<const D: usize>(
        &self,
        state: Option<Vec<MixerState>>,
        run: impl Fn(&Mixer, Option<MixerState>) -> (Tensor<D>, MixerState),
    ) -> (Tensor<D>, Vec<MixerState>) {
        let states: Vec<Option<MixerState>> = match state {
            Some(states) => {
                assert_eq!(states.len(), self.branches.len(), "one state per branch");
                states.into_iter().map(Some).collect()
            }
            None => self.branches.iter().map(|_| None).collect(),
        };
        let mut sum: Option<Tensor<D>> = None;
        let mut next = Vec::with_capacity(self.branches.len());
        for ((mixer, norm), s) in self.branches.iter().zip(&self.norms).zip(states) {
            let (y, s) = run(mixer, s);
            let y = layer_norm(norm, y);
            sum = Some(match sum {
                Some(total) => total + y,
                None => y,
            });
            next.push(s);
        }
        let y = sum.expect("at least two branches") / self.branches.len() as f64;
        (y, next)
    }

    /// Floats of state per sequence after `seq_len` tokens: the branches' sum.
    pub fn state_size(&self, seq_len: usize) -> usize {
        self.branches.iter().map(|m| m.state_size(seq_len)).sum()
    }

    /// The branches' own FLOPs per token beyond their weights.
    pub fn extra_flops_per_token(&self, seq_len: usize) -> f64 {
        (self.branches.iter())
            .map(|m| m.extra_flops_per_token(seq_len))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::device;
    use burn::tensor::Distribution;

    /// The layer is the mean of its branches' normalised outputs, each branch exactly the mixer
    /// it would be alone (same seed, same draws), and its state is theirs.
    #[test]
    fn the_layer_averages_its_normalised_branches() {
        let device = device();
        let spec = ParallelSpec::default();
        spec.validate(8).unwrap();
        let layer = spec.config(8).init(&mut Init::new(4, &device));
        let x = Tensor::<3>::random([2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        let (y, states) = layer.forward(x.clone(), None);
        let mut by_hand = Vec::new();
        let mut init = Init::new(4, &device);
        for (branch, norm) in spec.branches.iter().zip(&layer.norms) {
            let alone = branch.init(8, &mut init);
            by_hand.push(layer_norm(norm, alone.forward(x.clone(), None).0));
        }
        let mean = (by_hand[0].clone() + by_hand[1].clone()) / 2.0;
        let diff: f32 = (mean - y).abs().max().into_scalar();
        assert!(diff < 1e-6, "{diff}");
        assert_eq!(states.len(), 2);
        assert!(matches!(states[0], MixerState::Attention(_)));
        assert_eq!(
            layer.state_size(5),
            layer.branches[0].state_size(5) + layer.branches[1].state_size(5)
        );
    }

    #[test]
    fn a_branch_is_one_mixer() {
        let nested = ParallelSpec {
            branches: vec![
                MixerConfig::Parallel(ParallelSpec::default()),
                MixerConfig::all()[0].clone(),
            ],
        };
        assert_eq!(
            nested.validate(8).unwrap_err(),
            "model.mixer.branches[0]: a branch is one mixer, not another parallel layer"
        );
        let one = ParallelSpec {
            branches: vec![MixerConfig::all()[0].clone()],
        };
        assert!(
            one.validate(8)
                .unwrap_err()
                .starts_with("model.mixer.branches:")
        );
        let bad_heads: ParallelSpec = serde_json::from_value(serde_json::json!({
            "branches": [{ "kind": "mamba" }, { "kind": "attention", "n_heads": 3 }]
        }))
        .unwrap();
        assert_eq!(
            bad_heads.validate(8).unwrap_err(),
            "model.mixer.branches[1].n_heads must divide d_model = 8 (got 3)"
        );
    }
}
