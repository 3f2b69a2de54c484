//! How a Mamba block gets its step size Δ and its maps B (input → state) and C (state →
//! output): the one thing that separates S6 from the LTI state-space models before it.
//!
//! ```text
//! selective (S6, Mamba):  (δ, B_t, C_t) = x_proj(x_t)      B_t, C_t [N], shared by the channels
//!                         Δ_t = softplus(dt_proj(δ))       [E·D]
//! fixed (LTI, S4D-real):  Δ = softplus(dt_bias)            [E·D], one step per channel
//!                         B, C                             [E·D, N], parameters per channel
//! ```
//!
//! With fixed Δ, B and C the recurrence `h_t = exp(Δ A) h_{t−1} + Δ x_t B` is time-invariant:
//! it cannot decide per token what to keep, which is what the Mamba paper's selective copying
//! contrast (Table 1: S6 99.8%, S4 18.3%) measures. The fixed variant is initialised as S4D is
//! (Gu et al. 2022, `s4d.py`): `B = 1`, `C ~ N(0, 1)`, `Δ₀` log-uniform as Mamba draws it.

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::softplus;
use burn::tensor::{Int, Tensor, TensorData};

use crate::fused;
use crate::init::Init;

/// Δ, B and C of a Mamba block, input-dependent or fixed.
#[derive(Module, Debug)]
pub enum Selection {
    Selective(Selective),
    Fixed(Fixed),
}

/// S6: Δ, B and C are functions of the token.
#[derive(Module, Debug)]
pub struct Selective {
    /// `[E·D, R + 2N]`: `δ`, `B`, `C`.
    pub x_proj: Linear,
    /// `[R, E·D]` with bias.
    pub dt_proj: Linear,
}

/// LTI: Δ, B and C are per-channel parameters.
#[derive(Module, Debug)]
pub struct Fixed {
    /// `[E·D]`: `Δ = softplus(dt_bias)`.
    pub dt_bias: Param<Tensor<1>>,
    /// `[E·D, N]`.
    pub b: Param<Tensor<2>>,
    /// `[E·D, N]`.
    pub c: Param<Tensor<2>>,
}

/// Δ, B and C shaped to broadcast against the `[B, T, E·D, N]` state sequence:
/// `delta [B|1, T|1, E·D, 1]`, `b` and `c [B|1, T|1, 1|E·D, N]`.
pub struct Dbc {
    pub delta: Tensor<4>,
    pub b: Tensor<4>,
    pub c: Tensor<4>,
}

impl Selection {
    /// The selective maps: `x_proj [E·D → R + 2N]` with PyTorch's default initialisation and
    /// `dt_proj [R → E·D]` with `U(±R^{−1/2})` weights and `softplus⁻¹(Δ₀)` bias
    /// (`mamba_simple.py`).
    pub fn selective(init: &mut Init, inner: usize, n: usize, r: usize, dt: (f64, f64)) -> Self {
        let dt_bias = init.dt_bias(inner, dt.0, dt.1);
        Selection::Selective(Selective {
            x_proj: init.linear(inner, r + 2 * n, false),
            dt_proj: Linear {
                weight: init.uniform([r, inner], (r as f64).powf(-0.5)),
                bias: Some(dt_bias),
            },
        })
    }

    /// The fixed maps, initialised as S4D: `B = 1`, `C ~ N(0, 1)`, the same `Δ₀` draw.
    pub fn fixed(init: &mut Init, inner: usize, n: usize, dt: (f64, f64)) -> Self {
        Selection::Fixed(Fixed {
            dt_bias: init.dt_bias(inner, dt.0, dt.1),
            b: init.constant([inner, n], 1.0),
            c: init.normal([inner, n], 1.0),
        })
    }

    pub fn is_selective(&self) -> bool {
        matches!(self, Selection::Selective(_))
    }

    /// The selective maps' `(Δ [B, T, E·D], B [B, T, N], C [B, T, N])` of `x [B, T, E·D]`, the
    /// fused kernel's inputs (`Δ` through the fused softplus on the CPU backends); `None` for the
    /// fixed variant, which the kernel does not take.
    pub fn project(&self, x: Tensor<3>) -> Option<(Tensor<3>, Tensor<3>, Tensor<3>)> {
        self.maps(x, true)
    }

    /// The selective maps, `Δ` through [`fused::softplus`] or (the definition) burn's.
    fn maps(&self, x: Tensor<3>, fused: bool) -> Option<(Tensor<3>, Tensor<3>, Tensor<3>)> {
        let Selection::Selective(s) = self else {
            return None;
        };
        let r = s.dt_proj.weight.dims()[0];
        let n = (s.x_proj.weight.dims()[1] - r) / 2;
        let dbc = s.x_proj.forward(x);
        let dt = s.dt_proj.forward(dbc.clone().narrow(2, 0, r));
        // The fused softplus is a host kernel; elsewhere burn's.
        let delta = if fused && fused::has_kernel(&dt.device()) {
            fused::softplus(dt)
        } else {
            softplus(dt, 1.0)
        };
        let b = dbc.clone().narrow(2, r, n);
        let c = dbc.narrow(2, r + n, n);
        Some((delta, b, c))
    }

