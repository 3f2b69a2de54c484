//! Sequence model definitions for estafet: recurrent cells and the stacks built from them.
//!
//! This crate holds models only: no I/O, no file formats, no command line; every function takes
//! tensors on whatever `Device` the caller chose. The places a backend is named are `fused`,
//! which says which CPU backends run its host kernels, and `gpu`, the CubeCL kernels.
//!
//! Shape legend, used in every doc comment:
//!
//! | symbol | meaning |
//! |---|---|
//! | `B` | batch size |
//! | `T` | sequence length (time steps) |
//! | `D` | model width `d_model`, the input and output width of a mixer |
//! | `H` | hidden size of a recurrent cell (`D` inside a model) |
//! | `V` | input vocabulary (token inputs) |
//! | `F` | input features (real-valued inputs) |
//! | `O` | outputs per position: classes or regression targets |
//!
//! Tensors are batch-first: a sequence is `[B, T, D]`, one step is `[B, D]`.

// Module and state enums (one per layer, moved rarely) hold tensor handles of different
// counts; boxing the larger variants would buy nothing measurable.
#![allow(clippy::large_enum_variant)]

pub mod attention;
pub mod conv;
pub mod fused;
pub mod gated_deltanet;
#[cfg(feature = "wgpu")]
pub mod gpu;
pub mod gru;
pub mod head_dims;
pub mod init;
pub mod lstm;
pub mod mamba;
pub mod mamba2;
pub mod mask;
pub mod mingru;
pub mod minlstm;
pub mod mixer;
pub mod mlstm;
pub mod model;
pub mod norm;
pub mod parallel;
pub mod projection;
pub mod reference;
pub mod rnn;
pub mod rwkv;
pub mod rwkv7;
pub mod scan;
pub mod slstm;
#[cfg(test)]
mod test_support;
pub mod time;
pub mod torch;
pub mod total;

pub use init::Init;
pub use mixer::{Mixer, MixerConfig, MixerState};
pub use model::{
    Input, InputSpec, Layout, ModelConfig, ModelIo, ModelState, Readout, SequenceModel,
};
pub use scan::Scan;
