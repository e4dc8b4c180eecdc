"""Causal multi-head softmax attention with rotary positions, over the call's tokens or a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from retnet_jax.baselines import kv_cache
from retnet_jax.layers.fused import fused_projection, projection
from retnet_jax.layers.initializers import xavier_uniform
from retnet_jax.ops import rotate, rotation_frequencies
from retnet_jax.ops.kernels import resolve_kernels
from retnet_jax.sharding import constrain

QKV_GAIN = 2.0**-0.5  # torchscale's MultiheadAttention: xavier_uniform(gain=1/sqrt(2)) for q, k, v
HEADS = ("batch", "length", "heads", "head_dim")
CACHE = ("batch", "cache", "heads", "head_dim")


def attend(q_bthk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array,
           visible_bts: jax.Array | None = None) -> jax.Array:
    """`softmax(q k^T / sqrt(dh)) v` per head, `[B, T, H, dh]`. Keys `[B, S, H, dh]`; `visible_bts`
    masks them (None: causal with S == T, which lets a GPU run cuDNN's causal kernel)."""
    mask = None if visible_bts is None else visible_bts[:, None]  # [B, 1 (heads), T, S]
    return jax.nn.dot_product_attention(q_bthk, k_bshk, v_bshk, mask=mask,
                                        is_causal=visible_bts is None, implementation=None)


class CausalSelfAttention(nnx.Module):
    """Multi-head attention with RetNet's pairwise rotation of q and k (RoPE-style, no decay).

    `qkv_proj [d, H, 3 dh]` holds each head's q, k, v side by side, so tensor parallelism splits it
    by head; `out_proj [H, dh, d]` is split by its input rows. No biases.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.kernels = resolve_kernels(cfg.kernels)
        d, heads, dh, pd = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.param_dtype
        self.qkv_proj = nnx.Param(xavier_uniform(rngs.params(), d, d, (d, heads, 3 * dh), QKV_GAIN, pd),
                                  logical_axes=("embed", "heads", "head_dim"))
        self.out_proj = nnx.Param(xavier_uniform(rngs.params(), d, d, (heads, dh, d), 1.0, pd),
                                  logical_axes=("heads", "head_dim", "embed"))

    def __call__(self, x_btd: jax.Array, length_b: jax.Array,
                 cache: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`x [B, T, d]` at positions `length_b + t` -> `(y [B, T, d], (keys, values))`.

        cache None: the tokens attend among themselves and their keys and values `[B, T, H, dh]` are
        returned. Else `(keys, values)` `[B, C, H, dh]`: the tokens are written at their positions
        and attend to every slot up to their own; the updated cache is returned.
        """
        cfg, dh = self.cfg, self.cfg.head_dim
        q_bthk, k_bthk, v_bthk = checkpoint_name(fused_projection(
            x_btd, self.qkv_proj[...], (dh, dh, dh), dtype=cfg.dtype, kernels=self.kernels), "projections")
        q_bthk, k_bthk, v_bthk = (constrain(a, HEADS) for a in (q_bthk, k_bthk, v_bthk))
        position_bt = length_b[:, None] + jnp.arange(x_btd.shape[1])
        freqs_p = rotation_frequencies(dh)
        q_bthk, k_bthk = rotate(q_bthk, position_bt, freqs_p), rotate(k_bthk, position_bt, freqs_p)

        if cache is None:
            o_bthk, cache = attend(q_bthk, k_bthk, v_bthk), (k_bthk, v_bthk)
        else:
            cache = tuple(constrain(kv_cache.write(constrain(c, CACHE), new, length_b), CACHE)
                          for c, new in zip(cache, (k_bthk, v_bthk)))
            o_bthk = attend(q_bthk, *cache, kv_cache.visible(position_bt, cache[0].shape[1]))
        # Kept under remat="projections" like retention's output: recomputing it costs O(T^2).
        o_bthk = checkpoint_name(constrain(o_bthk, HEADS), "projections")
        y_btd = projection(o_bthk, self.out_proj[...], dtype=cfg.dtype, kernels=self.kernels)
        return constrain(y_btd, ("batch", "length", "embed")), cache
