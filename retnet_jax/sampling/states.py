"""What decoding needs to know about a model's state, for RetNet and the Transformer alike.

A state is stacked (every leaf `[L, B, ...]`: what a model call returns) or, while decoding with
unstacked layers, a list of per-layer states (leaves `[B, ...]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retnet_jax.baselines.kv_cache import KVCache


def capacity(state) -> int | None:
    """Tokens a sequence can hold in `state`: a KV cache's slots; None when unbounded (RetNet)."""
    layer = state[0] if isinstance(state, list) else state
    if not isinstance(layer, KVCache):
        return None
    return layer.key_bhck.shape[-2]


def hold_finished(old, new, active_b: jax.Array):
    """`new` for the sequences still decoding (`active_b`, bool `[B]`), `old` for the finished ones,
    so a finished sequence's state stays what it was when it stopped.

    A KV cache needs only its lengths held: the slot a finished sequence's dummy token wrote lies at
    its length, masked from every query and overwritten by its next real token. A retention state's
    sums are selected, but only on steps where some sequence has finished (`lax.cond`): the select
    reads and writes the whole state, as much memory traffic as the step's own update.
    """
    if isinstance(new, list):
        if isinstance(new[0], KVCache):
            return [hold_finished(o, n, active_b) for o, n in zip(old, new)]
    elif isinstance(new, KVCache):
        return new._replace(length_b=jnp.where(active_b, new.length_b, old.length_b))

    batch_axis = 0 if isinstance(new, list) else 1  # a stacked state's layer axis comes first

    def select(old, new):
        def leaf(o, n):
            shape = (1,) * batch_axis + (-1,) + (1,) * (n.ndim - batch_axis - 1)
            return jnp.where(active_b.reshape(shape), n, o)
        return jax.tree.map(leaf, old, new)

    return jax.lax.cond(jnp.all(active_b), lambda old, new: new, select, old, new)
