//! The vanishing-gradient lens: how much the loss at the last position depends on each earlier
//! input and state.
//!
//! For a batch of the task's held-out sequences at length `T`, the model runs token by token
//! (`step`) on the autodiff device. Each encoded input `x_t` is a leaf, and after each step a
//! zero leaf is added to every state tensor. Then `L_T`, the loss at the last position alone, is
//! differentiated once: `‖∂L_T/∂x_t‖` and `‖∂L_T/∂h_t‖` (all state tensors of all layers
//! together) per sequence, averaged over the batch, as a function of the distance `T − 1 − t`.
//! The decay rate is the slope of a least-squares line through `ln ‖·‖` against distance.

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor};
use estafet_data::{Batch, SeqBatch, Task, TaskConfig};
use estafet_models::{Input, SequenceModel};
use serde::Serialize;

use crate::Error;

/// Gradient norms by distance from the last position (index = distance).
#[derive(Clone, Debug, Serialize)]
pub struct Flow {
    pub label: String,
    pub seq_len: usize,
    /// `‖∂L_T/∂x_{T−1−k}‖` at index `k`.
    pub input: Vec<f64>,
    /// `‖∂L_T/∂h_{T−1−k}‖` at index `k`; index 0 is `NaN` (the last state does not reach `L_T`).
    pub state: Vec<f64>,
    /// Fitted `d ln ‖∂L_T/∂x‖ / d distance` (negative: vanishing).
    pub input_slope: f64,
    pub state_slope: f64,
}

/// A model to measure: a config's at initialisation, or a run directory's trained one.
pub struct Source {
    /// The file stem of the config, or the run directory's name.
    pub label: String,
    pub config: crate::ExperimentConfig,
    pub model: SequenceModel,
    /// "at initialisation" or "trained, step N".
    pub when: String,
    /// The task's own length.
    pub seq_len: usize,
}

impl Source {
    /// Reads `path`, a run directory or a config, onto `device` (an autodiff device).
    pub fn load(path: &std::path::Path, device: &Device) -> Result<Self, Error> {
        let name = |n: Option<&std::ffi::OsStr>, or: &str| {
            n.map_or(or.into(), |n| n.to_string_lossy().into_owned())
        };
        if path.is_dir() {
            let run = crate::saved::SavedRun::load(path, device)?;
            return Ok(Self {
                label: name(path.file_name(), "run"),
                seq_len: run.task.info().seq_len,
                when: format!("trained, step {}", run.step),
                config: run.config,
                model: run.model,
            });
        }
        let config = crate::config::load(&crate::ConfigSource::read(path)?, &[])?;
        let info = config
            .task
            .build()
            .map_err(|e| Error::Config(e.to_string()))?
            .info();
        let model = config.model.init(
            crate::evaluate::model_io(&info),
            &mut estafet_models::Init::new(config.run.seed, device),
        );
        Ok(Self {
            label: name(path.file_stem(), "config"),
            config,
            model,
            when: "at initialisation".into(),
            seq_len: info.seq_len,
        })
    }
}

