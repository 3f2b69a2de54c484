//! estafet's models against PyTorch, on golden values written by `fixtures/make_fixtures.py`:
//! the classic cells against `torch.nn.RNN/LSTM/GRU` (multi-layer, batch-first), Mamba's scan
//! against `selective_scan_ref`'s equations and RWKV-4's time mix against its official
//! recurrence. Outputs, final states and the gradients of the input and of every parameter.
//!
//! The fixtures are read from the directory named by `ESTAFET_FIXTURES`, else the committed
//! set, so any shape and seed the script can write can be re-checked.
//!
//! Tolerance: `|ours − torch| ≤ 2e-5 + 2e-4·max|torch|` per tensor. torch computed in float32
//! (classic cells) or float64 (Mamba, RWKV); we compute in float32 with other summation
//! orders, so rounding of a few ε = 1.2e-7 per operation accumulates over T·layers steps.

#![allow(deprecated)] // Device::ndarray: the reference CPU backend for these tests

use std::collections::HashMap;
use std::path::PathBuf;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use estafet_models::Init;
use estafet_models::gated_deltanet::{
    Decay, GatedDeltaNet, GatedDeltaNetConfig, GatedDeltaNetState,
};
use estafet_models::gru::GruConfig;
use estafet_models::lstm::{LstmConfig, LstmState};
use estafet_models::mamba::selection::{Fixed, Selection, Selective};
use estafet_models::mamba::{Mamba, MambaConfig, MambaState};
use estafet_models::mamba2::{Mamba2, Mamba2Config, Mamba2State};
use estafet_models::mingru::MinGru;
use estafet_models::minlstm::MinLstm;
use estafet_models::mixer::{Mixer, MixerState};
use estafet_models::mlstm::{Mlstm, MlstmState};
use estafet_models::reference;
use estafet_models::rnn::{Nonlinearity, RnnConfig};
use estafet_models::rwkv::{RwkvConfig, TimeMix, Version, Wkv4State};
use estafet_models::rwkv7::{Rwkv7, Rwkv7Config, Rwkv7State};
use estafet_models::scan::{Compute, Eigenvalues, Form, Scan};
use estafet_models::slstm::{Slstm, SlstmState};
use estafet_models::torch::{HostTensor, load_torch_layer};

fn device() -> Device {
    Device::ndarray().autodiff()
}

struct Fixture {
    name: String,
    tensors: HashMap<String, HostTensor>,
}

impl Fixture {
    fn load(name: &str) -> Self {
        let dir = std::env::var_os("ESTAFET_FIXTURES")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"));
        let path = dir.join(format!("{name}.safetensors"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let tensors = file
            .tensors()
            .into_iter()
            .map(|(key, view)| {
                assert_eq!(view.dtype(), safetensors::Dtype::F32, "{key}");
                (key, HostTensor::from_le_bytes(view.shape(), view.data()))
            })
            .collect();
        Self {
            name: name.into(),
            tensors,
        }
    }

    fn host(&self, key: &str) -> HostTensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no `{key}`", self.name))
            .clone()
    }

    fn shape(&self, key: &str) -> Vec<usize> {
        self.host(key).shape
    }

    fn get<const D: usize>(&self, key: &str) -> Tensor<D> {
        let t = self.host(key);
        let shape: [usize; D] = t
            .shape
            .clone()
            .try_into()
            .unwrap_or_else(|_| panic!("{key}: rank"));
        Tensor::from_data(TensorData::new(t.values, shape), &device())
    }

    fn lookup(&self) -> impl Fn(&str) -> Option<HostTensor> + '_ {
        move |key| self.tensors.get(key).cloned()
    }

    /// Checks `ours` against the fixture's `key`; returns the largest absolute difference.
    fn check<const D: usize>(&self, key: &str, ours: Tensor<D>) -> f32 {
        let expected = self.get::<D>(key);
        assert_eq!(ours.dims(), expected.dims(), "{}: {key} shape", self.name);
        let scale: f32 = expected.clone().abs().max().into_scalar();
        let diff: f32 = (ours - expected).abs().max().into_scalar();
        assert!(
            diff <= 2e-5 + 2e-4 * scale,
            "{}: {key} differs by {diff} (scale {scale})",
            self.name
        );
        diff
    }
}

fn linear_grad(linear: &Linear, grads: &Gradients) -> (Tensor<2>, Tensor<1>) {
    (
        linear.weight.grad(grads).unwrap().transpose(),
        linear.bias.as_ref().unwrap().grad(grads).unwrap(),
    )
}

