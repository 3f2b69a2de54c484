//! The GPU kernels (`estafet_models::gpu`) against their definitions, and their launches.
//!
//! Each kernel runs on wgpu (in CI: Mesa's lavapipe, no GPU needed) and is compared with the
//! model's sequential tensor-op definition on ndarray, the reference backend: outputs, final
//! states, and the gradients of one scalar loss with respect to the input, the initial state and
//! every parameter. T ∈ {1, 7, 33, 300}, B ∈ {1, 3}, widths that are not powers of two, a width
//! beyond one cube's 256 units, non-zero initial states. Agreement per tensor:
//! `|gpu − ref| ≤ 1e-5 + 1e-4 · max |ref|`, f32 in another order (`tests/forms.rs`' bound).
//!
//! Launches: a training step of every model is counted at T 16 and T 128. A model whose
//! recurrence has a kernel must issue the same number at both, up to the extra pass burn's
//! reductions may plan for longer rows ([`REDUCE_PASSES`]); the others, still tensor-op loops
//! on wgpu, are listed in [`LOOPS`] and must grow by at least one launch per step, so that the
//! list stays true.
//!
//! `cargo test --release --features flex,wgpu --test gpu_kernels` (with
//! `CUBECL_WGPU_DEFAULT_DEVICE=Cpu` where there is no GPU).

#![cfg(feature = "wgpu")]
#![allow(deprecated)] // Device::ndarray: the reference backend

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Int, Tensor, TensorData};
use estafet_experiments::Backend;
use estafet_models::fused::{self, Cell, Op};
use estafet_models::gated_deltanet::{GatedDeltaNet, GatedDeltaNetSpec, GatedDeltaNetState};
use estafet_models::gru::{Gru, GruConfig};
use estafet_models::lstm::{Lstm, LstmConfig, LstmState};
use estafet_models::mamba::{Mamba, MambaConfig, MambaState};
use estafet_models::mamba2::{Mamba2, Mamba2Spec, Mamba2State};
use estafet_models::mingru::{MinGru, MinGruConfig};
use estafet_models::minlstm::{MinLstm, MinLstmConfig};
use estafet_models::mlstm::{Mlstm, MlstmSpec, MlstmState};
use estafet_models::rnn::{Nonlinearity, Rnn, RnnConfig};
use estafet_models::rwkv::{Rwkv, RwkvConfig, RwkvState, Version, Wkv4State, WkvState};
use estafet_models::rwkv7::{Rwkv7, Rwkv7Spec, Rwkv7State};
use estafet_models::scan::{Eigenvalues, Form, Scan};
use estafet_models::slstm::{Slstm, SlstmSpec, SlstmState};
use estafet_models::{
    Init, Input, InputSpec, Layout, MixerConfig, ModelConfig, ModelIo, Readout, gpu,
};

const LENGTHS: [usize; 4] = [1, 7, 33, 300];
const BATCHES: [usize; 2] = [1, 3];

fn wgpu() -> Device {
    Backend::Wgpu.device().unwrap().autodiff()
}

fn reference() -> Device {
    Device::ndarray().autodiff()
}

/// Named tensors to compare, as host values.
type Outcome = Vec<(String, Vec<f32>)>;

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// The inputs of one case, drawn on the host from fixed seeds, so that both devices see the same
/// numbers; `leaf` makes a tracked copy on `device`.
struct Draws {
    init: Init,
}

impl Draws {
    fn new(device: &Device) -> Self {
        Self {
            init: Init::new(1_000, device),
        }
    }

    fn leaf<const D: usize>(&mut self, shape: [usize; D]) -> Tensor<D> {
        self.init.normal(shape, 1.0).val().detach().require_grad()
    }

    /// `Σ t ⊙ w` with fresh weights `w`, so that every element feeds the loss differently.
    fn weighted<const D: usize>(&mut self, t: Tensor<D>) -> Tensor<1> {
        let w = self.init.normal(t.dims(), 1.0).val().detach();
        (t * w).sum()
    }
}

