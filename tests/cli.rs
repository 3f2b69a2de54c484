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
    assert_eq!(summary["backend"], "flex");
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
    assert_eq!(run["backend"], "flex");
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
    let first = text.lines().find(|l| l.ends_with("available"));
    assert!(
        first.is_some_and(|l| l.starts_with("flex")),
        "flex, the default, comes first: {text}"
    );
    let out = estafet(&["list", "tasks"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("copy_memory"));
    let out = estafet(&["list", "models"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("lstm"));
}

/// Every shipped config trains through `estafet run` (a few steps; copy tasks at a short lag;
/// no evaluation at other lengths, which reach a million tokens in one config).
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
            "--set",
            "eval.lengths=[]",
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

/// `estafet export` writes a run's weights and a manifest; `train.init_from` reads the export
/// back (the run then starts from the exported weights: its first evaluation equals the
/// exported run's last), and refuses an export of another model with one line.
#[test]
fn an_export_is_read_back_by_init_from() {
    let dir = scratch("export");
    let run = dir.join("run");
    let args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "run",
            "configs/copy-lstm.toml",
            "--quiet",
            "--out",
            out.to_str().unwrap(),
            "--set",
            "model.d_model=8",
            "--set",
            "model.n_layers=2",
            "--set",
            "train.steps=6",
            "--set",
            "eval.samples=16",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let first = estafet(
        &args(&run, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(first.status.success(), "{}", stderr(&first));
    let file = dir.join("lstm.safetensors");
    let exported = estafet(&[
        "export",
        run.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(exported.status.success(), "{}", stderr(&exported));
    let manifest = json(&dir.join("lstm.json"));
    assert_eq!(manifest["model"], "lstm");
    assert_eq!(
        manifest["tensors"]["lstm.weight_ih_l1"],
        serde_json::json!([32, 8])
    );

    let init = format!("train.init_from={}", file.display());
    let again = dir.join("again");
    let second = estafet(
        // One step at a learning rate too small to move a weight: the exported weights, evaluated.
        &args(
            &again,
            &[
                "--set",
                &init,
                "--set",
                "train.steps=1",
                "--set",
                "optim.lr=1e-30",
            ],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert!(second.status.success(), "{}", stderr(&second));
    let loss = |d: &Path| {
        json(&d.join("summary.json"))["final_eval"]["loss"]
            .as_f64()
            .unwrap()
    };
    assert!(
        (loss(&run) - loss(&again)).abs() < 1e-6,
        "the exported weights, evaluated again: {} vs {}",
        loss(&run),
        loss(&again)
    );

    let gru = estafet(
        &args(
            &dir.join("gru"),
            &["--set", &init, "--set", "model.mixer={ kind = \"gru\" }"],
        )
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>(),
    );
    assert_eq!(gru.status.code(), Some(2), "{}", stderr(&gru));
    assert!(
        stderr(&gru).contains("an export of a lstm model"),
        "{}",
        stderr(&gru)
    );
    std::fs::remove_dir_all(dir).ok();
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
    // The state-tracking tasks show their tokens (modular arithmetic: as symbols).
    let out = estafet(&[
        "sample",
        "word_problem",
        "--set",
        "group=\"a5\"",
        "--set",
        "seq_len=5",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("word_problem (group = \"a5\""), "{text}");
    assert!(
        text.lines()
            .nth(3)
            .unwrap()
            .split_whitespace()
            .skip(1)
            .all(|v| v.parse::<u32>().unwrap() < 60),
        "{text}"
    );
    let out = estafet(&[
        "sample",
        "modular_arithmetic",
        "--set",
        "brackets=true",
        "--set",
        "seq_len=12",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines().nth(2).unwrap().trim_end().ends_with('='),
        "{text}"
    );
    let out = estafet(&[
        "sample",
        "word_problem",
        "--set",
        "group=\"a5\"",
        "--set",
        "inputs=\"swaps\"",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("task.inputs"), "{}", stderr(&out));
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
        for field in ["train_gflops", "gemm_gflops", "efficiency"] {
            assert!(line[field].as_f64().unwrap() > 0.0, "{field}: {line}");
        }
    }
    // A research shape: two pre-norm residual layers with an MLP, built as a config builds it.
    let out = estafet(&[
        "bench",
        "--models",
        "lstm",
        "--batch",
        "2",
        "--seq-len",
        "8",
        "--d-model",
        "16",
        "--layers",
        "2",
        "--layout",
        "residual",
        "--mlp-expand",
        "2",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--max-seconds",
        "5",
        "--no-step",
        "--json",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let line: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    // Per layer: LSTM 2·(16·64 + 64), two LayerNorms 2·32, MLP 16·32 + 32 + 32·16 + 16; then the
    // embedding 64·16, the final norm 32 and the head 16·64 + 64.
    let layer = 2 * (16 * 64 + 64) + 2 * 32 + (16 * 32 + 32 + 32 * 16 + 16);
    let non_embedding = 2 * layer + 32 + 16 * 64 + 64;
    assert_eq!(line["params"], non_embedding + 64 * 16, "{line}");
    assert_eq!(line["train_flops_per_token"], 6.0 * non_embedding as f64);
    assert_eq!(line["config"]["layers"], 2);
    assert_eq!(line["config"]["layout"], "residual");
    let out = estafet(&["bench", "--suite", "tiny"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown suite"), "{}", stderr(&out));
    let out = estafet(&["bench", "--models", "transformer"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("unknown model \"transformer\""),
        "{}",
        stderr(&out)
    );
}

/// `estafet eval` reads a run's checkpoint back and evaluates it at other lengths; a length
/// whose evaluation cannot fit in memory and a damaged checkpoint are one-line errors.
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

    // A length whose evaluation cannot fit is refused before anything is evaluated or printed.
    let result = estafet(&["eval", out.to_str().unwrap(), "--seq-len", "40000000000"]);
    assert_eq!(result.status.code(), Some(2), "{}", stderr(&result));
    assert!(result.stdout.is_empty());
    assert!(
        stderr(&result).contains("--seq-len 40000000000: evaluating 16 sequences")
            && stderr(&result).contains("is available"),
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
    assert!(wrong.stdout.is_empty(), "no prompt before the error");
    assert!(bad.stdout.is_empty(), "no prompt before the error");
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

/// Runs `args` whole into `dir/whole`, and into `dir/killed` killed with SIGKILL once its
/// checkpoint has passed each of `kill_after`, resumed each time, then resumed to the end.
fn kill_and_resume(
    dir: &Path,
    args: &dyn Fn(&Path) -> Vec<String>,
    kill_after: &[u64],
) -> (PathBuf, PathBuf) {
    let whole = dir.join("whole");
    let out = Command::new(env!("CARGO_BIN_EXE_estafet"))
        .args(args(&whole))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let killed = dir.join("killed");
    for (i, &kill_after) in kill_after.iter().enumerate() {
        let resume = i > 0;
        let mut a = args(&killed);
        if resume {
            a.push("--resume".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_estafet"))
            .args(a)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        while checkpoint_step(&killed) < kill_after {
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

    (whole, killed)
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
    let (whole, killed) = kill_and_resume(&dir, &args, &[40, 120]);
    assert_eq!(
        json(&whole.join("summary.json"))["final_eval"],
        json(&killed.join("summary.json"))["final_eval"]
    );
    assert_eq!(json(&killed.join("summary.json"))["steps"], 200);
    // The metrics agree line for line, timings aside.
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
        "copy_memory-training.png",
        "copy_memory-length-generalisation.png",
        "copy_memory-length-heatmap.svg",
        "copy_memory-final.png",
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

    // One corrupt run does not sink the report: the others are reported, the corrupt one is
    // listed with the reason, and the exit status (5) says that the report is partial.
    let corrupt = out.join("gru8-length24-seed0");
    std::fs::write(corrupt.join("run.json"), "{ bad line\n").unwrap();
    let partial = estafet(&["report", o]);
    assert_eq!(partial.status.code(), Some(5), "{}", stderr(&partial));
    let markdown = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        markdown.contains("| lstm16 |")
            && markdown.contains("| gru8 |")
            && markdown.contains("Left out: 1 runs")
            && markdown.contains(&format!("{}", corrupt.join("run.json").display())),
        "{markdown}"
    );
    let said = stderr(&partial);
    assert!(
        said.lines()
            .last()
            .unwrap()
            .starts_with("error: 1 runs could not be read")
            && said.contains("not a valid estafet file"),
        "{said}"
    );

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

/// A model that cannot fit is refused before anything is allocated: one line with the
/// estimate and what is available, exit 2, no run directory; `estafet check` prints the
/// estimate of a model that fits and refuses the same impossible one.
#[test]
fn an_impossible_model_is_refused_before_allocation() {
    let dir = scratch("memory");
    let out = dir.join("run");
    let o = out.to_str().unwrap();
    let huge = estafet(&[
        "run",
        "configs/copy-lstm.toml",
        "--out",
        o,
        "--set",
        "model.d_model=2000000",
    ]);
    let said = stderr(&huge);
    assert_eq!(huge.status.code(), Some(2), "{said}");
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(
        said.contains("model.d_model = 2000000")
            && said.contains("training needs about 512 TB")
            && said.contains("available"),
        "{said}"
    );
    assert!(!out.exists(), "nothing is written for a refused model");

    let fits = estafet(&["check", "configs/copy-lstm.toml"]);
    assert!(fits.status.success(), "{}", stderr(&fits));
    assert!(
        stderr(&fits).contains("memory on") && stderr(&fits).contains("available"),
        "{}",
        stderr(&fits)
    );
    let refused = estafet(&[
        "check",
        "configs/copy-lstm.toml",
        "--set",
        "model.d_model=2000000",
    ]);
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    std::fs::remove_dir_all(dir).ok();
}

/// `train.carry_state`: a character LM killed mid-stream (the first time inside a pass over
/// the split, the second after the streams started over) resumes from the checkpoint's carried
/// state and ends with exactly the figures of an uninterrupted run; the same run without the
/// carried state ends elsewhere, so the state is what carries. A task that is not one long
/// sequence is refused.
#[test]
fn a_killed_run_resumes_mid_stream_to_identical_results() {
    let dir = scratch("resume-stream");
    std::fs::create_dir_all(&dir).unwrap();
    // 16,374 training characters in 16 streams: 62 windows of 16 per pass.
    let with = |carry: bool| {
        move |out: &Path| -> Vec<String> {
            [
                "run",
                "configs/char-lm-lstm.toml",
                "--quiet",
                "--out",
                out.to_str().unwrap(),
                "--set",
                "model.d_model=16",
                "--set",
                "task.seq_len=16",
                "--set",
                "train.batch_size=16",
                "--set",
                "train.steps=120",
                "--set",
                "train.checkpoint_every=10",
                "--set",
                "train.eval_every=40",
                "--set",
                "train.log_every=5",
                "--set",
                "eval.streams=3",
                "--set",
                &format!("train.carry_state={carry}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect()
        }
    };
    let (whole, killed) = kill_and_resume(&dir, &with(true), &[30, 80]);
    assert_eq!(figures(&whole), figures(&killed));
    assert_eq!(
        json(&whole.join("summary.json"))["final_eval"],
        json(&killed.join("summary.json"))["final_eval"]
    );
    let fresh = dir.join("fresh");
    let out = estafet(
        &with(false)(&fresh)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(figures(&whole), figures(&fresh));
    // `estafet eval` reads a carried-state run as it was evaluated, or any stream-task run
    // either way.
    let streamed = estafet(&["eval", whole.to_str().unwrap()]);
    assert!(streamed.status.success(), "{}", stderr(&streamed));
    let text = String::from_utf8_lossy(&streamed.stdout).to_string();
    assert!(text.contains("as 3 streams, the state carried"), "{text}");
    let final_bpc = json(&whole.join("summary.json"))["final_eval"]["metric"]
        .as_f64()
        .unwrap();
    assert!(text.contains(&format!("{final_bpc:.4}")), "{text}");
    let windows = estafet(&["eval", fresh.to_str().unwrap(), "--streams", "1"]);
    assert!(
        String::from_utf8_lossy(&windows.stdout).contains("as one stream"),
        "{}",
        stderr(&windows)
    );

    let refused = estafet(&[
        "check",
        "configs/mqar-lstm.toml",
        "--set",
        "train.carry_state=true",
    ]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("train.carry_state: task.kind = \"mqar\" draws independent"),
        "{}",
        stderr(&refused)
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A run directory has one writer. A second `run --resume` on a directory a run is writing
/// (a Slurm requeue while the old job is still stopping) exits 4 with one line naming the
/// directory and the holder's pid, before it writes anything; a sweep whose run another
/// process holds skips it and says so. (The lock dies with its process: after a SIGKILL the
/// run resumes, `a_killed_run_resumes_to_identical_results`.)
#[test]
fn a_second_writer_is_refused() {
    let dir = scratch("busy");
    std::fs::create_dir_all(&dir).unwrap();
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            "base = \"{}\"\n[axes]\n\"run.seed\" = [3]\n",
            std::env::current_dir()
                .unwrap()
                .join("configs/copy-lstm.toml")
                .display()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let o = out.to_str().unwrap();
    let listed = estafet(&["sweep", sweep.to_str().unwrap(), "--out", o, "--dry-run"]);
    let name = String::from_utf8_lossy(&listed.stdout)
        .split_whitespace()
        .nth(1)
        .expect("the one run's name")
        .to_string();
    let held = out.join(&name);
    let mut child = spawn(&small_lstm(&held, 1_000_000, &[]));
    wait_for_step(&mut child, &held, 5);
    let metrics = || std::fs::read_to_string(held.join("metrics.jsonl")).unwrap();

    let second = estafet(
        &small_lstm(&held, 1_000_000, &["--resume"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(second.status.code(), Some(4), "{}", stderr(&second));
    let message = stderr(&second);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains(&held.display().to_string())
            && message.contains(&format!("pid {}", child.id())),
        "{message}"
    );
    let fresh = estafet(
        &small_lstm(&held, 1_000_000, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_eq!(fresh.status.code(), Some(4), "{}", stderr(&fresh));

    let swept = estafet(&["sweep", sweep.to_str().unwrap(), "--out", o]);
    let said = stderr(&swept);
    assert!(swept.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "{name}: in use by another process (pid {})",
            child.id()
        )) && said.contains("1 held by other processes"),
        "{said}"
    );
    let before = metrics();
    assert!(
        !held.join(".checkpoint.tmp").exists() && child.try_wait().unwrap().is_none(),
        "the holder still runs undisturbed"
    );
    signal(child.id(), "KILL");
    child.wait().unwrap();
    // Only the holder wrote: every training line's step is one more than the one before.
    let steps: Vec<u64> = before
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .collect();
    assert!(steps.windows(2).all(|w| w[1] == w[0] + 5), "{steps:?}");
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

/// Sends `signal` (e.g. "INT", "TERM") to process `pid`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// Whether SIGINT waits, undelivered, for process `pid` (its pending masks in /proc).
fn sigint_pending(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .any(|mask| mask & (1 << (2 - 1)) != 0)
}

/// The largest `step` of a training line in `dir/metrics.jsonl` (0 if none yet).
fn logged_step(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["split"] == "train")
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

fn checkpoint_step(dir: &Path) -> u64 {
    std::fs::read(dir.join("checkpoint/state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// `(split, step, seq_len, loss, metric, lr)` of every metrics line: everything but timings.
fn figures(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            format!(
                "{} {} {} {} {} {}",
                v["split"], v["step"], v["seq_len"], v["loss"], v["metric"], v["lr"]
            )
        })
        .collect()
}

fn small_lstm(out: &Path, steps: usize, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
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
        &format!("train.steps={steps}"),
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
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn spawn(args: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_estafet"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `dir` has logged a training step of at least `step`; the child must still run.
fn wait_for_step(child: &mut std::process::Child, dir: &Path, step: u64) {
    while logged_step(dir) < step {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before the signal"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Ctrl-C, then SIGTERM (Slurm's preemption warning), each after the run was resumed: each
/// finishes its step, checkpoints (no `checkpoint_every` needed), writes interrupted.json and
/// exits 130 / 143 with the command that continues; the resumed run ends with exactly the
/// figures of an uninterrupted one.
#[test]
fn signals_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one() {
    let dir = scratch("signals");
    std::fs::create_dir_all(&dir).unwrap();
    let steps = 400;
    let whole = dir.join("whole");
    let out = estafet(
        &small_lstm(&whole, steps, &[])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success(), "{}", stderr(&out));

    let stopped = dir.join("stopped");
    let mut previous = 0;
    for (after, sig, code, resume) in [(40, "INT", 130, false), (150, "TERM", 143, true)] {
        let mut args = small_lstm(&stopped, steps, &[]);
        if resume {
            args.push("--resume".into());
        }
        let mut child = spawn(&args);
        wait_for_step(&mut child, &stopped, after);
        signal(child.id(), sig);
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{err}");
        let step = checkpoint_step(&stopped);
        assert!(
            step >= after && step < steps as u64 && step > previous,
            "{step}"
        );
        previous = step;
        let note = json(&stopped.join("interrupted.json"));
        assert_eq!(note["signal"], format!("SIG{sig}"));
        assert_eq!(note["step"], step);
        let command = note["resume_command"].as_str().unwrap();
        assert!(
            command.contains("--resume") && command.contains(stopped.to_str().unwrap()),
            "{command}"
        );
        assert!(
            err.contains("continue with:") && err.contains(command),
            "{err}"
        );
        assert!(!stopped.join("summary.json").exists());
    }
    let mut args = small_lstm(&stopped, steps, &[]);
    args.push("--resume".into());
    let out = estafet(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!stopped.join("interrupted.json").exists());
    assert_eq!(
        json(&whole.join("summary.json"))["final_eval"],
        json(&stopped.join("summary.json"))["final_eval"]
    );
    assert_eq!(figures(&whole), figures(&stopped));
    std::fs::remove_dir_all(dir).ok();
}

/// SIGTERM during a run's final evaluations (a length evaluation of 200,000 tokens, seconds
/// long) stops it at the evaluation's next window, long before the evaluation would end:
/// exit 143, interrupted.json, no summary and no partial figures; resumed, the run evaluates
/// again and ends as an uninterrupted one.
#[test]
fn a_signal_stops_the_final_evaluation() {
    let dir = scratch("signal-eval");
    std::fs::create_dir_all(&dir).unwrap();
    let args = |out: &Path| small_lstm(out, 20, &["--set", "eval.lengths=[200000]"]);
    let run = |args: &[String]| estafet(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let whole = dir.join("whole");
    let started = std::time::Instant::now();
    let out = run(&args(&whole));
    let whole_seconds = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", stderr(&out));

    let stopped = dir.join("stopped");
    let mut child = spawn(&args(&stopped));
    // The final checkpoint is written before the evaluations at other lengths begin.
    while checkpoint_step(&stopped) < 20 {
        assert!(child.try_wait().unwrap().is_none(), "the run ended early");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    let signalled = std::time::Instant::now();
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    let latency = signalled.elapsed().as_secs_f64();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(
        latency < whole_seconds / 3.0,
        "stopped {latency:.1} s after the signal; the whole run took {whole_seconds:.1} s"
    );
    assert!(!stopped.join("summary.json").exists());
    assert_eq!(json(&stopped.join("interrupted.json"))["step"], 20);
    assert!(
        !figures(&stopped).iter().any(|f| f.contains("200000")),
        "no partial length evaluation is recorded"
    );
    let mut resume = args(&stopped);
    resume.push("--resume".into());
    let out = run(&resume);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        json(&whole.join("summary.json"))["length_eval"],
        json(&stopped.join("summary.json"))["length_eval"]
    );
    assert_eq!(figures(&whole), figures(&stopped));
    std::fs::remove_dir_all(dir).ok();
}

/// A second Ctrl-C ends the run at once, mid-step; the checkpoint written by the clock
/// (`train.checkpoint_minutes`) before it is intact and the run resumes from it.
#[test]
fn a_second_ctrl_c_exits_at_once_keeping_the_last_checkpoint() {
    let dir = scratch("double-int");
    // Steps of about a second (a checkpoint after each, by the clock), so that both signals
    // land within one step.
    let args = |resume: bool| {
        let mut a = small_lstm(
            &dir,
            2000,
            &[
                "--set",
                "model.d_model=256",
                "--set",
                "train.batch_size=128",
                "--set",
                "task.lag=30",
                "--set",
                "train.log_every=1",
                "--set",
                "train.checkpoint_minutes=0.001",
            ],
        );
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let mut child = spawn(&args(false));
    while checkpoint_step(&dir) < 3 {
        assert!(child.try_wait().unwrap().is_none());
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    signal(child.id(), "INT");
    // Two SIGINTs pending at once would merge into one: wait until the first is delivered.
    while sigint_pending(child.id()) {
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    assert!(
        !dir.join("interrupted.json").exists(),
        "the second signal did not wait for the step to end"
    );
    let kept = checkpoint_step(&dir);
    assert!((3..2000).contains(&kept), "{kept}");
    // Resumes from that checkpoint (and is stopped again, cleanly).
    let mut child = spawn(&args(true));
    wait_for_step(&mut child, &dir, kept + 2);
    signal(child.id(), "TERM");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(143), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("resumed after step {kept}")),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir_all(dir).ok();
}

/// SIGTERM to a sweep stops each running run after a checkpoint; the same command continues.
#[test]
fn a_sweep_passes_sigterm_to_its_runs_and_continues() {
    let dir = scratch("sweep-term");
    std::fs::create_dir_all(&dir).unwrap();
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            r#"base = "{}/configs/copy-lstm.toml"
[set]
"train.steps" = 3000
"train.log_every" = 5
"eval.samples" = 8
"task.lag" = 5
"model.d_model" = 16
[axes]
"run.seed" = [0, 1]
"#,
            std::env::current_dir().unwrap().display()
        ),
    )
    .unwrap();
    let out = dir.join("out");
    let args: Vec<String> = [
        "sweep",
        sweep.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["--jobs".into(), "2".into()])
    .collect();
    let mut child = spawn(&args);
    for seed in ["seed0", "seed1"] {
        wait_for_step(&mut child, &out.join(seed), 20);
    }
    signal(child.id(), "TERM");
    let result = child.wait_with_output().unwrap();
    let err = stderr(&result);
    assert_eq!(result.status.code(), Some(143), "{err}");
    assert!(err.contains("continue with:"), "{err}");
    for seed in ["seed0", "seed1"] {
        let run = out.join(seed);
        let note = json(&run.join("interrupted.json"));
        assert_eq!(note["signal"], "SIGTERM");
        assert_eq!(note["step"], checkpoint_step(&run));
        assert!(!run.join("summary.json").exists());
    }
    // Continued with a smaller budget: train.steps only budgets a run, so the runs take the
    // change (recorded in run.json) and finish.
    let text = std::fs::read_to_string(&sweep).unwrap();
    let step = checkpoint_step(&out.join("seed0")).max(checkpoint_step(&out.join("seed1")));
    std::fs::write(&sweep, text.replace("3000", &(step + 10).to_string())).unwrap();
    let again = estafet(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(again.status.success(), "{}", stderr(&again));
    for seed in ["seed0", "seed1"] {
        assert!(out.join(seed).join("summary.json").is_file());
    }
    std::fs::remove_dir_all(dir).ok();
}

/// `--resume` with more steps extends a finished run: under a constant schedule it ends exactly
/// as a run of that many steps straight through; under cosine the steps after the extension
/// follow the longer schedule. Changes to what is trained are refused, as is shortening.
#[test]
fn a_finished_run_is_extended_by_resume_with_more_steps() {
    let dir = scratch("extend");
    std::fs::create_dir_all(&dir).unwrap();
    let run = |out: &Path, steps: usize, extra: &[&str]| {
        let args = small_lstm(out, steps, extra);
        estafet(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let straight = dir.join("straight");
    assert!(run(&straight, 120, &[]).status.success());
    let extended = dir.join("extended");
    assert!(run(&extended, 100, &[]).status.success());
    let out = run(&extended, 120, &["--resume"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(figures(&straight), figures(&extended));
    let summary = json(&extended.join("summary.json"));
    assert_eq!(summary["steps"], 120);
    assert_eq!(
        summary["final_eval"],
        json(&straight.join("summary.json"))["final_eval"]
    );
    let info = json(&extended.join("run.json"));
    let record = &info["extensions"][0];
    assert_eq!(record["at_step"], 100);
    assert_eq!(record["changes"][0]["field"], "train.steps");
    assert_eq!(record["changes"][0]["was"], "100");
    assert_eq!(record["changes"][0]["now"], "120");
    assert_eq!(
        record["previous_summary"]["steps"], 100,
        "the earlier result is kept"
    );
    assert!(
        std::fs::read_to_string(extended.join("config.toml"))
            .unwrap()
            .contains("steps = 120")
    );
    // Resuming again with the same budget: nothing to do.
    let again = run(&extended, 120, &["--resume"]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to resume"));

    // What was trained cannot change; a run cannot be shortened below its checkpoint.
    let refused = run(&extended, 200, &["--resume", "--set", "optim.lr=0.5"]);
    assert_eq!(refused.status.code(), Some(2));
    let e = stderr(&refused);
    assert!(
        e.contains("different config") && e.contains("optim.lr (0.01 → 0.5)"),
        "{e}"
    );
    let refused = run(&extended, 50, &["--resume"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("extended, not shortened"),
        "{}",
        stderr(&refused)
    );

    // Cosine: the extension follows the cosine of the new total from the checkpoint on.
    let cosine = dir.join("cosine");
    let schedule = ["--set", "optim.schedule=cosine", "--set", "optim.lr=0.01"];
    assert!(run(&cosine, 100, &schedule).status.success());
    let mut extra = schedule.to_vec();
    extra.push("--resume");
    assert!(run(&cosine, 200, &extra).status.success());
    let lr_at = |step: u64| -> f64 {
        std::fs::read_to_string(cosine.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .find(|v| v["split"] == "train" && v["step"] == step)
            .unwrap()["lr"]
            .as_f64()
            .unwrap()
    };
    let cosine_lr = |step: f64, total: f64| {
        0.01 * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * step / total).cos()))
    };
    assert!(
        (lr_at(50) - cosine_lr(50.0, 100.0)).abs() < 1e-9,
        "before: the 100-step curve"
    );
    assert!((lr_at(100) - cosine_lr(100.0, 100.0)).abs() < 1e-9);
    assert!(
        (lr_at(150) - cosine_lr(150.0, 200.0)).abs() < 1e-9,
        "after: the 200-step curve"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// A loss that explodes without becoming NaN stops the run (exit 3) with a summary that says
/// so, holding the figures of the last good checkpoint (here none: the untrained model's).
#[test]
fn a_diverging_run_stops_and_says_so() {
    let dir = scratch("diverge");
    let args = small_lstm(
        &dir,
        500,
        &[
            "--set",
            "optim.lr=1e9",
            "--set",
            "train.checkpoint_every=10",
        ],
    );
    let out = estafet(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let e = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{e}");
    assert!(e.contains("training diverged at step"), "{e}");
    assert!(e.contains("no checkpoint was written before"), "{e}");
    assert_eq!(
        e.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "{e}"
    );
    let summary = json(&dir.join("summary.json"));
    assert_eq!(summary["stopped"], "diverged");
    let step = summary["diverged"]["step"].as_u64().unwrap();
    assert!(step < 100, "stopped early: step {step}");
    let kept = summary["diverged"]["checkpoint_step"].as_u64().unwrap();
    assert!(kept < step);
    assert_eq!(checkpoint_step(&dir), kept);
    let loss = summary["final_eval"]["loss"].as_f64().unwrap();
    assert!(
        loss.is_finite() && loss < 10.0,
        "the kept model's loss {loss}"
    );
    // Off, the same run trains to the end however bad its loss.
    let off = scratch("diverge-off");
    let args = small_lstm(
        &off,
        60,
        &[
            "--set",
            "optim.lr=1e9",
            "--set",
            "train.divergence_factor=0",
        ],
    );
    let out = estafet(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let summary = json(&off.join("summary.json"));
    if out.status.success() {
        assert_eq!(summary["stopped"], "steps");
    } else {
        // Only a non-finite loss stops it then.
        assert!(
            summary["diverged"]["reason"]
                .as_str()
                .unwrap()
                .contains("is NaN")
                || summary["diverged"]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("inf")
        );
    }
    std::fs::remove_dir_all(dir).ok();
    std::fs::remove_dir_all(off).ok();
}

/// CSV series: a value beyond f32, or a constant training split, is a one-line error naming
/// the file (and line); gaps are an error unless `missing` says how to treat them.
#[test]
fn hostile_csv_files_are_refused_and_gaps_can_be_filled() {
    let dir = scratch("csv");
    std::fs::create_dir_all(&dir).unwrap();
    let mut rows = String::from("t,price\n");
    for i in 0..200 {
        rows.push_str(&format!("{i},{}\n", (i as f64 * 0.3).sin() + 2.0));
    }
    let run = |name: &str, text: &str, extra: &[&str]| {
        let path = dir.join(format!("{name}.csv"));
        std::fs::write(&path, text).unwrap();
        let out = dir.join(name);
        let mut args = vec![
            "run".to_string(),
            "configs/sines-lstm.toml".into(),
            "--quiet".into(),
            "--out".into(),
            out.display().to_string(),
        ];
        for set in [
            "task.series=csv".to_string(),
            format!("task.path={}", path.display()),
            "task.column=price".into(),
            "task.seq_len=20".into(),
            "train.steps=3".into(),
            "model.d_model=8".into(),
            "eval.samples=8".into(),
        ]
        .into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        {
            args.push("--set".into());
            args.push(set);
        }
        estafet(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert!(run("good", &rows, &[]).status.success());

    let huge = rows.replace("\n7,", "\n7,1e39\n700,");
    let out = run("huge", &huge, &[]);
    assert_eq!(out.status.code(), Some(2));
    let e = stderr(&out);
    assert!(
        e.contains("huge.csv:9: 1e39 is not a finite number in f32"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "{e}");

    let mut flat = String::from("price\n");
    for i in 0..200 {
        flat.push_str(if i < 160 { "3\n" } else { "4\n" });
    }
    let out = run("flat", &flat, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("constant over its 160 training rows"),
        "{}",
        stderr(&out)
    );

    let gaps = rows.replace("\n5,", "\n5,\n500,NA\n5000,");
    let out = run("gaps", &gaps, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("gaps.csv:7: missing value"),
        "{}",
        stderr(&out)
    );
    for policy in ["skip", "forward_fill"] {
        let out = run(
            &format!("gaps-{policy}"),
            &gaps,
            &[&format!("task.missing={policy}")],
        );
        assert!(out.status.success(), "{policy}: {}", stderr(&out));
    }
    std::fs::remove_dir_all(dir).ok();
}
