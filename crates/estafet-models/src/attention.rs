//! Causal multi-head softmax attention (Vaswani et al. 2017), the non-recurrent baseline.
//!
//! ```text
//! q, k, v = split(W_qkv x)                         [B, T, H, K],  K = D / H
//! q, k    = RoPE(q), RoPE(k)                        rotary positions (Su et al. 2021), or
//! x       = x + P[t]                                learned absolute positions, before W_qkv
//! o       = softmax(q kᵀ / √K + causal mask) v      key j visible to query i iff j ≤ i
//! out     = W_o concat_heads(o)
//! ```
//!
//! On the CPU backends the scores, mask, softmax and weighted sum run as one fused op
//! (`fused::causal_attention`, 64 query rows at a time, FlashAttention's recomputing backward),
//! so training never holds the `[B, H, T, T]` scores; [`attend`] is its definition, which wgpu
//! runs.
//!
//! Its "state" is the KV cache: every past key and value, `2·T·D` floats per sequence, which
//! grows with the context; that growth is what the recurrent models are compared against.
//! `step` appends one token to the cache and attends over all of it.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::fused;
use crate::init::Init;
use crate::mask::{self, Visible};
use crate::projection::{project, split_linear};

/// How attention knows where a token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Positions {
    /// Rotary embeddings on queries and keys, any length.
    Rotary,
    /// A learned vector per position, added to the input; at most `max_len` positions.
    Learned { max_len: usize },
}

/// `[model.mixer]` with `kind = "attention"`: `n_heads` (4) and `positions` (rotary). Its
/// width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AttentionSpec {
    pub n_heads: usize,
    pub positions: Positions,
}

impl Default for AttentionSpec {
    fn default() -> Self {
        Self {
            n_heads: 4,
            positions: Positions::Rotary,
        }
    }
}

impl AttentionSpec {
    pub fn config(&self, d_model: usize) -> AttentionConfig {
        AttentionConfig {
            d_model,
            n_heads: self.n_heads,
            positions: self.positions,
        }
    }

    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        self.config(d_model).validate()
    }
}

/// Configuration of an [`Attention`] layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionConfig {
    pub d_model: usize,
    pub n_heads: usize,
    pub positions: Positions,
}

/// Rotary frequencies `θ_i = 10000^{−2i/K}`, as in RoFormer and GPT-NeoX.
const ROPE_BASE: f64 = 10_000.0;

impl AttentionConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return Err(format!(
                "model.mixer.n_heads must divide d_model = {} (got {})",
                self.d_model, self.n_heads
            ));
        }
        let head = self.d_model / self.n_heads;
        if self.positions == Positions::Rotary && !head.is_multiple_of(2) {
            return Err(format!(
                "rotary positions need an even head size, got {head}"
            ));
        }
        if let Positions::Learned { max_len: 0 } = self.positions {
            return Err("model.mixer.positions.max_len must be at least 1".into());
        }
        Ok(())
    }

    /// PyTorch's `nn.Linear` initialisation for the projections, `N(0, 0.02²)` for learned
    /// positions (GPT-2).
    pub fn init(&self, init: &mut Init) -> Attention {
        let d = self.d_model;
        Attention {
            qkv: init.linear(d, 3 * d, true),
            out: init.linear(d, d, true),
            positions: match self.positions {
                Positions::Learned { max_len } => Some(init.normal([max_len, d], 0.02)),
                Positions::Rotary => None,
            },
            n_heads: self.n_heads,
        }
    }
}

/// One attention layer. Create it with [`AttentionConfig::init`].
#[derive(Module, Debug)]
pub struct Attention {
    /// `[D, 3D]`: queries, keys, values.
    pub qkv: Linear,
    pub out: Linear,
    /// `[max_len, D]` learned positions, or `None` for rotary.
    pub positions: Option<Param<Tensor<2>>>,
    #[module(skip)]
    pub n_heads: usize,
}

/// Every key (rotated, under rotary positions) and value seen so far, `[B, S, H, K]` each:
/// token-major, as the projections make them.
#[derive(Clone, Debug)]
pub struct KvCache {
    pub k: Tensor<4>,
    pub v: Tensor<4>,
}

