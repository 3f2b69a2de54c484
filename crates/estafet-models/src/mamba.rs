//! Mamba (Gu & Dao 2023): the selective state-space block of Mamba-1 (S6).
//!
//! ```text
//! (x, z)  = in_proj(u)                               u [B,T,D] → x, z [B,T,E·D]
//! x       = SiLU(causal depthwise conv1d_k(x))       kernel d_conv, per channel
//! (δ, B, C) = x_proj(x)                              δ [B,T,R], B, C [B,T,N]
//! Δ       = softplus(dt_proj(δ))                     [B,T,E·D]
//!           (selective = false: Δ [E·D], B, C [E·D, N] fixed per channel, the LTI control)
//! A       = −exp(A_log)                              [E·D, N], S4D-real init A_log = log(1..N)
//! h_t     = exp(Δ_t A) ⊙ h_{t−1} + (Δ_t ⊙ x_t) ⊗ B_t    zero-order hold for A, Euler for B
//!           (eigenvalues = "signed": 2·exp(Δ_t A) − 1 in place of exp(Δ_t A), Grazzi et al. 2024)
//! y_t     = h_t C_t + D ⊙ x_t                        (contract N)
//! out     = out_proj(y ⊙ SiLU(z))                    [B,T,D]
//! ```
//!
//! Field names follow the paper's symbols: `d_state` N, `expand` E, `d_conv`, `dt_rank` R.
//! `scan` picks how `h` is computed (see [`crate::scan`]): the `[E·D, N]` state is flattened to
//! `M = E·D·N` channels of one diagonal recurrence with `log a = Δ A`; with signed eigenvalues
//! the transition has no log, so the chunked form (which works in log space) is refused and the
//! sequential form runs [`crate::scan::recurrence`] over `a` itself. The fused kernel takes the
//! selective maps only, so the LTI control ([`selection`]) runs a tensor form. `step` carries the
//! last `d_conv − 1` inputs of the convolution and `h`: O(1) memory per token.

pub mod selection;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::conv::causal_depthwise;
use crate::fused;
use crate::init::Init;
use crate::projection::{project, split_linear};
use crate::reference::{Layout, Rename};
use crate::scan::{Compute, Eigenvalues, Form, Scan, linear_scan, recurrence};
use selection::{Dbc, Selection};

/// `[model.mixer]` with `kind = "mamba"`: the paper's symbols, with its defaults (N = 16,
/// E = 2, d_conv = 4, R = ⌈D/16⌉) and the scan's form. Its width is the model's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MambaSpec {
    /// N.
    pub d_state: usize,
    /// E.
    pub expand: usize,
    pub d_conv: usize,
    /// R; `⌈D / 16⌉` when absent.
    pub dt_rank: Option<usize>,
    /// The transition's range: `exp(Δ A) ∈ [0, 1]` as published, or `2·exp(Δ A) − 1`.
    pub eigenvalues: Eigenvalues,
    /// `true`: Δ, B and C depend on the token (S6); `false`: they are fixed per channel, the
    /// LTI (S4D-style) control of the Mamba paper's selective-copying table.
    pub selective: bool,
    pub scan: Form,
}

impl Default for MambaSpec {
    fn default() -> Self {
        Self {
            d_state: 16,
            expand: 2,
            d_conv: 4,
            dt_rank: None,
            eigenvalues: Eigenvalues::Positive,
            selective: true,
            scan: Form::Auto,
        }
    }
}

impl MambaSpec {
    /// The block at width `d_model`, Δ initialised in `[0.001, 0.1]` as in the reference.
    pub fn config(&self, d_model: usize) -> MambaConfig {
        MambaConfig {
            d_model,
            d_state: self.d_state,
            expand: self.expand,
            d_conv: self.d_conv,
            dt_rank: self.dt_rank.unwrap_or(d_model.div_ceil(16)),
            dt_min: 0.001,
            dt_max: 0.1,
            eigenvalues: self.eigenvalues,
            selective: self.selective,
            scan: self.scan,
        }
    }

