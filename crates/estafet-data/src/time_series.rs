//! Time-series forecasting: read a series one value at a time and predict, at every position,
//! the next `horizon` values. The series is synthetic (a fresh one per sample) or a column of
//! the user's CSV file.
//!
//! - `series = "sines"`: a sum of three sines with random amplitudes in [0.5, 1), periods in
//!   [8, 64) steps and phases, plus Gaussian noise of standard deviation `noise`.
//! - `series = "mackey_glass"`: the Mackey-Glass delay equation
//!   `dx/dt = 0.2·x(t−17) / (1 + x(t−17)¹⁰) − 0.1·x(t)` (chaotic at τ = 17), integrated by Euler
//!   steps of 0.1 from a random constant history, sampled every time unit after 500 units of
//!   burn-in, standardised by its long-run mean 0.9 and deviation 0.23, plus `noise`.
//! - `series = "csv"`: column `column` (a header name, or a 0-based index) of the CSV file
//!   `path`; the first `1 − valid_fraction` of the rows trains and the rest validates, and both
//!   are standardised by the training rows' mean and deviation. Windows start at random rows of
//!   their split. Every value must be finite in f32 (a value beyond ±3.4e38 is an error naming
//!   its line), and the training rows must not all be equal (a zero spread cannot be
//!   standardised). A missing value (an empty cell, `NA`, `N/A`, `NaN`, `null`) is an error by
//!   default; `missing = "skip"` drops its row and `missing = "forward_fill"` repeats the last
//!   value before it (rows missing before the first value are dropped), since real price and
//!   sensor series have gaps.
//!
//! Worked example, `horizon = 2`, `seq_len = 4`, series `x₀ x₁ …`:
//!
//! ```text
//! position   0       1       2       3
//! input      x₀      x₁      x₂      x₃
//! target    (x₁,x₂) (x₂,x₃) (x₃,x₄) (x₄,x₅)    every position is scored
//! ```
//!
//! Metric: mean squared error over positions and horizon steps. Baseline: persistence (every
//! future value equals the last one seen), measured on 256 held-out windows when the task is
//! built. Solved at half the persistence error.

use std::path::PathBuf;
use std::sync::Arc;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::stream::Streams;
use crate::task::{
    Channel, LossPositions, Metric, Readout, Sample, Seq, Split, TaskError, TaskInfo, invalid,
};

/// Where the values come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Series {
    Sines,
    MackeyGlass,
    Csv,
}

/// What a missing value in a CSV column does (`series = "csv"` only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// Stop with an error naming the line.
    #[default]
    Error,
    /// Drop the row.
    Skip,
    /// Repeat the last value seen; rows before the first value are dropped.
    ForwardFill,
}

/// `[task]` with `kind = "time_series"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeSeriesConfig {
    pub series: Series,
    /// The CSV file (`series = "csv"` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// The CSV column: a header name or a 0-based index (`series = "csv"` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    pub seq_len: usize,
    /// Future values predicted at each position.
    pub horizon: usize,
    /// Standard deviation of the Gaussian noise added to a synthetic series.
    pub noise: f64,
    /// Fraction of a CSV's rows, at its end, held out for validation.
    pub valid_fraction: f64,
    /// A missing value in the CSV column: `error`, `skip` its row, or `forward_fill`.
    pub missing: Missing,
}

impl Default for TimeSeriesConfig {
    fn default() -> Self {
        Self {
            series: Series::Sines,
            path: None,
            column: None,
            seq_len: 128,
            horizon: 1,
            noise: 0.1,
            valid_fraction: 0.2,
            missing: Missing::Error,
        }
    }
}

/// Held-out windows the persistence baseline is measured on.
const BASELINE_WINDOWS: usize = 256;

