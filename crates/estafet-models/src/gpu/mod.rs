//! Whole recurrences as GPU kernels: CubeCL kernels for burn's `CubeBackend` (wgpu in this
//! build; the kernels are written for any CubeCL runtime), routed by burn's backend extension
//! ([`CubeOps`]). Each op is a fixed number of launches per layer, whatever `T`: the time loop
//! runs inside the kernel, and under autodiff the op is one backward node whose backward is a
//! kernel too, so nothing returns to the host.
//!
//! Built from tensor ops, a recurrence is a handful of kernel launches per time step forward
//! and again backward; on a GPU each costs microseconds of launch and synchronisation, so an
//! LSTM trained slower on an H200 than on two CPU cores (`experiments/bench/README.md`, "GPU").
//!
//! The ops are [`crate::fused`]'s: same arguments, same output, same definition (the models'
//! tensor-op forms); `fused`'s public functions send a tensor on a CubeCL device here, and
//! [`runs`] says whether an op has a kernel that fits the device at a length. Code map:
//! [`tracked`] turns a [`tracked::CubeKernel`] (forward, kept tensors, backward) into a backend
//! op; [`tensors`] the device-tensor plumbing; [`activations`] the kernels' shared functions; [`min_rnn`] (minGRU, minLSTM), [`cell`] (Elman,
//! LSTM, GRU), [`selective`] (Mamba's S6), [`wkv4`] (RWKV-4's WKV), [`wkv6`] (RWKV-6's), [`delta_rule`] (Gated
//! DeltaNet's), [`ssd`] (Mamba-2's), [`dplr`] (RWKV-7's), [`mlstm_cell`] (xLSTM's mLSTM) and
//! [`slstm_cell`] (xLSTM's sLSTM) one op each, with its equations. Each kernel is tested
//! against its definition on wgpu over lavapipe, gradients included (`tests/gpu_kernels.rs`),
//! and the launches of a training step are counted ([`count_launches`], `estafet bench`'s
//! `launches_per_step`).

mod activations;
mod cell;
mod delta_rule;
mod dplr;
mod min_rnn;
mod mlstm_cell;
mod selective;
mod slstm_cell;
mod ssd;
mod tensors;
mod tracked;
mod wkv4;
mod wkv6;

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};
use burn_cubecl::CubeBackend;

use crate::fused::{Cell, MinRnn, Op};
use crate::scan::Eigenvalues;
use tracked::{run_plain, run_tracked};

/// The CubeCL device behind `device`, if it is one.
pub fn cube_device(device: &burn::tensor::Device) -> Option<burn_cubecl::CubeDevice> {
    use burn::backend::DispatchDevice;
    match device.as_dispatch().clone().inner() {
        DispatchDevice::Cube(device) => Some(device),
        _ => None,
    }
}

/// Whether `op` over `len` steps runs as a GPU kernel on `device`: it has one, its shared
/// memory fits the device, and its loops fit the device's loop budget ([`loop_budget`]).
pub fn runs(op: Op, device: &burn::tensor::Device, len: usize) -> bool {
    let Some(device) = cube_device(device) else {
        return false;
    };
    // Loop iterations of one unit, over every loop of the op's largest kernel (its backward).
    let iterations = match op {
        Op::Cell { cell, hidden } => {
            if !cell::fits(&device, cell, hidden) {
                return false;
            }
            cell::loop_iterations(&device, cell, hidden, len)
        }
        Op::MinRnn | Op::Wkv4 => len,
        Op::SelectiveScan { n } | Op::Ssd { n } => len * (n + 1) + 2 * n,
        Op::DeltaRule { k: n } | Op::Dplr { n } => len * (3 * n + 1) + 2 * n,
        Op::MlstmCell { k } | Op::Wkv6 { k } => len * (k + 1) + 2 * k,
        Op::Slstm { d, heads } => {
            if !slstm_cell::fits(&device, d) {
                return false;
            }
            slstm_cell::loop_iterations(&device, d, heads, len)
        }
        Op::Other => return false,
    };
    loop_budget(&device).is_none_or(|budget| iterations <= budget)
}

/// The loop iterations one kernel invocation may run on `device`, where it is bounded. Mesa's
/// llvmpipe (lavapipe, the software Vulkan driver CI runs wgpu on) ends a shader's loops,
/// silently, once all of them together have run 65,535 iterations
/// (`LP_MAX_TGSI_LOOP_ITERATIONS`, "shared between every loop"): a kernel's outputs past
/// that point stay unwritten. Seen here as an LSTM backward whose first rows were never
/// written (H 300, T ≥ 29). A margin covers the loops a count above leaves out.
fn loop_budget(device: &burn_cubecl::CubeDevice) -> Option<usize> {
    let client = device.client();
    let software = client.properties().identity.name.contains("llvmpipe");
    software.then_some(60_000)
}