    pub fn validate(&self, _d_model: usize) -> Result<(), String> {
        let positive = [
            ("d_state", self.d_state),
            ("expand", self.expand),
            ("dt_rank", self.dt_rank.unwrap_or(1)),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(format!("model.mixer.{field} must be at least 1"));
        }
        if self.d_conv < 2 {
            return Err(
                "model.mixer.d_conv must be at least 2 (a causal kernel spans the past)".into(),
            );
        }
        if !self.selective && self.scan == Form::Fused {
            return Err(
                "model.mixer.scan = fused: the fused kernel is the selective scan; with \
                        selective = false use auto, sequential or chunked"
                    .into(),
            );
        }
        self.eigenvalues
            .check_chunked(matches!(self.scan, Form::Tensor(Scan::Chunked { .. })))?;
        self.scan
            .validate()
            .map_err(|e| format!("model.mixer.scan.{e}"))
    }
}

/// Configuration of a [`Mamba`] block.
#[derive(Clone, Debug, PartialEq)]
pub struct MambaConfig {
    /// Model width `D`.
    pub d_model: usize,
    /// State size per channel `N`.
    pub d_state: usize,
    /// Expansion `E` of the inner width `E·D`.
    pub expand: usize,
    /// Kernel of the causal convolution.
    pub d_conv: usize,
    /// Rank `R` of the Δ projection; the paper's default is `⌈D / 16⌉`.
    pub dt_rank: usize,
    /// Range of the initial step sizes Δ (log-uniform), as in the reference implementation.
    pub dt_min: f64,
    pub dt_max: f64,
    pub eigenvalues: Eigenvalues,
    /// Input-dependent Δ, B, C (S6) or fixed per channel (LTI); see [`selection`].
    pub selective: bool,
    pub scan: Form,
}

impl MambaConfig {
    /// The paper's defaults for width `d_model` ([`MambaSpec::default`]).
    pub fn new(d_model: usize) -> Self {
        MambaSpec::default().config(d_model)
    }

    /// The reference implementation's initialisation (`mamba_simple.py`): PyTorch defaults for
    /// the projections and the convolution, `dt_proj.bias = softplus⁻¹(Δ₀)` with `Δ₀` log-uniform
    /// in `[dt_min, dt_max]` (floored at 1e-4), `A_log = log(1..N)`, `D = 1`; the LTI control as
    /// [`Selection::fixed`] says.
    pub fn init(&self, init: &mut Init) -> Mamba {
        let (d, n, r) = (self.d_model, self.d_state, self.dt_rank);
        let inner = self.expand * d;
        let conv_bound = 1.0 / (self.d_conv as f64).sqrt();
        let dt = (self.dt_min, self.dt_max);
        let selection = if self.selective {
            Selection::selective(init, inner, n, r, dt)
        } else {
            Selection::fixed(init, inner, n, dt)
        };
        let a_log = (0..inner * n).map(|i| ((i % n + 1) as f32).ln()).collect();
        Mamba {
            in_proj: init.linear(d, 2 * inner, false),
            conv_weight: init.uniform([self.d_conv, inner], conv_bound),
            conv_bias: init.uniform([inner], conv_bound),
            selection,
            a_log: init.param(a_log, [inner, n]),
            d: init.constant([inner], 1.0),
            out_proj: init.linear(inner, d, false),
            eigenvalues: self.eigenvalues,
            scan: self.scan,
        }
    }
}

/// One Mamba block. Create it with [`MambaConfig::init`].
#[derive(Module, Debug)]
pub struct Mamba {
    /// `[D, 2·E·D]`: `x` then `z`.
    pub in_proj: Linear,
    /// `[d_conv, E·D]`: tap `j` multiplies the input `d_conv − 1 − j` steps back.
    pub conv_weight: Param<Tensor<2>>,
    pub conv_bias: Param<Tensor<1>>,
    /// Δ, B and C: from the token or fixed.
    pub selection: Selection,
    /// `[E·D, N]`.
    pub a_log: Param<Tensor<2>>,
    /// `[E·D]`.
    pub d: Param<Tensor<1>>,
    /// `[E·D, D]`.
    pub out_proj: Linear,
    #[module(skip)]
    pub eigenvalues: Eigenvalues,
    #[module(skip)]
    pub scan: Form,
}

/// What computes `h` in one call: what the scan's [`Form`] resolves to, or, for the LTI
/// control, its convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Scan(Compute),
    Convolution,
}

