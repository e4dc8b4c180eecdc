"""The recurrent form of retention (paper eq. 6; SPEC section 3): O(1) work and memory per token."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retnet_jax.ops.decay import normalise_rows
from retnet_jax.ops.state import RetentionState
from retnet_jax.ops.validation import as_log_decay, check_qkv, check_state


def _step(q_bhk, k_bhk, v_bhv, log_decay_h, state: RetentionState):
    """One token, inputs already validated; the loop body of `recurrent_retention`."""
    acc = log_decay_h.dtype
    gamma_h = jnp.exp(log_decay_h)
    k_bhk = k_bhk.astype(acc)
    q_bhk = q_bhk.astype(acc)
    kv_bhkv = gamma_h[:, None, None] * state.kv_bhkv + k_bhk[..., None] * v_bhv.astype(acc)[..., None, :]
    key_bhk = gamma_h[:, None] * state.key_bhk + k_bhk
    numerator_bhv = jnp.einsum("bhk,bhkv->bhv", q_bhk, kv_bhkv)
    row_sum_bh = jnp.einsum("bhk,bhk->bh", q_bhk, key_bhk)
    out_bhv = normalise_rows(
        numerator_bhv[:, None], row_sum_bh[:, None], state.position_b[:, None], log_decay_h)[:, 0]
    return out_bhv, RetentionState(kv_bhkv, key_bhk, state.position_b + 1)


def retention_step(
    q_bhk: jax.Array,
    k_bhk: jax.Array,
    v_bhv: jax.Array,
    log_decay_h: jax.Array,
    state: RetentionState | None = None,
) -> tuple[jax.Array, RetentionState]:
    """Retain one token per sequence: `S_n = gamma S_{n-1} + k~_n^T v_n`, `o_n = q~_n S_n / sqrt(s_n)`.

    Args:
      q_bhk, k_bhk: `[B, H, dk]`; v_bhv: `[B, H, dv]`; log_decay_h: `[H]`.
      state: the memory so far (None: this is position 0).

    Returns `o [B, H, dv]` (v's dtype) and the state one token later. Each sequence uses its own
    position for the normaliser, so sequences of a batch may be at different positions.
    """
    batch, _, heads, key_dim, value_dim = check_qkv(q_bhk, k_bhk, v_bhv, log_decay_h, time_axis=False)
    state = check_state(state, batch, heads, key_dim, value_dim, v_bhv.dtype)
    out_bhv, state = _step(q_bhk, k_bhk, v_bhv, as_log_decay(log_decay_h, v_bhv.dtype), state)
    return out_bhv.astype(v_bhv.dtype), state


def recurrent_retention(
    q_bthk: jax.Array,
    k_bthk: jax.Array,
    v_bthv: jax.Array,
    log_decay_h: jax.Array,
    state: RetentionState | None = None,
) -> tuple[jax.Array, RetentionState]:
    """Token-by-token retention over T steps with `jax.lax.scan` (time is axis 1).

    Same arguments and results as `parallel_retention`; the state is `[B, H, dk, dv]` whatever T is.
    """
    batch, length, heads, key_dim, value_dim = check_qkv(q_bthk, k_bthk, v_bthv, log_decay_h)
    state = check_state(state, batch, heads, key_dim, value_dim, v_bthv.dtype)
    log_decay_h = as_log_decay(log_decay_h, v_bthv.dtype)
    if length == 1:  # decoding: skip the scan
        out_bhv, state = _step(q_bthk[:, 0], k_bthk[:, 0], v_bthv[:, 0], log_decay_h, state)
        return out_bhv[:, None].astype(v_bthv.dtype), state

    def body(carry, qkv_t):
        out_bhv, carry = _step(*qkv_t, log_decay_h, carry)
        return carry, out_bhv

    time_major = tuple(jnp.swapaxes(x, 0, 1) for x in (q_bthk, k_bthk, v_bthv))
    state, out_tbhv = jax.lax.scan(body, state, time_major)
    return jnp.swapaxes(out_tbhv, 0, 1).astype(v_bthv.dtype), state