/// Measures `model` (on an autodiff device) on `batch` held-out sequences of `task` at length
/// `seq_len`.
pub fn measure(
    label: &str,
    model: &SequenceModel,
    task: &TaskConfig,
    seq_len: usize,
    batch: usize,
    seed: u64,
    device: &Device,
) -> Result<Flow, Error> {
    let task: Task = task
        .with_seq_len(seq_len)
        .and_then(|c| c.build())
        .map_err(|e| Error::Config(format!("--seq-len {seq_len}: {e}")))?;
    let samples = task.eval_set(seed, batch);
    let data = Batch::new(&samples, device);
    let input = match &data.input {
        SeqBatch::Tokens(x) => Input::Tokens(x.clone()),
        SeqBatch::Reals(x) => Input::Features(x.clone()),
    };
    let encoded = model.encode(input).detach();
    let [b, t_len, _] = encoded.dims();
    let mut xs = Vec::with_capacity(t_len);
    let mut state_leaves = Vec::with_capacity(t_len);
    let mut state = None;
    let mut last = None;
    for t in 0..t_len {
        let x = encoded
            .clone()
            .slice_dim(1, t..t + 1)
            .squeeze_dim::<2>(1)
            .require_grad();
        xs.push(x.clone());
        let (out, next) = model.step_encoded(x, state);
        if t + 1 == t_len {
            last = Some(out);
            break;
        }
        let mut leaves = Vec::new();
        let layers = next
            .layers
            .into_iter()
            .map(|s| {
                let (s, l) = s.perturbed();
                leaves.extend(l);
                s
            })
            .collect();
        state_leaves.push(leaves);
        state = Some(estafet_models::ModelState { layers });
    }
    let out = last.expect("T ≥ 1");
    let loss = match &data.target {
        SeqBatch::Tokens(y) => {
            let y_last = y.clone().slice_dim(1, t_len - 1..t_len);
            -log_softmax(out, 1).gather(1, y_last).mean()
        }
        SeqBatch::Reals(y) => {
            let y_last = y.clone().slice_dim(1, t_len - 1..t_len).squeeze_dim::<2>(1);
            (out - y_last).powf_scalar(2.0).mean()
        }
    };
    let grads = loss.backward();
    // Per-sequence norms, then the batch mean.
    let norm = |squares: Option<Tensor<2>>| -> f64 {
        match squares {
            None => 0.0,
            Some(sq) => {
                let per_seq: Vec<f32> = sq
                    .sum_dim(1)
                    .sqrt()
                    .into_data()
                    .try_to_vec()
                    .unwrap_or_default();
                per_seq.iter().map(|&v| v as f64).sum::<f64>() / b as f64
            }
        }
    };
    let squares = |leaf: &Tensor<2>| leaf.grad(&grads).map(|g| g.powf_scalar(2.0));
    let mut input = vec![0.0; t_len];
    let mut state_norms = vec![f64::NAN; t_len];
    for (t, x) in xs.iter().enumerate() {
        input[t_len - 1 - t] = norm(squares(x));
    }
    for (t, leaves) in state_leaves.iter().enumerate() {
        let total = leaves
            .iter()
            .filter_map(|l| squares(l).map(|s| s.sum_dim(1)))
            .reduce(|a, c| a + c);
        state_norms[t_len - 1 - t] = norm(total);
    }
    Ok(Flow {
        label: label.to_string(),
        seq_len: t_len,
        input_slope: log_slope(&input),
        state_slope: log_slope(&state_norms),
        input,
        state: state_norms,
    })
}

/// Least-squares slope of `ln y` against the index, over the finite positive `y`.
pub fn log_slope(y: &[f64]) -> f64 {
    let points: Vec<(f64, f64)> = y
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite() && **v > 0.0)
        .map(|(k, v)| (k as f64, v.ln()))
        .collect();
    let n = points.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (mx, my) = (
        points.iter().map(|p| p.0).sum::<f64>() / n,
        points.iter().map(|p| p.1).sum::<f64>() / n,
    );
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    sxy / sxx
}

/// Writes into `dir`: `LABEL.csv` (inputs) and `LABEL.state.csv` (states) with columns
/// `distance,grad_norm`, the plots `gradflow.{png,svg}` and `gradflow-state.{png,svg}` (log norm
/// against distance, one curve per model) and `summary.json` (the fitted slopes).
pub fn write(dir: &std::path::Path, flows: &[Flow]) -> Result<(), Error> {
    use crate::plot::{Curve, Figure};
    let run_dir = crate::run_dir::RunDir::create(dir)?;
    for f in flows {
        run_dir.write_atomic(&format!("{}.csv", f.label), csv(&f.input).as_bytes())?;
        run_dir.write_atomic(&format!("{}.state.csv", f.label), csv(&f.state).as_bytes())?;
    }
    let summary: Vec<serde_json::Value> = flows
        .iter()
        .map(|f| {
            serde_json::json!({
                "label": f.label, "seq_len": f.seq_len,
                "input_slope_per_step": f.input_slope, "state_slope_per_step": f.state_slope,
                "input_factor_per_step": f.input_slope.exp(), "state_factor_per_step": f.state_slope.exp(),
            })
        })
        .collect();
    run_dir.write_json("summary.json", &summary)?;
    for (name, what, pick) in [
        (
            "gradflow",
            "‖∂L_T/∂x_t‖",
            (|f: &Flow| &f.input) as fn(&Flow) -> &Vec<f64>,
        ),
        ("gradflow-state", "‖∂L_T/∂h_t‖", |f: &Flow| &f.state),
    ] {
        let figure = Figure {
            title: format!("{what}: the last loss's dependence on earlier steps"),
            x_label: "distance T − 1 − t (steps)".into(),
            y_label: what.into(),
            log_x: false,
            log_y: true,
            curves: flows
                .iter()
                .map(|f| Curve {
                    label: format!(
                        "{} (slope {:.3}/step)",
                        f.label,
                        if name == "gradflow" {
                            f.input_slope
                        } else {
                            f.state_slope
                        }
                    ),
                    points: pick(f)
                        .iter()
                        .enumerate()
                        .filter(|(_, v)| v.is_finite() && **v > 0.0)
                        .map(|(k, v)| (k as f64, *v))
                        .collect(),
                    band: Vec::new(),
                })
                .collect(),
            references: Vec::new(),
        };
        figure.save(&dir.join(name))?;
    }
    Ok(())
}