/// A multi-layer torch RNN/LSTM/GRU as estafet mixers chained (the `stacked` layout).
fn check_classic(name: &str) {
    let f = Fixture::load(name);
    let layers = f.shape("h0")[0];
    let [d, h] = [f.shape("x")[2], f.shape("h0")[2]];
    let mut init = Init::new(0, &device());
    let lookup = f.lookup();
    let mixers: Vec<Mixer> = (0..layers)
        .map(|l| {
            let d_input = if l == 0 { d } else { h };
            let mixer = match name {
                "lstm" => Mixer::Lstm(
                    LstmConfig {
                        d_input,
                        d_hidden: h,
                        forget_bias: 0.0,
                    }
                    .init(&mut init),
                ),
                "gru" => Mixer::Gru(
                    GruConfig {
                        d_input,
                        d_hidden: h,
                    }
                    .init(&mut init),
                ),
                _ => Mixer::Rnn(
                    RnnConfig {
                        d_input,
                        d_hidden: h,
                        nonlinearity: if name == "rnn_relu" {
                            Nonlinearity::Relu
                        } else {
                            Nonlinearity::Tanh
                        },
                        irnn_init: false,
                    }
                    .init(&mut init),
                ),
            };
            load_torch_layer(mixer, l, &lookup, &device()).unwrap()
        })
        .collect();

    let x = f.get::<3>("x").require_grad();
    let h0 = f.get::<3>("h0");
    let mut y = x.clone();
    let mut loss = Tensor::<1>::zeros([1], &device());
    let mut worst = 0.0f32;
    for (l, mixer) in mixers.iter().enumerate() {
        let h0_l = h0.clone().narrow(0, l, 1).squeeze_dim::<2>(0);
        let state = match mixer {
            Mixer::Lstm(_) => MixerState::Lstm(LstmState {
                h: h0_l,
                c: f.get::<3>("c0").narrow(0, l, 1).squeeze_dim(0),
            }),
            _ => MixerState::Hidden(h0_l),
        };
        let (out, last) = mixer.forward(y, Some(state));
        y = out;
        match last {
            MixerState::Lstm(s) => {
                let hn = f.get::<3>("hn").narrow(0, l, 1).squeeze_dim::<2>(0);
                let cn = f.get::<3>("cn").narrow(0, l, 1).squeeze_dim::<2>(0);
                worst = worst.max(close(&f, &format!("hn[{l}]"), s.h.clone(), hn));
                worst = worst.max(close(&f, &format!("cn[{l}]"), s.c.clone(), cn));
                loss = loss + s.h.sum() + s.c.sum();
            }
            MixerState::Hidden(s) => {
                let hn = f.get::<3>("hn").narrow(0, l, 1).squeeze_dim::<2>(0);
                worst = worst.max(close(&f, &format!("hn[{l}]"), s.clone(), hn));
                loss = loss + s.sum();
            }
            other => panic!("{other:?}"),
        }
    }
    worst = worst.max(f.check("y", y.clone()));
    let grads = ((y * f.get::<3>("r")).sum() + loss).backward();
    worst = worst.max(f.check("grad.x", x.grad(&grads).unwrap()));
    for (l, mixer) in mixers.iter().enumerate() {
        let (input, hidden) = match mixer {
            Mixer::Rnn(m) => (&m.input, &m.hidden),
            Mixer::Lstm(m) => (&m.input, &m.hidden),
            Mixer::Gru(m) => (&m.input, &m.hidden),
            _ => unreachable!(),
        };
        for (kind, linear) in [("ih", input), ("hh", hidden)] {
            let (dw, db) = linear_grad(linear, &grads);
            worst = worst.max(f.check(&format!("grad.weight_{kind}_l{l}"), dw));
            worst = worst.max(f.check(&format!("grad.bias_{kind}_l{l}"), db));
        }
    }
    println!("{name}: largest |estafet − torch| = {worst:.2e}");
}

fn close<const D: usize>(f: &Fixture, what: &str, ours: Tensor<D>, expected: Tensor<D>) -> f32 {
    let scale: f32 = expected.clone().abs().max().into_scalar();
    let diff: f32 = (ours - expected).abs().max().into_scalar();
    assert!(
        diff <= 2e-5 + 2e-4 * scale,
        "{}: {what} differs by {diff}",
        f.name
    );
    diff
}

#[test]
fn rnn_tanh_matches_torch() {
    check_classic("rnn_tanh");
}

#[test]
fn rnn_relu_matches_torch() {
    check_classic("rnn_relu");
}

#[test]
fn lstm_matches_torch() {
    check_classic("lstm");
}

#[test]
fn gru_matches_torch() {
    check_classic("gru");
}

fn param<const D: usize>(t: Tensor<D>) -> Param<Tensor<D>> {
    Param::from_tensor(t)
}

#[test]
fn mamba_matches_selective_scan_ref() {
    check_mamba("mamba", Eigenvalues::Positive);
}

/// Transitions `2·exp(ΔA) − 1`, some of them negative; no chunked form.
#[test]
fn mamba_with_signed_eigenvalues_matches_selective_scan_ref() {
    check_mamba("mamba_signed", Eigenvalues::Signed);
}

/// The LTI control (`selective = false`): the reference's branch with B and C fixed per
/// channel, and Δ one parameter per channel; sequential, chunked and convolution forms.
#[test]
fn mamba_lti_matches_selective_scan_ref() {
    check_mamba("mamba_lti", Eigenvalues::Positive);
}

