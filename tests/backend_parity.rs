//! Backend parity: every model computes the same thing on every backend.
//!
//! The backend under test is named by `ESTAFET_PARITY_BACKEND` (`flex`, `wgpu`); unset, every
//! compiled-in backend other than the reference, ndarray. Initial weights are drawn on the host
//! from the seed, so both sides start from identical numbers. Agreement means, for every
//! tensor compared, `|test − ref| ≤ ATOL + RTOL · max |ref|` (f32 arithmetic in another order:
//! other matmul blocking, other reductions, GPU transcendental functions).
//!
//! Compared: outputs, final states and the gradients of every parameter and of the loss; the
//! training loss of the first steps through `estafet`'s own loop; and checkpoints written on
//! one backend, evaluated on the other.
//!
//! Run on a software GPU (lavapipe) or a real one:
//! `ESTAFET_PARITY_BACKEND=wgpu cargo test --release --features wgpu --test backend_parity`.

#![cfg(any(feature = "flex", feature = "wgpu"))]

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};
use estafet_experiments::Backend;
use estafet_experiments::config::{self, ConfigSource};
use estafet_experiments::evaluate::evaluate;
use estafet_experiments::results::Summary;
use estafet_experiments::saved::SavedRun;
use estafet_experiments::train::{self, RunOptions};
use estafet_models::init::FillZeros;
use estafet_models::{
    Init, Input, InputSpec, Layout, MixerConfig, ModelConfig, ModelIo, Readout, SequenceModel,
};

const ATOL: f32 = 1e-5;
const RTOL: f32 = 1e-4;

fn backends_under_test() -> Vec<Backend> {
    match std::env::var("ESTAFET_PARITY_BACKEND") {
        Ok(name) => vec![
            name.parse()
                .expect("ESTAFET_PARITY_BACKEND names a backend"),
        ],
        Err(_) => Backend::ALL
            .into_iter()
            .filter(|b| *b != Backend::Ndarray && b.compiled())
            .collect(),
    }
}

/// Every mixer kind at its defaults, plus the forms and versions a default leaves out.
fn mixers() -> Vec<(String, MixerConfig)> {
    // At width 8 mLSTM's default 4 heads would layer-normalise pairs of values, a near sign
    // function whose slope (~1/√1e-5 where the two meet) turns float rounding into gradient
    // differences of ~1e-3; two heads of four are as well conditioned as the other models.
    let two_heads = |kind: &str, m: MixerConfig| match kind {
        "mlstm" => {
            serde_json::from_value(serde_json::json!({ "kind": "mlstm", "n_heads": 2 })).unwrap()
        }
        _ => m,
    };
    let mut all: Vec<(String, MixerConfig)> = MixerConfig::all()
        .into_iter()
        .map(|m| (m.kind().to_string(), two_heads(m.kind(), m)))
        .collect();
    for (name, json) in [
        ("rwkv6", serde_json::json!({ "kind": "rwkv", "version": 6 })),
        (
            "mamba-chunked",
            serde_json::json!({ "kind": "mamba", "scan": { "kind": "chunked", "chunk_len": 4 } }),
        ),
        (
            "mamba-sequential",
            serde_json::json!({ "kind": "mamba", "scan": { "kind": "sequential" } }),
        ),
        (
            "mamba-signed",
            serde_json::json!({ "kind": "mamba", "eigenvalues": "signed" }),
        ),
        (
            "mamba-lti",
            serde_json::json!({ "kind": "mamba", "selective": false }),
        ),
        (
            "mamba2-chunked",
            serde_json::json!({ "kind": "mamba2", "head_dim": 4, "scan": { "kind": "chunked", "chunk_len": 4 } }),
        ),
        (
            "gated_deltanet-chunked",
            serde_json::json!({ "kind": "gated_deltanet", "scan": { "kind": "chunked", "chunk_len": 4 } }),
        ),
        (
            "mlstm-chunked",
            serde_json::json!({ "kind": "mlstm", "n_heads": 2, "scan": { "kind": "chunked", "chunk_len": 4 } }),
        ),
        (
            "rwkv7-chunked",
            serde_json::json!({ "kind": "rwkv7", "scan": { "kind": "chunked", "chunk_len": 3 } }),
        ),
        (
            "rwkv-chunked",
            serde_json::json!({ "kind": "rwkv", "wkv": { "kind": "chunked", "chunk_len": 3 } }),
        ),
    ] {
        all.push((name.to_string(), serde_json::from_value(json).unwrap()));
    }
    all
}