/// The state of a Mamba block between calls.
#[derive(Clone, Debug)]
pub struct MambaState {
    /// The last `d_conv − 1` inputs of the convolution, `[B, d_conv − 1, E·D]`.
    pub conv: Tensor<3>,
    /// The SSM state, `[B, E·D, N]`.
    pub ssm: Tensor<3>,
}

impl Mamba {
    /// Its parameters under `mamba_simple.Mamba`'s names ([`crate::reference`]); the LTI
    /// control's `dt_bias`, `B` and `C` under `make_fixtures.py`'s.
    pub fn reference_names(&self) -> Vec<Rename> {
        let mut names = vec![
            Rename::linear("in_proj", "in_proj"),
            Rename::whole("conv_weight", "conv1d.weight", Layout::Conv),
            Rename::whole("conv_bias", "conv1d.bias", Layout::Same),
            Rename::whole("a_log", "A_log", Layout::Same),
            Rename::whole("d", "D", Layout::Same),
            Rename::linear("out_proj", "out_proj"),
        ];
        names.extend(match &self.selection {
            Selection::Selective(_) => vec![
                Rename::linear("selection.Selective.x_proj", "x_proj"),
                Rename::linear("selection.Selective.dt_proj", "dt_proj"),
                Rename::whole(
                    "selection.Selective.dt_proj.bias",
                    "dt_proj.bias",
                    Layout::Same,
                ),
            ],
            Selection::Fixed(_) => vec![
                Rename::whole("selection.Fixed.dt_bias", "dt_bias", Layout::Same),
                Rename::whole("selection.Fixed.b", "B", Layout::Same),
                Rename::whole("selection.Fixed.c", "C", Layout::Same),
            ],
        });
        names
    }

    fn inner(&self) -> usize {
        self.d.lazy_shape()[0]
    }

    fn d_state(&self) -> usize {
        self.a_log.lazy_shape()[1]
    }

    fn d_conv(&self) -> usize {
        self.conv_weight.lazy_shape()[0]
    }

    /// Floats of state per sequence: the convolution's window and `h`.
    pub fn state_size(&self) -> usize {
        (self.d_conv() - 1) * self.inner() + self.inner() * self.d_state()
    }

    /// FLOPs per token of the scan beyond the weights: per state element `exp(Δ A)` (a product
    /// and an exp), the decay and the drive (three) and the `C` contraction (two).
    pub fn scan_flops_per_token(&self) -> f64 {
        (7 * self.inner() * self.d_state()) as f64
    }

    pub fn zero_state(&self, batch: usize, device: &Device) -> MambaState {
        MambaState {
            conv: Tensor::zeros([batch, self.d_conv() - 1, self.inner()], device),
            ssm: Tensor::zeros([batch, self.inner(), self.d_state()], device),
        }
    }

    /// `u [B, T, D]` (`T ≥ 1`) → `[B, T, D]` and the state after the last step.
    ///
    /// On a backend with the scan's kernel (the CPU backends, wgpu) the scan is one op
    /// ([`fused::selective_scan`]), which never holds `[B, T, E·D, N]` decays and drives,
    /// unless [`Mamba::scan`] names a tensor form; elsewhere the scan runs in that form (the
    /// sequential one for `auto`).
    ///
    /// The LTI control with `auto` and transitions in [0, 1] runs its convolution form
    /// ([`selection::Fixed::convolve`]) on every backend.
    pub fn forward(&self, u: Tensor<3>, state: Option<MambaState>) -> (Tensor<3>, MambaState) {
        let path = match (&self.selection, self.scan, self.eigenvalues) {
            (Selection::Fixed(_), Form::Auto, Eigenvalues::Positive) => Path::Convolution,
            (Selection::Fixed(_), form, _) => Path::Scan(form.resolve(false)),
            (Selection::Selective(_), form, _) => {
                let op = fused::Op::SelectiveScan { n: self.d_state() };
                Path::Scan(form.resolve(fused::runs(op, &u.device(), u.dims()[1])))
            }
        };
        self.run(u, state, path)
    }

    /// As [`Mamba::forward`] with the scan built from tensor ops in the given form (the
    /// sequential one is the definition).
    pub fn forward_with(
        &self,
        u: Tensor<3>,
        state: Option<MambaState>,
        scan: Scan,
    ) -> (Tensor<3>, MambaState) {
        self.run(u, state, Path::Scan(Compute::Tensor(scan)))
    }

