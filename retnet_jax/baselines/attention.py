"""Causal multi-head softmax attention with rotary positions, over the call's tokens or a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from retnet_jax.baselines import kv_cache
from retnet_jax.baselines.kv_cache import KVCache
from retnet_jax.layers.fused import fused_projection, projection
from retnet_jax.layers.initializers import xavier_uniform
from retnet_jax.ops import rotate, rotation_frequencies
from retnet_jax.ops.kernels import resolve_kernels
from retnet_jax.sharding import constrain

QKV_GAIN = 2.0**-0.5  # torchscale's MultiheadAttention: xavier_uniform(gain=1/sqrt(2)) for q, k, v
HEADS = ("batch", "length", "heads", "head_dim")
CACHE = ("batch", "heads", "cache", "head_dim")


def attend(q_bthk: jax.Array, k_bshk: jax.Array, v_bshk: jax.Array,
           visible_bts: jax.Array | None = None) -> jax.Array:
    """`softmax(q k^T / sqrt(dh)) v` per head, `[B, T, H, dh]`. Keys `[B, S, H, dh]`; `visible_bts`
    masks them (None: causal with S == T, the form cuDNN's fused kernel takes).

    `implementation=None` leaves the kernel to JAX: XLA's in jax 0.10 (softmax in float32), a
    fused one where a later JAX picks it.
    """
    mask = None if visible_bts is None else visible_bts[:, None]  # [B, 1 (heads), T, S]
    return jax.nn.dot_product_attention(q_bthk, k_bshk, v_bshk, mask=mask,
                                        is_causal=visible_bts is None, implementation=None)


def attend_cache(q_bhtk: jax.Array, key_bhck: jax.Array, value_bhck: jax.Array,
                 visible_btc: jax.Array) -> jax.Array:
    """`softmax(q k^T / sqrt(dh)) v` per head over a cache's slots, `[B, H, T, dh]`, the keys and
    values read in their stored heads-major layout (a `[B, C, H, dh]` layout costs a transposed copy
    of the whole cache per step). Scores and softmax in float32, as `attend`'s."""
    scale = q_bhtk.shape[-1] ** -0.5
    scores_bhtc = jnp.einsum("bhtk,bhck->bhtc", q_bhtk, key_bhck, preferred_element_type=jnp.float32) * scale
    scores_bhtc = jnp.where(visible_btc[:, None], scores_bhtc, -jnp.inf)  # slot 0 is always visible
    probs_bhtc = jax.nn.softmax(scores_bhtc, axis=-1).astype(value_bhck.dtype)
    return jnp.einsum("bhtc,bhck->bhtk", probs_bhtc, value_bhck)


def heads_major(x_bthk: jax.Array) -> jax.Array:
    return jnp.swapaxes(x_bthk, 1, 2)


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

    def __call__(self, x_btd: jax.Array, state: KVCache | None = None) -> tuple[jax.Array, KVCache]:
        """`x [B, T, d]` -> `(y [B, T, d], state)`, the tokens at positions `state.length_b + t`.

        state None: the tokens attend among themselves (positions from 0) and the returned cache
        holds exactly them (capacity T). Else each sequence's tokens are written to its next slots
        and attend to every slot up to their own.
        """
        cfg, dh = self.cfg, self.cfg.head_dim
        batch, steps, _ = x_btd.shape
        length_b = jnp.zeros((batch,), jnp.int32) if state is None else state.length_b
        q_bthk, k_bthk, v_bthk = checkpoint_name(fused_projection(
            x_btd, self.qkv_proj[...], (dh, dh, dh), dtype=cfg.dtype, kernels=self.kernels), "projections")
        q_bthk, k_bthk, v_bthk = (constrain(a, HEADS) for a in (q_bthk, k_bthk, v_bthk))
        position_bt = length_b[:, None] + jnp.arange(steps)
        freqs_p = rotation_frequencies(dh)
        q_bthk, k_bthk = rotate(q_bthk, position_bt, freqs_p), rotate(k_bthk, position_bt, freqs_p)

        if state is None:
            o_bthk = attend(q_bthk, k_bthk, v_bthk)
            key_bhck, value_bhck = heads_major(k_bthk), heads_major(v_bthk)
        else:
            key_bhck, value_bhck = (
                constrain(kv_cache.write(constrain(c, CACHE), new, length_b), CACHE)
                for c, new in ((state.key_bhck, k_bthk), (state.value_bhck, v_bthk)))
            visible_btc = kv_cache.visible(position_bt, key_bhck.shape[2])
            o_bthk = heads_major(attend_cache(heads_major(q_bthk), key_bhck, value_bhck, visible_btc))
        # Kept under remat="projections" like retention's output: recomputing it costs O(T^2).
        o_bthk = checkpoint_name(constrain(o_bthk, HEADS), "projections")
        y_btd = projection(o_bthk, self.out_proj[...], dtype=cfg.dtype, kernels=self.kernels)
        return constrain(y_btd, ("batch", "length", "embed")), KVCache(key_bhck, value_bhck, length_b + steps)
