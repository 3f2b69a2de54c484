//! Every fast form of every linear recurrence against its sequential definition, and `step`
//! token by token against both: outputs, final states, and the gradients of one scalar loss
//! with respect to the input, the initial state and every parameter.
//!
//! Lengths T ∈ {1, 7, 64, 300}, chunk lengths that do not divide them, non-zero initial
//! states. Tolerance, f32: `|a − b| ≤ 1e-5 + 1e-4·max|b|` per compared tensor. The chunked forms
//! reorder sums of up to `T·chunk_len ≈ 10⁴` terms, whose rounding grows like `√n·ε ≈ 1e-5`
//! relative (`ε = 1.2e-7`); 1e-4 leaves a margin of ten without hiding a wrong term, which moves
//! results by far more (the mutation checks in each module's tests show it).

#![allow(deprecated)] // Device::ndarray: the reference CPU backend for these tests

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Gradients, Tensor};
use estafet_models::Init;
use estafet_models::attention::{Attention, AttentionConfig, KvCache, Positions};
use estafet_models::gated_deltanet::{GatedDeltaNet, GatedDeltaNetSpec, GatedDeltaNetState};
use estafet_models::gru::{Gru, GruConfig};
use estafet_models::lstm::{Lstm, LstmConfig, LstmState};
use estafet_models::mamba::selection::Selection;
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

const LENGTHS: [usize; 4] = [1, 7, 64, 300];
const CHUNKS: [usize; 2] = [5, 48];

fn device() -> Device {
    Device::ndarray().autodiff()
}

/// Seeded draws (the `k`-th draw of a test uses seed `k`; each test runs on its own thread), so
/// that every run compares the same numbers and a failure reproduces: the backend's own
/// generator is not seeded.
fn normal<const D: usize>(shape: [usize; D], std: f64) -> Tensor<D> {
    thread_local!(static DRAWS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) });
    let seed = DRAWS.with(|d| d.replace(d.get() + 1));
    Init::new(1_000 + seed, &device())
        .normal(shape, std)
        .val()
        .detach()
}

/// A tracked copy: a fresh leaf that gradients flow into.
fn leaf<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
    t.clone().detach().require_grad()
}

/// What one form produced: named tensors to compare.
type Outcome = Vec<(String, Tensor<1>)>;

fn flat<const D: usize>(t: Tensor<D>) -> Tensor<1> {
    let n = t.shape().num_elements();
    t.reshape([n])
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
            self.out
                .push((format!("d param #{}", self.out.len()), flat(g)));
        }
    }
    let mut c = Collect {
        grads,
        out: Vec::new(),
    };
    module.visit(&mut c);
    c.out
}

fn assert_agree(what: &str, reference: &Outcome, other: &Outcome) -> f32 {
    assert_eq!(reference.len(), other.len());
    let mut worst = 0.0f32;
    for ((name, r), (_, o)) in reference.iter().zip(other) {
        let scale: f32 = r.clone().abs().max().into_scalar();
        let diff: f32 = (r.clone() - o.clone()).abs().max().into_scalar();
        assert!(diff.is_finite(), "{what}: {name} is not finite");
        assert!(
            diff <= 1e-5 + 1e-4 * scale,
            "{what}: {name} differs by {diff} (scale {scale})"
        );
        worst = worst.max(diff / scale.max(1.0));
    }
    worst
}

