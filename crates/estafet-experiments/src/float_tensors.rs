//! Named float32 tensors in safetensors files, as exports (`export.rs`) and a checkpoint's
//! carried state (`checkpoint.rs`) write and read them.

use std::collections::HashMap;

use estafet_models::torch::HostTensor;
use safetensors::{Dtype, SafeTensors};

/// `tensors` as the bytes of a safetensors file, with `metadata` in its header.
pub fn to_bytes(
    tensors: &[(String, HostTensor)],
    metadata: Option<HashMap<String, String>>,
) -> anyhow::Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, t)| t.to_le_bytes()).collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), bytes)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("cannot lay out a tensor: {e}"))?;
    safetensors::serialize(views, metadata)
        .map_err(|e| anyhow::anyhow!("cannot serialise the tensors: {e}"))
}

/// The float32 tensor `name` of `file`, if it holds one.
pub fn read(file: &SafeTensors, name: &str) -> Option<HostTensor> {
    let view = file.tensor(name).ok()?;
    (view.dtype() == Dtype::F32).then(|| HostTensor::from_le_bytes(view.shape(), view.data()))
}
