//! RWKV (Peng et al. 2023): a complete block of token-shifted time-mix and channel-mix, with
//! its own pre-norms and residuals, in two versions selected by `version`.
//!
//! ```text
//! block:        x = x + TimeMix(LN₁ x);   x = x + ChannelMix(LN₂ x)
//! token shift:  x'_t = x_{t−1} (carried across calls),  mix(μ) = μ ⊙ x_t + (1 − μ) ⊙ x'_t
//! channel mix:  r = σ(W_r mix(μ_r)),  k = relu(W_k mix(μ_k))²,  out = r ⊙ W_v k      hidden 4·D
//! ```
//!
//! **RWKV-4** time mix, per channel, with decay `w = exp(time_decay) > 0` and bonus `u`:
//! ```text
//! k, v = W_k mix(μ_k), W_v mix(μ_v);   r = σ(W_r mix(μ_r))
//! wkv_t = (Σ_{i<t} e^{−(t−1−i)w + k_i} v_i + e^{u + k_t} v_t) / (Σ_{i<t} e^{−(t−1−i)w + k_i} + e^{u + k_t})
//! out   = W_o (r ⊙ wkv)
//! ```
//! The sequential form keeps the sums as `(a, b)` scaled by `e^{−p}` with `p` the running
//! maximum exponent, as the official CUDA kernel does, so it cannot overflow; the chunked form
//! computes each chunk as a masked, max-subtracted weighted average (the quadratic definition)
//! seeded with the carried `(a, b, p)`.
//!
//! **RWKV-6** (Finch, Peng et al. 2024) time mix, `H` heads of size `K = D / H`, matrix state
//! `S ∈ ℝ^{K×K}` per head, data-dependent token shift (ddlerp) and decay:
//! ```text
//! mix_*(x) = x + (x' − x) ⊙ (μ_* + lora_*(x + (x' − x) ⊙ μ_x))          * ∈ {w, k, v, r, g}
//! w_t = exp(−exp(w₀ + lora_w(mix_w)))   r, k, v = W mix_*;  g = SiLU(W_g mix_g)
//! o_t = r_t (S_{t−1} + diag(u) k_tᵀ v_t);   S_t = diag(w_t) S_{t−1} + k_tᵀ v_t
//! out = W_o (GroupNorm_H(o) ⊙ g)
//! ```
//! following fla's `naive_recurrent_rwkv6` and BlinkDL's RWKV-LM v6 model.

use burn::module::{Module, Param};
use burn::nn::{LayerNorm, Linear};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::fused::{self, Activation};
use crate::init::Init;
use crate::mask::{self, Visible};
use crate::norm::{layer_norm, layer_norm_module};
use crate::projection::project;
use crate::scan::{Compute, Form, Scan};
use crate::time::unbind;

/// Which RWKV, each version with the fields it alone has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// RWKV-4: per-channel decay, the running-max WKV.
    V4,
    /// RWKV-6 (Finch): heads of `head_size` (`min(64, D)` when `None`; the official models use
    /// 64) with a matrix state, and token-shift and decay LoRAs of rank `lora_rank` (official:
    /// 32 and 64).
    V6 {
        head_size: Option<usize>,
        lora_rank: usize,
    },
}

/// `[model.mixer]` with `kind = "rwkv"`: `version = 4 | 6`, `ffn_expand`, the WKV's form `wkv`,
/// and for version 6 `head_size` and `lora_rank`. Its width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RwkvTable", into = "RwkvTable")]
pub struct RwkvSpec {
    pub version: Version,
    /// Channel-mix hidden width as a multiple of `D` (RWKV uses 4; v6 uses 3.5 rounded).
    pub ffn_expand: usize,
    /// How the WKV is computed (a fused kernel for both versions on the CPU backends).
    pub wkv: Form,
}

impl Default for RwkvSpec {
    fn default() -> Self {
        Self {
            version: Version::V4,
            ffn_expand: 4,
            wkv: Form::Auto,
        }
    }
}

/// RWKV-6's default LoRA rank.
const LORA_RANK: usize = 32;

/// [`RwkvSpec`] as written in TOML: one flat table whose `version` says which other fields
/// may appear.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RwkvTable {
    #[serde(default = "four")]
    version: u8,
    #[serde(default = "four_usize")]
    ffn_expand: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    head_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lora_rank: Option<usize>,
    #[serde(default)]
    wkv: Form,
}

fn four() -> u8 {
    4
}

fn four_usize() -> usize {
    4
}

impl TryFrom<RwkvTable> for RwkvSpec {
    type Error = String;

    fn try_from(t: RwkvTable) -> Result<Self, String> {
        let version = match t.version {
            4 if t.head_size.is_some() || t.lora_rank.is_some() => {
                return Err(
                    "head_size and lora_rank are RWKV-6 fields; version 4 has neither".into(),
                );
            }
            4 => Version::V4,
            6 => Version::V6 {
                head_size: t.head_size,
                lora_rank: t.lora_rank.unwrap_or(LORA_RANK),
            },
            v => return Err(format!("version must be 4 or 6, got {v}")),
        };
        Ok(Self {
            version,
            ffn_expand: t.ffn_expand,
            wkv: t.wkv,
        })
    }
}

impl From<RwkvSpec> for RwkvTable {
    fn from(s: RwkvSpec) -> Self {
        let (version, head_size, lora_rank) = match s.version {
            Version::V4 => (4, None, None),
            Version::V6 {
                head_size,
                lora_rank,
            } => (6, head_size, Some(lora_rank)),
        };
        Self {
            version,
            ffn_expand: s.ffn_expand,
            head_size,
            lora_rank,
            wkv: s.wkv,
        }
    }
}

