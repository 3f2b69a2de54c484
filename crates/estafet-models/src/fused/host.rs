//! What every host kernel shares: the [`HostKernel`] trait, which [`run_plain`] and
//! [`run_tracked`] turn into a backend op (under autodiff, one backward node whose state is the
//! kernel itself), tensor I/O between a CPU backend and `Vec<f32>`, a strided GEMM, and the
//! cutting of a batch into per-thread blocks.

use std::sync::Arc;

use burn::backend::Backend;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{Device, FloatTensor};
use burn::tensor::TensorData;

/// A host kernel with `N` input tensors and one output, and its backward: what
/// [`run_plain`] and [`run_tracked`] turn into a backend op.
pub(super) trait HostKernel<const N: usize>:
    Sized + Send + Sync + std::fmt::Debug + 'static
{
    /// The op's arguments that are not tensors.
    type Args;
    /// Reads the inputs to the host (checking their shapes).
    fn read<B: Backend>(inputs: [&FloatTensor<B>; N], args: Self::Args) -> Self;
    fn out_shape(&self) -> Vec<usize>;
    fn input_shapes(&self) -> [Vec<usize>; N];
    /// The output; with `keep`, the kernel also keeps what its backward needs beyond the inputs.
    fn forward(&mut self, keep: bool) -> Vec<f32>;
    /// The gradients of the inputs given the output's.
    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; N];
}

/// `K` on a CPU backend without autodiff.
pub(super) fn run_plain<B: Backend, K: HostKernel<N>, const N: usize>(
    inputs: [FloatTensor<B>; N],
    args: K::Args,
) -> FloatTensor<B> {
    let device = inputs[0].device();
    let mut kernel = K::read::<B>(inputs.each_ref(), args);
    let out = kernel.forward(false);
    super::pool::keep_warm();
    write::<B>(out, kernel.out_shape(), &device)
}

/// `K` under autodiff: when any input is tracked, the kernel (its host-side inputs and what
/// its forward kept) is the state of one backward node that runs `K::backward`.
pub(super) fn run_tracked<B: Backend, C: CheckpointStrategy, K: HostKernel<N>, const N: usize>(
    inputs: [FloatTensor<Autodiff<B, C>>; N],
    args: K::Args,
) -> FloatTensor<Autodiff<B, C>> {
    let prep = HostBackward::<K>(std::marker::PhantomData)
        .prepare::<C>(inputs.each_ref().map(|t| t.node()))
        .compute_bound()
        .stateful();
    let device = inputs[0].primitive().device();
    let mut kernel = K::read::<B>(inputs.each_ref().map(|t| t.primitive()), args);
    let tracked = matches!(prep, OpsKind::Tracked(_));
    let out = kernel.forward(tracked);
    super::pool::keep_warm();
    let out = write::<B>(out, kernel.out_shape(), &device);
    match prep {
        OpsKind::Tracked(prep) => prep.finish((Arc::new(kernel), device), out),
        OpsKind::UnTracked(prep) => prep.finish(out),
    }
}

#[derive(Debug)]
struct HostBackward<K>(std::marker::PhantomData<K>);

impl<B: Backend, K: HostKernel<N>, const N: usize> Backward<B, N> for HostBackward<K> {
    type State = (Arc<K>, Device<B>);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = read::<B>(grads.consume::<B>(&ops.node));
        let (kernel, device) = &ops.state;
        let results = kernel.backward(&d_out);
        super::pool::keep_warm();
        let results = results.into_iter().zip(kernel.input_shapes());
        for (parent, (values, shape)) in ops.parents.into_iter().zip(results) {
            if let Some(node) = parent {
                grads.register::<B>(node.id, write::<B>(values, shape, device));
            }
        }
    }
}

pub(super) fn dims3<B: Backend>(t: &FloatTensor<B>) -> [usize; 3] {
    let shape = t.shape();
    let dims: &[usize] = shape.as_slice();
    dims.try_into().expect("a [B, T, ·] tensor")
}

/// A CPU backend's tensor as host `f32`s. Their reads complete immediately.
pub(super) fn read<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    #[cfg(feature = "ndarray")]
    if let Some(values) = ndarray_values(&t) {
        return values.to_vec();
    }
    #[cfg(feature = "flex")]
    if let Some(values) = flex_values(&t) {
        return copied(values);
    }
    read_through_data::<B>(t)
}

