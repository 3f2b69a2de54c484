//! `estafet report DIR`: a markdown report and plots from run directories alone.
//!
//! Every directory under `DIR` with a `summary.json` is a run. Runs are grouped by task, model
//! (the sweep's label for its `model` axis when `DIR/sweep.json` exists, else the mixer kind) and
//! trained length; figures are the mean over seeds with a 95% confidence interval (Student's t),
//! and the fraction of seeds that reached the task's solved level. A sweep over widths adds the
//! iso-state view: the metric against each model's state floats, one curve per mixer kind.
//!
//! A sweep with axes under `optim.` (learning rate, weight decay, ...) is a search: for each
//! task, model and length the report keeps the setting with the best mean final metric on the
//! evaluation split and quotes that setting's figures on the test split, a second held-out set
//! that neither training nor the choice saw ([`Summary::test_eval`]), so that no architecture
//! loses to a bad learning rate and none wins by the choice itself.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;
use statrs::distribution::{ContinuousCDF, StudentsT};

use crate::Error;
use crate::plot::{Curve, Dot, DotChart, Figure, Heatmap, Reference};
use crate::results::{RunHeader, StopReason, Summary};
use crate::run_dir::RunDir;
use estafet_data::Metric;

/// One finished run, as its files tell it.
struct RunRecord {
    task: String,
    model: String,
    /// The mixer kind (`run.json`'s `model`), which the iso-state view draws one curve for.
    architecture: String,
    seq_len: u64,
    metric_name: String,
    baseline: f64,
    solved_at: f64,
    higher_is_better: bool,
    params: u64,
    state_size: u64,
    metric: f64,
    solved: bool,
    tokens_per_second: f64,
    peak_rss_mb: Option<f64>,
    /// (length, metric) of the final model at other lengths.
    lengths: Vec<(u64, f64)>,
    /// (step, metric) of the held-out evaluations at the trained length.
    curve: Vec<(f64, f64)>,
    /// (step, metric) of the training batches, as logged every `train.log_every` steps.
    train_curve: Vec<(f64, f64)>,
    /// The run's directory name and the step it diverged at (its figures are its last good
    /// checkpoint's).
    diverged: Option<(String, u64)>,
    /// The labels of the sweep's search axes (`optim.*`) in this run, e.g. `lr0.001-wd0.1`;
    /// empty outside a search.
    cell: String,
    /// The final metric on the test split, and whether it reaches the solved level.
    test: Option<(f64, bool)>,
}

/// What a sweep's `sweep.json` says of one run.
struct SweepLabels {
    model: Option<String>,
    /// The label of an axis over the task's settings (`task`, `task.*`), which tells runs of
    /// one task kind on different data apart.
    task: Option<String>,
    /// The labels of the search axes (`optim.*`), joined.
    cell: String,
    index: u64,
}

fn read_json(path: &Path) -> Result<Value, Error> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not valid JSON: {e}", path.display())))
}

/// Each sweep run's model label, search cell and grid index, from `DIR/sweep.json`.
fn sweep_labels(dir: &Path) -> BTreeMap<String, SweepLabels> {
    let Ok(Value::Array(runs)) = read_json(&dir.join("sweep.json")) else {
        return BTreeMap::new();
    };
    runs.iter()
        .filter_map(|r| {
            let name = r["name"].as_str()?.to_string();
            let index = r["index"].as_u64()?;
            let pairs: Vec<(&str, &str)> = r["labels"]
                .as_array()?
                .iter()
                .filter_map(|pair| Some((pair[0].as_str()?, pair[1].as_str()?)))
                .collect();
            let model = pairs
                .iter()
                .find(|(axis, _)| *axis == "model" || axis.starts_with("model."))
                .map(|(_, label)| label.to_string());
            // An axis over the training regime (`train.length_mixture`, ...) makes models of
            // its own: its label joins the model's, so the report keeps the arms apart.
            let regime: Vec<&str> = pairs
                .iter()
                .filter(|(axis, _)| axis.starts_with("train."))
                .map(|(_, label)| *label)
                .collect();
            let model = match (model, regime.is_empty()) {
                (model, true) => model,
                (Some(model), false) => Some(format!("{model} {}", regime.join(" "))),
                (None, false) => Some(regime.join(" ")),
            };
            let task: Vec<&str> = pairs
                .iter()
                .filter(|(axis, _)| {
                    (*axis == "task" || axis.starts_with("task.")) && *axis != "task.seq_len"
                })
                .map(|(_, label)| *label)
                .collect();
            let cell: Vec<&str> = pairs
                .iter()
                .filter(|(axis, _)| axis.starts_with("optim."))
                .map(|(_, label)| *label)
                .collect();
            Some((
                name,
                SweepLabels {
                    model,
                    task: (!task.is_empty()).then(|| task.join("-")),
                    cell: cell.join("-"),
                    index,
                },
            ))
        })
        .collect()
}