impl RwkvSpec {
    pub fn config(&self, d_model: usize) -> RwkvConfig {
        RwkvConfig {
            d_model,
            version: self.version,
            ffn_expand: self.ffn_expand,
            wkv: self.wkv,
        }
    }

    pub fn validate(&self, d_model: usize) -> Result<(), String> {
        self.config(d_model).validate()
    }
}

/// Configuration of an [`Rwkv`] block.
#[derive(Clone, Debug, PartialEq)]
pub struct RwkvConfig {
    pub d_model: usize,
    pub version: Version,
    /// Channel-mix hidden width as a multiple of `d_model`.
    pub ffn_expand: usize,
    pub wkv: Form,
}

/// Channel mix, shared by both versions.
#[derive(Module, Debug)]
pub struct ChannelMix {
    pub mix_k: Param<Tensor<1>>,
    pub mix_r: Param<Tensor<1>>,
    pub key: Linear,
    pub value: Linear,
    pub receptance: Linear,
}

/// RWKV-4 time mix.
#[derive(Module, Debug)]
pub struct TimeMix4 {
    /// `w = exp(time_decay)`.
    pub time_decay: Param<Tensor<1>>,
    /// `u`.
    pub time_first: Param<Tensor<1>>,
    pub mix_k: Param<Tensor<1>>,
    pub mix_v: Param<Tensor<1>>,
    pub mix_r: Param<Tensor<1>>,
    pub key: Linear,
    pub value: Linear,
    pub receptance: Linear,
    pub output: Linear,
}

/// RWKV-6 time mix.
#[derive(Module, Debug)]
pub struct TimeMix6 {
    /// `μ_x`, and `μ_w, μ_k, μ_v, μ_r, μ_g` as `[5, D]`.
    pub maa_x: Param<Tensor<1>>,
    pub maa: Param<Tensor<2>>,
    /// ddlerp LoRA (tanh between): `[D, 5·R]` then five `[R, D]` stacked as `[5, R, D]`.
    pub maa_w1: Param<Tensor<2>>,
    pub maa_w2: Param<Tensor<3>>,
    /// `w₀ [D]` and the decay LoRA (tanh between) `[D, 2R]`, `[2R, D]`.
    pub decay: Param<Tensor<1>>,
    pub decay_w1: Param<Tensor<2>>,
    pub decay_w2: Param<Tensor<2>>,
    /// `u`, `[D]` (per head and channel).
    pub faaaa: Param<Tensor<1>>,
    pub receptance: Linear,
    pub key: Linear,
    pub value: Linear,
    pub gate: Linear,
    pub output: Linear,
    /// GroupNorm over each head.
    pub ln_x_weight: Param<Tensor<1>>,
    pub ln_x_bias: Param<Tensor<1>>,
    #[module(skip)]
    pub head_size: usize,
}

#[derive(Module, Debug)]
pub enum TimeMix {
    V4(TimeMix4),
    V6(TimeMix6),
}

/// One RWKV block. Create it with [`RwkvConfig::init`].
#[derive(Module, Debug)]
pub struct Rwkv {
    pub ln1: LayerNorm,
    pub time_mix: TimeMix,
    pub ln2: LayerNorm,
    pub channel_mix: ChannelMix,
    #[module(skip)]
    pub wkv: Form,
}

/// The WKV state of one RWKV-4 layer, each `[B, D]`: numerator `a` and denominator `b`, both
/// scaled by `e^{−p}`.
#[derive(Clone, Debug)]
pub struct Wkv4State {
    pub a: Tensor<2>,
    pub b: Tensor<2>,
    pub p: Tensor<2>,
}

#[derive(Clone, Debug)]
pub enum WkvState {
    V4(Wkv4State),
    /// `[B, H, K, K]`.
    V6(Tensor<4>),
}

/// The state of an RWKV block between calls.
#[derive(Clone, Debug)]
pub struct RwkvState {
    /// The last `LN₁ x` of the time mix, `[B, D]` (its token shift).
    pub shift_time: Tensor<2>,
    pub wkv: WkvState,
    /// The last `LN₂ x` of the channel mix, `[B, D]`.
    pub shift_channel: Tensor<2>,
}

/// `−∞` in exponents: exp of it is exactly 0 and it loses every max.
const NEG_BIG: f32 = -1e38;

impl RwkvConfig {
    /// RWKV-4 or RWKV-6 at width `d_model` with the usual sizes: channel mix ×4, head size 64
    /// (or `d_model` if smaller), LoRA rank 32, the WKV's form chosen by the backend.
    pub fn new(d_model: usize, version: Version) -> Self {
        RwkvSpec {
            version,
            ..RwkvSpec::default()
        }
        .config(d_model)
    }

    /// RWKV-6 at width `d_model` with the usual sizes.
    pub fn v6(d_model: usize) -> Self {
        Self::new(
            d_model,
            Version::V6 {
                head_size: None,
                lora_rank: LORA_RANK,
            },
        )
    }

