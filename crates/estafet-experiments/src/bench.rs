//! `estafet bench`: the workloads of `../shared/bench/torch_baseline.py`, measured the same way so
//! that the two can be joined line by line.
//!
//! Per model: token ids (vocab 64) → embedding → one sequence layer → linear head →
//! cross-entropy → backward → Adam (lr 1e-3, ε 1e-8), on one fixed random batch. Figures:
//! training tokens/s, full-sequence inference tokens/s, token-by-token (`step`) inference
//! tokens/s, peak resident memory after each phase, parameters and floats of state. Each phase
//! makes `warmup` untimed calls and up to `steps` timed ones (at least 3, and no more once it
//! has run `max_seconds`), and reports the median, as the reference does. Every model runs in a
//! fresh process, since peak RSS only ever grows within one.

use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{Int, Tensor, TensorData};
use estafet_models::{Init, Input, InputSpec, Layout, ModelIo};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::evaluate::token_nll;
use crate::memory::peak_rss_mb;
use crate::{Backend, Error};

pub const VOCAB: usize = 64;

/// The side of the GEMM the efficiency is measured against.
pub const GEMM_N: usize = 1024;

/// What to measure; the flags of `estafet bench`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchOptions {
    pub models: Vec<String>,
    pub batch: usize,
    pub seq_len: usize,
    /// Width for every model; `None`: the reference's defaults (Mamba 128, the rest 256).
    pub d_model: Option<usize>,
    pub threads: usize,
    pub backend: Backend,
    /// Mixer layers, how they are wired, and the MLP after each (residual only), built as an
    /// experiment config builds them.
    pub layers: usize,
    pub layout: Layout,
    pub mlp_expand: usize,
    pub warmup: usize,
    pub steps: usize,
    pub max_seconds: f64,
    pub seed: u64,
    /// Also time token-by-token inference with `step`.
    pub step_mode: bool,
}

impl BenchOptions {
    /// The options a worker is handed by [`orchestrate`].
    pub fn from_json(json: &str) -> Result<Self, Error> {
        serde_json::from_str(json).map_err(|e| Error::Config(format!("--worker-options: {e}")))
    }
}

/// The reference's default width for a model.
pub fn default_d_model(model: &str) -> usize {
    if model == "mamba" { 128 } else { 256 }
}

/// The shapes of a named suite, each `base` with its width, length and layers set:
/// `research` is the small multi-layer models of long-context studies, every model at d 32,
/// 64 and 128 with 2 pre-norm residual layers, at T 256 and 1024, batch 32.
pub fn suite(name: &str, base: &BenchOptions) -> Result<Vec<BenchOptions>, Error> {
    match name {
        "research" => Ok([32, 64, 128]
            .into_iter()
            .flat_map(|d| [256, 1024].map(|t| (d, t)))
            .map(|(d, t)| BenchOptions {
                d_model: Some(d),
                seq_len: t,
                batch: 32,
                layers: 2,
                layout: Layout::Residual,
                ..base.clone()
            })
            .collect()),
        other => Err(Error::Config(format!(
            "--suite: unknown suite {other:?}; the one suite is \"research\""
        ))),
    }
}

/// Runs every model in a child process (this executable, `bench --worker MODEL
/// --worker-options JSON`) with the thread count in its environment; hands each model's line
/// to `on_result` as soon as it is measured, so that an interrupted benchmark keeps what it
/// measured.
pub fn orchestrate(
    options: &BenchOptions,
    mut on_result: impl FnMut(&BenchLine),
) -> Result<(), Error> {
    for m in &options.models {
        let d_model = options.d_model.unwrap_or_else(|| default_d_model(m));
        crate::catalog::named(m, d_model)?;
    }
    let exe = std::env::current_exe().context("cannot find the estafet executable")?;
    let threads = options.threads.to_string();
    let json = serde_json::to_string(options).context("cannot serialise the bench options")?;
    for m in &options.models {
        let out = Command::new(&exe)
            .args(["bench", "--worker", m, "--worker-options", &json])
            .env("RAYON_NUM_THREADS", &threads)
            .env("OMP_NUM_THREADS", &threads)
            .output()
            .context("cannot start a benchmark worker")?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let parsed = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<BenchResult>(l).ok())
            .filter(|_| out.status.success());
        on_result(&match parsed {
            Some(result) => BenchLine::Measured(Box::new(result)),
            None => {
                let stderr = String::from_utf8_lossy(&out.stderr);
                BenchLine::Failed {
                    model: m.clone(),
                    error: stderr.trim().lines().last().unwrap_or("no output").into(),
                }
            }
        });
    }
    Ok(())
}