    /// The block with `h` computed along `path`.
    fn run(&self, u: Tensor<3>, state: Option<MambaState>, path: Path) -> (Tensor<3>, MambaState) {
        let [batch, t, _] = u.dims();
        let (inner, n, k) = (self.inner(), self.d_state(), self.d_conv());
        let state = state.unwrap_or_else(|| self.zero_state(batch, &u.device()));
        let [x, z] = split_linear(&self.in_proj, u, [inner; 2]);

        // Causal depthwise convolution over [carried window, x].
        let window = Tensor::cat(vec![state.conv, x], 1); // [B, k − 1 + T, E·D]
        // The convolution's and the gate's fused ops are host kernels; a GPU runs only the scan
        // as one.
        let host = path == Path::Scan(Compute::Fused) && fused::has_kernel(&window.device());
        let x = match path {
            Path::Scan(Compute::Fused) if host => {
                fused::conv_silu(window.clone(), self.conv_weight.val(), self.conv_bias.val())
            }
            Path::Scan(_) | Path::Convolution => silu(causal_depthwise(
                window.clone(),
                self.conv_weight.val(),
                Some(self.conv_bias.val()),
                t,
            )),
        }; // [B, T, E·D]
        let conv_state = window.narrow(1, t, k - 1);

        let a = -self.a_log.val().exp(); // [E·D, N]

        let m = inner * n;
        let (y, h_last) = match path {
            Path::Convolution => {
                let Selection::Fixed(fixed) = &self.selection else {
                    unreachable!("the convolution form is the fixed maps' (resolved in forward)")
                };
                let (y, h_last) = fixed.convolve(x.clone(), a, state.ssm);
                (y, h_last.reshape([batch, m]))
            }
            Path::Scan(Compute::Tensor(scan)) => {
                let Dbc { delta, b, c } = self.selection.broadcast(x.clone());
                let log_decay = (delta.clone() * a.unsqueeze_dim::<3>(0).unsqueeze_dim::<4>(0))
                    .expand([batch, t, inner, n]);
                let drive = delta * x.clone().unsqueeze_dim::<4>(3) * b; // [B, T, E·D, N]
                let (log_decay, drive, h0) = (
                    log_decay.reshape([batch, t, m]),
                    drive.reshape([batch, t, m]),
                    state.ssm.reshape([batch, m]),
                );
                let (h, h_last) = match self.eigenvalues {
                    Eigenvalues::Positive => linear_scan(log_decay, drive, h0, scan),
                    Eigenvalues::Signed => {
                        assert_eq!(
                            scan,
                            Scan::Sequential,
                            "signed eigenvalues have no chunked form (unchecked config)"
                        );
                        recurrence(self.eigenvalues.transition(log_decay), drive, h0)
                    }
                };
                let y = (h.reshape([batch, t, inner, n]) * c)
                    .sum_dim(3)
                    .squeeze_dim::<3>(3);
                (y, h_last)
            }
            Path::Scan(Compute::Fused) => {
                let (delta, b, c) = self
                    .selection
                    .project(x.clone())
                    .expect("the fused kernel runs only the selective maps (resolved in forward)");
                let out =
                    fused::selective_scan(delta, x.clone(), a, b, c, state.ssm, self.eigenvalues);
                let y = fused::narrow(out.clone(), 1, 0, t * inner).reshape([batch, t, inner]);
                (y, out.narrow(1, t * inner, m))
            }
        };
        let gated = match path {
            Path::Scan(Compute::Fused) if host => {
                let flat = |v: Tensor<3>| v.reshape([batch * t, inner]);
                fused::skip_gate(flat(y), flat(x), self.d.val(), flat(z)).reshape([batch, t, inner])
            }
            _ => (y + x * self.d.val().unsqueeze_dim::<2>(0).unsqueeze_dim::<3>(0)) * silu(z),
        };
        let out = project(&self.out_proj, gated);
        (
            out,
            MambaState {
                conv: conv_state,
                ssm: h_last.reshape([batch, inner, n]),
            },
        )
    }

