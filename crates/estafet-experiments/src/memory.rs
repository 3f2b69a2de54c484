//! Memory: what a training run will need, known before anything is allocated, and what the
//! process used, as the operating system saw it (the run's summary and the benchmark).
//!
//! The estimate is built from shapes alone: the model is constructed with
//! [`Init::shapes_only`] (lazy parameters, no values), so a width no machine could hold costs
//! microseconds to size. It counts
//! - the weights, their gradients and AdamW's two moments: `16 · P` bytes;
//! - the activations one training step keeps for its backward pass: per token, every matrix
//!   `[a, b]` of the model is applied once (a projection, a recurrent weight in each step, the
//!   head), keeping its input and output, and the element-wise work around it (gates,
//!   activations, norms, the fused kernels' saved gates) keeps about as much again:
//!   `ACTIVATION_FACTOR · Σ (a + b)` floats; for attention without a fused kernel its `[T, T]`
//!   scores and softmax per head; and every step's recurrent state, which the kernels'
//!   backwards read (on the GPU kept for the whole batch, on the CPU rebuilt one sequence per
//!   thread at a time);
//! - the process itself (code, runtime, allocator): `BASE` bytes.
//!
//! It is an estimate, compared against the peak resident memory `estafet bench` measures in
//! `experiments/bench/README.md` ("Memory estimate"); the check refuses a run only when the
//! estimate exceeds what the machine has available, so a run the estimate misjudges by less
//! than that margin is never refused.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use estafet_data::TaskInfo;
use estafet_models::{Init, MixerConfig, ModelConfig, ModelIo, SequenceModel};
use serde::Serialize;

use crate::config::ExperimentConfig;

/// Floats kept per token for each float of a matrix's input and output: the matrix product's
/// own input and output, and the element-wise work around it. Measured: see the module doc.
const ACTIVATION_FACTOR: f64 = 2.0;

/// What the process takes before any model: measured as `rss_setup_mb` by `estafet bench`
/// (18–22 MB on flex).
const BASE: f64 = 25e6;

/// What a training run of a config needs, in bytes.
#[derive(Clone, Debug, Serialize)]
pub struct Estimate {
    pub params: usize,
    /// The weights alone.
    pub weights: f64,
    /// Weights, gradients and AdamW's two moments.
    pub optimizer: f64,
    /// What one training step keeps for its backward pass at the config's batch and length.
    pub activations: f64,
    pub total: f64,
}

impl Estimate {
    /// One line: the total and its parts.
    pub fn describe(&self) -> String {
        format!(
            "about {} ({} parameters: {} with gradients and AdamW's moments; {} of activations per training step)",
            human(self.total),
            self.params,
            human(self.optimizer),
            human(self.activations)
        )
    }
}

/// The estimate for training `config` (task `info`) on `device`.
pub fn for_run(config: &ExperimentConfig, info: &TaskInfo, device: &Device) -> Estimate {
    // A length mixture's longest batch is the one that must fit.
    let longest = config
        .train
        .length_mixture
        .iter()
        .flat_map(|m| m.lengths.iter().copied())
        .fold(info.seq_len, usize::max);
    estimate(
        &config.model,
        crate::evaluate::model_io(info),
        config.train.batch_size,
        longest,
        device,
    )
}

/// The estimate for training `model` on batches of `batch` sequences of `seq_len` on `device`.
pub fn estimate(
    model: &ModelConfig,
    io: ModelIo,
    batch: usize,
    seq_len: usize,
    device: &Device,
) -> Estimate {
    let (built, matrix_sides) = shapes_only(model, io, device);
    let params = built.num_params();
    let (b, t) = (batch as f64, seq_len as f64);
    let per_token = ACTIVATION_FACTOR * matrix_sides as f64
        + (model.layer_mixers().into_iter())
            .flat_map(|mixer| mixer.leaves())
            .map(|mixer| attention_scores(mixer, model.d_model, t, device))
            .sum::<f64>();
    // The recurrences' backwards read every step's state: the GPU kernels keep it for the
    // whole batch, the CPU kernels rebuild it one sequence per thread at a time.
    let sequences_with_states = if estafet_models::fused::has_kernel(device) {
        b.min(estafet_models::fused::threads() as f64)
    } else {
        b
    };
    let states = sequences_with_states * t * built.state_size(1) as f64;
    let weights = 4.0 * params as f64;
    let optimizer = 4.0 * weights;
    let activations = 4.0 * (b * t * per_token + states);
    Estimate {
        params,
        weights,
        optimizer,
        activations,
        total: BASE + optimizer + activations,
    }
}

