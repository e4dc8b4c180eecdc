"""The chunkwise recurrent form of retention (paper eq. 7; SPEC section 3): linear in T.

T is right-padded to a multiple of the chunk size C and cut afterwards. All chunk-local work (the
intra-chunk parallel form, each chunk's summary `sum_j gamma**(L-1-j) k~_j^T v_j`, and the read-out
of the carried state) is done as a few large batched einsums over every chunk at once; the
`lax.scan` over chunks only carries the `[B, H, dk, dv]` state through cheap elementwise updates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.ops.decay import causal_decay_mask, decay_powers, normalise_rows
from retnet_jax.ops.state import RetentionState
from retnet_jax.ops.validation import as_log_decay, check_chunk_size, check_qkv, check_state


def _to_chunks(x_bt_, num_chunks: int, chunk: int) -> jax.Array:
    """`[B, T, ...]` -> `[B, N, C, ...]`, zero-padding T up to `N * C`."""
    pad = num_chunks * chunk - x_bt_.shape[1]
    x_bt_ = jnp.pad(x_bt_, [(0, 0), (0, pad)] + [(0, 0)] * (x_bt_.ndim - 2))
    return x_bt_.reshape(x_bt_.shape[0], num_chunks, chunk, *x_bt_.shape[2:])


def chunkwise_retention(
    q_bthk: jax.Array,
    k_bthk: jax.Array,
    v_bthv: jax.Array,
    log_decay_h: jax.Array,
    state: RetentionState | None = None,
    *,
    chunk_size: int = 512,
) -> tuple[jax.Array, RetentionState]:
    """Retention over T tokens in chunks of `chunk_size`, continuing from `state`.

    Same arguments and results as `parallel_retention` (q, k `[B, T, H, dk]`, v `[B, T, H, dv]`,
    time on axis 1) plus `chunk_size` (any positive int; T need not be a multiple of it). Memory is
    O(T * C) instead of O(T**2). A chunk size at least T is the parallel form.
    """
    batch, length, heads, key_dim, value_dim = check_qkv(q_bthk, k_bthk, v_bthv, log_decay_h)
    chunk = min(check_chunk_size(chunk_size), length)
    state = check_state(state, batch, heads, key_dim, value_dim, v_bthv.dtype)
    log_decay_h = as_log_decay(log_decay_h, v_bthv.dtype)
    acc = log_decay_h.dtype
    num_chunks = -(-length // chunk)
    # Valid tokens per chunk: C, ..., C, then whatever is left in the last one (static).
    valid_n = np.full((num_chunks,), chunk)
    valid_n[-1] = length - (num_chunks - 1) * chunk

    q_bnchk, k_bnchk, v_bnchv = (_to_chunks(x, num_chunks, chunk) for x in (q_bthk, k_bthk, v_bthv))

    # 1. Inside each chunk: the parallel form with the un-normalised decay mask.
    mask_hij = causal_decay_mask(chunk, log_decay_h)
    scores_bnhij = jnp.einsum(
        "bnihk,bnjhk->bnhij", q_bnchk, k_bnchk, preferred_element_type=acc) * mask_hij
    numerator_bnihv = jnp.einsum(
        "bnhij,bnjhv->bnihv", scores_bnhij.astype(v_bthv.dtype), v_bnchv, preferred_element_type=acc)
    row_sum_bnih = jnp.swapaxes(scores_bnhij.sum(-1), 2, 3)

    # 2. Each chunk's summary, decayed to its last valid token: gamma**(L-1-j) for j < L, else 0.
    j = jnp.arange(chunk)
    exponent_nj = jnp.asarray(valid_n)[:, None] - 1 - j[None, :]
    k_weight_njh = jnp.where(
        (exponent_nj >= 0)[..., None],
        jnp.exp(jnp.maximum(exponent_nj, 0).astype(acc)[..., None] * log_decay_h),
        0.0,
    )
    k_decayed_bnjhk = k_bnchk.astype(acc) * k_weight_njh[None, ..., None]
    chunk_kv_bnhkv = jnp.einsum("bnjhk,bnjhv->bnhkv", k_decayed_bnjhk, v_bnchv.astype(acc))
    chunk_key_bnhk = k_decayed_bnjhk.sum(2)
    chunk_decay_nh = jnp.exp(jnp.asarray(valid_n, acc)[:, None] * log_decay_h)

    # 3. Carry the state across chunks; emit the state each chunk starts from.
    def carry_state(carry, xs):
        kv_bhkv, key_bhk = carry
        decay_h, kv_in, key_in = xs
        new = (decay_h[:, None, None] * kv_bhkv + kv_in, decay_h[:, None] * key_bhk + key_in)
        return new, carry

    (kv_final, key_final), (kv_prev_nbhkv, key_prev_nbhk) = jax.lax.scan(
        carry_state,
        (state.kv_bhkv, state.key_bhk),
        (chunk_decay_nh, jnp.moveaxis(chunk_kv_bnhkv, 1, 0), jnp.moveaxis(chunk_key_bnhk, 1, 0)),
    )

    # 4. Read the carried state: row i of a chunk adds gamma**(i+1) q~_i S_prev.
    q_decayed_bnihk = q_bnchk.astype(acc) * decay_powers(j + 1, log_decay_h)[None, None, :, :, None]
    numerator_bnihv += jnp.einsum("bnihk,nbhkv->bnihv", q_decayed_bnihk, kv_prev_nbhkv)
    row_sum_bnih += jnp.einsum("bnihk,nbhk->bnih", q_decayed_bnihk, key_prev_nbhk)

    numerator_bthv = numerator_bnihv.reshape(batch, num_chunks * chunk, heads, value_dim)[:, :length]
    row_sum_bth = row_sum_bnih.reshape(batch, num_chunks * chunk, heads)[:, :length]
    position_bt = state.position_b[:, None] + jnp.arange(length)[None, :]
    out_bthv = normalise_rows(numerator_bthv, row_sum_bth, position_bt, log_decay_h)
    new_state = RetentionState(kv_final, key_final, state.position_b + length)
    return out_bthv.astype(v_bthv.dtype), new_state
