"""The chunkwise recurrent form of retention (paper eq. 7; SPEC section 3): linear in T.

T is right-padded to a multiple of the chunk size C and cut afterwards. All chunk-local work (the
intra-chunk parallel form, each chunk's summary `sum_j gamma**(L-1-j) k~_j^T v_j`, and the read-out
of the carried state) is done as a few large batched einsums over every chunk at once; a `lax.scan`
over chunks only carries the `[B, H, dk, dv]` state through cheap elementwise updates. With
`kernels="xla_cpu"` the chunks go in groups of ~`GROUP_TOKENS` tokens (a `lax.scan` over groups), so
one group's `[B, H, chunks, C, C]` scores stay in cache (experiments/PERFORMANCE.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.ops.causal_block import causal_block
from retnet_jax.ops.decay import causal_decay_mask, decay_powers, normalise_rows
from retnet_jax.ops import kernels as kernels_module
from retnet_jax.ops.kernels import check_kernels
from retnet_jax.ops.matmul import matmul_nn, weighted_matmul_tn
from retnet_jax.ops.state import RetentionState
from retnet_jax.ops.validation import as_log_decay, check_chunk_size, check_qkv, check_state


def _to_chunks(x_bhtd: jax.Array, num_chunks: int, chunk: int) -> jax.Array:
    """`[B, H, T, d]` -> `[B, H, N, C, d]`, zero-padding T up to `N * C`."""
    batch, heads, length, width = x_bhtd.shape
    x_bhtd = jnp.pad(x_bhtd, [(0, 0), (0, 0), (0, num_chunks * chunk - length), (0, 0)])
    return x_bhtd.reshape(batch, heads, num_chunks, chunk, width)


def chunkwise_retention(
    q_bthk: jax.Array,
    k_bthk: jax.Array,
    v_bthv: jax.Array,
    log_decay_h: jax.Array,
    state: RetentionState | None = None,
    *,
    chunk_size: int = 512,
    kernels: str = "plain",
) -> tuple[jax.Array, RetentionState]:
    """Retention over T tokens in chunks of `chunk_size`, continuing from `state`.

    Same arguments and results as `parallel_retention` (q, k `[B, T, H, dk]`, v `[B, T, H, dv]`,
    time on axis 1) plus `chunk_size` (any positive int; T need not be a multiple of it) and
    `kernels` ("plain" or "xla_cpu"). The forward pass holds the scores of every chunk, T * C (with
    "xla_cpu", those of one group, about `GROUP_TOKENS * C`), not O(T**2), and the
    state each chunk starts from, `(T / C) * H * dk * dv` (small chunks with wide heads trade one for
    the other); differentiating it stores O(T * C). A chunk size of at least T is the parallel form.
    """
    batch, length, heads, key_dim, value_dim = check_qkv(q_bthk, k_bthk, v_bthv, log_decay_h)
    chunk = min(check_chunk_size(chunk_size), length)
    state = check_state(state, batch, heads, key_dim, value_dim, v_bthv.dtype)
    log_decay_h = as_log_decay(log_decay_h, v_bthv.dtype)
    kernels = check_kernels(kernels)
    group = max(1, kernels_module.GROUP_TOKENS // chunk) * chunk if kernels == "xla_cpu" else length
    if length <= group:
        return _chunkwise_group(q_bthk, k_bthk, v_bthv, log_decay_h, state, chunk, kernels)

    # Whole groups in a scan (one group's scores stay in cache), then the remainder, if any.
    num_groups = length // group

    def one_group(state, qkv):
        out_bthv, state = _chunkwise_group(*qkv, log_decay_h, state, chunk, kernels)
        return state, out_bthv

    def grouped(x_btd):
        x_btd = x_btd[:, : num_groups * group]
        return jnp.moveaxis(x_btd.reshape(batch, num_groups, group, *x_btd.shape[2:]), 1, 0)

    state, out_gbthv = jax.lax.scan(one_group, state, tuple(grouped(x) for x in (q_bthk, k_bthk, v_bthv)))
    out_bthv = jnp.moveaxis(out_gbthv, 0, 1).reshape(batch, num_groups * group, heads, value_dim)
    if num_groups * group < length:
        rest = slice(num_groups * group, length)
        out_rest, state = _chunkwise_group(q_bthk[:, rest], k_bthk[:, rest], v_bthv[:, rest],
                                           log_decay_h, state, min(chunk, length - num_groups * group),
                                           kernels)
        out_bthv = jnp.concatenate([out_bthv, out_rest], axis=1)
    return out_bthv, state


def _chunkwise_group(q_bthk, k_bthk, v_bthv, log_decay_h, state, chunk, kernels):
    """`chunkwise_retention` on validated inputs, all chunks at once (batched einsums)."""
    batch, length, heads, _ = q_bthk.shape
    value_dim = v_bthv.shape[-1]
    acc = log_decay_h.dtype
    num_chunks = -(-length // chunk)
    # Valid tokens per chunk: C, ..., C, then whatever is left in the last one (static).
    valid_n = np.full((num_chunks,), chunk)
    valid_n[-1] = length - (num_chunks - 1) * chunk

    # Head-major chunks [B, H, N, C, d]: every einsum below is a plain batched matmul.
    q_bhnck, k_bhnck, v_bhncv = (
        _to_chunks(jnp.swapaxes(x, 1, 2), num_chunks, chunk) for x in (q_bthk, k_bthk, v_bthv))

    # 1. Inside each chunk: the parallel form with the un-normalised decay mask.
    mask_hij = causal_decay_mask(chunk, log_decay_h)[:, None]
    numerator_bhniv, row_sum_bhni = causal_block(q_bhnck, k_bhnck, v_bhncv, mask_hij, acc, kernels=kernels)

    # 2. Each chunk's summary, decayed to its last valid token: gamma**(L-1-j) for j < L, else 0.
    j = jnp.arange(chunk)
    exponent_nj = jnp.asarray(valid_n)[:, None] - 1 - j[None, :]
    k_weight_hnj = jnp.where(
        exponent_nj >= 0, jnp.exp(jnp.maximum(exponent_nj, 0).astype(acc) * log_decay_h[:, None, None]),
        0.0)
    # The keys are weighted inside the products, so the backward pass keeps k (in float32, the very
    # array the in-chunk product keeps; in bf16 a float32 copy, as the weighted copy was before).
    k_bhnjk = k_bhnck.astype(acc)
    chunk_kv_nbhkv = jnp.moveaxis(weighted_matmul_tn(
        k_bhnjk, k_weight_hnj, v_bhncv.astype(acc), acc, kernels=kernels), 2, 0)
    chunk_key_nbhk = jnp.einsum("bhnjk,hnj->nbhk", k_bhnjk, k_weight_hnj)
    chunk_decay_nh = jnp.exp(jnp.asarray(valid_n, acc)[:, None] * log_decay_h)

    # 3. Carry the state across chunks; emit the state each chunk starts from.
    def carry_state(carry, xs):
        kv_bhkv, key_bhk = carry
        decay_h, kv_in, key_in = xs
        new = (decay_h[:, None, None] * kv_bhkv + kv_in, decay_h[:, None] * key_bhk + key_in)
        return new, carry

    (kv_final, key_final), (kv_prev_nbhkv, key_prev_nbhk) = jax.lax.scan(
        carry_state, (state.kv_bhkv, state.key_bhk), (chunk_decay_nh, chunk_kv_nbhkv, chunk_key_nbhk))

    # 4. Read the carried state: row i of a chunk adds gamma**(i+1) q~_i S_prev. The decay scales
    # the products' rows rather than q, so the backward pass keeps q (itself in float32; in bf16 a
    # float32 copy, as the decayed copy was before), not a decayed copy beside it.
    q_bhnik = q_bhnck.astype(acc)
    row_decay_hi = decay_powers(j + 1, log_decay_h).T
    numerator_bhniv += row_decay_hi[None, :, None, :, None] * matmul_nn(
        q_bhnik, jnp.moveaxis(kv_prev_nbhkv, 0, 2), acc, kernels=kernels)
    row_sum_bhni += row_decay_hi[None, :, None, :] * jnp.einsum(
        "bhnik,bhnk->bhni", q_bhnik, jnp.moveaxis(key_prev_nbhk, 0, 2))

    numerator_bthv = jnp.swapaxes(
        numerator_bhniv.reshape(batch, heads, num_chunks * chunk, value_dim)[:, :, :length], 1, 2)
    row_sum_bth = jnp.swapaxes(row_sum_bhni.reshape(batch, heads, num_chunks * chunk)[:, :, :length], 1, 2)
    position_bt = state.position_b[:, None] + jnp.arange(length)[None, :]
    out_bthv = normalise_rows(numerator_bthv, row_sum_bth, position_bt, log_decay_h)
    new_state = RetentionState(kv_final, key_final, state.position_b + length)
    return out_bthv.astype(v_bthv.dtype), new_state
