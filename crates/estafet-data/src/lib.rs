//! Seeded sequence tasks for estafet, independent of any model.
//!
//! A task turns a seed into an endless stream of [`Sample`]s (input and target sequences, of
//! tokens or reals, and the mask of positions the metric scores) and declares its metric, its analytic baseline and
//! the level at which it counts as solved. Sample `k` of the training stream depends only on
//! `(seed, k)`, so a run can be resumed or reproduced from the step number alone, and the
//! evaluation set is a separate stream of the same seed.

pub mod adding;
pub mod char_lm;
pub mod compression;
pub mod copy_memory;
pub mod in_context_recall;
pub mod induction_heads;
pub mod memorization;
pub mod modular_arithmetic;
pub mod mqar;
pub mod parity;
pub mod selective_copying;
pub mod stream;
mod task;
pub mod time_series;
pub mod word_problem;

pub use copy_memory::CopyMemoryConfig;
pub use task::{
    Batch, Channel, LossPositions, Metric, Readout, Sample, Seq, SeqBatch, Split, Task, TaskConfig,
    TaskError, TaskInfo, rng,
};