/// `f` of a CPU backend's tensor as host `f32`s: borrowed where the tensor is one contiguous
/// `f32` block, so a kernel that needs only part of it copies only that part.
pub(super) fn with_values<B: Backend, R>(t: FloatTensor<B>, f: impl FnOnce(&[f32]) -> R) -> R {
    #[cfg(feature = "ndarray")]
    if let Some(values) = ndarray_values(&t) {
        return f(values);
    }
    #[cfg(feature = "flex")]
    if let Some(values) = flex_values(&t) {
        return f(values);
    }
    f(&read_through_data::<B>(t))
}

/// burn's own read, for what is neither contiguous `f32` ndarray nor flex.
fn read_through_data<B: Backend>(t: FloatTensor<B>) -> Vec<f32> {
    let future = B::float_into_data(t);
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match future.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(data) => data
            .expect("reading a CPU tensor")
            .convert::<f32>()
            .try_into_vec::<f32>()
            .expect("f32 data"),
        std::task::Poll::Pending => panic!("the fused host kernels run on CPU backends only"),
    }
}

/// burn-ndarray hands out a tensor that is shared (a kernel's input always is: the autodiff
/// graph holds it too) by copying it one element at a time through dynamic-rank indices, which
/// took a quarter of a small Mamba's training step; a contiguous `f32` tensor is one block.
#[cfg(feature = "ndarray")]
fn ndarray_values(t: &dyn std::any::Any) -> Option<&[f32]> {
    use burn::backend::ndarray::NdArrayTensor;
    match t.downcast_ref::<NdArrayTensor>()? {
        NdArrayTensor::F32(storage) => storage.view().to_slice(),
        _ => None,
    }
}

/// burn-flex hands out a shared tensor (a kernel's input always is) by copying its bytes and
/// then, to align them as `f32`s, copying them again, both on the calling thread while the
/// pool waits: at the research shapes a third of what the main thread did between the kernels
/// (`perf`, 2026-12-04). A contiguous `f32` tensor is one block, copied on every thread.
#[cfg(feature = "flex")]
fn flex_values(t: &dyn std::any::Any) -> Option<&[f32]> {
    let t = t.downcast_ref::<burn_flex::FlexTensor>()?;
    if t.dtype() != burn::tensor::DType::F32 {
        return None;
    }
    let (start, end) = t.layout().contiguous_offsets()?;
    Some(&t.storage::<f32>()[start..end])
}

/// Below this many floats a buffer is filled on the calling thread.
const PAR_MIN: usize = 1 << 17;

/// A vector of `n` floats whose chunks of `chunk` (the last one shorter) are written by
/// `fill(index, chunk)`, on rayon's pool once `n` is long enough to pay. The kernels' buffers
/// are filled this way because the allocator hands them back dirty (mimalloc keeps freed
/// memory, `main.rs`), so `vec![0.0; n]` or a copy would run on the calling thread while the
/// pool waits: at the research shapes `memset` was the main thread's largest entry (`perf`,
/// 2026-12-04).
///
/// `fill` must write every element of its chunk.
pub(super) fn filled(
    n: usize,
    chunk: usize,
    fill: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = Vec::with_capacity(n);
    let spare = &mut out.spare_capacity_mut()[..n];
    if n >= PAR_MIN {
        spare
            .par_chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(i, c)| fill(i, c));
    } else {
        spare
            .chunks_mut(chunk.max(1))
            .enumerate()
            .for_each(|(i, c)| fill(i, c));
    }
    // SAFETY: the chunks cover the first `n` elements and `fill` wrote each of them.
    unsafe { out.set_len(n) };
    out
}

/// Chunk of [`zeros`] and [`copied`].
const FILL_CHUNK: usize = 1 << 16;

/// `n` zeros.
pub(super) fn zeros(n: usize) -> Vec<f32> {
    filled(n, FILL_CHUNK, |_, c| {
        c.fill(std::mem::MaybeUninit::new(0.0))
    })
}

/// `src` in a new vector.
pub(super) fn copied(src: &[f32]) -> Vec<f32> {
    filled(src.len(), FILL_CHUNK, |i, c| {
        for (d, s) in c.iter_mut().zip(&src[i * FILL_CHUNK..]) {
            d.write(*s);
        }
    })
}

/// `rows` copies of `row`, one after another (a bias broadcast over the rows).
pub(super) fn filled_rows(row: &[f32], rows: usize) -> Vec<f32> {
    let width = row.len().max(1);
    // Whole rows per chunk, so that every chunk starts at a row's first element.
    filled(
        rows * row.len(),
        FILL_CHUNK.div_ceil(width) * width,
        |_, c| {
            for (d, s) in c.iter_mut().zip(row.iter().cycle()) {
                d.write(*s);
            }
        },
    )
}