fn check_mamba(name: &str, eigenvalues: Eigenvalues) {
    let f = Fixture::load(name);
    let d = f.shape("x")[2];
    let [di, n] = [f.shape("A_log")[0], f.shape("A_log")[1]];
    let k = f.shape("conv1d.weight")[2];
    let selective = f.tensors.contains_key("x_proj.weight");
    // `None`: the fast form, the fused kernel (`fused::selective_scan`) for the selective maps,
    // the convolution for the fixed ones.
    let mut forms = vec![Some(Scan::Sequential), None];
    if eigenvalues == Eigenvalues::Positive {
        forms.push(Some(Scan::Chunked { chunk_len: 3 }));
    }
    for form in forms {
        let fast = if selective { Form::Fused } else { Form::Auto };
        let scan = form.map_or(fast, Form::Tensor);
        let mut config = MambaConfig::new(d);
        config.d_state = n;
        config.d_conv = k;
        config.expand = di / d;
        config.selective = selective;
        let template = config.init(&mut Init::new(0, &device()));
        let selection = if selective {
            Selection::Selective(Selective {
                x_proj: Linear {
                    weight: param(f.get::<2>("x_proj.weight").transpose()),
                    bias: None,
                },
                dt_proj: Linear {
                    weight: param(f.get::<2>("dt_proj.weight").transpose()),
                    bias: Some(param(f.get::<1>("dt_proj.bias"))),
                },
            })
        } else {
            Selection::Fixed(Fixed {
                dt_bias: param(f.get::<1>("dt_bias")),
                b: param(f.get::<2>("B")),
                c: param(f.get::<2>("C")),
            })
        };
        let m = Mamba {
            in_proj: Linear {
                weight: param(f.get::<2>("in_proj.weight").transpose()),
                bias: None,
            },
            conv_weight: param(f.get::<3>("conv1d.weight").reshape([di, k]).transpose()),
            conv_bias: param(f.get::<1>("conv1d.bias")),
            selection,
            a_log: param(f.get::<2>("A_log")),
            d: param(f.get::<1>("D")),
            out_proj: Linear {
                weight: param(f.get::<2>("out_proj.weight").transpose()),
                bias: None,
            },
            eigenvalues,
            scan,
        };
        assert_eq!(m.state_size(), template.state_size());
        let x = f.get::<3>("x").require_grad();
        let (y, state): (Tensor<3>, MambaState) = match form {
            Some(scan) => m.forward_with(x.clone(), None, scan),
            None => m.forward(x.clone(), None),
        };
        let mut worst = f
            .check("y", y.clone())
            .max(f.check("hn", state.ssm.clone()));
        let grads = ((y * f.get::<3>("r")).sum() + state.ssm.sum()).backward();
        worst = worst.max(f.check("grad.x", x.grad(&grads).unwrap()));
        worst = worst.max(f.check(
            "grad.in_proj.weight",
            m.in_proj.weight.grad(&grads).unwrap().transpose(),
        ));
        worst = worst.max(
            f.check(
                "grad.conv1d.weight",
                m.conv_weight
                    .grad(&grads)
                    .unwrap()
                    .transpose()
                    .reshape([di, 1, k]),
            ),
        );
        worst = worst.max(f.check("grad.conv1d.bias", m.conv_bias.grad(&grads).unwrap()));
        match &m.selection {
            Selection::Selective(s) => {
                worst = worst.max(f.check(
                    "grad.x_proj.weight",
                    s.x_proj.weight.grad(&grads).unwrap().transpose(),
                ));
                let (dw, db) = linear_grad(&s.dt_proj, &grads);
                worst = worst
                    .max(f.check("grad.dt_proj.weight", dw))
                    .max(f.check("grad.dt_proj.bias", db));
            }
            Selection::Fixed(s) => {
                worst = worst
                    .max(f.check("grad.dt_bias", s.dt_bias.grad(&grads).unwrap()))
                    .max(f.check("grad.B", s.b.grad(&grads).unwrap()))
                    .max(f.check("grad.C", s.c.grad(&grads).unwrap()));
            }
        }
        worst = worst.max(f.check("grad.A_log", m.a_log.grad(&grads).unwrap()));
        worst = worst.max(f.check("grad.D", m.d.grad(&grads).unwrap()));
        worst = worst.max(f.check(
            "grad.out_proj.weight",
            m.out_proj.weight.grad(&grads).unwrap().transpose(),
        ));
        println!("{name} ({form:?}): largest |estafet − reference| = {worst:.2e}");
    }
}

/// sLSTM against the xLSTM equations with the official kernel's stabiliser, from a non-zero
/// state: outputs, all four final states, and the gradients of the input, of every part of
/// the initial state (the stabiliser's included) and of every parameter.
#[test]
fn slstm_matches_the_xlstm_recurrence() {
    let f = Fixture::load("slstm");
    let layer = Slstm {
        input: Linear {
            weight: param(f.get::<2>("W.weight").transpose()),
            bias: Some(param(f.get::<1>("W.bias"))),
        },
        recurrent: param(f.get::<3>("R")),
        norm: param(f.get::<1>("norm.weight")),
    };
    // The definition (tensor ops step by step) and the fused op.
    for fused in [false, true] {
        let x = f.get::<3>("x").require_grad();
        let leaves = ["h0", "c0", "n0", "m0"].map(|k| f.get::<2>(k).require_grad());
        let [h0, c0, n0, m0] = leaves.clone();
        let (y, s) = layer.forward_with(
            x.clone(),
            Some(SlstmState {
                h: h0,
                c: c0,
                n: n0,
                m: m0,
            }),
            fused,
        );
        let mut worst = f.check("y", y.clone());
        for (key, part) in [("hn", &s.h), ("cn", &s.c), ("nn", &s.n), ("mn", &s.m)] {
            worst = worst.max(f.check(key, part.clone()));
        }
        let loss = (y * f.get::<3>("r")).sum() + s.h.sum() + s.c.sum() + s.n.sum() + s.m.sum();
        let grads = loss.backward();
        worst = worst.max(f.check("grad.x", x.grad(&grads).unwrap()));
        for (key, leaf) in ["h0", "c0", "n0", "m0"].iter().zip(&leaves) {
            worst = worst.max(f.check(&format!("grad.{key}"), leaf.grad(&grads).unwrap()));
        }
        let (dw, db) = linear_grad(&layer.input, &grads);
        worst = worst
            .max(f.check("grad.W.weight", dw))
            .max(f.check("grad.W.bias", db))
            .max(f.check("grad.R", layer.recurrent.grad(&grads).unwrap()))
            .max(f.check("grad.norm.weight", layer.norm.grad(&grads).unwrap()));
        println!("slstm (fused: {fused}): largest |estafet − reference| = {worst:.2e}");
    }
}

