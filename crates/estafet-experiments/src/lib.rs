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
pub mod checkpoint;
pub mod config;
pub mod diagnostics;
pub mod divergence;
pub mod evaluate;
pub mod export;
pub mod float_tensors;
pub mod gradflow;
pub mod infer;
pub mod interrupt;
pub mod memory;
pub mod plot;
pub mod report;
pub mod results;
pub mod run_dir;
pub mod saved;
pub mod sizing;
pub mod sweep;
pub mod train;
pub mod weights;

pub use backend::Backend;
pub use config::{ConfigSource, ExperimentConfig};

/// Why a command did not finish normally; each kind has its own exit status, so that scripts
/// (and a sweep) can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config, an override or a flag is wrong; the message names the file and field. Exit 2.
    #[error("{0}")]
    Config(String),
    /// Something failed while running (I/O, a backend). Exit 1.
    #[error("{0:#}")]
    Runtime(anyhow::Error),
    /// The command wrote its output but left some inputs out (a report over runs of which some
    /// could not be read); the message says which. Exit 5.
    #[error("{0}")]
    Partial(String),
    /// Another process holds the run directory ([`run_dir::Busy`]); nothing was written. Exit 4.
    #[error("{0}")]
    Busy(run_dir::Busy),
    /// Training diverged (a non-finite loss, or a loss far above the task's baseline for long):
    /// the run ended with its summary written (`stopped = "diverged"`), a result rather than a
    /// crash. Exit 3.
    #[error("{0}")]
    Diverged(String),
    /// SIGINT or SIGTERM stopped the command after a checkpoint; the message says how to
    /// continue. Exit 130 or 143.
    #[error("{message}")]
    Interrupted {
        signal: interrupt::Signal,
        message: String,
    },
}

impl Error {
    /// Exit status of a training run that diverged.
    pub const DIVERGED_EXIT: i32 = 3;
    /// Exit status of a command refused because another process holds its run directory.
    pub const BUSY_EXIT: i32 = 4;
    /// Exit status of a command whose output was written without some of its inputs.
    pub const PARTIAL_EXIT: i32 = 5;

    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Config(_) => 2,
            Error::Runtime(_) => 1,
            Error::Diverged(_) => Self::DIVERGED_EXIT,
            Error::Busy(_) => Self::BUSY_EXIT,
            Error::Partial(_) => Self::PARTIAL_EXIT,
            Error::Interrupted { signal, .. } => signal.exit_code(),
        }
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        match e.downcast::<run_dir::Busy>() {
            Ok(busy) => Error::Busy(busy),
            Err(e) => Error::Runtime(e),
        }
    }
}