/// Runs `forward` (full sequence, one form) and the loss `Σ y ⊙ r + Σ final state`, returning
/// outputs, final state, input gradient, initial-state gradients and every parameter gradient.
#[allow(clippy::too_many_arguments)] // one closure per view of the mixer under test
fn check_forms<M, S>(
    name: &str,
    module: &M,
    t: usize,
    d: usize,
    initial: impl Fn() -> (S, Vec<Tensor<1>>),
    run: impl Fn(&M, Tensor<3>, S, Option<usize>) -> (Tensor<3>, Vec<Tensor<1>>),
    step: impl Fn(&M, Tensor<2>, S) -> (Tensor<2>, S),
    state_parts: impl Fn(&S) -> Vec<Tensor<1>>,
) where
    M: Module,
    S: Clone,
{
    let x = normal([2, t, d], 1.0);
    let r = normal([2, t, d], 1.0);
    let outcome = |chunk: Option<usize>| -> Outcome {
        let xs = leaf(&x);
        let (s0, s0_leaves) = initial();
        let (y, finals) = run(module, xs.clone(), s0, chunk);
        let mut loss = (y.clone() * r.clone()).sum();
        for f in &finals {
            loss = loss + f.clone().sum();
        }
        let grads = loss.backward();
        let mut out = vec![("y".to_string(), flat(y))];
        out.extend(
            finals
                .into_iter()
                .enumerate()
                .map(|(i, f)| (format!("final state {i}"), f)),
        );
        out.push(("dx".into(), flat(xs.grad(&grads).unwrap())));
        out.extend(
            s0_leaves
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("d initial state {i}"), s.grad(&grads).unwrap())),
        );
        out.extend(param_grads(module, &grads));
        out
    };
    let reference = outcome(None);
    let mut worst = 0.0f32;
    for chunk in CHUNKS {
        worst = worst.max(assert_agree(
            &format!("{name} T={t} chunk {chunk}"),
            &reference,
            &outcome(Some(chunk)),
        ));
    }
    // step, token by token, from the same initial state.
    let (mut s, _) = initial();
    let mut ys = Vec::with_capacity(t);
    for x_t in x.clone().iter_dim(1) {
        let (y_t, next) = step(module, x_t.squeeze_dim(1), s);
        ys.push(y_t);
        s = next;
    }
    let by_step: Outcome = std::iter::once(("y".to_string(), flat(Tensor::stack::<3>(ys, 1))))
        .chain(
            state_parts(&s)
                .into_iter()
                .enumerate()
                .map(|(i, f)| (format!("final state {i}"), f)),
        )
        .collect();
    worst = worst.max(assert_agree(
        &format!("{name} T={t} step"),
        &reference[..by_step.len()].to_vec(),
        &by_step,
    ));
    println!("{name:>8} T={t:>3}: largest relative form-vs-form difference {worst:.2e}");
}

/// A cell whose state is one `h [2, 6]` (minGRU, minLSTM), width 6, from a non-zero state:
/// the chunked tensor forms, or (`fused`) the form `forward` picks, the fused op on ndarray.
fn hidden_state_forms<M: Module>(
    name: &str,
    cell: &M,
    fused: bool,
    forward: impl Fn(&M, Tensor<3>, Tensor<2>, Option<Scan>) -> (Tensor<3>, Tensor<2>),
    step: impl Fn(&M, Tensor<2>, Tensor<2>) -> (Tensor<2>, Tensor<2>),
) {
    let h0 = normal([2, 6], 1.0);
    for t in LENGTHS {
        check_forms(
            name,
            cell,
            t,
            6,
            || {
                let h = leaf(&flat(h0.clone()));
                (h.clone().reshape([2, 6]), vec![h])
            },
            |m, x, h, chunk| {
                let scan = match chunk {
                    None => Some(Scan::Sequential),
                    // The fused op has no chunks: every "chunk" runs it.
                    Some(_) if fused => None,
                    Some(chunk_len) => Some(Scan::Chunked { chunk_len }),
                };
                let (y, h) = forward(m, x, h, scan);
                (y, vec![flat(h)])
            },
            &step,
            |h| vec![flat(h.clone())],
        );
    }
}

fn mingru_forms(name: &str, fused: bool) {
    let cell: MinGru = MinGruConfig {
        d_input: 6,
        d_hidden: 6,
        scan: Form::Auto,
    }
    .init(&mut Init::new(1, &device()));
    hidden_state_forms(
        name,
        &cell,
        fused,
        |m, x, h, scan| match scan {
            Some(scan) => m.forward_with(x, Some(h), scan),
            None => m.forward(x, Some(h)),
        },
        |m, x_t, h| m.step(x_t, Some(h)),
    );
}

