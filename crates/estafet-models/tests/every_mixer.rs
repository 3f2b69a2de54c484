//! Properties every mixer must have, checked on every kind through the model stack (and on a
//! hybrid stack of three kinds): finite-difference gradients, a small stack overfitting a tiny
//! batch, and windows with a carried state equal to one forward.

#![allow(deprecated)] // Device::ndarray: the reference CPU backend for these tests

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use estafet_models::init::FillZeros;
use estafet_models::{Init, Input, InputSpec, Layout, MixerConfig, ModelConfig, ModelIo};

fn device() -> Device {
    Device::ndarray().autodiff()
}

/// Every kind with its defaults, plus RWKV-6, Mamba with signed eigenvalues, Mamba-2 signed
/// and chunked, and mLSTM and RWKV-7 chunked.
fn every_mixer() -> Vec<(String, MixerConfig)> {
    MixerConfig::KINDS
        .iter()
        .map(|kind| match *kind {
            // At width 8 the default 4 heads would group-normalise pairs of units, a near sign
            // function whose slope (~1/√1e-5 where the two meet) no finite difference follows.
            "slstm" | "mlstm" => serde_json::json!({ "kind": kind, "n_heads": 2 }),
            _ => serde_json::json!({ "kind": kind }),
        })
        .chain([
            serde_json::json!({ "kind": "rwkv", "version": 6, "head_size": 4 }),
            serde_json::json!({ "kind": "mamba", "eigenvalues": "signed" }),
            serde_json::json!({ "kind": "mamba2", "head_dim": 4, "eigenvalues": "signed" }),
            serde_json::json!({ "kind": "mamba2", "head_dim": 4, "scan": { "kind": "chunked", "chunk_len": 2 } }),
            serde_json::json!({ "kind": "mlstm", "n_heads": 2, "scan": { "kind": "chunked", "chunk_len": 2 } }),
            serde_json::json!({ "kind": "rwkv7", "head_size": 4, "scan": { "kind": "chunked", "chunk_len": 2 } }),
        ])
        .map(|v| {
            let config: MixerConfig = serde_json::from_value(v.clone()).unwrap();
            (v.to_string(), config)
        })
        .collect()
}

/// Seeded draws, so that a failure reproduces (the backend's own generator is not seeded).
fn normal<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<D> {
    Init::new(seed, &device()).normal(shape, 1.0).val()
}

fn tokens(shape: [usize; 2], vocab: usize, seed: u64) -> Tensor<2, Int> {
    let values: Vec<i64> = Init::new(seed, &device())
        .uniform_values(shape[0] * shape[1], 1.0)
        .into_iter()
        .map(|u| (((u + 1.0) / 2.0 * vocab as f32) as i64).min(vocab as i64 - 1))
        .collect();
    Tensor::from_data(TensorData::new(values, shape), &device())
}

/// Every mixer of [`every_mixer`] in a two-layer stack at width `d_model`, and a hybrid: Gated
/// DeltaNet, attention and Mamba, one layer each.
fn every_model(d_model: usize) -> Vec<(String, ModelConfig)> {
    let hybrid = ModelConfig {
        mixer: None,
        pattern: ["gated_deltanet", "attention", "mamba"]
            .map(|kind| serde_json::from_value(serde_json::json!({ "kind": kind })).unwrap())
            .to_vec(),
        n_layers: 3,
        ..model_config(MixerConfig::all()[0].clone(), d_model)
    };
    (every_mixer().into_iter())
        .map(|(name, mixer)| (name, model_config(mixer, d_model)))
        .chain([(hybrid.label(), hybrid)])
        .collect()
}

fn model_config(mixer: MixerConfig, d_model: usize) -> ModelConfig {
    let layout = match mixer {
        MixerConfig::Rwkv(_) => Layout::Stacked,
        _ => Layout::Residual,
    };
    ModelConfig {
        mixer: Some(mixer),
        pattern: Vec::new(),
        d_model,
        n_layers: 2,
        layout,
        mlp_expand: 0,
        match_params: None,
        match_state: None,
    }
}

