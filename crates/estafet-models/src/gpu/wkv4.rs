//! RWKV-4's WKV on the GPU, in the official kernel's running-max form: one launch forward, one
//! backward (plus burn's sums over sequences for `w` and `u`), whatever `T`. The equations are
//! the CPU kernel's (`fused/wkv4.rs`):
//!
//! ```text
//! q = max(p, u + k_t)            y_t = (e^{p−q} a + e^{u+k_t−q} v_t) / (e^{p−q} b + e^{u+k_t−q})
//! q' = max(p − w, k_t)           a ← e^{p−w−q'} a + e^{k_t−q'} v_t,  b ← e^{p−w−q'} b + e^{k_t−q'},  p ← q'
//! ```
//!
//! One unit per channel of a sequence, its state `(a, b, p)` in registers. A tracked forward
//! writes the state before every step (`[B, T, 3, D]`); the backward walks time in reverse
//! from it, differentiating exactly these operations (each max routes its gradient to the
//! argument that won, as the definition's `max_pair` does). `dw` and `du` are sums over
//! sequences and steps: each unit sums its steps and burn sums the sequences.

use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::tensors::{dims, elementwise, empty, input, reshape};
use super::tracked::CubeKernel;

/// `w`, `u [D]`, `k`, `v [B, T, D]`, `a`, `b`, `p [B, D]` → `out [B, T·D + 3D]` (`y`, then the
/// final `a`, `b`, `p`) and, when `save`, `states [B, T, 3, D]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn forward_kernel(
    w: &Tensor<f32>,
    u: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    a0: &Tensor<f32>,
    b0: &Tensor<f32>,
    p0: &Tensor<f32>,
    out: &mut Tensor<f32>,
    states: &mut Tensor<f32>,
    #[comptime] save: bool,
) {
    let pos = ABSOLUTE_POS;
    if pos >= a0.len() {
        terminate!();
    }
    let len = k.shape(1);
    let d = k.shape(2);
    let seq = pos / d;
    let ch = pos % d;
    let width = out.shape(1);
    let wc = w[ch];
    let uc = u[ch];
    let mut a = a0[pos];
    let mut b = b0[pos];
    let mut p = p0[pos];
    for t in 0..len {
        let i = (seq * len + t) * d + ch;
        if comptime![save] {
            let s = ((seq * len + t) * 3) * d + ch;
            states[s] = a;
            states[s + d] = b;
            states[s + 2 * d] = p;
        }
        let kt = k[i];
        let vt = v[i];
        let uk = uc + kt;
        let mut q = uk;
        if p > uk {
            q = p;
        }
        let e1 = (p - q).exp();
        let e2 = (uk - q).exp();
        out[seq * width + t * d + ch] = (e1 * a + e2 * vt) / (e1 * b + e2);
        let decayed = p - wc;
        let mut q2 = kt;
        if decayed > kt {
            q2 = decayed;
        }
        let f1 = (decayed - q2).exp();
        let f2 = (kt - q2).exp();
        a = f1 * a + f2 * vt;
        b = f1 * b + f2;
        p = q2;
    }
    out[seq * width + len * d + ch] = a;
    out[seq * width + len * d + d + ch] = b;
    out[seq * width + len * d + 2 * d + ch] = p;
}

/// Given `d_out [B, T·D + 3D]`: `d_k`, `d_v [B, T, D]`, `d_a`, `d_b`, `d_p [B, D]` and the
/// per-sequence shares `d_w_parts`, `d_u_parts [B, D]`.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn backward_kernel(
    w: &Tensor<f32>,
    u: &Tensor<f32>,
    k: &Tensor<f32>,
    v: &Tensor<f32>,
    states: &Tensor<f32>,
    d_out: &Tensor<f32>,
    d_k: &mut Tensor<f32>,
    d_v: &mut Tensor<f32>,
    d_a: &mut Tensor<f32>,
    d_b: &mut Tensor<f32>,
    d_p: &mut Tensor<f32>,
    d_w_parts: &mut Tensor<f32>,
    d_u_parts: &mut Tensor<f32>,
) {
    let pos = ABSOLUTE_POS;
    if pos >= d_a.len() {
        terminate!();
    }
    let len = k.shape(1);
    let d = k.shape(2);
    let seq = pos / d;
    let ch = pos % d;
    let width = d_out.shape(1);
    let wc = w[ch];
    let uc = u[ch];
    let mut ga = d_out[seq * width + len * d + ch];
    let mut gb = d_out[seq * width + len * d + d + ch];
    let mut gp = d_out[seq * width + len * d + 2 * d + ch];
    let mut dw = 0.0f32;
    let mut du = 0.0f32;
    for r in 0..len {
        let t = len - 1 - r;
        let i = (seq * len + t) * d + ch;
        let s = ((seq * len + t) * 3) * d + ch;
        let a0 = states[s];
        let b0 = states[s + d];
        let p0 = states[s + 2 * d];
        let kt = k[i];
        let vt = v[i];
        // The step again.
        let uk = uc + kt;
        let p_won = p0 > uk;
        let mut q = uk;
        if p_won {
            q = p0;
        }
        let e1 = (p0 - q).exp();
        let e2 = (uk - q).exp();
        let den = e1 * b0 + e2;
        let y = (e1 * a0 + e2 * vt) / den;
        let decayed = p0 - wc;
        let decayed_won = decayed > kt;
        let mut q2 = kt;
        if decayed_won {
            q2 = decayed;
        }
        let f1 = (decayed - q2).exp();
        let f2 = (kt - q2).exp();
        // The state update.
        let g_f1 = ga * a0 + gb * b0;
        let g_f2 = ga * vt + gb;
        let mut n_a = ga * f1;
        let mut n_b = gb * f1;
        let mut g_v = ga * f2;
        let g_q2 = gp - g_f1 * f1 - g_f2 * f2;
        let mut g_decayed = g_f1 * f1;
        let mut g_k = g_f2 * f2;
        if decayed_won {
            g_decayed += g_q2;
        } else {
            g_k += g_q2;
        }
        let mut n_p = g_decayed;
        dw -= g_decayed;
        // The output.
        let g_y = d_out[seq * width + t * d + ch];
        let g_num = g_y / den;
        let g_den = -g_y * y / den;
        let g_e1 = g_num * a0 + g_den * b0;
        let g_e2 = g_num * vt + g_den;
        n_a += g_num * e1;
        n_b += g_den * e1;
        g_v += g_num * e2;
        let g_q = -(g_e1 * e1 + g_e2 * e2);
        n_p += g_e1 * e1;
        let mut g_uk = g_e2 * e2;
        if p_won {
            n_p += g_q;
        } else {
            g_uk += g_q;
        }
        du += g_uk;
        g_k += g_uk;
        d_k[i] = g_k;
        d_v[i] = g_v;
        ga = n_a;
        gb = n_b;
        gp = n_p;
    }
    d_a[pos] = ga;
    d_b[pos] = gb;
    d_p[pos] = gp;
    d_w_parts[pos] = dw;
    d_u_parts[pos] = du;
}