/// mLSTM against xLSTM's layer around `mlstm_kernels`' native step, in every form, from a
/// non-zero state: outputs, the three parts of the final state, and the gradients of the
/// input, of every part of the initial state (the stabiliser's included) and of every
/// parameter.
#[test]
fn mlstm_matches_the_native_step() {
    let f = Fixture::load("mlstm");
    let linear = |name: &str, bias: bool| Linear {
        weight: param(f.get::<2>(&format!("{name}.weight")).transpose()),
        bias: bias.then(|| param(f.get::<1>(&format!("{name}.bias")))),
    };
    let heads = f.shape("m0")[1];
    let chunked = Form::Tensor(Scan::Chunked { chunk_len: 3 });
    for scan in [Form::Tensor(Scan::Sequential), chunked, Form::Fused] {
        let layer = Mlstm {
            q_proj: linear("q_proj", false),
            k_proj: linear("k_proj", false),
            v_proj: linear("v_proj", false),
            i_gate: linear("i_gate", true),
            f_gate: linear("f_gate", true),
            o_gate: linear("o_gate", false),
            norm_weight: param(f.get::<1>("norm.weight")),
            out_proj: linear("out_proj", false),
            n_heads: heads,
            scan,
        };
        let x = f.get::<3>("x").require_grad();
        let (c0, n0, m0) = (
            f.get::<4>("c0").require_grad(),
            f.get::<3>("n0").require_grad(),
            f.get::<2>("m0").require_grad(),
        );
        let (y, s) = layer.forward(
            x.clone(),
            Some(MlstmState {
                c: c0.clone(),
                n: n0.clone(),
                m: m0.clone(),
            }),
        );
        let mut worst = f
            .check("y", y.clone())
            .max(f.check("cn", s.c.clone()))
            .max(f.check("nn", s.n.clone()))
            .max(f.check("mn", s.m.clone()));
        let loss = (y * f.get::<3>("r")).sum() + s.c.sum() + s.n.sum() + s.m.sum();
        let grads = loss.backward();
        worst = worst
            .max(f.check("grad.x", x.grad(&grads).unwrap()))
            .max(f.check("grad.c0", c0.grad(&grads).unwrap()))
            .max(f.check("grad.n0", n0.grad(&grads).unwrap()))
            .max(f.check("grad.m0", m0.grad(&grads).unwrap()))
            .max(f.check("grad.norm.weight", layer.norm_weight.grad(&grads).unwrap()));
        for (name, l) in [
            ("q_proj", &layer.q_proj),
            ("k_proj", &layer.k_proj),
            ("v_proj", &layer.v_proj),
            ("o_gate", &layer.o_gate),
            ("out_proj", &layer.out_proj),
        ] {
            let g = l.weight.grad(&grads).unwrap().transpose();
            worst = worst.max(f.check(&format!("grad.{name}.weight"), g));
        }
        for (name, l) in [("i_gate", &layer.i_gate), ("f_gate", &layer.f_gate)] {
            let (dw, db) = linear_grad(l, &grads);
            worst = worst
                .max(f.check(&format!("grad.{name}.weight"), dw))
                .max(f.check(&format!("grad.{name}.bias"), db));
        }
        println!("mlstm ({scan:?}): largest |estafet − reference| = {worst:.2e}");
    }
}