/// `distance,grad_norm` rows.
pub fn csv(norms: &[f64]) -> String {
    let mut out = String::from("distance,grad_norm\n");
    for (k, v) in norms.iter().enumerate() {
        if v.is_finite() {
            out.push_str(&format!("{k},{v:e}\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backend;
    use estafet_models::{Init, ModelConfig};

    /// The step-mode norms equal finite differences of `L_T` with respect to each input.
    #[test]
    fn input_norms_match_finite_differences() {
        let device = Backend::default_compiled().unwrap().device().unwrap();
        let ad = device.clone().autodiff();
        let task = TaskConfig::Parity(Default::default());
        let config: ModelConfig = serde_json::from_value(serde_json::json!({
            "mixer": { "kind": "gru" }, "d_model": 3, "n_layers": 2
        }))
        .unwrap();
        let io = crate::evaluate::model_io(&task.build().unwrap().info());
        let model = config.init(io, &mut Init::new(5, &ad));
        let flow = measure("gru", &model, &task, 6, 1, 0, &ad).unwrap();
        assert!(flow.state[0].is_nan() && flow.state[1..].iter().all(|v| *v > 0.0));

        // L_T as a function of the encoded inputs, on the plain device.
        let plain = config.init(io, &mut Init::new(5, &device));
        let sample = task
            .with_seq_len(6)
            .unwrap()
            .build()
            .unwrap()
            .eval_set(0, 1);
        let batch = Batch::new(&sample, &device);
        let SeqBatch::Tokens(tokens) = &batch.input else {
            unreachable!()
        };
        let target = sample[0].target.tokens()[5] as usize;
        let encoded: Vec<f32> = plain
            .encode(Input::Tokens(tokens.clone()))
            .into_data()
            .try_to_vec()
            .unwrap();
        let loss = |x: &[f32]| -> f64 {
            let mut state = None;
            let mut out = None;
            for t in 0..6 {
                let xt = Tensor::<2>::from_data(
                    burn::tensor::TensorData::new(x[t * 3..t * 3 + 3].to_vec(), [1, 3]),
                    &device,
                );
                let (o, s) = plain.step_encoded(xt, state);
                state = Some(s);
                out = Some(o);
            }
            let logp: Vec<f32> = log_softmax(out.unwrap(), 1)
                .into_data()
                .try_to_vec()
                .unwrap();
            -(logp[target] as f64)
        };
        for t in 0..6 {
            let mut squares = 0.0;
            for i in 0..3 {
                let h = 1e-2f32;
                let (mut up, mut down) = (encoded.clone(), encoded.clone());
                up[t * 3 + i] += h;
                down[t * 3 + i] -= h;
                squares += ((loss(&up) - loss(&down)) / (2.0 * h as f64)).powi(2);
            }
            let fd = squares.sqrt();
            let got = flow.input[5 - t];
            assert!(
                (got - fd).abs() <= 2e-3 * fd.max(1e-3),
                "t {t}: {got} vs {fd}"
            );
        }
    }

    #[test]
    fn slope_of_a_geometric_decay() {
        let y: Vec<f64> = (0..50).map(|k| 3.0 * 0.9f64.powi(k)).collect();
        assert!((log_slope(&y) - 0.9f64.ln()).abs() < 1e-12);
        assert!(log_slope(&[f64::NAN, 1.0]).is_nan());
    }
}