/// What evaluating `model` on `samples` held-out sequences of `seq_len` positions, `batch` at a
/// time, needs in bytes: the sequences themselves (as generated, and one batch on the device),
/// every sequence's state at the end (attention's KV cache grows with the length), and one
/// window's activations ([`crate::evaluate::STREAM_WINDOW`]: no more at any length); the
/// floats of state per sequence at that length; and the evaluation's FLOPs (a forward pass is
/// a third of [`SequenceModel::train_flops_per_token`], which counts attention's scores at
/// this length).
pub fn for_evaluation(
    model: &ModelConfig,
    io: ModelIo,
    samples: usize,
    batch: usize,
    seq_len: usize,
    device: &Device,
) -> (f64, usize, f64) {
    let (built, matrix_sides) = shapes_only(model, io, device);
    let (n, b, t) = (samples as f64, batch.min(samples) as f64, seq_len as f64);
    let window = t.min(crate::evaluate::STREAM_WINDOW as f64);
    let data = n * t * 9.0 + b * t * 20.0;
    let state_floats = built.state_size(seq_len);
    let state = b * state_floats as f64 * 4.0;
    let activations = 4.0 * b * window * ACTIVATION_FACTOR * matrix_sides as f64;
    let needs = BASE + 4.0 * built.num_params() as f64 + data + state + activations;
    let flops = n * t * built.train_flops_per_token(seq_len) / 3.0;
    (needs, state_floats, flops)
}

/// `model` built with [`Init::shapes_only`], and `Σ (a + b)` over its matrices `[a, b]`.
fn shapes_only(model: &ModelConfig, io: ModelIo, device: &Device) -> (SequenceModel, usize) {
    let built = model.init(io, &mut Init::shapes_only(device));
    let mut shapes = Shapes::default();
    built.visit(&mut shapes);
    (built, shapes.matrix_sides)
}

/// Per token and layer: the `[T, T]` scores and softmax of each head, which attention keeps
/// where it runs as tensor ops (its fused CPU kernel recomputes them in its backward).
fn attention_scores(mixer: &MixerConfig, d_model: usize, t: f64, device: &Device) -> f64 {
    match mixer {
        MixerConfig::Attention(spec) if !estafet_models::fused::has_kernel(device) => {
            2.0 * spec.config(d_model).n_heads as f64 * t
        }
        _ => 0.0,
    }
}

/// `Σ (a + b)` over the model's matrices `[a, b]`, read from the lazy shapes.
#[derive(Default)]
struct Shapes {
    matrix_sides: usize,
}

impl ModuleVisitor for Shapes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.lazy_shape();
        if shape.num_dims() >= 2 {
            let dims = shape.as_slice();
            let rows: usize = dims[..dims.len() - 1].iter().product();
            self.matrix_sides += rows + dims[dims.len() - 1];
        }
    }
}

/// Memory this process may still take, in bytes: the kernel's `MemAvailable`, or less when a
/// cgroup (a container, a Slurm job) limits the process. `None` where neither can be read.
pub fn available() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let system = meminfo.as_deref().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024.0)
    });
    let read = |name: &str| -> Option<f64> {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{name}"))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let cgroup = read("memory.max").map(|max| max - read("memory.current").unwrap_or(0.0));
    match (system, cgroup) {
        (Some(s), Some(c)) => Some(s.min(c)),
        (s, c) => s.or(c),
    }
}

/// Refuses a run whose estimate exceeds the memory available on `device`, before anything is
/// allocated; the message gives both. GPU memory is not checked: wgpu does not report how
/// much a device has.
pub fn check(config: &ExperimentConfig, info: &TaskInfo, device: &Device) -> Result<(), String> {
    if !estafet_models::fused::has_kernel(device) {
        return Ok(());
    }
    let estimate = for_run(config, info, device);
    match available() {
        Some(free) if estimate.total > free => Err(format!(
            "model.d_model = {} (and train.batch_size = {}, T = {}): training needs {}, but {} \
             is available; choose a smaller model, batch or length (or pass \
             --skip-memory-check if the estimate is wrong)",
            config.model.d_model,
            config.train.batch_size,
            info.seq_len,
            estimate.describe(),
            human(free)
        )),
        _ => Ok(()),
    }
}

/// Bytes as a person reads them: `1.2 GB`, `340 MB`, `5.0 TB`.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 || value >= 100.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Peak resident set of this process so far, in MB (Linux `VmHWM`; `None` elsewhere).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