/// The gradient of every parameter of `module`, in visiting order.
fn param_grads<M: Module>(module: &M, grads: &Gradients) -> Outcome {
    struct Collect<'a> {
        grads: &'a Gradients,
        out: Outcome,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g = param
                .grad(self.grads)
                .unwrap_or_else(|| param.val().zeros_like());
            let name = format!("d param #{}", self.out.len());
            self.out.push((name, values(g)));
        }
    }
    let mut c = Collect {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut c);
    c.out
}

fn assert_agree(what: &str, reference: &Outcome, gpu: &Outcome) {
    assert_eq!(reference.len(), gpu.len(), "{what}: tensors compared");
    for ((name, r), (_, g)) in reference.iter().zip(gpu) {
        assert_eq!(r.len(), g.len(), "{what}: {name} sizes");
        let scale = r.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = r
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, |m, d| if d.is_nan() { f32::NAN } else { m.max(d) });
        assert!(
            diff <= 1e-5 + 1e-4 * scale,
            "{what}: {name} differs by {diff:e} (scale {scale:e})"
        );
    }
}

/// A block's outcome: the input `[B, T, width]` and the initial state's parts (`dims`, drawn
/// as flat leaves) go through `run`, which returns the output and the final state's parts; the
/// loss weights every output and every final part.
fn block_outcome<M: Module>(
    module: &M,
    device: &Device,
    x_dims: [usize; 3],
    dims: &[Vec<usize>],
    run: impl FnOnce(&M, Tensor<3>, Vec<Tensor<1>>) -> (Tensor<3>, Vec<Tensor<1>>),
) -> Outcome {
    let mut draws = Draws::new(device);
    let x = draws.leaf(x_dims);
    let leaves: Vec<Tensor<1>> = dims
        .iter()
        .map(|d| draws.leaf([d.iter().product::<usize>()]))
        .collect();
    let (y, finals) = run(module, x.clone(), leaves.clone());
    let mut loss = draws.weighted(y.clone());
    for f in &finals {
        loss = loss + draws.weighted(f.clone());
    }
    let grads = loss.backward();
    let mut out = vec![("y".to_string(), values(y))];
    for (i, f) in finals.into_iter().enumerate() {
        out.push((format!("final state {i}"), values(f)));
    }
    out.push(("dx".into(), values(x.grad(&grads).unwrap())));
    for (i, leaf) in leaves.iter().enumerate() {
        out.push((
            format!("d initial state {i}"),
            values(leaf.grad(&grads).unwrap()),
        ));
    }
    out.extend(param_grads(module, &grads));
    out
}

fn flat<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    t.reshape([n])
}

/// `t` as a `D`-dimensional tensor of `dims`.
fn shaped<const D: usize>(t: &Tensor<1>, dims: &[usize]) -> Tensor<D> {
    t.clone()
        .reshape::<D, _>(<[usize; D]>::try_from(dims).unwrap())
}

/// One case's sizes: batch, length, input width, hidden width.
#[derive(Clone, Copy, Debug)]
struct Case {
    b: usize,
    t: usize,
    d: usize,
    h: usize,
}

fn cases() -> Vec<Case> {
    let mut all = Vec::new();
    for b in BATCHES {
        for t in LENGTHS {
            all.push(Case { b, t, d: 5, h: 7 });
        }
    }
    // Wider than a cube's 256 units: each unit takes two channels. Short, so that the cell's
    // backward stays inside llvmpipe's loop budget (`a_long_wide_cell_runs_its_definition_on_llvmpipe`).
    all.push(Case {
        b: 3,
        t: 7,
        d: 3,
        h: 300,
    });
    all
}

/// The kernel on wgpu against the definition on ndarray, for every case.
fn check(name: &str, op: Op, outcome: impl Fn(Case, &Device, bool) -> Outcome) {
    check_cases(name, op, cases(), outcome);
}

