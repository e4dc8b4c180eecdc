"""The Transformer baseline: embedding, a scanned stack of attention blocks, final norm, logits.

Same call contract as `RetNet`, so generic code (losses, generation, benchmarks) takes either.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from retnet_jax.baselines import kv_cache
from retnet_jax.baselines.block import TransformerBlock
from retnet_jax.baselines.config import TransformerConfig
from retnet_jax.baselines.kv_cache import KVCache
from retnet_jax.config import Mode, check_mode
from retnet_jax.layers.fused import unembed
from retnet_jax.layers.norms import Norm
from retnet_jax.layer_stack import is_unstacked, layer_zero, run_blocks
from retnet_jax.model import (LAYER_METADATA, check_tokens, embed_tokens, embedding_table, per_layer,
                              remat_layer)
from retnet_jax.ops.kernels import resolve_kernels
from retnet_jax.sharding import constrain


class Transformer(nnx.Module):
    """`model(tokens [B, T], mode=..., state=None) -> (logits [B, T, vocab] float32, KVCache)`.

    Build it from a RetNet config: `Transformer(TransformerConfig.from_retnet(cfg), rngs=...)`.
    The blocks are created with `nnx.vmap` and run with `jax.lax.scan` (compile time does not grow
    with depth); their parameters carry a leading "layers" axis.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, TransformerConfig):
            raise ValueError(f"cfg must be a TransformerConfig (from a RetNetConfig: "
                             f"TransformerConfig.from_retnet(cfg)), got {type(cfg).__name__}")
        self.cfg = cfg
        self.kernels = resolve_kernels(cfg.kernels)
        self.embed = embedding_table(cfg, rngs)
        self.embed_norm = Norm.for_model(cfg) if cfg.embedding_norm else None

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYER_METADATA)
        def make_blocks(rngs: nnx.Rngs) -> TransformerBlock:
            return TransformerBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = None if cfg.deepnorm else Norm.for_model(cfg)  # DeepNet blocks end in one
        self.unembed = None if cfg.tie_embeddings else embedding_table(cfg, rngs)

    def init_state(self, batch: int, capacity: int) -> KVCache:
        """An empty cache for `batch` sequences of up to `capacity` tokens each (prompt included):
        keys and values `[L, B, H, C, dh]` at zero, lengths `[L, B]` at 0."""
        cfg = self.cfg
        def empty():
            return kv_cache.init_cache(batch, capacity, cfg.n_heads, cfg.head_dim, cfg.dtype)
        if is_unstacked(self):
            return [empty() for _ in range(cfg.n_layers)]
        return per_layer(empty(), cfg.n_layers)

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        mode: Mode = "parallel",
        state: KVCache | None = None,
        chunk_size: int | None = None,
        last_only: bool = False,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """Logits for `tokens [B, T]` (int), continuing from `state` (None: fresh sequences).

        mode: accepted for RetNet's contract and checked, but all three are one computation here
        (every token attends to the cache and to the tokens before it in this call): "chunkwise" is
        the parallel form (a Transformer has no chunkwise form), "recurrent" is that form on
        however many tokens are given. `chunk_size` is ignored.

        state: None, or the `KVCache` of `init_state(batch, capacity)` or of a previous call. Each
        sequence continues at its own length (the layers of one sequence always share it; it is read
        from the first layer). With None, the returned cache holds exactly these tokens (capacity T,
        full): to decode afterwards, prefill into an `init_state` cache. A call that would write
        past the capacity is refused when the lengths are concrete; under `jax.jit` the overflowing
        positions' logits, and the rest of that sequence's, are NaN.

        last_only: the logits of the last position only, `[B, 1, vocab]` (the unembedding runs there
        alone: what a prefill needs).

        dropout_key: a PRNG key to apply `cfg.dropout` (training); None (default): no dropout.

        Ids outside the vocabulary are refused when concrete; traced, their logits, and those of every
        later position and call of that sequence, are NaN (as in `RetNet`).
        """
        cfg = self.cfg
        tokens_bt = check_tokens(tokens_bt, cfg.vocab_size)
        check_mode(mode)
        batch, steps = tokens_bt.shape
        if state is not None:
            state = _check_cache(state, cfg, batch, unstacked=is_unstacked(self))
            kv_cache.check_room(layer_zero(state, "length_b"), steps, cache_capacity(state))

        invalid_bt = (tokens_bt < 0) | (tokens_bt >= cfg.vocab_size)
        x_btd, layer_keys = embed_tokens(cfg, self.embed[...], self.embed_norm, tokens_bt, dropout_key)

        # One length per sequence for all layers, taken outside the layer loop: the rotation angles
        # and masks are then loop-invariant.
        length_b = jnp.zeros((batch,), jnp.int32) if state is None else layer_zero(state, "length_b")

        def layer(block, x_btd, layer_state, key):
            if layer_state is not None:
                layer_state = layer_state._replace(length_b=length_b)
            return block(x_btd, layer_state, dropout_key=key)

        x_btd, cache = run_blocks(self.blocks, layer, x_btd, state, layer_keys,
                                  lambda fn: remat_layer(fn, cfg.remat))

        if self.final_norm is not None:
            x_btd = self.final_norm(x_btd)
        position_bt = length_b[:, None] + jnp.arange(steps)
        x_btd, cache = _poison_from(invalid_bt | (position_bt >= cache_capacity(cache)), x_btd, cache)
        if last_only:
            x_btd = x_btd[:, -1:]
        unembed_vd = self.embed[...] if self.unembed is None else self.unembed[...]
        logits_btv = unembed(x_btd, unembed_vd, cfg.dtype, kernels=self.kernels)
        return constrain(logits_btv, ("batch", "length", "vocab")), cache


