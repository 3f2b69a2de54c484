//! What every GPU kernel shares: the [`CubeKernel`] trait, which [`run_plain`] and
//! [`run_tracked`] turn into a backend op. Under autodiff the op is one backward node whose state
//! is what the forward kept — device tensors, never host copies — and whose backward launches
//! the kernel's own backward, so the gradient stays on the device.

use std::marker::PhantomData;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

/// A GPU op with `N` input tensors and one output, and its backward.
pub(super) trait CubeKernel<const N: usize>:
    Send + Sync + std::fmt::Debug + 'static
{
    /// The op's arguments that are not tensors.
    type Args: Copy + Send + Sync + std::fmt::Debug + 'static;
    /// What the backward reads besides the output's gradient (inputs, outputs, activations).
    type Saved: Clone + Send + Sync + std::fmt::Debug + 'static;
    /// The output; with `keep`, also what the backward will need.
    fn forward(
        inputs: [CubeTensor; N],
        args: Self::Args,
        keep: bool,
    ) -> (CubeTensor, Option<Self::Saved>);
    /// The gradients of the inputs given the output's.
    fn backward(saved: Self::Saved, args: Self::Args, d_out: CubeTensor) -> [CubeTensor; N];
}

/// `K` without autodiff.
pub(super) fn run_plain<K: CubeKernel<N>, const N: usize>(
    inputs: [CubeTensor; N],
    args: K::Args,
) -> CubeTensor {
    K::forward(inputs, args, false).0
}

/// `K` under autodiff: when any input is tracked, what its forward kept is the state of one
/// backward node that runs `K::backward`.
pub(super) fn run_tracked<C: CheckpointStrategy, K: CubeKernel<N>, const N: usize>(
    inputs: [FloatTensor<Autodiff<CubeBackend, C>>; N],
    args: K::Args,
) -> FloatTensor<Autodiff<CubeBackend, C>> {
    let prep = CubeBackward::<K>(PhantomData)
        .prepare::<C>(inputs.each_ref().map(|t| t.node()))
        .compute_bound()
        .stateful();
    let primitives = inputs.each_ref().map(|t| t.primitive().clone());
    let tracked = matches!(prep, OpsKind::Tracked(_));
    let (out, saved) = K::forward(primitives, args, tracked);
    match prep {
        OpsKind::Tracked(prep) => prep.finish(
            (
                saved.expect("a tracked forward keeps what its backward reads"),
                args,
            ),
            out,
        ),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct CubeBackward<K>(PhantomData<K>);

impl<K: CubeKernel<N>, const N: usize> Backward<CubeBackend, N> for CubeBackward<K> {
    type State = (K::Saved, K::Args);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<CubeBackend>(&ops.node);
        let (saved, args) = ops.state;
        let results = K::backward(saved, args, d_out);
        for (parent, grad) in ops.parents.into_iter().zip(results) {
            if let Some(node) = parent {
                grads.register::<CubeBackend>(node.id, grad);
            }
        }
    }
}