/// Calls `f` up to `warmup` times untimed, then times it up to `steps` times: the reference's
/// `timed`, budget rules included (at least 3 timed calls, or `steps` if fewer are asked for,
/// as a GPU run at long lengths does). Returns the timed durations in seconds.
fn timed(mut f: impl FnMut(), warmup: usize, steps: usize, budget: f64) -> Vec<f64> {
    let start = Instant::now();
    for i in 0..warmup {
        if i > 0 && start.elapsed().as_secs_f64() > budget / 4.0 {
            break;
        }
        f();
    }
    let mut times = Vec::new();
    while times.len() < steps
        && (times.len() < 3.min(steps) || start.elapsed().as_secs_f64() < budget)
    {
        let t0 = Instant::now();
        f();
        times.push(t0.elapsed().as_secs_f64());
    }
    times
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn ms(seconds: f64) -> f64 {
    (seconds * 1e5).round() / 100.0
}

/// Measures one model in this process; the line `orchestrate` collects.
pub fn measure(
    model: &str,
    options: &BenchOptions,
    code_version: &str,
) -> Result<BenchResult, Error> {
    let device = options.backend.device()?;
    let d_model = options.d_model.unwrap_or_else(|| default_d_model(model));
    let mut config = crate::catalog::named(model, d_model)?;
    config.n_layers = options.layers;
    config.layout = options.layout;
    config.mlp_expand = options.mlp_expand;
    config
        .validate()
        .map_err(|e| Error::Config(format!("{model} at d {d_model}: {e}")))?;
    let mixer = config.mixer.clone();
    let (b, t) = (options.batch, options.seq_len);
    let io = ModelIo {
        input: InputSpec::Tokens { vocab: VOCAB },
        d_output: VOCAB,
        readout: estafet_models::Readout::PerPosition,
    };
    let ad_device = device.clone().autodiff();
    let estimate = crate::memory::estimate(&config, io, b, t, &ad_device);
    let mut net = config.init(io, &mut Init::new(options.seed, &ad_device));
    let params = net.num_params();
    let state_floats = net.state_size(options.seq_len);
    let flops_per_token = net.train_flops_per_token(options.seq_len);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed);
    let tokens: Vec<i64> = (0..b * (t + 1))
        .map(|_| rng.random_range(0..VOCAB as i64))
        .collect();
    let all: Tensor<2, Int> = Tensor::from_data(TensorData::new(tokens, [b, t + 1]), &device);
    let x = all.clone().slice([0..b, 0..t]);
    let y = all.slice([0..b, 1..t + 1]);
    let rss_setup = peak_rss_mb();

    let infer_model = net.valid();
    let sync = |logits: Tensor<3>| {
        // Reading a value waits for the backend, so asynchronous backends are timed honestly.
        let _: f32 = logits.slice([0..1, 0..1, 0..1]).into_scalar();
    };
    let step_times = if options.step_mode {
        let tokens_t: Vec<Tensor<2, Int>> =
            (0..t).map(|i| x.clone().slice([0..b, i..i + 1])).collect();
        timed(
            || {
                let mut state = None;
                let mut last = None;
                for tok in &tokens_t {
                    let (logits, next) = infer_model.step(Input::Tokens(tok.clone()), state);
                    state = Some(next);
                    last = Some(logits);
                }
                if let Some(l) = last {
                    sync(l.unsqueeze_dim(1));
                }
            },
            options.warmup.min(1),
            options.steps,
            options.max_seconds,
        )
    } else {
        Vec::new()
    };
    let rss_step = peak_rss_mb();

    let infer = timed(
        || sync(infer_model.forward(Input::Tokens(x.clone()), None).0),
        options.warmup,
        options.steps,
        options.max_seconds,
    );
    let rss_infer = peak_rss_mb();
    drop(infer_model);

    let mut optim = AdamConfig::new().with_epsilon(1e-8).init();
    let x_ad = Tensor::<2, Int>::from_data(x.to_data(), &ad_device);
    let y_ad = Tensor::<2, Int>::from_data(y.to_data(), &ad_device);
    let mut losses = Vec::new();
    let mut train_step = || {
        let (logits, _) = net.forward(Input::Tokens(x_ad.clone()), None);
        let loss = token_nll(logits, y_ad.clone()).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        net = optim.step(1e-3, net.clone(), grads);
        losses.push(loss.into_scalar::<f32>() as f64);
    };
    let train = timed(
        &mut train_step,
        options.warmup,
        options.steps,
        options.max_seconds,
    );
    // After the timed steps, so that autotuning's trial launches are over.
    let launches_per_step = options.backend.launches(&mut train_step);
    let tokens = (b * t) as f64;
    let round = |v: f64| (v * 10.0).round() / 10.0;
    let train_gflops = tokens / median(&train) * flops_per_token / 1e9;
    let gemm_gflops = estafet_models::fused::gemm_gflops(GEMM_N, 3);
    let mixer = match serde_json::to_value(&mixer).expect("a mixer config serialises") {
        serde_json::Value::Object(fields) => {
            fields.into_iter().filter(|(k, _)| k != "kind").collect()
        }
        _ => serde_json::Map::new(),
    };
    let timed_ms = |v: &[f64]| (!v.is_empty()).then(|| ms(median(v)));
    Ok(BenchResult {
        model: model.to_string(),
        train_tok_s: round(tokens / median(&train)),
        infer_tok_s: round(tokens / median(&infer)),
        step_tok_s: (!step_times.is_empty()).then(|| round(tokens / median(&step_times))),
        train_step_ms_median: ms(median(&train)),
        train_step_ms_min: ms(train.iter().copied().fold(f64::INFINITY, f64::min)),
        train_step_ms_max: ms(train.iter().copied().fold(0.0, f64::max)),
        infer_step_ms_median: ms(median(&infer)),
        step_seq_ms_median: timed_ms(&step_times),
        peak_rss_mb: peak_rss_mb().map(round),
        peak_rss_infer_mb: rss_infer.map(round),
        peak_rss_step_mb: rss_step.map(round),
        rss_setup_mb: rss_setup.map(round),
        estimated_train_mb: round(estimate.total / 1e6),
        params,
        state_floats,
        launches_per_step,
        loss_first: losses.first().map(|l| (l * 1e4).round() / 1e4),
        loss_last: losses.last().map(|l| (l * 1e4).round() / 1e4),
        train_flops_per_token: flops_per_token,
        train_gflops: round(train_gflops),
        gemm_gflops: round(gemm_gflops),
        efficiency: (train_gflops / gemm_gflops * 1e4).round() / 1e4,
        config: BenchShape {
            batch: b,
            seq_len: t,
            d_model,
            layers: options.layers,
            layout: options.layout,
            mlp_expand: options.mlp_expand,
            vocab: VOCAB,
            optimizer: "Adam lr=1e-3".into(),
            dtype: "float32".into(),
            warmup: options.warmup,
            steps: options.steps,
            max_seconds: options.max_seconds,
            train_steps_timed: train.len(),
            infer_steps_timed: infer.len(),
            step_sequences_timed: step_times.len(),
            seed: options.seed,
            mixer,
        },
        threads: options.threads,
        backend: options.backend,
        isa: format!("{:?}", estafet_models::fused::Isa::current()),
        estafet: code_version.to_string(),
    })
}