def cache_capacity(cache) -> int:
    """Slots per sequence of a stacked (`[L, B, H, C, dh]`) or per-layer list (`[B, H, C, dh]`) cache."""
    return (cache[0] if isinstance(cache, list) else cache).key_bhck.shape[-2]


def _poison_from(bad_bt: jax.Array, x_btd: jax.Array, cache) -> tuple[jax.Array, KVCache]:
    """NaN features from a sequence's first bad position on (an invalid id, or no room left under
    jit), and a NaN key in that sequence's first slot (visible to every later query, so its later
    calls are NaN too; one slot, not the whole cache, is written)."""
    poisoned_bt = jnp.cumsum(bad_bt, axis=1) > 0
    x_btd = jnp.where(poisoned_bt[..., None], jnp.nan, x_btd)
    poisoned_b11 = poisoned_bt[:, -1, None, None]  # right-aligned: against [L, B, H, dh] or [B, H, dh]

    def poison(layer_cache: KVCache) -> KVCache:
        first_key = layer_cache.key_bhck[..., 0, :]
        return layer_cache._replace(key_bhck=layer_cache.key_bhck.at[..., 0, :].set(
            jnp.where(poisoned_b11, jnp.nan, first_key)))

    return x_btd, ([poison(c) for c in cache] if isinstance(cache, list) else poison(cache))


def _check_cache(state, cfg: TransformerConfig, batch: int, *, unstacked: bool = False):
    """`state` checked against the model: a stacked `KVCache` (`[L, B, H, C, dh]`), or for an unstacked
    model a list of L per-layer ones (`[B, H, C, dh]`)."""
    if unstacked:
        if not isinstance(state, list) or len(state) != cfg.n_layers:
            raise ValueError(f"state of a model with unstacked layers must be a list of {cfg.n_layers} "
                             f"per-layer KVCaches (layer_stack.unstack_state), got {type(state).__name__}")
        layer_caches, prefix, layers, names = state, "state[i].", (), ""
    else:
        layer_caches, prefix, layers, names = [state], "state.", (cfg.n_layers,), "L, "
    for cache in layer_caches:
        if not isinstance(cache, KVCache):
            raise ValueError(f"state must be the KVCache of init_state or of a Transformer call, got "
                             f"{type(cache).__name__}")
        capacity = cache.key_bhck.shape[-2] if cache.key_bhck.ndim == len(layers) + 4 else None
        want = (*layers, batch, cfg.n_heads, capacity, cfg.head_dim)
        for name in ("key_bhck", "value_bhck"):
            got = tuple(getattr(cache, name).shape)
            if got != want:
                raise ValueError(f"{prefix}{name} must have shape [{names}B, H, C, dh] = {want} for this "
                                 f"model and tokens of batch {batch}, got {got}")
        length = cache.length_b
        if tuple(length.shape) != (*layers, batch) or not jnp.issubdtype(length.dtype, jnp.integer):
            raise ValueError(f"{prefix}length_b must be integer with shape [{names}B] = {(*layers, batch)}, "
                             f"got {length.dtype}{tuple(length.shape)}")
    lengths = [c.length_b for c in layer_caches]
    if not any(isinstance(n, jax.core.Tracer) for n in lengths):
        length_lb = np.concatenate([np.asarray(n).reshape(-1, batch) for n in lengths])
        if not np.all(length_lb == length_lb[:1]):
            raise ValueError(f"{prefix}length_b must hold the same lengths for every layer (a model's cache "
                             f"advances its layers together), got {length_lb.tolist()}")
    return state
