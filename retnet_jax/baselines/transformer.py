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
        keys and values `[L, B, C, H, dh]` at zero, lengths `[L, B]` at 0."""
        cfg = self.cfg
        return per_layer(kv_cache.init_cache(batch, capacity, cfg.n_heads, cfg.head_dim, cfg.dtype), cfg.n_layers)

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
            state = _check_cache(state, cfg, batch)
            kv_cache.check_room(state.length_b[0], steps, state.key_bchk.shape[2])

        invalid_bt = (tokens_bt < 0) | (tokens_bt >= cfg.vocab_size)
        x_btd, layer_keys = embed_tokens(cfg, self.embed[...], self.embed_norm, tokens_bt, dropout_key)

        graphdef, block_params = nnx.split(self.blocks)
        # One length per sequence for all layers, taken outside the layer scan: the rotation angles
        # and masks are then loop-invariant.
        length_b = jnp.zeros((batch,), jnp.int32) if state is None else state.length_b[0]

        def layer(x_btd, scanned):
            params, layer_state, key = scanned
            if layer_state is not None:
                layer_state = layer_state._replace(length_b=length_b)
            return nnx.merge(graphdef, params)(x_btd, layer_state, dropout_key=key)

        x_btd, cache = jax.lax.scan(remat_layer(layer, cfg.remat), x_btd, (block_params, state, layer_keys))

        if self.final_norm is not None:
            x_btd = self.final_norm(x_btd)
        position_bt = length_b[:, None] + jnp.arange(steps)
        x_btd, cache = _poison_from(invalid_bt | (position_bt >= cache.key_bchk.shape[2]), x_btd, cache)
        if last_only:
            x_btd = x_btd[:, -1:]
        unembed_vd = self.embed[...] if self.unembed is None else self.unembed[...]
        logits_btv = unembed(x_btd, unembed_vd, cfg.dtype, kernels=self.kernels)
        return constrain(logits_btv, ("batch", "length", "vocab")), cache


def _poison_from(bad_bt: jax.Array, x_btd: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """NaN features from a sequence's first bad position on (an invalid id, or no room left under
    jit), and NaN keys and values for that sequence, so its later calls are NaN too."""
    poisoned_bt = jnp.cumsum(bad_bt, axis=1) > 0
    x_btd = jnp.where(poisoned_bt[..., None], jnp.nan, x_btd)
    poisoned_b = poisoned_bt[:, -1][None, :, None, None, None]  # against [L, B, C, H, dh]
    return x_btd, cache._replace(key_bchk=jnp.where(poisoned_b, jnp.nan, cache.key_bchk),
                                 value_bchk=jnp.where(poisoned_b, jnp.nan, cache.value_bchk))


def _check_cache(state, cfg: TransformerConfig, batch: int) -> KVCache:
    if not isinstance(state, KVCache):
        raise ValueError(f"state must be the KVCache of init_state or of a Transformer call, got "
                         f"{type(state).__name__}")
    capacity = state.key_bchk.shape[2] if state.key_bchk.ndim == 5 else None
    want = (cfg.n_layers, batch, capacity, cfg.n_heads, cfg.head_dim)
    for name in ("key_bchk", "value_bchk"):
        got = tuple(getattr(state, name).shape)
        if got != want:
            raise ValueError(f"state.{name} must have shape [L, B, C, H, dh] = {want} for this model "
                             f"and tokens of batch {batch}, got {got}")
    length_lb = state.length_b
    if tuple(length_lb.shape) != (cfg.n_layers, batch) or not jnp.issubdtype(length_lb.dtype, jnp.integer):
        raise ValueError(f"state.length_b must be integer with shape [L, B] = {(cfg.n_layers, batch)}, "
                         f"got {length_lb.dtype}{tuple(length_lb.shape)}")
    if not isinstance(length_lb, jax.core.Tracer) and not np.all(np.asarray(length_lb) == np.asarray(
            length_lb[:1])):
        raise ValueError("state.length_b must hold the same lengths for every layer (a model's cache "
                         f"advances its layers together), got {np.asarray(length_lb).tolist()}")
    return state