fn minlstm_forms(name: &str, fused: bool) {
    let cell: MinLstm = MinLstmConfig {
        d_input: 6,
        d_hidden: 6,
        scan: Form::Auto,
    }
    .init(&mut Init::new(6, &device()));
    hidden_state_forms(
        name,
        &cell,
        fused,
        |m, x, h, scan| match scan {
            Some(scan) => m.forward_with(x, Some(h), scan),
            None => m.forward(x, Some(h)),
        },
        |m, x_t, h| m.step(x_t, Some(h)),
    );
}

#[test]
fn mingru_forms_agree() {
    mingru_forms("mingru", false);
}

#[test]
fn mingru_fused_agrees_with_sequential() {
    mingru_forms("mingru fused", true);
}

#[test]
fn minlstm_forms_agree() {
    minlstm_forms("minlstm", false);
}

#[test]
fn minlstm_fused_agrees_with_sequential() {
    minlstm_forms("minlstm fused", true);
}

/// Mamba-2: the chunked form, or (`fused`) the form `forward` picks, the fused op on ndarray,
/// for transitions in [0, 1] and (fused only: the chunked form needs logs) in [−1, 1].
fn mamba2_forms(name: &str, fused: bool, eigenvalues: Eigenvalues) {
    // d 8, E 2, P 4: 4 heads; N 3; the conv spans 16 + 6 = 22 channels.
    let spec = Mamba2Spec {
        d_state: 3,
        head_dim: 4,
        eigenvalues,
        ..Mamba2Spec::default()
    };
    let block: Mamba2 = spec.config(8).init(&mut Init::new(8, &device()));
    let conv0 = normal([2, 3, 22], 1.0);
    let ssm0 = normal([2, 4, 4, 3], 1.0);
    for t in LENGTHS {
        check_forms(
            name,
            &block,
            t,
            8,
            || {
                let (conv, ssm) = (leaf(&flat(conv0.clone())), leaf(&flat(ssm0.clone())));
                (
                    Mamba2State {
                        conv: conv.clone().reshape([2, 3, 22]),
                        ssm: ssm.clone().reshape([2, 4, 4, 3]),
                    },
                    vec![conv, ssm],
                )
            },
            |m, x, s, chunk| {
                let (y, s) = match chunk {
                    None => m.forward_with(x, Some(s), Scan::Sequential),
                    // The fused op has no chunks: every "chunk" runs it.
                    Some(_) if fused => m.forward(x, Some(s)),
                    Some(chunk_len) => m.forward_with(x, Some(s), Scan::Chunked { chunk_len }),
                };
                (y, vec![flat(s.conv), flat(s.ssm)])
            },
            |m, x_t, s| m.step(x_t, Some(s)),
            |s| vec![flat(s.conv.clone()), flat(s.ssm.clone())],
        );
    }
}

#[test]
fn mamba2_forms_agree() {
    mamba2_forms("mamba2", false, Eigenvalues::Positive);
}

#[test]
fn mamba2_fused_agrees_with_sequential() {
    mamba2_forms("mamba2 fused", true, Eigenvalues::Positive);
    mamba2_forms("mamba2 signed, fused", true, Eigenvalues::Signed);
}

