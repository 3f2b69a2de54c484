//! Rotary position embedding (RoFormer, Su et al. 2021) as one op, on queries or keys
//! `x [B, T, H·K]` whose first token sits at position `offset`. Each head's halves are turned
//! pairwise by the angle `p·θ_i`, `θ_i = 10000^{−2i/K}`:
//!
//! ```text
//! y_i       = x_i cos(p θ_i) − x_{i+K/2} sin(p θ_i)        i < K/2, p = offset + t
//! y_{i+K/2} = x_{i+K/2} cos(p θ_i) + x_i sin(p θ_i)
//!
//! dx_i       = dy_i cos(p θ_i) + dy_{i+K/2} sin(p θ_i)    the turn by −p θ_i
//! dx_{i+K/2} = dy_{i+K/2} cos(p θ_i) − dy_i sin(p θ_i)
//! ```
//!
//! As tensor ops (`attention::rotate`, the definition) a rotation is two slices, a negation, a
//! concatenation, two products and a sum over `[B, T, H, K]`, and the backward as many again:
//! at the research shapes they were ~6% of an attention model's training step (`perf`,
//! 2026-12-04), for arithmetic that is one pass over `x`. The angles' cosines and sines are the
//! definition's own (`attention::rope_cos_sin`), so both forms turn by the same `f32` values.

use burn::backend::Backend;
use burn::backend::tensor::FloatTensor;

use super::host::{HostKernel, copied, dims3, par_rows, read};
use crate::attention::rope_cos_sin;

/// `x [B, T, H·K]` on the host, until the forward turns it in place, and the angles' `cos` and
/// `sin` `[T, K/2]`, which the forward and the backward share.
#[derive(Debug)]
pub(super) struct Rotary {
    batch: usize,
    len: usize,
    width: usize,
    head: usize,
    x: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rotary {
    /// Turns every head of every token of `data` (`[B, T, H·K]`) by `+p θ_i` (`forward`) or by
    /// `−p θ_i`.
    fn turn(&self, data: &mut [f32], forward: bool) {
        let half = self.head / 2;
        let (cos, sin) = (&self.cos, &self.sin);
        par_rows(
            data,
            self.len * self.width,
            #[inline(always)]
            |_, sequence| {
                for (t, token) in sequence.chunks_exact_mut(self.width).enumerate() {
                    let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
                    for x in token.chunks_exact_mut(self.head) {
                        let (x1, x2) = x.split_at_mut(half);
                        turn_pairs(x1, x2, c, s, forward);
                    }
                }
            },
        );
    }
}

/// One head's halves turned pairwise. The products are summed in the definition's order
/// (`x cos + rotate_half(x) sin`), so the forward agrees with it to the last bit.
#[inline(always)]
fn turn_pairs(x1: &mut [f32], x2: &mut [f32], c: &[f32], s: &[f32], forward: bool) {
    let n = x1.len();
    let (x2, c, s) = (&mut x2[..n], &c[..n], &s[..n]);
    for i in 0..n {
        let (a, b) = (x1[i], x2[i]);
        (x1[i], x2[i]) = if forward {
            (a * c[i] + -b * s[i], b * c[i] + a * s[i])
        } else {
            (a * c[i] + b * s[i], b * c[i] - a * s[i])
        };
    }
}

impl HostKernel<1> for Rotary {
    /// The head size `K` and the first token's position.
    type Args = (usize, usize);

    fn read<B: Backend>([x]: [&FloatTensor<B>; 1], (head, offset): (usize, usize)) -> Self {
        let [batch, len, width] = dims3::<B>(x);
        assert!(
            head >= 2 && head.is_multiple_of(2) && width.is_multiple_of(head),
            "rope: heads of an even size K = {head} in D = {width}"
        );
        let (cos, sin) = rope_cos_sin(offset, len, head / 2);
        Self {
            batch,
            len,
            width,
            head,
            x: read::<B>(x.clone()),
            cos,
            sin,
        }
    }

    fn out_shape(&self) -> Vec<usize> {
        vec![self.batch, self.len, self.width]
    }

    fn input_shapes(&self) -> [Vec<usize>; 1] {
        [self.out_shape()]
    }

    /// The backward needs only the angles, so `x` is turned where it lies and handed over.
    fn forward(&mut self, _keep: bool) -> Vec<f32> {
        let mut y = std::mem::take(&mut self.x);
        self.turn(&mut y, true);
        y
    }

    fn backward(&self, d_out: &[f32]) -> [Vec<f32>; 1] {
        // On the pool: a plain copy of q's or k's gradient ran on the training thread alone.
        let mut dx = copied(d_out);
        self.turn(&mut dx, false);
        [dx]
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;

    use crate::attention::{rope_tables, rotate};
    use crate::test_support::{device, max_diff, on_every_isa, uniform};

    /// The op against the definition's tensor ops, at uneven batches and head counts, odd
    /// lengths and offsets: the output to the last bit, the gradient to rounding.
    #[test]
    fn op_matches_definition() {
        on_every_isa(|isa| {
            for (batch, len, heads, head, offset) in [
                (1, 1, 1, 2, 0),
                (3, 7, 2, 4, 5),
                (2, 33, 3, 6, 0),
                (5, 3, 1, 16, 1000),
            ] {
                let width = heads * head;
                let x = uniform([batch, len, width], -2.0, 2.0, 1);
                let r = uniform([batch, len, width], -1.0, 1.0, 2);
                let run = |fused: bool| {
                    let x = x.clone().require_grad();
                    let y: Tensor<3> = if fused {
                        super::super::rope(x.clone(), head, offset)
                    } else {
                        let (cos, sin) = rope_tables(offset, len, head, &device());
                        rotate(x.clone().reshape([batch, len, heads, head]), cos, sin)
                            .reshape([batch, len, width])
                    };
                    let grads = (y.clone() * r.clone()).sum().backward();
                    (y, x.grad(&grads).unwrap())
                };
                let ((y, dx), (y_ref, dx_ref)) = (run(true), run(false));
                let at = format!("{isa:?} B {batch}, T {len}, H {heads}, K {head}, at {offset}");
                assert_eq!(max_diff(y, y_ref), 0.0, "y at {at}");
                assert!(max_diff(dx, dx_ref) < 1e-6, "dx at {at}");
            }
        });
    }
}