fn check_cases(
    name: &str,
    op: Op,
    cases: Vec<Case>,
    outcome: impl Fn(Case, &Device, bool) -> Outcome,
) {
    for case in cases {
        let op = match op {
            Op::Cell { cell, .. } => Op::Cell {
                cell,
                hidden: case.h,
            },
            other => other,
        };
        assert!(fused::runs(op, &wgpu(), case.t), "{name}: wgpu runs {op:?}");
        let want = outcome(case, &reference(), false);
        let got = outcome(case, &wgpu(), true);
        assert_agree(&format!("{name} {case:?}"), &want, &got);
        eprintln!("{name} {case:?}: {} tensors agree", want.len());
    }
}

fn elman(nonlinearity: Nonlinearity, c: Case, device: &Device, kernel: bool) -> Outcome {
    let rnn: Rnn = RnnConfig {
        d_input: c.d,
        d_hidden: c.h,
        nonlinearity,
        irnn_init: false,
    }
    .init(&mut Init::new(5, device));
    let dims = [vec![c.b, c.h]];
    block_outcome(&rnn, device, [c.b, c.t, c.d], &dims, |m, x, s| {
        let h0 = shaped(&s[0], &dims[0]);
        let (y, h) = if kernel {
            m.forward(x, Some(h0))
        } else {
            m.forward_sequential(x, Some(h0))
        };
        (y, vec![flat(h)])
    })
}

#[test]
fn elman_kernel_agrees_with_its_definition() {
    for (nonlinearity, cell) in [
        (Nonlinearity::Tanh, Cell::Tanh),
        (Nonlinearity::Relu, Cell::Relu),
    ] {
        check(
            &format!("{nonlinearity:?}"),
            Op::Cell { cell, hidden: 0 },
            |c, device, kernel| elman(nonlinearity, c, device, kernel),
        );
    }
}

#[test]
fn gru_kernel_agrees_with_its_definition() {
    check(
        "gru",
        Op::Cell {
            cell: Cell::Gru,
            hidden: 0,
        },
        |c, device, kernel| {
            let gru: Gru = GruConfig {
                d_input: c.d,
                d_hidden: c.h,
            }
            .init(&mut Init::new(6, device));
            let dims = [vec![c.b, c.h]];
            block_outcome(&gru, device, [c.b, c.t, c.d], &dims, |m, x, s| {
                let h0 = shaped(&s[0], &dims[0]);
                let (y, h) = if kernel {
                    m.forward(x, Some(h0))
                } else {
                    m.forward_sequential(x, Some(h0))
                };
                (y, vec![flat(h)])
            })
        },
    );
}

fn lstm_outcome(c: Case, device: &Device, kernel: bool) -> Outcome {
    let lstm: Lstm = LstmConfig {
        d_input: c.d,
        d_hidden: c.h,
        forget_bias: 1.0,
    }
    .init(&mut Init::new(7, device));
    let dims = [vec![c.b, c.h], vec![c.b, c.h]];
    block_outcome(&lstm, device, [c.b, c.t, c.d], &dims, |m, x, s| {
        let state = LstmState {
            h: shaped(&s[0], &dims[0]),
            c: shaped(&s[1], &dims[1]),
        };
        let (y, s) = if kernel {
            m.forward(x, Some(state))
        } else {
            m.forward_sequential(x, Some(state))
        };
        (y, vec![flat(s.h), flat(s.c)])
    })
}

#[test]
fn lstm_kernel_agrees_with_its_definition() {
    check(
        "lstm",
        Op::Cell {
            cell: Cell::Lstm,
            hidden: 0,
        },
        lstm_outcome,
    );
}

