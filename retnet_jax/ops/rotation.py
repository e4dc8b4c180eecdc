"""The xPos-style position rotation of q and k (SPEC sections 1 and 2).

Angles are computed in float32 (or float64) whatever the activation dtype: positions reach 10**6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from retnet_jax.ops.state import accumulation_dtype


def rotation_frequencies(key_dim: int) -> np.ndarray:
    """`theta_i = 1 / 10000 ** linspace(0, 1, dk // 2)`, float32 `[dk // 2]` (linspace, not RoPE's 2i/dk)."""
    if key_dim % 2:
        raise ValueError(f"key_dim must be even for the pairwise rotation, got {key_dim}")
    return (1.0 / 10000 ** np.linspace(0.0, 1.0, key_dim // 2)).astype(np.float32)


def rotate(x_bthk: jax.Array, position_bt: jax.Array, freqs_p: jax.Array) -> jax.Array:
    """Rotate each pair `(x[2i], x[2i+1])` of the last axis by angle `position * theta_i`.

    `out_e = x_e cos - x_o sin`, `out_o = x_o cos + x_e sin`, exactly torchscale's `theta_shift` with
    interleaved `[t0, t0, t1, t1, ...]` angles. x: `[B, T, H, dk]`, position: int `[B, T]`.
    Returns x's dtype; the trigonometry runs in float32 (float64 for float64 x).
    """
    acc = accumulation_dtype(x_bthk.dtype)
    angle_btp = position_bt.astype(acc)[..., None] * jnp.asarray(freqs_p, acc)
    cos, sin = jnp.cos(angle_btp)[:, :, None], jnp.sin(angle_btp)[:, :, None]
    pairs = x_bthk.astype(acc).reshape(*x_bthk.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x_bthk.shape).astype(x_bthk.dtype)
