//! Reading a run directory back: its resolved config, its task and the model in its latest
//! checkpoint, on any backend (checkpoints hold plain f32 tensors, so a run trained on one
//! backend evaluates on another).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Device;
use estafet_data::Task;
use estafet_models::{Init, SequenceModel};

use crate::config::{self, ConfigSource, ExperimentConfig};
use crate::{Error, train};

/// A run as its directory holds it.
pub struct SavedRun {
    pub dir: PathBuf,
    pub config: ExperimentConfig,
    pub task: Task,
    pub model: SequenceModel,
    /// The optimisation step the checkpoint was taken at.
    pub step: usize,
}

impl SavedRun {
    /// Loads `dir`'s config and checkpointed model onto `device`. A missing or damaged file is
    /// a one-line error naming it.
    pub fn load(dir: &Path, device: &Device) -> Result<Self, Error> {
        let config_path = dir.join("config.toml");
        if !config_path.is_file() {
            return Err(Error::Config(format!(
                "{}: not a run directory (no config.toml)",
                dir.display()
            )));
        }
        let config = config::load(&ConfigSource::read(&config_path)?, &[])?;
        let task = config
            .task
            .build()
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        let checkpoint = dir.join("checkpoint");
        let step = train::read_checkpoint_state(&checkpoint)?.step;
        let model_path = checkpoint.join("model.bpk");
        let io = train::model_io(&task.info());
        let model = config
            .model
            .init(io, &mut Init::new(config.run.seed, device))
            .try_load_file(&model_path)
            .map_err(|e| {
                Error::Config(format!(
                    "{}: cannot load the checkpointed model: {}",
                    model_path.display(),
                    e.to_string().replace('\n', " ")
                ))
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            task,
            model,
            step,
        })
    }
}
