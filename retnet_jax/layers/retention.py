"""Gated multi-scale retention (paper eq. 8; SPEC sections 2 and 4) around the pure ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from retnet_jax.config import Mode, RetNetConfig
from retnet_jax.layers.fused import fused_projection
from retnet_jax.layers.gated_projection import gated_projection
from retnet_jax.layers.initializers import stacked, xavier_uniform
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

QKVG_GAIN = 2.0**-2.5  # torchscale 0.3.0's xavier gain for q, k, v and g


class MultiScaleRetention(nnx.Module):
    """`Y = (swish(X Wg) * HeadNorm(Retention(X))) Wo`, heads differing only in their decay.

    Parameters are fused for fewer, larger matmuls: `qk_proj [d, 2, d]` (q then k) and
    `vg_proj [d, 2, value_dim]` (v then g); `out_proj [value_dim, d]`. No biases (0.3.0).
    """

    def __init__(self, cfg: RetNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, vd, pd = cfg.d_model, cfg.value_dim, cfg.param_dtype
        self.qk_proj = nnx.Param(stacked(rngs.params(), 2, lambda k: xavier_uniform(
            k, d, d, (d, d), QKVG_GAIN, pd)))
        self.vg_proj = nnx.Param(stacked(rngs.params(), 2, lambda k: xavier_uniform(
            k, d, vd, (d, vd), QKVG_GAIN, pd)))
        self.out_proj = nnx.Param(xavier_uniform(rngs.params(), vd, d, (vd, d), 1.0, pd))
        self.head_norm = HeadNorm(cfg.n_heads, cfg.value_head_dim, cfg.head_norm, cfg.head_norm_eps,
                                  param_dtype=pd)

    def __call__(
        self, x_btd: jax.Array, state: RetentionState, *, mode: Mode, chunk_size: int
    ) -> tuple[jax.Array, RetentionState]:
        cfg = self.cfg
        batch, length, _ = x_btd.shape
        heads, dk, dv = cfg.n_heads, cfg.key_head_dim, cfg.value_head_dim
        q_btd, k_btd, v_bte, gate_bte = checkpoint_name(
            fused_projection(x_btd, self.qk_proj[...], self.vg_proj[...], dtype=cfg.dtype), "projections")
        q_bthk = q_btd.reshape(batch, length, heads, dk)
        k_bthk = (k_btd * dk**-0.5).reshape(batch, length, heads, dk)
        v_bthv = v_bte.reshape(batch, length, heads, dv)

        position_bt = state.position_b[:, None] + jnp.arange(length)[None, :]
        # Decays and angles are compile-time float32 constants derived from the config, not state:
        # nothing differentiates, stores or shards them (SPEC section 8).
        freqs_p = rotation_frequencies(dk)
        q_bthk, k_bthk = rotate(q_bthk, position_bt, freqs_p), rotate(k_bthk, position_bt, freqs_p)

        log_decay_h = log_decay(heads, cfg.decay)
        if mode == "parallel":
            o_bthv, state = parallel_retention(q_bthk, k_bthk, v_bthv, log_decay_h, state)
        elif mode == "chunkwise":
            o_bthv, state = chunkwise_retention(
                q_bthk, k_bthk, v_bthv, log_decay_h, state, chunk_size=chunk_size)
        elif mode == "recurrent":
            o_bthv, state = recurrent_retention(q_bthk, k_bthk, v_bthv, log_decay_h, state)
        else:
            raise ValueError(f"mode must be 'parallel', 'chunkwise' or 'recurrent', got {mode!r}")

        o_bthv = checkpoint_name(o_bthv, "retention")
        # Gated in the heads' layout: the normalised heads are then the very array HeadNorm keeps
        # for its backward pass, stored once.
        y_btd = gated_projection("swish", gate_bte.reshape(o_bthv.shape), self.head_norm(o_bthv),
                                 self.out_proj[...], cfg.dtype)
        return y_btd, state