/// RWKV-7's time mix against the reference's `RWKV_Tmix_x070` (first layer, no value
/// residual), in every form, from a non-zero state and token shift: outputs, final state and
/// the gradients of the input, the initial state and shift, and every parameter.
#[test]
fn rwkv7_matches_the_reference_time_mix() {
    let f = Fixture::load("rwkv7");
    let linear = |name: &str| Linear {
        weight: param(f.get::<2>(&format!("{name}.weight")).transpose()),
        bias: None,
    };
    // Per-channel vectors are the reference's `[1, 1, C]`.
    let d = f.shape("x")[2];
    let p1 = |name: &str| {
        let t = f.host(name);
        let v = Tensor::<1>::from_data(
            TensorData::new(t.values, [t.shape.iter().product::<usize>()]),
            &device(),
        );
        param(v)
    };
    let p2 = |name: &str| param(f.get::<2>(name));
    let chunked = Form::Tensor(Scan::Chunked { chunk_len: 3 });
    for scan in [Form::Tensor(Scan::Sequential), chunked, Form::Fused] {
        let layer = Rwkv7 {
            x_r: p1("x_r"),
            x_w: p1("x_w"),
            x_k: p1("x_k"),
            x_v: p1("x_v"),
            x_a: p1("x_a"),
            x_g: p1("x_g"),
            w0: p1("w0"),
            w1: p2("w1"),
            w2: p2("w2"),
            a0: p1("a0"),
            a1: p2("a1"),
            a2: p2("a2"),
            g1: p2("g1"),
            g2: p2("g2"),
            k_k: p1("k_k"),
            k_a: p1("k_a"),
            r_k: p2("r_k"),
            receptance: linear("receptance"),
            key: linear("key"),
            value: linear("value"),
            output: linear("output"),
            ln_x_weight: p1("ln_x.weight"),
            ln_x_bias: p1("ln_x.bias"),
            scan,
        };
        let x = f.get::<3>("x").require_grad();
        let shift0 = f.get::<2>("shift0").require_grad();
        let s0 = f.get::<4>("s0").require_grad();
        let (y, s) = layer.forward(
            x.clone(),
            Some(Rwkv7State {
                shift: shift0.clone(),
                s: s0.clone(),
            }),
        );
        let mut worst = f.check("y", y.clone()).max(f.check("sn", s.s.clone()));
        let loss = (y * f.get::<3>("r")).sum() + s.s.sum() + s.shift.sum();
        let grads = loss.backward();
        worst = worst
            .max(f.check("grad.x", x.grad(&grads).unwrap()))
            .max(f.check("grad.shift0", shift0.grad(&grads).unwrap()))
            .max(f.check("grad.s0", s0.grad(&grads).unwrap()));
        for (name, p) in [
            ("x_r", &layer.x_r),
            ("x_w", &layer.x_w),
            ("x_k", &layer.x_k),
            ("x_v", &layer.x_v),
            ("x_a", &layer.x_a),
            ("x_g", &layer.x_g),
            ("w0", &layer.w0),
            ("a0", &layer.a0),
            ("k_k", &layer.k_k),
            ("k_a", &layer.k_a),
        ] {
            let g = p.grad(&grads).unwrap().reshape([1, 1, d]);
            worst = worst.max(f.check(&format!("grad.{name}"), g));
        }
        for (name, p) in [
            ("ln_x.weight", &layer.ln_x_weight),
            ("ln_x.bias", &layer.ln_x_bias),
        ] {
            worst = worst.max(f.check(&format!("grad.{name}"), p.grad(&grads).unwrap()));
        }
        for (name, p) in [
            ("w1", &layer.w1),
            ("w2", &layer.w2),
            ("a1", &layer.a1),
            ("a2", &layer.a2),
            ("g1", &layer.g1),
            ("g2", &layer.g2),
            ("r_k", &layer.r_k),
        ] {
            worst = worst.max(f.check(&format!("grad.{name}"), p.grad(&grads).unwrap()));
        }
        for (name, l) in [
            ("receptance", &layer.receptance),
            ("key", &layer.key),
            ("value", &layer.value),
            ("output", &layer.output),
        ] {
            let g = l.weight.grad(&grads).unwrap().transpose();
            worst = worst.max(f.check(&format!("grad.{name}.weight"), g));
        }
        println!("rwkv7 ({scan:?}): largest |estafet − reference| = {worst:.2e}");
    }
}

/// minGRU or minLSTM (the fixture `name`) against the paper's log-space recurrence, in every
/// form: outputs, final state and the gradients of the input and both parameters. `forward`
/// builds the cell from its input projection and form and runs it from `h0`.
fn min_rnn_matches_the_paper(
    name: &str,
    forward: impl Fn(Linear, Form, Tensor<3>, Tensor<2>) -> (Tensor<3>, Tensor<2>),
) {
    let f = Fixture::load(name);
    let input = Linear {
        weight: param(f.get::<2>("input.weight").transpose()),
        bias: Some(param(f.get::<1>("input.bias"))),
    };
    let chunked = Form::Tensor(Scan::Chunked { chunk_len: 3 });
    for scan in [Form::Tensor(Scan::Sequential), chunked, Form::Fused] {
        let x = f.get::<3>("x").require_grad();
        let (y, h) = forward(input.clone(), scan, x.clone(), f.get::<2>("h0"));
        let mut worst = f.check("y", y.clone()).max(f.check("hn", h.clone()));
        let grads = ((y * f.get::<3>("r")).sum() + h.sum()).backward();
        worst = worst.max(f.check("grad.x", x.grad(&grads).unwrap()));
        let (dw, db) = linear_grad(&input, &grads);
        worst = worst
            .max(f.check("grad.input.weight", dw))
            .max(f.check("grad.input.bias", db));
        println!("{name} ({scan:?}): largest |estafet − reference| = {worst:.2e}");
    }
}

#[test]
fn mingru_matches_the_papers_log_space_recurrence() {
    min_rnn_matches_the_paper("mingru", |input, scan, x, h0| {
        MinGru { input, scan }.forward(x, Some(h0))
    });
}

#[test]
fn minlstm_matches_the_papers_log_space_recurrence() {
    min_rnn_matches_the_paper("minlstm", |input, scan, x, h0| {
        MinLstm { input, scan }.forward(x, Some(h0))
    });
}