    /// Δ, B and C for the tensor forms ([`Dbc`]).
    pub fn broadcast(&self, x: Tensor<3>) -> Dbc {
        match self {
            Selection::Selective(_) => {
                let (delta, b, c) = self.maps(x, false).expect("selective");
                Dbc {
                    delta: delta.unsqueeze_dim(3),
                    b: b.unsqueeze_dim(2),
                    c: c.unsqueeze_dim(2),
                }
            }
            Selection::Fixed(f) => {
                let lift = |p: Tensor<2>| p.unsqueeze_dim::<3>(0).unsqueeze_dim::<4>(0);
                Dbc {
                    delta: lift(softplus(f.dt_bias.val(), 1.0).unsqueeze_dim(1)),
                    b: lift(f.b.val()),
                    c: lift(f.c.val()),
                }
            }
        }
    }
}

/// Tokens per block of [`Fixed::convolve`]: its Toeplitz matrix is `[E·D, L, L]`, so memory
/// and work grow as `T·L`, not `T²`, and the state carries the blocks across.
const BLOCK: usize = 256;

impl Fixed {
    /// The LTI recurrence `h_t = exp(Δ A) h_{t−1} + Δ x_t B`, `y_t = C·h_t` in S4's convolution
    /// form, exact (no truncation), blockwise:
    ///
    /// ```text
    /// y_t = Σ_{s ≤ t} K_{t−s} x_s + C·(exp((t+1) Δ A) h_0),   K_k = Σ_n C_n B_n Δ exp(k Δ A_n)
    /// h_T = exp(T Δ A) h_0 + Σ_s exp((T−1−s) Δ A) Δ B x_s
    /// ```
    ///
    /// per channel, so a block is one batched matmul with a Toeplitz matrix instead of `T`
    /// dependent steps.
    ///
    /// - `x [B, T, E·D]`, `a [E·D, N]` (`A = −exp(A_log)`), `h0 [B, E·D, N]`
    /// - returns `y [B, T, E·D]` (before the `D` skip) and `h_T [B, E·D, N]`
    pub fn convolve(&self, x: Tensor<3>, a: Tensor<2>, h0: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let t = x.dims()[1];
        let delta = softplus(self.dt_bias.val(), 1.0).unsqueeze_dim::<2>(1); // [E·D, 1]
        let log_decay = delta.clone() * a; // [E·D, N]
        let input = (self.b.val() * delta).unsqueeze_dim::<3>(2); // Δ B, [E·D, N, 1]
        let output = self.c.val().unsqueeze_dim::<3>(2); // C, [E·D, N, 1]
        let mut h = h0;
        let mut ys = Vec::with_capacity(t.div_ceil(BLOCK));
        for start in (0..t).step_by(BLOCK) {
            let len = BLOCK.min(t - start);
            let (y, next) = block(
                x.clone().narrow(1, start, len),
                log_decay.clone(),
                input.clone(),
                output.clone(),
                h,
            );
            ys.push(y);
            h = next;
        }
        (Tensor::cat(ys, 1), h)
    }
}

/// [`Fixed::convolve`] over one block of `L` tokens.
fn block(
    x: Tensor<3>,
    log_decay: Tensor<2>,
    input: Tensor<3>,
    output: Tensor<3>,
    h0: Tensor<3>,
) -> (Tensor<3>, Tensor<3>) {
    let [_, len, inner] = x.dims();
    let device = x.device();
    let lags = Tensor::<1>::from_data(
        TensorData::new((0..=len).map(|k| k as f32).collect::<Vec<_>>(), [len + 1]),
        &device,
    );
    let powers = (log_decay.unsqueeze_dim::<3>(2) * lags.reshape([1, 1, len + 1])).exp(); // exp(k Δ A), [E·D, N, L + 1]
    let kernel = (output.clone() * input.clone() * powers.clone().narrow(2, 0, len))
        .sum_dim(1)
        .squeeze_dim::<2>(1); // K, [E·D, L]
    // toeplitz[d, t, s] = K[d, t − s] for s ≤ t; index 0 of the padded kernel is the zero above
    // the diagonal.
    let padded = Tensor::cat(vec![Tensor::zeros([inner, 1], &device), kernel], 1);
    let index: Vec<i64> = (0..len)
        .flat_map(|t| (0..len).map(move |s| if s <= t { (t - s + 1) as i64 } else { 0 }))
        .collect();
    let index = Tensor::<1, Int>::from_data(TensorData::new(index, [len * len]), &device);
    let toeplitz = padded.select(1, index).reshape([inner, len, len]);
    let xs = x.permute([2, 1, 0]); // [E·D, L, B]
    let from_inputs = toeplitz.matmul(xs.clone()).permute([2, 1, 0]); // [B, L, E·D]
    let h0 = h0.permute([1, 0, 2]); // [E·D, B, N]
    let from_h0 = h0
        .clone()
        .matmul(output * powers.clone().narrow(2, 1, len))
        .permute([1, 2, 0]); // C·exp((t+1) Δ A) h_0, [B, L, E·D]
    let weights = (powers.clone().narrow(2, 0, len).flip([2]) * input).swap_dims(1, 2); // [E·D, L, N]
    let h_last = xs.swap_dims(1, 2).matmul(weights) + h0 * powers.narrow(2, len, 1).swap_dims(1, 2); // [E·D, B, N]
    (from_inputs + from_h0, h_last.permute([1, 0, 2]))
}
