//! Experiments for estafet: configs in; trained models, metrics, checkpoints and summaries out.
//!
//! This is the only crate that touches files and the one that chooses a backend (in
//! [`backend`]; `estafet_models::fused` names only the backends its kernels run on); models and
//! tasks stay pure. The flow of one run: [`config::load`] resolves a TOML file and `--set`
//! overrides into an [`ExperimentConfig`]; [`train::run`] builds the task and the model on the
//! chosen backend, trains, evaluates and writes a [`run_dir::RunDir`].

pub mod backend;
pub mod bench;
pub mod catalog;
pub mod config;
pub mod diagnostics;
pub mod gradflow;
pub mod infer;
pub mod plot;
pub mod report;
pub mod run_dir;
pub mod saved;
pub mod sweep;
pub mod train;
pub mod weights;

pub use backend::Backend;
pub use config::{ConfigSource, ExperimentConfig};

/// Why a command failed. Bad input is told apart from failures while running, since the
/// command line reports them with different exit statuses (2 and 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config, an override or a flag is wrong; the message names the file and field.
    #[error("{0}")]
    Config(String),
    /// Something failed while running (I/O, a non-finite loss, a backend).
    #[error("{0:#}")]
    Runtime(#[from] anyhow::Error),
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Runtime(_) => 1,
        }
    }
}
