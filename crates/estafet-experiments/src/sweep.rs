//! `estafet sweep`: a base config and axes, run as a grid of ordinary runs.
//!
//! ```toml
//! base = "../../configs/copy-lstm.toml"   # relative to this file
//! length_factors = [2, 4]                 # evaluate each run at 2L and 4L too (optional)
//! [set]                                   # overrides for every run (optional)
//! "train.steps" = 500
//! [axes]                                  # the grid: every combination, in this order
//! model = [                               # a table value replaces the field whole;
//!   { label = "lstm", mixer = { kind = "lstm" }, d_model = 64 },      # `label` names it
//!   { label = "mamba", mixer = { kind = "mamba" }, d_model = 32, layout = "residual" },
//! ]
//! length = [64, 256]                      # the task's length (any task: TaskConfig::with_seq_len)
//! "run.seed" = [0, 1, 2]
//! "optim.lr" = [1e-3, 3e-3]               # axes under optim. are a search: the report keeps
//! ```                                     # each model's best on the evaluation split
//!
//! Run `i` of the grid lives in `OUT/NAME` (the labels of its axis values). A run that is
//! complete with this very config is skipped, one with a checkpoint resumes (and is extended,
//! if the sweep now gives it more steps or time), so a sweep that was stopped continues where
//! it was. `--shard I/N` takes runs `i ≡ I (mod N)`, so that N machines (a Slurm array) can
//! share one directory; `--jobs J` runs J at a time here. Each run is a child `estafet run
//! --resume` of its resolved config, so its peak memory is its own.
//!
//! SIGINT or SIGTERM stops the sweep cleanly: no new run starts, each running one is sent
//! SIGTERM (so it checkpoints after its current step) and waited for, and the sweep exits with
//! the signal's status; running the same command again continues. The runs sit in their own
//! process group, so a Ctrl-C in the terminal reaches them only through the sweep, once. A run
//! that diverges (exit status 3) has written its summary: it counts as done.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::config::{self, ConfigSource, ExperimentConfig};
use crate::{Backend, Error};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    base: Option<PathBuf>,
    #[serde(rename = "base_config")]
    inline_base: Option<toml::Table>,
    #[serde(default)]
    length_factors: Vec<usize>,
    #[serde(default)]
    set: toml::Table,
    axes: toml::Table,
}

/// One run of the grid.
#[derive(Clone, Debug, Serialize)]
pub struct SweepRun {
    pub index: usize,
    pub name: String,
    /// Axis → label of its value in this run.
    pub labels: Vec<(String, String)>,
    #[serde(skip)]
    pub config: ExperimentConfig,
}

/// The grid of the sweep file `path`, every config resolved and validated before anything runs.
pub fn expand(path: &Path) -> Result<Vec<SweepRun>, Error> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("{name}: cannot read sweep: {e}")))?;
    expand_text(&name, &text, path.parent().unwrap_or(Path::new(".")))
}

/// The embedded quickstart: every architecture on one long-context task, small enough to run
/// in a few minutes (`estafet run` with no config).
pub const QUICKSTART: (&str, &str) = (
    "quickstart",
    include_str!("../../../experiments/quickstart/sweep.toml"),
);

