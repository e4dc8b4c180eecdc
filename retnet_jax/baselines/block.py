"""The Transformer block: attention then FFN, each with a residual and a norm (as RetNet's block)."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from retnet_jax.baselines import kv_cache
from retnet_jax.baselines.attention import CausalSelfAttention
from retnet_jax.baselines.config import TransformerConfig
from retnet_jax.baselines.kv_cache import KVCache
from retnet_jax.config import Mode
from retnet_jax.layers.block import dropout
from retnet_jax.layers.feedforward import FeedForward
from retnet_jax.layers.norms import Norm
from retnet_jax.sharding import constrain

TOKENS = ("batch", "length", "embed")


class TransformerBlock(nnx.Module):
    """Pre-norm: `Y = X + Attention(norm(X))`, `X' = Y + FFN(norm(Y))`.

    With `cfg.deepnorm`, post-norm DeepNet as in `RetNetBlock`: `X = norm(alpha X + Attention(X))`,
    `X = norm(alpha X + FFN(X))`, `alpha = (2L)**0.25`; fc1, fc2, v and out_proj start divided by
    `(8L)**0.25`.
    """

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attention_norm = Norm.for_model(cfg)
        self.attention = CausalSelfAttention(cfg, rngs=rngs)
        self.ffn_norm = Norm.for_model(cfg)
        self.ffn = FeedForward(cfg, rngs=rngs)
        if cfg.deepnorm:
            shrink, dh = (8.0 * cfg.n_layers) ** 0.25, cfg.head_dim
            self.ffn.in_proj[...] = self.ffn.in_proj[...].at[:, 0].divide(shrink)
            self.ffn.out_proj[...] = self.ffn.out_proj[...] / shrink
            self.attention.qkv_proj[...] = self.attention.qkv_proj[...].at[..., 2 * dh:].divide(shrink)
            self.attention.out_proj[...] = self.attention.out_proj[...] / shrink

    def init_state(self, batch: int, capacity: int) -> KVCache:
        """An empty one-layer cache for `batch` sequences of up to `capacity` tokens."""
        cfg = self.cfg
        return kv_cache.init_cache(batch, capacity, cfg.n_heads, cfg.head_dim, cfg.dtype)

    def __call__(self, x_btd: jax.Array, state: KVCache | None = None, *, mode: Mode = "parallel",
                 chunk_size: int | None = None, dropout_key: jax.Array | None = None
                 ) -> tuple[jax.Array, KVCache]:
        """`x [B, T, d]` -> `(x' [B, T, d], state)`; `state` as `CausalSelfAttention` takes it.
        `mode` and `chunk_size` are there for `RetNetBlock`'s contract: every mode is one computation.
        `dropout_key`: drop `cfg.dropout` of each residual branch's outputs (training); None: none."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        drop = functools.partial(dropout, self.cfg.dropout)
        x_btd = constrain(x_btd, TOKENS)
        if self.cfg.deepnorm:
            alpha = (2.0 * self.cfg.n_layers) ** 0.25
            y_btd, state = self.attention(x_btd, state)
            x_btd = self.attention_norm(alpha * x_btd + drop(y_btd, keys[0]))
            x_btd = self.ffn_norm(alpha * x_btd + drop(self.ffn(x_btd), keys[1]))
        else:
            y_btd, state = self.attention(self.attention_norm(x_btd), state)
            x_btd = x_btd + drop(y_btd, keys[0])
            x_btd = x_btd + drop(self.ffn(self.ffn_norm(x_btd)), keys[1])
        return constrain(x_btd, TOKENS), state
