"""The Transformer's key/value cache: a fixed capacity of slots, one length per sequence.

A sequence's token at position p is written to slot p, so a sequence's length is also the position
of its next token, and sequences of a batch may sit at different lengths.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class KVCache(NamedTuple):
    """One layer's keys and values (a pytree). A model's cache is the layers' stacked: every leaf
    then has a leading layer axis (`[L, B, H, C, dh]`, `[L, B]`), as `RetentionState`'s has.

    key_bhck:   rotated keys `[B, H, C, dh]` (C: capacity, in slots), in the compute dtype
                (`cfg.dtype`): what the attention multiplies, so a bf16 model caches bf16. Heads
                before slots: the attention's products read the cache as stored, with no transpose.
    value_bhck: values `[B, H, C, dh]`, same dtype.
    length_b:   int32 `[B]`: tokens each sequence has written. Slots at and past it are masked out,
                whatever they hold.
    """

    key_bhck: jax.Array
    value_bhck: jax.Array
    length_b: jax.Array


def init_cache(batch: int, capacity: int, heads: int, head_dim: int, dtype) -> KVCache:
    """An empty one-layer cache: zeros, every sequence at length 0."""
    if not isinstance(capacity, (int, np.integer)) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    shape = (batch, heads, capacity, head_dim)
    # Two buffers, not one array twice: decoding donates the cache, which needs distinct buffers.
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))


def write(cache_bhck: jax.Array, new_bthk: jax.Array, length_b: jax.Array) -> jax.Array:
    """`new [B, T, H, dh]` written to slots `length_b + t` of each sequence; writes past the capacity
    are dropped. Only batch and slot are indexed: the heads stay a window of the scatter, which a
    mesh can then split by head without gathering the cache."""
    batch, steps = new_bthk.shape[:2]
    slot_bt = length_b[:, None] + jnp.arange(steps)
    return cache_bhck.at[jnp.arange(batch)[:, None], :, slot_bt].set(new_bthk.astype(cache_bhck.dtype),
                                                                     mode="drop")


def visible(position_bt: jax.Array, capacity: int) -> jax.Array:
    """bool `[B, T, C]`: slot s is visible to the query at position p when s <= p (causal)."""
    return jnp.arange(capacity)[None, None, :] <= position_bt[:, :, None]


def check_room(length_b: jax.Array, steps: int, capacity: int) -> None:
    """Refuse, when the lengths are concrete, a call that would write past the capacity."""
    if isinstance(length_b, jax.core.Tracer):
        return  # traced: the model turns the overflowing positions' logits into NaN instead
    lengths = np.asarray(length_b)
    if lengths.size and int(lengths.max()) + steps > capacity:
        raise ValueError(
            f"KV cache full: capacity {capacity} slots, sequences at lengths {lengths.tolist()}, and "
            f"{steps} more tokens would need {int(lengths.max()) + steps}; start from a larger "
            f"init_state(batch, capacity)")