pub(super) fn write<B: Backend>(
    values: Vec<f32>,
    shape: Vec<usize>,
    device: &Device<B>,
) -> FloatTensor<B> {
    B::float_from_data(TensorData::new(values, shape), device)
}

/// `dst [m, n] (= dst +) lhs [m, k] · rhs [k, n]`; each operand given by its pointer and its row
/// and column strides in elements, so transposes and rows inside `[B, T, ·]` need no copy.
///
/// # Safety
/// Every pointer must cover its operand under its strides; `dst` must not overlap the others.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract; gemm reads and writes only inside the strided operands.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Rows of the reduction per partial product in [`matmul_sum_k`]. A constant, not a function of
/// the thread count, so the order of the sum (and the gradients' last bits) is the same on
/// every machine.
const K_CHUNK: usize = 2048;

/// `dst [m, n] = lhs [m, k] · rhs [k, n]` for a long reduction, the weight gradients' sum over
/// all `B·T` rows: `k` is cut into chunks of [`K_CHUNK`] whose products run on rayon's pool and
/// are then added in chunk order. gemm parallelises over `m` and `n` only, and at a `[64, 256]`
/// weight gradient its two threads ran slower than one (43–61 against 64–69 GFLOP/s on the
/// bench machine; this split 79–102).
///
/// # Safety
/// As [`matmul`]: both operands covered under their strides; `dst` holds `m · n` floats.
pub(super) unsafe fn matmul_sum_k(
    [m, n, k]: [usize; 3],
    dst: &mut [f32],
    (lhs, lhs_rs, lhs_cs): (*const f32, usize, usize),
    (rhs, rhs_rs, rhs_cs): (*const f32, usize, usize),
) {
    use rayon::prelude::*;
    /// The operands' base pointers, shared read-only by the chunks.
    #[derive(Clone, Copy)]
    struct Operands(*const f32, *const f32);
    // SAFETY: the chunks only read through these pointers, and the caller keeps both alive.
    unsafe impl Send for Operands {}
    unsafe impl Sync for Operands {}
    impl Operands {
        // A method, so that closures capture the whole `Send` struct, not its raw fields.
        fn get(self) -> (*const f32, *const f32) {
            (self.0, self.1)
        }
    }
    let dst = &mut dst[..m * n];
    let chunks = k.div_ceil(K_CHUNK).max(1);
    let operands = Operands(lhs, rhs);
    let product = move |c: usize, out: &mut [f32]| {
        let (lhs, rhs) = operands.get();
        let (k0, kc) = (c * K_CHUNK, K_CHUNK.min(k - c * K_CHUNK));
        // SAFETY: rows k0..k0 + kc of the reduction lie inside both operands (the caller's
        // contract); `out` is a private `m · n` buffer.
        unsafe {
            matmul(
                [m, n, kc],
                out.as_mut_ptr(),
                n,
                false,
                (lhs.add(k0 * lhs_cs), lhs_rs, lhs_cs),
                (rhs.add(k0 * rhs_rs), rhs_rs, rhs_cs),
                gemm::Parallelism::None,
            )
        }
    };
    if chunks == 1 {
        if k == 0 {
            dst.fill(0.0);
        } else {
            product(0, dst);
        }
        return;
    }
    let mut partials = vec![0.0f32; chunks * m * n];
    partials
        .par_chunks_mut(m * n)
        .enumerate()
        .for_each(|(c, out)| product(c, out));
    dst.copy_from_slice(&column_sums(&partials, m * n));
}

/// Rows per partial sum in [`column_sums`]; a constant, as [`K_CHUNK`], so that the order of the
/// sum does not depend on the thread count.
const SUM_ROWS: usize = 512;