impl TimeSeriesConfig {
    pub fn build(&self) -> Result<TimeSeries, TaskError> {
        if self.seq_len == 0 {
            return invalid("seq_len", "must be at least 1");
        }
        if self.horizon == 0 {
            return invalid("horizon", "must be at least 1");
        }
        if !(self.noise >= 0.0 && self.noise.is_finite()) {
            return invalid("noise", "must be a finite number ≥ 0");
        }
        let data = match self.series {
            Series::Csv => {
                let (Some(path), Some(column)) = (&self.path, &self.column) else {
                    let missing = if self.path.is_none() {
                        "path"
                    } else {
                        "column"
                    };
                    return invalid(missing, "series = \"csv\" needs both path and column");
                };
                if !(self.valid_fraction > 0.0 && self.valid_fraction < 1.0) {
                    return invalid("valid_fraction", "must lie strictly between 0 and 1");
                }
                Some(self.load_csv(path, column)?)
            }
            _ => {
                for (field, given) in [
                    ("path", self.path.is_some()),
                    ("column", self.column.is_some()),
                    ("missing", self.missing != Missing::Error),
                ] {
                    if given {
                        return invalid(field, "only a CSV series (series = \"csv\") reads a file");
                    }
                }
                None
            }
        };
        let mut task = TimeSeries {
            config: self.clone(),
            data,
            baseline: 0.0,
        };
        let mut rng = crate::rng::stream(0, crate::rng::EVAL_STREAM);
        let windows: Vec<Sample> = (0..BASELINE_WINDOWS)
            .map(|_| task.sample(&mut rng, Split::Valid))
            .collect();
        task.baseline = persistence_mse(&windows);
        Ok(task)
    }

    fn load_csv(&self, path: &std::path::Path, column: &str) -> Result<CsvData, TaskError> {
        let values = read_csv_column(path, column, self.missing)?;
        let n = values.len();
        let split = ((1.0 - self.valid_fraction) * n as f64).round() as usize;
        let window = self.seq_len + self.horizon;
        if split < window || n - split < window {
            return invalid(
                "seq_len",
                format!(
                    "windows of seq_len + horizon = {window} values do not fit both splits of \
                     {n} rows ({split} train, {} validation)",
                    n - split
                ),
            );
        }
        let mean = values[..split].iter().sum::<f64>() / split as f64;
        let var = values[..split]
            .iter()
            .map(|v| (v - mean).powi(2))
            .sum::<f64>()
            / split as f64;
        // A constant training split would standardise to 0/0: every window the same, and any
        // model "beats" persistence on the noise of a rounding error.
        if var <= 0.0 {
            return invalid(
                "column",
                format!(
                    "{}: column {column:?} is constant over its {split} training rows (value \
                     {mean}); a zero spread cannot be standardised",
                    path.display()
                ),
            );
        }
        let std = var.sqrt();
        Ok(CsvData {
            values: values.iter().map(|v| ((v - mean) / std) as f32).collect(),
            split,
            mean,
            std,
        })
    }
}

/// Column `column` (a header name, or a 0-based index; a first row that is not numeric there is
/// a header) of the CSV file `path`, as numbers, each finite in f32 (the models' precision).
/// Missing values are handled as `missing` says. Errors name the line.
pub fn read_csv_column(
    path: &std::path::Path,
    column: &str,
    missing: Missing,
) -> Result<Vec<f64>, TaskError> {
    let text = std::fs::read_to_string(path)
        .or_else(|e| invalid("path", format!("cannot read {}: {e}", path.display())))?;
    let rows: Vec<(usize, Vec<&str>)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.split(',').map(str::trim).collect()))
        .collect();
    let Some((_, first)) = rows.first() else {
        return invalid("path", format!("{} holds no rows", path.display()));
    };
    let by_name = first.iter().position(|h| *h == column);
    let (index, body) = match (by_name, column.parse::<usize>()) {
        (Some(i), _) => (i, &rows[1..]),
        (None, Ok(i)) => {
            let has_header = first.get(i).is_some_and(|v| v.parse::<f64>().is_err());
            (i, if has_header { &rows[1..] } else { &rows[..] })
        }
        (None, Err(_)) => {
            return invalid(
                "column",
                format!(
                    "{} has no column {column:?} (its header: {})",
                    path.display(),
                    first.join(",")
                ),
            );
        }
    };
    let mut values = Vec::with_capacity(body.len());
    for (line, cells) in body {
        let at = |what: String| TaskError {
            field: "column",
            message: format!("{}:{line}: {what}", path.display()),
        };
        let cell = cells
            .get(index)
            .ok_or_else(|| at(format!("no column {index} in this row")))?;
        if is_missing(cell) {
            match missing {
                Missing::Error => {
                    return Err(at(format!(
                        "missing value {cell:?} (set missing = \"skip\" or \"forward_fill\" to \
                         accept gaps)"
                    )));
                }
                Missing::Skip => {}
                Missing::ForwardFill => {
                    if let Some(&last) = values.last() {
                        values.push(last);
                    }
                }
            }
            continue;
        }
        let v: f64 = cell
            .parse()
            .map_err(|_| at(format!("{cell:?} is not a number")))?;
        if !v.is_finite() || !(v as f32).is_finite() {
            return Err(at(format!(
                "{cell} is not a finite number in f32 (|x| ≤ 3.4e38), the precision models \
                 compute in"
            )));
        }
        values.push(v);
    }
    Ok(values)
}

