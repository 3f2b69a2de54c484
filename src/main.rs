//! `estafet`: the command line. A thin layer over `estafet-experiments`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use estafet_experiments::bench::{self, BenchLine, BenchOptions};
use estafet_experiments::config::{self, ConfigSource};
use estafet_experiments::infer::{self, Sampling};
use estafet_experiments::run_dir::{self, RunDir};
use estafet_experiments::saved::SavedRun;
use estafet_experiments::train::{self, RunOptions};
use estafet_experiments::{Backend, Error, catalog, evaluate, export, interrupt};
use estafet_experiments::{gradflow, memory, report, sweep};
use estafet_models::Layout;

const CODE_VERSION: &str = env!("ESTAFET_CODE_VERSION");

#[derive(Parser)]
#[command(
    name = "estafet",
    version,
    about = "Which recurrent architecture remembers what, over how long, at what cost"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train and evaluate one experiment; without CONFIG, the quickstart: every architecture
    /// on running parity (trained at T 64, evaluated at T 256), then the report.
    Run {
        /// A TOML experiment config (see configs/).
        config: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
        /// Run directory to create (default: runs/NAME-TIMESTAMP).
        #[arg(long)]
        out: Option<PathBuf>,
        /// No progress bar; evaluation lines only.
        #[arg(long, short)]
        quiet: bool,
        /// Continue the run in --out from its last checkpoint: the same config and overrides,
        /// except budget fields (train.steps, train.max_seconds, ...), which extend the run.
        #[arg(long, requires = "out")]
        resume: bool,
        /// Train even if the memory estimate exceeds the memory available (`estafet check`
        /// prints the estimate).
        #[arg(long)]
        skip_memory_check: bool,
    },
    /// Validate a config (and overrides) without running it; prints the resolved config.
    Check {
        config: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Print one example of a task (its tokens, and the targets it is scored on).
    Sample {
        /// A task kind (see `estafet list tasks`).
        task: String,
        /// Set a task parameter, e.g. --set lag=5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a run's checkpointed weights as safetensors (float32) and a JSON manifest beside
    /// (config, tensor names and shapes); `train.init_from` reads the file back.
    Export {
        run_dir: PathBuf,
        /// The safetensors file to write (the manifest: the same name with .json).
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluate a run's checkpoint on its task's held-out set, at its own length and at others.
    Eval {
        run_dir: PathBuf,
        /// Another sequence length to evaluate at (repeatable).
        #[arg(long = "seq-len")]
        seq_lens: Vec<usize>,
        /// Held-out sequences per length (default: the run's eval.samples).
        #[arg(long)]
        samples: Option<usize>,
        /// Read a stream task's validation split as this many parallel streams, each window
        /// starting from the state the last one ended in (default: the run's eval.streams if it
        /// trained with train.carry_state); 0: independent windows from a zero state.
        #[arg(long)]
        streams: Option<usize>,
        #[arg(long, value_parser = parse_backend)]
        backend: Option<Backend>,
    },
    /// Generate text from a char_lm run, one character at a time, printing as it goes.
    Generate {
        run_dir: PathBuf,
        /// Text the model reads before it writes.
        #[arg(long)]
        prompt: String,
        /// Characters to generate.
        #[arg(long, default_value_t = 300)]
        tokens: usize,
        /// Softmax temperature; 0 always takes the most likely character.
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample among the k most likely characters only.
        #[arg(long)]
        top_k: Option<usize>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, value_parser = parse_backend)]
        backend: Option<Backend>,
    },
    /// Forecast a series with a time_series run: reads a CSV column, writes CSV forecasts.
    Predict {
        run_dir: PathBuf,
        /// A CSV file holding the series.
        #[arg(long)]
        input: PathBuf,
        /// Its column: a header name or a 0-based index.
        #[arg(long, default_value = "0")]
        column: String,
        /// Where to write the forecasts (default: standard output).
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long, value_parser = parse_backend)]
        backend: Option<Backend>,
    },
    /// Gradient flow: how much the last position's loss depends on each earlier input and state,
    /// for models at initialisation (a CONFIG) or trained (a RUN_DIR); CSVs and a plot.
    Gradflow {
        /// Configs (the model at initialisation) or run directories (the trained model).
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// Sequence length (default: each task's own).
        #[arg(long)]
        seq_len: Option<usize>,
        /// Held-out sequences averaged over.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Output directory (default: runs/gradflow-TIMESTAMP).
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, value_parser = parse_backend)]
        backend: Option<Backend>,
    },
    /// Run a sweep: a base config and axes (models, lengths, seeds, ...), as a grid of runs;
    /// complete runs are skipped and interrupted ones resumed.
    Sweep {
        sweep: PathBuf,
        /// Directory of the sweep's runs (shared by every shard).
        #[arg(long)]
        out: PathBuf,
        /// Runs at a time on this machine.
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// I/N: run only the runs whose index is I modulo N (a Slurm array task, say).
        #[arg(long, value_parser = parse_shard, default_value = "0/1")]
        shard: (usize, usize),
        #[arg(long, value_parser = parse_backend)]
        backend: Option<Backend>,
        /// Print the expanded grid and exit.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a markdown report with tables and plots from the run directories under DIR.
    Report { dir: PathBuf },
    /// Measure training and inference speed and memory on the workloads of
    /// ../shared/bench/torch_baseline.py (one model per process).
    Bench {
        /// Comma-separated models.
        #[arg(
            long,
            default_value = "rnn,lstm,gru,mamba,rwkv,mingru,attention",
            value_delimiter = ','
        )]
        models: Vec<String>,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
        /// Width for every model (default: Mamba 128, the rest 256, as the reference).
        #[arg(long)]
        d_model: Option<usize>,
        /// Threads for the CPU backends (RAYON_NUM_THREADS of each worker).
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Mixer layers between the embedding and the head.
        #[arg(long, default_value_t = 1)]
        layers: usize,
        /// How the layers are wired: `stacked` (PyTorch's multi-layer RNNs) or `residual`
        /// (pre-norm residual blocks and a final norm).
        #[arg(long, default_value = "stacked", value_parser = parse_layout)]
        layout: Layout,
        /// Residual layout: an MLP of this many times d_model after each layer (0: none).
        #[arg(long, default_value_t = 0)]
        mlp_expand: usize,
        /// A named set of shapes instead of one: `research` (every model at d 32, 64, 128, two
        /// residual layers, T 256 and 1024, batch 32).
        #[arg(long)]
        suite: Option<String>,
        #[arg(long, value_parser = parse_backend)]
        backend: Option<Backend>,
        /// Untimed calls before timing each phase.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed calls per phase (the median is reported).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Time budget per phase; at least 3 timed calls are always made.
        #[arg(long, default_value_t = 20.0)]
        max_seconds: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Skip token-by-token (`step`) inference.
        #[arg(long)]
        no_step: bool,
        /// One JSON line per model, with the reference's field names.
        #[arg(long)]
        json: bool,
        #[arg(long, hide = true)]
        worker: Option<String>,
        #[arg(long, hide = true, requires = "worker")]
        worker_options: Option<String>,
    },
    /// List what this build offers.
    List {
        what: Listing,
        /// Width at which `list models` sizes each model.
        #[arg(long, default_value_t = 256)]
        d_model: usize,
        /// Sequence length at which `list models` counts state (attention's cache grows).
        #[arg(long, default_value_t = 256)]
        seq_len: usize,
    },
}

