"""Normalisation layers, computed in float32 whatever the activation dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from retnet_jax.ops.state import accumulation_dtype


def rms_normalise(x: jax.Array, eps: float) -> jax.Array:
    """`x / sqrt(mean(x**2) + eps)` over the last axis, in float32 (at least)."""
    x = x.astype(accumulation_dtype(x.dtype))
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


def layer_normalise(x: jax.Array, eps: float) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` over the last axis, in float32 (at least)."""
    x = x.astype(accumulation_dtype(x.dtype))
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + eps)


class Norm(nnx.Module):
    """RMSNorm (torchscale 0.3.0: learned scale, no bias) or LayerNorm (scale and bias) over `[..., d]`."""

    def __init__(self, dim: int, kind: str, eps: float, *, dtype, param_dtype):
        self.kind, self.eps, self.dtype = kind, eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype)) if kind == "layernorm" else None

    @classmethod
    def for_model(cls, cfg) -> "Norm":
        """The block/final/embedding norm a `RetNetConfig` asks for."""
        return cls(cfg.d_model, cfg.norm, cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        normalise = rms_normalise if self.kind == "rmsnorm" else layer_normalise
        y = normalise(x, self.eps) * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class HeadNorm(nnx.Module):
    """Normalise each head's `dv` outputs separately (never across time, SPEC section 8).

    "rmsnorm": torchscale 0.3.0 (no affine); "layernorm": the first code release (no affine);
    "groupnorm": the paper's GroupNorm with one group per head and a per-channel affine.
    """

    def __init__(self, heads: int, head_dim: int, kind: str, eps: float, *, param_dtype):
        self.kind, self.eps = kind, eps
        if kind == "groupnorm":
            self.scale = nnx.Param(jnp.ones((heads, head_dim), param_dtype))
            self.bias = nnx.Param(jnp.zeros((heads, head_dim), param_dtype))

    def __call__(self, o_bthv: jax.Array) -> jax.Array:
        """`[B, T, H, dv]` -> float32 `[B, T, H, dv]`."""
        if self.kind == "rmsnorm":
            return rms_normalise(o_bthv, self.eps)
        y = layer_normalise(o_bthv, self.eps)
        if self.kind == "groupnorm":
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y