fn model_config(mixer: MixerConfig) -> ModelConfig {
    ModelConfig {
        mixer: Some(mixer),
        pattern: Vec::new(),
        d_model: 8,
        n_layers: 2,
        layout: Layout::Residual,
        mlp_expand: 2,
        match_params: None,
        match_state: None,
    }
}

const VOCAB: usize = 5;

fn tokens(device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..2 * 11).map(|i| (i * 7 + 3) % VOCAB as i64).collect();
    Tensor::from_data(TensorData::new(ids, [2, 11]), device)
}

/// Outputs, final state, then every gradient (parameters in visiting order), each flattened.
fn forward_and_grads(
    config: &ModelConfig,
    readout: Readout,
    device: &Device,
) -> Vec<(String, Vec<f32>)> {
    let io = ModelIo {
        input: InputSpec::Tokens { vocab: VOCAB },
        d_output: VOCAB,
        readout,
    };
    let model: SequenceModel = config
        .init(io, &mut Init::new(3, device))
        // No parameter left at zero, so that every one is on the gradient path.
        .map(&mut FillZeros::new(100, device));
    let (y, state) = model.forward(Input::Tokens(tokens(device)), None);
    // A fixed, position-dependent weighting, so that every output feeds the gradient.
    let n = y.dims().iter().product::<usize>();
    let w: Vec<f32> = (0..n).map(|i| ((i % 13) as f32 - 6.0) / 6.0).collect();
    let w = Tensor::<3>::from_data(TensorData::new(w, y.dims()), device);
    let loss = (y.clone() * w).sum();
    let grads = GradientsParams::from_grads(loss.backward(), &model);

    struct Collect<'a> {
        grads: &'a GradientsParams,
        out: Vec<(String, Vec<f32>)>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let i = self.out.len();
            let g = self.grads.get::<D>(param.id);
            let values = g.map_or_else(Vec::new, |g| g.into_data().try_to_vec::<f32>().unwrap());
            self.out.push((format!("grad of parameter {i}"), values));
        }
    }
    let mut collect = Collect {
        grads: &grads,
        out: vec![
            ("outputs".into(), y.into_data().try_to_vec::<f32>().unwrap()),
            (
                "final state".into(),
                Tensor::cat(state.layers.iter().map(|s| s.flatten()).collect(), 0)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap(),
            ),
        ],
    };
    model.visit(&mut collect);
    collect.out
}

/// Asserts agreement within the tolerance; returns the largest `|Δ| / max|ref|`.
fn assert_close(what: &str, reference: &[f32], test: &[f32]) -> f32 {
    assert_eq!(reference.len(), test.len(), "{what}: sizes differ");
    let scale = reference.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = reference
        .iter()
        .zip(test)
        .map(|(r, t)| (r - t).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= ATOL + RTOL * scale,
        "{what}: max |Δ| {worst:.3e} > {ATOL:e} + {RTOL:e}·{scale:.3e}"
    );
    worst / scale.max(f32::MIN_POSITIVE)
}

#[test]
fn outputs_states_and_gradients_match_ndarray() {
    let reference = Backend::Ndarray.device().unwrap().autodiff();
    for backend in backends_under_test() {
        let device = backend.device().unwrap().autodiff();
        // Every mixer read per position, and MAD's autoencoder readout (compression) once.
        let lstm = mixers().into_iter().find(|(n, _)| n == "lstm").unwrap().1;
        // A hybrid stack: Gated DeltaNet and attention layers in turn, one with a fused
        // kernel wherever the backend has one, the other without.
        let hybrid = ModelConfig {
            mixer: None,
            pattern: ["gated_deltanet", "attention"]
                .map(|kind| serde_json::from_value(serde_json::json!({ "kind": kind })).unwrap())
                .to_vec(),
            n_layers: 4,
            ..model_config(lstm.clone())
        };
        let cases = mixers()
            .into_iter()
            .map(|(name, mixer)| (name, model_config(mixer), Readout::PerPosition))
            .chain([
                (
                    "lstm-bottleneck".to_string(),
                    model_config(lstm),
                    Readout::Bottleneck,
                ),
                (hybrid.label(), hybrid, Readout::PerPosition),
            ]);
        for (name, config, readout) in cases {
            let want = forward_and_grads(&config, readout, &reference);
            let got = forward_and_grads(&config, readout, &device);
            assert_eq!(want.len(), got.len());
            let mut worst = 0.0f32;
            for ((what, r), (_, t)) in want.iter().zip(&got) {
                worst = worst.max(assert_close(&format!("{backend} {name}: {what}"), r, t));
            }
            eprintln!(
                "{backend} {name}: {} tensors agree; largest |Δ| / max|ref| {worst:.2e}",
                want.len()
            );
        }
    }
}