impl KvCache {
    pub fn len(&self) -> usize {
        self.k.dims()[1]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Attention {
    fn d_model(&self) -> usize {
        self.out.weight.lazy_shape()[0]
    }

    /// Floats of cache per sequence after `seq_len` tokens: keys and values.
    pub fn state_size(&self, seq_len: usize) -> usize {
        2 * seq_len * self.d_model()
    }

    /// FLOPs per token of the scores and the weighted sum at length `T`: a query meets
    /// `(T + 1) / 2` keys on average under the causal mask, with `2 D` for `q·k` and `2 D` for
    /// the sum over `v`.
    pub fn score_flops_per_token(&self, seq_len: usize) -> f64 {
        2.0 * self.d_model() as f64 * (seq_len + 1) as f64
    }

    /// `x [B, T, D]` (`T ≥ 1`) after the tokens in `cache` → `[B, T, D]` and the cache with
    /// these `T` tokens appended.
    pub fn forward(&self, x: Tensor<3>, cache: Option<KvCache>) -> (Tensor<3>, KvCache) {
        let fused = fused::has_kernel(&x.device());
        self.forward_with(x, cache, fused)
    }

    /// [`Attention::forward`] through the fused op (`fused`, CPU backends only) or through the
    /// definition [`attend`].
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        cache: Option<KvCache>,
        fused: bool,
    ) -> (Tensor<3>, KvCache) {
        let [b, t, d] = x.dims();
        let (h, head) = (self.n_heads, d / self.n_heads);
        let offset = cache.as_ref().map_or(0, KvCache::len);
        let device = x.device();
        let x = match &self.positions {
            Some(table) => {
                let max_len = table.dims()[0];
                assert!(
                    offset + t <= max_len,
                    "position {} is beyond the {max_len} learned positions",
                    offset + t - 1
                );
                x + table.val().narrow(0, offset, t).unsqueeze_dim(0)
            }
            None => x,
        };
        let split = |z: Tensor<3>| z.reshape([b, t, h, head]); // [B, T, H, K]
        let [q, k, v] = split_linear(&self.qkv, x, [d; 3]);
        let (q, k) = match (&self.positions, fused) {
            (Some(_), _) => (q, k),
            (None, true) => (fused::rope(q, head, offset), fused::rope(k, head, offset)),
            (None, false) => {
                let (cos, sin) = rope_tables(offset, t, head, &device);
                let turn = |z| rotate(split(z), cos.clone(), sin.clone()).reshape([b, t, d]);
                (turn(q), turn(k))
            }
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let cache = match cache {
            Some(c) => KvCache {
                k: Tensor::cat(vec![c.k, k], 1),
                v: Tensor::cat(vec![c.v, v], 1),
            },
            None => KvCache { k, v },
        };
        let o = if fused {
            let s = cache.len();
            let tokens = |z: Tensor<4>, len| z.reshape([b, len, d]);
            fused::causal_attention(
                tokens(q, t),
                tokens(cache.k.clone(), s),
                tokens(cache.v.clone(), s),
                h,
            )
        } else {
            let heads = |z: Tensor<4>| z.swap_dims(1, 2); // [B, H, ·, K]
            attend(heads(q), heads(cache.k.clone()), heads(cache.v.clone()))
                .swap_dims(1, 2)
                .reshape([b, t, d])
        };
        (project(&self.out, o), cache)
    }

    /// One token: `x_t [B, D]` → `[B, D]` and the cache with it appended.
    pub fn step(&self, x_t: Tensor<2>, cache: Option<KvCache>) -> (Tensor<2>, KvCache) {
        let (y, cache) = self.forward(x_t.unsqueeze_dim(1), cache);
        (y.squeeze_dim(1), cache)
    }
}

/// The definition: `softmax(q kᵀ / √K + causal mask) v` for `q [B, H, T, K]` after `S − T` cached
/// keys, `k, v [B, H, S, K]` → `[B, H, T, K]`. Query `i` (position `S − T + i`) sees keys
/// `0..=S − T + i`. The CPU backends run [`fused::causal_attention`] instead, which never holds
/// the `[T, S]` scores.
pub fn attend(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [_, _, t, head] = q.dims();
    let s = k.dims()[2];
    let mask = mask::causal(t, s, s - t, Visible::UpTo, f32::NEG_INFINITY, &q.device())
        .reshape([1, 1, t, s]);
    let scores = q.matmul(k.swap_dims(2, 3)) / (head as f64).sqrt() + mask;
    softmax(scores, 3).matmul(v)
}

/// `cos` and `sin` of `(offset + t)·θ_i` for `t < len` and `i < half`, each `[len, half]`:
/// the angles of both forms, the tensor ops' [`rope_tables`] and the fused op's.
pub(crate) fn rope_cos_sin(offset: usize, len: usize, half: usize) -> (Vec<f32>, Vec<f32>) {
    let head = 2 * half;
    let (mut cos, mut sin) = (
        Vec::with_capacity(len * half),
        Vec::with_capacity(len * half),
    );
    let theta: Vec<f64> = (0..half)
        .map(|i| ROPE_BASE.powf(-2.0 * i as f64 / head as f64))
        .collect();
    for t in 0..len {
        for th in &theta {
            let angle = (offset + t) as f64 * th;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// [`rope_cos_sin`] laid out `[1, len, 1, K]` (each half's angles twice, broadcast over batch
/// and heads of `[B, T, H, K]`) for the half-split rotation.
pub(crate) fn rope_tables(
    offset: usize,
    len: usize,
    head: usize,
    device: &Device,
) -> (Tensor<4>, Tensor<4>) {
    let half = head / 2;
    let (cos, sin) = rope_cos_sin(offset, len, half);
    let table = |values: Vec<f32>| {
        let doubled: Vec<f32> = values
            .chunks_exact(half)
            .flat_map(|row| row.iter().chain(row).copied())
            .collect();
        Tensor::from_data(TensorData::new(doubled, [1, len, 1, head]), device)
    };
    (table(cos), table(sin))
}

/// `x cos + rotate_half(x) sin`, with `rotate_half([x₁, x₂]) = [−x₂, x₁]` over the last axis.
pub(crate) fn rotate(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let half = x.dims()[3] / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![-x2, x1], 3);
    x * cos + rotated * sin
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::device;
    use burn::tensor::Distribution;

    fn layer(positions: Positions) -> Attention {
        AttentionConfig {
            d_model: 8,
            n_heads: 2,
            positions,
        }
        .init(&mut Init::new(8, &device()))
    }

    /// Changing a later token never changes an earlier output.
    #[test]
    fn causal() {
        for positions in [Positions::Rotary, Positions::Learned { max_len: 16 }] {
            let attn = layer(positions);
            let x = Tensor::<3>::random([1, 6, 8], Distribution::Normal(0.0, 1.0), &device());
            let changed = x
                .clone()
                .slice_assign([0..1, 4..5, 0..8], Tensor::ones([1, 1, 8], &device()));
            let (a, _) = attn.forward(x, None);
            let (b, _) = attn.forward(changed, None);
            let diff: f32 = (a.clone().narrow(1, 0, 4) - b.clone().narrow(1, 0, 4))
                .abs()
                .max()
                .into_scalar();
            assert_eq!(diff, 0.0, "{positions:?}");
            let diff: f32 = (a.narrow(1, 4, 1) - b.narrow(1, 4, 1))
                .abs()
                .max()
                .into_scalar();
            assert!(diff > 1e-4, "{positions:?}: the changed token matters");
        }
    }

    /// One query, one key: softmax over a single score is 1, so the output is `W_o v + b_o`
    /// whatever the positions.
    #[test]
    fn single_token_returns_its_value() {
        let attn = layer(Positions::Rotary);
        let x = Tensor::<3>::random([2, 1, 8], Distribution::Normal(0.0, 1.0), &device());
        let (y, cache) = attn.forward(x.clone(), None);
        let v = attn.qkv.forward(x).narrow(2, 16, 8);
        let diff: f32 = (y - attn.out.forward(v)).abs().max().into_scalar();
        assert!(diff < 1e-6);
        assert_eq!(cache.len(), 1);
        assert_eq!(attn.state_size(10), 160);
    }

    /// Rotary scores depend only on the distance between query and key.
    #[test]
    fn rotary_is_relative() {
        let dev = device();
        let q = Tensor::<4>::random([1, 1, 1, 4], Distribution::Normal(0.0, 1.0), &dev);
        let k = Tensor::<4>::random([1, 1, 1, 4], Distribution::Normal(0.0, 1.0), &dev);
        let score = |pq: usize, pk: usize| {
            let (cq, sq) = rope_tables(pq, 1, 4, &dev);
            let (ck, sk) = rope_tables(pk, 1, 4, &dev);
            let s: f32 = (rotate(q.clone(), cq, sq) * rotate(k.clone(), ck, sk))
                .sum()
                .into_scalar();
            s
        };
        assert!((score(7, 3) - score(104, 100)).abs() < 1e-4);
        assert!((score(7, 3) - score(7, 5)).abs() > 1e-4);
    }
}