/// ∂(Σ logits ⊙ r)/∂x by autodiff against central differences, on real-valued inputs and with
/// no parameter left at zero ([`FillZeros`]), so that every parameter of every layer lies on
/// the path. f32 with ε = 1e-2: truncation error
/// O(ε²·f''') ≈ 1e-4, rounding O(δ/ε) ≈ 1e-5; tolerance 3e-3 absolute plus 3% relative.
/// minGRU's and minLSTM's candidate `g` has a kink at 0 (slopes ¼ and 1), where a difference
/// that straddles it is not a derivative: a coordinate that fails at ε is measured again at
/// ε/10 (rounding ≈ 1e-4), which only a kink within ε/10 could still fool; a wrong gradient
/// fails at both.
#[test]
fn gradients_match_finite_differences() {
    for (name, config) in every_model(8) {
        let model = config
            .init(
                ModelIo {
                    input: InputSpec::Features { dim: 3 },
                    d_output: 4,
                    readout: estafet_models::Readout::PerPosition,
                },
                &mut Init::new(5, &device()),
            )
            .map(&mut FillZeros::new(100, &device()));
        let x = normal([2, 5, 3], 1);
        let r = normal([2, 5, 4], 2);
        let loss = |x: Tensor<3>| (model.forward(Input::Features(x), None).0 * r.clone()).sum();
        let tracked = x.clone().require_grad();
        let grads = loss(tracked.clone()).backward();
        let analytic: Vec<f32> = tracked.grad(&grads).unwrap().to_data().to_vec().unwrap();
        let values: Vec<f32> = x.to_data().to_vec().unwrap();
        let eps = 1e-2f32;
        let at = |i: usize, delta: f32| {
            let mut v = values.clone();
            v[i] += delta;
            let x = Tensor::<3>::from_data(TensorData::new(v, [2, 5, 3]), &device());
            loss(x).into_scalar::<f32>() as f64
        };
        for i in (0..values.len()).step_by(3) {
            let a = analytic[i] as f64;
            let numeric = |eps: f32| (at(i, eps) - at(i, -eps)) / (2.0 * eps as f64);
            let agrees = |numeric: f64| (a - numeric).abs() < 3e-3 + 0.03 * numeric.abs();
            let (coarse, fine) = (numeric(eps), numeric(eps / 10.0));
            assert!(
                agrees(coarse) || agrees(fine),
                "{name}: dL/dx[{i}] autodiff {a} vs finite differences {coarse} (ε), {fine} (ε/10)"
            );
        }
    }
}

/// A two-layer stack memorises a fixed batch of 4 random sequences: its cross-entropy falls
/// at least ten-fold in 150 AdamW steps.
#[test]
fn every_model_overfits_a_tiny_batch() {
    let dev = device();
    let (vocab, batch, t) = (6, 4, 10);
    let (inputs, targets) = (tokens([batch, t], vocab, 3), tokens([batch, t], vocab, 4));
    for (name, config) in every_model(16) {
        let mut model = config.init(
            ModelIo {
                input: InputSpec::Tokens { vocab },
                d_output: vocab,
                readout: estafet_models::Readout::PerPosition,
            },
            &mut Init::new(6, &dev),
        );
        let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
        let loss_of = |model: &estafet_models::SequenceModel| {
            let (logits, _) = model.forward(Input::Tokens(inputs.clone()), None);
            cross_entropy(logits, targets.clone())
        };
        let first: f32 = loss_of(&model).into_scalar();
        let mut last = first;
        for _ in 0..150 {
            let loss = loss_of(&model);
            last = loss.clone().into_scalar();
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(1e-2, model, grads);
        }
        println!("{name}: cross-entropy {first:.3} → {last:.4}");
        assert!(
            last < first / 10.0,
            "{name}: loss {first} → {last} after 150 steps ({} parameters)",
            model.num_params()
        );
    }
}

fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    -log_softmax(logits, 2)
        .gather(2, targets.unsqueeze_dim(2))
        .mean()
}

/// Truncated backpropagation through time rests on this: a sequence read in windows, each
/// starting from the state the last one ended in (detached from the graph, and once written to
/// the host and read back as a checkpoint does), gives the outputs and final state of one
/// forward over the whole sequence, for every kind (attention's state, its KV cache, too),
/// with windows that cut the mixers' chunks anywhere.
#[test]
fn windows_with_a_carried_state_equal_one_long_forward() {
    let (b, t, vocab) = (2, 23, 7);
    for (name, config) in every_model(8) {
        let model = config.init(
            ModelIo {
                input: InputSpec::Tokens { vocab },
                d_output: vocab,
                readout: estafet_models::Readout::PerPosition,
            },
            &mut Init::new(3, &device()),
        );
        let x = tokens([b, t], vocab, 5);
        let (whole, whole_state) = model.forward(Input::Tokens(x.clone()), None);
        let mut state = None;
        let mut outputs = Vec::new();
        for (i, (start, len)) in [(0, 9), (9, 1), (10, 13)].into_iter().enumerate() {
            let window = Input::Tokens(x.clone().narrow(1, start, len));
            let (y, next) = model.forward(window, state);
            outputs.push(y);
            let next = next.detach();
            state = Some(if i == 1 {
                estafet_models::ModelState::from_host(next.clone(), next.to_host(), &device())
                    .unwrap()
            } else {
                next
            });
        }
        let windowed = Tensor::cat(outputs, 1);
        let diff: f32 = (windowed - whole).abs().max().into_scalar();
        assert!(diff < 1e-4, "{name}: outputs differ by {diff}");
        let (a, c) = (state.unwrap().to_host(), whole_state.to_host());
        assert_eq!(a.len(), c.len(), "{name}");
        for (p, q) in a.iter().zip(&c) {
            assert_eq!(p.shape, q.shape, "{name}");
            let d = p
                .values
                .iter()
                .zip(&q.values)
                .map(|(u, v)| (u - v).abs())
                .fold(0.0f32, f32::max);
            assert!(d < 1e-4, "{name}: final states differ by {d}");
        }
    }
}