/// Mamba-2 against `Mamba2Simple`'s block with `ssd_minimal_discrete` (and, signed, the
/// recurrence step by step), in every form the eigenvalue range allows: outputs, final state
/// and the gradients of the input, the initial state and every parameter.
#[test]
fn mamba2_matches_ssd_minimal() {
    for (name, eigenvalues) in [
        ("mamba2", Eigenvalues::Positive),
        ("mamba2_signed", Eigenvalues::Signed),
    ] {
        let f = Fixture::load(name);
        let [b, _, _] = [f.shape("x")[0], f.shape("x")[1], f.shape("x")[2]];
        let [c, _, k] = [
            f.shape("conv1d.weight")[0],
            f.shape("conv1d.weight")[1],
            f.shape("conv1d.weight")[2],
        ];
        let mut forms = vec![Form::Tensor(Scan::Sequential), Form::Fused];
        if eigenvalues == Eigenvalues::Positive {
            forms.push(Form::Tensor(Scan::Chunked { chunk_len: 3 }));
        }
        for scan in forms {
            let block = Mamba2 {
                in_proj: Linear {
                    weight: param(f.get::<2>("in_proj.weight").transpose()),
                    bias: None,
                },
                conv_weight: param(f.get::<3>("conv1d.weight").reshape([c, k]).transpose()),
                conv_bias: param(f.get::<1>("conv1d.bias")),
                dt_bias: param(f.get::<1>("dt_bias")),
                a_log: param(f.get::<1>("A_log")),
                d: param(f.get::<1>("D")),
                norm_weight: param(f.get::<1>("norm.weight")),
                out_proj: Linear {
                    weight: param(f.get::<2>("out_proj.weight").transpose()),
                    bias: None,
                },
                d_state: f.shape("h0")[3],
                eigenvalues,
                scan,
            };
            let x = f.get::<3>("x").require_grad();
            let h0 = f.get::<4>("h0").require_grad();
            let state = Mamba2State {
                conv: Tensor::zeros([b, k - 1, c], &device()),
                ssm: h0.clone(),
            };
            let (y, state) = block.forward(x.clone(), Some(state));
            let mut worst = f
                .check("y", y.clone())
                .max(f.check("hn", state.ssm.clone()));
            let grads = ((y * f.get::<3>("r")).sum() + state.ssm.sum()).backward();
            worst = worst
                .max(f.check("grad.x", x.grad(&grads).unwrap()))
                .max(f.check("grad.h0", h0.grad(&grads).unwrap()))
                .max(f.check(
                    "grad.in_proj.weight",
                    block.in_proj.weight.grad(&grads).unwrap().transpose(),
                ))
                .max(
                    f.check(
                        "grad.conv1d.weight",
                        block
                            .conv_weight
                            .grad(&grads)
                            .unwrap()
                            .transpose()
                            .reshape([c, 1, k]),
                    ),
                )
                .max(f.check("grad.conv1d.bias", block.conv_bias.grad(&grads).unwrap()))
                .max(f.check("grad.dt_bias", block.dt_bias.grad(&grads).unwrap()))
                .max(f.check("grad.A_log", block.a_log.grad(&grads).unwrap()))
                .max(f.check("grad.D", block.d.grad(&grads).unwrap()))
                .max(f.check("grad.norm.weight", block.norm_weight.grad(&grads).unwrap()))
                .max(f.check(
                    "grad.out_proj.weight",
                    block.out_proj.weight.grad(&grads).unwrap().transpose(),
                ));
            println!("{name} ({scan:?}): largest |estafet − reference| = {worst:.2e}");
        }
    }
}

/// Gated DeltaNet against fla's layer around `naive_recurrent_gated_delta_rule`, in every
/// form: outputs, final state and the gradients of the input, the initial state and every
/// parameter.
#[test]
fn gated_deltanet_matches_fla() {
    let f = Fixture::load("gated_deltanet");
    let [b, _, d] = [f.shape("x")[0], f.shape("x")[1], f.shape("x")[2]];
    let [_, h, dk, dv] = [
        f.shape("s0")[0],
        f.shape("s0")[1],
        f.shape("s0")[2],
        f.shape("s0")[3],
    ];
    let linear = |name: &str| Linear {
        weight: param(f.get::<2>(&format!("{name}.weight")).transpose()),
        bias: None,
    };
    let conv = |name: &str| {
        let w = f.get::<3>(&format!("{name}.weight"));
        let [c, _, k] = w.dims();
        w.reshape([c, k]).transpose() // [K, C]
    };
    let chunked = Form::Tensor(Scan::Chunked { chunk_len: 3 });
    for scan in [Form::Tensor(Scan::Sequential), chunked, Form::Fused] {
        let layer = GatedDeltaNet {
            q_proj: linear("q_proj"),
            k_proj: linear("k_proj"),
            v_proj: linear("v_proj"),
            conv_weight: param(Tensor::cat(
                vec![conv("q_conv1d"), conv("k_conv1d"), conv("v_conv1d")],
                1,
            )),
            b_proj: linear("b_proj"),
            decay: Some(Decay {
                a_proj: linear("a_proj"),
                a_log: param(f.get::<1>("A_log")),
                dt_bias: param(f.get::<1>("dt_bias")),
            }),
            g_proj: linear("g_proj"),
            norm_weight: param(f.get::<1>("o_norm.weight")),
            o_proj: linear("o_proj"),
            n_heads: h,
            eigenvalues: Eigenvalues::Positive,
            scan,
        };
        let x = f.get::<3>("x").require_grad();
        let s0 = f.get::<4>("s0").require_grad();
        let state = GatedDeltaNetState {
            conv: Tensor::zeros([b, 3, 2 * h * dk + h * dv], &device()),
            s: s0.clone(),
        };
        assert_eq!(d, layer.o_proj.weight.dims()[1]);
        let (y, state) = layer.forward(x.clone(), Some(state));
        let mut worst = f.check("y", y.clone()).max(f.check("hn", state.s.clone()));
        let grads = ((y * f.get::<3>("r")).sum() + state.s.sum()).backward();
        worst = worst
            .max(f.check("grad.x", x.grad(&grads).unwrap()))
            .max(f.check("grad.s0", s0.grad(&grads).unwrap()));
        for (name, l) in [
            ("q_proj", &layer.q_proj),
            ("k_proj", &layer.k_proj),
            ("v_proj", &layer.v_proj),
            ("b_proj", &layer.b_proj),
            ("g_proj", &layer.g_proj),
            ("o_proj", &layer.o_proj),
        ] {
            let g = l.weight.grad(&grads).unwrap().transpose();
            worst = worst.max(f.check(&format!("grad.{name}.weight"), g));
        }
        let decay = layer.decay.as_ref().unwrap();
        worst = worst
            .max(f.check(
                "grad.a_proj.weight",
                decay.a_proj.weight.grad(&grads).unwrap().transpose(),
            ))
            .max(f.check("grad.A_log", decay.a_log.grad(&grads).unwrap()))
            .max(f.check("grad.dt_bias", decay.dt_bias.grad(&grads).unwrap()))
            .max(f.check(
                "grad.o_norm.weight",
                layer.norm_weight.grad(&grads).unwrap(),
            ));
        let dconv = layer.conv_weight.grad(&grads).unwrap(); // [K, 2·H·d_k + H·d_v]
        let k = dconv.dims()[0];
        for (name, from, width) in [
            ("q_conv1d", 0, h * dk),
            ("k_conv1d", h * dk, h * dk),
            ("v_conv1d", 2 * h * dk, h * dv),
        ] {
            let g = dconv
                .clone()
                .narrow(1, from, width)
                .transpose()
                .reshape([width, 1, k]);
            worst = worst.max(f.check(&format!("grad.{name}.weight"), g));
        }
        println!("gated_deltanet ({scan:?}): largest |estafet − reference| = {worst:.2e}");
    }
}

