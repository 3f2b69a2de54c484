//! Reading a run directory back: its resolved config, its task and the model in its latest
//! checkpoint, on any backend (checkpoints hold plain f32 tensors, so a run trained on one
//! backend evaluates on another).

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use estafet_data::Task;
use estafet_models::{Init, SequenceModel};

use crate::config::{self, ConfigSource, ExperimentConfig};
use crate::evaluate::model_io;
use crate::{Error, checkpoint};

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
        // The run's own config.toml: estafet resolved and wrote it, so its width is recorded
        // and it is only read and checked, never sized again.
        let config = config::parse(&ConfigSource::read(&config_path)?, &[])?;
        config
            .validate()
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        config
            .model
            .check_device(device)
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        let task = config
            .task
            .build()
            .map_err(|e| Error::Config(format!("{}: {e}", config_path.display())))?;
        let saved = dir.join("checkpoint");
        let step = checkpoint::read_state(&saved)?.step;
        let io = model_io(&task.info());
        let model = checkpoint::load_model(
            &saved,
            config
                .model
                .init(io, &mut Init::new(config.run.seed, device)),
        )?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            task,
            model,
            step,
        })
    }
}
