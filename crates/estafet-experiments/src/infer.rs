//! Using a trained model: streaming character generation and time-series forecasts.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::{Device, Int, Tensor, TensorData};
use estafet_data::Task;
use estafet_data::time_series::read_csv_column;
use estafet_models::Input;
use rand::{Rng, SeedableRng};

use crate::Error;
use crate::saved::SavedRun;

/// How to draw each next character.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    /// Divides the logits; 0 picks the most likely character.
    pub temperature: f64,
    /// Keep only the `k` most likely characters (`None`: all).
    pub top_k: Option<usize>,
    pub seed: u64,
}

/// What a generation cost.
#[derive(Clone, Copy, Debug)]
pub struct GenerateStats {
    pub tokens: usize,
    pub seconds: f64,
    pub peak_rss_mb: Option<f64>,
}

/// Checks the arguments, echoes `prompt` to `out` and feeds it to a char-LM run's model, then
/// draws `tokens` characters one `step` at a time (a fixed-size state for recurrent models, a
/// growing KV cache for attention), writing each to `out` as soon as it is drawn.
pub fn generate(
    run: &SavedRun,
    prompt: &str,
    tokens: usize,
    sampling: Sampling,
    device: &Device,
    out: &mut impl Write,
) -> Result<GenerateStats, Error> {
    let Task::CharLm(lm) = &run.task else {
        return Err(Error::Config(format!(
            "{}: generate needs a char_lm run; this one trained on {}",
            run.dir.display(),
            run.task.info().kind
        )));
    };
    if !(sampling.temperature >= 0.0 && sampling.temperature.is_finite()) {
        return Err(Error::Config("--temperature must be a number ≥ 0".into()));
    }
    if sampling.top_k == Some(0) {
        return Err(Error::Config("--top-k must be at least 1".into()));
    }
    let vocab = lm.vocab();
    let ids: Vec<i64> = prompt
        .chars()
        .map(|c| {
            vocab.binary_search(&c).map(|i| i as i64).map_err(|_| {
                Error::Config(format!(
                    "--prompt: {c:?} is not in the run's vocabulary of {} characters",
                    vocab.len()
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(Error::Config(
            "--prompt must hold at least one character".into(),
        ));
    }
    // The prompt is echoed only once every argument has been checked, so an error is one
    // line on stderr and nothing on stdout.
    write!(out, "{prompt}").context("cannot write the output")?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(sampling.seed);
    let started = Instant::now();
    let n = ids.len();
    let (logits, mut state) = run.model.forward(
        Input::Tokens(Tensor::from_data(TensorData::new(ids, [1, n]), device)),
        None,
    );
    let mut last: Vec<f32> = logits
        .slice([0..1, n - 1..n])
        .into_data()
        .try_to_vec()
        .map_err(|e| anyhow::anyhow!("cannot read logits: {e:?}"))?;
    for _ in 0..tokens {
        let next = draw(&last, sampling, &mut rng);
        write!(out, "{}", vocab[next]).context("cannot write the output")?;
        out.flush().ok();
        let token: Tensor<2, Int> =
            Tensor::from_data(TensorData::new(vec![next as i64], [1, 1]), device);
        let (logits, next_state) = run.model.step(Input::Tokens(token), Some(state));
        state = next_state;
        last = logits
            .into_data()
            .try_to_vec()
            .map_err(|e| anyhow::anyhow!("cannot read logits: {e:?}"))?;
    }
    Ok(GenerateStats {
        tokens,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_mb: crate::memory::peak_rss_mb(),
    })
}

/// An index drawn from softmax(`logits` / temperature) over the top-k.
fn draw(logits: &[f32], s: Sampling, rng: &mut rand_chacha::ChaCha8Rng) -> usize {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if s.temperature == 0.0 {
        return order[0];
    }
    order.truncate(s.top_k.unwrap_or(order.len()));
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - top) / s.temperature).exp())
        .collect();
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i;
        }
        u -= w;
    }
    *order.last().expect("a vocabulary is never empty")
}

/// Reads a series (column `column` of the CSV `input`, in the units the run was trained on)
/// and writes, for every row `t`, the run's forecasts of rows `t + 1 … t + horizon`, as CSV
/// (`t,value,forecast_1,…`), in the same units. Missing values are handled as the run's task
/// config says (`missing`), so `t` counts the rows that remain.
pub fn predict(
    run: &SavedRun,
    input: &Path,
    column: &str,
    device: &Device,
) -> Result<String, Error> {
    let Task::TimeSeries(ts) = &run.task else {
        return Err(Error::Config(format!(
            "{}: predict needs a time_series run; this one trained on {}",
            run.dir.display(),
            run.task.info().kind
        )));
    };
    let values = read_csv_column(input, column, ts.missing())
        .map_err(|e| Error::Config(format!("--input: {}", e.message)))?;
    if values.is_empty() {
        return Err(Error::Config(format!(
            "--input: {} holds no values",
            input.display()
        )));
    }
    let (mean, std) = ts.scale();
    let n = values.len();
    let z: Vec<f32> = values.iter().map(|v| ((v - mean) / std) as f32).collect();
    let (out, _) = run.model.forward(
        Input::Features(Tensor::from_data(TensorData::new(z, [1, n, 1]), device)),
        None,
    );
    let forecasts: Vec<f32> = out
        .into_data()
        .try_to_vec()
        .map_err(|e| anyhow::anyhow!("cannot read forecasts: {e:?}"))?;
    let h = ts.horizon();
    let mut csv = String::from("t,value");
    for j in 1..=h {
        csv.push_str(&format!(",forecast_{j}"));
    }
    csv.push('\n');
    for (t, v) in values.iter().enumerate() {
        csv.push_str(&format!("{t},{v}"));
        for j in 0..h {
            csv.push_str(&format!(",{}", mean + std * forecasts[t * h + j] as f64));
        }
        csv.push('\n');
    }
    Ok(csv)
}
