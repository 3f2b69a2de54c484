//! rayon's global pool as the kernels use it: the training thread is one of its threads
//! ([`join_global_pool`]), and between two kernels the other threads are kept awake for a
//! moment ([`keep_warm`]).
//!
//! A training step runs many parallel regions (each kernel's forward and backward, gemm's and
//! flex's products) with burn's ops on the training thread between them. rayon puts an idle
//! worker to sleep after a few dozen rounds of looking for work, so a region often began by
//! waking it: a futex call, and on a virtual machine an interrupt to a halted
//! virtual CPU. An Elman RNN at d 64 T 256 made ~27 context switches per 13 ms step on two
//! threads (`perf stat`, 2026-12-04). OpenMP runtimes spin for the same reason before they sleep
//! (`OMP_WAIT_POLICY`, `KMP_BLOCKTIME`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

/// The thread that joined the pool in [`join_global_pool`].
static TRAINER: OnceLock<ThreadId> = OnceLock::new();
/// Workers now running [`spin`].
static WARM: AtomicUsize = AtomicUsize::new(0);
/// How long a worker keeps looking for work after the last it found: longer than burn's ops
/// between two kernels take at the research shapes, short enough that a thread of an idle
/// process gives its CPU back at once.
const WARM_FOR: Duration = Duration::from_micros(1000);

/// Makes the calling thread one of the `RAYON_NUM_THREADS` threads of rayon's global pool, so
/// that the thread that runs burn's ops between the kernels also runs the kernels' work instead
/// of handing it to a worker and sleeping until it is done. Call it first thing in the thread
/// that will train; an error if the pool was already built.
pub fn join_global_pool() -> Result<(), rayon::ThreadPoolBuildError> {
    rayon::ThreadPoolBuilder::new()
        .use_current_thread()
        .build_global()?;
    let _ = TRAINER.set(std::thread::current().id());
    Ok(())
}

/// Called by the training thread after a kernel's parallel work: every other thread of the pool
/// looks for the next work for [`WARM_FOR`] before it may sleep. Does nothing on any other thread
/// or when no thread joined the pool (tests, libraries).
pub(super) fn keep_warm() {
    if TRAINER.get() != Some(&std::thread::current().id()) {
        return;
    }
    let workers = rayon::current_num_threads().saturating_sub(1);
    while WARM
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < workers).then_some(n + 1)
        })
        .is_ok()
    {
        rayon::spawn(spin);
    }
}

/// Runs whatever work the pool holds until none has turned up for [`WARM_FOR`].
fn spin() {
    // The training thread takes jobs from the pool while it waits inside a parallel region;
    // spinning there would hold its region up.
    if TRAINER.get() != Some(&std::thread::current().id()) {
        let mut last = Instant::now();
        loop {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => last = Instant::now(),
                _ if last.elapsed() >= WARM_FOR => break,
                _ => std::hint::spin_loop(),
            }
        }
    }
    WARM.fetch_sub(1, Ordering::AcqRel);
}

/// The threads the host kernels run on: how many sequences a kernel's backward holds its
/// per-sequence buffers for at once (the memory estimate).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A spinning worker runs the pool's work and then stops, giving its count back; and off the
    /// training thread (no thread joined the global pool in a test) `keep_warm` starts nothing.
    #[test]
    fn a_warm_worker_runs_the_pools_work_and_then_stops() {
        use rayon::prelude::*;
        keep_warm();
        assert_eq!(
            WARM.load(Ordering::Acquire),
            0,
            "keep_warm off the training thread"
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        WARM.fetch_add(2, Ordering::AcqRel);
        pool.spawn(spin);
        pool.spawn(spin);
        let sum: u64 = pool.install(|| (0..100_000u64).into_par_iter().map(|i| i * 3).sum());
        assert_eq!(sum, 3 * 99_999 * 100_000 / 2);
        let start = Instant::now();
        while WARM.load(Ordering::Acquire) > 0 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the spinners never stopped"
            );
            std::thread::sleep(WARM_FOR);
        }
    }
}