/// Gated DeltaNet as published, and plain DeltaNet (no decay gate) with signed eigenvalues:
/// the chunked form, or (`fused`) the form `forward` picks, the fused op on ndarray.
fn gated_deltanet_forms(fused: bool) {
    for (name, gate, eigenvalues) in [
        ("gated deltanet", true, Eigenvalues::Positive),
        ("deltanet, signed", false, Eigenvalues::Signed),
    ] {
        let name = if fused {
            format!("{name}, fused")
        } else {
            name.to_string()
        };
        let name = name.as_str();
        let spec = GatedDeltaNetSpec {
            n_heads: 2,
            gate,
            eigenvalues,
            ..GatedDeltaNetSpec::default()
        };
        let layer: GatedDeltaNet = spec.config(6).init(&mut Init::new(7, &device()));
        // 3 carried inputs of 2·(2·3) + 2·3 = 18 channels; S [2, 2, 3, 3].
        let conv0 = normal([2, 3, 18], 1.0);
        let s0 = normal([2, 2, 3, 3], 1.0);
        for t in LENGTHS {
            check_forms(
                name,
                &layer,
                t,
                6,
                || {
                    let (conv, s) = (leaf(&flat(conv0.clone())), leaf(&flat(s0.clone())));
                    (
                        GatedDeltaNetState {
                            conv: conv.clone().reshape([2, 3, 18]),
                            s: s.clone().reshape([2, 2, 3, 3]),
                        },
                        vec![conv, s],
                    )
                },
                |m, x, s, chunk| {
                    let (y, s) = match chunk {
                        None => m.forward_with(x, Some(s), Scan::Sequential),
                        // The fused op has no chunks: every "chunk" runs it.
                        Some(_) if fused => m.forward(x, Some(s)),
                        Some(chunk_len) => m.forward_with(x, Some(s), Scan::Chunked { chunk_len }),
                    };
                    (y, vec![flat(s.conv), flat(s.s)])
                },
                |m, x_t, s| m.step(x_t, Some(s)),
                |s| vec![flat(s.conv.clone()), flat(s.s.clone())],
            );
        }
    }
}

#[test]
fn gated_deltanet_forms_agree() {
    gated_deltanet_forms(false);
}

#[test]
fn gated_deltanet_fused_agrees_with_sequential() {
    gated_deltanet_forms(true);
}

/// sLSTM: its fused op against the definition (the loop of tensor ops) and `step`, from a
/// non-zero state whose stabiliser the first writes exceed in some units and not in others.
/// The recurrence is non-linear, so there is no chunked form: every "chunk" runs the op.
#[test]
fn slstm_fused_agrees_with_sequential() {
    let layer: Slstm = SlstmSpec { n_heads: 2 }
        .config(6)
        .init(&mut Init::new(9, &device()));
    let s0 = [
        normal([2, 6], 1.0),
        normal([2, 6], 1.0),
        normal([2, 6], 0.1) + 1.0,
        normal([2, 6], 1.0),
    ];
    for t in LENGTHS {
        check_forms(
            "slstm fused",
            &layer,
            t,
            6,
            || {
                let leaves = s0.clone().map(|s| leaf(&flat(s)));
                let [h, c, n, m] = leaves.clone().map(|s| s.reshape([2, 6]));
                (SlstmState { h, c, n, m }, leaves.to_vec())
            },
            |m, x, s, chunk| {
                let (y, s) = m.forward_with(x, Some(s), chunk.is_some());
                (y, vec![flat(s.h), flat(s.c), flat(s.n), flat(s.m)])
            },
            |m, x_t, s| m.step(x_t, Some(s)),
            |s| {
                vec![
                    flat(s.h.clone()),
                    flat(s.c.clone()),
                    flat(s.n.clone()),
                    flat(s.m.clone()),
                ]
            },
        );
    }
}

/// mLSTM: the chunkwise form, or (`fused`) the form `forward` picks, the fused op on ndarray,
/// and `step` against the definition, from a non-zero state with a stabiliser that the first
/// chunk's writes exceed in some heads and not in others.
fn mlstm_forms(name: &str, fused: bool) {
    let spec = MlstmSpec {
        n_heads: 2,
        ..MlstmSpec::default()
    };
    let layer: Mlstm = spec.config(6).init(&mut Init::new(7, &device()));
    // C [2, 2, 3, 3], n [2, 2, 3], m [2, 2].
    let (c0, n0, m0) = (
        normal([2, 2, 3, 3], 1.0),
        normal([2, 2, 3], 1.0),
        normal([2, 2], 1.0),
    );
    for t in LENGTHS {
        check_forms(
            name,
            &layer,
            t,
            6,
            || {
                let (c, n, m) = (
                    leaf(&flat(c0.clone())),
                    leaf(&flat(n0.clone())),
                    leaf(&flat(m0.clone())),
                );
                (
                    MlstmState {
                        c: c.clone().reshape([2, 2, 3, 3]),
                        n: n.clone().reshape([2, 2, 3]),
                        m: m.clone().reshape([2, 2]),
                    },
                    vec![c, n, m],
                )
            },
            |m, x, s, chunk| {
                let (y, s) = match chunk {
                    None => m.forward_with(x, Some(s), Scan::Sequential),
                    // The fused op has no chunks: every "chunk" runs it.
                    Some(_) if fused => m.forward(x, Some(s)),
                    Some(chunk_len) => m.forward_with(x, Some(s), Scan::Chunked { chunk_len }),
                };
                (y, vec![flat(s.c), flat(s.n), flat(s.m)])
            },
            |m, x_t, s| m.step(x_t, Some(s)),
            |s| vec![flat(s.c.clone()), flat(s.n.clone()), flat(s.m.clone())],
        );
    }
}