/// A cell that holds no value: empty, or one of the usual spellings of "not available".
fn is_missing(cell: &str) -> bool {
    cell.is_empty()
        || ["na", "n/a", "nan", "null", "none"]
            .iter()
            .any(|m| cell.eq_ignore_ascii_case(m))
}

/// A CSV column, standardised by its training rows.
#[derive(Clone, Debug)]
struct CsvData {
    values: Arc<[f32]>,
    /// Index of the first validation row.
    split: usize,
    mean: f64,
    std: f64,
}

impl CsvData {
    fn range(&self, split: Split) -> (usize, usize) {
        match split {
            Split::Train => (0, self.split),
            Split::Valid => (self.split, self.values.len()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TimeSeries {
    config: TimeSeriesConfig,
    data: Option<CsvData>,
    baseline: f64,
}

impl TimeSeries {
    pub fn info(&self) -> TaskInfo {
        TaskInfo {
            kind: "time_series",
            input: Channel::Reals { width: 1 },
            output: Channel::Reals {
                width: self.config.horizon,
            },
            seq_len: self.config.seq_len,
            metric: Metric::Mse,
            loss_positions: LossPositions::All,
            baseline_loss: self.baseline,
            baseline_metric: self.baseline,
            solved_metric: self.baseline / 2.0,
            readout: Readout::PerPosition,
        }
    }

    pub fn horizon(&self) -> usize {
        self.config.horizon
    }

    /// How the run's CSV handled missing values (a series to forecast is read the same way).
    pub fn missing(&self) -> Missing {
        self.config.missing
    }

    /// The affine map from model values back to the CSV's units: `x = mean + std · z`.
    pub fn scale(&self) -> (f64, f64) {
        self.data.as_ref().map_or((0.0, 1.0), |d| (d.mean, d.std))
    }

    pub fn sample(&self, rng: &mut ChaCha8Rng, split: Split) -> Sample {
        let n = self.config.seq_len + self.config.horizon;
        let series: Vec<f32> = match (&self.data, self.config.series) {
            (Some(d), _) => {
                let (lo, hi) = d.range(split);
                let start = rng.random_range(lo..=hi - n);
                d.values[start..start + n].to_vec()
            }
            (None, Series::MackeyGlass) => mackey_glass(rng, n, self.config.noise),
            (None, _) => sines(rng, n, self.config.noise),
        };
        self.window(&series)
    }

    /// `count` parallel streams through `split` of a CSV series ([`Streams`]); `None` for a
    /// synthetic one, whose every sample is a fresh series.
    pub fn streams(&self, split: Split, count: usize) -> Result<Option<Streams>, String> {
        self.data
            .as_ref()
            .map(|d| {
                let (lo, hi) = d.range(split);
                Streams::new(lo, hi, count, self.config.seq_len, self.config.horizon)
            })
            .transpose()
    }

    /// The window of a CSV series whose first input is row `start`.
    pub fn window_at(&self, start: usize) -> Sample {
        let d = self.data.as_ref().expect("a CSV series");
        let n = self.config.seq_len + self.config.horizon;
        self.window(&d.values[start..start + n])
    }

    /// `series` (`seq_len + horizon` values) as inputs and, at every position, the next
    /// `horizon` values.
    fn window(&self, series: &[f32]) -> Sample {
        let (t, h) = (self.config.seq_len, self.config.horizon);
        let target = (0..t)
            .flat_map(|i| series[i + 1..=i + h].iter().copied())
            .collect();
        Sample {
            input: Seq::Reals {
                width: 1,
                values: series[..t].to_vec(),
            },
            target: Seq::Reals {
                width: h,
                values: target,
            },
            mask: vec![true; t],
        }
    }
}

/// Mean squared error of predicting every future value as the current one.
pub fn persistence_mse(samples: &[Sample]) -> f64 {
    let (mut sum, mut count) = (0.0, 0usize);
    for s in samples {
        for t in 0..s.input.len() {
            let now = s.input.reals_at(t)[0] as f64;
            for &future in s.target.reals_at(t) {
                sum += (future as f64 - now).powi(2);
                count += 1;
            }
        }
    }
    sum / count as f64
}

/// A standard normal draw (Box–Muller).
fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u: f64 = 1.0 - rng.random::<f64>();
    let v: f64 = rng.random();
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

fn sines(rng: &mut ChaCha8Rng, n: usize, noise: f64) -> Vec<f32> {
    let waves: Vec<(f64, f64, f64)> = (0..3)
        .map(|_| {
            (
                rng.random_range(0.5..1.0),
                std::f64::consts::TAU / rng.random_range(8.0..64.0),
                rng.random_range(0.0..std::f64::consts::TAU),
            )
        })
        .collect();
    (0..n)
        .map(|t| {
            let clean: f64 = waves
                .iter()
                .map(|(a, w, phi)| a * (w * t as f64 + phi).sin())
                .sum();
            (clean + noise * gaussian(rng)) as f32
        })
        .collect()
}

fn mackey_glass(rng: &mut ChaCha8Rng, n: usize, noise: f64) -> Vec<f32> {
    const DT: f64 = 0.1;
    const PER_UNIT: usize = 10;
    const DELAY: usize = 170; // τ = 17 time units of DT
    const BURN_IN: usize = 500;
    let mut x: Vec<f64> = vec![rng.random_range(0.5..1.3); DELAY + 1];
    let steps = (BURN_IN + n) * PER_UNIT;
    x.reserve(steps);
    for _ in 0..steps {
        let now = x[x.len() - 1];
        let delayed = x[x.len() - 1 - DELAY];
        x.push(now + DT * (0.2 * delayed / (1.0 + delayed.powi(10)) - 0.1 * now));
    }
    let start = DELAY + BURN_IN * PER_UNIT;
    (0..n)
        .map(|i| ((x[start + i * PER_UNIT] - 0.9) / 0.23 + noise * gaussian(rng)) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::stream;
    use crate::stream::Window;

    fn config(series: Series) -> TimeSeriesConfig {
        TimeSeriesConfig {
            series,
            seq_len: 20,
            horizon: 3,
            ..TimeSeriesConfig::default()
        }
    }

    /// The targets at `t` are the inputs at `t + 1 … t + horizon` where those are inputs.
    fn check_shift(s: &Sample, h: usize) {
        let t = s.input.len();
        for i in 0..t {
            for j in 1..=h {
                if i + j < t {
                    assert_eq!(s.target.reals_at(i)[j - 1], s.input.reals_at(i + j)[0]);
                }
            }
        }
    }

    #[test]
    fn targets_are_the_next_values_of_the_series() {
        for series in [Series::Sines, Series::MackeyGlass] {
            let task = config(series).build().unwrap();
            for seed in 0..5 {
                let s = task.sample(&mut stream(seed, 0), Split::Train);
                assert_eq!((s.input.len(), s.target.reals_at(0).len()), (20, 3));
                check_shift(&s, 3);
                assert_eq!(s, task.sample(&mut stream(seed, 0), Split::Train));
            }
        }
    }

    #[test]
    fn mackey_glass_is_chaotic_not_flat_and_standardised() {
        let task = TimeSeriesConfig {
            series: Series::MackeyGlass,
            noise: 0.0,
            seq_len: 500,
            ..TimeSeriesConfig::default()
        }
        .build()
        .unwrap();
        let s = task.sample(&mut stream(1, 0), Split::Train);
        let v: Vec<f64> = (0..500).map(|t| s.input.reals_at(t)[0] as f64).collect();
        let mean = v.iter().sum::<f64>() / 500.0;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 500.0).sqrt();
        assert!(
            mean.abs() < 0.5 && (0.5..1.5).contains(&std),
            "mean {mean} std {std}"
        );
    }

    #[test]
    fn csv_column_by_name_or_index_standardised_by_the_training_rows() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut text = String::from("day,close\n");
        for i in 0..100 {
            text.push_str(&format!("{i},{}\n", 10.0 + i as f64));
        }
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        let csv = |column: &str| TimeSeriesConfig {
            series: Series::Csv,
            path: Some(f.path().into()),
            column: Some(column.into()),
            seq_len: 10,
            horizon: 2,
            ..TimeSeriesConfig::default()
        };
        let task = csv("close").build().unwrap();
        let (mean, std) = task.scale();
        assert!(
            (mean - 49.5).abs() < 1e-9,
            "training rows 0..80: mean {mean}"
        );
        for split in [Split::Train, Split::Valid] {
            let s = task.sample(&mut stream(3, 0), split);
            check_shift(&s, 2);
            let first = mean + std * s.input.reals_at(0)[0] as f64;
            let row = first - 10.0;
            assert!((row - row.round()).abs() < 1e-3);
            match split {
                Split::Train => assert!(row.round() as usize + 12 <= 80),
                Split::Valid => assert!(row.round() as usize >= 80),
            }
        }
        // Persistence on a unit ramp misses by one (or two) rows' worth per step.
        let step = 1.0 / std;
        let expected = (step * step + 4.0 * step * step) / 2.0;
        assert!((task.info().baseline_metric - expected).abs() < 1e-6);
        assert_eq!(csv("1").build().unwrap().scale(), task.scale());
        let e = csv("open").build().unwrap_err();
        assert_eq!(e.field, "column");
        assert!(e.message.contains("day,close"), "{e}");
    }

    /// A CSV series read as streams: each stream's windows are consecutive rows (read back
    /// from the standardised values of a ramp), each window's last target rows are the next
    /// window's first inputs; a synthetic series has no streams.
    #[test]
    fn csv_streams_read_consecutive_rows() {
        let mut text = String::from("close\n");
        for i in 0..200 {
            text.push_str(&format!("{}\n", 10.0 + i as f64));
        }
        let f = csv_file(&text);
        let task = TimeSeriesConfig {
            series: Series::Csv,
            path: Some(f.path().into()),
            column: Some("close".into()),
            seq_len: 8,
            horizon: 3,
            ..TimeSeriesConfig::default()
        }
        .build()
        .unwrap();
        let (mean, std) = task.scale();
        let row = |v: f32| (mean + std * v as f64 - 10.0).round() as usize;
        let streams = task.streams(Split::Train, 4).unwrap().unwrap();
        // 160 training rows, 40 per stream: (40 − 3) / 8 windows.
        assert_eq!(streams.windows(), 4);
        for b in 0..4 {
            for index in 0..streams.windows() {
                let w = task.window_at(streams.start(b, Window { pass: 0, index }));
                let rows: Vec<usize> = (0..8).map(|t| row(w.input.reals_at(t)[0])).collect();
                assert_eq!(
                    rows,
                    (b * 40 + index * 8..b * 40 + index * 8 + 8).collect::<Vec<_>>()
                );
                assert_eq!(row(w.target.reals_at(7)[2]), b * 40 + index * 8 + 10);
            }
        }
        let valid = task.streams(Split::Valid, 1).unwrap().unwrap();
        let first = task.window_at(valid.start(0, Window { pass: 0, index: 0 }));
        assert_eq!(row(first.input.reals_at(0)[0]), 160);
        assert!(
            TimeSeriesConfig::default()
                .build()
                .unwrap()
                .streams(Split::Train, 4)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_csv_settings_name_the_field() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, b"v\n1\n2\nthree\n").unwrap();
        let csv = TimeSeriesConfig {
            series: Series::Csv,
            path: Some(f.path().into()),
            column: Some("v".into()),
            seq_len: 1,
            horizon: 1,
            ..TimeSeriesConfig::default()
        };
        let e = csv.build().unwrap_err();
        assert!(e.message.ends_with(":4: \"three\" is not a number"), "{e}");
        let no_column = TimeSeriesConfig {
            column: None,
            ..csv.clone()
        };
        assert_eq!(no_column.build().unwrap_err().field, "column");
        let stray = TimeSeriesConfig {
            series: Series::Sines,
            ..csv
        };
        assert_eq!(stray.build().unwrap_err().field, "path");
        let zero = TimeSeriesConfig {
            horizon: 0,
            ..TimeSeriesConfig::default()
        };
        assert_eq!(zero.build().unwrap_err().field, "horizon");
    }

    fn csv_file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn values_beyond_f32_and_constant_columns_are_refused() {
        let huge = csv_file("v\n1\n2\n1e39\n4\n");
        let e = read_csv_column(huge.path(), "v", Missing::Error).unwrap_err();
        assert_eq!(e.field, "column");
        assert!(
            e.message.contains(":4: 1e39 is not a finite number in f32"),
            "{e}"
        );
        let inf = csv_file("v\n1\ninf\n");
        let e = read_csv_column(inf.path(), "v", Missing::Error).unwrap_err();
        assert!(e.message.contains(":3: inf is not a finite number"), "{e}");
        // f32's largest value itself is fine.
        let edge = csv_file("v\n3.4e38\n-3.4e38\n");
        assert_eq!(
            read_csv_column(edge.path(), "v", Missing::Error)
                .unwrap()
                .len(),
            2
        );

        let mut text = String::from("v\n");
        for i in 0..40 {
            text.push_str(if i < 32 { "5\n" } else { "6\n" });
        }
        let constant = csv_file(&text);
        let e = TimeSeriesConfig {
            series: Series::Csv,
            path: Some(constant.path().into()),
            column: Some("v".into()),
            seq_len: 3,
            horizon: 1,
            ..TimeSeriesConfig::default()
        }
        .build()
        .unwrap_err();
        assert_eq!(e.field, "column");
        assert!(
            e.message.contains("constant over its 32 training rows"),
            "{e}"
        );
    }

    #[test]
    fn missing_values_are_an_error_skipped_or_filled_forward() {
        let gaps = csv_file("t,v\n0,\n1,1.5\n2,NA\n3,2.5\n4,nan\n5,\n6,4\n");
        let e = read_csv_column(gaps.path(), "v", Missing::Error).unwrap_err();
        assert!(e.message.contains(":2: missing value \"\""), "{e}");
        assert!(e.message.contains("forward_fill"), "{e}");
        assert_eq!(
            read_csv_column(gaps.path(), "v", Missing::Skip).unwrap(),
            [1.5, 2.5, 4.0]
        );
        assert_eq!(
            read_csv_column(gaps.path(), "v", Missing::ForwardFill).unwrap(),
            [1.5, 1.5, 2.5, 2.5, 2.5, 4.0]
        );
        // A synthetic series has no cells to miss.
        let e = TimeSeriesConfig {
            missing: Missing::Skip,
            ..TimeSeriesConfig::default()
        }
        .build()
        .unwrap_err();
        assert_eq!(e.field, "missing");
    }

    #[test]
    fn persistence_baseline_is_measured_as_documented() {
        let task = config(Series::Sines).build().unwrap();
        let mut rng = stream(0, crate::rng::EVAL_STREAM);
        let windows: Vec<Sample> = (0..BASELINE_WINDOWS)
            .map(|_| task.sample(&mut rng, Split::Valid))
            .collect();
        assert_eq!(task.info().baseline_metric, persistence_mse(&windows));
        assert!(
            task.info().baseline_metric > 0.02,
            "noise alone gives 2σ² = 0.02"
        );
        // The smallest legal window.
        let one = TimeSeriesConfig {
            seq_len: 1,
            horizon: 1,
            ..TimeSeriesConfig::default()
        };
        assert_eq!(
            one.build()
                .unwrap()
                .sample(&mut rng, Split::Train)
                .input
                .len(),
            1
        );
    }
}
