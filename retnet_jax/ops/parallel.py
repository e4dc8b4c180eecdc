"""The parallel form of retention (paper eq. 5; SPEC section 3): one `[T, T]` einsum per head."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retnet_jax.ops.causal_block import causal_block
from retnet_jax.ops.decay import causal_decay_mask, decay_powers, normalise_rows
from retnet_jax.ops.kernels import check_kernels
from retnet_jax.ops.matmul import matmul_nn, weighted_matmul_tn
from retnet_jax.ops.state import RetentionState
from retnet_jax.ops.validation import as_log_decay, check_qkv, check_state


def parallel_retention(
    q_bthk: jax.Array,
    k_bthk: jax.Array,
    v_bthv: jax.Array,
    log_decay_h: jax.Array,
    state: RetentionState | None = None,
    *,
    kernels: str = "plain",
) -> tuple[jax.Array, RetentionState]:
    """Retention of a whole block of T tokens at once, continuing from `state`.

    Args:
      q_bthk, k_bthk: rotated queries and (scaled, rotated) keys `[B, T, H, dk]`; time is axis 1.
      v_bthv: values `[B, T, H, dv]`.
      log_decay_h: `log(gamma_h)`, `[H]`.
      state: what earlier tokens left behind (None: start at position 0).
      kernels: "plain" or "xla_cpu" (`retnet_jax.ops.kernels`).

    Returns:
      `o [B, T, H, dv]` in v's dtype, and the state after the T tokens.

    Row n is `sum_m D~[n, m] (q~_n . k~_m) v_m` over this block plus `gamma**(i+1) q~_n S_prev` from
    the state, divided by `max(|row sum|, 1)` (stop-gradient), with `D~` normalised by the absolute
    position of row n. Memory is O(T**2): use `chunkwise_retention` for long sequences.
    """
    batch, length, heads, key_dim, value_dim = check_qkv(q_bthk, k_bthk, v_bthv, log_decay_h)
    kernels = check_kernels(kernels)
    state = check_state(state, batch, heads, key_dim, value_dim, v_bthv.dtype)
    log_decay_h = as_log_decay(log_decay_h, v_bthv.dtype)
    acc = log_decay_h.dtype

    # Head-major [B, H, T, d]: the einsums below are plain batched matmuls.
    q_bhnk, k_bhmk, v_bhmv = (jnp.swapaxes(x, 1, 2) for x in (q_bthk, k_bthk, v_bthv))
    mask_hnm = causal_decay_mask(length, log_decay_h)
    numerator_bhnv, row_sum_bhn = causal_block(q_bhnk, k_bhmk, v_bhmv, mask_hnm, acc, kernels=kernels)

    # What the state carries in: gamma**(n+1) q~_n S_prev for block-relative row n.
    t = jnp.arange(length)
    # (The decay scales the products' rows, not q: in float32 the backward pass then keeps q itself.)
    row_decay_hn = decay_powers(t + 1, log_decay_h).T
    q_bhnk32 = q_bhnk.astype(acc)
    numerator_bnhv = jnp.swapaxes(
        numerator_bhnv + row_decay_hn[None, :, :, None] * matmul_nn(q_bhnk32, state.kv_bhkv, acc, kernels=kernels), 1, 2)
    row_sum_bnh = jnp.swapaxes(
        row_sum_bhn + row_decay_hn[None] * jnp.einsum("bhnk,bhk->bhn", q_bhnk32, state.key_bhk), 1, 2)

    position_bt = state.position_b[:, None] + t[None, :]
    out_bnhv = normalise_rows(numerator_bnhv, row_sum_bnh, position_bt, log_decay_h)

    # Fold the block into the state: S_T = gamma**T S_0 + sum_m gamma**(T-1-m) k~_m^T v_m.
    k_weight_hm = decay_powers(length - 1 - t, log_decay_h).T
    k_bhmk32 = k_bhmk.astype(acc)
    carry_h = jnp.exp(length * log_decay_h)
    new_state = RetentionState(
        kv_bhkv=carry_h[:, None, None] * state.kv_bhkv
        + weighted_matmul_tn(k_bhmk32, k_weight_hm, v_bhmv.astype(acc), acc, kernels=kernels),
        key_bhk=carry_h[:, None] * state.key_bhk + jnp.einsum("bhmk,hm->bhk", k_bhmk32, k_weight_hm),
        position_b=state.position_b + length,
    )
    return out_bnhv.astype(v_bthv.dtype), new_state