    /// RWKV-6's head size at this width.
    pub fn head_size(&self) -> Option<usize> {
        match self.version {
            Version::V4 => None,
            Version::V6 { head_size, .. } => Some(head_size.unwrap_or(64.min(self.d_model))),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.ffn_expand == 0 {
            return Err("model.mixer.ffn_expand must be at least 1".into());
        }
        if let Version::V6 { lora_rank, .. } = self.version {
            let head_size = self.head_size().unwrap_or(0);
            if head_size == 0 || !self.d_model.is_multiple_of(head_size) {
                return Err(format!(
                    "model.mixer.head_size must divide d_model = {} (got {head_size})",
                    self.d_model
                ));
            }
            if lora_rank == 0 {
                return Err("model.mixer.lora_rank must be at least 1".into());
            }
        }
        self.wkv
            .validate()
            .map_err(|e| format!("model.mixer.wkv.{e}"))
    }

    /// Layer-0 initialisation in the spirit of the official models: decay ramps from slow to
    /// fast across channels, token-shift mixes ramp from 0 to 1, PyTorch's defaults for the
    /// projections (RWKV-4 as in `torch_baseline.py`, so the two can be compared weight for
    /// weight).
    pub fn init(&self, init: &mut Init) -> Rwkv {
        let d = self.d_model;
        let device = init.device().clone();
        let ramp: Vec<f32> = (0..d).map(|i| i as f32 / (d.max(2) - 1) as f32).collect();
        let vector = |init: &mut Init, f: &dyn Fn(f32) -> f32| {
            init.param(ramp.iter().map(|&r| f(r)).collect(), [d])
        };
        let hidden = self.ffn_expand * d;
        let channel_mix = ChannelMix {
            mix_k: vector(init, &|r| r),
            mix_r: vector(init, &|r| r),
            key: init.linear(d, hidden, false),
            value: init.linear(hidden, d, false),
            receptance: init.linear(d, d, false),
        };
        let time_mix = if self.version == Version::V4 {
            TimeMix::V4(TimeMix4 {
                time_decay: vector(init, &|r| -5.0 + 8.0 * r),
                time_first: vector(init, &|_| 0.3f32.ln()),
                mix_k: vector(init, &|r| r),
                mix_v: vector(init, &|r| r),
                mix_r: vector(init, &|r| r),
                key: init.linear(d, d, false),
                value: init.linear(d, d, false),
                receptance: init.linear(d, d, false),
                output: init.linear(d, d, false),
            })
        } else {
            let Version::V6 {
                lora_rank: rank, ..
            } = self.version
            else {
                unreachable!("the other branch is RWKV-4")
            };
            let k = self.head_size().expect("RWKV-6 has heads");
            TimeMix::V6(TimeMix6 {
                maa_x: vector(init, &|r| 1.0 - r),
                maa: init.param(
                    (0..5).flat_map(|_| ramp.iter().map(|&r| 1.0 - r)).collect(),
                    [5, d],
                ),
                maa_w1: init.constant([d, 5 * rank], 0.0),
                maa_w2: init.uniform([5, rank, d], 0.01),
                decay: vector(init, &|r| -6.0 + 5.0 * r.powf(0.7 + 1.3 * r)),
                decay_w1: init.constant([d, 2 * rank], 0.0),
                decay_w2: init.uniform([2 * rank, d], 0.01),
                faaaa: init.param(
                    (0..d)
                        .map(|i| ramp[i] * (1.0 - (i % k) as f32 / k as f32) + 0.1)
                        .collect(),
                    [d],
                ),
                receptance: init.linear(d, d, false),
                key: init.linear(d, d, false),
                value: init.linear(d, d, false),
                gate: init.linear(d, d, false),
                output: init.linear(d, d, false),
                ln_x_weight: init.constant([d], 1.0),
                ln_x_bias: init.constant([d], 0.0),
                head_size: k,
            })
        };
        Rwkv {
            ln1: layer_norm_module(d, &device),
            time_mix,
            ln2: layer_norm_module(d, &device),
            channel_mix,
            wkv: self.wkv,
        }
    }
}

/// `[B, T, D]` shifted one step right, `first [B, D]` in front.
pub(crate) fn token_shift(x: Tensor<3>, first: Tensor<2>) -> Tensor<3> {
    match x.dims()[1] {
        1 => first.unsqueeze_dim(1),
        t => Tensor::cat(vec![first.unsqueeze_dim(1), x.narrow(1, 0, t - 1)], 1),
    }
}

/// `μ ⊙ x + (1 − μ) ⊙ x'` with `μ [D]`.
pub(crate) fn lerp(x: Tensor<3>, shifted: Tensor<3>, mu: Tensor<1>) -> Tensor<3> {
    let mu = mu.unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0);
    shifted.clone() + (x - shifted) * mu
}

/// The input of a block's mixes: `x [B, T, D]` and the token before it `[B, D]`; every mix
/// `act(W lerp(x, x', μ))` of it is either the definition's tensor ops (with `x'` built once)
/// or one fused op ([`fused::shift_mix_linear`]).
struct Mixes {
    x: Tensor<3>,
    first: Tensor<2>,
    /// `x'`, for the tensor ops; `None` when the mixes are fused.
    shifted: Option<Tensor<3>>,
}

impl Mixes {
    fn new(x: Tensor<3>, first: Tensor<2>, fused: bool) -> Self {
        let shifted = (!fused).then(|| token_shift(x.clone(), first.clone()));
        Self { x, first, shifted }
    }

    fn project(&self, mu: &Param<Tensor<1>>, layer: &Linear, act: Activation) -> Tensor<3> {
        let Some(shifted) = &self.shifted else {
            assert!(layer.bias.is_none(), "RWKV's projections have no bias");
            return fused::shift_mix_linear(
                self.x.clone(),
                self.first.clone(),
                mu.val(),
                layer.weight.val(),
                act,
            );
        };
        act.apply(layer.forward(lerp(self.x.clone(), shifted.clone(), mu.val())))
    }
}

