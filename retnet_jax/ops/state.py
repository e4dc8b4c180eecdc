"""The recurrent state every retention form takes in and hands back.

All forms accumulate *un-normalised* sums (SPEC section 3) and apply the `1/sqrt(s_n)` normaliser
and the abs-sum clamp from each row's absolute position, so a state built by any form continues
exactly in any other.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RetentionState(NamedTuple):
    """Per-head retention memory after `position` tokens (a pytree).

    kv_bhkv:   `sum_m gamma**(n-m) k~_m^T v_m`, float32 `[B, H, dk, dv]` (float64 under x64 inputs).
    key_bhk:   `sum_m gamma**(n-m) k~_m`, same dtype `[B, H, dk]`; it reproduces the official
               parallel form's abs-sum clamp in the recurrent and chunkwise forms.
    position_b: tokens consumed so far, per sequence, int32 `[B]` (the next token's position).
    """

    kv_bhkv: jax.Array
    key_bhk: jax.Array
    position_b: jax.Array


def init_state(
    batch: int, heads: int, key_dim: int, value_dim: int, dtype=jnp.float32
) -> RetentionState:
    """An empty state: nothing retained, every sequence at position 0."""
    return RetentionState(
        kv_bhkv=jnp.zeros((batch, heads, key_dim, value_dim), dtype),
        key_bhk=jnp.zeros((batch, heads, key_dim), dtype),
        position_b=jnp.zeros((batch,), jnp.int32),
    )


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs, float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)