    /// One token: `u_t [B, D]` → `[B, D]` and the next state.
    pub fn step(&self, u_t: Tensor<2>, state: Option<MambaState>) -> (Tensor<2>, MambaState) {
        let (y, state) = self.forward_with(u_t.unsqueeze_dim(1), state, Scan::Sequential);
        (y.squeeze_dim(1), state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{device, max_diff};
    use burn::tensor::Distribution;
    use burn::tensor::activation::softplus;

    fn block() -> Mamba {
        let mut config = MambaConfig::new(6);
        config.d_state = 4;
        config.dt_rank = 2;
        config.init(&mut Init::new(11, &device()))
    }

    #[test]
    fn reference_initialisation() {
        let m = block();
        assert_eq!(m.in_proj.weight.dims(), [6, 24]);
        let Selection::Selective(s) = &m.selection else {
            panic!("selective by default")
        };
        assert_eq!(s.x_proj.weight.dims(), [12, 2 + 8]);
        let a: Vec<f32> = (-m.a_log.val().exp())
            .to_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(&a[..4], &[-1.0, -2.0, -3.0, -4.0], "S4D-real: A = −(1..N)");
        let dt: Vec<f32> = softplus(s.dt_proj.bias.as_ref().unwrap().val(), 1.0)
            .to_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert!(
            dt.iter()
                .all(|&d| (0.001 * 0.999..=0.1 * 1.001).contains(&d)),
            "{dt:?}"
        );
        // 3·12 conv window + 12·4 state
        assert_eq!(m.state_size(), 84);
    }

    /// The LTI control is initialised as S4D (B = 1, Δ₀ in Mamba's range), has the same state,
    /// and its Δ, B and C do not move with the input, while the selective block's do.
    #[test]
    fn the_lti_control_is_time_invariant() {
        let mut config = MambaConfig::new(6);
        config.d_state = 4;
        config.selective = false;
        let m = config.init(&mut Init::new(11, &device()));
        let Selection::Fixed(f) = &m.selection else {
            panic!("selective = false gives fixed maps")
        };
        assert_eq!(f.b.dims(), [12, 4]);
        assert_eq!(f.b.val().min().into_scalar::<f32>(), 1.0);
        assert_eq!(f.b.val().max().into_scalar::<f32>(), 1.0);
        let dt = softplus(f.dt_bias.val(), 1.0);
        assert!(dt.clone().min().into_scalar::<f32>() >= 0.001 * 0.999);
        assert!(dt.max().into_scalar::<f32>() <= 0.1 * 1.001);
        assert_eq!(m.state_size(), block().state_size());

        let dev = device();
        let x = |seed| {
            <Tensor<3>>::random([1, 5, 12], Distribution::Normal(0.0, 1.0), &dev) + seed as f32
        };
        let moved = |m: &Mamba| {
            let (a, b) = (m.selection.broadcast(x(0)), m.selection.broadcast(x(1)));
            max_diff(a.delta, b.delta) + max_diff(a.b, b.b) + max_diff(a.c, b.c)
        };
        assert_eq!(moved(&m), 0.0, "fixed Δ, B, C");
        assert!(moved(&block()) > 1e-3, "selective Δ, B, C");
        assert!(m.selection.project(x(0)).is_none());
    }

    /// The fused kernel takes the selective maps only: `fused` with `selective = false` is
    /// refused, with a message naming both fields; the tensor forms are not.
    #[test]
    fn the_lti_control_refuses_the_fused_form() {
        let spec = |scan| MambaSpec {
            selective: false,
            scan,
            ..MambaSpec::default()
        };
        let e = spec(Form::Fused).validate(8).unwrap_err();
        assert!(e.contains("fused") && e.contains("selective"), "{e}");
        for scan in [
            Form::Auto,
            Form::Tensor(Scan::Sequential),
            Form::Tensor(Scan::Chunked { chunk_len: 8 }),
        ] {
            assert_eq!(spec(scan).validate(8), Ok(()));
        }
    }

    /// Every form against the sequential definition at odd T and chunk sizes that do not
    /// divide it: outputs, both parts of the final state, and the gradients of the input and of
    /// A_log, Δ's projection and the convolution.
    #[test]
    fn forms_agree_with_the_definition() {
        let m = block();
        let dev = device();
        let u = Tensor::<3>::random([2, 11, 6], Distribution::Normal(0.0, 1.0), &dev);
        let start = MambaState {
            conv: Tensor::random([2, 3, 12], Distribution::Normal(0.0, 1.0), &dev),
            ssm: Tensor::random([2, 12, 4], Distribution::Normal(0.0, 1.0), &dev),
        };
        let r = Tensor::<3>::random([2, 11, 6], Distribution::Normal(0.0, 1.0), &dev);
        let run = |scan| {
            let u = u.clone().detach().require_grad();
            let (y, s) = m.forward_with(u.clone(), Some(start.clone()), scan);
            let grads = ((y.clone() * r.clone()).sum() + s.ssm.clone().sum()).backward();
            (
                y,
                s,
                u.grad(&grads).unwrap(),
                m.a_log.grad(&grads).unwrap(),
                match &m.selection {
                    Selection::Selective(s) => s.dt_proj.weight.grad(&grads).unwrap(),
                    Selection::Fixed(_) => unreachable!("a selective block"),
                },
                m.conv_weight.grad(&grads).unwrap(),
            )
        };
        let reference = run(Scan::Sequential);
        for chunk_len in [1, 4, 5, 16] {
            let fast = run(Scan::Chunked { chunk_len });
            let what = format!("chunk_len {chunk_len}");
            assert!(max_diff(fast.0, reference.0.clone()) < 1e-5, "y, {what}");
            assert!(
                max_diff(fast.1.ssm, reference.1.ssm.clone()) < 1e-5,
                "h_T, {what}"
            );
            assert!(
                max_diff(fast.1.conv, reference.1.conv.clone()) < 1e-6,
                "conv, {what}"
            );
            assert!(max_diff(fast.2, reference.2.clone()) < 1e-5, "du, {what}");
            assert!(
                max_diff(fast.3, reference.3.clone()) < 1e-4,
                "dA_log, {what}"
            );
            assert!(
                max_diff(fast.4, reference.4.clone()) < 1e-4,
                "d dt_proj, {what}"
            );
            assert!(
                max_diff(fast.5, reference.5.clone()) < 1e-4,
                "d conv, {what}"
            );
        }
        // step, token by token.
        let mut s = Some(start.clone());
        let mut ys = Vec::new();
        for u_t in u.clone().iter_dim(1) {
            let (y_t, next) = m.step(u_t.squeeze_dim(1), s);
            ys.push(y_t);
            s = Some(next);
        }
        assert!(
            max_diff(Tensor::stack::<3>(ys, 1), reference.0) < 1e-5,
            "step"
        );
        assert!(max_diff(s.unwrap().ssm, reference.1.ssm) < 1e-5, "step h_T");
    }

    /// Signed eigenvalues have no log, so the chunked form is refused; every other form is not.
    #[test]
    fn signed_eigenvalues_refuse_the_chunked_form() {
        let spec = |scan| MambaSpec {
            eigenvalues: Eigenvalues::Signed,
            scan,
            ..MambaSpec::default()
        };
        let e = spec(Form::Tensor(Scan::Chunked { chunk_len: 8 }))
            .validate(8)
            .unwrap_err();
        assert!(e.contains("eigenvalues"), "{e}");
        for scan in [Form::Auto, Form::Fused, Form::Tensor(Scan::Sequential)] {
            assert_eq!(spec(scan).validate(8), Ok(()));
        }
    }

    /// The convolution is causal and per channel: an impulse at t = 2 in one inner channel moves
    /// only that channel's conv output at t = 2..2 + d_conv − 1.
    #[test]
    fn convolution_is_causal_depthwise() {
        let m = block();
        let dev = device();
        let mut impulse = vec![0.0f32; 8 * 12];
        impulse[2 * 12 + 5] = 1.0;
        let x = Tensor::<3>::from_data(burn::tensor::TensorData::new(impulse, [1, 8, 12]), &dev);
        let window = Tensor::cat(vec![Tensor::zeros([1, 3, 12], &dev), x], 1);
        let conv =
            |window| causal_depthwise(window, m.conv_weight.val(), Some(m.conv_bias.val()), 8);
        let out = conv(window.clone()) - conv(Tensor::zeros([1, 11, 12], &dev));
        let out: Vec<f32> = out.to_data().try_to_vec::<f32>().unwrap();
        for t in 0..8 {
            for ch in 0..12 {
                let moved = out[t * 12 + ch] != 0.0;
                assert_eq!(moved, ch == 5 && (2..6).contains(&t), "t {t} channel {ch}");
            }
        }
    }
}