pub(crate) fn last(x: &Tensor<3>) -> Tensor<2> {
    let t = x.dims()[1];
    x.clone().narrow(1, t - 1, 1).squeeze_dim(1)
}

impl ChannelMix {
    /// `x [B, T, D]` (already normed) and the token before it → the channel mix's output and
    /// the last token; with `fused`, each mix is one op.
    fn forward(&self, x: Tensor<3>, shift: Tensor<2>, fused: bool) -> (Tensor<3>, Tensor<2>) {
        let next = last(&x);
        let mixes = Mixes::new(x, shift, fused);
        let k = mixes.project(&self.mix_k, &self.key, Activation::ReluSquared);
        let r = mixes.project(&self.mix_r, &self.receptance, Activation::Sigmoid);
        (r * self.value.forward(k), next)
    }
}

impl TimeMix4 {
    /// `x [B, T, D]` (already normed), the token before it `shift [B, D]` and the WKV state →
    /// the time mix's output, the last token (the next shift) and the WKV state after it.
    pub fn forward(
        &self,
        x: Tensor<3>,
        shift: Tensor<2>,
        state: Wkv4State,
        compute: Compute,
    ) -> (Tensor<3>, Tensor<2>, Wkv4State) {
        let next = last(&x);
        // The mixes' fused op is a host kernel; a GPU runs only the WKV as one.
        let host = compute == Compute::Fused && fused::has_kernel(&x.device());
        let mixes = Mixes::new(x, shift, host);
        let k = mixes.project(&self.mix_k, &self.key, Activation::Identity);
        let v = mixes.project(&self.mix_v, &self.value, Activation::Identity);
        let r = mixes.project(&self.mix_r, &self.receptance, Activation::Sigmoid);
        let w = self.time_decay.val().exp();
        let u = self.time_first.val();
        let (wkv, state) = match compute {
            Compute::Tensor(Scan::Sequential) => wkv4_sequential(w, u, k, v, state),
            Compute::Tensor(Scan::Chunked { chunk_len }) => {
                wkv4_chunked(w, u, k, v, state, chunk_len)
            }
            Compute::Fused => {
                let [batch, t, d] = k.dims();
                let Wkv4State { a, b, p } = state;
                let out = fused::wkv4(w, u, k, v, a, b, p);
                let y = out.clone().narrow(1, 0, t * d).reshape([batch, t, d]);
                let part = |i| out.clone().narrow(1, t * d + i * d, d);
                let state = Wkv4State {
                    a: part(0),
                    b: part(1),
                    p: part(2),
                };
                (y, state)
            }
        };
        (project(&self.output, r * wkv), next, state)
    }
}

/// The official kernel's loop. `w, u [D]`, `k, v [B, T, D]`.
pub fn wkv4_sequential(
    w: Tensor<1>,
    u: Tensor<1>,
    k: Tensor<3>,
    v: Tensor<3>,
    state: Wkv4State,
) -> (Tensor<3>, Wkv4State) {
    let (w, u) = (w.unsqueeze_dim::<2>(0), u.unsqueeze_dim::<2>(0));
    let Wkv4State {
        mut a,
        mut b,
        mut p,
    } = state;
    let mut out = Vec::with_capacity(k.dims()[1]);
    for (k_t, v_t) in unbind::<3, 2>(k, 1).into_iter().zip(unbind(v, 1)) {
        let uk = u.clone() + k_t.clone();
        let q = p.clone().max_pair(uk.clone());
        let (e1, e2) = ((p.clone() - q.clone()).exp(), (uk - q).exp());
        out.push((e1.clone() * a.clone() + e2.clone() * v_t.clone()) / (e1 * b.clone() + e2));
        let decayed = p - w.clone();
        let q = decayed.clone().max_pair(k_t.clone());
        let (e1, e2) = ((decayed - q.clone()).exp(), (k_t - q.clone()).exp());
        a = e1.clone() * a + e2.clone() * v_t;
        b = e1 * b + e2;
        p = q;
    }
    (Tensor::stack(out, 1), Wkv4State { a, b, p })
}

