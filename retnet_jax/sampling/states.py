"""What decoding needs to know about a model's state, for RetNet and the Transformer alike.

Both states carry a leading layer axis and then the batch axis on every leaf (`[L, B, ...]`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from retnet_jax.baselines.kv_cache import KVCache


def capacity(state) -> int | None:
    """Tokens a sequence can hold in `state`: a KV cache's slots; None when unbounded (RetNet)."""
    return state.key_bchk.shape[2] if isinstance(state, KVCache) else None


def hold_finished(old, new, active_b: jax.Array):
    """`new` for the sequences still decoding (`active_b`, bool `[B]`), `old` for the finished ones,
    so a finished sequence's state stays what it was when it stopped.

    A KV cache needs only its lengths held: the slot a finished sequence's dummy token wrote lies at
    its length, masked from every query and overwritten by its next real token. A retention state's
    sums are selected, but only on steps where some sequence has finished (`lax.cond`): the select
    reads and writes the whole state, as much memory traffic as the step's own update.
    """
    if isinstance(new, KVCache):
        return new._replace(length_b=jnp.where(active_b[None, :], new.length_b, old.length_b))

    def select(old, new):
        def leaf(o, n):
            return jnp.where(active_b.reshape((1, -1) + (1,) * (n.ndim - 2)), n, o)
        return jax.tree.map(leaf, old, new)

    return jax.lax.cond(jnp.all(active_b), lambda old, new: new, select, old, new)