/// minGRU or minLSTM: `forward` (the kernel on wgpu) against the sequential scan.
fn min_rnn_outcome<M: Module>(
    module: &M,
    run: impl Fn(&M, Tensor<3>, Tensor<2>, bool) -> (Tensor<3>, Tensor<2>),
    c: Case,
    device: &Device,
    kernel: bool,
) -> Outcome {
    let dims = [vec![c.b, c.h]];
    block_outcome(module, device, [c.b, c.t, c.d], &dims, |m, x, s| {
        let (y, h) = run(m, x, shaped(&s[0], &dims[0]), kernel);
        (y, vec![flat(h)])
    })
}

#[test]
fn mingru_kernel_agrees_with_its_definition() {
    check("mingru", Op::MinRnn, |c, device, kernel| {
        let cell: MinGru = MinGruConfig {
            d_input: c.d,
            d_hidden: c.h,
            scan: Form::Fused,
        }
        .init(&mut Init::new(1, device));
        min_rnn_outcome(
            &cell,
            |m, x, h0, kernel| match kernel {
                true => m.forward(x, Some(h0)),
                false => m.forward_with(x, Some(h0), Scan::Sequential),
            },
            c,
            device,
            kernel,
        )
    });
}

#[test]
fn minlstm_kernel_agrees_with_its_definition() {
    check("minlstm", Op::MinRnn, |c, device, kernel| {
        let cell: MinLstm = MinLstmConfig {
            d_input: c.d,
            d_hidden: c.h,
            scan: Form::Fused,
        }
        .init(&mut Init::new(6, device));
        min_rnn_outcome(
            &cell,
            |m, x, h0, kernel| match kernel {
                true => m.forward(x, Some(h0)),
                false => m.forward_with(x, Some(h0), Scan::Sequential),
            },
            c,
            device,
            kernel,
        )
    });
}

/// On llvmpipe a kernel whose loops would run past the driver's budget is not taken: an LSTM of
/// 300 channels over 33 steps runs its definition there (and agrees with ndarray), over 7 steps
/// its kernel. On a GPU both run the kernel.
#[test]
fn a_long_wide_cell_runs_its_definition_on_llvmpipe() {
    let device = wgpu();
    let op = Op::Cell {
        cell: Cell::Lstm,
        hidden: 300,
    };
    let cube = gpu::cube_device(&device).unwrap();
    let llvmpipe = cube
        .client()
        .properties()
        .identity
        .name
        .contains("llvmpipe");
    assert!(fused::runs(op, &device, 7));
    assert_eq!(fused::runs(op, &device, 33), !llvmpipe);
    let case = Case {
        b: 1,
        t: 33,
        d: 3,
        h: 300,
    };
    let want = lstm_outcome(case, &reference(), false);
    let got = lstm_outcome(case, &device, true);
    assert_agree("lstm over the llvmpipe budget", &want, &got);
}

/// The cases of a block whose width sets no cube size: every length and batch at width 5.
fn block_cases() -> Vec<Case> {
    cases().into_iter().filter(|c| c.h == 7).collect()
}

/// Mamba's block: `forward` (the selective scan's kernel on wgpu) against the sequential scan,
/// with the carried convolution window and SSM state as leaves.
fn mamba_outcome(config: &MambaConfig, c: Case, device: &Device, kernel: bool) -> Outcome {
    let block: Mamba = config.init(&mut Init::new(2, device));
    let zero = block.zero_state(c.b, device);
    let dims = [zero.conv.dims().to_vec(), zero.ssm.dims().to_vec()];
    block_outcome(
        &block,
        device,
        [c.b, c.t, config.d_model],
        &dims,
        |m, x, s| {
            let state = MambaState {
                conv: shaped(&s[0], &dims[0]),
                ssm: shaped(&s[1], &dims[1]),
            };
            let (y, s) = if kernel {
                m.forward(x, Some(state))
            } else {
                m.forward_with(x, Some(state), Scan::Sequential)
            };
            (y, vec![flat(s.conv), flat(s.ssm)])
        },
    )
}