#[test]
fn mlstm_forms_agree() {
    mlstm_forms("mlstm", false);
}

#[test]
fn mlstm_fused_agrees_with_sequential() {
    mlstm_forms("mlstm fused", true);
}

/// RWKV-7: the chunkwise DPLR form, or (`fused`) the form `forward` picks, the fused op on
/// ndarray, and `step` against the definition. The initialisation's zero output projection and
/// LoRA matrices are replaced by random ones, so that every parameter reaches the output.
fn rwkv7_forms(name: &str, fused: bool) {
    let spec = Rwkv7Spec {
        head_size: Some(3),
        lora_rank: 4,
        ..Rwkv7Spec::default()
    };
    let mut layer: Rwkv7 = spec.config(6).init(&mut Init::new(7, &device()));
    let random = |shape: [usize; 2]| Param::from_tensor(normal(shape, 0.5));
    layer.output.weight = random([6, 6]);
    layer.w1 = random([6, 4]);
    layer.a1 = random([6, 4]);
    layer.g1 = random([6, 4]);
    // shift [2, 6], S [2, 2, 3, 3].
    let (shift0, s0) = (normal([2, 6], 1.0), normal([2, 2, 3, 3], 1.0));
    for t in LENGTHS {
        check_forms(
            name,
            &layer,
            t,
            6,
            || {
                let (shift, s) = (leaf(&flat(shift0.clone())), leaf(&flat(s0.clone())));
                (
                    Rwkv7State {
                        shift: shift.clone().reshape([2, 6]),
                        s: s.clone().reshape([2, 2, 3, 3]),
                    },
                    vec![shift, s],
                )
            },
            |m, x, s, chunk| {
                let (y, s) = match chunk {
                    None => m.forward_with(x, Some(s), Scan::Sequential),
                    // The fused op has no chunks: every "chunk" runs it.
                    Some(_) if fused => m.forward(x, Some(s)),
                    Some(chunk_len) => m.forward_with(x, Some(s), Scan::Chunked { chunk_len }),
                };
                (y, vec![flat(s.shift), flat(s.s)])
            },
            |m, x_t, s| m.step(x_t, Some(s)),
            |s| vec![flat(s.shift.clone()), flat(s.s.clone())],
        );
    }
}

#[test]
fn rwkv7_forms_agree() {
    rwkv7_forms("rwkv7", false);
}

#[test]
fn rwkv7_fused_agrees_with_sequential() {
    rwkv7_forms("rwkv7 fused", true);
}

#[test]
fn mamba_forms_agree() {
    mamba_forms("mamba", true);
}

/// The LTI control: Δ, B and C fixed per channel (their gradients are among the parameters').
#[test]
fn mamba_lti_forms_agree() {
    mamba_forms("mamba lti", false);
}