/// The inputs `[w, u, k, v]` and the states a tracked forward wrote.
#[derive(Clone, Debug)]
pub(super) struct Kept {
    inputs: [CubeTensor; 4],
    states: CubeTensor,
}

/// The op: inputs `[w, u, k, v, a, b, p]`, output `[B, T·D + 3D]`.
#[derive(Debug)]
pub(super) struct Wkv4;

impl CubeKernel<7> for Wkv4 {
    type Args = ();
    type Saved = Kept;

    fn forward(inputs: [CubeTensor; 7], (): (), keep: bool) -> (CubeTensor, Option<Kept>) {
        let [w, u, k, v, a, b, p] = inputs.map(|t| input(t, "wkv4"));
        let [batch, len, d] = dims::<3>(&k);
        assert!(len >= 1, "wkv4 needs T ≥ 1");
        assert_eq!(dims::<3>(&v), [batch, len, d], "v is [B, T, D]");
        for (name, t) in [("a", &a), ("b", &b), ("p", &p)] {
            assert_eq!(dims::<2>(t), [batch, d], "{name} is [B, D]");
        }
        let out = empty(&k, [batch, len * d + 3 * d]);
        let states = empty(
            &k,
            if keep {
                vec![batch, len, 3, d]
            } else {
                vec![1]
            },
        );
        let (cubes, dim) = elementwise(&k, batch * d);
        forward_kernel::launch(
            &k.client.clone(),
            cubes,
            dim,
            w.clone().into_tensor_arg(),
            u.clone().into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.clone().into_tensor_arg(),
            a.into_tensor_arg(),
            b.into_tensor_arg(),
            p.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            states.clone().into_tensor_arg(),
            keep,
        );
        let kept = keep.then(|| Kept {
            inputs: [w, u, k, v],
            states,
        });
        (out, kept)
    }

    fn backward(kept: Kept, (): (), d_out: CubeTensor) -> [CubeTensor; 7] {
        let Kept { inputs, states } = kept;
        let [w, u, k, v] = inputs;
        let d_out = input(d_out, "wkv4's output gradient");
        let [batch, len, d] = dims::<3>(&k);
        let new = |shape: [usize; 2]| empty(&k, shape);
        let (d_k, d_v) = (empty(&k, [batch, len, d]), empty(&k, [batch, len, d]));
        let (d_a, d_b, d_p) = (new([batch, d]), new([batch, d]), new([batch, d]));
        let (d_w_parts, d_u_parts) = (new([batch, d]), new([batch, d]));
        let (cubes, dim) = elementwise(&k, batch * d);
        backward_kernel::launch(
            &k.client.clone(),
            cubes,
            dim,
            w.into_tensor_arg(),
            u.into_tensor_arg(),
            k.clone().into_tensor_arg(),
            v.into_tensor_arg(),
            states.into_tensor_arg(),
            d_out.into_tensor_arg(),
            d_k.clone().into_tensor_arg(),
            d_v.clone().into_tensor_arg(),
            d_a.clone().into_tensor_arg(),
            d_b.clone().into_tensor_arg(),
            d_p.clone().into_tensor_arg(),
            d_w_parts.clone().into_tensor_arg(),
            d_u_parts.clone().into_tensor_arg(),
        );
        use burn::backend::ops::FloatTensorOps;
        let over_sequences = |parts| reshape(CubeBackend::float_sum_dim(parts, 0), [d]);
        [
            over_sequences(d_w_parts),
            over_sequences(d_u_parts),
            d_k,
            d_v,
            d_a,
            d_b,
            d_p,
        ]
    }
}