#[derive(clap::Args)]
struct Common {
    /// Backend to run on (see `estafet list backends`).
    #[arg(long, value_parser = parse_backend)]
    backend: Option<Backend>,
    /// Override a config field, e.g. --set train.steps=200 (repeatable).
    #[arg(long = "set", value_name = "KEY.PATH=VALUE")]
    overrides: Vec<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Listing {
    Backends,
    Models,
    Tasks,
}

fn parse_backend(s: &str) -> Result<Backend, String> {
    s.parse()
}

fn parse_layout(s: &str) -> Result<Layout, String> {
    match s {
        "stacked" => Ok(Layout::Stacked),
        "residual" => Ok(Layout::Residual),
        _ => Err(format!("{s:?}: choose stacked or residual")),
    }
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
    let (i, n): (usize, usize) = (
        i.parse().map_err(|_| format!("{i:?} is not a number"))?,
        n.parse().map_err(|_| format!("{n:?} is not a number"))?,
    );
    if n == 0 || i >= n {
        return Err(format!("shard {i}/{n}: need 0 ≤ I < N"));
    }
    Ok((i, n))
}

// The host kernels and burn allocate tens of MB per step; glibc returns such blocks to the OS
// and faults them back in every step, mimalloc keeps them (measured: 1.2–1.5× tokens/s on the
// benchmark, experiments/bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

// mimalloc's C API, linked in with the allocator (the Rust crate declares it only behind a
// feature that pulls in another crate).
unsafe extern "C" {
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// `mi_option_purge_delay` in mimalloc's `mi_option_e` (the same index in its v2 and v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

fn main() -> ExitCode {
    // By default mimalloc hands freed memory back to the OS after a delay (1 s in the v3 linked
    // here, about one training step at d 128) and a later step faults it in again, zeroed by
    // the kernel; never purging keeps a run at its peak footprint, which its first step reaches
    // anyway (measured: 6–12% more training tokens/s for attention, RWKV-4 and Mamba at d 128,
    // T 1024; experiments/bench/README.md).
    // SAFETY: sets one integer option; mimalloc reads options at every purge decision.
    unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // The thread that trains runs the kernels' parallel work itself rather than waking a worker
    // and sleeping dozens of times a step (measured on one thread at d 64: +9% training tokens/s,
    // the median of eight interleaved pairs; experiments/bench/README.md). Nothing has built the pool yet, so this cannot fail; if it
    // did, rayon would build its usual pool on first use.
    let _ = estafet_models::fused::join_global_pool();
    // A panic is a bug in estafet, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error{at}: {}", message.replace('\n', " "));
    }));
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| execute(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", e.to_string().replace('\n', " "));
            ExitCode::from(e.exit_code() as u8)
        }
        Err(_) => ExitCode::FAILURE,
    }
}