/// Chunks of the quadratic definition, each seeded by the carried `(a, b, p)`.
pub fn wkv4_chunked(
    w: Tensor<1>,
    u: Tensor<1>,
    k: Tensor<3>,
    v: Tensor<3>,
    state: Wkv4State,
    chunk_len: usize,
) -> (Tensor<3>, Wkv4State) {
    let t = k.dims()[1];
    let device = k.device();
    let w4 = w
        .clone()
        .unsqueeze_dim::<2>(0)
        .unsqueeze_dim::<3>(0)
        .unsqueeze_dim::<4>(0); // [1,1,1,D]
    let u3 = u.unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0); // [1,1,D]
    let Wkv4State {
        mut a,
        mut b,
        mut p,
    } = state;
    let mut out = Vec::with_capacity(t.div_ceil(chunk_len));
    for start in (0..t).step_by(chunk_len) {
        let len = chunk_len.min(t - start);
        let (kc, vc) = (
            k.clone().narrow(1, start, len),
            v.clone().narrow(1, start, len),
        );
        // Exponent of token i at output t: −(t−1−i)w + k_i for i < t, u + k_t at i = t.
        let lag: Vec<f32> = (0..len * len)
            .map(|n| {
                let (row, col) = (n / len, n % len);
                if col < row {
                    (row - 1 - col) as f32
                } else {
                    0.0
                }
            })
            .collect();
        let lag = Tensor::<4>::from_data(TensorData::new(lag, [1, len, len, 1]), &device);
        let causal =
            mask::causal(len, len, 0, Visible::Before, NEG_BIG, &device).reshape([1, len, len, 1]);
        let scores = kc.clone().unsqueeze_dim::<4>(1) - lag * w4.clone() + causal; // [B, t, i, D], i < t
        let diagonal = u3.clone() + kc.clone(); // [B, t, D]
        // Carried state at output t: exponent p − (t − start)·w.
        let steps: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let steps = Tensor::<3>::from_data(TensorData::new(steps, [1, len, 1]), &device);
        let carried = p.clone().unsqueeze_dim::<3>(1)
            - steps * w.clone().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0);
        let m = scores
            .clone()
            .max_dim(2)
            .squeeze_dim::<3>(2)
            .max_pair(diagonal.clone())
            .max_pair(carried.clone());
        let weights = (scores - m.clone().unsqueeze_dim::<4>(2)).exp(); // [B, t, i, D]
        let e_diag = (diagonal - m.clone()).exp();
        let e_carry = (carried - m).exp();
        let numerator = (weights.clone() * vc.clone().unsqueeze_dim::<4>(1))
            .sum_dim(2)
            .squeeze_dim::<3>(2)
            + e_diag.clone() * vc.clone()
            + e_carry.clone() * a.clone().unsqueeze_dim(1);
        let denominator =
            weights.sum_dim(2).squeeze_dim::<3>(2) + e_diag + e_carry * b.clone().unsqueeze_dim(1);
        out.push(numerator / denominator);

        // State after the chunk: S = e^{−len·w} S_carried + Σ_i e^{−(len−1−i)w + k_i} v_i.
        let back: Vec<f32> = (0..len).map(|i| (len - 1 - i) as f32).collect();
        let back = Tensor::<3>::from_data(TensorData::new(back, [1, len, 1]), &device);
        let exps = kc - back * w.clone().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0); // [B, len, D]
        let carried_end = p - w.clone().unsqueeze_dim::<2>(0) * len as f32;
        let q = exps
            .clone()
            .max_dim(1)
            .squeeze_dim::<2>(1)
            .max_pair(carried_end.clone());
        let e = (exps - q.clone().unsqueeze_dim(1)).exp();
        let e_c = (carried_end - q.clone()).exp();
        a = (e.clone() * vc).sum_dim(1).squeeze_dim(1) + e_c.clone() * a;
        b = e.sum_dim(1).squeeze_dim(1) + e_c * b;
        p = q;
    }
    (Tensor::cat(out, 1), Wkv4State { a, b, p })
}

impl TimeMix6 {
    fn heads(&self, x: Tensor<3>) -> Tensor<4> {
        let [b, t, d] = x.dims();
        x.reshape([b, t, d / self.head_size, self.head_size])
            .swap_dims(1, 2) // [B, H, T, K]
    }

    fn forward(
        &self,
        x: Tensor<3>,
        shift: Tensor<2>,
        state: Tensor<4>,
        compute: Compute,
    ) -> (Tensor<3>, Tensor<2>, Tensor<4>) {
        let d = x.dims()[2];
        let next = last(&x);
        let delta = token_shift(x.clone(), shift) - x.clone(); // x' − x
        let rank = self.maa_w2.dims()[1];
        let xxx = x.clone()
            + delta.clone() * self.maa_x.val().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0);
        let lora = xxx.matmul(self.maa_w1.val().unsqueeze_dim(0)).tanh(); // [B, T, 5R]
        let maa = self.maa.val();
        let w2 = self.maa_w2.val();
        let mixed: Vec<Tensor<3>> = (0..5)
            .map(|i| {
                let m = lora
                    .clone()
                    .narrow(2, i * rank, rank)
                    .matmul(w2.clone().narrow(0, i, 1)); // [B, T, D]
                let mu = maa.clone().narrow(0, i, 1).unsqueeze_dim::<3>(0);
                x.clone() + delta.clone() * (mu + m)
            })
            .collect();
        let [xw, xk, xv, xr, xg]: [Tensor<3>; 5] = mixed.try_into().expect("five mixes");
        let r = self.receptance.forward(xr);
        let k = self.key.forward(xk);
        let v = self.value.forward(xv);
        let g = silu(self.gate.forward(xg));
        let w_raw = self.decay.val().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0)
            + xw.matmul(self.decay_w1.val().unsqueeze_dim(0))
                .tanh()
                .matmul(self.decay_w2.val().unsqueeze_dim(0));
        let log_w = -w_raw.exp(); // log of the decay w_t = exp(−exp(w_raw)), ≤ 0
        let u = self
            .faaaa
            .val()
            .reshape([1, d / self.head_size, 1, self.head_size]);
        let (r, k, v, log_w) = (
            self.heads(r),
            self.heads(k),
            self.heads(v),
            self.heads(log_w),
        );
        let (o, state) = match compute {
            Compute::Fused => wkv6_fused(r, k, v, log_w, u, state),
            Compute::Tensor(form) => wkv6(r, k, v, log_w, u, state, form),
        };
        let o = self.group_norm(o); // [B, H, T, K] → [B, T, D]
        (project(&self.output, o * g), next, state)
    }

    /// GroupNorm with one group per head (eps as in RWKV-6: 1e-5 · 8²).
    fn group_norm(&self, o: Tensor<4>) -> Tensor<3> {
        crate::norm::per_head(o, 64e-5)
            * self
                .ln_x_weight
                .val()
                .unsqueeze_dim::<2>(0)
                .unsqueeze_dim::<3>(0)
            + self
                .ln_x_bias
                .val()
                .unsqueeze_dim::<2>(0)
                .unsqueeze_dim::<3>(0)
    }
}