/// The sum of the rows of `m [rows, width]`: partial sums of [`SUM_ROWS`] rows on rayon's pool,
/// added in order. A bias gradient over all `B·T` rows is 0.5–4M floats at the research shapes;
/// summed on the calling thread it held the pool idle for milliseconds per layer (`perf`,
/// 2026-12-04).
pub(super) fn column_sums(m: &[f32], width: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let mut sums = vec![0.0f32; width];
    if width == 0 {
        return sums;
    }
    let partials: Vec<Vec<f32>> = m
        .par_chunks(SUM_ROWS * width)
        .map(|rows| {
            let mut partial = vec![0.0f32; width];
            for row in rows.chunks_exact(width) {
                partial.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            partial
        })
        .collect();
    for partial in &partials {
        sums.iter_mut().zip(partial).for_each(|(s, v)| *s += v);
    }
    sums
}

/// The rate of one `n × n × n` f32 GEMM through [`matmul`] on rayon's pool, GFLOP/s: the best
/// of `repeats` timed calls after one untimed call. What "the machine's limit" means for the
/// benchmark's efficiency figure.
pub(super) fn gemm_gflops(n: usize, repeats: usize) -> f64 {
    let (a, b) = (vec![1.0f32; n * n], vec![0.5f32; n * n]);
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::INFINITY;
    for i in 0..=repeats {
        let started = std::time::Instant::now();
        // SAFETY: `a`, `b` and `c` are `n × n` row-major and `c` is distinct from both.
        unsafe {
            matmul(
                [n, n, n],
                c.as_mut_ptr(),
                n,
                false,
                (a.as_ptr(), n, 1),
                (b.as_ptr(), n, 1),
                gemm::Parallelism::Rayon(0),
            )
        };
        if i > 0 {
            best = best.min(started.elapsed().as_secs_f64());
        }
    }
    assert_eq!(c[0], 0.5 * n as f32, "the GEMM computed what it was given");
    2.0 * (n * n * n) as f64 / best / 1e9
}

/// Sequences per block: the batch is cut into one contiguous block of sequences per rayon
/// thread. Sequences are independent, so each block runs the whole time loop alone with
/// single-threaded GEMMs, with no synchronisation per step.
pub(super) fn block_rows(batch: usize) -> usize {
    batch.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// `data` cut into blocks of `rows` sequences of `width` floats (an empty `data` gives empty
/// blocks, one per block of the batch).
pub(super) fn blocks(data: &mut [f32], batch: usize, rows: usize, width: usize) -> Vec<&mut [f32]> {
    if data.is_empty() {
        return (0..batch.div_ceil(rows))
            .map(|_| Default::default())
            .collect();
    }
    data.chunks_mut(rows * width).collect()
}

/// One section (`offset..offset + len`) of every sequence's `per`-float block of per-sequence
/// gradients, which the kernels' backwards write in parallel.
pub(super) struct Sections<'a> {
    pub(super) parts: &'a [f32],
    pub(super) per: usize,
    pub(super) offset: usize,
    pub(super) len: usize,
}

impl Sections<'_> {
    /// The section of every sequence, in batch order: a per-sequence input's gradient.
    pub(super) fn gather(&self) -> Vec<f32> {
        let sequences = self.parts.len() / self.per.max(1);
        filled(sequences * self.len, self.len, |n, out| {
            let part = &self.parts[n * self.per + self.offset..][..self.len];
            for (d, s) in out.iter_mut().zip(part) {
                d.write(*s);
            }
        })
    }

    /// The section summed over sequences: a shared parameter's gradient.
    pub(super) fn sum(&self) -> Vec<f32> {
        let mut total = vec![0.0f32; self.len];
        for part in self.parts.chunks_exact(self.per) {
            let part = &part[self.offset..][..self.len];
            total.iter_mut().zip(part).for_each(|(s, v)| *s += v);
        }
        total
    }
}