fn execute(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Run {
            config,
            common,
            out,
            quiet,
            resume,
            skip_memory_check,
        } => {
            estafet_experiments::interrupt::install()?;
            let backend = Backend::resolve(common.backend)?;
            let Some(path) = &config else {
                if !common.overrides.is_empty() {
                    return Err(Error::Config(
                        "--set needs a CONFIG; the quickstart (`estafet run` alone) takes none"
                            .into(),
                    ));
                }
                let out = out.unwrap_or_else(|| run_dir::default_path(sweep::QUICKSTART.0));
                print!("{}", sweep::quickstart(backend, &out)?);
                println!("\nreport, plots and every run in {}", out.display());
                return Ok(());
            };
            let source = ConfigSource::read(path)?;
            let experiment = config::load(&source, &common.overrides)?;
            let out = out.unwrap_or_else(|| run_dir::default_path(source.stem()));
            if resume && train::is_complete_as(&out, &experiment)? {
                println!(
                    "{} is complete ({}); nothing to resume",
                    out.display(),
                    RunDir::SUMMARY
                );
                return Ok(());
            }
            let summary = train::run(
                &experiment,
                &RunOptions {
                    backend,
                    resume_command: interrupt::continue_command(&out, true),
                    out,
                    config_source: source.name.clone(),
                    code_version: CODE_VERSION.to_string(),
                    progress: !quiet,
                    resume,
                    skip_memory_check,
                },
            )?;
            println!("{}", summary.describe());
            Ok(())
        }
        Command::Bench {
            models,
            batch,
            seq_len,
            d_model,
            threads,
            layers,
            layout,
            mlp_expand,
            suite,
            backend,
            warmup,
            steps,
            max_seconds,
            seed,
            no_step,
            json,
            worker,
            worker_options,
        } => {
            if let (Some(model), Some(options)) = (&worker, &worker_options) {
                let options = BenchOptions::from_json(options)?;
                let result = bench::measure(model, &options, CODE_VERSION)?;
                println!("{}", BenchLine::Measured(Box::new(result)).json());
                return Ok(());
            }
            if [batch, seq_len, threads, steps, layers].contains(&0) || d_model == Some(0) {
                return Err(Error::Config(
                    "--batch, --seq-len, --d-model, --threads, --steps and --layers must be positive"
                        .into(),
                ));
            }
            let options = BenchOptions {
                models,
                batch,
                seq_len,
                d_model,
                threads,
                backend: Backend::resolve(backend)?,
                layers,
                layout,
                mlp_expand,
                warmup,
                steps,
                max_seconds,
                seed,
                step_mode: !no_step,
            };
            let shapes = match &suite {
                Some(name) => bench::suite(name, &options)?,
                None => vec![options],
            };
            if !json {
                println!("{}", BenchLine::header());
            }
            let mut failed = false;
            for shape in &shapes {
                bench::orchestrate(shape, |line| {
                    println!("{}", if json { line.json() } else { line.row() });
                    failed |= matches!(line, BenchLine::Failed { .. });
                    std::io::Write::flush(&mut std::io::stdout()).ok();
                })?;
            }
            if failed {
                return Err(Error::Runtime(anyhow::anyhow!("a benchmark worker failed")));
            }
            Ok(())
        }
        Command::Export { run_dir, out } => {
            let device = Backend::resolve(None)?.device()?;
            let run = SavedRun::load(&run_dir, &device)?;
            let sample = run.task.eval_set(run.config.run.seed, 1);
            let probe = export::Probe::of(&run.model, &estafet_data::Batch::new(&sample, &device));
            let (tensors, params) = export::export(&run.model, &run.config, Some(probe), &out)?;
            println!(
                "{} ({}, step {}): {tensors} tensors, {params} parameters → {} and {}",
                run_dir.display(),
                run.config.model.label(),
                run.step,
                out.display(),
                out.with_extension("json").display()
            );
            Ok(())
        }
        Command::Eval {
            run_dir,
            seq_lens,
            samples,
            streams,
            backend,
        } => {
            let backend = Backend::resolve(backend)?;
            let device = backend.device()?;
            let run = SavedRun::load(&run_dir, &device)?;
            let samples = samples.unwrap_or(run.config.eval.samples);
            if samples == 0 {
                return Err(Error::Config("--samples must be positive".into()));
            }
            let info = run.task.info();
            let mut lengths = vec![info.seq_len];
            lengths.extend(seq_lens);
            let carried = run
                .config
                .train
                .carry_state
                .then_some(run.config.eval.streams);
            let streams = streams.or(carried).filter(|&n| n > 0);
            let results = match streams {
                Some(n) => evaluate::streamed_at_lengths(
                    &run.model,
                    &run.config,
                    &lengths,
                    n,
                    "--seq-len",
                    &device,
                )?,
                None => evaluate::at_lengths(
                    &run.model,
                    &run.config,
                    &lengths,
                    samples,
                    "--seq-len",
                    &device,
                )?,
            };
            println!(
                "{} at step {} on {backend}; metric {} (baseline {:.4}, solved at {:.4}); {}",
                run_dir.display(),
                run.step,
                info.metric.name(),
                info.baseline_metric,
                info.solved_metric,
                match streams {
                    Some(1) => "the validation split as one stream, the state carried".into(),
                    Some(n) => format!("the validation split as {n} streams, the state carried"),
                    None => format!("{samples} independent windows per length"),
                }
            );
            println!(
                "{:>8} {:>10} {:>10} {:>14} {:>7}",
                "seq_len",
                "loss",
                info.metric.name(),
                "baseline",
                "solved"
            );
            for e in results {
                println!(
                    "{:>8} {:>10.4} {:>10.4} {:>14.4} {:>7}",
                    e.seq_len,
                    e.loss,
                    e.metric,
                    e.baseline_metric,
                    if e.solved { "yes" } else { "no" }
                );
            }
            Ok(())
        }
        Command::Generate {
            run_dir,
            prompt,
            tokens,
            temperature,
            top_k,
            seed,
            backend,
        } => {
            let backend = Backend::resolve(backend)?;
            let device = backend.device()?;
            let run = SavedRun::load(&run_dir, &device)?;
            let mut stdout = std::io::stdout();
            let stats = infer::generate(
                &run,
                &prompt,
                tokens,
                Sampling {
                    temperature,
                    top_k,
                    seed,
                },
                &device,
                &mut stdout,
            )?;
            println!();
            eprintln!(
                "{} characters in {:.2} s ({:.0} characters/s, prompt included) on {backend}; peak memory {}",
                stats.tokens,
                stats.seconds,
                stats.tokens as f64 / stats.seconds,
                stats
                    .peak_rss_mb
                    .map_or("unknown".into(), |m| format!("{m:.0} MB"))
            );
            Ok(())
        }
        Command::Predict {
            run_dir,
            input,
            column,
            output,
            backend,
        } => {
            let backend = Backend::resolve(backend)?;
            let device = backend.device()?;
            let run = SavedRun::load(&run_dir, &device)?;
            let csv = infer::predict(&run, &input, &column, &device)?;
            match output {
                Some(path) => {
                    run_dir::write_atomic(&path, csv.as_bytes())?;
                    eprintln!("forecasts written to {}", path.display());
                }
                None => print!("{csv}"),
            }
            Ok(())
        }
        Command::Gradflow {
            sources,
            seq_len,
            batch,
            out,
            backend,
        } => {
            if batch == 0 || seq_len == Some(0) {
                return Err(Error::Config(
                    "--batch and --seq-len must be positive".into(),
                ));
            }
            let device = Backend::resolve(backend)?.device()?.autodiff();
            let out = out.unwrap_or_else(|| run_dir::default_path("gradflow"));
            let mut flows = Vec::new();
            for path in &sources {
                let source = gradflow::Source::load(path, &device)?;
                let t = seq_len.unwrap_or(source.seq_len);
                let flow = gradflow::measure(
                    &source.label,
                    &source.model,
                    &source.config.task,
                    t,
                    batch,
                    source.config.run.seed,
                    &device,
                )?;
                eprintln!(
                    "{} ({} {}), T = {t}: ‖∂L/∂x‖ slope {:.4} per step, ‖∂L/∂h‖ slope {:.4} per step",
                    source.label,
                    source.config.model.label(),
                    source.when,
                    flow.input_slope,
                    flow.state_slope
                );
                flows.push(flow);
            }
            gradflow::write(&out, &flows)?;
            println!(
                "{:<24} {:>6} {:>11} {:>11} {:>11} {:>12} {:>12}",
                "model", "T", "‖∂x‖ d=0", "‖∂x‖ d=T/2", "‖∂x‖ d=T-1", "slope ∂x", "slope ∂h"
            );
            for f in &flows {
                let at = |k: usize| f.input[k.min(f.seq_len - 1)];
                println!(
                    "{:<24} {:>6} {:>11.3e} {:>11.3e} {:>11.3e} {:>12.4} {:>12.4}",
                    f.label,
                    f.seq_len,
                    at(0),
                    at(f.seq_len / 2),
                    at(f.seq_len - 1),
                    f.input_slope,
                    f.state_slope
                );
            }
            println!("CSVs, plots and summary.json in {}", out.display());
            Ok(())
        }
        Command::Sweep {
            sweep: path,
            out,
            jobs,
            shard,
            backend,
            dry_run,
        } => {
            if jobs == 0 {
                return Err(Error::Config("--jobs must be at least 1".into()));
            }
            let runs = sweep::expand(&path)?;
            if dry_run {
                for r in &runs {
                    let mark = if r.index % shard.1 == shard.0 {
                        ""
                    } else {
                        "  (other shard)"
                    };
                    println!("{:>4} {}{mark}", r.index, r.name);
                }
                return Ok(());
            }
            let backend = Backend::resolve(backend)?;
            interrupt::install()?;
            let progress = sweep::run(&runs, &out, shard, jobs, backend)?;
            eprintln!(
                "sweep: {} run, {} already complete, {} held by other processes, {} failed, {} diverged",
                progress.ran,
                progress.skipped,
                progress.held.len(),
                progress.failed.len(),
                progress.diverged.len()
            );
            if sweep::conclude(&progress, &runs, &out)? {
                let report = report::write(&out)?;
                print!("{}", report.markdown);
                report.complete()?;
            } else {
                eprintln!(
                    "other shards or processes are still running; `estafet report {}` once they finish",
                    out.display()
                );
            }
            Ok(())
        }
        Command::Report { dir } => {
            let report = report::write(&dir)?;
            print!("{}", report.markdown);
            eprintln!("written to {}", dir.join("report.md").display());
            report.complete()?;
            Ok(())
        }
        Command::Check { config, common } => {
            let source = ConfigSource::read(&config)?;
            let experiment = config::load(&source, &common.overrides)?;
            let backend = Backend::resolve(common.backend)?;
            let device = backend.device()?;
            if common.backend.is_some() {
                experiment
                    .model
                    .check_device(&device)
                    .map_err(|e| Error::Config(format!("{}: {backend}: {e}", source.name)))?;
            }
            print!("{}", experiment.to_toml());
            let info = experiment
                .task
                .build()
                .map_err(|e| Error::Config(e.to_string()))?
                .info();
            eprintln!(
                "memory on {backend}: {}; {} available",
                memory::for_run(&experiment, &info, &device).describe(),
                memory::available().map_or("unknown".into(), memory::human)
            );
            memory::check(&experiment, &info, &device)
                .map_err(|e| Error::Config(format!("{}: {e}", source.name)))?;
            eprintln!("{}: ok", source.name);
            Ok(())
        }
        Command::Sample {
            task,
            overrides,
            seed,
        } => {
            let (config, built, sample) = catalog::sample(&task, &overrides, seed)?;
            println!(
                "{task} ({}), seed {seed}, T = {}",
                catalog::parameters(&config),
                sample.input.len()
            );
            println!("{}", catalog::render(&built, &sample));
            Ok(())
        }
        Command::List {
            what,
            d_model,
            seq_len,
        } => {
            match what {
                Listing::Backends => {
                    for b in Backend::ALL {
                        let status = if b.compiled() {
                            "available"
                        } else {
                            "not compiled in (cargo feature)"
                        };
                        println!("{:<8} {:<38} {status}", b.name(), b.description());
                    }
                }
                Listing::Models => {
                    let backend = Backend::resolve(None)?;
                    println!(
                        "layers between an embedding and a head, vocabulary 64, d_model {d_model}; \
                         state in floats per sequence at {seq_len} tokens"
                    );
                    println!(
                        "{:<28} {:>6} {:>12} {:>14}",
                        "model", "layers", "parameters", "state floats"
                    );
                    for m in catalog::models(d_model, seq_len, backend)? {
                        println!(
                            "{:<28} {:>6} {:>12} {:>14}",
                            m.name, m.layers, m.params, m.state_size
                        );
                    }
                    println!(
                        "a hybrid names its layers' mixers in model.pattern, repeated over \
                         model.n_layers (README, \"Hybrid stacks\"); estafet bench takes its \
                         label, e.g. --models {} --layers 4",
                        catalog::HYBRIDS[0]
                    );
                }
                Listing::Tasks => {
                    for (parameters, info) in catalog::tasks() {
                        println!("{}  ({parameters})", info.kind);
                        println!(
                            "    T = {}, reads {}, predicts {}; metric {} over the scored positions, \
                             baseline loss {:.4} and metric {:.4}, solved at {:.4}",
                            info.seq_len,
                            info.input,
                            info.output,
                            info.metric.name(),
                            info.baseline_loss,
                            info.baseline_metric,
                            info.solved_metric
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    unsafe extern "C" {
        fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    }

    /// The index names the purge delay: the option whose default is 1000 (ms) in the linked
    /// mimalloc v3 (`options.c`). A test process never runs `main`, so it holds the default.
    #[test]
    fn the_purge_option_index_is_mimallocs() {
        // SAFETY: reads one option.
        let value = unsafe { mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(value, 1000);
    }
}
