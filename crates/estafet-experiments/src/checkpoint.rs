//! The checkpoint format, written and read here alone:
//!
//! ```text
//! RUN_DIR/checkpoint/
//!   model.bpk       the model's record (burn's bytes; plain f32 tensors, any backend reads it)
//!   optimizer.bpk   AdamW's moments
//!   state.json      [`State`]: the step, the training time, the divergence check's figures
//!   carried.safetensors   with `train.carry_state`: the state the next window starts from,
//!                   every tensor of every layer in order (`0`, `1`, …)
//! ```
//!
//! A checkpoint is swapped in whole: its files go into a fresh sibling directory, which is then
//! renamed over the old one, so a crash leaves either the previous checkpoint or the new one.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use estafet_models::torch::HostTensor;
use estafet_models::{ModelState, SequenceModel};
use serde::{Deserialize, Serialize};

use crate::divergence::DivergenceWatch;
use crate::run_dir::{RunDir, write_atomic};
use crate::{Error, float_tensors};

/// `checkpoint/state.json`: where the run stands. The data stream needs nothing more: batch
/// `k` is a function of `(seed, k)` (with `train.carry_state`, window `k` of the streams, and
/// the carried state is saved beside it).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub step: usize,
    pub train_seconds: f64,
    /// The loss at step 1 (the untrained model's), the divergence check's reference.
    #[serde(default)]
    pub initial_loss: Option<f64>,
    #[serde(default)]
    pub watch: DivergenceWatch,
}

/// Writes the checkpoint of `model`, `optimizer`, `state` and the `carried` state into `dir`,
/// replacing the last.
pub fn write(
    dir: &RunDir,
    model: &SequenceModel,
    optimizer: &ModuleOptimizer,
    state: &State,
    carried: Option<&ModelState>,
) -> Result<(), Error> {
    let model_bytes = model
        .clone()
        .into_record()
        .into_bytes()
        .context("cannot serialise the model")?;
    let optim_bytes = optimizer
        .into_bytes()
        .context("cannot serialise the optimizer")?;
    let state =
        serde_json::to_vec_pretty(state).context("cannot serialise the checkpoint state")?;
    let carried = carried.map(carried_bytes).transpose()?;
    let mut files: Vec<(&str, &[u8])> = vec![
        ("model.bpk", &model_bytes),
        ("optimizer.bpk", &optim_bytes),
        ("state.json", &state),
    ];
    if let Some(bytes) = &carried {
        files.push((CARRIED, bytes));
    }
    replace(dir.path(), &files)?;
    Ok(())
}

const CARRIED: &str = "carried.safetensors";

fn carried_bytes(state: &ModelState) -> anyhow::Result<Vec<u8>> {
    let tensors: Vec<(String, HostTensor)> = state
        .to_host()
        .into_iter()
        .enumerate()
        .map(|(i, t)| (i.to_string(), t))
        .collect();
    float_tensors::to_bytes(&tensors, None)
}

/// The carried state the checkpoint holds, tensor by tensor, if it holds one.
pub fn read_carried(checkpoint: &Path) -> Result<Option<Vec<HostTensor>>, Error> {
    let path = checkpoint.join(CARRIED);
    if !path.is_file() {
        return Ok(None);
    }
    let corrupt = |e: String| Error::Config(format!("{}: {e}", path.display()));
    let bytes = fs::read(&path).map_err(|e| corrupt(e.to_string()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| corrupt(e.to_string()))?;
    (0..file.len())
        .map(|i| {
            float_tensors::read(&file, &i.to_string())
                .ok_or_else(|| corrupt(format!("no float32 tensor `{i}`")))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// Replaces the checkpoint directory of the run in `root` with `files` as one atomic step.
fn replace(root: &Path, files: &[(&str, &[u8])]) -> anyhow::Result<()> {
    let staging = root.join(".checkpoint.tmp");
    let old = root.join(".checkpoint.old");
    let target = root.join("checkpoint");
    for stale in [&staging, &old] {
        if stale.exists() {
            fs::remove_dir_all(stale)
                .with_context(|| format!("cannot remove {}", stale.display()))?;
        }
    }
    fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    for (name, bytes) in files {
        write_atomic(&staging.join(name), bytes)?;
    }
    // rename(2) cannot replace a non-empty directory: move the old one aside first. If we
    // die between the two renames, `.checkpoint.old` still holds the previous checkpoint.
    if target.exists() {
        fs::rename(&target, &old).context("cannot move the previous checkpoint aside")?;
    }
    fs::rename(&staging, &target).context("cannot install the new checkpoint")?;
    if old.exists() {
        fs::remove_dir_all(&old).ok();
    }
    Ok(())
}

/// The directory of the latest complete checkpoint of the run in `root`, if any. A crash
/// between the two renames of [`replace`] leaves the previous checkpoint in `.checkpoint.old`;
/// it is put back.
pub fn recover(root: &Path) -> anyhow::Result<Option<PathBuf>> {
    let target = root.join("checkpoint");
    let old = root.join(".checkpoint.old");
    if !target.exists() && old.exists() {
        fs::rename(&old, &target).context("cannot restore the previous checkpoint")?;
    }
    Ok(target.join("state.json").is_file().then_some(target))
}

/// The checkpoint's `state.json`.
pub fn read_state(checkpoint: &Path) -> Result<State, Error> {
    let path = checkpoint.join("state.json");
    std::fs::read(&path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: missing or corrupt checkpoint state",
                path.display()
            ))
        })
}

/// `model` (built from the run's config) with the checkpoint's weights.
pub fn load_model(checkpoint: &Path, model: SequenceModel) -> Result<SequenceModel, Error> {
    model
        .try_load_file(checkpoint.join("model.bpk"))
        .map_err(|e| load_error(checkpoint, "model.bpk", e))
}

/// `optimizer` with the checkpoint's moments.
pub fn load_optimizer(
    checkpoint: &Path,
    optimizer: ModuleOptimizer,
) -> Result<ModuleOptimizer, Error> {
    optimizer
        .load(checkpoint.join("optimizer.bpk"))
        .map_err(|e| load_error(checkpoint, "optimizer.bpk", e))
}

fn load_error(checkpoint: &Path, file: &str, e: impl std::fmt::Display) -> Error {
    Error::Config(format!(
        "{}: cannot load: {}",
        checkpoint.join(file).display(),
        e.to_string().replace('\n', " ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_replace_each_other_whole() {
        let root = std::env::temp_dir().join(format!("estafet-ckpt-{}", std::process::id()));
        fs::remove_dir_all(&root).ok();
        RunDir::create(&root).unwrap();
        replace(&root, &[("a", b"1"), ("b", b"1")]).unwrap();
        replace(&root, &[("a", b"2")]).unwrap();
        let names: Vec<_> = fs::read_dir(root.join("checkpoint"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["a"]);
        assert_eq!(fs::read(root.join("checkpoint/a")).unwrap(), b"2");
        assert!(!root.join(".checkpoint.tmp").exists() && !root.join(".checkpoint.old").exists());
        // A crash between the two renames leaves `.checkpoint.old`, which recovery puts back.
        fs::rename(root.join("checkpoint"), root.join(".checkpoint.old")).unwrap();
        fs::write(root.join(".checkpoint.old/state.json"), b"{}").unwrap();
        assert_eq!(recover(&root).unwrap(), Some(root.join("checkpoint")));
        fs::remove_dir_all(root).ok();
    }
}