#[test]
fn mamba_scan_kernel_agrees_with_its_definition() {
    for (d_state, eigenvalues) in [
        (4, Eigenvalues::Positive),
        (16, Eigenvalues::Positive),
        (4, Eigenvalues::Signed),
    ] {
        let mut config = MambaConfig::new(5);
        config.d_state = d_state;
        config.eigenvalues = eigenvalues;
        check_cases(
            &format!("mamba N {d_state} {eigenvalues:?}"),
            Op::SelectiveScan { n: d_state },
            block_cases(),
            |c, device, kernel| mamba_outcome(&config, c, device, kernel),
        );
    }
}

/// RWKV-4's block: `forward` (the WKV's kernel on wgpu) against the sequential WKV, from a
/// state the block reached on the reference backend (a valid `(a, b, p)`).
#[test]
fn rwkv4_wkv_kernel_agrees_with_its_definition() {
    let mut config = RwkvConfig::new(6, Version::V4);
    config.ffn_expand = 2;
    check_cases("rwkv4", Op::Wkv4, block_cases(), |c, device, kernel| {
        let block: Rwkv = config.init(&mut Init::new(3, device));
        let reached = {
            let on_ref: Rwkv = config.init(&mut Init::new(3, &reference()));
            let warm = Init::new(77, &reference()).normal([c.b, 5, 6], 1.0).val();
            let (_, s) = on_ref.valid().forward(warm.inner(), None);
            match s.wkv {
                WkvState::V4(s) => [s.a, s.b, s.p].map(|t| t.into_data()),
                WkvState::V6(_) => unreachable!("an RWKV-4 block"),
            }
        };
        let mut draws = Draws::new(device);
        let x = draws.leaf([c.b, c.t, 6]);
        let (shift_time, shift_channel) = (draws.leaf([c.b, 6]), draws.leaf([c.b, 6]));
        let [a, b, p] = reached.map(|d| Tensor::<2>::from_data(d, device).detach().require_grad());
        let state = RwkvState {
            shift_time: shift_time.clone(),
            wkv: WkvState::V4(Wkv4State {
                a: a.clone(),
                b: b.clone(),
                p: p.clone(),
            }),
            shift_channel: shift_channel.clone(),
        };
        let (y, s) = if kernel {
            block.forward(x.clone(), Some(state))
        } else {
            block.forward_with(x.clone(), Some(state), Scan::Sequential)
        };
        let WkvState::V4(wkv) = s.wkv else {
            unreachable!("an RWKV-4 block")
        };
        // (a, b, p) is a representation of a / b and ln b + p: compare what it represents.
        let loss = draws.weighted(y.clone())
            + draws.weighted(s.shift_time.clone())
            + draws.weighted(wkv.a.clone() / wkv.b.clone())
            + draws.weighted(wkv.b.clone().log() + wkv.p.clone());
        let grads = loss.backward();
        let mut out = vec![
            ("y".into(), values(y)),
            ("a/b".into(), values(wkv.a / wkv.b.clone())),
            ("ln b + p".into(), values(wkv.b.log() + wkv.p)),
            ("dx".into(), values(x.grad(&grads).unwrap())),
            ("d shift".into(), values(shift_time.grad(&grads).unwrap())),
            ("da0".into(), values(a.grad(&grads).unwrap())),
            ("db0".into(), values(b.grad(&grads).unwrap())),
        ];
        out.extend(param_grads(&block, &grads));
        out
    });
}

