"""The RetNet block (SPEC section 5): retention then FFN, each with a residual and a norm."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from retnet_jax.config import Mode, RetNetConfig
from retnet_jax.layers.feedforward import FeedForward
from retnet_jax.layers.norms import Norm
from retnet_jax.layers.retention import MultiScaleRetention
from retnet_jax.ops import RetentionState, init_state
from retnet_jax.sharding import constrain


class RetNetBlock(nnx.Module):
    """Pre-norm: `Y = X + MSR(norm(X))`, `X' = Y + FFN(norm(Y))` (paper eq. 9).

    With `cfg.deepnorm`, post-norm DeepNet: `X = norm(alpha X + MSR(X))`, `X = norm(alpha X + FFN(X))`,
    `alpha = (2L)**0.25`, and fc1, fc2, out_proj and v_proj start divided by `(8L)**0.25`.
    """

    def __init__(self, cfg: RetNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.retention_norm = Norm.for_model(cfg)
        self.retention = MultiScaleRetention(cfg, rngs=rngs)
        self.ffn_norm = Norm.for_model(cfg)
        self.ffn = FeedForward(cfg, rngs=rngs)
        if cfg.deepnorm:
            shrink = (8.0 * cfg.n_layers) ** 0.25
            self.ffn.in_proj[...] = self.ffn.in_proj[...].at[:, 0].divide(shrink)
            self.ffn.out_proj[...] = self.ffn.out_proj[...] / shrink
            self.retention.out_proj[...] = self.retention.out_proj[...] / shrink
            dk, _, dv, _ = self.retention.piece_sizes  # v_proj: the columns after q and k
            self.retention.qkvg_proj[...] = self.retention.qkvg_proj[...].at[..., 2 * dk:2 * dk + dv].divide(shrink)

    def init_state(self, batch: int, capacity: int | None = None) -> RetentionState:
        """An empty one-layer state (`capacity` is ignored: retention's state does not grow)."""
        cfg = self.cfg
        return init_state(batch, cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim)

    def __call__(
        self, x_btd: jax.Array, state: RetentionState, *, mode: Mode, chunk_size: int,
        dropout_key: jax.Array | None = None,
    ) -> tuple[jax.Array, RetentionState]:
        """`dropout_key`: drop `cfg.dropout` of each residual branch's outputs (training); None: none."""
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        drop = functools.partial(dropout, self.cfg.dropout)
        if self.cfg.deepnorm:
            alpha = (2.0 * self.cfg.n_layers) ** 0.25
            y, state = self.retention(x_btd, state, mode=mode, chunk_size=chunk_size)
            x_btd = self.retention_norm(alpha * x_btd + drop(y, keys[0]))
            x_btd = self.ffn_norm(alpha * x_btd + drop(self.ffn(x_btd), keys[1]))
        else:
            y, state = self.retention(self.retention_norm(x_btd), state, mode=mode, chunk_size=chunk_size)
            x_btd = x_btd + drop(y, keys[0])
            x_btd = x_btd + drop(self.ffn(self.ffn_norm(x_btd)), keys[1])
        return constrain(x_btd, ("batch", "length", "embed")), state


def dropout(rate: float, x: jax.Array, key: jax.Array | None) -> jax.Array:
    """Inverted dropout: zero each element with probability `rate`, scale the rest by 1/(1 - rate).
    The identity when `key` is None or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