/// RWKV-6's WKV over heads: `r, k, v, log_w [B, H, T, K]`, `u [1, H, 1, K]`, `S [B, H, K, K]`
/// (key × value) → `o [B, H, T, K]` and the final `S`.
pub fn wkv6(
    r: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    log_w: Tensor<4>,
    u: Tensor<4>,
    state: Tensor<4>,
    form: Scan,
) -> (Tensor<4>, Tensor<4>) {
    match form {
        Scan::Sequential => wkv6_sequential(r, k, v, log_w, u, state),
        Scan::Chunked { chunk_len } => wkv6_chunked(r, k, v, log_w, u, state, chunk_len),
    }
}

/// [`wkv6`] as the fused op (`fused::wkv6`): the heads of every sequence as its rows.
fn wkv6_fused(
    r: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    log_w: Tensor<4>,
    u: Tensor<4>,
    state: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, h, t, dk] = r.dims();
    let dv = v.dims()[3];
    let rows = |x: Tensor<4>| {
        let n = x.dims()[3];
        x.reshape([b * h, t, n])
    };
    let u = u
        .reshape([1, h, dk])
        .expand([b, h, dk])
        .reshape([b * h, dk]);
    let out = fused::wkv6(
        rows(r),
        rows(k),
        rows(v),
        rows(log_w),
        u,
        state.reshape([b * h, dk, dv]),
    );
    fused::split_heads(out, [b, h, t, dv], [dk, dv])
}

/// The definition (fla's `naive_recurrent_rwkv6`): `o_t = r_t (S + diag(u) k_tᵀ v_t)`,
/// `S ← diag(w_t) S + k_tᵀ v_t`.
pub(crate) fn wkv6_sequential(
    r: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    log_w: Tensor<4>,
    u: Tensor<4>,
    mut state: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let u = u.squeeze_dim::<3>(2).unsqueeze_dim::<4>(3); // [1, H, K, 1]
    let steps = |x: Tensor<4>| unbind::<4, 3>(x, 2).into_iter(); // [B, H, K] each
    let mut out = Vec::with_capacity(r.dims()[2]);
    let inputs = steps(r).zip(steps(k)).zip(steps(v)).zip(steps(log_w.exp()));
    for (((r_t, k_t), v_t), w_t) in inputs {
        let kv = k_t.unsqueeze_dim::<4>(3) * v_t.unsqueeze_dim::<4>(2); // [B, H, K, V]
        let o_t = (r_t.unsqueeze_dim::<4>(3) * (state.clone() + u.clone() * kv.clone())).sum_dim(2); // [B, H, 1, V]
        out.push(o_t);
        state = state * w_t.unsqueeze_dim::<4>(3) + kv;
    }
    (Tensor::cat(out, 2), state)
}

/// Chunks in closed form with in-chunk cumulative log decays (every exponent `≤ 0`).
fn wkv6_chunked(
    r: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    log_w: Tensor<4>,
    u: Tensor<4>,
    mut state: Tensor<4>,
    chunk_len: usize,
) -> (Tensor<4>, Tensor<4>) {
    let t = r.dims()[2];
    let device = r.device();
    let mut out = Vec::with_capacity(t.div_ceil(chunk_len));
    for start in (0..t).step_by(chunk_len) {
        let len = chunk_len.min(t - start);
        let chunk = |x: &Tensor<4>| x.clone().narrow(2, start, len);
        let (rc, kc, vc, lw) = (chunk(&r), chunk(&k), chunk(&v), chunk(&log_w));
        let cum = lw.clone().cumsum(2); // L_t (inclusive)
        let before = cum.clone() - lw; // L_{t−1} (exclusive)
        // A[t, i] = Σ_K r_t k_i exp(L_{t−1} − L_i) for i < t: [B, H, t, i, K].
        let strict = mask::causal(len, len, 0, Visible::Before, NEG_BIG, &device)
            .reshape([1, 1, len, len, 1]);
        let decay = (before.clone().unsqueeze_dim::<5>(3) - cum.clone().unsqueeze_dim::<5>(2)
            + strict)
            .exp();
        let scores = (decay * rc.clone().unsqueeze_dim::<5>(3) * kc.clone().unsqueeze_dim::<5>(2))
            .sum_dim(4)
            .squeeze_dim::<4>(4); // [B, H, t, i]
        let bonus = (rc.clone() * u.clone() * kc.clone()).sum_dim(3); // [B, H, t, 1]
        let o = scores.matmul(vc.clone())
            + bonus * vc.clone()
            + (rc * before.exp()).matmul(state.clone());
        out.push(o);
        let end = cum.clone().narrow(2, len - 1, 1); // L_end [B, H, 1, K]
        let k_decayed = kc * (end.clone() - cum).exp(); // k_i exp(L_end − L_i)
        state = state * end.swap_dims(2, 3).exp() + k_decayed.swap_dims(2, 3).matmul(vc);
    }
    (Tensor::cat(out, 2), state)
}

impl Rwkv {
    fn d_model(&self) -> usize {
        self.channel_mix.receptance.weight.lazy_shape()[0]
    }