/// RWKV-6's WKV against fla's `naive_recurrent_rwkv6` (float64 in PyTorch): the sequential
/// definition, the chunked form and the fused op, outputs, final state and every gradient.
#[test]
fn rwkv6_wkv_matches_the_reference_recurrence() {
    let f = Fixture::load("rwkv6_wkv");
    let [b, h, t, n] = [
        f.shape("r")[0],
        f.shape("r")[1],
        f.shape("r")[2],
        f.shape("r")[3],
    ];
    for form in ["sequential", "chunked", "fused"] {
        let leaf = |key: &str| f.get::<4>(key).require_grad();
        let (r, k, v, w, h0) = (leaf("r"), leaf("k"), leaf("v"), leaf("w"), leaf("h0"));
        let u = f.get::<2>("u").require_grad();
        let u4 = || u.clone().reshape([1, h, 1, n]);
        let (o, hn) = match form {
            "fused" => {
                let rows = |x: &Tensor<4>| x.clone().reshape([b * h, t, n]);
                let out = estafet_models::fused::wkv6(
                    rows(&r),
                    rows(&k),
                    rows(&v),
                    rows(&w),
                    u.clone()
                        .unsqueeze_dim::<3>(0)
                        .expand([b, h, n])
                        .reshape([b * h, n]),
                    h0.clone().reshape([b * h, n, n]),
                );
                (
                    out.clone().narrow(1, 0, t * n).reshape([b, h, t, n]),
                    out.narrow(1, t * n, n * n).reshape([b, h, n, n]),
                )
            }
            _ => {
                let scan = match form {
                    "chunked" => Scan::Chunked { chunk_len: 3 },
                    _ => Scan::Sequential,
                };
                let (r, k, v, w) = (r.clone(), k.clone(), v.clone(), w.clone());
                estafet_models::rwkv::wkv6(r, k, v, w, u4(), h0.clone(), scan)
            }
        };
        let mut worst = f.check("o", o.clone()).max(f.check("hn", hn.clone()));
        let grads = ((o * f.get::<4>("ro")).sum() + (hn * f.get::<4>("rh")).sum()).backward();
        for (name, x) in [("r", &r), ("k", &k), ("v", &v), ("w", &w), ("h0", &h0)] {
            worst = worst.max(f.check(&format!("grad.{name}"), x.grad(&grads).unwrap()));
        }
        worst = worst.max(f.check("grad.u", u.grad(&grads).unwrap()));
        eprintln!("rwkv6 wkv, {form}: max |Δ| {worst:.2e}");
    }
}

#[test]
fn rwkv4_time_mix_matches_the_official_recurrence() {
    let f = Fixture::load("rwkv4_time_mix");
    let [b, _, d] = [f.shape("x")[0], f.shape("x")[1], f.shape("x")[2]];
    for form in [
        Compute::Tensor(Scan::Sequential),
        Compute::Tensor(Scan::Chunked { chunk_len: 3 }),
        Compute::Fused,
    ] {
        let block = RwkvConfig::new(d, Version::V4).init(&mut Init::new(0, &device()));
        let TimeMix::V4(mut tm) = block.time_mix else {
            unreachable!()
        };
        tm.time_decay = param(f.get("att.time_decay"));
        tm.time_first = param(f.get("att.time_first"));
        tm.mix_k = param(f.get("att.time_mix_k"));
        tm.mix_v = param(f.get("att.time_mix_v"));
        tm.mix_r = param(f.get("att.time_mix_r"));
        for (linear, name) in [
            (&mut tm.key, "key"),
            (&mut tm.value, "value"),
            (&mut tm.receptance, "receptance"),
            (&mut tm.output, "output"),
        ] {
            linear.weight = param(f.get::<2>(&format!("att.{name}.weight")).transpose());
        }
        let x = f.get::<3>("x").require_grad();
        let zero = Wkv4State {
            a: Tensor::zeros([b, d], &device()),
            b: Tensor::zeros([b, d], &device()),
            p: Tensor::full([b, d], -1e38, &device()),
        };
        let (y, _, _) = tm.forward(x.clone(), f.get("shift0"), zero, form);
        let mut worst = f.check("y", y.clone());
        let grads = (y * f.get::<3>("r")).sum().backward();
        worst = worst.max(f.check("grad.x", x.grad(&grads).unwrap()));
        for (name, g) in [
            ("time_decay", tm.time_decay.grad(&grads)),
            ("time_first", tm.time_first.grad(&grads)),
            ("time_mix_k", tm.mix_k.grad(&grads)),
            ("time_mix_v", tm.mix_v.grad(&grads)),
            ("time_mix_r", tm.mix_r.grad(&grads)),
        ] {
            worst = worst.max(f.check(&format!("grad.att.{name}"), g.unwrap()));
        }
        for (linear, name) in [
            (&tm.key, "key"),
            (&tm.value, "value"),
            (&tm.receptance, "receptance"),
            (&tm.output, "output"),
        ] {
            let g = linear.weight.grad(&grads).unwrap().transpose();
            worst = worst.max(f.check(&format!("grad.att.{name}.weight"), g));
        }
        println!("rwkv4 time mix ({form:?}): largest |estafet − reference| = {worst:.2e}");
    }
}

