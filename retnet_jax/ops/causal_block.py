"""The parallel form inside one block: `P = (q k^T) * D` (future set to 0), `P v` and `P`'s row sums.

Used for whole sequences by `parallel_retention` and for each chunk by `chunkwise_retention`. Its
backward pass can recompute `P` from q and k (one more `[C, dk] x [dk, C]` product per block)
instead of keeping it. The parallel form recomputes: its `[B, H, T, T]` scores are the bulk of its
memory (forward+backward at T=8192, B=1, 8 heads: 5.4-5.7 s against 6.3 s keeping them, in
consecutive benchmark runs on a 2-core Xeon). The
chunkwise form keeps them. Measured there (paired runs, 2-core Xeon): recomputing made the benchmark
model's training step at T=8192 ~1-2% faster and its scratch 15% smaller (3.43 -> 2.93 GB: inside the
layer scan, a group scan stores the scores twice), but T=2048 1-2% slower and the plain chunkwise
forward+backward at T=16384 ~6% slower, past the linear-scaling target. The products and their
order are those of autodiff of the plain formulas (tested against it in float64): results are the
same either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from retnet_jax.ops.decay import _causal, _sum_to_shape, apply_causal_decay
from retnet_jax.ops.matmul import _dot, _grad_dot, matmul_nn, matmul_nt


def causal_block(q_ik: jax.Array, k_jk: jax.Array, v_jv: jax.Array, decay_mask_ij: jax.Array, acc, *,
                 recompute: bool = True) -> tuple[jax.Array, jax.Array]:
    """`(P v, P.sum(-1))` with `P = where(causal, (q k^T) * D, 0)`, all over shared leading axes.

    q `[..., i, dk]`, k `[..., j, dk]`, v `[..., j, dv]` (i = j: one block), `decay_mask` broadcasting
    to `[..., i, j]`. Scores and sums in `acc`; `P` is cast to v's dtype for the product, accumulated
    in `acc`. Returns `[..., i, dv]` and `[..., i]`, both in `acc`. `recompute=False` keeps `P` for the
    backward pass instead (plain autodiff); both give the same numbers.
    """
    if not recompute:
        scores = apply_causal_decay(matmul_nt(q_ik, k_jk, acc), decay_mask_ij)
        return matmul_nn(scores.astype(v_jv.dtype), v_jv, acc), scores.sum(-1)
    dtype = jnp.result_type(q_ik, k_jk)
    return _causal_block(q_ik.astype(dtype), k_jk.astype(dtype), v_jv, decay_mask_ij, jnp.dtype(acc))


def _forward(q, k, v, mask, acc):
    scores = _dot(q, k, q.ndim - 1, k.ndim - 1, acc)  # [..., i, j]
    causal = _causal(scores)
    masked = jnp.where(causal, scores * mask, 0.0)
    numerator = _dot(masked.astype(v.dtype), v, masked.ndim - 1, v.ndim - 2, acc)
    return (numerator, masked.sum(-1)), (scores, causal)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _causal_block(q, k, v, mask, acc):
    return _forward(q, k, v, mask, acc)[0]


def _fwd(q, k, v, mask, acc):
    outs = _forward(q.value, k.value, v.value, mask.value, acc)[0]
    # Only the inputs: q, k and v are kept by the surrounding code anyway, the mask is small.
    mask_differentiated = jnp.zeros((0,), bool) if mask.perturbed else None
    return outs, (q.value, k.value, v.value, mask.value, mask_differentiated)


def _bwd(acc, residuals, cotangents):
    q, k, v, mask, mask_differentiated = residuals
    d_numerator, d_row_sum = cotangents
    batch_i = (*q.shape[:-1], v.shape[-1])
    if isinstance(d_numerator, jax.custom_derivatives.SymbolicZero):
        d_numerator = jnp.zeros(batch_i, acc)
    if isinstance(d_row_sum, jax.custom_derivatives.SymbolicZero):
        d_row_sum = jnp.zeros(q.shape[:-1], acc)
    _, (scores, causal) = _forward(q, k, v, mask, acc)
    masked = jnp.where(causal, scores * mask, 0.0)
    i_axis = masked.ndim - 2
    # numerator = masked @ v (masked cast to v's dtype): gradients as matmul_nn's backward pass.
    dv = _grad_dot(masked.astype(v.dtype), d_numerator, i_axis, i_axis, v.dtype)
    d_masked = _grad_dot(d_numerator, v, d_numerator.ndim - 1, v.ndim - 1, v.dtype).astype(acc)
    d_masked = d_masked + d_row_sum[..., None]
    d_scores = jnp.where(causal, d_masked * mask, 0.0)
    # scores = q @ k^T: gradients as matmul_nt's backward pass.
    dq = _grad_dot(d_scores, k, d_scores.ndim - 1, k.ndim - 2, q.dtype)
    dk = _grad_dot(d_scores, q, i_axis, q.ndim - 2, k.dtype)
    d_mask = None
    if mask_differentiated is not None:
        d_mask = _sum_to_shape(jnp.where(causal, d_masked * scores, 0.0), mask.shape).astype(mask.dtype)
    return dq, dk, dv, d_mask


_causal_block.defvjp(_fwd, _bwd, symbolic_zeros=True)