    /// FLOPs per token of the WKV beyond the weights: RWKV-4's running-max update, about 12 per
    /// channel; RWKV-6's matrix state, `diag(w) S + kᵀ v` and `r S` (five per state element).
    pub fn wkv_flops_per_token(&self) -> f64 {
        let d = self.d_model() as f64;
        match &self.time_mix {
            TimeMix::V4(_) => 12.0 * d,
            TimeMix::V6(tm) => 5.0 * d * tm.head_size as f64,
        }
    }

    /// Floats of state per sequence: two token shifts and the WKV state.
    pub fn state_size(&self) -> usize {
        let d = self.d_model();
        match &self.time_mix {
            TimeMix::V4(_) => 2 * d + 3 * d,
            TimeMix::V6(tm) => 2 * d + d * tm.head_size,
        }
    }

    pub fn zero_state(&self, batch: usize, device: &Device) -> RwkvState {
        let d = self.d_model();
        let zeros = || Tensor::<2>::zeros([batch, d], device);
        let wkv = match &self.time_mix {
            TimeMix::V4(_) => WkvState::V4(Wkv4State {
                a: zeros(),
                b: zeros(),
                p: Tensor::full([batch, d], NEG_BIG, device),
            }),
            TimeMix::V6(tm) => WkvState::V6(Tensor::zeros(
                [batch, d / tm.head_size, tm.head_size, tm.head_size],
                device,
            )),
        };
        RwkvState {
            shift_time: zeros(),
            wkv,
            shift_channel: zeros(),
        }
    }

    /// `x [B, T, D]` (`T ≥ 1`) → `[B, T, D]` and the state after the last step.
    ///
    /// RWKV-4 on a backend with the WKV's kernel computes it as one op ([`fused::wkv4`]: the
    /// CPU backends and wgpu) unless [`Rwkv::wkv`] names a tensor form, and on the CPU backends
    /// each token-shift mix with its projection as one op too ([`fused::shift_mix_linear`]);
    /// elsewhere the block runs in tensor ops, the WKV in that form (the sequential one for
    /// `auto`).
    pub fn forward(&self, x: Tensor<3>, state: Option<RwkvState>) -> (Tensor<3>, RwkvState) {
        let op = match &self.time_mix {
            TimeMix::V4(_) => fused::Op::Wkv4,
            TimeMix::V6(tm) => fused::Op::Wkv6 { k: tm.head_size },
        };
        let kernel = fused::runs(op, &x.device(), x.dims()[1]);
        self.run(x, state, self.wkv.resolve(kernel))
    }

    /// As [`Rwkv::forward`], with the WKV built from tensor ops in the given form (the
    /// sequential one is the definition).
    pub fn forward_with(
        &self,
        x: Tensor<3>,
        state: Option<RwkvState>,
        form: Scan,
    ) -> (Tensor<3>, RwkvState) {
        self.run(x, state, Compute::Tensor(form))
    }

    /// The block with the WKV computed as `compute` says (fused: RWKV-4 only).
    fn run(
        &self,
        x: Tensor<3>,
        state: Option<RwkvState>,
        compute: Compute,
    ) -> (Tensor<3>, RwkvState) {
        let [batch, _, _] = x.dims();
        let state = state.unwrap_or_else(|| self.zero_state(batch, &x.device()));
        let normed = layer_norm(&self.ln1, x.clone());
        let (mixed, shift_time, wkv) = match (&self.time_mix, state.wkv) {
            (TimeMix::V4(tm), WkvState::V4(s)) => {
                let (y, shift, s) = tm.forward(normed, state.shift_time, s, compute);
                (y, shift, WkvState::V4(s))
            }
            (TimeMix::V6(tm), WkvState::V6(s)) => {
                let (y, shift, s) = tm.forward(normed, state.shift_time, s, compute);
                (y, shift, WkvState::V6(s))
            }
            _ => panic!("an RWKV block was handed the other version's state"),
        };
        let x = x + mixed;
        let (mixed, shift_channel) = self.channel_mix.forward(
            layer_norm(&self.ln2, x.clone()),
            state.shift_channel,
            compute == Compute::Fused && fused::has_kernel(&x.device()),
        );
        (
            x + mixed,
            RwkvState {
                shift_time,
                wkv,
                shift_channel,
            },
        )
    }