/// `reference::load` reads each fixture's parameters by the reference's names alone, into a
/// mixer built from its config at the fixture's sizes, and the mixer then gives the fixture's
/// outputs and final state; `reference::collect` writes back exactly the fixture's tensors.
#[test]
fn reference_names_read_and_write_the_fixtures() {
    let dev = device();
    let init = |seed| Init::new(seed, &dev);
    for name in ["mamba", "mamba_lti", "mamba2", "gated_deltanet", "rwkv7"] {
        let f = Fixture::load(name);
        let [b, _, d] = [f.shape("x")[0], f.shape("x")[1], f.shape("x")[2]];
        let mixer = match name {
            "mamba" | "mamba_lti" => {
                let mut c = MambaConfig::new(d);
                c.d_state = f.shape("A_log")[1];
                c.d_conv = f.shape("conv1d.weight")[2];
                c.expand = f.shape("A_log")[0] / d;
                c.selective = name == "mamba";
                Mixer::Mamba(c.init(&mut init(7)))
            }
            "mamba2" => {
                let [h, p_, n] = [f.shape("h0")[1], f.shape("h0")[2], f.shape("h0")[3]];
                let c = Mamba2Config {
                    d_model: d,
                    d_state: n,
                    expand: h * p_ / d,
                    head_dim: p_,
                    d_conv: f.shape("conv1d.weight")[2],
                    eigenvalues: Eigenvalues::Positive,
                    scan: Form::Auto,
                };
                Mixer::Mamba2(c.init(&mut init(7)))
            }
            "gated_deltanet" => {
                let [h, dk, dv] = [f.shape("s0")[1], f.shape("s0")[2], f.shape("s0")[3]];
                let c = GatedDeltaNetConfig {
                    d_model: d,
                    n_heads: h,
                    head_dim: dk,
                    head_v_dim: dv,
                    d_conv: f.shape("q_conv1d.weight")[2],
                    gate: true,
                    eigenvalues: Eigenvalues::Positive,
                    scan: Form::Auto,
                };
                Mixer::GatedDeltaNet(c.init(&mut init(7)))
            }
            _ => {
                let c = Rwkv7Config {
                    d_model: d,
                    head_size: f.shape("r_k")[1],
                    lora_rank: f.shape("w1")[1],
                    scan: Form::Auto,
                };
                Mixer::Rwkv7(c.init(&mut init(7)))
            }
        };
        let mixer =
            reference::load(mixer, &f.lookup(), &dev).unwrap_or_else(|e| panic!("{name}: {e}"));
        let written = reference::collect(&mixer).unwrap();
        for (key, t) in &written {
            assert_eq!(t, &f.host(key), "{name}: {key} written back");
        }
        let params = f.tensors.keys().filter(|k| !k.starts_with("grad.")).count();
        assert_eq!(
            written.len(),
            params - inputs(name),
            "{name}: every tensor written"
        );
        let x = f.get::<3>("x");
        let (y, state) = match mixer {
            Mixer::Mamba(m) => {
                let (y, s) = m.forward(x, None);
                (y, f.check("hn", s.ssm))
            }
            Mixer::Mamba2(m) => {
                let k = m.conv_weight.dims();
                let state = Mamba2State {
                    conv: Tensor::zeros([b, k[0] - 1, k[1]], &dev),
                    ssm: f.get::<4>("h0"),
                };
                let (y, s) = m.forward(x, Some(state));
                (y, f.check("hn", s.ssm))
            }
            Mixer::GatedDeltaNet(m) => {
                let k = m.conv_weight.dims();
                let state = GatedDeltaNetState {
                    conv: Tensor::zeros([b, k[0] - 1, k[1]], &dev),
                    s: f.get::<4>("s0"),
                };
                let (y, s) = m.forward(x, Some(state));
                (y, f.check("hn", s.s))
            }
            Mixer::Rwkv7(m) => {
                let state = Rwkv7State {
                    shift: f.get::<2>("shift0"),
                    s: f.get::<4>("s0"),
                };
                let (y, s) = m.forward(x, Some(state));
                (y, f.check("sn", s.s))
            }
            _ => unreachable!(),
        };
        let worst = f.check("y", y).max(state);
        println!("{name} by reference names: largest |estafet − reference| = {worst:.2e}");
    }
}

/// The fixture's tensors that are not parameters nor gradients: inputs, initial states,
/// the loss weights `r` and the outputs.
fn inputs(name: &str) -> usize {
    match name {
        "mamba" | "mamba_lti" => 4,       // x r y hn
        "mamba2" | "gated_deltanet" => 5, // x r y hn + h0 | s0
        _ => 6,                           // x r y sn shift0 s0
    }
}