/// The grid of sweep text `text` (named `name` in errors; `base` relative to `dir`).
pub fn expand_text(name: &str, text: &str, dir: &Path) -> Result<Vec<SweepRun>, Error> {
    let sweep: SweepFile = toml::from_str(text)
        .map_err(|e| Error::Config(format!("{name}: {}", e.message().trim())))?;
    let mut axes: Vec<(String, Vec<toml::Value>)> = Vec::new();
    for (key, values) in &sweep.axes {
        let values = values.as_array().filter(|a| !a.is_empty()).ok_or_else(|| {
            Error::Config(format!("{name}: axes.{key}: expected a non-empty array"))
        })?;
        axes.push((key.clone(), values.clone()));
    }
    let base = match (&sweep.base, &sweep.inline_base) {
        (Some(file), None) => {
            let file = dir.join(file);
            ConfigSource::read(&file)?
        }
        (None, Some(table)) => ConfigSource {
            name: format!("{name} [base_config]"),
            text: toml::to_string(table).expect("a table serialises"),
        },
        _ => {
            return Err(Error::Config(format!(
                "{name}: give exactly one of `base = \"FILE\"` or a `[base_config]` table"
            )));
        }
    };
    let set: Vec<String> = sweep.set.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let total: usize = axes.iter().map(|(_, v)| v.len()).product();
    let mut runs = Vec::with_capacity(total);
    for index in 0..total {
        let mut rest = index;
        let mut overrides = set.clone();
        let mut labels = Vec::new();
        let mut length = None;
        // The last axis varies fastest.
        let mut picks = vec![0; axes.len()];
        for (i, (_, values)) in axes.iter().enumerate().rev() {
            picks[i] = rest % values.len();
            rest /= values.len();
        }
        for ((key, values), &pick) in axes.iter().zip(&picks) {
            let mut value = values[pick].clone();
            let label = label_of(key, &mut value, pick);
            labels.push((key.clone(), label));
            if key == "length" {
                length = Some(value.as_integer().filter(|&l| l > 0).ok_or_else(|| {
                    Error::Config(format!(
                        "{name}: axes.length: {value} is not a positive integer"
                    ))
                })? as usize);
            } else {
                overrides.push(format!("{key}={value}"));
            }
        }
        let mut config = config::load(&base, &overrides)
            .map_err(|e| Error::Config(format!("{name}: run {index}: {e}")))?;
        if let Some(length) = length {
            config.task = config
                .task
                .with_seq_len(length)
                .map_err(|e| Error::Config(format!("{name}: axes.length {length}: {e}")))?;
        }
        if !sweep.length_factors.is_empty() {
            let own = config
                .task
                .build()
                .map_err(|e| Error::Config(format!("{name}: run {index}: {e}")))?
                .info()
                .seq_len;
            config.eval.lengths = sweep.length_factors.iter().map(|f| f * own).collect();
        }
        config
            .validate()
            .map_err(|e| Error::Config(format!("{name}: run {index}: {e}")))?;
        let run_name = labels
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("-");
        runs.push(SweepRun {
            index,
            name: run_name,
            labels,
            config,
        });
    }
    Ok(runs)
}

/// A short label for an axis value: its `label` key (removed), else a table's `kind` or
/// `mixer.kind`, else `key=value` for scalars.
fn label_of(key: &str, value: &mut toml::Value, pick: usize) -> String {
    if let Some(table) = value.as_table_mut() {
        if let Some(toml::Value::String(l)) = table.remove("label") {
            return l;
        }
        let kind = table
            .get("kind")
            .or_else(|| table.get("mixer").and_then(|m| m.get("kind")))
            .and_then(|k| k.as_str());
        return kind.map_or_else(|| format!("{key}{pick}"), str::to_string);
    }
    let short = key.rsplit('.').next().unwrap_or(key);
    let shown = match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!("{short}{shown}")
}

/// Where a sweep stands.
pub struct Progress {
    pub ran: usize,
    pub skipped: usize,
    pub failed: Vec<String>,
    /// Runs another process was writing (another sweep or shard, a requeued job): left to it.
    pub held: Vec<String>,
    /// Runs that diverged (their summaries say so).
    pub diverged: Vec<String>,
    /// The signal that stopped the sweep, if one did; the runs it stopped resume next time.
    pub interrupted: Option<crate::interrupt::Signal>,
}