fn mamba_forms(name: &str, selective: bool) {
    let mut config = MambaConfig::new(6);
    config.d_state = 4;
    config.selective = selective;
    let block: Mamba = config.init(&mut Init::new(2, &device()));
    let conv0 = normal([2, 3, 12], 1.0);
    let ssm0 = normal([2, 12, 4], 1.0);
    for t in LENGTHS {
        check_forms(
            name,
            &block,
            t,
            6,
            || {
                let (conv, ssm) = (leaf(&flat(conv0.clone())), leaf(&flat(ssm0.clone())));
                (
                    MambaState {
                        conv: conv.clone().reshape([2, 3, 12]),
                        ssm: ssm.clone().reshape([2, 12, 4]),
                    },
                    vec![conv, ssm],
                )
            },
            |m, x, s, chunk| {
                let scan = chunk.map_or(Scan::Sequential, |chunk_len| Scan::Chunked { chunk_len });
                let (y, s) = m.forward_with(x, Some(s), scan);
                (y, vec![flat(s.conv), flat(s.ssm)])
            },
            |m, x_t, s| m.step(x_t, Some(s)),
            |s| vec![flat(s.conv.clone()), flat(s.ssm.clone())],
        );
    }
}

fn rwkv_state_parts(s: &RwkvState) -> Vec<Tensor<1>> {
    let mut parts = vec![flat(s.shift_time.clone()), flat(s.shift_channel.clone())];
    match &s.wkv {
        // (a, b, p) is a representation; compare what it represents: a/b and ln b + p.
        WkvState::V4(Wkv4State { a, b, p }) => {
            parts.push(flat(a.clone() / b.clone()));
            parts.push(flat(b.clone().log() + p.clone()));
        }
        WkvState::V6(s) => parts.push(flat(s.clone())),
    }
    parts
}

fn check_rwkv(version: u8, fused: bool) {
    let typed = match version {
        4 => Version::V4,
        _ => Version::V6 {
            head_size: Some(4),
            lora_rank: 3,
        },
    };
    let mut config = RwkvConfig::new(8, typed);
    config.ffn_expand = 2;
    let block: Rwkv = config.init(&mut Init::new(3, &device()));
    let shift_time0 = normal([2, 8], 1.0);
    let shift_channel0 = normal([2, 8], 1.0);
    // A state reached by running the block: a valid (a, b, p) or S.
    let (_, reached) = block.valid().forward(normal([2, 6, 8], 1.0).inner(), None);
    let wkv0: Vec<Tensor<1>> = match &reached.wkv {
        WkvState::V4(s) => vec![flat(s.a.clone()), flat(s.b.clone()), flat(s.p.clone())],
        WkvState::V6(s) => vec![flat(s.clone())],
    };
    let wkv0: Vec<Tensor<1>> = wkv0
        .into_iter()
        .map(|t| Tensor::from_data(t.to_data(), &device()))
        .collect();
    for t in LENGTHS {
        let name = format!("rwkv{version}");
        check_forms(
            &name,
            &block,
            t,
            8,
            || {
                let (st, sc) = (
                    leaf(&flat(shift_time0.clone())),
                    leaf(&flat(shift_channel0.clone())),
                );
                let w: Vec<Tensor<1>> = wkv0.iter().map(leaf).collect();
                let wkv = match version {
                    4 => WkvState::V4(Wkv4State {
                        a: w[0].clone().reshape([2, 8]),
                        b: w[1].clone().reshape([2, 8]),
                        p: w[2].clone().reshape([2, 8]),
                    }),
                    _ => WkvState::V6(w[0].clone().reshape([2, 2, 4, 4])),
                };
                let mut leaves = vec![st.clone(), sc.clone()];
                // p only picks the scale of (a, b); its gradient is a matter of representation.
                leaves.extend(w.into_iter().take(if version == 4 { 2 } else { 1 }));
                (
                    RwkvState {
                        shift_time: st.reshape([2, 8]),
                        wkv,
                        shift_channel: sc.reshape([2, 8]),
                    },
                    leaves,
                )
            },
            |m, x, s, chunk| {
                let (y, s) = match chunk {
                    // The fused kernel has no chunks: every "chunk" runs it.
                    Some(_) if fused => m.forward(x, Some(s)),
                    _ => {
                        let form =
                            chunk.map_or(Scan::Sequential, |chunk_len| Scan::Chunked { chunk_len });
                        m.forward_with(x, Some(s), form)
                    }
                };
                (y, rwkv_state_parts(&s))
            },
            |m, x_t, s| m.step(x_t, Some(s)),
            rwkv_state_parts,
        );
    }
}

