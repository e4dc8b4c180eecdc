"""Gated multi-scale retention (paper eq. 8; SPEC sections 2 and 4) around the pure ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from retnet_jax.config import Mode, RetNetConfig, check_mode
from retnet_jax.layers.fused import fused_projection
from retnet_jax.layers.gated_projection import gated_projection
from retnet_jax.layers.initializers import xavier_uniform
from retnet_jax.layers.norms import HeadNorm
from retnet_jax.ops import (
    RetentionState,
    chunkwise_retention,
    log_decay,
    parallel_retention,
    recurrent_retention,
    rotate,
    rotation_frequencies,
)
from retnet_jax.ops.kernels import resolve_kernels
from retnet_jax.sharding import constrain

QKVG_GAIN = 2.0**-2.5  # torchscale 0.3.0's xavier gain for q, k, v and g


class MultiScaleRetention(nnx.Module):
    """`Y = (swish(X Wg) * HeadNorm(Retention(X))) Wo`, heads differing only in their decay.

    `qkvg_proj [d, H, 2dk + 2dv]` holds each head's q, k, v and g columns side by side (one matmul;
    under tensor parallelism each device owns whole heads); `out_proj [H, dv, d]`. No biases (0.3.0).
    """

    def __init__(self, cfg: RetNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernels = resolve_kernels(cfg.kernels)
        d, vd, pd = cfg.d_model, cfg.value_dim, cfg.param_dtype
        heads, dk, dv = cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim
        q, k, v, g = (xavier_uniform(key, d, width * heads, (d, heads, width), QKVG_GAIN, pd)
                      for key, width in zip(jax.random.split(rngs.params(), 4), (dk, dk, dv, dv)))
        self.qkvg_proj = nnx.Param(jnp.concatenate([q, k, v, g], axis=-1),
                                   logical_axes=("embed", "heads", "head_dim"))
        self.out_proj = nnx.Param(xavier_uniform(rngs.params(), vd, d, (vd, d), 1.0, pd).reshape(heads, dv, d),
                                  logical_axes=("heads", "head_dim", "embed"))
        self.head_norm = HeadNorm(heads, dv, cfg.head_norm, cfg.head_norm_eps, param_dtype=pd,
                                  kernels=self.kernels)

    @property
    def piece_sizes(self) -> tuple[int, int, int, int]:
        """Widths of q, k, v, g along the last axis of `qkvg_proj`."""
        dk, dv = self.cfg.key_head_dim, self.cfg.value_head_dim
        return dk, dk, dv, dv

    def __call__(
        self, x_btd: jax.Array, state: RetentionState, *, mode: Mode, chunk_size: int
    ) -> tuple[jax.Array, RetentionState]:
        cfg = self.cfg
        length, heads, dk = x_btd.shape[1], cfg.n_heads, cfg.key_head_dim
        pieces = fused_projection(x_btd, self.qkvg_proj[...], self.piece_sizes, dtype=cfg.dtype,
                                  kernels=self.kernels)
        pieces = (constrain(p, ("batch", "length", "heads", "head_dim")) for p in pieces)
        q_bthk, k_bthk, v_bthv, gate_bthv = checkpoint_name(tuple(pieces), "projections")
        k_bthk = k_bthk * dk**-0.5

        position_bt = state.position_b[:, None] + jnp.arange(length)[None, :]
        # Decays and angles are compile-time float32 constants derived from the config, not state:
        # nothing differentiates, stores or shards them (SPEC section 8).
        freqs_p = rotation_frequencies(dk)
        q_bthk, k_bthk = rotate(q_bthk, position_bt, freqs_p), rotate(k_bthk, position_bt, freqs_p)

        log_decay_h = log_decay(heads, cfg.decay)
        if mode == "parallel":
            o_bthv, state = parallel_retention(q_bthk, k_bthk, v_bthv, log_decay_h, state,
                                               kernels=self.kernels)
        elif mode == "chunkwise":
            o_bthv, state = chunkwise_retention(
                q_bthk, k_bthk, v_bthv, log_decay_h, state, chunk_size=chunk_size, kernels=self.kernels)
        elif check_mode(mode) == "recurrent":
            o_bthv, state = recurrent_retention(q_bthk, k_bthk, v_bthv, log_decay_h, state)

        o_bthv = checkpoint_name(constrain(o_bthv, ("batch", "length", "heads", "head_dim")), "retention")
        y_btd = gated_projection("swish", gate_bthv, self.head_norm(o_bthv), self.out_proj[...],
                                 cfg.dtype, kernels=self.kernels)
        return constrain(y_btd, ("batch", "length", "embed")), state