/// One model's figures, as one JSON line with the reference's field names.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchResult {
    pub model: String,
    pub train_tok_s: f64,
    pub infer_tok_s: f64,
    /// Token-by-token inference (`None` with `--no-step`).
    pub step_tok_s: Option<f64>,
    pub train_step_ms_median: f64,
    pub train_step_ms_min: f64,
    pub train_step_ms_max: f64,
    pub infer_step_ms_median: f64,
    pub step_seq_ms_median: Option<f64>,
    /// Peak resident memory after each phase, MB (Linux).
    pub peak_rss_mb: Option<f64>,
    pub peak_rss_infer_mb: Option<f64>,
    pub peak_rss_step_mb: Option<f64>,
    pub rss_setup_mb: Option<f64>,
    /// What the memory check estimates a training run at this shape needs (`memory.rs`).
    pub estimated_train_mb: f64,
    pub params: usize,
    pub state_floats: usize,
    /// Kernel launches of one training step (forward, backward, optimizer) on a GPU backend,
    /// counted after the timed steps; `None` on the CPU backends.
    #[serde(default)]
    pub launches_per_step: Option<usize>,
    pub loss_first: Option<f64>,
    pub loss_last: Option<f64>,
    /// Analytic training FLOPs per token (`SequenceModel::train_flops_per_token`), the rate
    /// they are done at, the rate of one `GEMM_N³` f32 GEMM in the same process on the same
    /// threads, and the ratio of the two: how far the model trains from the machine's limit.
    pub train_flops_per_token: f64,
    pub train_gflops: f64,
    pub gemm_gflops: f64,
    pub efficiency: f64,
    pub config: BenchShape,
    pub threads: usize,
    pub backend: Backend,
    /// The instruction set the fused kernels' loops ran with (`ESTAFET_ISA` to choose).
    pub isa: String,
    /// estafet's code version.
    pub estafet: String,
}