#[test]
fn rwkv4_forms_agree() {
    check_rwkv(4, false);
}

#[test]
fn rwkv4_fused_agrees_with_sequential() {
    check_rwkv(4, true);
}

#[test]
fn rwkv6_forms_agree() {
    check_rwkv(6, false);
}

#[test]
fn rwkv6_fused_agrees_with_sequential() {
    check_rwkv(6, true);
}

// The classic cells have one fast form, the fused op (`fused::cell_scan`, hand-written
// backward); `check_forms` runs it for every "chunk" (it has none) against `forward_sequential`.

#[test]
fn elman_fused_agrees_with_sequential() {
    for nonlinearity in [Nonlinearity::Tanh, Nonlinearity::Relu] {
        let rnn: Rnn = RnnConfig {
            d_input: 6,
            d_hidden: 6,
            nonlinearity,
            irnn_init: false,
        }
        .init(&mut Init::new(5, &device()));
        let h0 = normal([2, 6], 1.0);
        for t in LENGTHS {
            check_forms(
                &format!("{nonlinearity:?}"),
                &rnn,
                t,
                6,
                || {
                    let h = leaf(&flat(h0.clone()));
                    (h.clone().reshape([2, 6]), vec![h])
                },
                |m, x, h, form| {
                    let (y, h) = match form {
                        None => m.forward_sequential(x, Some(h)),
                        Some(_) => m.forward(x, Some(h)),
                    };
                    (y, vec![flat(h)])
                },
                |m, x_t, h| m.step(x_t, Some(h)),
                |h| vec![flat(h.clone())],
            );
        }
    }
}

#[test]
fn gru_fused_agrees_with_sequential() {
    let gru: Gru = GruConfig {
        d_input: 6,
        d_hidden: 6,
    }
    .init(&mut Init::new(6, &device()));
    let h0 = normal([2, 6], 1.0);
    for t in LENGTHS {
        check_forms(
            "gru",
            &gru,
            t,
            6,
            || {
                let h = leaf(&flat(h0.clone()));
                (h.clone().reshape([2, 6]), vec![h])
            },
            |m, x, h, form| {
                let (y, h) = match form {
                    None => m.forward_sequential(x, Some(h)),
                    Some(_) => m.forward(x, Some(h)),
                };
                (y, vec![flat(h)])
            },
            |m, x_t, h| m.step(x_t, Some(h)),
            |h| vec![flat(h.clone())],
        );
    }
}

#[test]
fn lstm_fused_agrees_with_sequential() {
    let lstm: Lstm = LstmConfig {
        d_input: 6,
        d_hidden: 6,
        forget_bias: 1.0,
    }
    .init(&mut Init::new(7, &device()));
    let (h0, c0) = (normal([2, 6], 1.0), normal([2, 6], 1.0));
    for t in LENGTHS {
        check_forms(
            "lstm",
            &lstm,
            t,
            6,
            || {
                let h = leaf(&flat(h0.clone()));
                let c = leaf(&flat(c0.clone()));
                let state = LstmState {
                    h: h.clone().reshape([2, 6]),
                    c: c.clone().reshape([2, 6]),
                };
                (state, vec![h, c])
            },
            |m, x, s, form| {
                let (y, s) = match form {
                    None => m.forward_sequential(x, Some(s)),
                    Some(_) => m.forward(x, Some(s)),
                };
                (y, vec![flat(s.h), flat(s.c)])
            },
            |m, x_t, s| m.step(x_t, Some(s)),
            |s| vec![flat(s.h.clone()), flat(s.c.clone())],
        );
    }
}