    /// One token: `x_t [B, D]` → `[B, D]` and the next state.
    pub fn step(&self, x_t: Tensor<2>, state: Option<RwkvState>) -> (Tensor<2>, RwkvState) {
        let (y, state) = self.forward_with(x_t.unsqueeze_dim(1), state, Scan::Sequential);
        (y.squeeze_dim(1), state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;

    fn random<const D: usize>(shape: [usize; D], std: f64) -> Tensor<D> {
        Tensor::random(shape, Distribution::Normal(0.0, std), &device())
    }

    fn zero4(batch: usize, d: usize) -> Wkv4State {
        Wkv4State {
            a: Tensor::zeros([batch, d], &device()),
            b: Tensor::zeros([batch, d], &device()),
            p: Tensor::full([batch, d], NEG_BIG, &device()),
        }
    }

    /// The running-max loop equals the quadratic definition written out term by term.
    #[test]
    fn wkv4_loop_is_the_definition() {
        let (batch, t, d) = (2, 9, 3);
        let w = random([d], 1.0).exp();
        let u = random([d], 1.0);
        let k = random([batch, t, d], 2.0);
        let v = random([batch, t, d], 1.0);
        let (fast, _) =
            wkv4_sequential(w.clone(), u.clone(), k.clone(), v.clone(), zero4(batch, d));
        let (w, u): (Vec<f32>, Vec<f32>) = (
            w.to_data().try_to_vec::<f32>().unwrap(),
            u.to_data().try_to_vec::<f32>().unwrap(),
        );
        let (k, v): (Vec<f32>, Vec<f32>) = (
            k.to_data().try_to_vec::<f32>().unwrap(),
            v.to_data().try_to_vec::<f32>().unwrap(),
        );
        let fast: Vec<f32> = fast.to_data().try_to_vec::<f32>().unwrap();
        for bi in 0..batch {
            for ti in 0..t {
                for c in 0..d {
                    let at = |i: usize| (bi * t + i) * d + c;
                    let (mut num, mut den) = (0.0f64, 0.0f64);
                    for i in 0..ti {
                        let e = (-((ti - 1 - i) as f64) * w[c] as f64 + k[at(i)] as f64).exp();
                        num += e * v[at(i)] as f64;
                        den += e;
                    }
                    let e = (u[c] as f64 + k[at(ti)] as f64).exp();
                    let expected = (num + e * v[at(ti)] as f64) / (den + e);
                    assert!(
                        (fast[at(ti)] as f64 - expected).abs() < 1e-5,
                        "b {bi} t {ti} c {c}"
                    );
                }
            }
        }
    }

    /// Keys far beyond exp's range in f32 (e^200) neither overflow nor lose the average.
    #[test]
    fn wkv4_survives_huge_keys() {
        let k = Tensor::<3>::from_floats([[[200.0], [0.0], [-200.0]]], &device());
        let v = Tensor::<3>::from_floats([[[1.0], [5.0], [9.0]]], &device());
        let w = Tensor::<1>::from_floats([0.5], &device());
        let u = Tensor::<1>::from_floats([0.0], &device());
        for form in [Scan::Sequential, Scan::Chunked { chunk_len: 2 }] {
            let (y, _) = match form {
                Scan::Sequential => {
                    wkv4_sequential(w.clone(), u.clone(), k.clone(), v.clone(), zero4(1, 1))
                }
                Scan::Chunked { chunk_len } => wkv4_chunked(
                    w.clone(),
                    u.clone(),
                    k.clone(),
                    v.clone(),
                    zero4(1, 1),
                    chunk_len,
                ),
            };
            let y: Vec<f32> = y.to_data().try_to_vec::<f32>().unwrap();
            // The e^200 token dominates every later average.
            assert!(y.iter().all(|&x| (x - 1.0).abs() < 1e-5), "{form:?}: {y:?}");
        }
    }

    fn block(version: u8) -> Rwkv {
        let version = match version {
            4 => Version::V4,
            _ => Version::V6 {
                head_size: Some(4),
                lora_rank: 3,
            },
        };
        let mut config = RwkvConfig::new(8, version);
        config.ffn_expand = 2;
        let mut block = config.init(&mut Init::new(21, &device()));
        if let TimeMix::V6(tm) = &mut block.time_mix {
            // The official init zeroes the first LoRA factors; wake them so the test sees them.
            let init = Init::new(4, &device());
            tm.maa_w1 = init.param(vec![0.3; 8 * 15], [8, 15]);
            tm.decay_w1 = init.param(vec![0.2; 8 * 6], [8, 6]);
        }
        block
    }

    /// Every form against the sequential definition, both versions, from a carried state,
    /// at odd T and chunk sizes that do not divide it: outputs, the state (through its effect
    /// on the next call), and the gradients of the input and of the decay parameters.
    #[test]
    fn forms_agree_with_the_definition() {
        for version in [4, 6] {
            let m = block(version);
            let x = random([2, 11, 8], 1.0);
            let next = random([2, 3, 8], 1.0);
            let r = random([2, 11, 8], 1.0);
            let (_, start) = m.forward_with(random([2, 5, 8], 1.0), None, Scan::Sequential);
            let start = RwkvState {
                shift_time: start.shift_time.detach(),
                wkv: match start.wkv {
                    WkvState::V4(s) => WkvState::V4(Wkv4State {
                        a: s.a.detach(),
                        b: s.b.detach(),
                        p: s.p.detach(),
                    }),
                    WkvState::V6(s) => WkvState::V6(s.detach()),
                },
                shift_channel: start.shift_channel.detach(),
            };
            let run = |form| {
                let x = x.clone().detach().require_grad();
                let (y, state) = m.forward_with(x.clone(), Some(start.clone()), form);
                let (y_next, _) = m.forward_with(next.clone(), Some(state), Scan::Sequential);
                let grads = ((y.clone() * r.clone()).sum() + y_next.clone().sum()).backward();
                let decay_grad = match &m.time_mix {
                    TimeMix::V4(tm) => tm.time_decay.grad(&grads).unwrap(),
                    TimeMix::V6(tm) => tm.decay.grad(&grads).unwrap(),
                };
                (y, y_next, x.grad(&grads).unwrap(), decay_grad)
            };
            let reference = run(Scan::Sequential);
            for chunk_len in [1, 4, 5, 16] {
                let fast = run(Scan::Chunked { chunk_len });
                let what = format!("RWKV-{version}, chunk_len {chunk_len}");
                assert!(max_diff(fast.0, reference.0.clone()) < 1e-4, "y, {what}");
                assert!(
                    max_diff(fast.1, reference.1.clone()) < 1e-4,
                    "state, {what}"
                );
                assert!(max_diff(fast.2, reference.2.clone()) < 1e-4, "dx, {what}");
                assert!(
                    max_diff(fast.3, reference.3.clone()) < 1e-4,
                    "d decay, {what}"
                );
            }
        }
    }
}
