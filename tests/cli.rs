//! End-to-end tests of the `estafet` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn estafet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_estafet"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("estafet-cli-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&dir).ok();
    dir
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn tiny_run(out: &Path) -> Output {
    estafet(&[
        "run",
        "configs/copy-lstm.toml",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "train.steps=4",
        "--set",
        "train.log_every=2",
        "--set",
        "task.lag=3",
        "--set",
        "model.d_model=8",
        "--set",
        "eval.samples=16",
        "--set",
        "run.seed=7",
        "--set",
        "eval.lengths=[30, 60]",
    ])
}

#[test]
fn a_tiny_run_writes_its_run_directory() {
    let out = scratch("tiny");
    let result = tiny_run(&out);
    assert!(result.status.success(), "{}", stderr(&result));

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["model"], "lstm");
    assert_eq!(summary["task"], "copy_memory");
    assert_eq!(summary["steps"], 4);
    assert_eq!(summary["seed"], 7);
    assert_eq!(summary["backend"], "ndarray");
    assert!(summary["params"].as_u64().unwrap() > 0);
    let eval = &summary["final_eval"];
    assert!(eval["loss"].as_f64().unwrap().is_finite());
    assert!((0.0..=1.0).contains(&eval["metric"].as_f64().unwrap()));
    assert_eq!(summary["metric"], "token_accuracy");
    assert_eq!(eval["seq_len"], 23);
    // Length generalisation: the final model at the lengths eval.lengths names.
    let lengths: Vec<_> = summary["length_eval"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["seq_len"].as_u64().unwrap(),
                e["baseline_loss"].as_f64().unwrap(),
            )
        })
        .collect();
    assert_eq!(lengths.len(), 2);
    assert_eq!((lengths[0].0, lengths[1].0), (30, 60));
    assert!((lengths[1].1 - 10.0 * 8f64.ln() / 60.0).abs() < 1e-9);
    // 10·ln 8 / (3 + 20)
    assert!((eval["baseline_loss"].as_f64().unwrap() - 10.0 * 8f64.ln() / 23.0).abs() < 1e-9);

    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train_steps: Vec<_> = lines
        .iter()
        .filter(|l| l["split"] == "train")
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(train_steps, [2, 4]);
    assert!(
        lines
            .iter()
            .any(|l| l["split"] == "eval" && l["step"] == 4 && l["seq_len"] == 23)
    );
    assert!(
        lines
            .iter()
            .any(|l| l["split"] == "eval" && l["seq_len"] == 60)
    );

    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        config.contains("steps = 4") && config.contains("seed = 7"),
        "{config}"
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(run["seed"], 7);
    assert_eq!(run["backend"], "ndarray");
    assert!(
        run["code_version"]
            .as_str()
            .unwrap()
            .starts_with(env!("CARGO_PKG_VERSION"))
    );
    for file in ["model.bpk", "optimizer.bpk", "state.json"] {
        assert!(
            out.join("checkpoint").join(file).is_file(),
            "checkpoint/{file}"
        );
    }

    // The same config and seed give the same numbers; an occupied directory is refused.
    let again = scratch("tiny-again");
    assert!(tiny_run(&again).status.success());
    let summary_again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(again.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["final_eval"], summary_again["final_eval"]);
    let refused = tiny_run(&out);
    assert_eq!(refused.status.code(), Some(1));
    assert!(
        stderr(&refused).contains("not empty"),
        "{}",
        stderr(&refused)
    );
    std::fs::remove_dir_all(out).ok();
    std::fs::remove_dir_all(again).ok();
}