fn tiny_experiment(mixer: &str) -> config::ExperimentConfig {
    let text = format!(
        "[model]\nd_model = 8\nn_layers = 1\n[model.mixer]\nkind = \"{mixer}\"\n\
         [task]\nkind = \"copy_memory\"\nlag = 3\nn_symbols = 3\nalphabet = 4\n\
         [train]\nsteps = 4\nbatch_size = 4\nlog_every = 1\n[eval]\nsamples = 8\n"
    );
    config::load(
        &ConfigSource {
            name: format!("{mixer}.toml"),
            text,
        },
        &[],
    )
    .unwrap()
}

fn train_on(
    backend: Backend,
    experiment: &config::ExperimentConfig,
    out: &std::path::Path,
) -> Vec<f64> {
    std::fs::remove_dir_all(out).ok();
    train::run(
        experiment,
        &RunOptions {
            backend,
            out: out.to_path_buf(),
            config_source: "parity".into(),
            code_version: "test".into(),
            progress: false,
            resume: false,
            skip_memory_check: false,
            resume_command: String::new(),
        },
    )
    .unwrap();
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["split"] == "train")
        .map(|l| l["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn training_curves_and_checkpoints_cross_backends() {
    let scratch = std::env::temp_dir().join(format!("estafet-parity-{}", std::process::id()));
    for backend in backends_under_test() {
        for mixer in MixerConfig::KINDS {
            let experiment = tiny_experiment(mixer);
            let ref_dir = scratch.join(format!("{mixer}-ndarray"));
            let test_dir = scratch.join(format!("{mixer}-{backend}"));
            let want = train_on(Backend::Ndarray, &experiment, &ref_dir);
            let got = train_on(backend, &experiment, &test_dir);
            let (w, g): (Vec<f32>, Vec<f32>) = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (*a as f32, *b as f32))
                .unzip();
            assert_eq!(want.len(), 4);
            assert_close(&format!("{backend} {mixer}: training losses"), &w, &g);

            // A checkpoint written on one backend evaluates on the other to the same loss.
            for (dir, on) in [(&ref_dir, backend), (&test_dir, Backend::Ndarray)] {
                let device = on.device().unwrap();
                let run = SavedRun::load(dir, &device).unwrap();
                let info = run.task.info();
                let eval = evaluate(
                    &run.model,
                    &run.task
                        .eval_set(run.config.run.seed, run.config.eval.samples),
                    &info,
                    run.config.eval.batch_size,
                    &device,
                );
                let written = Summary::read(dir).unwrap().final_eval.loss as f32;
                assert_close(
                    &format!("{mixer}: checkpoint of {} evaluated on {on}", dir.display()),
                    &[written],
                    &[eval.loss as f32],
                );
            }
            eprintln!("{backend} {mixer}: losses {got:.4?} match, checkpoints cross");
        }
    }
    std::fs::remove_dir_all(scratch).ok();
}

/// A config that names the fused form runs wherever the recurrence has a kernel: on flex (the
/// host kernels) and on wgpu (the GPU kernels), every recurrence with a form; `auto` runs
/// everywhere.
#[test]
fn a_fused_form_runs_where_its_kernel_does() {
    for backend in backends_under_test() {
        let device = backend.device().unwrap();
        for mixer in MixerConfig::all() {
            let Some((field, _)) = mixer.form() else {
                continue;
            };
            let mut json = serde_json::to_value(&mixer).unwrap();
            json[field] = serde_json::json!({ "kind": "fused" });
            let fused = model_config(serde_json::from_value(json).unwrap());
            fused
                .check_device(&device)
                .unwrap_or_else(|e| panic!("{backend} {}: {e}", mixer.kind()));
            model_config(mixer).check_device(&device).unwrap();
        }
    }
}