/// RWKV-6's block: `forward` (the WKV's kernel on wgpu) against the sequential WKV, two heads
/// of 3 at width 6, from a random state and token shifts.
#[test]
fn rwkv6_wkv_kernel_agrees_with_its_definition() {
    let version = Version::V6 {
        head_size: Some(3),
        lora_rank: 2,
    };
    let mut config = RwkvConfig::new(6, version);
    config.ffn_expand = 2;
    check_cases(
        "rwkv6",
        Op::Wkv6 { k: 3 },
        block_cases(),
        |c, device, kernel| {
            let block: Rwkv = config.init(&mut Init::new(3, device));
            let mut draws = Draws::new(device);
            let x = draws.leaf([c.b, c.t, 6]);
            let (shift_time, shift_channel) = (draws.leaf([c.b, 6]), draws.leaf([c.b, 6]));
            let s0 = draws.leaf([c.b, 2, 3, 3]);
            let state = RwkvState {
                shift_time: shift_time.clone(),
                wkv: WkvState::V6(s0.clone()),
                shift_channel: shift_channel.clone(),
            };
            let (y, s) = if kernel {
                block.forward(x.clone(), Some(state))
            } else {
                block.forward_with(x.clone(), Some(state), Scan::Sequential)
            };
            let WkvState::V6(wkv) = s.wkv else {
                unreachable!("an RWKV-6 block")
            };
            let loss = draws.weighted(y.clone())
                + draws.weighted(wkv.clone())
                + draws.weighted(s.shift_time.clone())
                + draws.weighted(s.shift_channel.clone());
            let grads = loss.backward();
            let mut out = vec![
                ("y".into(), values(y)),
                ("S".into(), values(wkv)),
                ("dx".into(), values(x.grad(&grads).unwrap())),
                ("d shift".into(), values(shift_time.grad(&grads).unwrap())),
                (
                    "d channel shift".into(),
                    values(shift_channel.grad(&grads).unwrap()),
                ),
                ("dS0".into(), values(s0.grad(&grads).unwrap())),
            ];
            out.extend(param_grads(&block, &grads));
            out
        },
    );
}

/// Gated DeltaNet's layer: `forward` (the delta rule's kernel on wgpu) against the sequential
/// recurrence, with and without the gate, positive and signed β; keys of 3 and values of 6 per
/// head (`expand_v = 2`), so that `K ≠ V`.
#[test]
fn gated_deltanet_kernel_agrees_with_its_definition() {
    for (gate, eigenvalues) in [(true, Eigenvalues::Positive), (false, Eigenvalues::Signed)] {
        let spec = GatedDeltaNetSpec {
            n_heads: 2,
            head_dim: Some(3),
            expand_v: 2,
            gate,
            eigenvalues,
            ..GatedDeltaNetSpec::default()
        };
        check_cases(
            &format!("gated_deltanet gate {gate} {eigenvalues:?}"),
            Op::DeltaRule { k: 3 },
            block_cases(),
            |c, device, kernel| {
                let layer: GatedDeltaNet = spec.config(6).init(&mut Init::new(7, device));
                let zero = layer.zero_state(c.b, device);
                let dims = [zero.conv.dims().to_vec(), zero.s.dims().to_vec()];
                block_outcome(&layer, device, [c.b, c.t, 6], &dims, |m, x, s| {
                    let state = GatedDeltaNetState {
                        conv: shaped(&s[0], &dims[0]),
                        s: shaped(&s[1], &dims[1]),
                    };
                    let (y, s) = if kernel {
                        m.forward(x, Some(state))
                    } else {
                        m.forward_with(x, Some(state), Scan::Sequential)
                    };
                    (y, vec![flat(s.conv), flat(s.s)])
                })
            },
        );
    }
}