/// The fast form `forward` picks (on ndarray the fused kernel; for the LTI control its
/// convolution, blockwise beyond 256 tokens) and `step` against the sequential definition.
fn mamba_fast_agrees(name: &str, block: &Mamba) {
    let conv0 = normal([2, 3, 12], 1.0);
    let ssm0 = normal([2, 12, 4], 1.0);
    for t in LENGTHS {
        check_forms(
            name,
            block,
            t,
            6,
            || {
                let (conv, ssm) = (leaf(&flat(conv0.clone())), leaf(&flat(ssm0.clone())));
                (
                    MambaState {
                        conv: conv.clone().reshape([2, 3, 12]),
                        ssm: ssm.clone().reshape([2, 12, 4]),
                    },
                    vec![conv, ssm],
                )
            },
            |m, x, s, form| {
                let (y, s) = match form {
                    None => m.forward_with(x, Some(s), Scan::Sequential),
                    Some(_) => m.forward(x, Some(s)),
                };
                (y, vec![flat(s.conv), flat(s.ssm)])
            },
            |m, x_t, s| m.step(x_t, Some(s)),
            |s| vec![flat(s.conv.clone()), flat(s.ssm.clone())],
        );
    }
}

/// The LTI control's convolution form (`auto`), from a non-zero state, over one block and
/// over several (T 300).
#[test]
fn mamba_lti_convolution_agrees_with_sequential() {
    let mut config = MambaConfig::new(6);
    config.d_state = 4;
    config.selective = false;
    let block = config.init(&mut Init::new(5, &device()));
    mamba_fast_agrees("mamba lti, convolution", &block);
}

#[test]
fn mamba_fused_agrees_with_sequential() {
    let mut config = MambaConfig::new(6);
    config.d_state = 4;
    mamba_fast_agrees("mamba fused", &config.init(&mut Init::new(3, &device())));
}

/// Signed eigenvalues (transitions `2·exp(ΔA) − 1`). Δ's bias is drawn around 1 so that
/// transitions of both signs occur.
#[test]
fn mamba_signed_fused_agrees_with_sequential() {
    let mut config = MambaConfig::new(6);
    config.d_state = 4;
    config.eigenvalues = Eigenvalues::Signed;
    let mut block: Mamba = config.init(&mut Init::new(4, &device()));
    let Selection::Selective(selective) = &mut block.selection else {
        unreachable!("a selective block")
    };
    selective.dt_proj.bias = Some(Param::from_tensor((normal([12], 1.0) + 0.5).detach()));
    mamba_fast_agrees("mamba signed, fused", &block);
}

// Attention's fast form is the fused ops (`fused::rope` on queries and keys, then
// `fused::causal_attention`, 64 query rows at a time with a recomputing backward); their
// definitions are `attention::rotate` and `attention::attend`. The "initial state" is a KV
// cache of three earlier tokens, so the fused op also runs with keys before its queries.

#[test]
fn attention_fused_agrees_with_definition() {
    for positions in [Positions::Rotary, Positions::Learned { max_len: 304 }] {
        let attn: Attention = AttentionConfig {
            d_model: 8,
            n_heads: 2,
            positions,
        }
        .init(&mut Init::new(7, &device()));
        // B 2, S 3, H 2, K 4.
        let (k0, v0) = (normal([2, 3, 2, 4], 1.0), normal([2, 3, 2, 4], 1.0));
        for t in LENGTHS {
            check_forms(
                &format!("{positions:?}"),
                &attn,
                t,
                8,
                || {
                    let (k, v) = (leaf(&flat(k0.clone())), leaf(&flat(v0.clone())));
                    let cache = KvCache {
                        k: k.clone().reshape([2, 3, 2, 4]),
                        v: v.clone().reshape([2, 3, 2, 4]),
                    };
                    (cache, vec![k, v])
                },
                |m, x, cache, form| {
                    let (y, cache) = m.forward_with(x, Some(cache), form.is_some());
                    (y, vec![flat(cache.k), flat(cache.v)])
                },
                |m, x_t, cache| m.step(x_t, Some(cache)),
                |cache| vec![flat(cache.k.clone()), flat(cache.v.clone())],
            );
        }
    }
}