/// What `f` returns and the kernel launches this thread issued while it ran, on any CubeCL
/// runtime (lavapipe included): how the benchmark and the tests see that an op's launches do
/// not grow with `T`. Launches from other threads are not counted, and counts run one at a time.
pub fn count_launches<R>(f: impl FnOnce() -> R) -> (R, usize) {
    use cubecl::logging::{LaunchObservation, LaunchObserver};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Count {
        thread: std::thread::ThreadId,
        launches: AtomicUsize,
    }
    impl LaunchObserver for Count {
        fn launched(&self, _kernel: &'static str) {
            if std::thread::current().id() == self.thread {
                self.launches.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    // cubecl has one observer slot per process: concurrent counts would replace each other.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let count = Arc::new(Count {
        thread: std::thread::current().id(),
        launches: AtomicUsize::new(0),
    });
    let watching = LaunchObservation::new(count.clone());
    let result = f();
    drop(watching);
    (result, count.launches.load(Ordering::Relaxed))
}

#[backend_extension(Autodiff, Cube)]
pub trait CubeOps: Backend {
    fn min_rnn(pre: FloatTensor<Self>, h0: FloatTensor<Self>, kind: MinRnn) -> FloatTensor<Self>;

    #[allow(clippy::too_many_arguments)]
    fn cell_scan(
        x: FloatTensor<Self>,
        w_i: FloatTensor<Self>,
        b_i: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b_h: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        cell: Cell,
    ) -> FloatTensor<Self>;

    fn selective_scan(
        delta: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self>;

    #[allow(clippy::too_many_arguments)]
    fn wkv4(
        w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        p: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    fn delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        g: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    fn wkv6(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    #[allow(clippy::too_many_arguments)]
    fn ssd(
        x: FloatTensor<Self>,
        log_a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        heads: usize,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self>;

    #[allow(clippy::too_many_arguments)]
    fn dplr(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    #[allow(clippy::too_many_arguments)]
    fn mlstm_cell(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        i: FloatTensor<Self>,
        log_f: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
    ) -> FloatTensor<Self>;

    #[allow(clippy::too_many_arguments)]
    fn slstm_cell(
        wx: FloatTensor<Self>,
        r: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self>;
}

impl CubeOps for CubeBackend {
    fn min_rnn(pre: FloatTensor<Self>, h0: FloatTensor<Self>, kind: MinRnn) -> FloatTensor<Self> {
        run_plain::<min_rnn::MinScan, 2>([pre, h0], kind)
    }

    fn cell_scan(
        x: FloatTensor<Self>,
        w_i: FloatTensor<Self>,
        b_i: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b_h: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        cell: Cell,
    ) -> FloatTensor<Self> {
        run_plain::<cell::CellScan, 7>([x, w_i, b_i, w_h, b_h, h0, c0], cell)
    }

    fn selective_scan(
        delta: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self> {
        run_plain::<selective::Selective, 6>([delta, x, a, b, c, h0], eigenvalues)
    }

    fn wkv4(
        w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        p: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<wkv4::Wkv4, 7>([w, u, k, v, a, b, p], ())
    }

    fn delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        g: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<delta_rule::DeltaRule, 6>([q, k, v, beta, g, s0], ())
    }

    fn wkv6(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<wkv6::Wkv6, 6>([r, k, v, log_w, u, s0], ())
    }

    fn ssd(
        x: FloatTensor<Self>,
        log_a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        heads: usize,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self> {
        run_plain::<ssd::Ssd, 5>([x, log_a, b, c, h0], (heads, eigenvalues))
    }

    fn dplr(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<dplr::Dplr, 7>([r, k, v, log_w, a, b, s0], ())
    }

    fn mlstm_cell(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        i: FloatTensor<Self>,
        log_f: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_plain::<mlstm_cell::MlstmCell, 8>([q, k, v, i, log_f, c0, n0, m0], ())
    }

    fn slstm_cell(
        wx: FloatTensor<Self>,
        r: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        run_plain::<slstm_cell::SlstmCell, 6>([wx, r, h0, c0, n0, m0], heads)
    }
}

impl<C: CheckpointStrategy> CubeOps for Autodiff<CubeBackend, C> {
    fn min_rnn(pre: FloatTensor<Self>, h0: FloatTensor<Self>, kind: MinRnn) -> FloatTensor<Self> {
        run_tracked::<C, min_rnn::MinScan, 2>([pre, h0], kind)
    }

    fn cell_scan(
        x: FloatTensor<Self>,
        w_i: FloatTensor<Self>,
        b_i: FloatTensor<Self>,
        w_h: FloatTensor<Self>,
        b_h: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        cell: Cell,
    ) -> FloatTensor<Self> {
        run_tracked::<C, cell::CellScan, 7>([x, w_i, b_i, w_h, b_h, h0, c0], cell)
    }

    fn selective_scan(
        delta: FloatTensor<Self>,
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self> {
        run_tracked::<C, selective::Selective, 6>([delta, x, a, b, c, h0], eigenvalues)
    }

    fn wkv4(
        w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        p: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<C, wkv4::Wkv4, 7>([w, u, k, v, a, b, p], ())
    }

    fn delta_rule(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        g: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<C, delta_rule::DeltaRule, 6>([q, k, v, beta, g, s0], ())
    }

    fn wkv6(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        u: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<C, wkv6::Wkv6, 6>([r, k, v, log_w, u, s0], ())
    }

    fn ssd(
        x: FloatTensor<Self>,
        log_a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        c: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        heads: usize,
        eigenvalues: Eigenvalues,
    ) -> FloatTensor<Self> {
        run_tracked::<C, ssd::Ssd, 5>([x, log_a, b, c, h0], (heads, eigenvalues))
    }

    fn dplr(
        r: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        log_w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        s0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<C, dplr::Dplr, 7>([r, k, v, log_w, a, b, s0], ())
    }

    fn mlstm_cell(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        i: FloatTensor<Self>,
        log_f: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        run_tracked::<C, mlstm_cell::MlstmCell, 8>([q, k, v, i, log_f, c0, n0, m0], ())
    }

    fn slstm_cell(
        wx: FloatTensor<Self>,
        r: FloatTensor<Self>,
        h0: FloatTensor<Self>,
        c0: FloatTensor<Self>,
        n0: FloatTensor<Self>,
        m0: FloatTensor<Self>,
        heads: usize,
    ) -> FloatTensor<Self> {
        run_tracked::<C, slstm_cell::SlstmCell, 6>([wx, r, h0, c0, n0, m0], heads)
    }
}
