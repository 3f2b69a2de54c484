//! The head sizes of the multi-head matrix-state layers (Gated DeltaNet, mLSTM): `n_heads` H,
//! `head_dim` d_k (`d_model / H` when absent) and `expand_v` (d_v = expand_v · d_k).

/// d_k: the configured `head_dim`, else `d_model / n_heads` (at least 1).
pub fn key_dim(d_model: usize, n_heads: usize, head_dim: Option<usize>) -> usize {
    head_dim.unwrap_or(d_model / n_heads.max(1)).max(1)
}

/// Every size at least 1, and heads that fit the width when `head_dim` is left to it.
pub fn validate(
    d_model: usize,
    n_heads: usize,
    head_dim: Option<usize>,
    expand_v: usize,
) -> Result<(), String> {
    let positive = [
        ("n_heads", n_heads),
        ("head_dim", head_dim.unwrap_or(1)),
        ("expand_v", expand_v),
    ];
    if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
        return Err(format!("model.mixer.{field} must be at least 1"));
    }
    if head_dim.is_none() && d_model < n_heads {
        return Err(format!(
            "model.mixer.n_heads = {n_heads} exceeds d_model = {d_model}: set head_dim"
        ));
    }
    Ok(())
}