/// Mamba-2's block: `forward` (the SSD recurrence's kernel on wgpu) against the sequential
/// recurrence, at both eigenvalue ranges; width 6 with heads of 4 (3 heads), 5 states.
#[test]
fn mamba2_ssd_kernel_agrees_with_its_definition() {
    for eigenvalues in [Eigenvalues::Positive, Eigenvalues::Signed] {
        let spec = Mamba2Spec {
            d_state: 5,
            head_dim: 4,
            eigenvalues,
            ..Mamba2Spec::default()
        };
        check_cases(
            &format!("mamba2 {eigenvalues:?}"),
            Op::Ssd { n: 5 },
            block_cases(),
            |c, device, kernel| {
                let block: Mamba2 = spec.config(6).init(&mut Init::new(4, device));
                let zero = block.zero_state(c.b, device);
                let dims = [zero.conv.dims().to_vec(), zero.ssm.dims().to_vec()];
                block_outcome(&block, device, [c.b, c.t, 6], &dims, |m, x, s| {
                    let state = Mamba2State {
                        conv: shaped(&s[0], &dims[0]),
                        ssm: shaped(&s[1], &dims[1]),
                    };
                    let (y, s) = if kernel {
                        m.forward(x, Some(state))
                    } else {
                        m.forward_with(x, Some(state), Scan::Sequential)
                    };
                    (y, vec![flat(s.conv), flat(s.ssm)])
                })
            },
        );
    }
}

/// RWKV-7's time mix: `forward` (the DPLR recurrence's kernel on wgpu) against the sequential
/// recurrence; heads of 3, the zero-initialised projections drawn at random (as in
/// `tests/forms.rs`) so that every parameter is on the gradient's path.
#[test]
fn rwkv7_dplr_kernel_agrees_with_its_definition() {
    let spec = Rwkv7Spec {
        head_size: Some(3),
        lora_rank: 4,
        ..Rwkv7Spec::default()
    };
    check_cases(
        "rwkv7",
        Op::Dplr { n: 3 },
        block_cases(),
        |c, device, kernel| {
            let mut layer: Rwkv7 = spec.config(6).init(&mut Init::new(7, device));
            let mut init = Init::new(8, device);
            let mut random = |shape: [usize; 2]| Param::from_tensor(init.normal(shape, 0.5).val());
            layer.output.weight = random([6, 6]);
            layer.w1 = random([6, 4]);
            layer.a1 = random([6, 4]);
            layer.g1 = random([6, 4]);
            let zero = layer.zero_state(c.b, device);
            let dims = [zero.shift.dims().to_vec(), zero.s.dims().to_vec()];
            block_outcome(&layer, device, [c.b, c.t, 6], &dims, |m, x, s| {
                let state = Rwkv7State {
                    shift: shaped(&s[0], &dims[0]),
                    s: shaped(&s[1], &dims[1]),
                };
                let (y, s) = if kernel {
                    m.forward(x, Some(state))
                } else {
                    m.forward_with(x, Some(state), Scan::Sequential)
                };
                (y, vec![flat(s.shift), flat(s.s)])
            })
        },
    );
}

/// xLSTM's mLSTM layer: `forward` (the cell's kernel on wgpu) against the sequential cell,
/// two heads (four would layer-normalise pairs of values, a near sign function whose slope
/// turns rounding into gradient differences: `tests/backend_parity.rs`).
#[test]
fn mlstm_cell_kernel_agrees_with_its_definition() {
    let spec = MlstmSpec {
        n_heads: 2,
        ..MlstmSpec::default()
    };
    check_cases(
        "mlstm",
        Op::MlstmCell { k: 3 },
        block_cases(),
        |c, device, kernel| {
            let layer: Mlstm = spec.config(6).init(&mut Init::new(7, device));
            let zero = layer.zero_state(c.b, device);
            let dims = [
                zero.c.dims().to_vec(),
                zero.n.dims().to_vec(),
                zero.m.dims().to_vec(),
            ];
            block_outcome(&layer, device, [c.b, c.t, 6], &dims, |m, x, s| {
                let state = MlstmState {
                    c: shaped(&s[0], &dims[0]),
                    n: shaped(&s[1], &dims[1]),
                    m: shaped(&s[2], &dims[2]),
                };
                let (y, s) = if kernel {
                    m.forward(x, Some(state))
                } else {
                    m.forward_with(x, Some(state), Scan::Sequential)
                };
                (y, vec![flat(s.c), flat(s.n), flat(s.m)])
            })
        },
    );
}