#[test]
fn a_bad_config_exits_2_naming_the_field() {
    let dir = scratch("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("bad.toml");
    let text = std::fs::read_to_string("configs/copy-lstm.toml")
        .unwrap()
        .replace("batch_size = 32", "batch_size = 32\nbatch_sise = 8");
    std::fs::write(&config, text).unwrap();
    let out = estafet(&[
        "run",
        config.to_str().unwrap(),
        "--out",
        dir.join("run").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("bad.toml:") && err.contains("batch_sise"),
        "{err}"
    );
    assert!(
        !dir.join("run").exists(),
        "nothing is written for a bad config"
    );

    let out = estafet(&["check", "configs/copy-lstm.toml", "--set", "train.steps=-3"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("train.steps"), "{}", stderr(&out));

    let out = estafet(&["run", "no/such/config.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no/such/config.toml"),
        "{}",
        stderr(&out)
    );

    let out = estafet(&["run", "--backend", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown backend `tpu`"),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn an_unwritable_run_directory_is_a_clear_error() {
    let out = estafet(&[
        "run",
        "configs/copy-lstm.toml",
        "--quiet",
        "--out",
        "/proc/estafet-cannot-write-here",
        "--set",
        "train.steps=1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.starts_with("error: cannot create run directory /proc/"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn lists_what_the_build_offers() {
    let out = estafet(&["list", "backends"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ndarray") && l.ends_with("available")),
        "{text}"
    );
    let out = estafet(&["list", "tasks"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("copy_memory"));
    let out = estafet(&["list", "models"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("lstm"));
}

/// Every shipped config trains through `estafet run` (a few steps; copy tasks at a short lag).
#[test]
fn every_shipped_config_runs() {
    let mut configs: Vec<_> = std::fs::read_dir("configs")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    configs.sort();
    assert!(
        configs.len() >= 19,
        "one copy config per model, an LSTM config per task: {configs:?}"
    );
    for config in configs {
        let name = config.file_stem().unwrap().to_str().unwrap().to_string();
        let out = scratch(&format!("config-{name}"));
        let mut args = vec![
            "run",
            config.to_str().unwrap(),
            "--quiet",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "train.steps=3",
            "--set",
            "eval.samples=8",
        ];
        if name.starts_with("copy-") {
            args.extend(["--set", "task.lag=4"]);
        }
        let result = estafet(&args);
        assert!(result.status.success(), "{name}: {}", stderr(&result));
        assert!(out.join("summary.json").is_file(), "{name}");
        std::fs::remove_dir_all(out).ok();
    }
}

/// PyTorch weights of the wrong shape are a config error naming the tensor.
#[test]
fn torch_weights_of_the_wrong_shape_exit_2() {
    let out = scratch("init-from");
    std::fs::create_dir_all(&out).unwrap();
    // An nn.LSTM(3, 4) state dict, where the model's layers take 4 inputs.
    let weights = out.join("lstm.safetensors");
    let shapes = [
        ("lstm.weight_ih_l0", vec![16, 3]),
        ("lstm.weight_hh_l0", vec![16, 4]),
        ("lstm.bias_ih_l0", vec![16]),
        ("lstm.bias_hh_l0", vec![16]),
    ];
    let bytes: Vec<Vec<u8>> = shapes
        .iter()
        .map(|(_, shape)| vec![0u8; 4 * shape.iter().product::<usize>()])
        .collect();
    let views: Vec<_> = shapes
        .iter()
        .zip(&bytes)
        .map(|((name, shape), data)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data);
            (name.to_string(), view.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, &weights).unwrap();
    let run_dir = out.join("run");
    let result = estafet(&[
        "run",
        "configs/copy-lstm.toml",
        "--quiet",
        "--out",
        run_dir.to_str().unwrap(),
        "--set",
        "model.d_model=4",
        "--set",
        &format!("train.init_from={}", weights.display()),
    ]);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    let err = stderr(&result);
    assert!(
        err.contains("`weight_ih_l0` has shape [16, 3], expected [16, 4]"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!run_dir.exists(), "nothing is written for bad weights");
    std::fs::remove_dir_all(out).ok();
}

/// `estafet sample` shows a task's tokens and scored targets; every task trains end to end.
#[test]
fn every_task_samples_and_trains() {
    let out = estafet(&["sample", "parity", "--set", "seq_len=6", "--seed", "2"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<&str> = text.lines().collect();
    assert!(
        rows[0].starts_with("parity (seq_len = 6), seed 2, T = 6"),
        "{text}"
    );
    let bits: Vec<u32> = rows[2]
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let parity: Vec<u32> = rows[3]
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    let mut running = 0;
    for (b, p) in bits.iter().zip(&parity) {
        running ^= b;
        assert_eq!(running, *p, "{text}");
    }
    let out = estafet(&["sample", "adding", "--set", "seq_len=4"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let row = |i: usize| -> Vec<String> {
        text.lines()
            .nth(i)
            .unwrap()
            .split_whitespace()
            .skip(1)
            .map(String::from)
            .collect()
    };
    let marked: f64 = row(2)
        .iter()
        .filter_map(|cell| cell.split_once('/'))
        .filter(|(_, m)| *m == "1.00")
        .map(|(v, _)| v.parse::<f64>().unwrap())
        .sum();
    assert_eq!(row(3)[..3], [".", ".", "."], "{text}");
    assert!(
        (row(3)[3].parse::<f64>().unwrap() - marked).abs() < 0.011,
        "{text}"
    );
    let out = estafet(&["sample", "char_lm", "--set", "seq_len=6"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = estafet(&["sample", "time_series", "--set", "series=\"csv\""]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("task.path"), "{}", stderr(&out));
    let out = estafet(&["sample", "mqar", "--set", "n_pairs=100"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("task.n_pairs"), "{}", stderr(&out));

    let dir = scratch("tasks");
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("prices.csv");
    let rows: String = (0..60)
        .map(|i| format!("{i},{}\n", (i as f64 * 0.3).sin()))
        .collect();
    std::fs::write(&csv, format!("day,close\n{rows}")).unwrap();
    let text = dir.join("text.txt");
    std::fs::write(&text, "a relay of whispers, ".repeat(10)).unwrap();
    let csv_task = format!(
        "kind = \"time_series\"\nseries = \"csv\"\npath = {:?}\ncolumn = \"close\"\nseq_len = 8\nhorizon = 2",
        csv.display()
    );
    let text_task = format!(
        "kind = \"char_lm\"\npath = {:?}\nseq_len = 8",
        text.display()
    );
    let tasks = [
        "kind = \"adding\"\nseq_len = 10",
        "kind = \"char_lm\"\nseq_len = 16",
        "kind = \"time_series\"\nseq_len = 10\nhorizon = 3",
        "kind = \"time_series\"\nseries = \"mackey_glass\"\nseq_len = 10",
        &csv_task,
        &text_task,
        "kind = \"selective_copying\"\nseq_len = 12\nn_tokens = 3\nvocab = 4",
        "kind = \"mqar\"\nseq_len = 16\nn_pairs = 2\nvocab = 16",
        "kind = \"induction_heads\"\nseq_len = 10\nvocab = 4",
        "kind = \"parity\"\nseq_len = 10",
    ];
    for (i, task) in tasks.iter().enumerate() {
        let config = dir.join(format!("task{i}.toml"));
        let text = format!(
            "[model]\nd_model = 8\n[model.mixer]\nkind = \"gru\"\n[task]\n{task}\n[train]\nsteps = 3\n[eval]\nsamples = 8\n"
        );
        std::fs::write(&config, text).unwrap();
        let run = dir.join(format!("run{i}"));
        let result = estafet(&[
            "run",
            config.to_str().unwrap(),
            "--quiet",
            "--out",
            run.to_str().unwrap(),
        ]);
        assert!(result.status.success(), "{task}: {}", stderr(&result));
        assert!(run.join("summary.json").is_file());
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `estafet bench` prints one JSON line per model with the reference's field names.
#[test]
fn bench_reports_the_reference_fields() {
    let out = estafet(&[
        "bench",
        "--models",
        "rnn,mamba",
        "--batch",
        "2",
        "--seq-len",
        "8",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--max-seconds",
        "5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, model, params) in [(&lines[0], "rnn", 164_416), (&lines[1], "mamba", 132_928)] {
        assert_eq!(line["model"], model);
        // The reference's parameter counts at its default widths (../shared/bench/README.md).
        assert_eq!(line["params"], params, "{line}");
        for field in ["train_tok_s", "infer_tok_s", "step_tok_s", "peak_rss_mb"] {
            assert!(line[field].as_f64().unwrap() > 0.0, "{field}: {line}");
        }
        assert_eq!(line["config"]["seq_len"], 8);
        assert!(line["loss_first"].as_f64().unwrap().is_finite());
    }
    let out = estafet(&["bench", "--models", "transformer"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown model \"transformer\""),
        "{}",
        stderr(&out)
    );
}

/// `estafet eval` reads a run's checkpoint back and evaluates it at other lengths; a damaged
/// checkpoint is a one-line error naming the file.
#[test]
fn eval_reads_a_checkpoint_at_other_lengths() {
    let out = scratch("eval");
    assert!(tiny_run(&out).status.success());
    let result = estafet(&[
        "eval",
        out.to_str().unwrap(),
        "--seq-len",
        "40",
        "--samples",
        "8",
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    let text = String::from_utf8_lossy(&result.stdout);
    let lengths: Vec<&str> = text
        .lines()
        .skip(2)
        .map(|l| l.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(lengths, ["23", "40"], "{text}");

    let result = estafet(&["eval", out.to_str().unwrap(), "--seq-len", "10"]);
    assert_eq!(result.status.code(), Some(2));
    assert!(
        stderr(&result).contains("--seq-len 10"),
        "{}",
        stderr(&result)
    );

    std::fs::write(out.join("checkpoint").join("model.bpk"), b"not a burnpack").unwrap();
    let result = estafet(&["eval", out.to_str().unwrap()]);
    assert_eq!(result.status.code(), Some(2));
    let err = stderr(&result);
    assert!(err.contains("model.bpk: cannot load"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let result = estafet(&["eval", "/no/such/run"]);
    assert_eq!(result.status.code(), Some(2));
    assert!(stderr(&result).contains("not a run directory"));
    std::fs::remove_dir_all(out).ok();
}

fn train_tiny(dir: &Path, name: &str, task: &str) -> PathBuf {
    let config = dir.join(format!("{name}.toml"));
    let text = format!(
        "[model]\nd_model = 16\n[model.mixer]\nkind = \"lstm\"\n[task]\n{task}\n\
         [train]\nsteps = 5\n[optim]\nlr = 0.01\n[eval]\nsamples = 8\n"
    );
    std::fs::write(&config, text).unwrap();
    let run = dir.join(name);
    let result = estafet(&[
        "run",
        config.to_str().unwrap(),
        "--quiet",
        "--out",
        run.to_str().unwrap(),
    ]);
    assert!(result.status.success(), "{}", stderr(&result));
    run
}

/// `estafet generate` streams characters of the run's vocabulary, reproducibly by seed.
#[test]
fn generate_writes_characters_of_the_corpus() {
    let dir = scratch("generate");
    std::fs::create_dir_all(&dir).unwrap();
    let run = train_tiny(&dir, "lm", "kind = \"char_lm\"\nseq_len = 32");
    let args = |seed: &str| {
        estafet(&[
            "generate",
            run.to_str().unwrap(),
            "--prompt",
            "The relay",
            "--tokens",
            "40",
            "--seed",
            seed,
            "--top-k",
            "5",
        ])
    };
    let out = args("1");
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    let generated = text
        .trim_end_matches('\n')
        .strip_prefix("The relay")
        .unwrap();
    assert_eq!(generated.chars().count(), 40, "{text:?}");
    assert!(
        generated
            .chars()
            .all(|c| estafet_data::char_lm::EMBEDDED_CORPUS.contains(c)),
        "{generated:?}"
    );
    assert!(stderr(&out).contains("characters/s"), "{}", stderr(&out));
    assert_eq!(args("1").stdout, out.stdout, "same seed, same text");

    let bad = estafet(&["generate", run.to_str().unwrap(), "--prompt", "日本"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("not in the run's vocabulary"),
        "{}",
        stderr(&bad)
    );

    let series = train_tiny(&dir, "ts", "kind = \"time_series\"\nseq_len = 16");
    let wrong = estafet(&["generate", series.to_str().unwrap(), "--prompt", "a"]);
    assert_eq!(wrong.status.code(), Some(2));
    assert!(
        stderr(&wrong).contains("needs a char_lm run"),
        "{}",
        stderr(&wrong)
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `estafet predict` forecasts every row of a CSV column with the run's horizon.
#[test]
fn predict_writes_forecasts_as_csv() {
    let dir = scratch("predict");
    std::fs::create_dir_all(&dir).unwrap();
    let run = train_tiny(
        &dir,
        "ts",
        "kind = \"time_series\"\nseq_len = 16\nhorizon = 3",
    );
    let input = dir.join("series.csv");
    let rows: String = (0..25)
        .map(|i| format!("{i},{}\n", (i as f64 * 0.4).sin()))
        .collect();
    std::fs::write(&input, format!("day,level\n{rows}")).unwrap();
    let output = dir.join("forecasts.csv");
    let out = estafet(&[
        "predict",
        run.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--column",
        "level",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let csv = std::fs::read_to_string(&output).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "t,value,forecast_1,forecast_2,forecast_3");
    assert_eq!(lines.len(), 26);
    let row: Vec<f64> = lines[3].split(',').map(|v| v.parse().unwrap()).collect();
    assert_eq!(row[0], 2.0);
    assert!((row[1] - 0.8f64.sin()).abs() < 1e-12);
    assert!(row[2..].iter().all(|v| v.is_finite()));

    let missing = estafet(&[
        "predict",
        run.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--column",
        "price",
    ]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("no column \"price\""),
        "{}",
        stderr(&missing)
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `estafet gradflow` writes a `distance,grad_norm` CSV per model, plots and fitted slopes.
#[test]
fn gradflow_writes_curves_and_plots() {
    let out = scratch("gradflow");
    let run = estafet(&[
        "gradflow",
        "configs/copy-rnn.toml",
        "configs/copy-lstm.toml",
        "--seq-len",
        "30",
        "--batch",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let csv = std::fs::read_to_string(out.join("copy-lstm.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows[0], "distance,grad_norm");
    assert_eq!(rows.len(), 31, "one row per distance 0..29");
    let state = std::fs::read_to_string(out.join("copy-rnn.state.csv")).unwrap();
    assert!(
        state.lines().nth(1).unwrap().starts_with("1,"),
        "no state gradient at distance 0"
    );
    for plot in [
        "gradflow.png",
        "gradflow.svg",
        "gradflow-state.png",
        "gradflow-state.svg",
    ] {
        assert!(
            std::fs::metadata(out.join(plot)).unwrap().len() > 1000,
            "{plot}"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let slope = |i: usize| summary[i]["input_slope_per_step"].as_f64().unwrap();
    // The Elman RNN at initialisation forgets faster than the LSTM.
    assert!(slope(0) < slope(1), "{summary}");
    std::fs::remove_dir_all(out).ok();
}

/// A run killed with SIGKILL (twice) and resumed ends with exactly the figures of a run that
/// was never interrupted.
#[test]
fn a_killed_run_resumes_to_identical_results() {
    let dir = scratch("resume");
    std::fs::create_dir_all(&dir).unwrap();
    let args = |out: &Path| -> Vec<String> {
        [
            "run",
            "configs/copy-lstm.toml",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "task.lag=5",
            "--set",
            "model.d_model=16",
            "--set",
            "train.steps=200",
            "--set",
            "train.checkpoint_every=10",
            "--set",
            "train.eval_every=50",
            "--set",
            "train.log_every=5",
            "--set",
            "eval.samples=32",
            "--set",
            "run.seed=3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = dir.join("whole");
    let out = Command::new(env!("CARGO_BIN_EXE_estafet"))
        .args(args(&whole))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = dir.join("killed");
    let checkpoint_step = || -> u64 {
        std::fs::read(killed.join("checkpoint/state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["step"].as_u64())
            .unwrap_or(0)
    };
    for (kill_after, resume) in [(40, false), (120, true)] {
        let mut a = args(&killed);
        if resume {
            a.push("--resume".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_estafet"))
            .args(a)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while checkpoint_step() < kill_after {
            assert!(
                child.try_wait().unwrap().is_none(),
                "the run ended before it was killed"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert!(!killed.join("summary.json").exists());
    }
    let mut a = args(&killed);
    a.push("--resume".into());
    let out = Command::new(env!("CARGO_BIN_EXE_estafet"))
        .args(a)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    let summary =
        |d: &Path| serde_json::from_str::<serde_json::Value>(&read(d, "summary.json")).unwrap();
    assert_eq!(
        summary(&whole)["final_eval"],
        summary(&killed)["final_eval"]
    );
    assert_eq!(summary(&killed)["steps"], 200);
    // The metrics agree line for line, timings aside.
    let figures = |d: &Path| -> Vec<(String, u64, String, String)> {
        read(d, "metrics.jsonl")
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| {
                (
                    v["split"].to_string(),
                    v["step"].as_u64().unwrap(),
                    v["loss"].to_string(),
                    v["metric"].to_string(),
                )
            })
            .collect()
    };
    assert_eq!(figures(&whole), figures(&killed));
    assert_eq!(figures(&whole).len(), 40 + 4);

    // Resuming a complete run does nothing; resuming with another config is refused.
    let again = estafet(
        &args(&killed)
            .iter()
            .map(String::as_str)
            .chain(["--resume"])
            .collect::<Vec<_>>(),
    );
    assert!(again.status.success());
    std::fs::remove_file(killed.join("summary.json")).unwrap();
    let mut other = args(&killed);
    other.extend(["--resume".into(), "--set".into(), "optim.lr=0.5".into()]);
    let refused = estafet(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("different config"),
        "{}",
        stderr(&refused)
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A sweep runs its grid (in shards, in parallel), skips finished runs when restarted, and
/// ends with the report.
#[test]
fn a_sweep_runs_its_grid_in_shards_and_reports() {
    let dir = scratch("sweep");
    std::fs::create_dir_all(&dir).unwrap();
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        r#"base = "../../configs/copy-lstm.toml"
length_factors = [2]
[set]
"train.steps" = 4
"eval.samples" = 8
[axes]
model = [
  { label = "lstm16", mixer = { kind = "lstm" }, d_model = 16 },
  { label = "gru8", mixer = { kind = "gru" }, d_model = 8 },
]
length = [24]
"run.seed" = [0, 1]
"#
        .replace(
            "../../configs",
            &std::env::current_dir()
                .unwrap()
                .join("configs")
                .display()
                .to_string(),
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let s = sweep.to_str().unwrap();
    let first = estafet(&["sweep", s, "--out", o, "--shard", "1/2"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let done = |name: &str| out.join(name).join("summary.json").is_file();
    assert!(done("lstm16-length24-seed1") && done("gru8-length24-seed1"));
    assert!(
        !done("lstm16-length24-seed0"),
        "the other shard's runs wait"
    );
    let second = estafet(&["sweep", s, "--out", o, "--shard", "0/2", "--jobs", "2"]);
    assert!(second.status.success(), "{}", stderr(&second));
    let report = String::from_utf8_lossy(&second.stdout);
    assert!(
        report.contains("| lstm16 |") && report.contains("| gru8 |"),
        "{report}"
    );
    assert!(
        report.contains("(0/2)") || report.contains("(1/2)") || report.contains("(2/2)"),
        "{report}"
    );
    assert!(
        report.contains("T = 48"),
        "length generalisation at 2L: {report}"
    );
    for plot in [
        "copy_memory-by-length.png",
        "copy_memory-learning.svg",
        "copy_memory-length-generalisation.png",
    ] {
        assert!(out.join("plots").join(plot).is_file(), "{plot}");
    }
    // Restarted: nothing to run.
    let third = estafet(&["sweep", s, "--out", o]);
    assert!(
        stderr(&third).contains("4 already complete"),
        "{}",
        stderr(&third)
    );
    let report = estafet(&["report", o]);
    assert!(report.status.success());
    assert!(out.join("report.md").is_file());

    std::fs::write(&sweep, "base = \"x.toml\"\n[axes]\nlength = 5\n").unwrap();
    let bad = estafet(&["sweep", s, "--out", o]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        stderr(&bad).contains("axes.length: expected a non-empty array"),
        "{}",
        stderr(&bad)
    );
    std::fs::remove_dir_all(dir).ok();
}

/// `train.diagnostics` logs state norms, gate saturation and the RNN's spectral radius.
#[test]
fn diagnostics_are_logged_with_each_evaluation() {
    for (config, gated) in [
        ("configs/copy-rnn.toml", false),
        ("configs/copy-lstm.toml", true),
    ] {
        let out = scratch(&format!("diag-{gated}"));
        let run = estafet(&[
            "run",
            config,
            "--quiet",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "task.lag=5",
            "--set",
            "model.d_model=8",
            "--set",
            "train.steps=4",
            "--set",
            "train.eval_every=2",
            "--set",
            "eval.samples=8",
            "--set",
            "train.diagnostics=true",
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|l: &serde_json::Value| l["split"] == "diagnostics")
            .collect();
        assert_eq!(lines.len(), 2, "one per evaluation");
        let d = &lines[1];
        let norms = d["state_norm"].as_array().unwrap();
        assert_eq!(norms.len(), 5);
        assert!(norms.iter().all(|p| p[1].as_f64().unwrap() > 0.0), "{d}");
        assert_eq!(d["saturated_gates"].is_f64(), gated, "{d}");
        let radius = d["spectral_radius"].as_array().unwrap();
        assert_eq!(radius.len(), if gated { 0 } else { 1 }, "{d}");
        std::fs::remove_dir_all(out).ok();
    }
}