/// Runs the shard's part of the grid in `out`, `jobs` at a time.
pub fn run(
    runs: &[SweepRun],
    out: &Path,
    shard: (usize, usize),
    jobs: usize,
    backend: Backend,
) -> Result<Progress, Error> {
    std::fs::create_dir_all(out.join(".configs"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    crate::run_dir::write_atomic(
        &out.join("sweep.json"),
        serde_json::to_string_pretty(runs)
            .expect("runs serialise")
            .as_bytes(),
    )?;
    let exe = std::env::current_exe().context("cannot find the estafet executable")?;
    let mut queue: VecDeque<&SweepRun> = VecDeque::new();
    let mut skipped = 0;
    for r in runs.iter().filter(|r| r.index % shard.1 == shard.0) {
        if crate::train::is_complete_as(&out.join(&r.name), &r.config)? {
            skipped += 1;
        } else {
            queue.push_back(r);
        }
    }
    let mine = queue.len() + skipped;
    eprintln!(
        "sweep: {} runs in the grid, {mine} in shard {}/{}, {skipped} already complete; {jobs} at a time",
        runs.len(),
        shard.0,
        shard.1
    );
    let mut running: Vec<(Child, &SweepRun)> = Vec::new();
    let mut progress = Progress {
        ran: 0,
        skipped,
        failed: Vec::new(),
        held: Vec::new(),
        diverged: Vec::new(),
        interrupted: None,
    };
    while !queue.is_empty() || !running.is_empty() {
        if progress.interrupted.is_none()
            && let Some(signal) = crate::interrupt::requested()
        {
            eprintln!(
                "sweep: {}: stopping {} running runs after their current step; {} not started",
                signal.name(),
                running.len(),
                queue.len()
            );
            progress.interrupted = Some(signal);
            queue.clear();
            for (child, _) in &running {
                crate::interrupt::terminate(child.id());
            }
        }
        while running.len() < jobs {
            let Some(r) = queue.pop_front() else { break };
            if let Some(pid) = crate::run_dir::RunDir::holder(&out.join(&r.name)) {
                eprintln!("{}: in use by another process (pid {pid}); skipped", r.name);
                progress.held.push(r.name.clone());
                continue;
            }
            let config_path = out.join(".configs").join(format!("{}.toml", r.name));
            crate::run_dir::write_atomic(&config_path, r.config.to_toml().as_bytes())?;
            let run_dir = out.join(&r.name);
            // Appended, not truncated: a process that took the run between the check above
            // and this start may be writing the same log.
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(out.join(".configs").join(format!("{}.log", r.name)))
                .context("cannot create a run log")?;
            let mut command = Command::new(&exe);
            #[cfg(unix)]
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            let child = command
                .args([
                    "run",
                    "--quiet",
                    "--resume",
                    "--backend",
                    backend.name(),
                    "--out",
                ])
                .arg(&run_dir)
                .arg(&config_path)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .context("cannot start a run")?;
            running.push((child, r));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut i = 0;
        while i < running.len() {
            if let Some(status) = running[i].0.try_wait().context("cannot wait for a run")? {
                let (_, r) = running.remove(i);
                progress.ran += 1;
                let done = progress.ran + progress.skipped;
                let log = || {
                    let log = out.join(".configs").join(format!("{}.log", r.name));
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    text.lines().last().unwrap_or("").to_string()
                };
                if status.success() {
                    eprintln!("[{done}/{mine}] {}: done", r.name);
                } else if status.code() == Some(Error::BUSY_EXIT) {
                    progress.ran -= 1;
                    eprintln!(
                        "{}: {}; skipped",
                        r.name,
                        log().trim_start_matches("error: ")
                    );
                    progress.held.push(r.name.clone());
                } else if status.code() == Some(Error::DIVERGED_EXIT) {
                    eprintln!("[{done}/{mine}] {}: diverged: {}", r.name, log());
                    progress.diverged.push(r.name.clone());
                } else if progress.interrupted.is_some() {
                    progress.ran -= 1;
                    eprintln!(
                        "{}: stopped after a checkpoint; it resumes next time",
                        r.name
                    );
                } else {
                    eprintln!("[{done}/{mine}] {}: FAILED: {}", r.name, log());
                    progress.failed.push(r.name.clone());
                }
            } else {
                i += 1;
            }
        }
    }
    Ok(progress)
}

/// What became of a sweep's runs, as the command reports it: an error if a signal stopped it
/// (with the command that continues) or a run failed; otherwise whether every run of the grid
/// is complete (other shards may still be running).
pub fn conclude(progress: &Progress, runs: &[SweepRun], out: &Path) -> Result<bool, Error> {
    if let Some(signal) = progress.interrupted {
        return Err(Error::Interrupted {
            signal,
            message: format!(
                "{}: the runs under way stopped after a checkpoint; continue with: {}",
                signal.name(),
                crate::interrupt::continue_command(out, false)
            ),
        });
    }
    if !progress.failed.is_empty() {
        return Err(Error::Runtime(anyhow::anyhow!(
            "{} runs failed (logs in {}/.configs/): {}",
            progress.failed.len(),
            out.display(),
            progress.failed.join(", ")
        )));
    }
    Ok(runs
        .iter()
        .all(|r| crate::run_dir::RunDir::is_complete(&out.join(&r.name))))
}

/// `estafet run` with no config: the embedded comparison of every architecture
/// ([`QUICKSTART`]), two runs at a time, into `out`; returns the report and a closing
/// paragraph that says what it shows.
pub fn quickstart(backend: Backend, out: &Path) -> Result<String, Error> {
    let (name, text) = QUICKSTART;
    let runs = expand_text(&format!("embedded:{name}"), text, Path::new("."))?;
    eprintln!(
        "quickstart: {} architectures on running parity, trained at T 64, evaluated at T 256 → {}",
        runs.len(),
        out.display()
    );
    let progress = run(&runs, out, (0, 1), 2, backend)?;
    conclude(&progress, &runs, out)?;
    let report = crate::report::write(out)?.complete()?;
    Ok(format!("{report}\n{}\n", verdict(&runs, out)?))
}

/// What the quickstart's runs show, in one sentence read from their summaries (each model at
/// the longest length it was evaluated at: solved, within a tenth of the way from chance to
/// solved, or in between), then the published finding it reproduces.
fn verdict(runs: &[SweepRun], out: &Path) -> Result<String, Error> {
    let (mut solved, mut chance, mut between) = (Vec::new(), Vec::new(), Vec::new());
    let mut at = None;
    for r in runs {
        let summary = crate::results::Summary::read(&out.join(&r.name))?;
        let eval = summary
            .length_eval
            .last()
            .unwrap_or(&summary.final_eval)
            .clone();
        let label = r.labels.first().map_or(&summary.model, |l| &l.1).clone();
        let span = eval.solved_metric - eval.baseline_metric;
        if eval.solved {
            solved.push(label);
        } else if (eval.metric - eval.baseline_metric) / span < 0.1 {
            chance.push(format!("{label} ({:.2})", eval.metric));
        } else {
            between.push(format!("{label} ({:.2})", eval.metric));
        }
        at = Some((eval, summary.final_eval.seq_len));
    }
    let Some((eval, trained)) = at else {
        return Ok(String::new());
    };
    let mut parts = Vec::new();
    if !solved.is_empty() {
        parts.push(format!(
            "{} solve it (≥ {:.2})",
            join(&solved),
            eval.solved_metric
        ));
    }
    if !chance.is_empty() {
        parts.push(format!(
            "{} stay at chance ({:.2})",
            join(&chance),
            eval.baseline_metric
        ));
    }
    if !between.is_empty() {
        parts.push(format!("{} lie in between", join(&between)));
    }
    Ok(format!(
        "At T = {} ({}× the training length), {}. The published finding (Grazzi et al. 2024, \
         Table 3; Merrill et al. 2024): a recurrence non-linear in its state tracks parity; a \
         linear one with transitions in [0, 1] (Mamba, Mamba-2, minGRU, minLSTM, RWKV, mLSTM, Gated \
         DeltaNet) cannot flip its state, nor can attention beyond the lengths it saw; Mamba and \
         Gated DeltaNet with eigenvalues in [−1, 1] can. The full study, with seeds and the \
         paper's figures: experiments/parity/README.md.",
        eval.seq_len,
        eval.seq_len / trained.max(1),
        parts.join("; ")
    ))
}

/// `a`, `a and b`, `a, b and c`.
fn join(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quickstart_compares_every_architecture() {
        let runs = expand_text("quickstart", QUICKSTART.1, Path::new(".")).unwrap();
        let mut kinds: Vec<String> = runs.iter().map(|r| r.config.model.label()).collect();
        kinds.dedup();
        // Parallel heads are a way to combine the architectures, not one of them.
        let architectures: Vec<&str> = (estafet_models::MixerConfig::KINDS.iter())
            .filter(|k| **k != "parallel")
            .copied()
            .collect();
        assert_eq!(kinds, architectures);
        assert!(runs.iter().all(|r| r.config.eval.lengths == [256]));
    }

    #[test]
    fn axes_vary_the_last_fastest_and_name_runs_by_label() {
        let text = r#"
            [base_config.model]
            d_model = 8
            [base_config.model.mixer]
            kind = "gru"
            [base_config.task]
            kind = "parity"
            [base_config.train]
            steps = 1
            [axes]
            "optim.lr" = [0.1, 0.01]
            length = [16, 32]
        "#;
        let runs = expand_text("t", text, Path::new(".")).unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "lr0.1-length16",
                "lr0.1-length32",
                "lr0.01-length16",
                "lr0.01-length32"
            ]
        );
        assert_eq!(runs[3].config.optim.lr, 0.01);
        assert_eq!(runs[3].config.task.build().unwrap().info().seq_len, 32);
        let bad = expand_text("t", &text.replace("0.01]", "-1.0]"), Path::new(".")).unwrap_err();
        assert!(
            bad.to_string().contains("optim.lr must be positive"),
            "{bad}"
        );
    }

    /// A model axis may set a hybrid's pattern in place of the base's mixer: the value replaces
    /// the whole model table.
    #[test]
    fn a_model_axis_holds_hybrids() {
        let text = r#"
            [base_config.model]
            d_model = 8
            n_layers = 2
            [base_config.model.mixer]
            kind = "gated_deltanet"
            [base_config.task]
            kind = "parity"
            [base_config.train]
            steps = 1
            [axes]
            model = [
              { label = "gdn", mixer = { kind = "gated_deltanet" }, d_model = 8, n_layers = 4 },
              { label = "3:1", pattern = [{ kind = "gated_deltanet" }, { kind = "gated_deltanet" },
                { kind = "gated_deltanet" }, { kind = "attention", n_heads = 2 }], d_model = 8,
                n_layers = 4 },
            ]
        "#;
        let runs = expand_text("t", text, Path::new(".")).unwrap();
        let labels: Vec<String> = runs.iter().map(|r| r.config.model.label()).collect();
        assert_eq!(labels, ["gated_deltanet", "gated_deltanet*3+attention"]);
        assert_eq!(runs[1].name, "3:1");
    }
}