/// xLSTM's sLSTM layer: `forward` (the kernel on wgpu) against the definition, two heads of 3,
/// the normaliser's initial state near 1 (`n` divides `c`; `tests/forms.rs` draws it so too).
#[test]
fn slstm_cell_kernel_agrees_with_its_definition() {
    let op = Op::Slstm { d: 6, heads: 2 };
    check_cases("slstm", op, block_cases(), |c, device, kernel| {
        let layer: Slstm = SlstmSpec { n_heads: 2 }
            .config(6)
            .init(&mut Init::new(9, device));
        let dims: [Vec<usize>; 4] = std::array::from_fn(|_| vec![c.b, 6]);
        block_outcome(&layer, device, [c.b, c.t, 6], &dims, |m, x, s| {
            let [h, cc, n, mm] = [0, 1, 2, 3].map(|i| shaped::<2>(&s[i], &dims[i]));
            let state = SlstmState {
                h,
                c: cc,
                n: n * 0.1 + 1.0,
                m: mm,
            };
            let (y, s) = m.forward_with(x, Some(state), kernel);
            (y, vec![flat(s.h), flat(s.c), flat(s.n), flat(s.m)])
        })
    });
}

/// The kinds whose recurrence is still a tensor-op loop on wgpu: their launches grow with T.
/// A kind leaves this list when its kernel lands (the test below then fails until it does).
/// Empty since RWKV-6's WKV has its kernel.
const LOOPS: [&str; 0] = [];

/// Launches a training step may add between T 16 and T 128 without a time loop: cubek's
/// reduce, behind burn's sums and norms, plans one more pass for longer reductions (seen: minLSTM
/// 286 → 288, two more `ReduceKernel` launches).
const REDUCE_PASSES: usize = 8;

/// Launches of one training step (forward, backward) of a 2-layer residual model at width 8,
/// B 2, after a warm-up step at the same length.
fn launches_per_step(mixer: &MixerConfig, len: usize) -> usize {
    let device = wgpu();
    let config = ModelConfig {
        mixer: Some(mixer.clone()),
        pattern: Vec::new(),
        d_model: 8,
        n_layers: 2,
        layout: Layout::Residual,
        mlp_expand: 2,
        match_params: None,
        match_state: None,
    };
    let io = ModelIo {
        input: InputSpec::Tokens { vocab: 5 },
        d_output: 5,
        readout: Readout::PerPosition,
    };
    let model = config.init(io, &mut Init::new(3, &device));
    let ids: Vec<i64> = (0..2 * len).map(|i| (i as i64 * 7 + 3) % 5).collect();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, len]), &device);
    let step = || {
        let (y, _) = model.forward(Input::Tokens(tokens.clone()), None);
        let grads = y.sum().backward();
        drop(grads);
    };
    step();
    gpu::count_launches(step).1
}

#[test]
fn a_training_step_launches_the_same_at_every_length() {
    let mut mixers: Vec<(String, MixerConfig)> = MixerConfig::all()
        .into_iter()
        .map(|m| (m.kind().to_string(), m))
        .collect();
    mixers.push((
        "rwkv6".into(),
        serde_json::from_value(serde_json::json!({ "kind": "rwkv", "version": 6 })).unwrap(),
    ));
    for (name, mixer) in mixers {
        let short = launches_per_step(&mixer, 16);
        let long = launches_per_step(&mixer, 128);
        eprintln!("{name}: {short} launches per training step at T 16, {long} at T 128");
        // 112 more steps add at least 112 launches to a loop; burn's own reductions over the
        // B·T rows (cubek's reduce) may take one more pass at the longer length.
        if LOOPS.contains(&name.as_str()) {
            assert!(
                long >= short + 112,
                "{name}: {short} launches at T 16, {long} at T 128: it has a kernel now, take it \
                 off LOOPS"
            );
        } else {
            assert!(
                long <= short + REDUCE_PASSES,
                "{name}: {short} launches at T 16, {long} at T 128: they grow with T"
            );
        }
    }
}