/// The workload a [`BenchResult`] measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchShape {
    pub batch: usize,
    pub seq_len: usize,
    pub d_model: usize,
    pub layers: usize,
    pub layout: Layout,
    pub mlp_expand: usize,
    pub vocab: usize,
    pub optimizer: String,
    pub dtype: String,
    pub warmup: usize,
    pub steps: usize,
    pub max_seconds: f64,
    pub train_steps_timed: usize,
    pub infer_steps_timed: usize,
    pub step_sequences_timed: usize,
    pub seed: u64,
    /// The mixer's own options, as its config names them.
    #[serde(flatten)]
    pub mixer: serde_json::Map<String, serde_json::Value>,
}

/// What a worker reports: a model's figures, or why it could not measure them.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BenchLine {
    Measured(Box<BenchResult>),
    Failed { model: String, error: String },
}

impl BenchLine {
    /// The header of [`BenchLine::row`]'s table.
    pub fn header() -> String {
        format!(
            "{:<10} {:>12} {:>12} {:>12} {:>9} {:>9} {:>11} {:>9} {:>9} {:>12} {:>8} {:>6}  config",
            "model",
            "train tok/s",
            "infer tok/s",
            "step tok/s",
            "train ms",
            "infer ms",
            "peak RSS MB",
            "est. MB",
            "params",
            "state floats",
            "GFLOP/s",
            "eff"
        )
    }

    /// One JSON line, with the reference's field names.
    pub fn json(&self) -> String {
        serde_json::to_string(self).expect("a bench line serialises")
    }

    /// One line of the table `estafet bench` prints.
    pub fn row(&self) -> String {
        let r = match self {
            BenchLine::Failed { model, error } => return format!("{model:<10} ERROR: {error}"),
            BenchLine::Measured(r) => r,
        };
        let whole = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
        let c = &r.config;
        format!(
            "{:<10} {:>12} {:>12} {:>12} {:>9.1} {:>9.1} {:>11} {:>9} {:>9} {:>12} {:>8.1} {:>6.3}  B={} L={} d={} layers={} {} threads={} {}{}",
            r.model,
            whole(Some(r.train_tok_s)),
            whole(Some(r.infer_tok_s)),
            whole(r.step_tok_s),
            r.train_step_ms_median,
            r.infer_step_ms_median,
            whole(r.peak_rss_mb),
            whole(Some(r.estimated_train_mb)),
            r.params,
            r.state_floats,
            r.train_gflops,
            r.efficiency,
            c.batch,
            c.seq_len,
            c.d_model,
            c.layers,
            serde_json::to_value(c.layout)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            r.threads,
            r.backend,
            r.launches_per_step
                .map_or(String::new(), |n| format!(" launches/step={n}")),
        )
    }
}