/// A complete run the report could not read, and why.
pub struct Unreadable {
    pub run_dir: PathBuf,
    pub reason: String,
}

/// What [`write`] wrote: the markdown, and the runs it left out.
pub struct Report {
    pub markdown: String,
    pub unreadable: Vec<Unreadable>,
}

impl Report {
    /// The report's markdown, or, when runs were left out, the error that says which (the
    /// report is written either way; the exit status tells a script that it is partial).
    pub fn complete(self) -> Result<String, Error> {
        if self.unreadable.is_empty() {
            return Ok(self.markdown);
        }
        Err(Error::Partial(format!(
            "{} runs could not be read and are left out of the report: {}",
            self.unreadable.len(),
            reasons(&self.unreadable)
        )))
    }
}

/// Why each unreadable run was left out, in one line.
fn reasons(unreadable: &[Unreadable]) -> String {
    unreadable
        .iter()
        .map(|u| u.reason.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Every complete run under `dir` that can be read, and those that cannot.
fn load(dir: &Path) -> Result<(Vec<RunRecord>, Vec<Unreadable>), Error> {
    let labels = sweep_labels(dir);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::Config(format!("{}: cannot read: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| RunDir::is_complete(p))
        .collect();
    if RunDir::is_complete(dir) {
        paths.push(dir.to_path_buf());
    }
    // The sweep's order (models as the sweep file lists them), else by name.
    paths.sort_by_key(|p| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        (labels.get(&name).map_or(u64::MAX, |l| l.index), name)
    });
    let mut records = Vec::new();
    let mut unreadable = Vec::new();
    for path in paths {
        let (summary, run) =
            match Summary::read(&path).and_then(|s| Ok((s, RunHeader::read(&path)?))) {
                Ok(read) => read,
                Err(e) => {
                    unreadable.push(Unreadable {
                        run_dir: path.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
        let task = &run.task;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let seq_len = task.seq_len as u64;
        let lines: Vec<Value> = std::fs::read_to_string(path.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect();
        let points = |keep: &dyn Fn(&Value) -> bool| -> Vec<(f64, f64)> {
            lines
                .iter()
                .filter(|l| keep(l))
                .filter_map(|l| Some((l["step"].as_f64()?, l["metric"].as_f64()?)))
                .collect()
        };
        let curve = points(&|l| l["split"] == "eval" && l["seq_len"].as_u64() == Some(seq_len));
        let train_curve = points(&|l| l["split"] == "train");
        records.push(RunRecord {
            task: match labels.get(&name).and_then(|l| l.task.as_ref()) {
                Some(label) => format!("{}-{label}", task.kind),
                None => task.kind.clone(),
            },
            model: labels
                .get(&name)
                .and_then(|l| l.model.clone())
                .unwrap_or_else(|| summary.model.clone()),
            architecture: summary.model.clone(),
            cell: labels
                .get(&name)
                .map(|l| l.cell.clone())
                .unwrap_or_default(),
            test: summary.test_eval.as_ref().map(|e| (e.metric, e.solved)),
            seq_len,
            higher_is_better: task.metric.higher_is_better(),
            metric_name: metric_label(task.metric),
            baseline: task.baseline_metric,
            solved_at: task.solved_metric,
            params: run.params as u64,
            state_size: run.state_size as u64,
            metric: summary.final_eval.metric,
            solved: summary.final_eval.solved,
            tokens_per_second: summary.train_tokens_per_second,
            peak_rss_mb: summary.peak_rss_mb,
            lengths: summary
                .length_eval
                .iter()
                .map(|e| (e.seq_len as u64, e.metric))
                .collect(),
            curve,
            train_curve,
            diverged: summary
                .diverged
                .as_ref()
                .filter(|_| summary.stopped == StopReason::Diverged)
                .map(|d| (name.clone(), d.step as u64)),
        });
    }
    name_sections(&mut records);
    Ok((records, unreadable))
}

/// A record's task is `KIND-LABEL` where a sweep's task axis labelled it; the label stays
/// only where it tells runs of one kind apart (a `task` axis over different kinds already
/// has a section per kind), so such runs get sections of their own.
fn name_sections(records: &mut [RunRecord]) {
    let kind = |task: &str| task.split('-').next().unwrap_or_default().to_string();
    let tasks: Vec<String> = records.iter().map(|r| r.task.clone()).collect();
    for r in records.iter_mut() {
        let k = kind(&r.task);
        let distinct: std::collections::BTreeSet<&String> =
            tasks.iter().filter(|t| kind(t) == k).collect();
        if distinct.len() < 2 {
            r.task = k;
        }
    }
}

/// A search's choice: for each task, model and length, the runs of the search cell whose mean
/// final metric on the evaluation split is best (the first in sweep order on a tie), their
/// figures replaced by the test split's where the runs have one; and the markdown that says
/// what was searched and chosen. Records outside a search pass through, with no markdown.
fn choose(records: Vec<RunRecord>) -> (Vec<RunRecord>, String) {
    if records.iter().all(|r| r.cell.is_empty()) {
        return (records, String::new());
    }
    // (task, model, T) → cell → validation metrics, in sweep order.
    type Group = (String, String, u64);
    type Cells = Vec<(String, Vec<f64>)>;
    let mut groups: Vec<(Group, Cells)> = Vec::new();
    for r in &records {
        let key = (r.task.clone(), r.model.clone(), r.seq_len);
        let cells = match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, cells)) => cells,
            None => {
                groups.push((key, Vec::new()));
                &mut groups.last_mut().expect("just pushed").1
            }
        };
        match cells.iter_mut().find(|(c, _)| *c == r.cell) {
            Some((_, values)) => values.push(r.metric),
            None => cells.push((r.cell.clone(), vec![r.metric])),
        }
    }
    let higher = |task: &str| {
        records
            .iter()
            .find(|r| r.task == task)
            .is_some_and(|r| r.higher_is_better)
    };
    let mut md = String::from(
        "\n## Search\n\nEach row below is the model's best setting, chosen per task and length by the \
         mean final metric over seeds on the evaluation split; the tables after this one quote \
         that setting on the test split, a second held-out set that neither training nor the \
         choice saw (tasks read from a data file have none: their figures are the evaluation \
         split's, and optimistic). Learning curves and other lengths are the evaluation split's.\n\n\
         | task | model | T | chosen | evaluation-split metric per setting |\n|---|---|---|---|---|\n",
    );
    let mut chosen = Vec::new();
    for ((task, model, t), cells) in &groups {
        let mean = |v: &[f64]| mean_ci(v).0;
        let best = cells
            .iter()
            .reduce(|a, b| {
                let better = if higher(task) {
                    mean(&b.1) > mean(&a.1)
                } else {
                    mean(&b.1) < mean(&a.1)
                };
                if better { b } else { a }
            })
            .expect("a group has a cell");
        let all: Vec<String> = cells
            .iter()
            .map(|(c, v)| format!("{c}: {:.3}", mean(v)))
            .collect();
        md.push_str(&format!(
            "| {task} | {model} | {t} | {} | {} |\n",
            best.0,
            all.join(", ")
        ));
        chosen.push(((task.clone(), model.clone(), *t), best.0.clone()));
    }
    let kept = records
        .into_iter()
        .filter(|r| {
            chosen.iter().any(|((task, model, t), c)| {
                (task, model, t, c) == (&r.task, &r.model, &r.seq_len, &r.cell)
            })
        })
        .map(|mut r| {
            if let Some((metric, solved)) = r.test {
                (r.metric, r.solved) = (metric, solved);
            }
            r
        })
        .collect();
    (kept, md)
}

/// A metric as `run.json` names it (`token_accuracy`, `mse`, `bits_per_char`).
fn metric_label(metric: Metric) -> String {
    serde_json::to_value(metric)
        .ok()
        .and_then(|v| v.as_str().map(String::from))
        .unwrap_or_default()
}

/// Mean and half-width of the 95% confidence interval (Student's t; 0 for one value).
pub fn mean_ci(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    // The exact two-sided 97.5% quantile of Student's t with n − 1 degrees of freedom, at
    // every n: the normal's 1.96 would understate the interval for a few tens of seeds.
    let t = StudentsT::new(0.0, 1.0, (n - 1) as f64)
        .expect("n ≥ 2 gives a valid t distribution")
        .inverse_cdf(0.975);
    (mean, t * (var / n as f64).sqrt())
}

/// A curve through the mean over seeds at each `x`, with the 95% interval over seeds as its
/// band where there are two or more.
fn seeds_curve(label: &str, at: Vec<(f64, Vec<f64>)>) -> Curve {
    let mut curve = Curve::new(label, Vec::new());
    for (x, values) in at {
        let (mean, ci) = mean_ci(&values);
        curve.points.push((x, mean));
        if values.len() > 1 {
            curve.band.push((x, mean - ci, mean + ci));
        }
    }
    curve
}

fn cell(values: &[f64], solved: usize) -> String {
    let (m, ci) = mean_ci(values);
    if values.len() > 1 {
        format!("{m:.3} ± {ci:.3} ({solved}/{})", values.len())
    } else {
        format!("{m:.3} ({solved}/1)")
    }
}

/// Writes `DIR/report.md` and `DIR/plots/` from every complete run under `DIR` that can be
/// read; the report lists the others with the reason, and so does the returned [`Report`].
pub fn write(dir: &Path) -> Result<Report, Error> {
    let (all, unreadable) = load(dir)?;
    let total = all.len();
    let (records, search) = choose(all);
    if records.is_empty() {
        let why = reasons(&unreadable);
        return Err(Error::Config(if why.is_empty() {
            format!("{}: no finished runs (no */summary.json)", dir.display())
        } else {
            format!("{}: no readable finished runs: {why}", dir.display())
        }));
    }
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots)
        .with_context(|| format!("cannot create {}", plots.display()))?;
    let mut md = format!(
        "# Report: {}\n\n{total} runs{}. Cells: final held-out metric, mean ± 95% CI over seeds, and \
         how many seeds reached the task's solved level.\n{search}",
        dir.display(),
        if search.is_empty() {
            String::new()
        } else {
            format!(", {} of them in the chosen settings", records.len())
        }
    );
    let tasks: BTreeSet<&str> = records.iter().map(|r| r.task.as_str()).collect();
    for task in tasks {
        let rs: Vec<&RunRecord> = records.iter().filter(|r| r.task == task).collect();
        let first = rs[0];
        let lengths: BTreeSet<u64> = rs.iter().map(|r| r.seq_len).collect();
        let mut models: Vec<&str> = Vec::new();
        for r in &rs {
            if !models.contains(&r.model.as_str()) {
                models.push(&r.model);
            }
        }
        md.push_str(&format!(
            "\n## {task}\n\nMetric: {} ({}); baseline {:.4}, solved at {:.4}.\n\n",
            first.metric_name,
            if first.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            },
            first.baseline,
            first.solved_at
        ));
        md.push_str("| model | params | state floats |");
        for l in &lengths {
            md.push_str(&format!(" T = {l} |"));
        }
        md.push_str(" train tokens/s | peak RSS MB |\n|---|---|---|");
        md.push_str(&"---|".repeat(lengths.len() + 2));
        md.push('\n');
        let mut by_length = Vec::new();
        for model in &models {
            let mine: Vec<&&RunRecord> = rs.iter().filter(|r| r.model == *model).collect();
            let longest = mine.iter().map(|r| r.seq_len).max().unwrap_or(0);
            let state = mine
                .iter()
                .find(|r| r.seq_len == longest)
                .map_or(0, |r| r.state_size);
            md.push_str(&format!(
                "| {model} | {} | {state} (T = {longest}) |",
                mine[0].params
            ));
            let mut points = Vec::new();
            for l in &lengths {
                let at: Vec<&&&RunRecord> = mine.iter().filter(|r| r.seq_len == *l).collect();
                if at.is_empty() {
                    md.push_str(" – |");
                    continue;
                }
                let values: Vec<f64> = at.iter().map(|r| r.metric).collect();
                let solved = at.iter().filter(|r| r.solved).count();
                md.push_str(&format!(" {} |", cell(&values, solved)));
                points.push((*l as f64, values));
            }
            let tps: Vec<f64> = mine.iter().map(|r| r.tokens_per_second).collect();
            let rss: Vec<f64> = mine.iter().filter_map(|r| r.peak_rss_mb).collect();
            md.push_str(&format!(
                " {:.0} | {} |\n",
                mean_ci(&tps).0,
                if rss.is_empty() {
                    "–".into()
                } else {
                    format!("{:.0}", rss.iter().copied().fold(0.0, f64::max))
                }
            ));
            by_length.push(seeds_curve(model, points));
        }
        let references = vec![
            Reference {
                label: "baseline".into(),
                y: first.baseline,
            },
            Reference {
                label: "solved".into(),
                y: first.solved_at,
            },
        ];
        // A length axis (ticks at the lengths themselves) when the lengths span 4× or more, or
        // when there is only one, which a linear axis would label 63.5, 64, 64.5.
        let log_x = lengths.len() == 1
            || *lengths.iter().last().unwrap() as f64 / *lengths.iter().next().unwrap() as f64
                >= 4.0;
        let stem = |what: &str| plots.join(format!("{task}-{what}"));
        Figure {
            title: format!("{task}: final {} by training length", first.metric_name),
            x_label: "sequence length T".into(),
            y_label: first.metric_name.clone(),
            log_x,
            log_y: false,
            curves: by_length,
            references: references.clone(),
        }
        .save(&stem("by-length"))?;
        // The final metric at the longest trained length, each model's mean and interval.
        let longest_trained = *lengths.iter().last().unwrap();
        DotChart {
            title: format!(
                "{task}: final {} at T = {longest_trained}, mean and 95% interval over seeds",
                first.metric_name
            ),
            x_label: first.metric_name.clone(),
            dots: models
                .iter()
                .filter_map(|model| {
                    let values: Vec<f64> = rs
                        .iter()
                        .filter(|r| r.model == *model && r.seq_len == longest_trained)
                        .map(|r| r.metric)
                        .collect();
                    (!values.is_empty()).then(|| {
                        let (mean, ci) = mean_ci(&values);
                        Dot {
                            label: model.to_string(),
                            mean,
                            low: mean - ci,
                            high: mean + ci,
                        }
                    })
                })
                .collect(),
            references: references.clone(),
        }
        .save(&stem("final"))?;
        let diverged: Vec<String> = rs
            .iter()
            .filter_map(|r| r.diverged.as_ref())
            .map(|(name, step)| format!("{name} (step {step})"))
            .collect();
        if !diverged.is_empty() {
            md.push_str(&format!(
                "\nDiverged, counted with the figures of their last good checkpoint: {}.\n",
                diverged.join(", ")
            ));
        }
        md.push_str(&format!(
            "\n![{task} by length](plots/{task}-by-length.png)\n\
             ![{task} final metric](plots/{task}-final.png)\n"
        ));

        // Learning curves at the longest length, mean over seeds at each evaluated step.
        let longest = *lengths.iter().last().unwrap();
        // The mean over seeds at each logged step, one curve per model.
        let mean_curves = |of: fn(&RunRecord) -> &[(f64, f64)]| -> Vec<Curve> {
            models
                .iter()
                .map(|model| {
                    let mut steps: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
                    for r in rs
                        .iter()
                        .filter(|r| r.model == *model && r.seq_len == longest)
                    {
                        for &(s, m) in of(r) {
                            steps.entry(s as u64).or_default().push(m);
                        }
                    }
                    seeds_curve(
                        model,
                        steps.into_iter().map(|(s, v)| (s as f64, v)).collect(),
                    )
                })
                .collect()
        };
        for (what, title, of) in [
            (
                "learning",
                "held-out",
                (|r: &RunRecord| r.curve.as_slice()) as fn(&RunRecord) -> &[(f64, f64)],
            ),
            ("training", "training-batch", |r: &RunRecord| {
                r.train_curve.as_slice()
            }),
        ] {
            Figure {
                title: format!(
                    "{task}: {title} {} during training, T = {longest}",
                    first.metric_name
                ),
                x_label: "step".into(),
                y_label: first.metric_name.clone(),
                log_x: false,
                log_y: false,
                curves: mean_curves(of),
                references: references.clone(),
            }
            .save(&stem(what))?;
            md.push_str(&format!(
                "![{task} {title} curves](plots/{task}-{what}.png)\n"
            ));
        }

        // Length generalisation: runs trained at the shortest length, evaluated longer.
        let shortest = *lengths.iter().next().unwrap();
        let trained: Vec<&&RunRecord> = rs
            .iter()
            .filter(|r| r.seq_len == shortest && !r.lengths.is_empty())
            .collect();
        if !trained.is_empty() {
            let eval_lengths: BTreeSet<u64> = trained
                .iter()
                .flat_map(|r| r.lengths.iter().map(|p| p.0))
                .collect();
            md.push_str(&format!(
                "\nLength generalisation (trained at T = {shortest}, evaluated at longer T):\n\n| model | T = {shortest} |"
            ));
            for l in &eval_lengths {
                md.push_str(&format!(" T = {l} |"));
            }
            md.push_str("\n|---|---|");
            md.push_str(&"---|".repeat(eval_lengths.len()));
            md.push('\n');
            let mut curves = Vec::new();
            let mut grid: Vec<(String, Vec<Option<f64>>)> = Vec::new();
            for model in &models {
                let mine: Vec<&&&RunRecord> =
                    trained.iter().filter(|r| r.model == *model).collect();
                if mine.is_empty() {
                    continue;
                }
                let own: Vec<f64> = mine.iter().map(|r| r.metric).collect();
                md.push_str(&format!("| {model} | {:.3} |", mean_ci(&own).0));
                let mut row = vec![Some(mean_ci(&own).0)];
                let mut points = vec![(shortest as f64, own)];
                for l in &eval_lengths {
                    let v: Vec<f64> = mine
                        .iter()
                        .filter_map(|r| r.lengths.iter().find(|p| p.0 == *l).map(|p| p.1))
                        .collect();
                    if v.is_empty() {
                        md.push_str(" – |");
                        row.push(None);
                    } else {
                        md.push_str(&format!(" {:.3} |", mean_ci(&v).0));
                        row.push(Some(mean_ci(&v).0));
                        points.push((*l as f64, v));
                    }
                }
                md.push('\n');
                curves.push(seeds_curve(model, points));
                grid.push(((*model).to_string(), row));
            }
            Figure {
                title: format!("{task}: trained at T = {shortest}, evaluated longer"),
                x_label: "evaluation length".into(),
                y_label: first.metric_name.clone(),
                log_x: true,
                log_y: false,
                curves,
                references: references.clone(),
            }
            .save(&stem("length-generalisation"))?;
            // The heatmap's columns in increasing length (the table's first is the trained one,
            // which a mixture's evaluations can fall below): (length, index in a row).
            let mut column_order: Vec<(u64, usize)> = std::iter::once(shortest)
                .chain(eval_lengths.iter().copied())
                .enumerate()
                .map(|(i, l)| (l, i))
                .collect();
            column_order.sort();
            Heatmap {
                title: format!(
                    "{task}: mean {} by model and evaluation length (trained at T = {shortest})",
                    first.metric_name
                ),
                x_label: "evaluation length T".into(),
                columns: column_order.iter().map(|(l, _)| l.to_string()).collect(),
                rows: grid.iter().map(|(m, _)| m.clone()).collect(),
                values: grid
                    .into_iter()
                    .map(|(_, row)| column_order.iter().map(|&(_, i)| row[i]).collect())
                    .collect(),
                low: first.baseline,
                high: first.solved_at,
            }
            .save(&stem("length-heatmap"))?;
            md.push_str(&format!(
                "\n![{task} length generalisation](plots/{task}-length-generalisation.png)\n\
                 ![{task} length generalisation heatmap](plots/{task}-length-heatmap.png)\n"
            ));
        }
        md.push_str(&iso_state(&rs, longest, &references, &stem("state"))?);
    }
    if !unreadable.is_empty() {
        md.push_str(&format!(
            "\n## Left out: {} runs that could not be read\n\n",
            unreadable.len()
        ));
        for u in &unreadable {
            md.push_str(&format!("- `{}`: {}\n", u.run_dir.display(), u.reason));
        }
    }
    crate::run_dir::write_atomic(&dir.join("report.md"), md.as_bytes())?;
    Ok(Report {
        markdown: md,
        unreadable,
    })
}

/// The iso-state view (Zoology, fig. 2): the final metric against the floats of state each model
/// carries at the longest trained length, one curve per mixer kind, so that architectures are
/// compared at equal memory rather than equal width. Empty unless some kind was trained at two or
/// more state sizes (a width sweep); attention's state is its KV cache at that length.
fn iso_state(
    rs: &[&RunRecord],
    longest: u64,
    references: &[Reference],
    stem: &Path,
) -> Result<String, Error> {
    let at: Vec<&RunRecord> = rs
        .iter()
        .copied()
        .filter(|r| r.seq_len == longest)
        .collect();
    // Mixer kind → state floats → (metric, solved) per seed, kinds in sweep order.
    type BySize = BTreeMap<u64, Vec<(f64, bool)>>;
    let mut kinds: Vec<(&str, BySize)> = Vec::new();
    for r in &at {
        let i = match kinds.iter().position(|(k, _)| *k == r.architecture) {
            Some(i) => i,
            None => {
                kinds.push((&r.architecture, BTreeMap::new()));
                kinds.len() - 1
            }
        };
        kinds[i]
            .1
            .entry(r.state_size)
            .or_default()
            .push((r.metric, r.solved));
    }
    if kinds.iter().all(|(_, sizes)| sizes.len() < 2) {
        return Ok(String::new());
    }
    let (task, metric) = (&at[0].task, &at[0].metric_name);
    let mut md = format!(
        "\nIso-state view (T = {longest}): final {metric} against the floats of recurrent state \
         (attention: its KV cache), one row per mixer kind and state size.\n\n\
         | mixer | state floats | {metric} |\n|---|---|---|\n"
    );
    let mut curves = Vec::new();
    for (kind, sizes) in &kinds {
        let mut points = Vec::new();
        for (state, runs) in sizes {
            let values: Vec<f64> = runs.iter().map(|r| r.0).collect();
            let solved = runs.iter().filter(|r| r.1).count();
            md.push_str(&format!(
                "| {kind} | {state} | {} |\n",
                cell(&values, solved)
            ));
            points.push((*state as f64, values));
        }
        curves.push(seeds_curve(kind, points));
    }
    Figure {
        title: format!("{task}: final {metric} against state size, T = {longest}"),
        x_label: "state floats".into(),
        y_label: metric.clone(),
        log_x: true,
        log_y: false,
        curves,
        references: references.to_vec(),
    }
    .save(stem)?;
    md.push_str(&format!(
        "\n![{task} by state size](plots/{task}-state.png)\n"
    ));
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(model: &str, cell: &str, metric: f64, test: f64) -> RunRecord {
        RunRecord {
            task: "parity".into(),
            model: model.into(),
            architecture: model.into(),
            seq_len: 64,
            metric_name: "token_accuracy".into(),
            baseline: 0.5,
            solved_at: 0.99,
            higher_is_better: true,
            params: 1,
            state_size: 1,
            metric,
            solved: metric >= 0.99,
            tokens_per_second: 1.0,
            peak_rss_mb: None,
            lengths: Vec::new(),
            curve: Vec::new(),
            train_curve: Vec::new(),
            diverged: None,
            cell: cell.into(),
            test: Some((test, test >= 0.99)),
        }
    }

    /// Per model, the cell with the best mean evaluation-split metric over seeds is kept (not
    /// the best single run), and its figures become the test split's.
    #[test]
    fn a_search_keeps_each_models_best_setting_and_quotes_its_test_figures() {
        let records = vec![
            record("lstm", "lr0.01", 0.9, 0.80),
            record("lstm", "lr0.01", 0.5, 0.40),
            record("lstm", "lr0.001", 0.7, 0.65),
            record("lstm", "lr0.001", 0.8, 0.75),
            record("mamba", "lr0.01", 1.0, 0.99),
            record("mamba", "lr0.001", 0.6, 0.60),
        ];
        let (kept, md) = choose(records);
        let kept: Vec<(&str, &str, f64, bool)> = kept
            .iter()
            .map(|r| (r.model.as_str(), r.cell.as_str(), r.metric, r.solved))
            .collect();
        assert_eq!(
            kept,
            [
                ("lstm", "lr0.001", 0.65, false),
                ("lstm", "lr0.001", 0.75, false),
                ("mamba", "lr0.01", 0.99, true),
            ]
        );
        assert!(md.contains("| parity | lstm | 64 | lr0.001 | lr0.01: 0.700, lr0.001: 0.750 |"));
        // Outside a search nothing is chosen or replaced.
        let (kept, md) = choose(vec![record("lstm", "", 0.9, 0.1)]);
        assert_eq!((kept[0].metric, md.as_str()), (0.9, ""));
    }

    /// A width sweep becomes one row per mixer kind and state size, seeds pooled; without one
    /// (every kind at a single state size) there is no iso-state view.
    #[test]
    fn the_iso_state_view_pools_seeds_per_kind_and_state_size() {
        let at = |model: &str, state: u64, metric: f64| RunRecord {
            state_size: state,
            ..record(model, "", metric, metric)
        };
        let dir = std::env::temp_dir().join(format!("estafet-iso-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stem = dir.join("parity-state");
        let refs = [Reference {
            label: "baseline".into(),
            y: 0.5,
        }];
        let widths = [
            at("mamba", 100, 0.6),
            at("mamba", 100, 0.8),
            at("mamba", 400, 1.0),
            at("lstm", 50, 0.5),
        ];
        let md = iso_state(&widths.iter().collect::<Vec<_>>(), 64, &refs, &stem).unwrap();
        assert!(md.contains("| mamba | 100 | 0.700 ± 1.271 (0/2) |"), "{md}");
        assert!(md.contains("| mamba | 400 | 1.000 (1/1) |"), "{md}");
        assert!(md.contains("| lstm | 50 | 0.500 (0/1) |"), "{md}");
        assert!(stem.with_extension("png").exists());
        let single = [at("mamba", 100, 0.6), at("lstm", 50, 0.5)];
        let md = iso_state(&single.iter().collect::<Vec<_>>(), 64, &refs, &stem).unwrap();
        assert_eq!(md, "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A sweep's model label is its model axis's, joined by any training-regime axis's, so
    /// that the arms of a `train.length_mixture` axis are reported as models of their own.
    #[test]
    fn a_training_regime_axis_names_its_own_models() {
        let dir = std::env::temp_dir().join(format!("estafet-labels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = serde_json::json!([
            { "name": "a", "index": 0, "labels": [["model", "gdn"], ["train.length_mixture", "mix"], ["run.seed", "seed0"]] },
            { "name": "b", "index": 1, "labels": [["model", "gdn"], ["run.seed", "seed0"]] },
            { "name": "c", "index": 2, "labels": [["train.length_mixture", "fixed"]] },
        ]);
        std::fs::write(dir.join("sweep.json"), runs.to_string()).unwrap();
        let labels = sweep_labels(&dir);
        assert_eq!(labels["a"].model.as_deref(), Some("gdn mix"));
        assert_eq!(labels["b"].model.as_deref(), Some("gdn"));
        assert_eq!(labels["c"].model.as_deref(), Some("fixed"));
        std::fs::remove_dir_all(dir).ok();
    }

    /// A task axis's label names a section of its own only where runs of one task kind differ
    /// in it (two corpora of `char_lm`); over different kinds, or with one label, the kind.
    #[test]
    fn a_task_axis_separates_runs_of_one_kind() {
        let dir = std::env::temp_dir().join(format!("estafet-tasks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let runs = serde_json::json!([
            { "name": "a", "index": 0, "labels": [["model", "lstm"], ["task", "relay"], ["run.seed", "seed0"]] },
            { "name": "b", "index": 1, "labels": [["model", "lstm"], ["task.seq_len", "64"]] },
        ]);
        std::fs::write(dir.join("sweep.json"), runs.to_string()).unwrap();
        let labels = sweep_labels(&dir);
        assert_eq!(labels["a"].task.as_deref(), Some("relay"));
        assert_eq!(labels["b"].task, None);
        std::fs::remove_dir_all(dir).ok();

        let with = |task: &str| RunRecord {
            task: task.into(),
            ..record("lstm", "", 1.0, 1.0)
        };
        let mut records = vec![
            with("char_lm-relay"),
            with("char_lm-vim"),
            with("mqar-wide"),
            with("parity"),
        ];
        name_sections(&mut records);
        let tasks: Vec<&str> = records.iter().map(|r| r.task.as_str()).collect();
        assert_eq!(tasks, ["char_lm-relay", "char_lm-vim", "mqar", "parity"]);
    }

    #[test]
    fn confidence_interval_uses_students_t() {
        let (m, ci) = mean_ci(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        // s = 1, n = 3: 4.303 / √3
        assert!((ci - 4.302653 / 3f64.sqrt()).abs() < 1e-6);
        assert_eq!(mean_ci(&[5.0]), (5.0, 0.0));
        // Beyond the old table's 9 degrees of freedom: t(0.975) for 10, 20 and 29 (tables).
        for (df, t) in [(10, 2.228139), (20, 2.085963), (29, 2.045230)] {
            let values: Vec<f64> = (0..=df)
                .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect();
            let (m, ci) = mean_ci(&values);
            let n = values.len() as f64;
            let s = (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
            assert!(
                (ci / (s / n.sqrt()) - t).abs() < 1e-5,
                "df {df}: {}",
                ci / (s / n.sqrt())
            );
        }
    }
}