/// Calls `f(i, row)` for each `width`-long row of `data`, rows in parallel on rayon's pool.
pub(super) fn par_rows(data: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    data.par_chunks_mut(width).enumerate().for_each(|(i, row)| {
        super::math::vectorised(
            #[inline(always)]
            || f(i, row),
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The buffers filled on the pool (above [`PAR_MIN`], in uneven chunks) hold what they
    /// should, also where the allocator hands back memory that held something else.
    #[test]
    fn pool_filled_buffers_hold_their_values() {
        let n = 2 * PAR_MIN + 3;
        drop(vec![7.0f32; n]);
        assert!(zeros(n).iter().all(|&v| v == 0.0));
        let src: Vec<f32> = (0..n).map(|i| i as f32).collect();
        assert_eq!(copied(&src), src);
        let (per, offset, len) = (1001, 5, 996);
        let parts: Vec<f32> = (0..(PAR_MIN / len + 1) * per).map(|i| i as f32).collect();
        let gathered = Sections {
            parts: &parts,
            per,
            offset,
            len,
        }
        .gather();
        let want: Vec<f32> = parts
            .chunks_exact(per)
            .flat_map(|p| p[offset..][..len].to_vec())
            .collect();
        assert!(gathered.len() >= PAR_MIN && gathered == want);
    }

    /// A row repeated over more floats than one fill chunk, at a width that does not divide it.
    #[test]
    fn filled_rows_repeat_the_row() {
        let row: Vec<f32> = (0..37).map(|i| i as f32 - 5.0).collect();
        let rows = 2 * PAR_MIN / 37 + 3;
        drop(vec![7.0f32; rows * 37]);
        let got = filled_rows(&row, rows);
        assert_eq!(got.len(), rows * 37);
        assert!(got.chunks_exact(37).all(|r| r == row.as_slice()));
        assert!(filled_rows(&[], 5).is_empty() && filled_rows(&row, 0).is_empty());
    }

    /// Column sums over more rows than one partial (and a ragged last partial) equal the plain
    /// sum down each column.
    #[test]
    fn column_sums_are_the_sums_down_each_column() {
        let (rows, width) = (3 * SUM_ROWS + 7, 5);
        let m: Vec<f32> = (0..rows * width)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 8.0)
            .collect();
        let got = column_sums(&m, width);
        for (j, &g) in got.iter().enumerate() {
            let want: f64 = (0..rows).map(|r| m[r * width + j] as f64).sum();
            assert!((g as f64 - want).abs() < 1e-3, "column {j}: {g} vs {want}");
        }
        assert!(column_sums(&[], 3) == vec![0.0; 3] && column_sums(&[], 0).is_empty());
    }

    /// On flex, a kernel reads what the tensor holds: long enough to be copied on the pool, a
    /// contiguous view that starts inside its buffer, and a transposed view (not contiguous:
    /// read through burn's copy).
    #[cfg(feature = "flex")]
    #[test]
    fn flex_reads_what_the_tensor_holds() {
        use burn::backend::Flex;
        use burn_flex::FlexTensor;
        let (rows, cols) = (1031, 257);
        let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let t = FlexTensor::from_data(TensorData::new(values.clone(), [rows, cols]));
        assert_eq!(read::<Flex>(t.clone()), values);
        let narrowed = t.layout().narrow(0, 3, 5);
        assert_eq!(
            read::<Flex>(t.clone().with_layout(narrowed)),
            values[3 * cols..8 * cols]
        );
        let transposed = read::<Flex>(t.clone().with_layout(t.layout().transpose(0, 1)));
        assert_eq!(transposed[1], values[cols]);
        assert_eq!(transposed[rows + 2], values[2 * cols + 1]);
    }

    /// The k-split GEMM against the definition at a reduction that is not a multiple of the
    /// chunk, with transposed strides as the weight gradients use them, and bit-identical on one
    /// and on three threads.
    #[test]
    fn matmul_sum_k_is_the_product_on_any_thread_count() {
        let (m, n, k) = (5, 7, 2 * K_CHUNK + 37);
        // lhs stored [k, m] (read transposed, as h_prev [B·T, H]); rhs [k, n].
        let lhs: Vec<f32> = (0..k * m)
            .map(|i| ((i * 7919) % 23) as f32 / 23.0 - 0.5)
            .collect();
        let rhs: Vec<f32> = (0..k * n)
            .map(|i| ((i * 104729) % 19) as f32 / 19.0 - 0.5)
            .collect();
        let run = |threads: usize| {
            let mut dst = vec![f32::NAN; m * n];
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // SAFETY: lhs is [k, m] read with strides (1, m); rhs [k, n] with (n, 1).
            pool.install(|| unsafe {
                matmul_sum_k(
                    [m, n, k],
                    &mut dst,
                    (lhs.as_ptr(), 1, m),
                    (rhs.as_ptr(), n, 1),
                )
            });
            dst
        };
        let one = run(1);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|r| lhs[r * m + i] as f64 * rhs[r * n + j] as f64)
                    .sum();
                let got = one[i * n + j] as f64;
                assert!((got - want).abs() < 1e-3, "({i}, {j}): {got} vs {want}");
            }
        }
        assert_eq!(
            one,
            run(3),
            "the sum's order does not depend on the thread count"
        );
        let mut short = vec![f32::NAN; m * n];
        // SAFETY: the first 10 rows of both operands.
        unsafe {
            matmul_sum_k(
                [m, n, 10],
                &mut short,
                (lhs.as_ptr(), 1, m),
                (rhs.as_ptr(), n, 1),
            )
        };
        let want: f32 = (0..10).map(|r| lhs[r * m] * rhs[r * n]).sum();
        assert!((short[0] - want).abs() < 1e-5);
    }
}
